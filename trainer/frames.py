"""Frames of reference travel with the weights: the one function that puts data into the frame of a backbone.

A backbone transfers only if a fine-tune feeds it points the way it was pre-trained: the same up axis and the
same normalisation. That is a property of the weights, not of the dataset, so it is looked up from the weights:

- a pcd export records its normalisation (`backbone.json` -> `normalization.name`): "gravity-unit-sphere",
  i.e. z up (ScanNet's gravity axis), centred on the centroid and scaled into the unit sphere
  (`pcd.trainer.normalize`);
- a Point-MAE checkpoint (no pcd metadata) means "point-mae": y up (ShapeNet's axis), unit sphere
  (Point-MAE's `pc_normalize`);
- from scratch, pcd's own frame.

Datasets say only which axis is up in their files (ModelNet40, ShapeNetPart and ScanObjectNN: y; ScanNet: z).
`to_frame` rotates the file's up axis onto the weights' up axis (a proper rotation, never a mirror) and then
normalises as the weights expect. Fine-tunes call it on every sample, train and test, and record the frame's name
in their config (so in every checkpoint); evaluation reads it back from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, TypeVar

import numpy as np
import torch
from torch import Tensor

from pcd.trainer.normalize import NORMALIZATION, normalize_points

Axis = Literal["y", "z"]
Array = TypeVar("Array", np.ndarray, Tensor)


@dataclass(frozen=True)
class Frame:
    """How a backbone's input looks: which axis is up and whether each cloud is centred and unit-sphere scaled."""

    name: str
    up: Axis
    unit_sphere: bool


PCD_FRAME = Frame(NORMALIZATION["name"], up="z", unit_sphere=True)
POINT_MAE_FRAME = Frame("point-mae", up="y", unit_sphere=True)
FRAMES: dict[str, Frame] = {frame.name: frame for frame in (PCD_FRAME, POINT_MAE_FRAME)}


def frame_named(name: str) -> Frame:
    """The frame called `name` (as recorded in a run's config or an export); KeyError names the known ones."""
    if name not in FRAMES:
        raise KeyError(f"unknown frame '{name}' (known: {', '.join(FRAMES)})")
    return FRAMES[name]


def frame_of_weights(metadata: Optional[Mapping[str, Any]], has_init: bool) -> Frame:
    """The frame of `--init` weights: a pcd export's recorded normalisation, Point-MAE's for a foreign checkpoint,
    pcd's own when training from scratch."""
    if not has_init:
        return PCD_FRAME
    if metadata is None:
        return POINT_MAE_FRAME
    name = (metadata.get("normalization") or {}).get("name")
    return frame_named(str(name))


def rotate_up(xyz: Array, source_up: Axis, target_up: Axis) -> Array:
    """Rotate (..., 3) points so that the `source_up` axis becomes `target_up`: +90 degrees about x for y -> z,
    i.e. (x, y, z) -> (x, -z, y); the inverse for z -> y. Identity when the axes agree. Numpy or torch."""
    if source_up == target_up:
        return xyz
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    columns = (x, -z, y) if (source_up, target_up) == ("y", "z") else (x, z, -y)
    if isinstance(xyz, np.ndarray):
        return np.stack(columns, axis=-1).astype(xyz.dtype, copy=False)
    return torch.stack(columns, dim=-1)


def to_frame(points: np.ndarray, data_up: Axis, frame: Frame) -> np.ndarray:
    """Points (N, 3+C) as stored in a dataset whose up axis is `data_up` -> float32 points in `frame`.

    The first three columns are xyz; three more (normals) are rotated with them; any others pass through. With a
    unit-sphere frame the cloud is centred on its centroid and scaled so its farthest point is at radius 1
    (`pcd.trainer.normalize.normalize_points`, the same code pre-training uses).
    """
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] < 3 or len(points) == 0:
        raise ValueError(f"expected points (N>0, 3+), got {points.shape}")
    xyz = rotate_up(points[:, :3], data_up, frame.up)
    if frame.unit_sphere:
        xyz = normalize_points(np.ascontiguousarray(xyz))[0]
    columns = [xyz]
    if points.shape[1] >= 6:
        columns.append(rotate_up(points[:, 3:6], data_up, frame.up))
        columns.append(points[:, 6:])
    else:
        columns.append(points[:, 3:])
    return np.ascontiguousarray(np.concatenate(columns, axis=1), dtype=np.float32)
