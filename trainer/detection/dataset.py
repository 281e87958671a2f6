"""ScanNet detection scenes as 3DETR's `ScannetDetectionDataset` serves them.

Reads `<scene>_vert.npy` and `<scene>_bbox.npy` (written by `pcd prepare scannet-detection` or by
VoteNet/3DETR's own scripts). Per item: optional RandomCuboid crop, random sampling of `num_points` points
(with replacement only when the scene has fewer), then optional flips in X and Y and a rotation about z
within +-5 degrees with boxes re-fit axis-aligned; box targets padded to 64 with a present mask, centres and
sizes also normalised by the sampled cloud's min/max. Randomness comes from a generator seeded by
(seed, epoch, index), so a resumed run or an evaluation pass with the same seed sees the same samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.console import Console

from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import read_npy
from pcd.pipeline.splits import read_split
from pcd.trainer.backbone import loader_groups
from pcd.trainer.detection.boxes import MAX_NUM_OBJ, NYU40_TO_CLASS, rotate_aligned_boxes, rotz
from pcd.trainer.normalize import normalize_points


def read_scene_list(split: Path, data_dir: Path, console: Console | None = None) -> list[str]:
    """Scenes of a split file that are present in `data_dir` (3DETR drops absent ones too; we say so)."""
    names = read_split(split)
    present = [n for n in names if (data_dir / f"{n}_vert.npy").is_file() and (data_dir / f"{n}_bbox.npy").is_file()]
    if not present:
        raise PcdError(f"{split}: none of its {len(names)} scenes has <scene>_vert.npy and _bbox.npy in {data_dir}")
    if len(present) < len(names) and console is not None:
        console.print(f"[yellow]warning: {len(names) - len(present)} scene(s) of {split} are not in {data_dir}; "
                      "using the others[/yellow]")
    return present


def load_scene(data_dir: Path, scene: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,3) float32 aligned xyz and (K,7) boxes of one prepared scene."""
    vert_path, bbox_path = data_dir / f"{scene}_vert.npy", data_dir / f"{scene}_bbox.npy"
    vertices, boxes = read_npy(vert_path), read_npy(bbox_path)
    if vertices.ndim != 2 or vertices.shape[1] < 3 or len(vertices) == 0:
        raise PcdError(f"{vert_path}: expected an (N,6) vertex array, got shape {vertices.shape}")
    if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 7):
        raise PcdError(f"{bbox_path}: expected a (K,7) box array, got shape {boxes.shape}")
    boxes = boxes.reshape(-1, 7)
    boxes = boxes[np.isin(boxes[:, 6].astype(int), list(NYU40_TO_CLASS))]
    return vertices[:, :3].astype(np.float32), boxes.astype(np.float64)


def random_cuboid(points: np.ndarray, boxes: np.ndarray, min_points: int, rng: np.random.Generator,
                  aspect: float = 0.8, min_crop: float = 0.5, max_crop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """3DETR's RandomCuboid: crop a random box around a random point; keep boxes whose centre stays inside."""
    range_xyz = points.max(0) - points.min(0)
    for _ in range(100):
        crop = min_crop + rng.random(3) * (max_crop - min_crop)
        ratios = [min(crop[i], crop[j]) / max(crop[i], crop[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        if max(ratios) < aspect:
            continue
        center = points[rng.integers(len(points))]
        half = range_xyz * crop / 2.0
        keep = np.all((points >= center - half) & (points <= center + half), axis=1)
        if keep.sum() < min_points:
            continue
        cropped = points[keep]
        if len(boxes):
            lo, hi = cropped.min(0), cropped.max(0)
            inside = np.all((boxes[:, :3] >= lo) & (boxes[:, :3] <= hi), axis=1)
            if not inside.any():
                continue
            boxes = boxes[inside]
        return cropped, boxes
    return points, boxes


class DetectionDataset(torch.utils.data.Dataset):
    """Scenes of one split; `set_epoch` changes the augmentation and sampling draw of every item."""

    def __init__(self, data_dir: Path, scenes: list[str], num_points: int, augment: bool = False,
                 use_random_cuboid: bool = True, cuboid_min_points: int = 30000, seed: int = 0,
                 groups: Optional[tuple[int, int]] = None):
        self.data_dir = Path(data_dir)
        self.scenes = list(scenes)
        self.num_points = num_points
        self.augment = augment
        self.use_random_cuboid = use_random_cuboid
        self.cuboid_min_points = cuboid_min_points
        self.seed = seed
        self.groups = groups  # (num_groups, group_size): also the backbone's grouping of each sample (see sample)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.sample(index, (self.seed, self.epoch, index))

    def sample(self, index: int, key: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Scene `index` drawn with the random generator seeded by `key` (sampling and augmentation)."""
        rng = np.random.default_rng(list(key))
        points, boxes = load_scene(self.data_dir, self.scenes[index])
        if self.augment and self.use_random_cuboid:
            points, boxes = random_cuboid(points, boxes, self.cuboid_min_points, rng)
        choice = rng.choice(len(points), self.num_points, replace=len(points) < self.num_points)
        points = points[choice].copy()
        boxes = boxes[:MAX_NUM_OBJ].copy()
        if self.augment:
            if rng.random() > 0.5:
                points[:, 0] *= -1
                boxes[:, 0] *= -1
            if rng.random() > 0.5:
                points[:, 1] *= -1
                boxes[:, 1] *= -1
            rot = rotz(rng.random() * np.pi / 18 - np.pi / 36)
            points = (points @ rot.T).astype(np.float32)
            boxes = rotate_aligned_boxes(boxes, rot)
        targets = make_targets(points, boxes, index)
        if self.groups is not None:
            targets.update(grouping(targets["point_clouds"], *self.groups))
        return targets


def grouping(points: np.ndarray, num_groups: int, group_size: int) -> dict[str, np.ndarray]:
    """The backbone's FPS centres and kNN patches of one sample, for the detector's `groups` argument: computed here,
    in loader workers, they leave the training step (FPS of 40,000 points is the costliest part of its input). The
    cloud is normalised with the encoder's function first, so the picks are those the encoder would make."""
    normalized = normalize_points(torch.from_numpy(points)[None])[0][0].numpy()
    center_idx, patch_idx = loader_groups(normalized, num_groups, group_size)
    return {"group_center_idx": center_idx, "group_patch_idx": patch_idx}


def make_targets(points: np.ndarray, boxes: np.ndarray, index: int) -> dict[str, np.ndarray]:
    """3DETR's padded box targets for (N,3) points and (K,7) centre/size/nyu40 boxes."""
    count = len(boxes)
    dims_min, dims_max = points.min(0), points.max(0)
    extent = np.maximum(dims_max - dims_min, 1e-6)
    centers = np.zeros((MAX_NUM_OBJ, 3), np.float32)
    sizes = np.zeros((MAX_NUM_OBJ, 3), np.float32)
    labels = np.zeros(MAX_NUM_OBJ, np.int64)
    present = np.zeros(MAX_NUM_OBJ, np.float32)
    centers[:count] = boxes[:, 0:3]
    sizes[:count] = boxes[:, 3:6]
    labels[:count] = [NYU40_TO_CLASS[int(c)] for c in boxes[:, 6]]
    present[:count] = 1
    return {
        "point_clouds": points.astype(np.float32),
        "gt_box_centers": centers,
        "gt_box_centers_normalized": ((centers - dims_min) / extent * present[:, None]).astype(np.float32),
        "gt_box_sizes": sizes,
        "gt_box_sizes_normalized": (sizes / extent).astype(np.float32),
        "gt_box_sem_cls_label": labels,
        "gt_box_present": present,
        "point_cloud_dims_min": dims_min.astype(np.float32),
        "point_cloud_dims_max": dims_max.astype(np.float32),
        "scan_idx": np.int64(index),
    }


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack the samples' arrays into batch tensors (every key of a sample has a fixed shape)."""
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}
