"""Iterations/s of detection fine-tuning: one optimizer step of the 3DETR detector on the backbone.

Measures the training step (forward, Hungarian matching and set loss over every decoder layer, backward,
gradient clipping, AdamW) on batches of scene-like clouds with boxes, and, in the same run, the forward pass
alone as a baseline (train/forward ratio). Data loading is excluded: it runs in DataLoader workers.

    .venv/bin/python benchmarks/bench_detection.py --preset tiny --device cpu --threads 2
    .venv/bin/python benchmarks/bench_detection.py --preset paper --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pcd.pipeline.config import build_config
from pcd.trainer.detection.boxes import OBJ_CLASS_IDS
from pcd.trainer.detection.criterion import SetCriterion
from pcd.trainer.detection.dataset import make_targets
from pcd.trainer.detection.finetune import Config, collate
from pcd.trainer.detection.model import build_detector


def scene(rng: np.random.Generator, num_points: int, num_boxes: int) -> dict[str, np.ndarray]:
    """A 6 x 5 m room: floor points plus points on the surfaces of `num_boxes` random boxes."""
    centers = np.column_stack([rng.uniform(0.5, 5.5, num_boxes), rng.uniform(0.5, 4.5, num_boxes), np.zeros(num_boxes)])
    sizes = rng.uniform(0.3, 1.5, (num_boxes, 3))
    centers[:, 2] = sizes[:, 2] / 2
    per_box = num_points // (2 * num_boxes)
    parts = [np.column_stack([rng.uniform(0, 6, num_points - per_box * num_boxes),
                              rng.uniform(0, 5, num_points - per_box * num_boxes),
                              np.zeros(num_points - per_box * num_boxes)])]
    for c, s in zip(centers, sizes):
        parts.append(c + rng.uniform(-0.5, 0.5, (per_box, 3)) * s)
    labels = rng.choice(OBJ_CLASS_IDS, num_boxes)
    boxes = np.column_stack([centers, sizes, labels])
    return make_targets(np.concatenate(parts).astype(np.float32), boxes, 0)


def timed(fn, steps: int, device: torch.device) -> float:
    """Steps per second of `fn` (synchronising CUDA so the clock sees the work)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="finetune-detection preset ('paper' = the defaults)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=12, help="ground-truth boxes per scene")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(Config, "finetune-detection", None if args.preset == "paper" else args.preset)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = collate([scene(rng, cfg.num_points, args.boxes) for _ in range(cfg.optim.batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}
    model = build_detector(cfg.model).to(device)
    criterion = SetCriterion(18, cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def train_step() -> None:
        with autocast():
            layers = model(batch["point_clouds"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"])
        loss, _ = criterion([{k: v.float() for k, v in out.items()} for out in layers], batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()

    @torch.no_grad()
    def forward() -> None:
        with autocast():
            model(batch["point_clouds"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"])

    model.train()
    timed(train_step, args.warmup, device)
    train_rate = timed(train_step, args.steps, device)
    model.eval()
    timed(forward, args.warmup, device)
    forward_rate = timed(forward, args.steps, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {params:,} parameters, batch {cfg.optim.batch_size} x {cfg.num_points} points, "
          f"{cfg.model.backbone.num_groups} centres, {cfg.model.num_queries} queries, device {device}"
          f"{' bf16' if use_bf16 else ' fp32'}, threads {torch.get_num_threads()}")
    print(f"training: {train_rate:.2f} it/s ({train_rate * cfg.optim.batch_size:.1f} scenes/s)")
    print(f"forward only (baseline): {forward_rate:.2f} it/s; training step costs {forward_rate / train_rate:.2f}x "
          f"a forward pass")


if __name__ == "__main__":
    main()
