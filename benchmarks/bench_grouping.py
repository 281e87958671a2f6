"""Speed of the backbone's pure-torch grouping (FPS + kNN) against compiled CPU baselines, measured in one run.

Baselines: open3d's C++ `farthest_point_down_sample` (one cloud at a time) for FPS, scipy's cKDTree for kNN.
Cases: pre-training frames (4,096 points -> 64 centres x 32 neighbours, batch 32) and detection scenes
(40,000 points -> 2,048 centres x 32, batch 2).

    .venv/bin/python benchmarks/bench_grouping.py [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from pcd.trainer.point_ops import farthest_point_sample, gather_points, knn

CASES = [("frames", 32, 4096, 64, 32), ("scenes", 2, 40_000, 2048, 32)]


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def timing_setup(description: str, repeats: int) -> tuple[argparse.Namespace, torch.device, Callable[[], None]]:
    """The micro-benchmarks' options (--threads, --device, --repeats), applied: (args, device, sync)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return args, device, torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def main() -> None:
    args, device, sync = timing_setup(__doc__.splitlines()[0], repeats=3)
    import open3d as o3d
    from scipy.spatial import cKDTree

    print(f"torch {torch.__version__}, device {device}, {args.threads} intra-op thread(s), best of {args.repeats}")
    for name, batch, points, centres, k in CASES:
        xyz = torch.rand(batch, points, 3, generator=torch.Generator().manual_seed(0))
        xyz_dev = xyz.to(device)
        ours_fps = best_time(lambda: farthest_point_sample(xyz_dev, centres), args.repeats, sync)
        clouds = [o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c.double().numpy())) for c in xyz]
        o3d_fps = best_time(lambda: [c.farthest_point_down_sample(centres) for c in clouds], args.repeats, sync)
        query = gather_points(xyz_dev, farthest_point_sample(xyz_dev, centres))
        ours_knn = best_time(lambda: knn(query, xyz_dev, k), args.repeats, sync)
        query_np, xyz_np = query.cpu().numpy(), xyz.numpy()
        scipy_knn = best_time(lambda: [cKDTree(p).query(q, k) for p, q in zip(xyz_np, query_np)], args.repeats, sync)
        print(f"{name:7s} B={batch} N={points} G={centres} k={k}:  FPS {ours_fps * 1e3:8.1f} ms (open3d "
              f"{o3d_fps * 1e3:8.1f} ms, ratio {ours_fps / o3d_fps:5.2f})   kNN {ours_knn * 1e3:8.1f} ms "
              f"(scipy cKDTree {scipy_knn * 1e3:8.1f} ms incl. build, ratio {ours_knn / scipy_knn:5.2f})")


if __name__ == "__main__":
    main()
