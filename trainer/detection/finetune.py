"""`pcd finetune detection`: 3DETR on ScanNet with the pre-trained backbone as encoder, on pcd's one runtime.

The config and its defaults (the paper's detection setting with 3DETR's recipe) are in
`pcd.trainer.detection.config`. Training itself (devices, bf16, torchrun, checkpoints, resume, logs) is
`pcd.trainer.runtime.train`; `--init` is `pcd.trainer.initialization`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from pcd.pipeline.errors import PcdError
from pcd.trainer.detection.boxes import NUM_CLASSES
from pcd.trainer.detection.config import Config
from pcd.trainer.detection.criterion import SetCriterion
from pcd.trainer.detection.dataset import DetectionDataset, collate, read_scene_list
from pcd.trainer.detection.evaluate import evaluate_detector
from pcd.trainer.detection.model import build_detector
from pcd.trainer.finetune_task import FinetuneTask
from pcd.trainer.initialization import InitPlan, plan_init, warn_overlap
from pcd.trainer.runtime import Context, OptimConfig, train

console = Console(stderr=True)
__all__ = ["Config", "DetectionTask", "check_init", "run"]


class EpochSamples(torch.utils.data.Dataset):
    """One rank's samples of one epoch: scene indices in order, each drawn with its own (seed, epoch, slot) key."""

    def __init__(self, dataset: DetectionDataset, plan: list[tuple[int, int]], epoch: int):
        self.dataset, self.plan, self.epoch = dataset, plan, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        scene, slot = self.plan[i]
        return self.dataset.sample(scene, (self.dataset.seed, self.epoch, slot))


def evaluation_loader(dataset: DetectionDataset, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate)


def metrics_summary(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if k.startswith(("mAP_", "mAR_"))}


class DetectionTask(FinetuneTask):
    """3DETR training on prepared ScanNet scenes, evaluated with the VoteNet/3DETR AP protocol."""

    build = staticmethod(build_detector)

    def __init__(self, cfg: Config, train_scenes: list[str], val_scenes: list[str],
                 init_plan: Optional[InitPlan] = None):
        super().__init__(cfg, init_plan)
        self.train_set = DetectionDataset(cfg.data_dir, train_scenes, cfg.num_points, augment=cfg.augment,
                                          use_random_cuboid=cfg.random_cuboid,
                                          cuboid_min_points=cfg.cuboid_min_points, seed=cfg.runtime.seed,
                                          groups=(cfg.model.backbone.num_groups, cfg.model.backbone.group_size)
                                          if cfg.group_in_loader else None)
        self.val_set = DetectionDataset(cfg.data_dir, val_scenes, cfg.num_points, seed=cfg.eval_seed) \
            if val_scenes else None
        self.best_metric = ("mAP_0.25", "max") if val_scenes else None
        self.criterion = SetCriterion(NUM_CLASSES, cfg.loss)

    def init_target(self, model: nn.Module) -> nn.Module:
        """--init loads into the detector's backbone."""
        return model.encoder.backbone

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
        """3DETR decays every parameter (its default without --filter_biases_wd)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": optim.weight_decay}]

    def steps_per_epoch(self, ctx: Context) -> int:
        return max(1, len(self.train_set) * self.cfg.epoch_repeats // ctx.global_batch_size)

    def train_batches(self, ctx: Context, epoch: int) -> Iterable[Any]:
        """Seeded permutations of the scenes, as many as the epoch's steps need, split by rank."""
        return self.train_batches_from(ctx, epoch, 0)

    def train_batches_from(self, ctx: Context, epoch: int, start: int) -> Iterable[Any]:
        """The epoch's batches from batch `start` on: each sample is drawn with its own (seed, epoch, slot) key, so
        a resumed run cuts the epoch's plan and reads nothing for the batches it already took."""
        rng = np.random.default_rng([ctx.seed, epoch])
        needed = self.steps_per_epoch(ctx) * ctx.global_batch_size
        order: list[int] = []
        while len(order) < needed:
            order.extend(rng.permutation(len(self.train_set)).tolist())
        plan = [(scene, slot) for slot, scene in enumerate(order[:needed])][ctx.rank::ctx.world_size]
        plan = plan[start * ctx.batch_size:]
        return torch.utils.data.DataLoader(EpochSamples(self.train_set, plan, epoch), batch_size=ctx.batch_size,
                                           shuffle=False, num_workers=ctx.workers, collate_fn=collate,
                                           drop_last=True, persistent_workers=False)

    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        groups = (batch["group_center_idx"], batch["group_patch_idx"]) if "group_center_idx" in batch else None
        layers = model(batch["point_clouds"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"], groups)
        with torch.autocast(device_type=ctx.device.type, enabled=False):
            layers = [{k: v.float() for k, v in out.items()} for out in layers]
            return self.criterion(layers, batch)

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        """AP on the validation split, computed on rank 0 and shared so every rank can track the best epoch."""
        if self.val_set is None:
            return {}
        result = None
        if ctx.is_main:
            loader = evaluation_loader(self.val_set, ctx.batch_size, ctx.workers)
            result = metrics_summary(evaluate_detector(model, loader, ctx.device, self.cfg.ap))
        if ctx.distributed:
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        return result


def resolve_split(given: Optional[Path], data_dir: Path, default_name: str) -> Optional[Path]:
    if given is not None:
        return given
    candidate = data_dir / default_name
    return candidate if candidate.is_file() else None


def check_init(cfg: Config, eval_scenes: list[str]) -> InitPlan:
    """Check --init against this config before anything is written; adopt its architecture and frame."""
    plan = plan_init(cfg.init, cfg.model.backbone)
    cfg.model.frame = plan.frame.name
    warn_overlap(plan.pretrain_scenes, eval_scenes, "evaluation")
    return plan


def final_evaluation_line(evaluation: dict[str, float]) -> str:
    """The last epoch's metrics in the format of the epoch lines above it (fractions, 4 decimals)."""
    return "final evaluation: " + "  ".join(f"{name} {value:.4f}" for name, value in evaluation.items())


def run(cfg: Config) -> int:
    if not Path(cfg.data_dir).is_dir():
        raise PcdError(f"{cfg.data_dir}: no such folder (the output of `pcd prepare scannet`)")
    train_split = resolve_split(cfg.train_split, cfg.data_dir, "scannetv2_train.txt")
    if train_split is None:
        raise PcdError(f"{cfg.data_dir}: no scannetv2_train.txt here; pass --train-split")
    cfg.train_split = train_split
    cfg.val_split = resolve_split(cfg.val_split, cfg.data_dir, "scannetv2_val.txt")
    train_scenes = read_scene_list(train_split, cfg.data_dir, console)
    val_scenes = read_scene_list(cfg.val_split, cfg.data_dir, console) if cfg.val_split else []
    if not val_scenes:
        console.print("[yellow]no validation split: training without evaluation[/yellow]")
    init_plan = check_init(cfg, val_scenes)
    task = DetectionTask(cfg, train_scenes, val_scenes, init_plan)
    summary = train(task, cfg.optim, cfg.runtime, cfg.run_dir)
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("eval"):
        console.print(final_evaluation_line(summary["eval"]))
    return 0
