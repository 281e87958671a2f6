"""`pcd prepare scannet-detection`: raw ScanNet scans -> the per-scene files VoteNet and 3DETR read.

Same output as VoteNet's `load_scannet_data.export` + `batch_load_scannet_data.export_one_scan` on every scene
VoteNet can process: vertices of `_vh_clean_2.ply` multiplied by the scene's `axisAlignment`; nyu40 label and
instance id (objectId + 1) per vertex by VoteNet's exact rules (`label_vertices`, also for shared segments and
repeated objectIds); one axis-aligned box per instance of the 18 classes from the min/max of its aligned vertices
(computed on all vertices, in float32); at most 50,000 vertices kept by a random subsample (seeded per scene here,
the seeds recorded in prepare.json, so reruns give the same files). Where VoteNet drops a scene, pcd skips the bad
object or segment with a warning; a scene that cannot be prepared is reported on one line and the others go on.
Scenes whose four files already exist are skipped; each file is written under a temporary name and renamed.
docs/detection.md lists every rule with the upstream line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from rich.console import Console
from rich.progress import Progress

from pcd.pipeline.atomic import atomic_write_bytes, atomic_write_json
from pcd.pipeline.config import config_to_dict, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.splits import read_split
from pcd.trainer.detection.boxes import OBJ_CLASS_IDS

LABEL_MAP_NAME = "scannetv2-labels.combined.tsv"
OUTPUT_SUFFIXES = ("_vert.npy", "_sem_label.npy", "_ins_label.npy", "_bbox.npy")


@dataclass
class Config:
    scans_dir: Path = Path("scans")
    out_dir: Path = Path("scannet_detection_data")
    label_map: Optional[Path] = None          # default: scannetv2-labels.combined.tsv in SCANS_DIR or its parent
    splits: Optional[list[Path]] = None       # default: every scene folder in SCANS_DIR
    workers: int = setting(1, positive)
    max_points: int = setting(50000, positive)
    seed: int = setting(0, non_negative)


def read_label_map(path: Path) -> dict[str, int]:
    """raw_category -> nyu40id from ScanNet's label-map TSV (rows without an integer nyu40id are skipped)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as exc:
        raise PcdError(f"{path}: cannot read the label map ({exc.strerror})") from None
    if not rows or "raw_category" not in rows[0] or "nyu40id" not in rows[0]:
        raise PcdError(f"{path}: not a ScanNet label map (needs columns raw_category and nyu40id)")
    mapping = {}
    for row in rows:
        value = (row.get("nyu40id") or "").strip()
        if value.lstrip("-").isdigit():
            mapping[row["raw_category"]] = int(value)
    return mapping


def read_axis_alignment(path: Path, scene: str) -> np.ndarray | None:
    """The 4x4 `axisAlignment` of `<scene>.txt`, or None when the file has none (ScanNet test scans)."""
    for line in path.read_text().splitlines():
        if line.strip().startswith("axisAlignment"):
            values = line.split("=", 1)[1].split()
            if len(values) != 16:
                raise PcdError(f"{path}: axisAlignment of scene {scene} has {len(values)} numbers, expected 16")
            return np.array([float(v) for v in values]).reshape(4, 4)
    return None


def read_mesh_vertices_rgb(path: Path, scene: str) -> np.ndarray:
    """(N,6) float32 xyz + RGB of a ScanNet mesh."""
    from plyfile import PlyData

    try:
        vertex = PlyData.read(str(path))["vertex"]
        return np.stack([vertex[k] for k in ("x", "y", "z", "red", "green", "blue")], axis=1).astype(np.float32)
    except (KeyError, ValueError, IndexError) as exc:
        raise PcdError(f"{path}: scene {scene} mesh lacks x,y,z,red,green,blue vertices ({exc})") from None


def read_segments(path: Path, scene: str) -> np.ndarray:
    try:
        return np.asarray(json.loads(path.read_text())["segIndices"], dtype=np.int64)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PcdError(f"{path}: scene {scene} segmentation is not valid ScanNet segs JSON ({exc})") from None


def read_aggregation(path: Path, scene: str) -> list[tuple[int, str, list[int]]]:
    """[(instance id = objectId + 1, raw label, segment ids)] in file order."""
    try:
        groups = json.loads(path.read_text())["segGroups"]
        return [(int(g["objectId"]) + 1, str(g["label"]), [int(s) for s in g["segments"]]) for g in groups]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise PcdError(f"{path}: scene {scene} aggregation is not valid ScanNet JSON ({exc})") from None


def scene_files(scans_dir: Path, scene: str) -> dict[str, Path]:
    folder = scans_dir / scene
    files = {"mesh": folder / f"{scene}_vh_clean_2.ply", "agg": folder / f"{scene}.aggregation.json",
             "segs": folder / f"{scene}_vh_clean_2.0.010000.segs.json", "meta": folder / f"{scene}.txt"}
    for path in files.values():
        if not path.is_file():
            raise PcdError(f"scene {scene}: missing {path}")
    return files


@dataclass
class SceneLabels:
    """Per-vertex labels and per-object facts of one scene, as VoteNet's `export` derives them."""

    sem: np.ndarray                   # (N,) uint32 nyu40 id, 0 = unannotated
    ins: np.ndarray                   # (N,) uint32 objectId + 1, 0 = unannotated
    object_label: dict[int, int]      # instance id -> nyu40 id of its box
    warnings: list[str]               # what was skipped where VoteNet would have dropped the scene


def label_vertices(groups: list[tuple[int, str, list[int]]], segments: np.ndarray, label_map: dict[str, int],
                   scene: str, agg_path: Path) -> SceneLabels:
    """Semantic and instance id per vertex with VoteNet's exact rules (`load_scannet_data.read_aggregation`
    and `export`), including its edge cases:

    - semantic labels are written label by label, in the order labels first appear, each over the segments of
      every listing of that label, so a segment shared by two labels ends with the later label;
    - an objectId listed twice keeps its last listing's segments for the instance ids; the first listing of
      each label also owns the segments of that label's later listings (VoteNet extends that list in place);
      instance ids are written object by object in order of first appearance, a later object winning;
    - an object's box label is the semantic label of the first vertex of its first segment.
    Where VoteNet crashes (and its batch script drops the scene), the bad part is skipped with a warning: a
    segment id absent from `segIndices`, an object left with no segment, a negative objectId.
    """
    warnings: list[str] = []
    known = set(np.unique(segments).tolist())
    for _, label, _ in groups:
        if label not in label_map:
            raise PcdError(f"{agg_path}: scene {scene} category '{label}' is not in the label map")
    listings = []
    for object_id, label, segs in groups:
        if object_id < 1:
            warnings.append(f"scene {scene}: object {object_id - 1} ('{label}') has a negative objectId; skipped")
            continue
        absent = [seg for seg in segs if seg not in known]
        if absent:
            warnings.append(f"scene {scene}: object {object_id - 1} ('{label}'): segment(s) "
                            f"{', '.join(map(str, absent[:5]))} not in the segmentation; skipped")
        listings.append((object_id, label, [seg for seg in segs if seg in known]))

    label_segments: dict[str, list[int]] = {}   # first-appearance order
    first_listing: dict[str, int] = {}
    last_listing: dict[int, int] = {}           # object id (first-appearance order) -> its last listing
    for index, (object_id, label, segs) in enumerate(listings):
        if label not in label_segments:
            label_segments[label], first_listing[label] = [], index
        label_segments[label].extend(segs)
        last_listing[object_id] = index
    sem = np.zeros(len(segments), np.uint32)
    for label, segs in label_segments.items():
        sem[np.isin(segments, segs)] = label_map[label]

    ins = np.zeros(len(segments), np.uint32)
    object_label: dict[int, int] = {}
    for object_id, index in last_listing.items():
        _, label, segs = listings[index]
        if first_listing[label] == index:
            segs = label_segments[label]
        if not segs:
            warnings.append(f"scene {scene}: object {object_id - 1} ('{label}') has no segments; skipped")
            continue
        ins[np.isin(segments, segs)] = object_id
        object_label[object_id] = int(sem[np.flatnonzero(segments == segs[0])[0]])
    ids = sorted(last_listing)
    if ids != list(range(1, len(ids) + 1)):
        warnings.append(f"scene {scene}: objectIds are not 0..{len(ids) - 1} (VoteNet drops such a scene); "
                        f"every object is kept")
    return SceneLabels(sem, ins, object_label, warnings)


def instance_boxes(vertices: np.ndarray, labels: SceneLabels) -> np.ndarray:
    """(K,7) cx,cy,cz,dx,dy,dz,nyu40id per instance of the 18 classes with vertices, in objectId order; centre
    and size computed in float32 from the float32 vertices, as VoteNet does, then stored as float64."""
    boxes = []
    for object_id in sorted(labels.object_label):
        points = vertices[labels.ins == object_id, :3]
        if len(points) == 0 or labels.object_label[object_id] not in OBJ_CLASS_IDS:
            continue
        lo, hi = points.min(0), points.max(0)
        boxes.append(np.concatenate([(lo + hi) / 2, hi - lo]).tolist() + [labels.object_label[object_id]])
    return np.array(boxes, np.float64).reshape(-1, 7)


def subsample_seed(seed: int, scene: str) -> list[int]:
    """The seed of a scene's vertex subsample (VoteNet's is unseeded): recorded in prepare.json."""
    return [seed, zlib.crc32(scene.encode())]


def export_scene(scans_dir: Path, scene: str, label_map: dict[str, int], max_points: int,
                 seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """The four arrays of one scene, exactly as VoteNet's preprocessing computes them, and its warnings."""
    files = scene_files(scans_dir, scene)
    vertices = read_mesh_vertices_rgb(files["mesh"], scene)
    align = read_axis_alignment(files["meta"], scene)
    if align is not None:
        homogeneous = np.concatenate([vertices[:, :3].astype(np.float64), np.ones((len(vertices), 1))], axis=1)
        vertices[:, :3] = (homogeneous @ align.T)[:, :3]
    segments = read_segments(files["segs"], scene)
    if len(segments) != len(vertices):
        raise PcdError(f"{files['segs']}: scene {scene} has {len(segments)} segment indices "
                       f"but its mesh has {len(vertices)} vertices")
    labels = label_vertices(read_aggregation(files["agg"], scene), segments, label_map, scene, files["agg"])
    bbox = instance_boxes(vertices, labels)
    sem, ins = labels.sem, labels.ins
    if len(vertices) > max_points:
        rng = np.random.default_rng(subsample_seed(seed, scene))
        choice = rng.choice(len(vertices), max_points, replace=False)
        vertices, sem, ins = vertices[choice], sem[choice], ins[choice]
    arrays = {"_vert.npy": vertices, "_sem_label.npy": sem, "_ins_label.npy": ins, "_bbox.npy": bbox}
    return arrays, labels.warnings


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def is_prepared(out_dir: Path, scene: str) -> bool:
    return all((out_dir / f"{scene}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES)


@dataclass
class SceneResult:
    scene: str
    num_boxes: int = 0
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None


def prepare_scene(scans_dir: Path, out_dir: Path, scene: str, label_map: dict[str, int], max_points: int,
                  seed: int) -> SceneResult:
    """Write one scene's files (the box file last); a bad scene is reported, not raised, so others go on."""
    try:
        arrays, warnings = export_scene(scans_dir, scene, label_map, max_points, seed)
    except PcdError as exc:
        return SceneResult(scene, error=str(exc))
    for suffix in OUTPUT_SUFFIXES:
        atomic_write_bytes(out_dir / f"{scene}{suffix}", npy_bytes(arrays[suffix]))
    return SceneResult(scene, len(arrays["_bbox.npy"]), warnings)


def previous_warnings(out_dir: Path) -> dict[str, list[str]]:
    """Warnings recorded by an earlier run (its scenes are not prepared again)."""
    try:
        warnings = json.loads((out_dir / "prepare.json").read_text()).get("warnings", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return warnings if isinstance(warnings, dict) else {}


def resolve_label_map(cfg: Config) -> Path:
    if cfg.label_map is not None:
        return cfg.label_map
    for folder in (cfg.scans_dir, cfg.scans_dir.parent):
        if (folder / LABEL_MAP_NAME).is_file():
            return folder / LABEL_MAP_NAME
    raise PcdError(f"{cfg.scans_dir}: no {LABEL_MAP_NAME} here or in the parent folder; pass --label-map")


def list_scenes(cfg: Config) -> list[str]:
    if cfg.splits:
        scenes = list(dict.fromkeys(s for split in cfg.splits for s in read_split(split)))
        missing = [s for s in scenes if not (cfg.scans_dir / s).is_dir()]
        if missing:
            raise PcdError(f"{cfg.scans_dir}: {len(missing)} scene(s) named in the split file(s) are absent, "
                           f"first {missing[0]}")
        return scenes
    if not cfg.scans_dir.is_dir():
        raise PcdError(f"{cfg.scans_dir}: not a folder")
    scenes = sorted(p.name for p in cfg.scans_dir.iterdir() if (p / f"{p.name}_vh_clean_2.ply").is_file())
    if not scenes:
        raise PcdError(f"{cfg.scans_dir}: no <scene>/<scene>_vh_clean_2.ply found")
    return scenes


def run(cfg: Config) -> int:
    """Prepare the scenes; 0 if all are done, 1 if any failed (each failure printed on one line)."""
    console, errors = Console(), Console(stderr=True)
    label_map = read_label_map(resolve_label_map(cfg))
    scenes = list_scenes(cfg)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for split in cfg.splits or []:
        if not (cfg.out_dir / split.name).exists() or (cfg.out_dir / split.name).read_text() != split.read_text():
            atomic_write_bytes(cfg.out_dir / split.name, split.read_bytes())
    todo = [s for s in scenes if not is_prepared(cfg.out_dir, s)]
    console.print(f"prepare: {len(scenes)} scenes, {len(scenes) - len(todo)} already done, writing {len(todo)} "
                  f"to {cfg.out_dir}")
    warnings = {scene: lines for scene, lines in previous_warnings(cfg.out_dir).items() if scene not in todo}
    failed: dict[str, str] = {}
    num_boxes = 0
    with Progress(console=errors, transient=True) as progress:
        task = progress.add_task("scenes", total=len(todo))
        args = [(cfg.scans_dir, cfg.out_dir, s, label_map, cfg.max_points, cfg.seed) for s in todo]
        with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 and len(todo) > 1 else contextlib.nullcontext() \
                as pool:
            results = pool.map(prepare_scene, *zip(*args)) if pool else (prepare_scene(*a) for a in args)
            for result in results:
                progress.advance(task)
                for line in result.warnings:
                    progress.console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
                if result.warnings:
                    warnings[result.scene] = result.warnings
                if result.error is not None:
                    failed[result.scene] = result.error
                    progress.console.print(f"error: {result.error}", markup=False, highlight=False, soft_wrap=True)
                num_boxes += result.num_boxes
    atomic_write_json(cfg.out_dir / "prepare.json", {
        "config": config_to_dict(cfg), "scenes": [s for s in scenes if s not in failed],
        "subsample_seeds": {s: subsample_seed(cfg.seed, s) for s in scenes if s not in failed},
        "failed": failed, "warnings": warnings})
    console.print(f"prepare: wrote {len(todo) - len(failed)} scenes ({num_boxes} boxes of the 18 classes) to "
                  f"{cfg.out_dir}, {len(failed)} failed", markup=False, highlight=False, soft_wrap=True)
    if failed:
        console.print(f"failed scenes (rerun the same command after fixing them): {', '.join(failed)}",
                      markup=False, highlight=False, soft_wrap=True)
    return 1 if failed else 0
