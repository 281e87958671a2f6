"""Share of a detection training step spent on the backbone's grouping (FPS 40,000 -> 2,048 + kNN 32), in the
model (on the step's critical path) against in DataLoader workers (`finetune.Config.group_in_loader`, the default).

One run measures, at the paper's sizes (40,000 points, 2,048 centres x 32 neighbours, 12 x 384 backbone, 256
queries): the in-model grouping of a batch (`farthest_point_sample` + `knn`, what the step runs when no groups are
given), the loader's grouping of one scene (`detection.dataset.grouping`: fpsample's compiled FPS + the same kNN),
and training steps fed by a DataLoader whose workers group the scenes, timing separately how long the main process
waits for each batch and how long the step computes.

    .venv/bin/python benchmarks/bench_detection_input.py --batch 2 --steps 3 --workers 1 --threads 1
    .venv/bin/python benchmarks/bench_detection_input.py --batch 8 --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bench_detection import scene
from pcd.pipeline.config import build_config
from pcd.trainer.detection.criterion import SetCriterion
from pcd.trainer.detection.dataset import grouping
from pcd.trainer.detection.finetune import Config, collate
from pcd.trainer.detection.model import build_detector
from pcd.trainer.normalize import normalize_points
from pcd.trainer.point_ops import farthest_point_sample, gather_points, knn


class Scenes(torch.utils.data.Dataset):
    """Scene-like clouds with boxes, grouped in the worker as the detection dataset does."""

    def __init__(self, count: int, num_points: int, groups: tuple[int, int]):
        self.count, self.num_points, self.groups = count, num_points, groups

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        sample = scene(np.random.default_rng(i), self.num_points, 12)
        sample.update(grouping(sample["point_clouds"], *self.groups))
        return sample


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = build_config(Config, "finetune-detection", None)  # the paper's sizes
    groups = (cfg.model.backbone.num_groups, cfg.model.backbone.group_size)
    use_bf16 = device.type == "cuda"

    # 1. the loader's grouping of one scene (what each worker does per sample)
    clouds = [scene(np.random.default_rng(100 + i), cfg.num_points, 12)["point_clouds"] for i in range(args.batch)]
    per_scene = []
    for cloud in clouds:
        start = time.perf_counter()
        grouping(cloud, *groups)
        per_scene.append(time.perf_counter() - start)

    # 2. the in-model grouping of one batch (what the step runs without loader groups)
    xyz = normalize_points(torch.from_numpy(np.stack(clouds)).to(device))[0]
    in_model = []
    for _ in range(2):
        start = synced(device)
        centre_idx = farthest_point_sample(xyz, groups[0])
        knn(gather_points(xyz, centre_idx), xyz, groups[1])
        in_model.append(synced(device) - start)

    # 3. training steps fed by workers that group: time waiting for the batch vs computing the step
    torch.manual_seed(0)
    model = build_detector(cfg.model).to(device).train()
    criterion = SetCriterion(18, cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loader = torch.utils.data.DataLoader(Scenes(args.batch * (args.steps + 1), cfg.num_points, groups),
                                         batch_size=args.batch, num_workers=args.workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    waits, computes = [], []
    batches = iter(loader)
    for step in range(args.steps + 1):
        start = synced(device)
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        got = synced(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            layers = model(batch["point_clouds"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"],
                           (batch["group_center_idx"], batch["group_patch_idx"]))
        loss, _ = criterion([{k: v.float() for k, v in out.items()} for out in layers], batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        done = synced(device)
        if step:  # the first step warms up (and its batch waits for the workers to start)
            waits.append(got - start)
            computes.append(done - got)

    step = statistics.mean(computes)
    wait = statistics.mean(waits)
    grouped_in_model = min(in_model)
    print(f"device {device}{' bf16' if use_bf16 else ' fp32'}, main threads {torch.get_num_threads()}, "
          f"{args.workers} workers, batch {args.batch} x {cfg.num_points:,} points -> {groups[0]:,} centres x "
          f"{groups[1]}, load average {os.getloadavg()[0]:.1f}")
    print(f"loader grouping per scene (fpsample FPS + kNN): median {statistics.median(per_scene):.3f} s; "
          f"per batch in one worker {sum(per_scene):.2f} s")
    print(f"in-model grouping per batch (torch FPS + kNN): {grouped_in_model:.3f} s")
    print(f"training step with loader groups: compute {step:.2f} s, waiting for the batch {wait:.3f} s "
          f"({100 * wait / step:.1f}% of the step)")
    print(f"grouping in the model instead: {100 * grouped_in_model / (step + grouped_in_model):.1f}% of the step "
          f"(the step would take {step + grouped_in_model:.2f} s)")


if __name__ == "__main__":
    main()
