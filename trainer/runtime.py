"""The one training runtime of pcd: pre-training and every fine-tune run through `train()`.

Devices, precision, DistributedDataParallel, the optimiser and schedule, checkpoints, exact resume and logging are
written here once; a training job is a `Task` that says what to train and on what. This keeps the subtle parts
(bf16 autocast, DDP gradient sync, atomic checkpoints, RNG state for bit-exact resume) out of every fine-tune.

Plugging a task in (e.g. detection fine-tuning)::

    class DetectionTask(Task):
        def config_dict(self): return config_to_dict(self.cfg)          # saved as RUN_DIR/config.json
        def build_model(self, ctx): return Detector(...)                 # on CPU; the runtime moves it
        def steps_per_epoch(self, ctx): return max(1, n_scenes // ctx.global_batch_size)
        def train_batches(self, ctx, epoch): return DataLoader(...)      # deterministic in (ctx.seed, epoch, rank)
        def training_step(self, model, batch, ctx): return loss, {"loss_giou": ...}
        def evaluate(self, model, ctx, epoch): return {"mAP25": ...}    # optional
        best_metric = ("mAP25", "max")                                  # optional: keeps checkpoints/best.pt

    result = train(DetectionTask(cfg), cfg.optim, cfg.runtime, cfg.run_dir)

Contract:
- `OptimConfig.batch_size` is the GLOBAL batch (all ranks together), so a config trains the same model on 1 or 8
  GPUs; each rank gets `ctx.batch_size = batch_size // (world_size * runtime.accumulate)` (must divide evenly):
  with `accumulate` N, an optimizer step sums the gradients of N micro-batches (DDP syncs only the last).
- `train_batches(ctx, epoch)` must yield at least `steps_per_epoch(ctx) * accumulate` batches on EVERY rank (DDP
  hangs if one rank runs short); the runtime takes exactly that many (capped by `RuntimeConfig.max_steps_per_epoch`
  steps). It must depend only on (ctx.seed, epoch, ctx.rank, ctx.world_size): resume must see the same data.
- Preemption: on SIGTERM or SIGUSR1 (SLURM's notice before it kills a job) the ranks agree, through one all-reduce
  per step, to stop after the same step; rank 0 saves `last.pt` mid-epoch and every rank raises
  `pcd.pipeline.errors.Preempted` (the CLI exits with status 75, `RESUMABLE_EXIT_CODE`). A resumed run skips the
  batches its epoch already took (`Task.train_batches_from`) and restores the RNG states after that, so it ends
  with the weights of an uninterrupted run. `checkpoint_steps` N also saves `last.pt` every N steps.
- Tensors in a batch (nested in dicts/lists/tuples) are moved to the device by the runtime; anything else passes
  through untouched. `training_step` runs inside the bf16 autocast region and under DDP (the runtime wraps it in a
  module whose forward is the step, so gradients are all-reduced); it receives the UNWRAPPED model.
- Metric values may be floats or 0-d tensors; tensors are converted only at log steps (no per-step GPU sync).
- `evaluate` is called on every rank with the unwrapped model in eval mode, under no_grad and in float32 (autocast
  off, whatever `runtime.precision` trains in: 3DETR and Point-MAE evaluate in float32). A sharded
  evaluation must all-reduce itself (`ctx.all_reduce_sum`); only rank 0's return value is logged.
- Weight decay: every parameter with ndim <= 1 (norms, biases), every name containing "token" and every name in
  `model.no_weight_decay()` is excluded, as in Point-MAE/timm. Override `param_groups` for anything else; a group may carry `lr_scale`.

Helpers for tasks: `map_style_loader(dataset, ctx, epoch)` turns a map-style dataset into this rank's equal share of
an epoch (seeded order and seeded workers, so resume is exact) and `map_style_steps(n, ctx)` is its length;
`ctx.autocast()` is the run's training precision context; `ctx.evaluation_precision()` (float32, also inside an
autocast region) is the one for every evaluation, standalone ones included; `load_checkpoint(path)` reads a
checkpoint (weights_only); `make_context(optim, runtime, run_dir)` builds a Context outside `train`.

Logs: `metrics.jsonl` has one object per log step (`kind: "train"`: epoch, step, lr, loss and the task's metrics
averaged over the steps since the last record on rank 0, samples_per_s over all ranks), per evaluation
(`kind: "eval"`) and per epoch (`kind: "epoch"`: mean train loss, time, samples/s); TensorBoard gets the same scalars
as `<kind>/<name>` by step, and so does Weights & Biases with `log: ["wandb"]` (`pcd.trainer.wandb_log`). On
resume, records written after the checkpoint are dropped, so nothing is duplicated.

Run folder written by rank 0, which holds `.run.lock` (see `run_lock`) for the whole run: `config.json`,
`checkpoints/last.pt` (every epoch and every `checkpoint_steps` steps, atomically), `checkpoints/epoch_XXXX.pt` (every `checkpoint_every` epochs;
0 = none), `checkpoints/best.pt` (with `best_metric`), `metrics.jsonl`, `tb/`.
A checkpoint is a dict of tensors and plain Python values readable with `torch.load(weights_only=True)`:
`model` (unwrapped state_dict), `optimizer`, `scheduler` (the step-based schedule state), `epoch` (epochs completed),
`step` (optimizer steps done), `rng` (one {torch, cuda, numpy, python} entry per rank), `config`, `task`, `best`,
`epoch_progress` ({} at an epoch's end; mid-epoch: `steps` taken in epoch `epoch`, and the running loss and samples
of its log record).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from pcd.pipeline.atomic import atomic_write_json, failed_write_removes, is_no_space, no_space, temporary_path
from pcd.pipeline.config import InvalidSetting, each, fraction, non_negative, positive, setting
from pcd.pipeline.errors import PcdError, Preempted
from pcd.pipeline.locks import folder_lock
from pcd.pipeline.socket_folder import ensure_short_socket_folder
from pcd.trainer.preemption import StopRequest
from pcd.trainer.wandb_log import WandbLog, import_wandb
from pcd.trainer.weights import read_checkpoint

console = Console(stderr=True)


@dataclass
class RuntimeConfig:
    """How a job runs (not what it learns): device, precision, seed, resume, workers, logging cadence."""

    device: Optional[str] = None  # None: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = setting(0, non_negative)
    resume: bool = False  # continue from RUN_DIR/checkpoints/last.pt (starts fresh if there is none)
    workers: int = setting(4, non_negative)  # DataLoader worker processes per rank
    log_every: int = setting(20, positive)  # optimizer steps between train log records
    # also keep checkpoints/epoch_XXXX.pt every N epochs (last.pt is written every epoch)
    checkpoint_every: int = setting(0, non_negative)
    # epochs between evaluations (0: never; the last epoch is always evaluated)
    eval_every: int = setting(1, non_negative)
    max_steps_per_epoch: Optional[int] = setting(None, positive)  # cap for smoke runs and benchmarks
    progress: bool = True  # rich progress bar on rank 0
    # also save checkpoints/last.pt every N optimizer steps inside an epoch (0: at epoch ends only)
    checkpoint_steps: int = setting(0, non_negative)
    # micro-batches per optimizer step on each rank: the same global batch in 1/N of the activation memory
    accumulate: int = setting(1, positive)
    compile: bool = False  # torch.compile the training step (compiling takes minutes; worth it on GPUs)
    # loggers beside metrics.jsonl and TensorBoard (always written): "wandb" (pip install 'pcd-distill[wandb]')
    log: list[Literal["wandb"]] = field(default_factory=list)


@dataclass
class OptimConfig:
    """Optimiser and schedule: linear warm-up then cosine decay. Defaults: the paper's pre-training.

    `optimizer`: "adamw" (decoupled weight decay, Point-MAE and 3DETR) or "adam" (torch Adam, whose weight decay
    is an L2 term added to the gradient, as segmentation recipes built on PointNet++ use). `schedule_unit`:
    "iteration" updates the learning rate every optimizer step; "epoch" holds it for an epoch and follows timm's
    CosineLRScheduler as Point-MAE configures it (`lr_at_epoch`).
    """

    lr: float = setting(1e-3, positive)
    weight_decay: float = setting(0.05, non_negative)
    betas: tuple[float, float] = setting((0.9, 0.999), each(fraction))
    epochs: int = setting(250, positive)
    warmup_epochs: float = setting(10, non_negative)
    warmup_start_lr: float = setting(1e-6, non_negative)
    min_lr: float = setting(1e-6, non_negative)
    grad_clip: Optional[float] = setting(None, positive)  # max global L2 norm of the gradients; None: no clipping
    batch_size: int = setting(128, positive)  # GLOBAL batch over all ranks (per rank: batch_size // world_size)
    optimizer: Literal["adamw", "adam"] = "adamw"
    schedule_unit: Literal["iteration", "epoch"] = "iteration"

    def validate(self) -> None:
        if self.warmup_epochs > self.epochs:
            raise InvalidSetting("warmup_epochs", f"must not exceed epochs ({self.epochs})")


@dataclass
class Context:
    """What a task needs to know about where it runs."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    batch_size: int  # per rank and micro-batch (global batch / (world size x runtime.accumulate))
    global_batch_size: int
    seed: int
    workers: int
    autocast_dtype: Optional[torch.dtype]  # torch.bfloat16 or None (fp32)
    run_dir: Path

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training precision context of this run (the one place autocast is decided)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def evaluation_precision(self) -> contextlib.AbstractContextManager:
        """Evaluation's precision: always float32 (autocast off, also inside a training autocast region), so
        numbers do not depend on the training precision; bf16 is a training option only."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum per-rank numbers over all ranks (identity on one process); for sharded evaluation."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(tensor)
        return dict(zip(keys, tensor.tolist()))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _reduce_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def map_style_loader(dataset: torch.utils.data.Dataset, ctx: Context, epoch: int, collate_fn: Any = None,
                     shuffle: bool = True) -> torch.utils.data.DataLoader:
    """This rank's batches of a map-style dataset for `epoch`: what a fine-tune's `train_batches` can return.

    The order is a permutation seeded by (seed, epoch), the same on every rank, cut into equal per-rank shares
    (DistributedSampler-style, wrapping around to pad), in full batches of ctx.batch_size; it yields
    `map_style_steps(len(dataset), ctx)` x `runtime.accumulate` batches (one per micro-batch). Each worker seeds Python, numpy and torch from (seed, epoch, rank,
    worker), so random augmentation inside `dataset` repeats exactly on resume; with 0 workers the dataset draws from
    the process's global RNGs, which the checkpoint restores.
    """
    n = len(dataset)
    steps = map_style_steps(n, ctx)
    per_rank = steps * ctx.global_batch_size // ctx.world_size  # ctx.batch_size x accumulated micro-batches
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(ctx.seed, epoch))).tolist()
    else:
        order = list(range(n))
    order = (order * math.ceil(per_rank * ctx.world_size / n))[: per_rank * ctx.world_size]
    indices = order[ctx.rank::ctx.world_size]
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=ctx.batch_size, shuffle=False, drop_last=True,
        num_workers=ctx.workers, collate_fn=collate_fn,
        worker_init_fn=functools.partial(_seed_worker, _mix(ctx.seed, epoch, ctx.rank)),
        pin_memory=ctx.device.type == "cuda", persistent_workers=False)


def map_style_steps(num_samples: int, ctx: Context) -> int:
    """Steps per epoch of `map_style_loader`: the samples over the global batch, at least one."""
    return max(1, num_samples // ctx.global_batch_size)


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike hash())."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) >> 1


def _seed_worker(base_seed: int, worker: int) -> None:
    _seed_everything(_mix(base_seed, worker))


class Task(ABC):
    """What to train: model, data, loss; optionally evaluation and extra checkpoint state. See the module docstring."""

    best_metric: Optional[tuple[str, Literal["max", "min"]]] = None
    find_unused_parameters: bool = False  # for DDP, when a step leaves some parameters without gradient

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The resolved config, JSON-ready: written to RUN_DIR/config.json and into every checkpoint."""

    @abstractmethod
    def build_model(self, ctx: Context) -> nn.Module:
        """A freshly initialised model (same on every rank given ctx.seed; the runtime seeds before calling).

        Called before the runtime takes the run folder: it loads every input (e.g. --init weights) and writes
        nothing, so a refused input leaves the run folder as it was. Records go in `write_run_records`."""

    def write_run_records(self, ctx: Context) -> None:
        """Write the task's own records into the run folder (rank 0 only): called once the runtime holds the run
        folder's lock and has accepted the run (a new one, or a resume with the same settings)."""

    @abstractmethod
    def steps_per_epoch(self, ctx: Context) -> int:
        """Optimizer steps per epoch, the same number on every rank."""

    @abstractmethod
    def train_batches(self, ctx: Context, epoch: int) -> Iterable[Any]:
        """This rank's batches of `epoch` (0-based), at least steps_per_epoch of them, deterministic in (seed, epoch)."""

    def train_batches_from(self, ctx: Context, epoch: int, start: int) -> Iterable[Any]:
        """This rank's batches of `epoch` from batch `start` on, for a run resumed mid-epoch: the same batches
        `train_batches` yields after its first `start`. This default takes those `start` batches and drops them
        (exact for any task, also for augmentations drawn from a worker's random stream, but it reads and prepares
        them); override it where every sample has its own seed, so slicing the epoch's plan gives the same batches."""
        batches = iter(self.train_batches(ctx, epoch))
        for _ in range(start):
            next(batches)
        return batches

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss to minimise, metrics to log) for one batch."""

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        """Validation metrics; {} means the task has no evaluation."""
        return {}

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
        """AdamW parameter groups: no weight decay on norms and biases (1-D), on names with 'token' (Point-MAE's
        `add_weight_decay` rule: its `cls_token`, not `cls_pos`) and on the model's `no_weight_decay()` names."""
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or "token" in name or name in skip else decay).append(param)
        return [{"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def batch_size_of(self, batch: Any) -> int:
        """Samples in a batch (for samples/s): the leading size of the first tensor found."""
        tensor = _first_tensor(batch)
        return int(tensor.shape[0]) if tensor is not None else 1

    def state_dict(self) -> dict[str, Any]:
        """Extra task state for the checkpoint (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def lr_at(step: int, total_steps: int, warmup_steps: int, optim: OptimConfig) -> float:
    """Learning rate after `step` optimizer steps: linear warm-up from warmup_start_lr, then cosine to min_lr."""
    if step < warmup_steps:
        return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_at_epoch(epoch: int, optim: OptimConfig) -> float:
    """Learning rate of a whole epoch, as timm's CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_start_lr, lr_min=min_lr) gives it in Point-MAE's fine-tunes: linear warm-up over the
    first epochs, then the cosine of epoch / epochs (the warm-up is not a prefix: the cosine clock starts at 0).

    Point-MAE steps that scheduler at the END of an epoch, so its epoch e trains at this value for e - 1 (and epoch
    0 at warmup_start_lr); pcd trains epoch e at the value for e.
    """
    if epoch < optim.warmup_epochs:
        return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * epoch / optim.warmup_epochs
    progress = min(1.0, epoch / max(1, optim.epochs))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def scheduled_lr(step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) under `optim.schedule_unit`."""
    if optim.schedule_unit == "epoch":
        return lr_at_epoch(step // steps_per_epoch, optim)
    return lr_at(step, steps_per_epoch * optim.epochs, int(round(optim.warmup_epochs * steps_per_epoch)), optim)


def make_optimizer(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 weight decay in the gradient); per-group weight_decay wins."""
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


class _StepModule(nn.Module):
    """Makes the task's training step the forward of one module, so that DDP sees it and syncs gradients."""

    def __init__(self, model: nn.Module, task: Task, ctx: Context):
        super().__init__()
        self.model = model
        self._task = task
        self._ctx = ctx

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._task.training_step(self.model, batch, self._ctx)


class _EpochMeter:
    """One epoch's running train metrics: the window averaged into each log record, and the epoch's mean loss.

    Its state goes into a mid-epoch checkpoint, so the epoch record of a resumed epoch covers the whole epoch."""

    def __init__(self, saved: dict[str, Any]):
        self.window: dict[str, list[Any]] = {}
        self.window_samples = 0
        self.t_window = time.perf_counter()
        self.loss_sum = float(saved.get("loss_sum", 0.0))
        self.loss_count = int(saved.get("loss_count", 0))
        self.samples = int(saved.get("samples", 0))
        self._t_start = time.perf_counter() - float(saved.get("time_s", 0.0))

    def add(self, values: dict[str, Any], samples: int) -> None:
        """One micro-batch's loss and metrics (tensors are kept on the device until the next flush)."""
        for key, value in values.items():
            self.window.setdefault(key, []).append(value.detach() if torch.is_tensor(value) else value)
        self.window_samples += samples
        self.samples += samples

    def flush(self, run_dir: Path, epoch: int, step: int) -> tuple[dict[str, float], float]:
        """(means of the window, samples/s since the last flush); refuses a non-finite loss."""
        means = {k: float(np.mean([float(v) for v in vals])) for k, vals in self.window.items()}
        if not math.isfinite(means["loss"]):
            raise PcdError(f"{run_dir}: loss became {means['loss']} at epoch {epoch}, step {step}")
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.t_window, 1e-9)
        self.loss_sum += means["loss"] * len(self.window["loss"])
        self.loss_count += len(self.window["loss"])
        self.window, self.t_window, self.window_samples = {}, now, 0
        return means, rate

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t_start

    def state(self, steps_done: int) -> dict[str, Any]:
        """What a mid-epoch checkpoint keeps (call after `flush`)."""
        return {"steps": steps_done, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "samples": self.samples, "time_s": self.elapsed()}


def _epoch_batches(task: Task, ctx: Context, epoch: int, skip: int, done: bool) -> Iterator[Any]:
    """This rank's batches of `epoch` after the `skip` it already took before a checkpoint (a mid-epoch resume);
    none when the checkpoint was saved after the epoch's last step (its evaluation and save are what is left)."""
    if done:
        return iter(())
    if not skip:
        return iter(task.train_batches(ctx, epoch))
    batches = iter(task.train_batches_from(ctx, epoch, skip))
    if ctx.is_main:
        console.print(f"skipped the {skip} batches of epoch {epoch} taken before the checkpoint")
    return batches


def _next_batch(batches: Iterator[Any], run_dir: Path, epoch: int, i: int, steps: int, ctx: Context) -> Any:
    try:
        return next(batches)
    except StopIteration:
        raise PcdError(f"{run_dir}: epoch {epoch} ran out of batches after {i} of {steps} steps "
                       f"on rank {ctx.rank}") from None


def _stop_now(stop: StopRequest, ctx: Context, step: int, last_path: Path) -> None:
    """Leave after a preemption signal, once the checkpoint is saved (every rank raises)."""
    message = (f"stopped by {stop.describe()} after step {step}; {last_path} holds the run: start the same "
               "command with --resume to continue it")
    if ctx.is_main:
        console.print(f"[yellow]{message}[/yellow]")
    raise Preempted(message)


def train(task: Task, optim: OptimConfig, runtime: RuntimeConfig, run_dir: Path) -> dict[str, Any]:
    """Train `task` to `optim.epochs` epochs in `run_dir` (resuming if asked); returns a summary on every rank.

    Summary: {"epochs", "step", "epoch_losses" (mean train loss per epoch of this invocation, by epoch number),
    "eval" (last evaluation metrics), "best", "run_dir"}.
    """
    run_dir = Path(run_dir)
    ensure_short_socket_folder()  # before any loader worker starts: a long TMPDIR would hang them
    initialised_here = _init_distributed(runtime)
    try:
        return _train(task, optim, runtime, run_dir)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _init_distributed(runtime: RuntimeConfig) -> bool:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); False when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = _resolve_device(runtime.device, int(os.environ.get("LOCAL_RANK", "0"))).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _resolve_device(name: Optional[str], local_rank: int) -> torch.device:
    if name is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PcdError(f"device '{name}' asked for, but this torch sees no CUDA device")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def make_context(optim: OptimConfig, runtime: RuntimeConfig, run_dir: Path) -> Context:
    """The Context of this process (rank, device, per-rank batch, precision)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(runtime.device, local_rank)
    if optim.batch_size % (world * runtime.accumulate):
        raise PcdError(f"batch_size {optim.batch_size} (global) does not divide over {world} ranks x "
                       f"{runtime.accumulate} accumulated micro-batches")
    if runtime.precision == "bf16" or (runtime.precision == "auto" and device.type == "cuda"):
        dtype: Optional[torch.dtype] = torch.bfloat16
    else:
        dtype = None
    return Context(device=device, rank=rank, world_size=world, local_rank=local_rank,
                   batch_size=optim.batch_size // (world * runtime.accumulate), global_batch_size=optim.batch_size,
                   seed=runtime.seed,
                   workers=runtime.workers, autocast_dtype=dtype, run_dir=run_dir)


def _train(task: Task, optim: OptimConfig, runtime: RuntimeConfig, run_dir: Path) -> dict[str, Any]:
    ctx = make_context(optim, runtime, run_dir)
    check_run_dir(run_dir, runtime.resume)  # before the model is built: a refused run costs nothing
    if "wandb" in runtime.log and ctx.is_main:
        import_wandb()
    with contextlib.ExitStack() as held:
        return _train_in(task, optim, runtime, run_dir, ctx, held)


def _train_in(task: Task, optim: OptimConfig, runtime: RuntimeConfig, run_dir: Path, ctx: Context,
              held: contextlib.ExitStack) -> dict[str, Any]:
    last_path = last_checkpoint(run_dir)
    ckpt_dir = last_path.parent
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _seed_everything(runtime.seed)  # identical initial weights on every rank
    model = task.build_model(ctx).to(ctx.device)  # loads every input (--init) before anything is written
    if ctx.is_main:
        held.enter_context(run_lock(run_dir))
    checkpoint = _load_start_checkpoint(last_path, runtime.resume, ctx)
    if checkpoint is not None:
        changed = changed_settings(checkpoint.get("config"), task.config_dict())
        if changed:
            raise PcdError(f"{last_path}: the run was started with other settings ({', '.join(changed[:4])}"
                           f"{', ...' if len(changed) > 4 else ''}); resume with the same --preset and --set "
                           "options, or start a new run folder")
    groups = task.param_groups(model, optim)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    optimizer = make_optimizer(groups, optim)
    _seed_everything(runtime.seed + 1000 * ctx.rank)  # ranks differ in drop-path etc. from here on

    steps = task.steps_per_epoch(ctx)
    if runtime.max_steps_per_epoch is not None:
        steps = min(steps, runtime.max_steps_per_epoch)
    if steps < 1:
        raise PcdError(f"{run_dir}: the task has no training step per epoch (too little data for the batch size)")
    total_steps = steps * optim.epochs
    warmup_steps = int(round(optim.warmup_epochs * steps))  # recorded in checkpoints (iteration schedule)

    start_epoch, start_batch, step, best = 0, 0, 0, None
    progress_state: dict[str, Any] = {}
    pending_rng: Optional[list[dict[str, Any]]] = None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as exc:
            raise PcdError(f"{last_path}: the checkpoint does not fit the configured model "
                           f"({str(exc).splitlines()[0]} ...); resume with the run's own config.json") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        task.load_state_dict(checkpoint.get("task", {}))
        start_epoch, step, best = int(checkpoint["epoch"]), int(checkpoint["step"]), checkpoint.get("best")
        progress_state = dict(checkpoint.get("epoch_progress") or {})
        start_batch = min(int(progress_state.get("steps", 0)), steps)
        if start_batch:
            pending_rng = checkpoint["rng"]  # restored once the epoch's batches are skipped (see _epoch_batches)
        else:
            _restore_rng(checkpoint["rng"], ctx)
        if ctx.is_main:
            where = f", step {start_batch} of {steps} in the epoch" if start_batch else ""
            console.print(f"[green]resumed[/green] {last_path} at epoch {start_epoch}, step {step}{where}")
    del checkpoint

    step_module: nn.Module = _StepModule(model, task, ctx)
    if ctx.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters)
    no_sync = step_module.no_sync if ctx.distributed else contextlib.nullcontext
    if runtime.compile:
        step_module = torch.compile(step_module)

    if ctx.is_main:
        task.write_run_records(ctx)
    logger = _Logger(run_dir, ctx, runtime, task.config_dict(), purge_from_epoch=start_epoch,
                     keep_train_until=step) if ctx.is_main else None
    if ctx.is_main:
        for stale in ckpt_dir.glob(".*.pt.tmp-*"):  # left by a run killed while saving (no other run is live here:
            stale.unlink()                          # this one holds the run folder's lock)
        atomic_write_json(run_dir / "config.json", task.config_dict())
        if start_epoch == 0 and start_batch == 0:
            console.print(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {ctx.device} "
                          f"x{ctx.world_size} ({'bf16' if ctx.autocast_dtype else 'fp32'}), "
                          f"{optim.epochs} epochs of {steps} steps, global batch {ctx.global_batch_size}"
                          + (f" in {runtime.accumulate} micro-batches" if runtime.accumulate > 1 else ""))

    summary: dict[str, Any] = {"epoch_losses": {}, "eval": {}, "run_dir": str(run_dir)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    schedule = {"steps_per_epoch": steps, "total_steps": total_steps, "warmup_steps": warmup_steps}
    progress: Optional[Progress] = None
    stop = held.enter_context(StopRequest())
    try:
        for epoch in range(start_epoch, optim.epochs):
            model.train()
            first = start_batch if epoch == start_epoch else 0
            meter = _EpochMeter(progress_state if first else {})
            progress = _progress(ctx, runtime, epoch, optim.epochs, steps, first)
            with stop.shielding_children():  # the epoch's loader workers start here
                batches = _epoch_batches(task, ctx, epoch, first * runtime.accumulate, first >= steps)
            if pending_rng is not None:
                _restore_rng(pending_rng, ctx)
                pending_rng = None
            for i in range(first, steps):
                lr = scheduled_lr(step, steps, optim)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                optimizer.zero_grad(set_to_none=True)
                for micro in range(runtime.accumulate):
                    batch = _to_device(_next_batch(batches, run_dir, epoch, i, steps, ctx), ctx.device)
                    with contextlib.nullcontext() if micro == runtime.accumulate - 1 else no_sync():
                        with ctx.autocast():
                            loss, metrics = step_module(batch)
                        (loss / runtime.accumulate if runtime.accumulate > 1 else loss).backward()
                    meter.add({"loss": loss.detach(), **metrics}, task.batch_size_of(batch) * ctx.world_size)
                if optim.grad_clip is not None:
                    meter.add({"grad_norm": torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)}, 0)
                optimizer.step()
                step += 1

                stopping = stop.agreed(ctx.distributed)
                save_now = stopping or (bool(runtime.checkpoint_steps) and step % runtime.checkpoint_steps == 0
                                        and i < steps - 1)
                if step % runtime.log_every == 0 or i == steps - 1 or save_now:
                    means, rate = meter.flush(run_dir, epoch, step)
                    if logger:
                        logger.log({"kind": "train", "epoch": epoch, "step": step, "lr": lr, **means,
                                    "samples_per_s": rate})
                    if progress:
                        progress.update(progress.task_ids[0], completed=i + 1,
                                        info=f"loss {means['loss']:.4f}  {rate:,.0f} samples/s")
                elif progress:
                    progress.update(progress.task_ids[0], completed=i + 1)
                if save_now:  # mid-epoch: resuming skips the i + 1 steps taken (the epoch's tail follows then)
                    state = _checkpoint_state(model, optimizer, task, ctx, epoch, step, best,
                                              {"step": step, **schedule}, meter.state(i + 1))
                    if ctx.is_main:
                        _atomic_torch_save(state, last_path)
                    del state
                    ctx.barrier()
                if stopping:
                    _stop_now(stop, ctx, step, last_path)
            del batches
            if progress:
                progress.stop()
                progress = None
            mean_loss = meter.mean_loss()
            summary["epoch_losses"][epoch] = mean_loss
            elapsed = meter.elapsed()
            epoch_record = {"kind": "epoch", "epoch": epoch, "step": step, "loss": mean_loss, "time_s": elapsed,
                            "samples_per_s": meter.samples / max(elapsed, 1e-9)}

            last_epoch = epoch == optim.epochs - 1
            evaluation: dict[str, float] = {}
            if runtime.eval_every and ((epoch + 1) % runtime.eval_every == 0 or last_epoch):
                model.eval()
                with torch.no_grad(), ctx.evaluation_precision(), stop.shielding_children():
                    evaluation = task.evaluate(model, ctx, epoch)
                model.train()
                if evaluation:
                    summary["eval"] = evaluation
                    if logger:
                        logger.log({"kind": "eval", "epoch": epoch, "step": step, **evaluation})
                    best = _update_best(task, best, evaluation, epoch)
            if logger:
                logger.log(epoch_record)
                console.print(f"epoch {epoch + 1}/{optim.epochs}  loss {mean_loss:.4f}  "
                              f"{epoch_record['samples_per_s']:,.1f} samples/s"
                              + "".join(f"  {k} {float(v):.4f}" for k, v in evaluation.items()))

            state = _checkpoint_state(model, optimizer, task, ctx, epoch + 1, step, best,
                                      {"step": step, **schedule}, {})
            if ctx.is_main:
                _atomic_torch_save(state, last_path)
                if runtime.checkpoint_every and (epoch + 1) % runtime.checkpoint_every == 0:
                    _atomic_torch_save(state, ckpt_dir / f"epoch_{epoch + 1:04d}.pt")
                if best is not None and best["epoch"] == epoch:
                    _atomic_torch_save(state, ckpt_dir / "best.pt")
            del state
            ctx.barrier()
            if not last_epoch and stop.agreed(ctx.distributed):  # signalled during the evaluation or the save
                _stop_now(stop, ctx, step, last_path)
    finally:
        if progress:
            progress.stop()
        if logger:
            logger.close()
    summary.update({"epochs": optim.epochs, "step": step, "best": best})
    return summary


RUN_LOCK_NAME = ".run.lock"


def run_lock(run_dir: Path) -> contextlib.AbstractContextManager:
    """The exclusive lock a training run holds on its run folder from before its first write to its end: a second
    run on the same folder (pretrain or finetune) is refused with one line instead of mixing checkpoints and logs."""
    return folder_lock(run_dir, RUN_LOCK_NAME, "training run")


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start a new run over an existing one (its checkpoints would be overwritten)."""
    path = last_checkpoint(run_dir)
    if not resume and path.exists():
        raise PcdError(f"{path} exists: pass --resume to continue that run, or choose a new run folder")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `train` (weights_only: tensors and plain values), on CPU."""
    path = Path(path)
    if not path.is_file():
        raise PcdError(f"{path}: no such checkpoint")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        raise PcdError(f"{path}: not a pcd training checkpoint (no 'model' entry)")
    return state


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def changed_settings(saved: Optional[dict[str, Any]], current: dict[str, Any]) -> list[str]:
    """`key: saved -> now` for every setting a resume would silently change (resuming is exact only with the
    same settings). How the job runs (`runtime.*` but its seed) and where the run and its data live may change."""
    if saved is None:
        return []
    before, now = _flatten(saved), _flatten(current)
    may_change = {"run_dir", "shards_dir", "data_dir"} | {k for k in {*before, *now} if k.startswith("runtime.") and k != "runtime.seed"}
    return [f"{key}: {before.get(key, '(absent)')} -> {now.get(key, '(absent)')}"
            for key in sorted({*before, *now} - may_change) if before.get(key) != now.get(key)]


def _load_start_checkpoint(last_path: Path, resume: bool, ctx: Context) -> Optional[dict[str, Any]]:
    check_run_dir(last_path.parent.parent, resume)  # again, now that this run holds the folder
    if not resume:
        return None
    if not last_path.exists():
        if ctx.is_main:
            console.print(f"[yellow]--resume: no checkpoint at {last_path}; starting a new run[/yellow]")
        return None
    return load_checkpoint(last_path)


def _update_best(task: Task, best: Optional[dict[str, Any]], evaluation: dict[str, float],
                 epoch: int) -> Optional[dict[str, Any]]:
    if task.best_metric is None:
        return best
    name, mode = task.best_metric
    if name not in evaluation:
        raise PcdError(f"task evaluation returned no '{name}' (its best_metric); got {', '.join(evaluation)}")
    value = float(evaluation[name])
    better = best is None or (value > best["value"] if mode == "max" else value < best["value"])
    return {"metric": name, "mode": mode, "value": value, "epoch": epoch} if better else best


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, ctx: Context, epoch: int,
                      step: int, best: Optional[dict[str, Any]], schedule: dict[str, int],
                      epoch_progress: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict; RNG states are gathered from every rank (collective: all ranks call this).
    `epoch` counts the epochs completed; `epoch_progress` ({} at an epoch's end) is how far the next one got."""
    rng = _rng_state()
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, rng)
        rngs = gathered
    else:
        rngs = [rng]
    if not ctx.is_main:
        return {}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule,
            "epoch": epoch, "step": step, "rng": rngs, "config": task.config_dict(), "task": task.state_dict(),
            "best": best, "world_size": ctx.world_size, "epoch_progress": epoch_progress}


class _ErrorKeepingFile:
    """A file torch.save writes through: torch turns the OSError of a failed write (a full disk) into a bare
    RuntimeError ("enforce fail ... unexpected pos"), so the original error is kept here to be re-raised."""

    def __init__(self, file: Any):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._file.flush()


def _atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    """Save under a temporary name, fsync, rename: `path` keeps its previous checkpoint until the new one is whole.
    A full disk removes the temporary file and is one line naming `path` (see pcd.pipeline.atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with failed_write_removes(tmp, path):
        with open(tmp, "wb") as f:
            sink = _ErrorKeepingFile(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain lists, so that weights_only loading accepts them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]}}


def _restore_rng(states: list[dict[str, Any]], ctx: Context) -> None:
    if len(states) != ctx.world_size:
        if ctx.is_main:
            console.print(f"[yellow]checkpoint was written by {len(states)} ranks, now {ctx.world_size}: random "
                          "state is re-seeded, so the resumed run is not bit-identical[/yellow]")
        _seed_everything(ctx.seed + 7919 * (len(states) + 1) + 1000 * ctx.rank)
        return
    state = states[ctx.rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if torch.is_tensor(batch):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _progress(ctx: Context, runtime: RuntimeConfig, epoch: int, epochs: int, steps: int,
              completed: int) -> Optional[Progress]:
    """A live bar for the epoch on a terminal; none in logs and pipes, where the epoch lines say it all (a transient
    bar there leaves only a blank line per epoch)."""
    if not (ctx.is_main and runtime.progress and console.is_terminal):
        return None
    progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=True)
    progress.add_task("train", total=steps, completed=completed, info="")
    progress.start()
    return progress


def _read_log_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every record of a metrics.jsonl. A torn last line (a kill or a full disk during its write)
    is dropped with a warning; a bad line before the last is damage this code did not make, and stops the run."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines):
                console.print(f"[yellow]{path}: dropped its torn last line (line {number}, written when a run "
                              "stopped mid-write)[/yellow]")
                break
            raise PcdError(f"{path}: line {number} is not a JSON record ({exc}); repair or remove the file") from None
        records.append((line, record))
    return records


class _Logger:
    """JSONL + TensorBoard (+ Weights & Biases with `--log wandb`) on rank 0. On resume, the records written after
    the checkpoint are dropped (no duplicates): those of later epochs and of the resumed epoch's later steps."""

    def __init__(self, run_dir: Path, ctx: Context, runtime: RuntimeConfig, config: dict[str, Any],
                 purge_from_epoch: int, keep_train_until: int):
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in _read_log_records(self.path)
                    if line[1].get("epoch", 0) < purge_from_epoch
                    or (line[1].get("epoch") == purge_from_epoch and line[1].get("kind") == "train"
                        and line[1].get("step", 0) <= keep_train_until)]
            tmp = temporary_path(self.path)
            with failed_write_removes(tmp, self.path):
                tmp.write_text("".join(text + "\n" for text, _ in kept))
                os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=keep_train_until + 1 if keep_train_until else None)
        self._wandb = WandbLog(run_dir, config) if "wandb" in runtime.log else None

    def log(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:  # write() errors carry no file name: say which file
            raise no_space(self.path) if is_no_space(exc) else PcdError(
                f"{self.path}: cannot append ({exc.strerror or exc})") from None
        prefix = record["kind"]
        for key, value in record.items():
            if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self._wandb:
            self._wandb.log(record)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
        if self._wandb:
            self._wandb.close()
