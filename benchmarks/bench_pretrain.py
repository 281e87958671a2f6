"""Throughput of `pcd pretrain`: the shard loader alone, the model step alone, and the whole runtime.

    python benchmarks/bench_pretrain.py --preset tiny --batch-size 32 --steps 20
    python benchmarks/bench_pretrain.py --preset paper --batch-size 8 --steps 4
    python benchmarks/bench_pretrain.py --preset paper --batch-size 128 --steps 30 --device cuda --workers 12
    python benchmarks/bench_pretrain.py --objectives --preset paper --batch-size 8 --steps 3 --threads 2

Three numbers per preset, so a bottleneck shows itself: the loader's samples/s (WebDataset read, decode, point
sampling, gravity frame, normalisation, augmentation, collation), the model's samples/s on a batch already in memory
(forward, backward, AdamW step), and `train()` end to end on the same shards (steady-state, from its own log). On CUDA
(bf16 autocast) it also reports model FLOPs utilisation against the H100's dense bf16 peak, with the FLOPs of one
training step counted by torch.utils.flop_counter. `--objectives` instead measures the model step of every
pre-training objective of the registry (and the point-mae preset) on the same batch, in rounds that alternate the
objectives so load changes hit all alike, and prints each one's samples/s as a ratio to `distill`, and the bytes
the patch-token members add per frame. Shards are generated (8,192 stored points per frame, as
`pcd extract-scannet` stores) unless --shards names real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pcd.pipeline.config import build_config  # noqa: E402
from pcd.trainer import data, pretrain  # noqa: E402
from pcd.trainer.objectives import OBJECTIVES, get_objective  # noqa: E402
from pcd.trainer.runtime import train  # noqa: E402

H100_BF16_DENSE_FLOPS = 989e12
PAPER_TEACHER = {"name": "bench-random", "random": True, "prefix_length": 10, "prefix_dim": 768, "clip_dim": 512}
# CLIP ViT-B/32's patch tokens (distill-local) and the tiny teacher's
PATCH_TOKENS = {"paper": {"grid": 7, "cell": 32, "image_size": 224, "width": 768},
                "tiny": {"grid": 2, "cell": 32, "image_size": 64, "width": 64}}


def loader_rate(selection: data.ShardSelection, cfg: pretrain.Config, batch: int, steps: int) -> float:
    loader = iter(data.train_loader(selection, batch_size=batch, num_points=cfg.num_points, seed=0, epoch=0, rank=0,
                                    world_size=1, workers=cfg.runtime.workers, shuffle_buffer=cfg.shuffle_buffer))
    for _ in range(2):  # worker start-up and the shuffle buffer's first fill
        next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * batch / (time.perf_counter() - start)


def model_rate(cfg: pretrain.Config, sample: dict[str, torch.Tensor], device: torch.device,
               steps: int) -> tuple[float, float]:
    """(samples/s, FLOPs per sample of a training step) of cfg's objective on a batch already on the device."""
    step, size = training_step(cfg, sample, device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / size
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * size / (time.perf_counter() - start), flops


def training_step(cfg: pretrain.Config, sample: dict[str, torch.Tensor], device: torch.device
                  ) -> tuple[Callable[[], None], int]:
    """A closure running one forward, backward and AdamW step of cfg's objective on `sample`, and its batch size."""
    teacher = {"prefix_length": sample["prefix"].shape[1], "prefix_dim": sample["prefix"].shape[2],
               "clip_dim": sample["clip"].shape[1]}
    if "patch_tokens" in sample:
        grid = int(sample["patch_tokens"].shape[1] ** 0.5)
        teacher["patch_tokens"] = {"grid": grid, "cell": 32, "image_size": 32 * grid,
                                   "width": sample["patch_tokens"].shape[2]}
    model = get_objective(cfg.objective).build(cfg, teacher).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(device) for k, v in sample.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, batch["points"].shape[0]


def objective_rates(preset: str, sample: dict[str, torch.Tensor], device: torch.device,
                    steps: int, rounds: int, flops: bool = False) -> dict[str, float]:
    """samples/s of each objective's training step (and of the point-mae preset beside the paper's): `rounds` rounds
    of `steps` steps each, the objectives alternating within a round; total samples over total time per objective."""
    configs = {}
    for name in OBJECTIVES:
        configs[name] = build_config(pretrain.Config, "pretrain", preset, [f"objective={name}"])
    if preset == "paper":  # Point-MAE's own model on the paper's data: the baseline rows of tables 3 and 4
        configs["reconstruct (preset point-mae)"] = build_config(pretrain.Config, "pretrain", "point-mae")
    steps_of = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        steps_of[name] = training_step(cfg, sample, device)
        steps_of[name][0]()  # first step: allocation and AdamW state
    if flops:  # load-independent: FLOPs of one training step per sample, counted by torch.utils.flop_counter
        for name, (step, size) in steps_of.items():
            with FlopCounterMode(display=False) as counter:
                step()
            print(f"{name:32s} {counter.get_total_flops() / size / 1e9:8.2f} GFLOP per sample per step")
    elapsed = dict.fromkeys(configs, 0.0)
    for _ in range(rounds):
        for name, (step, _size) in steps_of.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            elapsed[name] += time.perf_counter() - start
    return {name: rounds * steps * steps_of[name][1] / elapsed[name] for name in configs}


def member_bytes(shard: Path, members: tuple[str, ...]) -> tuple[int, int]:
    """(bytes the given members take in the tar, headers and padding included; samples) of one shard."""
    total, keys = 0, set()
    with tarfile.open(shard) as tar:
        for info in tar:
            key, _, extension = info.name.partition(".")
            keys.add(key)
            if extension in members:
                total += 512 + -(-info.size // 512) * 512
    return total, len(keys)


def runtime_rate(cfg: pretrain.Config, selection: data.ShardSelection, steps: int) -> float:
    """Steady-state samples/s of train() (log records after the first, which include loader start-up)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.run_dir = Path(run_dir)
        cfg.optim.epochs = 1
        cfg.runtime.max_steps_per_epoch = steps + 2
        cfg.runtime.log_every = 1
        cfg.runtime.eval_every = 0
        cfg.runtime.progress = False
        train(pretrain.PretrainTask(cfg, selection, None), cfg.optim, cfg.runtime, cfg.run_dir)
        records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r["kind"] == "train"][2:]
    return len(rates) / sum(1.0 / r for r in rates)  # harmonic mean = total samples / total time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--shards", type=Path, default=None, help="real training shards (default: generated)")
    parser.add_argument("--objectives", action="store_true", help="model step of every objective, ratios to distill")
    parser.add_argument("--rounds", type=int, default=2, help="with --objectives: alternating rounds")
    parser.add_argument("--flops", action="store_true", help="with --objectives: also count each step's FLOPs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            from training_shards import write_training_shards

            shards = Path(tmp) / "shards"
            frames = max(64, (args.steps + 4) * args.batch_size // 8 + 1)
            write_training_shards(shards, {f"scene{i:04d}_00": frames for i in range(8)}, points=8192,
                                  teacher=PAPER_TEACHER if args.preset == "paper" else None,
                                  patch_tokens=PATCH_TOKENS[args.preset] if args.objectives else None)
        cfg = build_config(pretrain.Config, "pretrain", args.preset, [
            f"shards_dir={shards}", f"optim.batch_size={args.batch_size}", f"runtime.workers={args.workers}",
            f"runtime.device={args.device}"])
        selection = data.select_shards(shards, None)
        if args.objectives:
            sample = next(iter(data.train_loader(selection, batch_size=args.batch_size, num_points=cfg.num_points,
                                                 seed=0, epoch=0, rank=0, world_size=1, workers=0, shuffle_buffer=0,
                                                 members=(*data.NEEDED_MEMBERS, *data.PATCH_MEMBERS))))
            rates = objective_rates(args.preset, sample, device, args.steps, args.rounds, args.flops)
            print(f"preset {args.preset}, device {device}, batch {args.batch_size}, {cfg.num_points} points, "
                  f"{args.rounds} rounds of {args.steps} steps per objective, torch threads {torch.get_num_threads()}, "
                  f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            for name, rate in rates.items():
                print(f"{name:32s} {rate:8.2f} samples/s   {rate / rates['distill']:5.2f}x distill")
            patch, frames = member_bytes(Path(selection.urls[0]), data.PATCH_MEMBERS)
            print(f"patch_tokens.npy + patch_camera.npy: {patch / frames / 1e3:.1f} kB per frame, "
                  f"{patch / frames:.0f} bytes x 1,000 = {patch / frames * 1000 / 1e6:.1f} MB per 1,000 frames")
            return
        loader = loader_rate(selection, cfg, args.batch_size, args.steps)
        sample = next(iter(data.train_loader(selection, batch_size=args.batch_size, num_points=cfg.num_points,
                                             seed=0, epoch=0, rank=0, world_size=1, workers=0, shuffle_buffer=0)))
        model, flops = model_rate(cfg, sample, device, args.steps)
        whole = runtime_rate(cfg, selection, args.steps)

    print(f"preset {args.preset}, device {device}, batch {args.batch_size}, {cfg.num_points} points, "
          f"{args.workers} loader workers, torch threads {torch.get_num_threads()}, "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"loader alone     {loader:10.1f} samples/s")
    print(f"model step alone {model:10.1f} samples/s   ({flops / 1e9:.2f} GFLOP per sample per step)")
    print(f"pcd pretrain     {whole:10.1f} samples/s   (train(), steady state)")
    if device.type == "cuda":
        print(f"MFU (model step) {model * flops / H100_BF16_DENSE_FLOPS:10.1%}   "
              f"MFU (pcd pretrain) {whole * flops / H100_BF16_DENSE_FLOPS:.1%}  of 989 TFLOP/s bf16 dense")
        print(f"epoch of 100,000 frames: {100_000 / whole:.0f} s")


if __name__ == "__main__":
    main()
