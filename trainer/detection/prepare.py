"""`pcd prepare scannet-detection`: raw ScanNet scans -> the per-scene files VoteNet and 3DETR read.

Same semantics as VoteNet's `load_scannet_data.export` + `batch_load_scannet_data.export_one_scan`:
vertices of `_vh_clean_2.ply` multiplied by the scene's `axisAlignment`; nyu40 label per vertex from the
aggregation's segment groups (raw category -> nyu40id through the label-map TSV); instance id = objectId + 1;
one axis-aligned box per instance from the min/max of its aligned vertices (computed on all vertices), kept
for the 18 detection classes; at most 50,000 vertices kept by a random subsample (seeded per scene here, so
reruns give the same files). Scenes whose four files already exist are skipped; each file is written under a
temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


def export_scene(scans_dir: Path, scene: str, label_map: dict[str, int], max_points: int,
                 seed: int) -> dict[str, np.ndarray]:
    """The four arrays of one scene, exactly as VoteNet's preprocessing computes them."""
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
    seg_to_verts: dict[int, list[int]] = {}
    for vert, seg in enumerate(segments.tolist()):
        seg_to_verts.setdefault(seg, []).append(vert)
    empty: list[int] = []

    sem = np.zeros(len(vertices), np.uint32)
    ins = np.zeros(len(vertices), np.uint32)
    groups = read_aggregation(files["agg"], scene)
    for _, label, segs in groups:
        if label not in label_map:
            raise PcdError(f"{files['agg']}: scene {scene} label '{label}' is not in the label map")
        for seg in segs:
            sem[seg_to_verts.get(seg, empty)] = label_map[label]
    object_label: dict[int, int] = {}
    for object_id, _, segs in groups:
        for seg in segs:
            verts = seg_to_verts.get(seg, empty)
            ins[verts] = object_id
            if object_id not in object_label and verts:
                object_label[object_id] = int(sem[verts[0]])

    boxes = []
    for object_id, _, _ in groups:
        points = vertices[ins == object_id, :3]
        if len(points) == 0 or object_label.get(object_id) not in OBJ_CLASS_IDS:
            continue
        lo, hi = points.min(0).astype(np.float64), points.max(0).astype(np.float64)
        boxes.append(np.concatenate([(lo + hi) / 2, hi - lo, [object_label[object_id]]]))
    bbox = np.array(boxes, np.float64).reshape(-1, 7)

    if len(vertices) > max_points:
        rng = np.random.default_rng([seed, zlib.crc32(scene.encode())])
        choice = rng.choice(len(vertices), max_points, replace=False)
        vertices, sem, ins = vertices[choice], sem[choice], ins[choice]
    return {"_vert.npy": vertices, "_sem_label.npy": sem, "_ins_label.npy": ins, "_bbox.npy": bbox}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def is_prepared(out_dir: Path, scene: str) -> bool:
    return all((out_dir / f"{scene}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES)


def prepare_scene(scans_dir: Path, out_dir: Path, scene: str, label_map: dict[str, int], max_points: int,
                  seed: int) -> int:
    """Write one scene's files (the box file last); returns its number of boxes."""
    arrays = export_scene(scans_dir, scene, label_map, max_points, seed)
    for suffix in OUTPUT_SUFFIXES:
        atomic_write_bytes(out_dir / f"{scene}{suffix}", npy_bytes(arrays[suffix]))
    return len(arrays["_bbox.npy"])


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
    console = Console()
    label_map = read_label_map(resolve_label_map(cfg))
    scenes = list_scenes(cfg)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for split in cfg.splits or []:
        if not (cfg.out_dir / split.name).exists() or (cfg.out_dir / split.name).read_text() != split.read_text():
            atomic_write_bytes(cfg.out_dir / split.name, split.read_bytes())
    todo = [s for s in scenes if not is_prepared(cfg.out_dir, s)]
    console.print(f"prepare: {len(scenes)} scenes, {len(scenes) - len(todo)} already done, writing {len(todo)} "
                  f"to {cfg.out_dir}")
    num_boxes = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scenes", total=len(todo))
        args = [(cfg.scans_dir, cfg.out_dir, s, label_map, cfg.max_points, cfg.seed) for s in todo]
        if cfg.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(cfg.workers) as pool:
                for n in pool.map(prepare_scene, *zip(*args)):
                    num_boxes += n
                    progress.advance(task)
        else:
            for a in args:
                num_boxes += prepare_scene(*a)
                progress.advance(task)
    atomic_write_json(cfg.out_dir / "prepare.json", {"config": config_to_dict(cfg), "scenes": scenes})
    console.print(f"prepare: wrote {len(todo)} scenes ({num_boxes} boxes of the 18 classes) to {cfg.out_dir}")
    return 0
