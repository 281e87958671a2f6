"""The config of `pcd finetune semseg` (read back by `pcd evaluate semseg` and `pcd predict semseg`, which import
no training code).

Defaults are the paper's ScanNet setting (appendix A: 8,192 points, 256 patches of 32, Adam lr 1e-3, weight
decay 1e-2, 200 epochs) with pcd's choices where it is silent (docs/semseg.md): the crop is PointNet++'s 1.5 m
full-height column (`--preset paper-whole-scene`: 8,192 points of the whole scene; the paper does not say
which), one crop per training scene per epoch (PointNet++'s epoch), batch 32 (PointNet++'s), Adam's L2 weight
decay on every weight but norms and biases, cosine per epoch from 1e-3 to 1e-6 without warm-up, and 3DETR's
ScanNet flips and ±5° rotation about z (its cuboid crop is not used: the column is the crop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pcd.pipeline.config import InvalidSetting, non_negative, positive, setting
from pcd.trainer.frames import PCD_FRAME
from pcd.trainer.runtime import OptimConfig, RuntimeConfig
from pcd.trainer.semseg.data import Crop
from pcd.trainer.semseg.model import SemSegConfig


def semseg_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, weight_decay=1e-2, epochs=200, warmup_epochs=0, min_lr=1e-6, batch_size=32,
                       optimizer="adam", schedule_unit="epoch")


def semseg_runtime() -> RuntimeConfig:
    return RuntimeConfig(eval_every=10)


@dataclass
class Config:
    data_dir: Path = Path("scannet_data")
    run_dir: Path = Path("runs/semseg")
    train_split: Optional[Path] = None   # default: DATA_DIR/scannetv2_train.txt
    val_split: Optional[Path] = None     # default: DATA_DIR/scannetv2_val.txt when present; none = no evaluation
    init: Optional[Path] = None          # pcd export or Point-MAE checkpoint; none = from scratch
    num_points: int = setting(8192, positive)  # points the model reads per crop
    crop: Crop = "column"                # "column" (PointNet++'s ScanNet recipe) or "scene" (whole scene)
    column_size: float = setting(1.5, positive)  # metres, side of a full-height column
    eval_stride: float = setting(0.75, positive)  # metres between evaluation columns (they overlap by half)
    samples_per_scene: int = setting(1, positive)  # training crops per scene and epoch
    augment: bool = True                 # x/y flips and rotation about z (3DETR's ScanNet set, no cuboid crop)
    rotate_degrees: float = setting(5.0, non_negative)
    eval_seed: int = setting(0, non_negative)  # seed of the crop samples of the evaluations during training
    frame: str = PCD_FRAME.name          # the frame of the weights; set from --init, recorded in every checkpoint
    model: SemSegConfig = field(default_factory=SemSegConfig)
    optim: OptimConfig = field(default_factory=semseg_optim)
    runtime: RuntimeConfig = field(default_factory=semseg_runtime)

    def validate(self) -> None:
        if self.crop not in ("column", "scene"):
            raise InvalidSetting("crop", "must be 'column' or 'scene'")
        if self.eval_stride > self.column_size:
            raise InvalidSetting("eval_stride", f"must not exceed column_size ({self.column_size}): the columns "
                                                "would leave vertices unscored")
        try:
            self.model.backbone.check_points(self.num_points)
        except InvalidSetting as exc:
            raise InvalidSetting(f"model.backbone.{exc.key}", exc.reason) from None
