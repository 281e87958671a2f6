"""`pcd finetune semseg`: the paper's ScanNet semantic segmentation on pcd's one runtime.

The config and its defaults are `pcd.trainer.semseg.config`; `--init` is `pcd.trainer.initialization` (the
weights decide the frame each crop is put into); training is `pcd.trainer.runtime.train`. The loss is
cross-entropy over the 20 classes on every sampled point, ignoring `IGNORE_INDEX` (unannotated and non-benchmark
vertices), without class weights. With a validation split, every `eval_every` epochs every vertex of its scenes
is labelled (one seeded pass, as `pcd evaluate semseg`) and `checkpoints/best.pt` keeps the best mIoU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from pcd.pipeline.errors import PcdError
from pcd.trainer.finetune_task import FinetuneTask
from pcd.trainer.frames import frame_named
from pcd.trainer.initialization import InitPlan, plan_init, warn_overlap
from pcd.trainer.runtime import Context, check_run_dir, train
from pcd.trainer.semseg.classes import IGNORE_INDEX
from pcd.trainer.semseg.config import Config
from pcd.trainer.semseg.data import SemSegScenes, read_scene_ids
from pcd.trainer.semseg.evaluate import SceneSegmenter, segment_scenes
from pcd.trainer.semseg.inputs import TrainingSamples, collate
from pcd.trainer.semseg.model import PointMAESemSegmenter

console = Console(stderr=True)
__all__ = ["Config", "SemSegTask", "run"]


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the points whose label is not `IGNORE_INDEX` (0 when a batch has none)."""
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return losses / (labels != IGNORE_INDEX).sum().clamp_min(1)


class SemSegTask(FinetuneTask):
    """Per-point cross-entropy on sampled crops; whole-scene mIoU on the validation split."""

    build = staticmethod(PointMAESemSegmenter)
    collate = staticmethod(collate)

    def __init__(self, cfg: Config, train_scenes: SemSegScenes, val_scenes: Optional[SemSegScenes],
                 init_plan: Optional[InitPlan] = None):
        super().__init__(cfg, init_plan)
        self.frame = frame_named(cfg.frame)
        self.train_set = TrainingSamples(train_scenes, self.frame, cfg.num_points, cfg.crop, cfg.column_size,
                                         cfg.samples_per_scene, cfg.augment, cfg.rotate_degrees)
        self.val_scenes = val_scenes
        self.best_metric = ("val_miou", "max") if val_scenes is not None else None

    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["points"])  # (B, N, classes)
        labels = batch["labels"]
        scored = labels != IGNORE_INDEX
        correct = ((logits.detach().argmax(-1) == labels) & scored).sum() / scored.sum().clamp_min(1)
        return segmentation_loss(logits, labels), {"point_accuracy": correct}

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        """mIoU on every vertex of the validation scenes (one seeded pass), computed on rank 0 and shared."""
        if self.val_scenes is None:
            return {}
        result: dict[str, float] = {}
        if ctx.is_main:
            segmenter = SceneSegmenter(model, self.frame, self.cfg, ctx.device, self.cfg.eval_stride)
            scored = segment_scenes(segmenter, self.val_scenes, [self.cfg.eval_seed])["passes"][0]
            result = {"val_miou": scored["miou"], "val_accuracy": scored["accuracy"],
                      "val_block_miou": scored["block_miou"]}
        if ctx.distributed:
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        return result


def default_split(given: Optional[Path], data_dir: Path, name: str) -> Optional[Path]:
    if given is not None:
        return given
    candidate = Path(data_dir) / name
    return candidate if candidate.is_file() else None


def run(cfg: Config) -> int:
    check_run_dir(cfg.run_dir, cfg.runtime.resume)
    if not Path(cfg.data_dir).is_dir():
        raise PcdError(f"{cfg.data_dir}: no such folder (the output of `pcd prepare scannet`)")
    cfg.train_split = default_split(cfg.train_split, cfg.data_dir, "scannetv2_train.txt")
    if cfg.train_split is None:
        raise PcdError(f"{cfg.data_dir}: no scannetv2_train.txt here; pass --train-split")
    cfg.val_split = default_split(cfg.val_split, cfg.data_dir, "scannetv2_val.txt")
    train_scenes = SemSegScenes(cfg.data_dir, read_scene_ids(cfg.data_dir, cfg.train_split))
    val_scenes = SemSegScenes(cfg.data_dir, read_scene_ids(cfg.data_dir, cfg.val_split)) if cfg.val_split else None
    plan = plan_init(cfg.init, cfg.model.backbone)
    cfg.frame = plan.frame.name
    if val_scenes is not None:
        warn_overlap(plan.pretrain_scenes, val_scenes.scenes, "validation")
    console.print(f"data: {len(train_scenes)} training scenes ({cfg.crop} crops of {cfg.num_points} points) -> "
                  f"frame '{plan.frame.name}'"
                  + (f"; every vertex of {len(val_scenes)} validation scenes scored "
                     + (f"every {cfg.runtime.eval_every} epochs and after the last" if cfg.runtime.eval_every
                        else "never during training (runtime.eval_every 0)")
                     if val_scenes is not None else "; no validation split"))
    task = SemSegTask(cfg, train_scenes, val_scenes, plan)
    summary = train(task, cfg.optim, cfg.runtime, cfg.run_dir)
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("eval"):
        console.print("final validation: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
    return 0
