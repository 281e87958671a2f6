"""Object classification data: ModelNet40 (txt and HDF5 releases) and ScanObjectNN, read as distributed.

Each reader is a map-style dataset of numpy arrays: `ds[i] = {"points": (N,3) float32 as in the file,
"label": int64}`. The frame is described, not changed: `up_axis` ("y" for all three) and `normalized` (whether
Point-MAE's recipe scales each shape to the unit sphere before the model: ModelNet yes, ScanObjectNN no); the
fine-tune converts points into the frame of its weights with the project's one normalisation function.

Point selection follows Point-MAE's `tools/runner_finetune.py` (see docs/classification.md):
* training: FPS to `point_all` = 75/64 x the model's points (1,200 for 1,024; 2,400 for 2,048; 4,800 for 4,096;
  9,600 for 8,192), capped at the points available, from a random start, then a random `num_points` of those;
* evaluation: FPS to `num_points` from the first point;
* voting views: FPS to `point_all` from the first point, a random `num_points` of those, then scale and translate.
For ScanObjectNN (2,048 points, all used) the same rules give all points in a new order, so its voting views are
augmentation-only, as the issue asks.

ModelNet40's txt release has 10,000 points per shape; pcd builds its own cache of 8,192 FPS points per shape
(as Point-MAE's `modelnet40_{split}_8192pts_fps.dat`, but as npy, never a pickle) once, in parallel.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import fpsample
import numpy as np

from pcd.pipeline.errors import PcdError
from pcd.trainer.augment import scale_and_translate
from pcd.trainer.shape_files import (Frame, MappedState, atomic_npy, cache_name, check_labels, default_workers,
                                     load_npy, parallel_map, read_h5, read_lines, read_point_text)

Split = Literal["train", "test"]
Layout = Literal["modelnet40_normal_resampled", "modelnet40_ply_hdf5_2048", "scanobjectnn"]
LAYOUTS: tuple[str, ...] = ("modelnet40_normal_resampled", "modelnet40_ply_hdf5_2048", "scanobjectnn")
SCANOBJECTNN_CLASSES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed",
                        "pillow", "sink", "sofa", "toilet")
# variant -> (folder, file stem): `training_<stem>.h5` / `test_<stem>.h5`, as the release and Point-MAE name them.
SCANOBJECTNN_VARIANTS = {
    "OBJ_BG": ("main_split", "objectdataset"),
    "OBJ_ONLY": ("main_split_nobg", "objectdataset"),
    "PB_T50_RS": ("main_split", "objectdataset_augmentedrot_scale75"),
}
MODELNET_CACHE_POINTS = 8192
FPS_METHOD = "fpsample.fps_sampling (exact FPS) from the first point"


class ClassificationDataset(MappedState):
    """Shapes and labels held as arrays: `points` (S,N,3) float32 (possibly memory-mapped), `labels` (S,) int64."""

    layout: str
    frame: Frame
    class_names: tuple[str, ...]

    def __init__(self, points: np.ndarray, labels: np.ndarray, source: Path):
        self.points = points
        self.labels = labels
        self.source = source

    @property
    def up_axis(self) -> str:
        return self.frame.up_axis

    @property
    def normalized(self) -> bool:
        return self.frame.normalized

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"points": np.array(self.points[index], dtype=np.float32), "label": np.int64(self.labels[index])}


# ------------------------------------------------------------------------------------------------- layouts


def _refuse_pickle(path: Path) -> PcdError:
    return PcdError(f"{path}: Point-MAE's ModelNet cache is a Python pickle, which pcd never loads (unpickling "
                    f"runs arbitrary code); give pcd the modelnet40_normal_resampled folder with its txt files and "
                    f"it builds its own cache (npy) from them")


def detect_layout(root: Path) -> Layout:
    """Which release a folder holds, from the files the release always has; a one-line PcdError otherwise."""
    root = Path(root)
    if root.suffix == ".dat":
        raise _refuse_pickle(root)
    if not root.is_dir():
        raise PcdError(f"{root}: not a folder (expected a ModelNet40 or ScanObjectNN dataset folder)")
    if (root / "modelnet40_shape_names.txt").is_file():
        return "modelnet40_normal_resampled"
    if (root / "shape_names.txt").is_file() and any((root / f"{s}_files.txt").is_file() for s in ("train", "test")):
        return "modelnet40_ply_hdf5_2048"
    if any((root / folder).is_dir() for folder in ("main_split", "main_split_nobg")) or any(
            root.glob("*_objectdataset*.h5")):
        return "scanobjectnn"
    if (root / "synsetoffset2category.txt").is_file():
        raise PcdError(f"{root}: a ShapeNetPart folder, which is for part segmentation, not classification")
    raise PcdError(f"{root}: unknown dataset layout (expected modelnet40_normal_resampled with "
                   "modelnet40_shape_names.txt, modelnet40_ply_hdf5_2048 with shape_names.txt and train_files.txt, "
                   "or ScanObjectNN's h5_files with main_split/main_split_nobg)")


def open_classification(root: Path, split: Split, *, variant: str | None = None, **options) -> ClassificationDataset:
    """The dataset in `root` whatever its layout; `variant` names the ScanObjectNN variant (default OBJ_BG) and
    `options` go to the ModelNet40 txt reader (cache_points, cache_dir, workers, show_progress)."""
    layout = detect_layout(root)
    if layout == "modelnet40_normal_resampled":
        return ModelNet40Txt(root, split, **options)
    if layout == "modelnet40_ply_hdf5_2048":
        return ModelNet40H5(root, split)
    return ScanObjectNN(root, split, variant=variant or "OBJ_BG")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise PcdError(f"unknown split '{split}' (ModelNet40 and ScanObjectNN have train and test)")


# ------------------------------------------------------------------------------------------------- ModelNet40 txt


def _fps_shape(path: Path, count: int) -> np.ndarray:
    """`count` exact-FPS points (xyz) of one ModelNet txt file (x,y,z,nx,ny,nz per line)."""
    rows = read_point_text(path, ",", 6)
    if len(rows) < count:
        raise PcdError(f"{path}: {len(rows)} points, fewer than the {count} of the cache")
    xyz = np.ascontiguousarray(rows[:, :3])
    return xyz[fps_indices(xyz, count, start=0)]


class ModelNet40Txt(ClassificationDataset):
    """`modelnet40_normal_resampled`: class names, split lists and `<class>/<shape id>.txt` with 10,000 points.

    On first use the split's shapes are reduced by exact FPS to `cache_points` (8,192, as Point-MAE) and stored in
    `cache_dir` (default: `<root>/pcd_cache`) as one npy, written atomically and memory-mapped afterwards.
    """

    layout = "modelnet40_normal_resampled"
    frame = Frame(up_axis="y", normalized=True)
    class_names = ()

    def __init__(self, root: Path, split: Split, *, cache_points: int = MODELNET_CACHE_POINTS,
                 cache_dir: Path | None = None, workers: int | None = None, show_progress: bool = False):
        root = Path(root)
        _check_split(split)
        self.class_names = tuple(read_lines(root / "modelnet40_shape_names.txt", "ModelNet40 class names"))
        split_file = root / f"modelnet40_{split}.txt"
        shape_ids = read_lines(split_file, f"ModelNet40 {split} split list")
        index = {name: i for i, name in enumerate(self.class_names)}
        labels, files = [], []
        for shape_id in shape_ids:
            name = shape_id.rpartition("_")[0]
            if name not in index:
                raise PcdError(f"{split_file}: shape '{shape_id}' names class '{name}', which is not in "
                               f"{root / 'modelnet40_shape_names.txt'}")
            labels.append(index[name])
            files.append(root / name / f"{shape_id}.txt")
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            dat = root / f"modelnet40_{split}_8192pts_fps.dat"
            if dat.is_file():
                raise _refuse_pickle(dat)
            raise PcdError(f"{missing}: missing (listed in {split_file})")
        self.shape_ids = shape_ids
        cache = Path(cache_dir) if cache_dir is not None else root / "pcd_cache"
        path = cache / cache_name(f"modelnet40_{split}_{cache_points}pts_fps", [shape_ids, cache_points, FPS_METHOD])
        shape = (len(files), cache_points, 3)
        points = load_npy(path, shape, np.float32)
        if points is None:
            fps = partial(_fps_shape, count=cache_points)
            with atomic_npy(path, shape, np.float32) as out:
                for i, xyz in parallel_map(fps, files, default_workers() if workers is None else workers,
                                           f"ModelNet40 {split}: FPS to {cache_points} points", show_progress):
                    out[i] = xyz
            points = load_npy(path, shape, np.float32)
        self.cache_path = path
        super().__init__(points, np.asarray(labels, dtype=np.int64), split_file)


# ------------------------------------------------------------------------------------------------- ModelNet40 HDF5


class ModelNet40H5(ClassificationDataset):
    """`modelnet40_ply_hdf5_2048`: `ply_data_{split}{i}.h5` (data, label) named by `{split}_files.txt`, 2,048 points
    per shape. The list files hold repository-relative paths (`data/modelnet40_ply_hdf5_2048/...`); each is
    looked up by its file name in `root`."""

    layout = "modelnet40_ply_hdf5_2048"
    frame = Frame(up_axis="y", normalized=True)
    class_names = ()

    def __init__(self, root: Path, split: Split):
        root = Path(root)
        _check_split(split)
        self.class_names = tuple(read_lines(root / "shape_names.txt", "ModelNet40 class names"))
        list_file = root / f"{split}_files.txt"
        names = [Path(line).name for line in read_lines(list_file, f"ModelNet40 HDF5 {split} file list")]
        if not names:
            raise PcdError(f"{list_file}: lists no HDF5 files")
        points, labels = [], []
        for name in names:
            path = root / name
            arrays = read_h5(path, ("data", "label"), f"listed in {list_file}")
            data = arrays["data"]
            if data.ndim != 3 or data.shape[2] != 3 or len(data) != len(arrays["label"]):
                raise PcdError(f"{path}: expected data (n, points, 3) and one label per shape, got data "
                               f"{data.shape} and label {arrays['label'].shape}")
            points.append(data.astype(np.float32))
            labels.append(check_labels(arrays["label"], len(self.class_names), path))
        if len({p.shape[1] for p in points}) > 1:
            raise PcdError(f"{list_file}: its files hold different numbers of points per shape")
        super().__init__(np.concatenate(points), np.concatenate(labels), list_file)


# ------------------------------------------------------------------------------------------------- ScanObjectNN


class ScanObjectNN(ClassificationDataset):
    """ScanObjectNN's HDF5 files (data (n, 2048, 3), label (n,)): variant OBJ_BG (`main_split`), OBJ_ONLY
    (`main_split_nobg`) or PB_T50_RS (`main_split`, `*_augmentedrot_scale75.h5`). `root` is the release's
    `h5_files` folder holding both, or the variant's folder itself. Coordinates are as scanned: y up, not
    normalised (Point-MAE feeds them as they are)."""

    layout = "scanobjectnn"
    frame = Frame(up_axis="y", normalized=False)
    class_names = SCANOBJECTNN_CLASSES

    def __init__(self, root: Path, split: Split, *, variant: str = "OBJ_BG"):
        root = Path(root)
        _check_split(split)
        if variant not in SCANOBJECTNN_VARIANTS:
            raise PcdError(f"unknown ScanObjectNN variant '{variant}' (known: {', '.join(SCANOBJECTNN_VARIANTS)})")
        self.variant = variant
        folder, stem = SCANOBJECTNN_VARIANTS[variant]
        base = root / folder if (root / folder).is_dir() else root
        if base.name != folder:
            raise PcdError(f"{root}: no {folder} folder (needed for ScanObjectNN {variant})")
        path = base / f"{'training' if split == 'train' else 'test'}_{stem}.h5"
        arrays = read_h5(path, ("data", "label"), f"ScanObjectNN {variant} {split} file")
        data = arrays["data"]
        if data.ndim != 3 or data.shape[2] != 3 or len(data) != len(arrays["label"]):
            raise PcdError(f"{path}: expected data (n, points, 3) and one label per shape, got data {data.shape} "
                           f"and label {arrays['label'].shape}")
        super().__init__(data.astype(np.float32), check_labels(arrays["label"], len(self.class_names), path), path)


# ------------------------------------------------------------------------------------------------- point selection


def fps_indices(xyz: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """Indices of `count` exact farthest-point samples of xyz (N,3), starting at index `start` (compiled)."""
    if not 0 < count <= len(xyz):
        raise PcdError(f"cannot take {count} farthest points from a shape of {len(xyz)} points")
    return fpsample.fps_sampling(np.ascontiguousarray(xyz, dtype=np.float32), count, start_idx=int(start)).astype(
        np.int64)


def preselection_size(num_points: int, available: int) -> int:
    """Point-MAE's `point_all`: the FPS points a random `num_points` subset is drawn from (1,024 -> 1,200,
    2,048 -> 2,400, 4,096 -> 4,800, i.e. 75/64 x; 8,192 -> all of the 8,192), capped at the points available."""
    if not 0 < num_points <= available:
        raise PcdError(f"cannot take {num_points} points from a shape of {available} points")
    return min(num_points * 75 // 64, available)


def training_points(points: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """A training sample as Point-MAE draws it: FPS to `preselection_size` from a random first point (Point-MAE
    shuffles the points, then its FPS starts at the first), then a random `num_points` of those, in random order.
    Augmentation (scale and translate) is separate: `pcd.trainer.augment`."""
    keep = preselection_size(num_points, len(points))
    picked = fps_indices(points, keep, start=int(rng.integers(len(points))))
    return np.asarray(points, dtype=np.float32)[picked[rng.choice(keep, num_points, replace=False)]]


def eval_points(points: np.ndarray, num_points: int) -> np.ndarray:
    """The evaluation sample without voting: FPS to `num_points` from the first point (Point-MAE's `misc.fps`)."""
    return np.asarray(points, dtype=np.float32)[fps_indices(points, num_points, start=0)]


def voting_view(points: np.ndarray, num_points: int, *, seed: int, sample: int, view: int,
                scale_low: float = 2.0 / 3.0, scale_high: float = 1.5, translate_range: float = 0.2) -> np.ndarray:
    """The `view`-th voting view of sample `sample` under `seed`: FPS to `preselection_size` from the first point,
    a random `num_points` of those, then Point-MAE's scale and translate. Deterministic in (seed, sample, view)."""
    rng = np.random.default_rng([seed, sample, view])
    keep = preselection_size(num_points, len(points))
    picked = fps_indices(points, keep, start=0)[rng.choice(keep, num_points, replace=False)]
    return scale_and_translate(np.asarray(points, dtype=np.float32)[picked], rng, scale_low=scale_low,
                               scale_high=scale_high, translate_range=translate_range)
