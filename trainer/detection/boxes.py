"""ScanNet detection classes and axis-aligned box geometry shared by the data, the loss and the metric.

Boxes are axis-aligned in the ScanNet axis-aligned (z-up) frame, as 3DETR predicts them on ScanNet (its
angle is always 0 there). A box is either (centre, size) or its (min corner, max corner); for such boxes the
exact 3D IoU is the product of per-axis overlaps, which equals 3DETR's corner-polygon IoU.
"""

from __future__ import annotations

import numpy as np
import torch

# ScannetDatasetConfig (3DETR/VoteNet): class index -> nyu40 id and name. nyu40 id 39 is "otherfurniture"
# in the ScanNet benchmark; VoteNet and 3DETR call it garbagebin, kept here so tables read the same.
OBJ_CLASS_IDS: tuple[int, ...] = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
CLASS_NAMES: tuple[str, ...] = (
    "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "desk", "curtain", "refrigerator", "showercurtrain", "toilet", "sink", "bathtub", "garbagebin")
NUM_CLASSES = len(OBJ_CLASS_IDS)
NYU40_TO_CLASS: dict[int, int] = {nyu: i for i, nyu in enumerate(OBJ_CLASS_IDS)}
MAX_NUM_OBJ = 64


def aabb_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact IoU of axis-aligned boxes given as (..., 6) min/max corners (broadcasting)."""
    lo = np.maximum(a[..., :3], b[..., :3])
    hi = np.minimum(a[..., 3:], b[..., 3:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    vol_a = np.prod(np.clip(a[..., 3:] - a[..., :3], 0, None), axis=-1)
    vol_b = np.prod(np.clip(b[..., 3:] - b[..., :3], 0, None), axis=-1)
    union = vol_a + vol_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def rotate_aligned_boxes(boxes: np.ndarray, rot_mat: np.ndarray) -> np.ndarray:
    """Rotate (K, >=6) centre+size boxes about z and re-fit them axis-aligned (3DETR `rotate_aligned_boxes`)."""
    centers, lengths = boxes[:, 0:3], boxes[:, 3:6]
    new_centers = centers @ rot_mat.T
    dx, dy = lengths[:, 0] / 2.0, lengths[:, 1] / 2.0
    corners = np.zeros((len(boxes), 4, 3))
    for i, (sx, sy) in enumerate([(-1, -1), (1, -1), (1, 1), (-1, 1)]):
        corners[:, i, 0] = sx * dx
        corners[:, i, 1] = sy * dy
    corners = corners @ rot_mat.T
    new_lengths = np.stack([2.0 * corners[:, :, 0].max(1), 2.0 * corners[:, :, 1].max(1), lengths[:, 2]], axis=1)
    out = boxes.copy()
    out[:, 0:3] = new_centers
    out[:, 3:6] = new_lengths
    return out


def rotz(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def generalized_iou_minmax(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU of axis-aligned boxes: pred (B,Q,6), gt (B,G,6) min/max -> (B,Q,G).

    Differentiable in both arguments (3DETR's `generalized_box3d_iou` for unrotated boxes).
    """
    p = pred[:, :, None, :]
    g = gt[:, None, :, :]
    lo = torch.maximum(p[..., :3], g[..., :3])
    hi = torch.minimum(p[..., 3:], g[..., 3:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    vol_p = (p[..., 3:] - p[..., :3]).clamp(min=0).prod(-1)
    vol_g = (g[..., 3:] - g[..., :3]).clamp(min=0).prod(-1)
    union = vol_p + vol_g - inter
    iou = inter / union.clamp(min=1e-8)
    hull = (torch.maximum(p[..., 3:], g[..., 3:]) - torch.minimum(p[..., :3], g[..., :3])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-8)
