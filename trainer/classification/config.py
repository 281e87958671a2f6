"""The config of `pcd finetune classification` (read back by `pcd evaluate classification`, which imports no
training code).

Defaults are the paper's appendix A for ModelNet40 (1,024 points, 64 patches of 32, AdamW lr 5e-4, weight decay
0.05, 300 epochs, random scale and translate) with Point-MAE's `finetune_modelnet.yaml` where the paper is silent:
global batch 32, cosine schedule stepped per epoch with 10 warm-up epochs from 1e-6 (lr_min 1e-6), drop path 0.1,
gradient clipping at 10, and training points drawn as FPS to 1,200 then a random 1,024. The `scanobjectnn` preset
is Point-MAE's ScanObjectNN config (2,048 points, 128 patches of 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pcd.pipeline.config import InvalidSetting, fraction, non_negative, positive, setting
from pcd.trainer.classification.model import ClassifierConfig
from pcd.trainer.frames import PCD_FRAME
from pcd.trainer.runtime import OptimConfig, RuntimeConfig


def classification_optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, weight_decay=0.05, epochs=300, warmup_epochs=10, warmup_start_lr=1e-6, min_lr=1e-6,
                       grad_clip=10.0, batch_size=32, schedule_unit="epoch")


@dataclass
class Config:
    data_dir: Path = Path("data/ModelNet/modelnet40_normal_resampled")
    run_dir: Path = Path("runs/classification")
    init: Optional[Path] = None          # pcd export or Point-MAE checkpoint; none = from scratch
    variant: str = "OBJ_BG"              # ScanObjectNN only: OBJ_BG, OBJ_ONLY or PB_T50_RS
    cache_dir: Optional[Path] = None     # ModelNet40 txt: where pcd's FPS cache goes (default DATA_DIR/pcd_cache)
    cache_points: int = setting(8192, positive)  # ModelNet40 txt: FPS points per shape in its cache (Point-MAE: 8,192)
    num_points: int = setting(1024, positive)  # points the model sees per shape
    # stratified share of the training set held out to choose best.pt; 0: none
    val_fraction: float = setting(0.0, fraction)
    val_seed: int = setting(0, non_negative)  # seed of that split (recorded, so the split can be rebuilt)
    augment: bool = True                 # Point-MAE's scale (per axis U(2/3, 3/2)) and translate (U(-0.2, 0.2))
    frame: str = PCD_FRAME.name          # the frame of the weights; set from --init, recorded in every checkpoint
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(default_factory=classification_optim)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        try:
            self.model.backbone.check_points(self.num_points)
        except InvalidSetting as exc:
            raise InvalidSetting(f"model.backbone.{exc.key}", exc.reason) from None
        if self.num_points > self.cache_points:
            raise InvalidSetting("num_points", f"must not exceed cache_points ({self.cache_points})")
