"""Speed of the object datasets' point selection: pcd's ModelNet cache step (10,000 -> 8,192 exact FPS per shape,
fpsample's compiled vanilla FPS) and Point-MAE's training sample (FPS 8,192 -> 1,200 from a random start, then a
random 1,024), against the numpy FPS loop of Point-MAE's `ModelNetDataset.py` as the baseline, in one run.

    .venv/bin/python benchmarks/bench_object_data.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from pcd.trainer.classification.data import fps_indices, training_points


def numpy_fps(xyz: np.ndarray, count: int) -> np.ndarray:
    """The baseline: one vectorised numpy step per picked point, as Point-MAE's `farthest_point_sample`."""
    nearest = np.full(len(xyz), 1e10)
    picks = np.zeros(count, dtype=np.int64)
    farthest = 0
    for i in range(count):
        picks[i] = farthest
        nearest = np.minimum(nearest, ((xyz - xyz[farthest]) ** 2).sum(axis=-1))
        farthest = int(nearest.argmax())
    return picks


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = rng.normal(size=(10_000, 3)).astype(np.float32)
    cached = shape[fps_indices(shape, 8192)]
    cases = [
        ("cache: FPS 10,000 -> 8,192", lambda: fps_indices(shape, 8192), lambda: numpy_fps(shape, 8192)),
        ("training sample: FPS 8,192 -> 1,200, random 1,024", lambda: training_points(cached, 1024, rng),
         lambda: numpy_fps(cached, 1200)),
    ]
    print("| case | pcd (fpsample) | numpy FPS loop | ratio |")
    print("| --- | --- | --- | --- |")
    for name, ours, baseline in cases:
        a, b = best_time(ours, args.repeats), best_time(baseline, args.repeats)
        print(f"| {name} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
