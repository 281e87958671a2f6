"""`pcd finetune detection`: 3DETR on ScanNet with the pre-trained backbone as encoder, on pcd's one runtime.

Defaults are the paper's detection setting (12-block 384-wide backbone, 2,048 patch centres, 40,000 points)
with 3DETR's ScanNet recipe where the paper is silent: AdamW lr 5e-4, weight decay 0.1 on every parameter
(3DETR does not exempt biases or norms), 9 warm-up epochs from 1e-6 then cosine to 1e-6, gradient clipping at
0.1, 720 epochs, batch 8, evaluation every 10 epochs. Training itself (devices, bf16, torchrun, checkpoints,
resume, logs) is `pcd.trainer.runtime.train`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from pcd.pipeline.atomic import atomic_write_json
from pcd.pipeline.config import InvalidSetting, config_to_dict, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.detection.ap import APConfig
from pcd.trainer.detection.boxes import NUM_CLASSES
from pcd.trainer.detection.criterion import LossConfig, SetCriterion
from pcd.trainer.detection.dataset import DetectionDataset, read_scene_list
from pcd.trainer.detection.evaluate import evaluate_detector
from pcd.trainer.detection.model import DetectorConfig, build_detector
from pcd.trainer.normalize import NORMALIZATION
from pcd.trainer.runtime import Context, OptimConfig, RuntimeConfig, Task, train
from pcd.trainer.weights import load_backbone_weights, read_export_metadata

console = Console(stderr=True)
INIT_FILE = "init.json"
ARCHITECTURE_FIELDS = ("trans_dim", "encoder_dims", "depth", "num_heads", "mlp_ratio")


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
    # the backbone's FPS + kNN of each training scene in the loader workers (same picks), off the training step
    group_in_loader: bool = True
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


def collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}


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


class DetectionTask(Task):
    """3DETR training on prepared ScanNet scenes, evaluated with the VoteNet/3DETR AP protocol."""

    def __init__(self, cfg: Config, train_scenes: list[str], val_scenes: list[str],
                 init_record: Optional[dict[str, Any]] = None):
        self.cfg = cfg
        self.init_record = init_record
        self.train_set = DetectionDataset(cfg.data_dir, train_scenes, cfg.num_points, augment=cfg.augment,
                                          use_random_cuboid=cfg.random_cuboid,
                                          cuboid_min_points=cfg.cuboid_min_points, seed=cfg.runtime.seed,
                                          groups=(cfg.model.backbone.num_groups, cfg.model.backbone.group_size)
                                          if cfg.group_in_loader else None)
        self.val_set = DetectionDataset(cfg.data_dir, val_scenes, cfg.num_points, seed=cfg.eval_seed) \
            if val_scenes else None
        self.best_metric = ("mAP_0.25", "max") if val_scenes else None
        self.criterion = SetCriterion(NUM_CLASSES, cfg.loss)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def build_model(self, ctx: Context) -> nn.Module:
        """The detector with --init loaded into its backbone (before anything is written to the run folder)."""
        model = build_detector(self.cfg.model)
        if self.cfg.init is not None:
            report = load_backbone_weights(model.encoder.backbone, self.cfg.init)
            if ctx.is_main:
                console.print(f"init: {report.summary()}")
        elif ctx.is_main:
            console.print("init: none, the backbone starts from random weights")
        return model

    def write_run_records(self, ctx: Context) -> None:
        """Records the init in the run folder, once the runtime has accepted it."""
        if self.init_record is not None:
            atomic_write_json(self.cfg.run_dir / INIT_FILE, self.init_record)

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


def check_init(cfg: Config, eval_scenes: list[str]) -> dict[str, Any]:
    """Check an --init export against this config; adopt its architecture; record what it was trained on."""
    record: dict[str, Any] = {"init": str(cfg.init) if cfg.init else None, "pretrain_scenes": None}
    if cfg.init is None:
        return record
    if not cfg.init.exists():
        raise PcdError(f"{cfg.init}: --init names no such file or folder")
    metadata = read_export_metadata(cfg.init)
    if metadata is None:
        console.print(f"init: {cfg.init} is a foreign checkpoint (no pcd export metadata): its input "
                      f"normalisation and pre-training scenes cannot be checked")
        return record
    name = (metadata.get("normalization") or {}).get("name")
    if name != NORMALIZATION["name"]:
        raise PcdError(f"{cfg.init}: exported with input normalisation '{name}', but this fine-tune feeds the "
                       f"backbone '{NORMALIZATION['name']}'")
    exported = metadata.get("backbone") or {}
    changed = [f"{k} {getattr(cfg.model.backbone, k)} -> {exported[k]}" for k in ARCHITECTURE_FIELDS
               if k in exported and exported[k] != getattr(cfg.model.backbone, k)]
    for key in ARCHITECTURE_FIELDS:
        if key in exported:
            setattr(cfg.model.backbone, key, type(getattr(cfg.model.backbone, key))(exported[key]))
    if changed:
        console.print(f"init: backbone architecture taken from the export ({', '.join(changed)})")
    record["pretrain_scenes"] = list(metadata.get("pretrain_scenes") or [])
    record["normalization"] = metadata.get("normalization")
    warn_overlap(record["pretrain_scenes"], eval_scenes, "evaluation")
    return record


def warn_overlap(pretrain_scenes: Optional[list[str]], eval_scenes: list[str], what: str) -> list[str]:
    """Scenes evaluated that the backbone was pre-trained on; printed as a warning when there are any."""
    overlap = sorted(set(pretrain_scenes or []) & set(eval_scenes))
    if overlap:
        console.print(f"[yellow]warning: {len(overlap)} of the {len(eval_scenes)} {what} scenes were seen in "
                      f"pre-training (e.g. {', '.join(overlap[:3])}); their AP is not a held-out result[/yellow]")
    return overlap


def final_evaluation_line(evaluation: dict[str, float]) -> str:
    """The last epoch's metrics in the format of the epoch lines above it (fractions, 4 decimals)."""
    return "final evaluation: " + "  ".join(f"{name} {value:.4f}" for name, value in evaluation.items())


def run(cfg: Config) -> int:
    if not Path(cfg.data_dir).is_dir():
        raise PcdError(f"{cfg.data_dir}: no such folder (the output of `pcd prepare scannet-detection`)")
    train_split = resolve_split(cfg.train_split, cfg.data_dir, "scannetv2_train.txt")
    if train_split is None:
        raise PcdError(f"{cfg.data_dir}: no scannetv2_train.txt here; pass --train-split")
    cfg.train_split = train_split
    cfg.val_split = resolve_split(cfg.val_split, cfg.data_dir, "scannetv2_val.txt")
    train_scenes = read_scene_list(train_split, cfg.data_dir, console)
    val_scenes = read_scene_list(cfg.val_split, cfg.data_dir, console) if cfg.val_split else []
    if not val_scenes:
        console.print("[yellow]no validation split: training without evaluation[/yellow]")
    init_record = check_init(cfg, val_scenes)
    task = DetectionTask(cfg, train_scenes, val_scenes, init_record)
    summary = train(task, cfg.optim, cfg.runtime, cfg.run_dir)
    if int(os.environ.get("RANK", "0")) == 0 and summary.get("eval"):
        console.print(final_evaluation_line(summary["eval"]))
    return 0
