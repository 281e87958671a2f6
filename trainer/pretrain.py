"""`pcd pretrain`: train the point-cloud student with one objective of `pcd.trainer.objectives`, as a Task of the
runtime.

The data are the training shards of `pcd cache-teacher` (or, for an objective that reads no teacher member, such as
`reconstruct`, the shards of `pcd extract-scannet`); the head sizes come from the teacher recorded in their
manifest, so a tiny random teacher's shards train a matching tiny head. The scenes pre-trained on are recorded in
RUN_DIR/pretrain_scenes.txt (and carried into the export) so that a fine-tune can refuse to report results on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from rich.panel import Panel
from torch import nn

from pcd.pipeline.atomic import atomic_write_bytes, atomic_write_json
from pcd.pipeline.config import InvalidSetting, config_to_dict, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer import data
from pcd.trainer.backbone import BackboneConfig
from pcd.trainer.distill import DistillConfig
from pcd.trainer.objectives import OBJECTIVES, Objective, get_objective
from pcd.trainer.reconstruct import LossWeights, ReconstructConfig
from pcd.trainer.runtime import Context, OptimConfig, RuntimeConfig, Task, check_run_dir, console, train


@dataclass
class Config:
    """Defaults are the paper's pre-training: Point-MAE-size backbone, AdamW lr 1e-3, wd 0.05, 10 warm-up epochs,
    cosine over 250 epochs, 4,096 points per frame, global batch 128 (Point-MAE's pre-training batch)."""

    shards_dir: str = "shards"  # a folder, a brace pattern of shards, or an s3:// gs:// http(s):// URL of either
    allow_pipe: bool = False  # let shards_dir be a `pipe:` shell command (see pcd.pipeline.locations)
    run_dir: Path = Path("runs/pretrain")
    split: Optional[Path] = None  # scenes to pre-train on (ScanNet's train split); None: every scene in the shards
    val_split: Optional[Path] = None  # held-out scenes for the validation distillation loss
    init: Optional[Path] = None  # backbone initialisation: a pcd export or a Point-MAE checkpoint
    num_points: int = setting(4096, positive)
    augment: bool = True  # random scale U(2/3, 3/2) per axis and translation U(-0.2, 0.2)
    # samples per loader worker mixed before batching (frames of a scene are adjacent)
    shuffle_buffer: int = setting(512, non_negative)
    objective: str = "distill"  # a name in pcd.trainer.objectives.OBJECTIVES
    model: BackboneConfig = field(default_factory=BackboneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)  # distill+reconstruct only
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        try:
            self.model.check_points(self.num_points)
        except InvalidSetting as exc:
            raise InvalidSetting(f"model.{exc.key}", exc.reason) from None
        if self.objective not in OBJECTIVES:
            raise InvalidSetting("objective", f"is not one of {', '.join(OBJECTIVES)}")
        try:
            self.reconstruct.check_for(self.model)
        except InvalidSetting as exc:
            raise InvalidSetting(f"reconstruct.{exc.key}", exc.reason) from None
        heads = self.distill.concept_heads
        if heads is not None and self.model.trans_dim % heads:
            raise InvalidSetting("distill.concept_heads", f"must divide model.trans_dim ({self.model.trans_dim})")


class PretrainTask(Task):
    """Pre-training: the objective's `model.loss` on streamed shards, validation loss on held-out ones."""

    def __init__(self, cfg: Config, train_set: data.ShardSelection, val_set: Optional[data.ShardSelection]):
        self.cfg = cfg
        self.objective: Objective = get_objective(cfg.objective)
        self.train_set = train_set
        self.val_set = val_set

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def write_run_records(self, ctx: Context) -> None:
        """The run's scenes and teacher, once the runtime has accepted the run folder (so a refused run overwrites
        nothing)."""
        run_dir = Path(self.cfg.run_dir)
        atomic_write_bytes(run_dir / "pretrain_scenes.txt", "".join(f"{s}\n" for s in self.train_set.scenes).encode())
        if self.objective.needs_teacher:
            atomic_write_json(run_dir / "teacher.json", self.train_set.teacher)

    def build_model(self, ctx: Context) -> nn.Module:
        """The student, with --init loaded into its backbone (before anything is written to the run folder)."""
        model = self.objective.build(self.cfg, self.train_set.teacher)
        if self.cfg.init is not None:
            from pcd.trainer.weights import load_backbone_weights

            report = load_backbone_weights(model.backbone, self.cfg.init)
            if ctx.is_main:
                console.print(f"init {self.cfg.init}: {report.summary()}")
        return model

    def steps_per_epoch(self, ctx: Context) -> int:
        return data.steps_per_epoch(self.train_set.num_samples, ctx.global_batch_size)

    def train_batches(self, ctx: Context, epoch: int) -> Iterable[Any]:
        return data.train_loader(self.train_set, batch_size=ctx.batch_size, num_points=self.cfg.num_points,
                                 seed=ctx.seed, epoch=epoch, rank=ctx.rank, world_size=ctx.world_size,
                                 workers=ctx.workers, augment=self.cfg.augment,
                                 shuffle_buffer=self.cfg.shuffle_buffer, pin_memory=ctx.device.type == "cuda",
                                 members=self.objective.members)

    def training_step(self, model: nn.Module, batch: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = model.loss(batch)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    def evaluate(self, model: nn.Module, ctx: Context, epoch: int) -> dict[str, float]:
        """Mean loss over every held-out sample (each rank reads its share; sums are all-reduced). Reconstruction
        masks are drawn from a generator seeded by (seed, rank), so the same run validates on the same masks."""
        if self.val_set is None:
            return {}
        total, count = 0.0, 0
        generator = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.rank)
        for batch in data.val_loader(self.val_set, batch_size=ctx.batch_size, num_points=self.cfg.num_points,
                                     seed=ctx.seed, workers=ctx.workers, pin_memory=ctx.device.type == "cuda",
                                     members=self.objective.members):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            loss, _ = model.loss(batch, generator)
            n = batch["points"].shape[0]
            total += float(loss) * n
            count += n
        sums = ctx.all_reduce_sum({"loss": total, "count": count})
        return {"val_loss": sums["loss"] / max(sums["count"], 1.0)}


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _check_scene_record(path: Path, scenes: list[str], resume: bool) -> None:
    """On resume the run must keep pre-training on the scenes it recorded, or its record would be wrong."""
    if resume and path.is_file():
        recorded = [s for s in path.read_text().splitlines() if s]
        if recorded != scenes:
            raise PcdError(f"{path}: this run pre-trained on {len(recorded)} other scenes; resume with the same split")


def run(cfg: Config) -> int:
    main = _is_main_process()
    objective = get_objective(cfg.objective)
    if cfg.init is not None and not Path(cfg.init).exists():  # before anything is written to the run folder
        raise PcdError(f"{cfg.init}: --init names no such file or folder")
    train_set = data.select_shards(cfg.shards_dir, cfg.split, allow_pipe=cfg.allow_pipe)
    train_set.require(objective.members, f"objective '{cfg.objective}'")
    if cfg.split is None and main:
        console.print(Panel(
            f"No --split given: pre-training on EVERY scene in {cfg.shards_dir}. For real ScanNet give the train "
            "split (scannetv2_train.txt), or fine-tuning results on these scenes will not be clean.",
            title="warning: no split", style="bold yellow"))
    val_set = (data.select_shards(cfg.shards_dir, cfg.val_split, allow_pipe=cfg.allow_pipe)
               if cfg.val_split is not None else None)
    if val_set is not None:
        val_set.require(objective.members, f"objective '{cfg.objective}'")
    if val_set is not None:
        overlap = sorted(set(train_set.scenes) & set(val_set.scenes))
        if overlap:
            raise PcdError(f"{cfg.val_split}: {len(overlap)} validation scene(s) are also pre-training scenes "
                           f"({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''})")
    for selection, split in ((train_set, cfg.split), (val_set, cfg.val_split)):
        if selection is not None and selection.missing and main:
            console.print(f"[yellow]warning: {len(selection.missing)} scene(s) of {split} have no shard in "
                          f"{cfg.shards_dir} ({', '.join(selection.missing[:5])}"
                          f"{', ...' if len(selection.missing) > 5 else ''}); they are left out[/yellow]")
    teacher = train_set.teacher if objective.needs_teacher else None
    if teacher is not None and teacher.get("random") and main:
        console.print(Panel(
            f"The shards in {cfg.shards_dir} were cached from a RANDOM teacher ({teacher.get('name', '?')}): the "
            "student learns nothing meaningful. Fine for tests and the demo only.",
            title="warning: random teacher", style="bold red"))
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, cfg.runtime.resume)
    if main:
        scenes_path = run_dir / "pretrain_scenes.txt"
        _check_scene_record(scenes_path, train_set.scenes, cfg.runtime.resume)
        console.print(f"pre-training ({cfg.objective}) on {train_set.num_samples:,} frames of "
                      f"{len(train_set.scenes)} scenes "
                      f"({len(train_set.urls)} shards)" + (f"; validation on {val_set.num_samples:,} frames of "
                                                           f"{len(val_set.scenes)} scenes" if val_set else ""))
    summary = train(PretrainTask(cfg, train_set, val_set), cfg.optim, cfg.runtime, run_dir)
    if main and summary["epoch_losses"]:
        curve = "  ".join(f"{loss:.4f}" for _, loss in sorted(summary["epoch_losses"].items()))
        console.print(f"loss per epoch: {curve}")
        if summary["eval"]:
            console.print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
        console.print(f"run folder: {run_dir}")
    return 0
