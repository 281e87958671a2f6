"""A small real task for the runtime tests: fit a noisy linear map with an MLP (dropout, layer norm, token).

Run as a script under torchrun to train it distributed: `python -m torch.distributed.run --nproc_per_node 2
tests/regression_task.py RUN_DIR`; each rank then writes hashes of its parameters and its batch counts, of an
uninterrupted run and of a run preempted on one rank and resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from pcd.pipeline.errors import Preempted
from pcd.trainer.runtime import Context, OptimConfig, RuntimeConfig, Task, train

IN_DIM, OUT_DIM, SAMPLES = 8, 2, 256


class RegressionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(16))
        self.net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(16, OUT_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[4](self.net[3](self.net[2](self.net[1](self.net[0](x)) + self.token)))

    def no_weight_decay(self) -> set[str]:
        return {"token"}


class RegressionTask(Task):
    """y = x W + noise; the data of each epoch and rank is drawn from a generator seeded by (seed, epoch, rank)."""

    def __init__(self, crash_at_step: Optional[int] = None, signal_at_step: Optional[int] = None):
        self.crash_at_step = crash_at_step
        self.signal_at_step = signal_at_step  # this process sends itself SIGTERM during that step (as SLURM would)
        self.steps_taken = 0
        self.model: Optional[nn.Module] = None
        generator = torch.Generator().manual_seed(1234)
        self.weight = torch.randn(IN_DIM, OUT_DIM, generator=generator)

    def config_dict(self) -> dict[str, Any]:
        return {"task": "regression", "samples": SAMPLES}

    def build_model(self, ctx: Context) -> nn.Module:
        self.model = RegressionModel()
        return self.model

    def steps_per_epoch(self, ctx: Context) -> int:
        return SAMPLES // ctx.global_batch_size

    def train_batches(self, ctx: Context, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(ctx.seed * 100_003 + epoch * 101 + ctx.rank)
        while True:
            x = torch.randn(ctx.batch_size, IN_DIM, generator=generator)
            yield {"x": x, "y": x @ self.weight + 0.01 * torch.randn(ctx.batch_size, OUT_DIM, generator=generator)}

    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        self.steps_taken += 1
        if self.crash_at_step is not None and self.steps_taken == self.crash_at_step:
            raise RuntimeError("simulated crash")
        if self.signal_at_step is not None and self.steps_taken == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        error = model(batch["x"]) - batch["y"]
        return (error ** 2).mean(), {"mae": error.abs().mean().detach()}

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        generator = torch.Generator().manual_seed(99)
        x = torch.randn(64, IN_DIM, generator=generator)
        return {"val_mse": float(((model(x.to(ctx.device)).float().cpu() - x @ self.weight) ** 2).mean())}


def parameter_hash(model: nn.Module) -> str:
    """Hash of the parameters (not buffers: batch-norm running statistics are per rank under DDP, as in Point-MAE)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_here(run_dir: Path, task: RegressionTask, resume: bool = False) -> None:
    train(task, OptimConfig(lr=1e-2, epochs=2, warmup_epochs=1, batch_size=32, grad_clip=1.0),
          RuntimeConfig(device="cpu", workers=0, log_every=1, progress=False, resume=resume), run_dir)


if __name__ == "__main__":
    # RUN_DIR: train in RUN_DIR/whole; then RUN_DIR/cut, where rank 1 sends itself SIGTERM during step 11 (as SLURM
    # would signal one node first), and resume it. Each rank writes RUN_DIR/rankR.json.
    import torch.distributed as dist

    run_dir = Path(sys.argv[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # once for the three runs (train() leaves a group it did not create)
    rank = int(os.environ.get("RANK", "0"))
    whole = RegressionTask()
    train_here(run_dir / "whole", whole)
    cut = RegressionTask(signal_at_step=11 if rank == 1 else None)
    try:
        train_here(run_dir / "cut", cut)
        preempted = False
    except Preempted:
        preempted = True
    resumed = RegressionTask()
    train_here(run_dir / "cut", resumed, resume=True)
    (run_dir / f"rank{rank}.json").write_text(json.dumps({
        "hash": parameter_hash(whole.model), "steps": whole.steps_taken, "preempted": preempted,
        "cut_steps": cut.steps_taken, "resumed_steps": resumed.steps_taken, "resumed_hash": parameter_hash(resumed.model)}))
