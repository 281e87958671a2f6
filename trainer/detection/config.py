"""The config of `pcd finetune detection`, in its own module so that evaluation reads a run's config.json without
importing training code.

Defaults are the paper's detection setting (12-block 384-wide backbone, 2,048 patch centres, 40,000 points)
with 3DETR's ScanNet recipe where the paper is silent: AdamW lr 5e-4, weight decay 0.1 on every parameter
(3DETR does not exempt biases or norms), 9 warm-up epochs from 1e-6 then cosine to 1e-6, gradient clipping at
0.1, 720 epochs, batch 8, evaluation every 10 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pcd.pipeline.config import InvalidSetting, non_negative, positive, setting
from pcd.trainer.detection.ap import APConfig
from pcd.trainer.detection.model import DetectorConfig
from pcd.trainer.runtime import OptimConfig, RuntimeConfig


@dataclass
class LossConfig:
    """Weights of 3DETR's ScanNet scripts (giou 1, background 0.25) and its matcher defaults."""

    matcher_cls: float = setting(1.0, non_negative)
    matcher_giou: float = setting(2.0, non_negative)
    matcher_center: float = setting(0.0, non_negative)
    matcher_objectness: float = setting(0.0, non_negative)
    loss_cls: float = setting(1.0, non_negative)
    loss_center: float = setting(5.0, non_negative)
    loss_size: float = setting(1.0, non_negative)
    loss_giou: float = setting(1.0, non_negative)
    no_object_weight: float = setting(0.25, non_negative)


def detection_optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, weight_decay=0.1, epochs=720, warmup_epochs=9, warmup_start_lr=1e-6,
                       min_lr=1e-6, grad_clip=0.1, batch_size=8)


def detection_runtime() -> RuntimeConfig:
    return RuntimeConfig(eval_every=10)


@dataclass
class Config:
    data_dir: Path = Path("scannet_detection_data")
    run_dir: Path = Path("runs/detection")
    train_split: Optional[Path] = None   # default: DATA_DIR/scannetv2_train.txt
    val_split: Optional[Path] = None     # default: DATA_DIR/scannetv2_val.txt when present; none = no evaluation
    init: Optional[Path] = None          # pcd export (folder/.safetensors/.pth) or Point-MAE checkpoint; none = scratch
    num_points: int = setting(40000, positive)
    augment: bool = True
    random_cuboid: bool = True
    cuboid_min_points: int = setting(30000, non_negative)
    # passes over the training scenes per epoch (tiny data: fewer checkpoints)
    epoch_repeats: int = setting(1, positive)
    eval_seed: int = setting(0, non_negative)  # seed of the point sampling of evaluations during training
    model: DetectorConfig = field(default_factory=DetectorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ap: APConfig = field(default_factory=APConfig)
    optim: OptimConfig = field(default_factory=detection_optim)
    runtime: RuntimeConfig = field(default_factory=detection_runtime)

    def validate(self) -> None:
        try:
            self.model.backbone.check_points(self.num_points)
        except InvalidSetting as exc:
            raise InvalidSetting(f"model.backbone.{exc.key}", exc.reason) from None
