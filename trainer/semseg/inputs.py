"""What the segmenter sees: crops of prepared scenes in the frame of the weights. Shared by fine-tune, evaluation
and prediction.

A crop's sampled points decide its frame (`CropFrame`: the weights' up axis, then centroid and unit sphere of
the sample, as pre-training normalises each cloud); the vertices scored with that crop go through the same map,
so input points and queries stay in one coordinate system.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pcd.trainer.augment import flip_and_rotate_z
from pcd.trainer.frames import Frame, rotate_up
from pcd.trainer.normalize import normalize_points
from pcd.trainer.semseg.data import Crop, SemSegScenes, choose, training_crop


@dataclass(frozen=True)
class CropFrame:
    """The map from scene coordinates (z up, metres) of one crop into the weights' frame."""

    frame: Frame
    center: np.ndarray  # (1,3) in the rotated frame
    scale: float

    @classmethod
    def of(cls, sample_xyz: np.ndarray, frame: Frame) -> "CropFrame":
        rotated = rotate_up(np.ascontiguousarray(sample_xyz, dtype=np.float32), "z", frame.up)
        if not frame.unit_sphere:
            return cls(frame, np.zeros((1, 3), np.float32), 1.0)
        _, center, scale = normalize_points(np.ascontiguousarray(rotated))
        return cls(frame, center.reshape(1, 3), float(scale.reshape(())))

    def apply(self, xyz: np.ndarray) -> np.ndarray:
        rotated = rotate_up(np.ascontiguousarray(xyz, dtype=np.float32), "z", self.frame.up)
        return np.ascontiguousarray((rotated - self.center) / self.scale, dtype=np.float32)


class TrainingSamples(torch.utils.data.Dataset):
    """`samples_per_scene` crops per scene and epoch, `num_points` each, flipped and rotated about z, in the frame.

    Randomness comes from numpy's global generator (seeded per loader worker and restored on resume by the
    runtime), as the other fine-tunes."""

    def __init__(self, scenes: SemSegScenes, frame: Frame, num_points: int, crop: Crop, column_size: float,
                 samples_per_scene: int, augment: bool, rotate_degrees: float):
        self.scenes, self.frame, self.num_points = scenes, frame, num_points
        self.crop, self.column_size, self.samples_per_scene = crop, column_size, samples_per_scene
        self.augment, self.rotate_degrees = augment, rotate_degrees

    def __len__(self) -> int:
        return len(self.scenes) * self.samples_per_scene

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        index = i % len(self.scenes)
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4))
        xyz, labels = self.scenes.xyz(index), self.scenes.labels(index)
        chosen = choose(training_crop(xyz, labels, self.crop, self.column_size, rng), self.num_points, rng)
        sample = xyz[chosen]
        if self.augment:
            sample = flip_and_rotate_z(sample, rng, max_degrees=self.rotate_degrees)
        return {"points": CropFrame.of(sample, self.frame).apply(sample), "labels": labels[chosen]}


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}
