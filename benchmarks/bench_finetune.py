"""Training samples/s of the object fine-tunes (classification, part segmentation) against detection, same run.

For each task, one optimizer step as its fine-tune runs it (forward, loss, backward, gradient clipping at the
preset's norm, AdamW with the preset's parameter groups) on a batch of synthetic samples already in the weights'
frame, at the preset's sizes (paper: ModelNet40 1,024 points / 64 x 32 patches / batch 32; ShapeNetPart 2,048 points /
128 x 32 / batch 16; ScanNet detection 40,000 points / 2,048 centres / batch 8). Data loading is excluded (it runs
in DataLoader workers). The ratio to detection's samples/s is the comparison; absolute numbers depend on the machine.

    .venv/bin/python benchmarks/bench_finetune.py --device cpu --threads 2 --steps 2 --batch 2
    .venv/bin/python benchmarks/bench_finetune.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detection import scene  # noqa: E402  (the detection benchmark's synthetic rooms)

from pcd.pipeline.config import build_config  # noqa: E402
from pcd.trainer.classification.config import Config as ClassificationConfig  # noqa: E402
from pcd.trainer.classification.model import PointMAEClassifier  # noqa: E402
from pcd.trainer.detection.config import Config as DetectionConfig  # noqa: E402
from pcd.trainer.detection.criterion import SetCriterion  # noqa: E402
from pcd.trainer.detection.dataset import collate  # noqa: E402
from pcd.trainer.detection.model import build_detector  # noqa: E402
from pcd.trainer.partseg.config import Config as PartSegConfig  # noqa: E402
from pcd.trainer.partseg.model import PointMAEPartSegmenter  # noqa: E402
from pcd.trainer.runtime import make_optimizer  # noqa: E402


def unit_sphere(batch: int, points: int, gen: torch.Generator) -> torch.Tensor:
    xyz = torch.randn(batch, points, 3, generator=gen)
    return xyz / xyz.norm(dim=-1).amax(dim=1, keepdim=True)[..., None]


def classification(preset: str, batch: int | None, device: torch.device, gen: torch.Generator):
    cfg = build_config(ClassificationConfig, "finetune-classification", None if preset == "paper" else preset)
    size = batch or cfg.optim.batch_size
    model = PointMAEClassifier(cfg.model).to(device)
    points = unit_sphere(size, cfg.num_points, gen).to(device)
    labels = torch.randint(cfg.model.num_classes, (size,), generator=gen).to(device)
    return cfg, size, model, lambda: F.cross_entropy(model(points).float(), labels)


def partseg(preset: str, batch: int | None, device: torch.device, gen: torch.Generator):
    cfg = build_config(PartSegConfig, "finetune-partseg", None if preset == "paper" else preset)
    size = batch or cfg.optim.batch_size
    model = PointMAEPartSegmenter(cfg.model).to(device)
    points = unit_sphere(size, cfg.num_points, gen).to(device)
    category = F.one_hot(torch.randint(16, (size,), generator=gen), 16).float().to(device)
    seg = torch.randint(cfg.model.num_parts, (size, cfg.num_points), generator=gen).to(device)
    return cfg, size, model, lambda: F.cross_entropy(model(points, category).float().transpose(1, 2), seg)


def detection(preset: str, batch: int | None, device: torch.device, gen: torch.Generator):
    cfg = build_config(DetectionConfig, "finetune-detection", None if preset == "paper" else preset)
    size = batch or cfg.optim.batch_size
    rng = np.random.default_rng(0)
    data = {k: v.to(device) for k, v in collate([scene(rng, cfg.num_points, 12) for _ in range(size)]).items()}
    model = build_detector(cfg.model).to(device)
    criterion = SetCriterion(18, cfg.loss)

    def loss() -> torch.Tensor:
        layers = model(data["point_clouds"], data["point_cloud_dims_min"], data["point_cloud_dims_max"])
        return criterion([{k: v.float() for k, v in out.items()} for out in layers], data)[0]
    return cfg, size, model, loss


TASKS: dict[str, Callable] = {"classification": classification, "partseg": partseg, "detection": detection}


def samples_per_second(cfg, size: int, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                       device: torch.device, steps: int, warmup: int) -> float:
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = make_optimizer(groups, cfg.optim)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()

    model.train()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="preset of every task ('paper' = the defaults)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None, help="samples per step for every task (default: presets')")
    parser.add_argument("--tasks", default="classification,partseg,detection")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"preset {args.preset}, device {device}{' bf16' if device.type == 'cuda' else ' fp32'}, "
          f"threads {torch.get_num_threads()}, {args.steps} timed steps after {args.warmup}")
    rates = {}
    for name in args.tasks.split(","):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        cfg, size, model, loss_fn = TASKS[name](args.preset, args.batch, device, gen)
        rates[name] = samples_per_second(cfg, size, model, loss_fn, device, args.steps, args.warmup)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {rates[name]:.2f} samples/s (batch {size}, {params:,} parameters)", flush=True)
        del model, loss_fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "detection" in rates:
        print("ratio to detection: " + ", ".join(f"{name} {rate / rates['detection']:.1f}x"
                                                  for name, rate in rates.items() if name != "detection"))


if __name__ == "__main__":
    main()
