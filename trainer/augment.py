"""Data augmentations of the fine-tunes, written once (numpy, one sample at a time, the caller's generator).

Each takes points (N,3) and a `np.random.Generator` owned by the caller (seeded per sample, so a run is
reproducible whatever the number of loader workers), and returns new float32 points; parameters are arguments
with the upstream recipes' values as defaults.
"""

from __future__ import annotations

import numpy as np


def scale_and_translate(points: np.ndarray, rng: np.random.Generator, *, scale_low: float = 2.0 / 3.0,
                        scale_high: float = 1.5, translate_range: float = 0.2) -> np.ndarray:
    """Point-MAE's `PointcloudScaleAndTranslate` (classification): each axis scaled by its own U(scale_low,
    scale_high), then the cloud shifted by U(-translate_range, translate_range) per axis. Draw order as
    upstream: the three scales, then the three shifts."""
    scale = rng.uniform(scale_low, scale_high, size=3)
    shift = rng.uniform(-translate_range, translate_range, size=3)
    return (np.asarray(points, dtype=np.float32) * scale + shift).astype(np.float32)


def scale_and_shift(points: np.ndarray, rng: np.random.Generator, *, scale_low: float = 0.8,
                    scale_high: float = 1.25, shift_range: float = 0.1) -> np.ndarray:
    """The part-segmentation recipe (Point-MAE `segmentation/main.py` with PointNet++'s `provider`): one
    isotropic scale U(scale_low, scale_high) for the whole cloud (`random_scale_point_cloud`), then a shift
    U(-shift_range, shift_range) per axis (`shift_point_cloud`), drawn in that order."""
    scale = rng.uniform(scale_low, scale_high)
    shift = rng.uniform(-shift_range, shift_range, size=3)
    return (np.asarray(points, dtype=np.float32) * scale + shift).astype(np.float32)
