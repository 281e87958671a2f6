"""The part of a fine-tune's `Task` that every downstream task shares, written once.

A fine-tune's config is its run record, its model is built from `cfg.model` and initialised by `--init` (before
anything is written), `init.json` is written once the runtime holds and has accepted the run folder, and a
map-style training set (`self.train_set`, batched by the task's `collate`) gives each epoch's batches through the
runtime's seeded loader. A task subclasses `FinetuneTask`, names its model class and collate function, builds
`self.train_set` in its `__init__`, and writes its own `training_step` and `evaluate`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from torch import nn

from pcd.pipeline.config import config_to_dict
from pcd.trainer.initialization import InitPlan, load_init, write_init_record
from pcd.trainer.runtime import Context, Task, map_style_loader, map_style_steps


class FinetuneTask(Task):
    """Config record, model with --init, init.json and map-style batches, for every fine-tune."""

    build: Callable[[Any], nn.Module]      # cfg.model -> the model (a staticmethod on the subclass)
    collate: Callable[[list[Any]], Any]    # the task's batch collation (a staticmethod on the subclass)
    train_set: Any                         # set by the subclass's __init__

    def __init__(self, cfg: Any, init_plan: Optional[InitPlan] = None):
        self.cfg = cfg
        self.init_plan = init_plan

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)

    def init_target(self, model: nn.Module) -> nn.Module:
        """The module --init loads into (the whole model, whose backbone keys the loader finds)."""
        return model

    def build_model(self, ctx: Context) -> nn.Module:
        """The task's model with --init loaded (before anything is written to the run folder)."""
        model = self.build(self.cfg.model)
        load_init(self.init_target(model), self.cfg.init, announce=ctx.is_main)
        return model

    def write_run_records(self, ctx: Context) -> None:
        """RUN_DIR/init.json, once the runtime holds the run folder and has accepted the run."""
        if self.init_plan is not None:
            write_init_record(self.cfg.run_dir, self.init_plan)

    def steps_per_epoch(self, ctx: Context) -> int:
        return map_style_steps(len(self.train_set), ctx)

    def train_batches(self, ctx: Context, epoch: int) -> Iterable[Any]:
        return map_style_loader(self.train_set, ctx, epoch, collate_fn=self.collate)
