"""What the classifier sees: shapes from the readers, put into the frame of the weights, then sampled as
Point-MAE samples them (trainer/classification/data.py). Shared by the fine-tune and the evaluation.

Every shape goes through `pcd.trainer.frames.to_frame` first (the dataset's up axis onto the weights' up axis,
then the weights' normalisation: centroid and unit sphere), then point selection, then augmentation, so the
augmented cloud is scaled around the normalised shape exactly as in Point-MAE (which normalises in the loader
and augments on the batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pcd.pipeline.errors import PcdError
from pcd.trainer.augment import scale_and_translate
from pcd.trainer.classification.data import (ClassificationDataset, eval_points, open_classification,
                                             training_points, voting_view)
from pcd.trainer.frames import Frame, to_frame


def open_split(data_dir: Path, split: str, variant: str, cache_dir: Optional[Path], cache_points: int,
               show_progress: bool = True) -> ClassificationDataset:
    """The reader of `split` for whatever layout `data_dir` holds (ModelNet40 txt builds its FPS cache once)."""
    options = {"cache_dir": cache_dir, "cache_points": cache_points, "show_progress": show_progress}
    dataset = open_classification(Path(data_dir), split, variant=variant,  # type: ignore[arg-type]
                                  **({} if not _is_modelnet_txt(data_dir) else options))
    if len(dataset) == 0:
        raise PcdError(f"{data_dir}: the {split} split has no shapes")
    return dataset


def _is_modelnet_txt(data_dir: Path) -> bool:
    return (Path(data_dir) / "modelnet40_shape_names.txt").is_file()


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `fraction` of each class's shapes (rounded, at least one for a class
    with two or more shapes) held out, chosen by a generator seeded with `seed`. Sorted indices."""
    if not 0.0 <= fraction < 1.0:
        raise PcdError(f"val_fraction must be in [0, 1), not {fraction}")
    labels = np.asarray(labels)
    if fraction == 0.0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        held.append(rng.permutation(members)[:count])
    val = np.sort(np.concatenate(held)) if held else np.arange(0)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class TrainingSamples(torch.utils.data.Dataset):
    """Training samples: frame conversion, Point-MAE's FPS-then-random selection, scale and translate.

    Randomness comes from numpy's global generator (seeded per loader worker and restored on resume by the
    runtime), so an epoch repeats exactly."""

    def __init__(self, dataset: ClassificationDataset, indices: np.ndarray, frame: Frame, num_points: int,
                 augment: bool):
        self.dataset, self.indices, self.frame = dataset, np.asarray(indices), frame
        self.num_points, self.augment = num_points, augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = self.dataset[int(self.indices[i])]
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4))
        points = training_points(to_frame(item["points"], self.dataset.up_axis, self.frame), self.num_points, rng)
        if self.augment:
            points = scale_and_translate(points, rng)
        return {"points": np.ascontiguousarray(points, dtype=np.float32), "label": item["label"]}


class EvaluationSamples(torch.utils.data.Dataset):
    """Evaluation samples without voting: frame conversion, then FPS to `num_points` from the first point
    (deterministic, as Point-MAE's `misc.fps`)."""

    def __init__(self, dataset: ClassificationDataset, indices: np.ndarray, frame: Frame, num_points: int):
        self.dataset, self.indices, self.frame, self.num_points = dataset, np.asarray(indices), frame, num_points

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = self.dataset[int(self.indices[i])]
        points = eval_points(to_frame(item["points"], self.dataset.up_axis, self.frame), self.num_points)
        return {"points": np.ascontiguousarray(points, dtype=np.float32), "label": item["label"],
                "index": np.int64(i)}


class VotingSamples(torch.utils.data.Dataset):
    """Voting views: item i is every view of shape i, (views, num_points, 3), deterministic in (seed, i, view).

    ModelNet: a random `num_points` of the FPS-`75/64 x num_points` points, scaled and translated; ScanObjectNN
    (all 2,048 points used): the points reordered, scaled and translated (augmentation-only views)."""

    def __init__(self, dataset: ClassificationDataset, frame: Frame, num_points: int, views: int, seed: int):
        self.dataset, self.frame, self.num_points, self.views, self.seed = dataset, frame, num_points, views, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = self.dataset[i]
        points = to_frame(item["points"], self.dataset.up_axis, self.frame)
        views = np.stack([voting_view(points, self.num_points, seed=self.seed, sample=i, view=v)
                          for v in range(self.views)])
        return {"points": views.astype(np.float32), "label": item["label"], "index": np.int64(i)}


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack the samples' arrays into batch tensors."""
    return {key: torch.from_numpy(np.stack([np.asarray(item[key]) for item in items])) for key in items[0]}
