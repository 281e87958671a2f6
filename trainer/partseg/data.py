"""ShapeNetPart part-segmentation data, read as distributed (`shapenetcore_partanno_segmentation_benchmark_v0_normal`).

The release: `synsetoffset2category.txt` (16 lines `Name<TAB>synset`; the line order is the category index),
`train_test_split/shuffled_{train,val,test}_file_list.json` (entries `shape_data/<synset>/<id>`), and
`<synset>/<id>.txt` with 7 whitespace-separated columns `x y z nx ny nz part` (part as a float), a variable number
of points per shape. Part ids are global, 0..49, consecutive per category (Airplane 0-3 ... Table 47-49).

`ShapeNetPart(root, split)[i] = {"points": (N,3) float32 as in the file, "seg": (N,) int64, "category": int64}`
with every point of the shape; choosing the points a model sees is the caller's (`choose_points`). Shapes are
ordered as Point-MAE's `PartNormalDataset` orders them (by category, then file name) and selected by id from the
split lists ('trainval' = train + val). All text is parsed once into pcd's cache (npy, atomic, memory-mapped),
which is also where every part id is checked against its category's range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from pcd.pipeline.errors import PcdError
from pcd.trainer.shape_files import (Frame, MappedState, atomic_npy, cache_name, default_workers, load_npy,
                                     parallel_map, read_json_list, read_lines, read_point_text)

Split = Literal["trainval", "train", "val", "test"]
# (name, synset, part ids) in the release's order; the part ids are Point-MAE's `seg_classes`.
CATEGORIES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("Airplane", "02691156", (0, 1, 2, 3)), ("Bag", "02773838", (4, 5)), ("Cap", "02954340", (6, 7)),
    ("Car", "02958343", (8, 9, 10, 11)), ("Chair", "03001627", (12, 13, 14, 15)),
    ("Earphone", "03261776", (16, 17, 18)), ("Guitar", "03467517", (19, 20, 21)), ("Knife", "03624134", (22, 23)),
    ("Lamp", "03636649", (24, 25, 26, 27)), ("Laptop", "03642806", (28, 29)),
    ("Motorbike", "03790512", (30, 31, 32, 33, 34, 35)), ("Mug", "03797390", (36, 37)),
    ("Pistol", "03948459", (38, 39, 40)), ("Rocket", "04099429", (41, 42, 43)),
    ("Skateboard", "04225987", (44, 45, 46)), ("Table", "04379243", (47, 48, 49)))
CATEGORY_NAMES = tuple(name for name, _, _ in CATEGORIES)
CATEGORY_PARTS: tuple[tuple[int, ...], ...] = tuple(parts for _, _, parts in CATEGORIES)
NUM_CATEGORIES = len(CATEGORIES)
NUM_PARTS = 50
LAYOUT = "shapenetcore_partanno_segmentation_benchmark_v0_normal"
SPLIT_FILES = {"train": ("train",), "val": ("val",), "test": ("test",), "trainval": ("train", "val")}


def _read_shape(job: tuple[Path, int]) -> np.ndarray:
    """One shape file as float32 (N,4): xyz and the part id, checked against its category's parts."""
    path, category = job
    rows = read_point_text(path, None, 7)
    part = rows[:, 6]
    allowed = CATEGORY_PARTS[category]
    bad = np.flatnonzero((part != np.round(part)) | (part < allowed[0]) | (part > allowed[-1]))
    if bad.size:
        raise PcdError(f"{path}: part label {part[bad[0]]:g} on line {bad[0] + 1} is out of range "
                       f"{allowed[0]}..{allowed[-1]} of {CATEGORY_NAMES[category]}")
    return np.ascontiguousarray(np.concatenate([rows[:, :3], part[:, None]], axis=1))


def check_layout(root: Path) -> None:
    """A one-line PcdError unless `root` looks like ShapeNetPart's release folder."""
    root = Path(root)
    if not root.is_dir():
        raise PcdError(f"{root}: not a folder (expected {LAYOUT})")
    if not (root / "synsetoffset2category.txt").is_file():
        raise PcdError(f"{root}: unknown dataset layout (expected {LAYOUT} with synsetoffset2category.txt and "
                       "train_test_split/)")


class ShapeNetPart(MappedState):
    """ShapeNetPart shapes of one split, every point, with part ids and categories; see the module docstring."""

    layout = LAYOUT
    frame = Frame(up_axis="y", normalized=True)
    category_names = CATEGORY_NAMES
    category_parts = CATEGORY_PARTS
    num_parts = NUM_PARTS

    def __init__(self, root: Path, split: Split, *, cache_dir: Path | None = None, workers: int | None = None,
                 show_progress: bool = False):
        root = Path(root)
        check_layout(root)
        if split not in SPLIT_FILES:
            raise PcdError(f"unknown split '{split}' (ShapeNetPart has {', '.join(SPLIT_FILES)})")
        cat_file = root / "synsetoffset2category.txt"
        listed = [line.split() for line in read_lines(cat_file, "ShapeNetPart categories")]
        expected = [[name, synset] for name, synset, _ in CATEGORIES]
        if listed != expected:
            raise PcdError(f"{cat_file}: expected ShapeNetPart's 16 categories in its order (Airplane 02691156 ... "
                           f"Table 04379243), found {len(listed)} lines that differ")
        wanted: set[str] = set()
        for part in SPLIT_FILES[split]:
            json_file = root / "train_test_split" / f"shuffled_{part}_file_list.json"
            for entry in read_json_list(json_file, f"ShapeNetPart {part} list"):
                pieces = entry.split("/")
                if len(pieces) != 3 or not pieces[2]:
                    raise PcdError(f"{json_file}: entry '{entry}' is not of the form shape_data/<synset>/<id>")
                wanted.add(pieces[2])
        jobs: list[tuple[Path, int]] = []
        for category, (_, synset, _) in enumerate(CATEGORIES):
            folder = root / synset
            if not folder.is_dir():
                raise PcdError(f"{folder}: missing (the {CATEGORY_NAMES[category]} folder of ShapeNetPart)")
            jobs += [(folder / name, category) for name in sorted(p.name for p in folder.iterdir())
                     if name.endswith(".txt") and name[:-4] in wanted]
        found = {path.stem for path, _ in jobs}
        if len(found) != len(wanted):
            missing = sorted(wanted - found)[0]
            raise PcdError(f"{root}: shape '{missing}' of the {split} split lists has no <synset>/{missing}.txt file")
        self.source = root
        self.shape_ids = [f"{path.parent.name}/{path.stem}" for path, _ in jobs]
        self.categories = np.array([c for _, c in jobs], dtype=np.int64)
        self.points, self.offsets = self._load_cache(root, split, jobs, cache_dir, workers, show_progress)

    def _load_cache(self, root: Path, split: str, jobs: list[tuple[Path, int]], cache_dir: Path | None,
                    workers: int | None, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
        cache = Path(cache_dir) if cache_dir is not None else root / "pcd_cache"
        stem = cache_name(f"shapenetpart_{split}", [self.shape_ids]).removesuffix(".npy")
        points_path, offsets_path = cache / f"{stem}_points.npy", cache / f"{stem}_offsets.npy"
        offsets = load_npy(offsets_path, (len(jobs) + 1,), np.int64)
        if offsets is not None:
            points = load_npy(points_path, (int(offsets[-1]), 4), np.float32)
            if points is not None:
                return points, np.asarray(offsets)
        shapes = [rows for _, rows in parallel_map(_read_shape, jobs, default_workers() if workers is None else
                                                   workers, f"ShapeNetPart {split}: reading", show_progress)]
        offsets_new = np.concatenate([[0], np.cumsum([len(s) for s in shapes])]).astype(np.int64)
        with atomic_npy(points_path, (int(offsets_new[-1]), 4), np.float32) as out:
            for s, start in zip(shapes, offsets_new):
                out[start:start + len(s)] = s
        with atomic_npy(offsets_path, offsets_new.shape, np.int64) as out:
            out[:] = offsets_new
        return load_npy(points_path, (int(offsets_new[-1]), 4), np.float32), offsets_new

    @property
    def up_axis(self) -> str:
        return self.frame.up_axis

    @property
    def normalized(self) -> bool:
        return self.frame.normalized

    def __len__(self) -> int:
        return len(self.categories)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rows = np.asarray(self.points[self.offsets[index]:self.offsets[index + 1]])
        return {"points": np.array(rows[:, :3], dtype=np.float32), "seg": rows[:, 3].astype(np.int64),
                "category": np.int64(self.categories[index])}


def choose_points(available: int, num_points: int, rng: np.random.Generator, *, replace: bool) -> np.ndarray:
    """Indices of the `num_points` points a model sees of a shape with `available` points.

    replace=True is Point-MAE's draw (uniform with replacement, for training and its test); replace=False
    takes distinct points where the shape has enough, and fills the rest by drawing with replacement."""
    if available < 1 or num_points < 1:
        raise PcdError(f"cannot choose {num_points} points from a shape of {available} points")
    if replace:
        return rng.choice(available, num_points, replace=True)
    if available >= num_points:
        return rng.choice(available, num_points, replace=False)
    return np.concatenate([rng.permutation(available), rng.choice(available, num_points - available, replace=True)])
