"""`pcd caption RUN_OR_EXPORT CLOUD...`: describe point clouds in words with the distilled student.

The student's concept and prefix heads (kept by `pcd export` in heads.safetensors) predict ClipCap's semantic prefix
from a point cloud; ClipCap's own GPT-2 decodes it with `pcd.pipeline.clipcap.decode_captions`, the function
`pcd cache-teacher` decodes the teacher's prefixes with (greedy, or predict.py's beam search). Every cloud is brought
into the student's frame the way pre-training fed it frames: z up (`--up-axis` rotates y-up files), a seeded subset
of the pre-training point count, then the one normalisation of `pcd.trainer.normalize`. The student saw single
camera frames only: a whole room, a region or an object file is outside what it learned, and the output says so.

The export records the teacher it was distilled from (its ClipCap file by sha256); a ClipCap checkpoint whose prefix
shape differs is refused, and one with another hash is used with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.clipcap import ClipCaptionModel, decode_captions, load_clipcap, load_tokenizer
from pcd.pipeline.config import InvalidSetting, config_from_dict, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import sha256_file
from pcd.trainer.backbone import BackboneConfig
from pcd.trainer.clouds import Cloud, read_cloud
from pcd.trainer.distill import DistillConfig, DistillModel
from pcd.trainer.evaluation import evaluation_device
from pcd.trainer.heads import read_distill_heads
from pcd.trainer.frames import FRAMES, Frame, frame_of_weights, to_frame
from pcd.trainer.weights import METADATA_FILE, load_backbone_weights, read_export_metadata

console = Console(stderr=True, soft_wrap=True)
DEFAULT_POINTS = 4096  # the paper's pre-training points per frame, for exports that do not record theirs
# Objectives whose heads end in ClipCap's prefix, and the DistillModel variant that holds those heads.
PREFIX_VARIANTS = {"distill": "distill", "distill+reconstruct": "distill", "distill-no-concept": "distill-no-concept"}
NOT_A_FRAME = {"file": "a cloud file", "region": "a region of a scene", "scene": "a whole scene"}


@dataclass
class Config:
    weights: Path = Path("runs/pretrain")  # a pretrain run folder (its export/) or a pcd export folder
    clouds: list[str] = field(default_factory=list)  # see pcd.trainer.clouds
    clipcap: Optional[Path] = None  # the ClipCap checkpoint whose GPT-2 decodes (the one distilled from)
    tokenizer: Optional[Path] = None  # local GPT-2 tokenizer folder (vocab.json, merges.txt)
    beam: int = setting(0, non_negative)  # 0: greedy (as cache-teacher's default); N > 1: beam search of width N
    up_axis: str = "z"  # up axis of cloud files: z (ScanNet, pcd) or y (ModelNet, ShapeNet)
    num_points: Optional[int] = setting(None, positive)  # default: the pre-training run's points per frame
    seed: int = 0  # which points a larger cloud keeps
    out: Optional[Path] = None  # also write the captions as JSON lines here
    device: Optional[str] = None  # default: cuda when available

    def validate(self) -> None:
        if self.up_axis not in ("y", "z"):
            raise InvalidSetting("up_axis", "must be y or z")


@dataclass
class Student:
    """The exported backbone with its prefix heads, and what the export says about how it was trained."""

    model: DistillModel
    metadata: dict[str, Any]
    export_dir: Path
    num_points: int
    frame: Frame  # the input frame the export records (pcd's: z up, unit sphere)

    @property
    def prefix_shape(self) -> tuple[int, int]:
        return self.model.prefix_shape

    @property
    def teacher(self) -> dict[str, Any]:
        teacher = self.metadata.get("teacher")
        return teacher if isinstance(teacher, dict) else {}

    @torch.no_grad()
    def prefixes(self, inputs: np.ndarray, device: torch.device) -> torch.Tensor:
        """Normalised clouds (B, N, 3) -> predicted prefixes (B, L, D), float32, on `device`."""
        self.model.to(device).eval()
        return self.model(torch.from_numpy(inputs).to(device)).float()


def find_export(path: Path) -> Path:
    """The export folder of `path`: an export folder itself, or a run folder whose export/ holds one."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / METADATA_FILE).is_file():
            return candidate
    if path.is_file() and path.name == METADATA_FILE:
        return path.parent
    if (path / "checkpoints").is_dir():
        raise PcdError(f"{path}: the run has no export yet; run `pcd export {path}` first")
    raise PcdError(f"{path}: not a pcd export folder or pretrain run folder (no {METADATA_FILE})")


def load_student(path: Path) -> Student:
    """The student of an export: backbone and prefix heads loaded strictly; refuses exports without a prefix head."""
    export_dir = find_export(path)
    metadata = read_export_metadata(export_dir) or {}
    where = export_dir / METADATA_FILE
    heads = metadata.get("heads")
    objective = str(metadata.get("objective") or (heads or {}).get("objective"))
    if not isinstance(heads, dict) or not heads.get("distill") or objective not in PREFIX_VARIANTS:
        raise PcdError(f"{where}: exported from a '{objective}' run, which has no prefix head to caption with "
                       f"(captions need an objective of {', '.join(PREFIX_VARIANTS)})")
    distill = heads["distill"]
    try:
        backbone_cfg = config_from_dict(BackboneConfig, metadata["backbone"])
        distill_cfg = config_from_dict(DistillConfig, distill.get("config") or {})
        prefix_shape = (int(distill["prefix_shape"][0]), int(distill["prefix_shape"][1]))
        clip_dim = int(distill.get("clip_dim") or 0)
    except (PcdError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise PcdError(f"{where}: cannot rebuild the student from its 'backbone' and 'heads.distill' entries "
                       f"({exc})") from None
    model = DistillModel(backbone_cfg, distill_cfg, prefix_shape, clip_dim, PREFIX_VARIANTS[objective])
    load_backbone_weights(model.backbone, export_dir)
    state = read_distill_heads(export_dir, heads)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    for key, tensor in expected.items():
        if key not in state:
            raise PcdError(f"{export_dir / heads['file']}: prefix head key '{key}' is missing")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise PcdError(f"{export_dir / heads['file']}: '{key}' has shape {tuple(state[key].shape)}, the "
                           f"student needs {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PcdError(f"{export_dir / heads['file']}: unexpected head key '{extra[0]}'")
    model.load_state_dict({**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}, **state})
    try:
        frame = frame_of_weights(metadata, has_init=True)
    except KeyError:
        raise PcdError(f"{where}: input normalisation '{(metadata.get('normalization') or {}).get('name')}' is not "
                       f"one this version of pcd can feed ({', '.join(FRAMES)})") from None
    pretrain_config = metadata.get("pretrain_config") or {}
    return Student(model.eval(), metadata, export_dir, int(pretrain_config.get("num_points") or DEFAULT_POINTS),
                   frame)


def student_input(cloud: Cloud, student: Student, num_points: int, seed: int) -> np.ndarray:
    """(num_points, 3) float32 in the student's frame: a seeded subset (repeats only when the cloud is smaller, as
    pre-training samples a frame), then the export's frame (`pcd.trainer.frames.to_frame`: its up axis, and the
    pre-training normalisation into the unit sphere); clouds arrive z up (`pcd.trainer.clouds`)."""
    rng = np.random.default_rng(seed)
    chosen = cloud.xyz[rng.choice(len(cloud.xyz), num_points, replace=len(cloud.xyz) < num_points)]
    return to_frame(chosen, "z", student.frame)


def check_clipcap(student: Student, clipcap: ClipCaptionModel, path: Optional[Path],
                  identity: Optional[dict[str, Any]] = None) -> list[str]:
    """Refuse a ClipCap whose prefix shape differs from the student's; warnings when it is not the teacher's file
    (`path`, by sha256) or, for the random tiny teacher (no file), not the teacher the export records."""
    where = path or "the tiny random ClipCap"
    shape = (clipcap.shape.prefix_length, clipcap.shape.gpt_width)
    if shape != student.prefix_shape:
        raise PcdError(f"{where}: ClipCap prefix is {shape[0]}x{shape[1]}, the student predicts "
                       f"{student.prefix_shape[0]}x{student.prefix_shape[1]} (another ClipCap layout)")
    teacher, warnings = student.teacher, []
    if teacher.get("random"):
        warnings.append(f"the student was distilled from a RANDOM teacher ({teacher.get('name')}): its captions "
                        "mean nothing")
    if path is None:
        recorded_shape, shape_now = teacher.get("clipcap"), (identity or {}).get("clipcap")
        if teacher.get("name") != (identity or {}).get("name") or (recorded_shape and recorded_shape != shape_now):
            warnings.append(f"{where} is not the teacher the student was distilled from ({teacher.get('name')}, "
                            "ClipCap " + str(recorded_shape) + "): captions may not fit")
        return warnings
    recorded = teacher.get("clipcap_sha256")
    if recorded and recorded != sha256_file(path):
        warnings.append(f"{path} is not the ClipCap checkpoint the student was distilled from "
                        f"({teacher.get('clipcap_checkpoint')}, sha256 {str(recorded)[:12]}...): captions may not fit")
    elif not recorded and not teacher.get("random"):
        warnings.append(f"{student.export_dir / METADATA_FILE} records no ClipCap checkpoint to compare {path} with")
    return warnings


def load_decoder(student: Student, clipcap_path: Optional[Path], tokenizer_dir: Optional[Path]
                 ) -> tuple[ClipCaptionModel, Any]:
    """ClipCap (for its GPT-2) and the tokenizer, both from local files, checked against the student."""
    if clipcap_path is None:
        recorded = student.teacher.get("clipcap_checkpoint") or "an unrecorded one"
        raise PcdError("--clipcap is required: the ClipCap checkpoint whose GPT-2 decodes the prefix "
                       f"(the student was distilled from {recorded})")
    if tokenizer_dir is None:
        raise PcdError("--tokenizer is required: a local GPT-2 tokenizer folder (vocab.json, merges.txt)")
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    clipcap = load_clipcap(Path(clipcap_path))
    for line in check_clipcap(student, clipcap, Path(clipcap_path)):
        console.print(f"[yellow]warning: {line}[/yellow]")
    vocab = clipcap.shape.gpt_vocab
    if len(tokenizer) > vocab:
        raise PcdError(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens, the GPT-2 of {clipcap_path} "
                       f"only {vocab}")
    return clipcap, tokenizer


def run(cfg: Config) -> int:
    if not cfg.clouds:
        raise PcdError("name at least one cloud to caption")
    student = load_student(cfg.weights)
    clipcap, tokenizer = load_decoder(student, cfg.clipcap, cfg.tokenizer)
    num_points = cfg.num_points or student.num_points
    clouds = [read_cloud(spec, cfg.up_axis) for spec in cfg.clouds]  # every input checked before any work
    device = evaluation_device(cfg.device)
    clipcap.to(device)
    records = []
    for cloud in clouds:
        prefix = student.prefixes(student_input(cloud, student, num_points, cfg.seed)[None], device)
        caption = decode_captions(clipcap, prefix, tokenizer, cfg.beam)[0]
        records.append({"cloud": cloud.name, "caption": caption, "origin": cloud.origin, "points": len(cloud.xyz),
                        "decoding": f"beam{cfg.beam}" if cfg.beam > 1 else "greedy"})
        if cloud.origin != "frame":
            console.print(f"[yellow]note: {cloud.name} is {NOT_A_FRAME[cloud.origin]}, not a single camera frame "
                          "like those the student was pre-trained on: expect a looser description[/yellow]")
    table = Table(title=f"captions by {student.export_dir} ({records[0]['decoding']}, {num_points} points)")
    table.add_column("cloud", overflow="fold")
    table.add_column("caption", overflow="fold")
    for record in records:
        table.add_row(record["cloud"], record["caption"])
    Console(soft_wrap=True).print(table)
    if cfg.out is not None:
        atomic_write_bytes(Path(cfg.out), "".join(json.dumps(r) + "\n" for r in records).encode())
        console.print(f"wrote {cfg.out}")
    return 0
