"""The one normalisation of the backbone's input, shared by pre-training and every fine-tune.

A backbone only transfers if a fine-tune feeds it points in the frame and scale it was pre-trained on.
So the recipe lives here once, has a name and a version (`NORMALIZATION`, saved with exported weights),
and every consumer calls these functions instead of re-implementing them:

1. `camera_to_gravity`: rotate camera-frame points into the scan's gravity-aligned frame (z up), the frame
   ScanNet's reconstructions and the detection scenes use.
2. `normalize_points`: centre on the centroid and scale to the unit sphere (largest radius 1), as
   Point-MAE's `pc_norm`. Detection keeps `center`/`scale` to map predicted boxes back to metres.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

NORMALIZATION = {"name": "gravity-unit-sphere", "version": 1}

Array = TypeVar("Array", np.ndarray, Tensor)

# A cloud whose points all coincide has radius 0; dividing by this floor keeps it finite (all zeros).
_MIN_SCALE = 1e-8


def camera_to_gravity(points_cam: Array, pose: Array) -> Array:
    """Rotate camera-frame points into the scan's z-up frame with the rotation of the camera-to-world pose.

    ScanNet poses map camera coordinates to the scan's world frame, whose z axis points up. Only the
    rotation is applied: `normalize_points` subtracts the centroid next, which removes any translation,
    so adding the pose's translation would change nothing but the float rounding.

    Accepts numpy or torch: points (N,3) with pose (4,4), or torch batches (B,N,3) with (B,4,4).
    """
    if points_cam.shape[-1] != 3 or pose.shape[-2:] != (4, 4):
        raise ValueError(f"expected points (...,N,3) and pose (...,4,4), got {tuple(points_cam.shape)} "
                         f"and {tuple(pose.shape)}")
    rotation = pose[..., :3, :3]
    if isinstance(points_cam, np.ndarray):
        return (points_cam @ np.swapaxes(rotation, -1, -2)).astype(points_cam.dtype, copy=False)
    return points_cam @ rotation.to(points_cam.dtype).transpose(-1, -2)


def normalize_points(xyz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre z-up points on their centroid and scale them into the unit sphere.

    xyz (..., N, 3) -> (normalized, center (..., 1, 3), scale (..., 1, 1)) with
    normalized = (xyz - center) / scale and the farthest point at radius exactly 1.
    Numpy input gives numpy output.
    """
    if isinstance(xyz, np.ndarray):
        normalized, center, scale = normalize_points(torch.from_numpy(xyz))
        return normalized.numpy(), center.numpy(), scale.numpy()
    if xyz.ndim < 2 or xyz.shape[-1] != 3 or xyz.shape[-2] == 0:
        raise ValueError(f"expected points (..., N>0, 3), got {tuple(xyz.shape)}")
    center = xyz.mean(dim=-2, keepdim=True)
    centred = xyz - center
    scale = centred.norm(dim=-1, keepdim=True).amax(dim=-2, keepdim=True).clamp_min(_MIN_SCALE)
    return centred / scale, center, scale


def denormalize_points(xyz_n: Tensor, center: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `normalize_points`: back to the z-up frame, in metres."""
    return xyz_n * scale + center
