"""Prepared ScanNet scenes for semantic segmentation, and the two ways the model sees a part of one.

Reads what `pcd prepare scannet` writes per scene: `<scene>_full_vert.npy` (N,6) float32 (every vertex of
`_vh_clean_2.ply`, axis-aligned xyz in metres + RGB; memory-mapped) and, for labelled scenes,
`<scene>_full_sem_label.npy` (N,) nyu40 ids, mapped here to the 20 classes (`IGNORE_INDEX` elsewhere).
Only xyz reaches the model (as in pre-training).

Crops (`crop` in the configs):
- "column": PointNet++'s ScanNet recipe (`scannet_dataset.py`): a full-height column of `column_size` metres
  square. Training centres it on a random vertex and retries (10 tries, as PointNet++) until at least 70% of
  its vertices are annotated; PointNet++'s 0.2 m margin (points weighted 0) and its voxel-occupancy test are
  not used. Evaluation tiles the scene's x-y extent with columns `eval_stride` apart (`tile_columns`): every
  vertex lies in at least one column.
- "scene": the whole scene.
Within the crop, `num_points` distinct vertices are drawn when it has that many, else all of them and the rest
with replacement (PointNet++ always draws with replacement; pcd takes distinct points where it can).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from pcd.pipeline.errors import PcdError
from pcd.pipeline.extract import SCENE_ID
from pcd.pipeline.splits import read_split
from pcd.trainer.detection.prepare import FULL_LABELS, FULL_VERTICES
from pcd.trainer.semseg.classes import IGNORE_INDEX, train_ids

Crop = Literal["column", "scene"]
COLUMN_TRIES = 10
MIN_ANNOTATED = 0.7
_EDGE = 1e-6  # metres: column borders are widened by this so float rounding cannot leave a vertex outside all


class SemSegScenes:
    """The prepared scenes named in `scenes` (order kept); `labelled=True` requires their labels."""

    def __init__(self, data_dir: Path, scenes: list[str], labelled: bool = True):
        self.data_dir, self.scenes = Path(data_dir), list(scenes)
        if not self.scenes:
            raise PcdError(f"{data_dir}: no scenes to read")
        for scene in self.scenes:  # a scene id becomes a file name (OUT_DIR/<scene>.txt): never a path
            if not SCENE_ID.fullmatch(scene):
                raise PcdError(f"{data_dir}: scene id {scene!r} is not a plain name (letters, digits and ._-)")
        self.vertex_counts = []
        for scene in self.scenes:
            path = self.data_dir / f"{scene}{FULL_VERTICES}"
            if not path.is_file():
                raise PcdError(f"{path}: missing (run `pcd prepare scannet` on scene {scene})")
            if labelled and not (self.data_dir / f"{scene}{FULL_LABELS}").is_file():
                raise PcdError(f"{self.data_dir / (scene + FULL_LABELS)}: missing (scene {scene} has no labels; "
                               "it can be predicted, not trained on or evaluated)")
            self.vertex_counts.append(self._header_rows(path))
        self.labelled = labelled

    @staticmethod
    def _header_rows(path: Path) -> int:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PcdError(f"{path}: not a readable .npy file ({exc})") from None
        if array.ndim != 2 or array.shape[1] < 3 or array.dtype != np.float32 or array.shape[0] == 0:
            raise PcdError(f"{path}: expected (N,6) float32 vertices, found {array.dtype} {array.shape}")
        return int(array.shape[0])

    def __len__(self) -> int:
        return len(self.scenes)

    def xyz(self, index: int) -> np.ndarray:
        """(N,3) float32 aligned vertex coordinates of scene `index` (z up, metres)."""
        vertices = np.load(self.data_dir / f"{self.scenes[index]}{FULL_VERTICES}", mmap_mode="r")
        return np.ascontiguousarray(vertices[:, :3], dtype=np.float32)

    def nyu40(self, index: int) -> np.ndarray:
        """(N,) int64 nyu40 id per vertex, checked against the vertex count."""
        scene = self.scenes[index]
        path = self.data_dir / f"{scene}{FULL_LABELS}"
        labels = np.load(path, allow_pickle=False).astype(np.int64)
        if labels.shape != (self.vertex_counts[index],):
            raise PcdError(f"{path}: {labels.size} labels for the {self.vertex_counts[index]} vertices of scene "
                           f"{scene}")
        return labels

    def labels(self, index: int) -> np.ndarray:
        """(N,) int64 class index 0..19 per vertex, `IGNORE_INDEX` where the benchmark does not score."""
        return train_ids(self.nyu40(index))


def read_scene_ids(data_dir: Path, split: Optional[Path]) -> list[str]:
    """The scenes of a split file, or (no split) every scene prepared in `data_dir`."""
    if split is not None:
        return read_split(split)
    scenes = sorted(p.name[:-len(FULL_VERTICES)] for p in Path(data_dir).glob(f"*{FULL_VERTICES}"))
    if not scenes:
        raise PcdError(f"{data_dir}: no <scene>{FULL_VERTICES} here (the output of `pcd prepare scannet`)")
    return scenes


def column_mask(xyz: np.ndarray, center_xy: np.ndarray, size: float) -> np.ndarray:
    """Vertices inside the full-height column of side `size` centred at `center_xy` (borders included)."""
    half = size / 2
    return np.all(np.abs(xyz[:, :2] - np.asarray(center_xy, dtype=np.float32)) <= half, axis=1)


def training_crop(xyz: np.ndarray, labels: np.ndarray, crop: Crop, column_size: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Indices of the vertices of one training crop (see the module docstring)."""
    if crop == "scene":
        return np.arange(len(xyz))
    chosen = np.arange(len(xyz))
    for _ in range(COLUMN_TRIES):
        inside = np.flatnonzero(column_mask(xyz, xyz[rng.integers(len(xyz)), :2], column_size))
        chosen = inside
        if np.count_nonzero(labels[inside] != IGNORE_INDEX) >= MIN_ANNOTATED * len(inside):
            break
    return chosen


def choose(available: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """`num_points` of the indices `available`: distinct where there are enough, else all and the rest drawn
    with replacement."""
    if len(available) >= num_points:
        return rng.choice(available, num_points, replace=False)
    return np.concatenate([rng.permutation(available), rng.choice(available, num_points - len(available))])


def tile_columns(xyz: np.ndarray, size: float, stride: float) -> list[np.ndarray]:
    """Indices of the vertices of each evaluation column, empty columns left out.

    Column (i, j) spans [x0 + i*stride, x0 + i*stride + size] x [y0 + j*stride, ...] from the scene's minimum
    corner, with ceil((extent - size) / stride) + 1 columns per axis (at least 1), so the last one reaches the
    maximum and every vertex is in at least one column when stride <= size (borders widened by 1 micrometre
    against rounding).
    """
    if not 0 < stride <= size:
        raise PcdError(f"eval_stride {stride} must be in (0, column_size={size}] for the columns to cover the scene")
    lo, hi = xyz[:, :2].min(axis=0), xyz[:, :2].max(axis=0)
    counts = [max(1, math.ceil(max(0.0, float(e) - size) / stride) + 1) for e in hi - lo]
    columns = []
    for i in range(counts[0]):
        for j in range(counts[1]):
            start = lo + np.array([i, j], dtype=np.float64) * stride
            inside = np.flatnonzero(np.all((xyz[:, :2] >= start - _EDGE) & (xyz[:, :2] <= start + size + _EDGE),
                                           axis=1))
            if inside.size:
                columns.append(inside)
    return columns
