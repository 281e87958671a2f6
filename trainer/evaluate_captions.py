"""`pcd evaluate captions RUN_OR_EXPORT --shards SHARDS`: how well the student's prefix stands in for the teacher's.

On held-out frames (scenes the export was not pre-trained on), each frame's image goes through the teacher exactly
as `pcd cache-teacher` runs it (JPEG decode, CLIP's evaluation crop, CLIP, ClipCap's mapper) and its point cloud
through the student exactly as `pcd caption` feeds it. Reported:
- prefix agreement: mean squared error over all prefix entries, and the mean over frames of the cosine similarity of
  the flattened student and teacher prefixes;
- caption agreement: BLEU-4 and CIDEr (pycocoevalcap's `Bleu(4)` and `Cider`, i.e. CIDEr-D, their own Python code)
  of the student's captions against the teacher's caption of the same frame as the only reference. coco-caption
  tokenises with Stanford's Java PTB tokenizer; pcd uses `ptb_tokens`, a Python approximation (lower case,
  punctuation removed, contractions split), so nothing needs Java; said so in the results;
- CLIPScore (Hessel et al. 2021): 2.5 * max(cos(CLIP image, CLIP text of "A photo depicts " + caption), 0) with the
  teacher's own CLIP, for the teacher's and the student's captions. The random tiny CLIP has no CLIP BPE vocabulary,
  so with it CLIPScore is not computed, and the results say why.
The shards must hold the frames' images: `pcd extract-scannet` shards, or `pcd cache-teacher --keep-images` ones.
Writes EXPORT/captions.json (or --out) and a picture of examples (image, teacher caption, student caption).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from pcd.pipeline.atomic import atomic_write_json
from pcd.pipeline.clipcap import decode_captions, load_tokenizer
from pcd.pipeline.config import non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.frame_decode import decode_and_crop
from pcd.pipeline.schema import decode_member, iter_shard, read_manifest
from pcd.pipeline.splits import read_split
from pcd.pipeline.teacher import DEFAULT_CLIP_MODEL, Teacher, load_teacher
from pcd.pipeline.torchvision_compat import import_open_clip
from pcd.trainer.caption import Student, check_clipcap, load_student, student_input
from pcd.trainer.clouds import Cloud
from pcd.trainer.evaluation import evaluation_device
from pcd.trainer.initialization import warn_overlap
from pcd.trainer.normalize import camera_to_gravity
from pcd.trainer.render import caption_band, contact_sheet, write_png

console = Console(stderr=True, soft_wrap=True)
CLIPSCORE_WEIGHT = 2.5
CLIPSCORE_PROMPT = "A photo depicts "
RESULTS_FILE = "captions.json"
# Tokens coco-caption's PTBTokenizer drops after tokenising (pycocoevalcap/tokenizer/ptbtokenizer.py).
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";"}
TOKENIZATION = ("pcd.trainer.evaluate_captions.ptb_tokens: a Python approximation of coco-caption's Java PTB "
                "tokenizer (lower case, punctuation removed, contractions split); no Java")


@dataclass
class Config:
    weights: Path = Path("runs/pretrain")  # a pretrain run (its export/) or an export folder
    shards_dir: Path = Path("extracted")  # shards with images: extraction shards, or training shards --keep-images
    clip: Optional[Path] = None  # the teacher's CLIP file (ViT-B-32.pt)
    clipcap: Optional[Path] = None  # the teacher's ClipCap file
    tokenizer: Optional[Path] = None  # local GPT-2 tokenizer folder
    teacher: str = "clipcap"  # or "tiny-random": the tests' and demo's random teacher
    clip_model: str = DEFAULT_CLIP_MODEL
    split: Optional[Path] = None  # frames of these scenes (default: the shards' scenes the export did not see)
    max_frames: int = setting(200, positive)  # the first frames (shard order) of the chosen scenes
    batch_size: int = setting(16, positive)
    beam: int = setting(0, non_negative)  # 0 greedy, N > 1 beam search (both sides decode the same way)
    num_points: Optional[int] = setting(None, positive)  # student input points (default: pre-training's)
    seed: int = 0
    examples: int = setting(8, non_negative)  # frames shown in the examples picture and table
    out: Optional[Path] = None  # results JSON (default: EXPORT/captions.json)
    device: Optional[str] = None


def ptb_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of a caption, punctuation removed, contractions split (PTB style)."""
    text = text.lower()
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('s|'re|'ll|'ve|'d|'m)\b", r"\1 \2", text)
    text = re.sub(r"(?<![\w])-|-(?![\w])|[^\w\s'-]", lambda m: f" {m.group(0)} ", text)
    return [token for token in text.split() if token not in PUNCTUATIONS]


def caption_scores(references: dict[str, str], candidates: dict[str, str]) -> dict[str, float]:
    """BLEU-4 and CIDEr(-D) with pycocoevalcap's scorers, each candidate against its one reference."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {key: [" ".join(ptb_tokens(text))] for key, text in references.items()}
    res = {key: [" ".join(ptb_tokens(candidates[key]))] for key in references}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIPScore: 2.5 * max(cosine, 0) (Hessel et al. 2021, w = 2.5)."""
    cosine = torch.nn.functional.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return CLIPSCORE_WEIGHT * cosine.clamp_min(0)


def clip_text_embeddings(clip: torch.nn.Module, captions: list[str], device: torch.device) -> Optional[torch.Tensor]:
    """CLIP text embeddings of "A photo depicts <caption>", or None when the model's text tower does not use CLIP's
    BPE vocabulary (the random tiny CLIP)."""
    open_clip = import_open_clip()
    tokens = open_clip.tokenize([CLIPSCORE_PROMPT + c for c in captions],
                                context_length=int(getattr(clip, "context_length", 77)))
    if int(tokens.max()) >= clip.token_embedding.num_embeddings:
        return None
    with torch.no_grad():
        return clip.encode_text(tokens.to(device)).float()


@dataclass
class Frame:
    key: str
    crop: np.ndarray
    cloud: Cloud


def held_out_frames(cfg: Config, student: Student, image_size: int) -> tuple[list[Frame], list[str]]:
    """The first `max_frames` frames (shard order) of the evaluated scenes, with their CLIP crops and clouds."""
    manifest = read_manifest(cfg.shards_dir)
    pretrained = set(student.metadata.get("pretrain_scenes") or [])
    if cfg.split is not None:
        scenes = read_split(cfg.split)
        warn_overlap(sorted(pretrained), scenes, "evaluated")
    else:
        scenes = sorted(set(manifest.scenes) - pretrained)
        if not scenes:
            raise PcdError(f"{cfg.shards_dir}: every scene of these shards was seen in pre-training; give held-out "
                           "shards or --split")
    output = (manifest.options or {}).get("output") or {}
    if manifest.kind == "training" and not output.get("keep_images"):
        raise PcdError(f"{cfg.shards_dir}: training shards without images (made without --keep-images); use the "
                       "extraction shards or cache the teacher again with --keep-images")
    wanted = set(scenes)
    frames: list[Frame] = []
    for entry in manifest.shards:
        if entry.get("scene") not in wanted or len(frames) >= cfg.max_frames:
            continue
        path = Path(cfg.shards_dir) / Path(entry["name"]).name
        for raw in iter_shard(path):
            if len(frames) >= cfg.max_frames:
                break
            if "jpg" not in raw:
                raise PcdError(f"{path}: sample {raw['__key__']} has no image (jpg); the shards must hold images")
            points, pose = decode_member("points.npy", raw["points.npy"]), decode_member("pose.npy", raw["pose.npy"])
            crop = decode_and_crop((raw["jpg"], image_size))
            if crop is None:
                raise PcdError(f"{path}: {raw['__key__']}.jpg is not a decodable JPEG (corrupt or truncated)")
            cloud = Cloud(raw["__key__"], camera_to_gravity(points.astype(np.float32), pose.astype(np.float32)),
                          None, "frame")
            frames.append(Frame(raw["__key__"], crop, cloud))
    if not frames:
        raise PcdError(f"{cfg.shards_dir}: no frame of the {len(scenes)} evaluated scene(s) in these shards")
    return frames, scenes


def enlarged(image: np.ndarray, width: int = 320) -> np.ndarray:
    """An image scaled (nearest neighbour) to `width` pixels, so that a caption band above it is readable."""
    import cv2

    scale = width / image.shape[1]
    return cv2.resize(image, (width, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_NEAREST)


def run(cfg: Config) -> int:
    student = load_student(cfg.weights)
    if cfg.tokenizer is None:
        raise PcdError("--tokenizer is required: a local GPT-2 tokenizer folder (vocab.json, merges.txt)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    teacher: Teacher = load_teacher(cfg.teacher, cfg.clip, cfg.clipcap, cfg.clip_model,
                                    vocab_size=len(tokenizer) if cfg.teacher == "tiny-random" else None)
    if teacher.identity["random"]:
        console.print(Panel("[bold red]RANDOM TEACHER[/]: the tiny random teacher's captions and CLIP mean nothing; "
                            "these numbers test the plumbing only."))
    for line in check_clipcap(student, teacher.clipcap, cfg.clipcap, teacher.identity):
        console.print(f"[yellow]warning: {line}[/yellow]")
    device = evaluation_device(cfg.device)
    teacher.to(device)  # in cache-teacher's precision: fp16 autocast for CLIP on a GPU, float32 on the CPU
    num_points = cfg.num_points or student.num_points
    frames, scenes = held_out_frames(cfg, student, teacher.image_size)
    console.print(f"evaluating captions on {len(frames)} frames of {len(scenes)} held-out scene(s) of {cfg.shards_dir}")
    teacher_prefix, student_prefix, image_embeddings = [], [], []
    teacher_captions, student_captions = [], []
    for start in range(0, len(frames), cfg.batch_size):
        batch = frames[start:start + cfg.batch_size]
        out = teacher.embed(np.stack([f.crop for f in batch]))
        inputs = np.stack([student_input(f.cloud, student, num_points, cfg.seed) for f in batch])
        predicted = student.prefixes(inputs, device)
        target = torch.from_numpy(out.prefix).to(device)
        teacher_captions += decode_captions(teacher.clipcap, target, tokenizer, cfg.beam)
        student_captions += decode_captions(teacher.clipcap, predicted, tokenizer, cfg.beam)
        teacher_prefix.append(target.cpu())
        student_prefix.append(predicted.cpu())
        image_embeddings.append(torch.from_numpy(out.clip))
    target, predicted = torch.cat(teacher_prefix), torch.cat(student_prefix)
    cosine = torch.nn.functional.cosine_similarity(predicted.flatten(1), target.flatten(1), dim=-1)
    keys = [f.key for f in frames]
    metrics: dict[str, Any] = {
        "prefix_mse": float(torch.mean((predicted - target) ** 2)), "prefix_cosine": float(cosine.mean()),
        **caption_scores(dict(zip(keys, teacher_captions)), dict(zip(keys, student_captions)))}
    images = torch.cat(image_embeddings)
    scores: dict[str, Optional[list[float]]] = {}
    for who, captions in (("teacher", teacher_captions), ("student", student_captions)):
        text = clip_text_embeddings(teacher.clip, captions, device)
        scores[who] = None if text is None else clip_score(images.to(device), text).cpu().tolist()
        metrics[f"clipscore_{who}"] = None if text is None else float(np.mean(scores[who]))
    clipscore_note = ("2.5 * max(cos(image, text), 0), text = 'A photo depicts ' + caption, the teacher's CLIP"
                      if scores["teacher"] is not None else
                      "not computed: the teacher's CLIP text tower does not use CLIP's BPE vocabulary "
                      "(random tiny CLIP)")
    document = {
        "weights": str(student.export_dir), "shards": str(cfg.shards_dir), "scenes": scenes, "frames": len(frames),
        "teacher": {k: teacher.identity.get(k) for k in ("name", "random", "clip_model", "clip_sha256",
                                                         "clipcap_sha256")},
        "decoding": f"beam{cfg.beam}" if cfg.beam > 1 else "greedy", "num_points": num_points, "seed": cfg.seed,
        "metrics": metrics,
        "definitions": {"prefix_mse": "mean over all prefix entries of (student - teacher)^2",
                        "prefix_cosine": "mean over frames of the cosine of the flattened prefixes",
                        "bleu4": "pycocoevalcap Bleu(4), corpus level, the teacher's caption as the one reference",
                        "cider": "pycocoevalcap Cider (CIDEr-D), the teacher's caption as the one reference",
                        "tokenization": TOKENIZATION, "clipscore": clipscore_note},
        "examples": [{"frame": k, "teacher": t, "student": s,
                      "clipscore_teacher": scores["teacher"][i] if scores["teacher"] else None,
                      "clipscore_student": scores["student"][i] if scores["student"] else None}
                     for i, (k, t, s) in enumerate(zip(keys, teacher_captions, student_captions))],
    }
    out = Path(cfg.out) if cfg.out else student.export_dir / RESULTS_FILE
    atomic_write_json(out, document)
    shown = min(cfg.examples, len(frames))
    if shown:
        panels = [caption_band(caption_band(enlarged(f.crop), f"student: {s}"), f"teacher: {t}")
                  for f, t, s in zip(frames[:shown], teacher_captions, student_captions)]
        write_png(out.with_name(out.stem + "_examples.png"), contact_sheet(panels, 4))
    table = Table(title=f"captions of {len(frames)} held-out frames ({document['decoding']})")
    for column in ("frame", "teacher caption", "student caption"):
        table.add_column(column, overflow="fold")
    for example in document["examples"][:cfg.examples]:
        table.add_row(example["frame"], example["teacher"], example["student"])
    Console(soft_wrap=True).print(table)
    console.print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
                  + ("" if scores["teacher"] is not None else f"; CLIPScore {clipscore_note}"))
    console.print(f"wrote {out}")
    return 0
