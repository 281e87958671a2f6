"""`pcd generate-shapes`: object datasets generated from a seed, in exactly the layouts of the real releases.

The classification and part-segmentation fine-tunes read ModelNet40, ScanObjectNN and ShapeNetPart as they are
distributed; this command writes small stand-ins with the same file names, formats and frames (y up), so every
reader, test and the demo run on them unchanged:

    <out>/modelnet40_normal_resampled/      modelnet40_shape_names.txt, modelnet40_{train,test}.txt,
                                            <class>/<class>_XXXX.txt  (x,y,z,nx,ny,nz per line)
    <out>/modelnet40_ply_hdf5_2048/         ply_data_{train,test}{i}.h5 (data, label, normal),
                                            ply_data_{train,test}_{i}_id2file.json, {train,test}_files.txt,
                                            shape_names.txt
    <out>/ScanObjectNN/main_split/          {training,test}_objectdataset.h5 (OBJ_BG) and
                                            {training,test}_objectdataset_augmentedrot_scale75.h5 (PB_T50_RS)
    <out>/ScanObjectNN/main_split_nobg/     {training,test}_objectdataset.h5 (OBJ_ONLY)
    <out>/shapenetcore_partanno_segmentation_benchmark_v0_normal/
                                            synsetoffset2category.txt, train_test_split/shuffled_*_file_list.json,
                                            <synset>/<id>.txt  (x y z nx ny nz part per line)
    <out>/generated-shapes.txt              marks the folder as generated

Every class is a distinct solid (a primitive and an aspect ratio of its own), so classes are learnable; every
ShapeNetPart part is a distinct primitive in a distinct place, so parts are learnable too, and some optional
parts are left out of some shapes (as chairs without arms), which exercises the "absent part has IoU 1" rule.
Only the first `*_classes`/`*_categories` classes get shapes; all 40/15/16 names are written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from rich.progress import Progress

from pcd.pipeline.atomic import atomic_write_bytes, temporary_path
from pcd.pipeline.errors import PcdError

MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup", "curtain",
    "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop", "mantel",
    "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa", "stairs", "stool",
    "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox")
SCANOBJECTNN_CLASSES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed",
                        "pillow", "sink", "sofa", "toilet")
# ShapeNetPart's 16 categories in the line order of synsetoffset2category.txt, with their part counts; part ids
# are numbered consecutively in this order (Airplane 0-3 ... Table 47-49), as Point-MAE's `seg_classes`.
SHAPENETPART_CATEGORIES = (
    ("Airplane", "02691156", 4), ("Bag", "02773838", 2), ("Cap", "02954340", 2), ("Car", "02958343", 4),
    ("Chair", "03001627", 4), ("Earphone", "03261776", 3), ("Guitar", "03467517", 3), ("Knife", "03624134", 2),
    ("Lamp", "03636649", 4), ("Laptop", "03642806", 2), ("Motorbike", "03790512", 6), ("Mug", "03797390", 2),
    ("Pistol", "03948459", 3), ("Rocket", "04099429", 3), ("Skateboard", "04225987", 3), ("Table", "04379243", 3))

MODELNET_TXT_DIR = "modelnet40_normal_resampled"
MODELNET_H5_DIR = "modelnet40_ply_hdf5_2048"
SCANOBJECTNN_DIR = "ScanObjectNN"
SHAPENETPART_DIR = "shapenetcore_partanno_segmentation_benchmark_v0_normal"
SCANOBJECTNN_FILES = {  # variant -> (folder, file stem after training_/test_)
    "OBJ_BG": ("main_split", "objectdataset"),
    "OBJ_ONLY": ("main_split_nobg", "objectdataset"),
    "PB_T50_RS": ("main_split", "objectdataset_augmentedrot_scale75"),
}
PRIMITIVES = ("ellipsoid", "box", "cylinder", "cone", "torus", "capsule", "dumbbell", "plate")


@dataclass
class Config:
    """`pcd generate-shapes`: the defaults are a small set a fine-tune can learn; see the `tiny` preset."""

    out_dir: Path = Path("generated-shapes")
    seed: int = 0
    modelnet_classes: int = 10  # classes that get shapes (of the 40 names)
    modelnet_train_per_class: int = 20
    modelnet_test_per_class: int = 5
    modelnet_points: int = 10000  # points per txt file, as the release
    h5_points: int = 2048  # points per shape in the HDF5 files (ModelNet h5 and ScanObjectNN), as the releases
    h5_shapes_per_file: int = 2048  # ModelNet h5 shard size, as the release
    scanobjectnn_classes: int = 15
    scanobjectnn_train_per_class: int = 10
    scanobjectnn_test_per_class: int = 3
    shapenetpart_categories: int = 16
    shapenetpart_train_per_category: int = 12
    shapenetpart_val_per_category: int = 2
    shapenetpart_test_per_category: int = 4
    shapenetpart_points: tuple[int, int] = (1500, 3000)  # points per shape are drawn in this range, as they vary


# ----------------------------------------------------------------------------------------------- geometry


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _sphere_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.normal(size=(n, 3)))


def sample_primitive(kind: str, size: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` points on the surface of a primitive centred at the origin, its axis along y, and their unit normals.

    `size` (3,) gives its half-extents along x, y, z (for round primitives x is the radius).
    """
    sx, sy, sz = (float(s) for s in size)
    if kind == "ellipsoid":
        d = _sphere_directions(n, rng)
        return d * size, _unit(d / size)
    if kind in ("box", "plate"):
        half = np.array([sx, sy * (0.15 if kind == "plate" else 1.0), sz])
        areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
        face = rng.choice(6, size=n, p=areas / areas.sum())
        axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
        points = rng.uniform(-1.0, 1.0, size=(n, 3)) * half
        points[np.arange(n), axis] = sign * half[axis]
        normals = np.zeros((n, 3))
        normals[np.arange(n), axis] = sign
        return points, normals
    if kind in ("cylinder", "cone", "capsule"):
        r, h = sx, sy
        side_area = 2 * np.pi * r * 2 * h if kind != "cone" else np.pi * r * np.hypot(r, 2 * h)
        cap_area = np.pi * r * r * (2 if kind == "cylinder" else 1)
        if kind == "capsule":
            cap_area = 4 * np.pi * r * r
        on_side = rng.random(n) < side_area / (side_area + cap_area)
        theta = rng.uniform(0, 2 * np.pi, n)
        ring = np.stack([np.cos(theta), np.zeros(n), np.sin(theta)], axis=1)
        t = rng.uniform(-1.0, 1.0, n)
        points = np.empty((n, 3))
        normals = np.empty((n, 3))
        if kind == "cone":  # apex up at y = +h, base disc at y = -h
            frac = np.sqrt(rng.random(n))  # area grows linearly towards the base
            radius = r * frac
            points[:] = ring * radius[:, None]
            points[:, 1] = h - 2 * h * frac
            normals[:] = _unit(ring * (2 * h) + np.array([0.0, r, 0.0]))
        else:
            points[:] = ring * r
            points[:, 1] = t * h
            normals[:] = ring
        caps = ~on_side
        k = int(caps.sum())
        if kind == "capsule":
            d = _sphere_directions(k, rng)
            points[caps] = d * r + np.where(d[:, 1:2] >= 0, 1.0, -1.0) * np.array([0.0, h, 0.0])
            normals[caps] = d
        else:
            disc = np.sqrt(rng.random(k))[:, None] * ring[caps] * r
            up = rng.random(k) < 0.5 if kind == "cylinder" else np.zeros(k, bool)
            disc[:, 1] = np.where(up, h, -h)
            points[caps] = disc
            normals[caps] = np.where(up[:, None], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0])
        return points, normals
    if kind == "torus":  # ring in the x-z plane
        big, small = sx, max(0.25 * sx, 0.5 * sy)
        u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
        centre = np.stack([np.cos(u), np.zeros(n), np.sin(u)], axis=1)
        normals = centre * np.cos(v)[:, None] + np.array([0.0, 1.0, 0.0]) * np.sin(v)[:, None]
        return centre * big + normals * small, normals
    if kind == "dumbbell":  # two spheres along x
        d = _sphere_directions(n, rng)
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        radius = 0.6 * min(sx, sy)
        return d * radius + side[:, None] * np.array([sx, 0.0, 0.0]), d
    raise ValueError(f"unknown primitive {kind!r}")


def _rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def class_shape(label: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shape of class `label`: primitive `label % 8` with the aspect ratio `label // 8`, jittered in size and
    turned a little about the up (y) axis. Points (n,3) and normals (n,3), float64, about unit size."""
    kind = PRIMITIVES[label % len(PRIMITIVES)]
    stretch = 1.0 + 0.45 * (label // len(PRIMITIVES))  # 1.0 .. 2.8: taller variants of the same primitive
    size = np.array([0.5, 0.5 * stretch, 0.4]) * rng.uniform(0.9, 1.1, 3)
    points, normals = sample_primitive(kind, size, n, rng)
    rotation = _rotation_y(rng.uniform(-0.3, 0.3))
    return points @ rotation.T, normals @ rotation.T


def part_layout(category: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The parts of a ShapeNetPart category: (primitive, half-extents, centre) each, in distinct places."""
    num_parts = SHAPENETPART_CATEGORIES[category][2]
    layout = []
    for j in range(num_parts):
        kind = PRIMITIVES[(category + 3 * j) % len(PRIMITIVES)]
        angle = 2 * np.pi * j / num_parts + 0.4 * category
        centre = np.array([0.6 * np.cos(angle), 0.5 * (j % 2) - 0.25, 0.6 * np.sin(angle)]) if j else np.zeros(3)
        size = np.array([0.35, 0.3, 0.3]) if j == 0 else np.array([0.18, 0.2, 0.18])
        layout.append((kind, size, centre))
    return layout


def part_shape(category: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shape of ShapeNetPart category `category`: points, normals and global part ids (as in the files).

    The first part is always there; each other part is left out with probability 0.2 (never all of them)."""
    layout = part_layout(category)
    first_id = sum(c[2] for c in SHAPENETPART_CATEGORIES[:category])
    present = [0] + [j for j in range(1, len(layout)) if rng.random() >= 0.2]
    if len(present) == 1 and len(layout) > 1:
        present.append(int(rng.integers(1, len(layout))))
    counts = np.bincount(rng.integers(0, len(present), n), minlength=len(present))
    points, normals, parts = [], [], []
    for j, count in zip(present, counts):
        kind, size, centre = layout[j]
        p, nrm = sample_primitive(kind, size * rng.uniform(0.9, 1.1, 3), int(count), rng)
        points.append(p + centre)
        normals.append(nrm)
        parts.append(np.full(int(count), first_id + j))
    return np.concatenate(points), np.concatenate(normals), np.concatenate(parts)


def scan_object(label: int, n: int, rng: np.random.Generator, *, background: bool,
                hardest: bool) -> tuple[np.ndarray, np.ndarray]:
    """A ScanObjectNN-like object of class `label` in metres (not normalised), y up, standing on a floor: points
    (n,3) and the mask (n,) of -1 for background and the object's instance id otherwise. `hardest` perturbs it
    as PB_T50_RS (translated by up to half its size, rotated about the up axis, scaled by 0.75-1.25)."""
    n_object = n if not background else int(n * rng.uniform(0.6, 0.8))
    obj, _ = class_shape(label, n_object, rng)
    obj = obj * 0.8 + rng.normal(scale=0.005, size=obj.shape)  # scanner noise
    floor_y = obj[:, 1].min()
    mask = np.full(n, 7, dtype=np.int32)
    if background:
        k = n - n_object
        floor = np.stack([rng.uniform(-1.0, 1.0, k), np.full(k, floor_y), rng.uniform(-1.0, 1.0, k)], axis=1)
        wall = rng.random(k) < 0.4
        floor[wall, 2] = -1.0
        floor[wall, 1] = floor_y + rng.uniform(0.0, 1.5, int(wall.sum()))
        obj = np.concatenate([obj, floor + rng.normal(scale=0.005, size=floor.shape)])
        mask[n_object:] = -1
    if hardest:
        obj = obj @ _rotation_y(rng.uniform(0, 2 * np.pi)).T * rng.uniform(0.75, 1.25)
        obj = obj + rng.uniform(-0.5, 0.5, 3) * np.ptp(obj, axis=0) * np.array([1.0, 0.0, 1.0])
    order = rng.permutation(n)
    return obj[order], mask[order]


# ----------------------------------------------------------------------------------------------- writers


def _text(rows: np.ndarray, fmt: str) -> bytes:
    return "".join(fmt % tuple(row) for row in rows.tolist()).encode()


def _lines(items: list[str]) -> bytes:
    return "".join(f"{item}\n" for item in items).encode()


def _write_h5(path: Path, **datasets: np.ndarray) -> None:
    """An HDF5 file written under a temporary name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with h5py.File(tmp, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    tmp.replace(path)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def write_modelnet(cfg: Config, out: Path, progress: Progress) -> None:
    """ModelNet40 as `modelnet40_normal_resampled` (txt) and `modelnet40_ply_hdf5_2048` (HDF5), same shapes."""
    txt, h5 = out / MODELNET_TXT_DIR, out / MODELNET_H5_DIR
    atomic_write_bytes(txt / "modelnet40_shape_names.txt", _lines(list(MODELNET40_CLASSES)))
    atomic_write_bytes(h5 / "shape_names.txt", _lines(list(MODELNET40_CLASSES)))
    per_class = cfg.modelnet_train_per_class + cfg.modelnet_test_per_class
    task = progress.add_task("ModelNet40", total=cfg.modelnet_classes * per_class)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    clouds: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for label in range(cfg.modelnet_classes):
        name = MODELNET40_CLASSES[label]
        for i in range(per_class):
            split = "train" if i < cfg.modelnet_train_per_class else "test"
            shape_id = f"{name}_{i + 1:04d}"
            rng = _rng(cfg.seed, 1, label, i)
            points, normals = class_shape(label, cfg.modelnet_points, rng)
            atomic_write_bytes(txt / name / f"{shape_id}.txt",
                               _text(np.concatenate([points, normals], axis=1), "%.6f,%.6f,%.6f,%.6f,%.6f,%.6f\n"))
            splits[split].append((shape_id, label))
            pick = rng.choice(len(points), cfg.h5_points, replace=cfg.h5_points > len(points))
            clouds[split].append((points[pick], normals[pick]))
            progress.advance(task)
    for split in ("train", "test"):
        atomic_write_bytes(txt / f"modelnet40_{split}.txt", _lines([s for s, _ in splits[split]]))
        order = _rng(cfg.seed, 2, split == "train").permutation(len(splits[split]))  # the release is shuffled
        files = []
        for shard, start in enumerate(range(0, len(order), cfg.h5_shapes_per_file)):
            rows = order[start:start + cfg.h5_shapes_per_file]
            name = f"ply_data_{split}{shard}.h5"
            _write_h5(h5 / name,
                      data=np.stack([clouds[split][r][0] for r in rows]).astype(np.float32),
                      label=np.array([[splits[split][r][1]] for r in rows], dtype=np.uint8),
                      normal=np.stack([clouds[split][r][1] for r in rows]).astype(np.float32))
            atomic_write_bytes(h5 / f"ply_data_{split}_{shard}_id2file.json", json.dumps(
                [f"{MODELNET40_CLASSES[splits[split][r][1]]}/{splits[split][r][0]}.ply" for r in rows]).encode())
            files.append(f"data/{MODELNET_H5_DIR}/{name}")  # repo-relative, as PointNet's list files
        atomic_write_bytes(h5 / f"{split}_files.txt", _lines(files))


def write_scanobjectnn(cfg: Config, out: Path, progress: Progress) -> None:
    """ScanObjectNN's main_split (OBJ_BG, PB_T50_RS) and main_split_nobg (OBJ_ONLY) HDF5 files."""
    per_class = cfg.scanobjectnn_train_per_class + cfg.scanobjectnn_test_per_class
    task = progress.add_task("ScanObjectNN", total=len(SCANOBJECTNN_FILES) * cfg.scanobjectnn_classes * per_class)
    for v, (variant, (folder, stem)) in enumerate(SCANOBJECTNN_FILES.items()):
        rows: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {"training": [], "test": []}
        for label in range(cfg.scanobjectnn_classes):
            for i in range(per_class):
                split = "training" if i < cfg.scanobjectnn_train_per_class else "test"
                points, mask = scan_object(label, cfg.h5_points, _rng(cfg.seed, 3, v, label, i),
                                           background=variant != "OBJ_ONLY", hardest=variant == "PB_T50_RS")
                rows[split].append((points, mask, label))
                progress.advance(task)
        for split, items in rows.items():
            order = _rng(cfg.seed, 4, v, split == "training").permutation(len(items))
            _write_h5(out / SCANOBJECTNN_DIR / folder / f"{split}_{stem}.h5",
                      data=np.stack([items[r][0] for r in order]).astype(np.float32),
                      label=np.array([items[r][2] for r in order], dtype=np.int64),
                      mask=np.stack([items[r][1] for r in order]).astype(np.int32))


def _shape_id(seed: int, category: int, index: int) -> str:
    """A ShapeNet-style hexadecimal model id, unique per (category, index) and seed."""
    return hashlib.sha1(f"{seed}/{category}/{index}".encode()).hexdigest()[:31]


def write_shapenetpart(cfg: Config, out: Path, progress: Progress) -> None:
    """ShapeNetPart as `shapenetcore_partanno_segmentation_benchmark_v0_normal` (txt with part ids, json splits)."""
    root = out / SHAPENETPART_DIR
    atomic_write_bytes(root / "synsetoffset2category.txt",
                       _lines([f"{name}\t{synset}" for name, synset, _ in SHAPENETPART_CATEGORIES]))
    counts = {"train": cfg.shapenetpart_train_per_category, "val": cfg.shapenetpart_val_per_category,
              "test": cfg.shapenetpart_test_per_category}
    task = progress.add_task("ShapeNetPart", total=cfg.shapenetpart_categories * sum(counts.values()))
    lists: dict[str, list[str]] = {split: [] for split in counts}
    for _, synset, _ in SHAPENETPART_CATEGORIES:
        (root / synset).mkdir(parents=True, exist_ok=True)
    for category in range(cfg.shapenetpart_categories):
        synset = SHAPENETPART_CATEGORIES[category][1]
        index = 0
        for split, count in counts.items():
            for _ in range(count):
                rng = _rng(cfg.seed, 5, category, index)
                shape_id = _shape_id(cfg.seed, category, index)
                n = int(rng.integers(cfg.shapenetpart_points[0], cfg.shapenetpart_points[1] + 1))
                points, normals, parts = part_shape(category, n, rng)
                rows = np.concatenate([points, normals, parts[:, None]], axis=1)
                atomic_write_bytes(root / synset / f"{shape_id}.txt", _text(rows, "%f %f %f %f %f %f %f\n"))
                lists[split].append(f"shape_data/{synset}/{shape_id}")
                index += 1
                progress.advance(task)
    for split, entries in lists.items():
        order = _rng(cfg.seed, 6, len(split)).permutation(len(entries))  # the release's lists are shuffled
        atomic_write_bytes(root / "train_test_split" / f"shuffled_{split}_file_list.json",
                           json.dumps([entries[i] for i in order]).encode())


def check_config(cfg: Config) -> None:
    limits = {"modelnet_classes": len(MODELNET40_CLASSES), "scanobjectnn_classes": len(SCANOBJECTNN_CLASSES),
              "shapenetpart_categories": len(SHAPENETPART_CATEGORIES)}
    for name, most in limits.items():
        if not 1 <= getattr(cfg, name) <= most:
            raise PcdError(f"generate-shapes: {name} must be in 1..{most} (got {getattr(cfg, name)})")
    for name in ("modelnet_train_per_class", "modelnet_test_per_class", "modelnet_points", "h5_points",
                 "h5_shapes_per_file", "scanobjectnn_train_per_class", "scanobjectnn_test_per_class",
                 "shapenetpart_train_per_category", "shapenetpart_val_per_category",
                 "shapenetpart_test_per_category"):
        if getattr(cfg, name) < 1:
            raise PcdError(f"generate-shapes: {name} must be at least 1 (got {getattr(cfg, name)})")
    low, high = cfg.shapenetpart_points
    if not 16 <= low <= high:
        raise PcdError(f"generate-shapes: shapenetpart_points must be a range [low, high] with 16 <= low <= high "
                       f"(got {list(cfg.shapenetpart_points)})")


MARKER_NAME = "generated-shapes.txt"


def claim_output_folder(out: Path) -> None:
    """Generated shapes carry the real datasets' file names: never write them into a folder holding anything
    else (a real dataset); a folder this command wrote before is reused."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).is_file():
        raise PcdError(f"{out}: not empty and not written by pcd generate-shapes; choose an empty or new folder "
                       "(generated shapes would overwrite dataset files of the same names)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER_NAME, b"Written by pcd generate-shapes: generated data, not the real datasets.\n")


def generate(cfg: Config, show_progress: bool = False) -> dict[str, Path]:
    """Write all datasets into `cfg.out_dir`; returns {dataset: folder}."""
    check_config(cfg)
    out = Path(cfg.out_dir)
    claim_output_folder(out)
    with Progress(disable=not show_progress, transient=True) as progress:
        write_modelnet(cfg, out, progress)
        write_scanobjectnn(cfg, out, progress)
        write_shapenetpart(cfg, out, progress)
    return {"modelnet40_txt": out / MODELNET_TXT_DIR, "modelnet40_h5": out / MODELNET_H5_DIR,
            "scanobjectnn": out / SCANOBJECTNN_DIR, "shapenetpart": out / SHAPENETPART_DIR}


def run(cfg: Config) -> int:
    folders = generate(cfg, show_progress=True)
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0
