"""`pcd finetune partseg`: Point-MAE's part-segmentation model on ShapeNetPart, on pcd's one runtime.

The config and its defaults are `pcd.trainer.partseg.config`; `--init` is `pcd.trainer.initialization` (the
weights decide the frame the shapes are converted into); training is `pcd.trainer.runtime.train`. By default the
model trains on trainval and the last epoch is the result; `select_on_val` trains on the train list and keeps
`checkpoints/best.pt` by instance mIoU on the val list (scored on every point). The test list is never looked at.
The loss is cross-entropy of the logits (Point-MAE: NLL of their log_softmax, the same).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from pcd.trainer.finetune_task import FinetuneTask
from pcd.trainer.frames import frame_named
from pcd.trainer.initialization import InitPlan, plan_init
from pcd.trainer.partseg.config import Config
from pcd.trainer.partseg.data import ShapeNetPart
from pcd.trainer.partseg.evaluate import evaluate_split
from pcd.trainer.partseg.inputs import TrainingSamples, collate
from pcd.trainer.partseg.model import PointMAEPartSegmenter
from pcd.trainer.runtime import Context, check_run_dir, train

console = Console(stderr=True)
__all__ = ["Config", "PartSegTask", "run"]


class PartSegTask(FinetuneTask):
    """Per-point cross-entropy on Point-MAE's samples; mIoU on the val list when selecting on it."""

    build = staticmethod(PointMAEPartSegmenter)
    collate = staticmethod(collate)

    def __init__(self, cfg: Config, train_data: ShapeNetPart, val_data: Optional[ShapeNetPart],
                 init_plan: Optional[InitPlan] = None):
        super().__init__(cfg, init_plan)
        self.frame = frame_named(cfg.frame)
        self.train_set = TrainingSamples(train_data, self.frame, cfg.num_points, cfg.augment)
        self.val_data = val_data
        self.best_metric = ("val_instance_miou", "max") if val_data is not None else None

    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["points"], batch["category"])  # (B, N, parts)
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch["seg"])
        return loss, {"point_accuracy": (logits.detach().argmax(-1) == batch["seg"]).float().mean()}

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        """Instance and class mIoU on the val list, every point scored (never the test list)."""
        if self.val_data is None:
            return {}
        scores, _ = evaluate_split(model, self.val_data, self.frame, self.cfg.num_points, self.cfg.eval_seed,
                                   "all-points", ctx.device, ctx.batch_size, 8192, 0)
        result = scores.result()
        return {"val_instance_miou": float(result["instance_miou"]), "val_class_miou": float(result["class_miou"])}


def run(cfg: Config) -> int:
    check_run_dir(cfg.run_dir, cfg.runtime.resume)
    plan = plan_init(cfg.init, cfg.model.backbone)
    cfg.frame = plan.frame.name
    train_split = "train" if cfg.select_on_val else "trainval"
    train_data = ShapeNetPart(cfg.data_dir, train_split, cache_dir=cfg.cache_dir, show_progress=True)
    val_data = ShapeNetPart(cfg.data_dir, "val", cache_dir=cfg.cache_dir) if cfg.select_on_val else None
    console.print(f"data: {len(train_data)} {train_split} shapes (y up) -> frame '{plan.frame.name}' "
                  f"({plan.frame.up} up{', unit sphere' if plan.frame.unit_sphere else ''})"
                  + (f"; best.pt chosen on {len(val_data)} val shapes" if val_data is not None else ""))
    task = PartSegTask(cfg, train_data, val_data, plan)
    summary = train(task, cfg.optim, cfg.runtime, cfg.run_dir)
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("eval"):
        console.print("final validation: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
    return 0
