"""ScanNet's 20 benchmark classes and the one ignore value, used everywhere in pcd's semantic segmentation.

The benchmark scores the nyu40 ids `VALID_CLASS_IDS` (ScanNet's `evaluate_semantic_label.py`); class index i of
the model is position i in that list. Every other nyu40 id (0 = unannotated, and the 20 ids of nyu40 that are
not benchmark classes) maps to `IGNORE_INDEX` = -100: torch's `cross_entropy` ignores it by default (it is also
3DETR's `IGNORE_LABEL` and SparseConvNet's remapper value), the metrics skip it, and no prediction ever has it.
"""

from __future__ import annotations

import numpy as np

VALID_CLASS_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
CLASS_NAMES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture")
NUM_CLASSES = len(VALID_CLASS_IDS)
IGNORE_INDEX = -100
MAX_NYU40_ID = 40

_TO_TRAIN = np.full(MAX_NYU40_ID + 1, IGNORE_INDEX, dtype=np.int64)
_TO_TRAIN[list(VALID_CLASS_IDS)] = np.arange(NUM_CLASSES)


def train_ids(nyu40: np.ndarray) -> np.ndarray:
    """nyu40 ids (any integer dtype) -> class indices 0..19, `IGNORE_INDEX` for everything else (also ids > 40)."""
    nyu40 = np.asarray(nyu40).astype(np.int64)
    inside = (nyu40 >= 0) & (nyu40 <= MAX_NYU40_ID)
    return np.where(inside, _TO_TRAIN[np.clip(nyu40, 0, MAX_NYU40_ID)], IGNORE_INDEX)


def nyu40_ids(train: np.ndarray) -> np.ndarray:
    """Class indices 0..19 -> their nyu40 ids (what the benchmark's prediction files hold)."""
    train = np.asarray(train).astype(np.int64)
    if train.size and (train.min() < 0 or train.max() >= NUM_CLASSES):
        raise ValueError(f"class indices must be in 0..{NUM_CLASSES - 1}")
    return np.asarray(VALID_CLASS_IDS, dtype=np.int64)[train]
