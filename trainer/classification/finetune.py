"""`pcd finetune classification`: Point-MAE's classifier on ModelNet40 or ScanObjectNN, on pcd's one runtime.

The config and its defaults are `pcd.trainer.classification.config`; `--init` is `pcd.trainer.initialization`
(the weights decide the frame the data is converted into); training is `pcd.trainer.runtime.train` (AdamW, the
per-epoch cosine schedule, no weight decay on 1-D parameters and the cls token/position, drop path in the
backbone, gradient clipping). The test set is never looked at: with `val_fraction` > 0 a stratified share of the
training set is held out and `checkpoints/best.pt` is the epoch with the best accuracy on it; otherwise the
last epoch is the result.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from pcd.pipeline.errors import PcdError
from pcd.trainer.classification.config import Config
from pcd.trainer.classification.data import ClassificationDataset
from pcd.trainer.classification.evaluate import loader, predict
from pcd.trainer.classification.inputs import (EvaluationSamples, TrainingSamples, collate, open_split,
                                               stratified_split)
from pcd.trainer.classification.metric import accuracy_scores
from pcd.trainer.classification.model import PointMAEClassifier
from pcd.trainer.finetune_task import FinetuneTask
from pcd.trainer.frames import frame_named
from pcd.trainer.initialization import InitPlan, plan_init
from pcd.trainer.runtime import Context, check_run_dir, train

console = Console(stderr=True)
__all__ = ["ClassificationTask", "Config", "run"]


class ClassificationTask(FinetuneTask):
    """Cross-entropy on Point-MAE's samples; accuracy on the held-out validation split when there is one."""

    build = staticmethod(PointMAEClassifier)
    collate = staticmethod(collate)

    def __init__(self, cfg: Config, init_plan: Optional[InitPlan] = None,
                 data: Optional[ClassificationDataset] = None):
        super().__init__(cfg, init_plan)
        self.frame = frame_named(cfg.frame)
        self.data = data if data is not None else open_split(cfg.data_dir, "train", cfg.variant, cfg.cache_dir, cfg.cache_points)
        train_idx, val_idx = stratified_split(self.data.labels, cfg.val_fraction, cfg.val_seed)
        self.train_set = TrainingSamples(self.data, train_idx, self.frame, cfg.num_points, cfg.augment)
        self.val_set = EvaluationSamples(self.data, val_idx, self.frame, cfg.num_points) if len(val_idx) else None
        self.best_metric = ("val_overall_accuracy", "max") if self.val_set is not None else None

    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["points"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"train_accuracy": (logits.detach().argmax(-1) == batch["label"]).float().mean()}

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        """Accuracy on the validation split held out of the training set (never the test set); float32 (the
        runtime calls evaluations with autocast off)."""
        if self.val_set is None:
            return {}
        logits, labels = predict(model, loader(self.val_set, ctx.batch_size, ctx.workers), ctx.device)
        scores = accuracy_scores(logits, labels)
        return {f"val_{k}": v for k, v in scores.items()}


def run(cfg: Config) -> int:
    check_run_dir(cfg.run_dir, cfg.runtime.resume)
    plan = plan_init(cfg.init, cfg.model.backbone)
    cfg.frame = plan.frame.name
    data = open_split(cfg.data_dir, "train", cfg.variant, cfg.cache_dir, cfg.cache_points)
    if data.num_classes != cfg.model.num_classes:
        console.print(f"classes: {data.num_classes} in {cfg.data_dir} (the config said {cfg.model.num_classes})")
        cfg.model.num_classes = data.num_classes
    if cfg.num_points > data.points.shape[1]:
        raise PcdError(f"{cfg.data_dir}: shapes have {data.points.shape[1]} points, fewer than num_points "
                       f"{cfg.num_points}")
    console.print(f"data: {len(data)} training shapes ({data.layout}, y up) -> frame '{plan.frame.name}' "
                  f"({plan.frame.up} up{', unit sphere' if plan.frame.unit_sphere else ''})")
    task = ClassificationTask(cfg, plan, data)
    if task.val_set is not None:
        console.print(f"validation: {len(task.val_set)} training shapes held out (stratified, seed {cfg.val_seed}) "
                      "to choose checkpoints/best.pt")
    summary = train(task, cfg.optim, cfg.runtime, cfg.run_dir)
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("eval"):
        console.print("final validation: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
    return 0
