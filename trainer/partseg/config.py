"""The config of `pcd finetune partseg` (read back by `pcd evaluate partseg`, which imports no training code).

Defaults are the paper's ShapeNetPart setting with Point-MAE's `segmentation/main.py` where the paper is silent:
2,048 points (drawn with replacement, as Point-MAE), 128 patches of 32, AdamW lr 2e-4, weight decay 0.05,
300 epochs, batch 16, cosine per epoch with 10 warm-up epochs (lr_min 1e-6), random scale U(0.8, 1.25) and shift
±0.1, gradient clipping at 10. Point-MAE calls `optimizer.step()` twice per iteration (before and after
clipping); pcd steps once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pcd.pipeline.config import InvalidSetting, non_negative, positive, setting
from pcd.trainer.frames import PCD_FRAME
from pcd.trainer.partseg.model import PartSegConfig
from pcd.trainer.runtime import OptimConfig, RuntimeConfig


def partseg_optim() -> OptimConfig:
    return OptimConfig(lr=2e-4, weight_decay=0.05, epochs=300, warmup_epochs=10, warmup_start_lr=1e-6, min_lr=1e-6,
                       grad_clip=10.0, batch_size=16, schedule_unit="epoch")


@dataclass
class Config:
    data_dir: Path = Path("data/shapenetcore_partanno_segmentation_benchmark_v0_normal")
    run_dir: Path = Path("runs/partseg")
    init: Optional[Path] = None          # pcd export or Point-MAE checkpoint; none = from scratch
    cache_dir: Optional[Path] = None     # where pcd's parsed copy of the txt files goes (default DATA_DIR/pcd_cache)
    num_points: int = setting(2048, positive)  # points the model sees per shape
    select_on_val: bool = False          # train on the train list and keep best.pt by instance mIoU on the val list
    augment: bool = True                 # one scale U(0.8, 1.25), then a shift U(-0.1, 0.1) per axis
    eval_seed: int = setting(0, non_negative)  # seed of the points sampled for validation during training
    frame: str = PCD_FRAME.name          # the frame of the weights; set from --init, recorded in every checkpoint
    model: PartSegConfig = field(default_factory=PartSegConfig)
    optim: OptimConfig = field(default_factory=partseg_optim)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        try:
            self.model.backbone.check_points(self.num_points)
        except InvalidSetting as exc:
            raise InvalidSetting(f"model.backbone.{exc.key}", exc.reason) from None
