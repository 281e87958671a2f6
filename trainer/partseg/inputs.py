"""What the part segmenter sees: ShapeNetPart shapes in the frame of the weights, sampled as Point-MAE samples
them for training, and for evaluation a seeded sample that the model reads plus every original point as a query.
Shared by the fine-tune and the evaluation.

Each shape is put into the weights' frame (`pcd.trainer.frames.to_frame`: up axis, then centroid and unit sphere
over ALL its points, as Point-MAE's `pc_normalize` before sampling), then sampled, then (training) augmented.
"""

from __future__ import annotations

import numpy as np
import torch

from pcd.trainer.augment import scale_and_shift
from pcd.trainer.frames import Frame, to_frame
from pcd.trainer.partseg.data import ShapeNetPart, choose_points


def one_hot(category: int, num_categories: int) -> np.ndarray:
    out = np.zeros(num_categories, dtype=np.float32)
    out[int(category)] = 1.0
    return out


class TrainingSamples(torch.utils.data.Dataset):
    """`num_points` drawn with replacement (Point-MAE), scaled and shifted; randomness from numpy's global
    generator (seeded per loader worker and restored on resume by the runtime)."""

    def __init__(self, dataset: ShapeNetPart, frame: Frame, num_points: int, augment: bool):
        self.dataset, self.frame, self.num_points, self.augment = dataset, frame, num_points, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = self.dataset[i]
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4))
        points = to_frame(item["points"], self.dataset.up_axis, self.frame)
        chosen = choose_points(len(points), self.num_points, rng, replace=True)
        sample = points[chosen]
        if self.augment:
            sample = scale_and_shift(sample, rng)
        return {"points": np.ascontiguousarray(sample, dtype=np.float32), "seg": item["seg"][chosen],
                "category": one_hot(item["category"], len(self.dataset.category_names))}


class EvaluationShape(torch.utils.data.Dataset):
    """Item i: the model's input sample of shape i drawn with the generator (seed, i), and the query points.

    protocol "all-points": `num_points` distinct points (with replacement only when the shape has fewer) are the
    input and EVERY original point is a query, labelled with its own part; "point-mae": `num_points` drawn with
    replacement are both input and queries (Point-MAE scores that multiset)."""

    def __init__(self, dataset: ShapeNetPart, frame: Frame, num_points: int, seed: int, protocol: str):
        self.dataset, self.frame, self.num_points = dataset, frame, num_points
        self.seed, self.protocol = seed, protocol

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = self.dataset[i]
        rng = np.random.default_rng([self.seed, i])
        points = to_frame(item["points"], self.dataset.up_axis, self.frame)
        chosen = choose_points(len(points), self.num_points, rng, replace=self.protocol == "point-mae")
        if self.protocol == "point-mae":
            query, seg = points[chosen], item["seg"][chosen]
        else:
            query, seg = points, item["seg"]
        return {"points": np.ascontiguousarray(points[chosen]), "query": np.ascontiguousarray(query), "seg": seg,
                "category": np.int64(item["category"]), "index": np.int64(i)}


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack fixed-size arrays into batch tensors (training samples)."""
    return {key: torch.from_numpy(np.stack([np.asarray(item[key]) for item in items])) for key in items[0]}


def collate_shapes(items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Evaluation items stay a list: their numbers of query points differ."""
    return items
