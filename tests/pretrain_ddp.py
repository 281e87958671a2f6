"""Run a tiny pre-training under torchrun; each rank writes a hash of its parameters and its batch count.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/pretrain_ddp.py SHARDS_DIR RUN_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pcd.pipeline.config import build_config
from pcd.trainer import pretrain
from regression_task import parameter_hash


class CountingTask(pretrain.PretrainTask):
    steps_taken = 0

    def build_model(self, ctx):
        self.model = super().build_model(ctx)
        return self.model

    def training_step(self, model, batch, ctx):
        self.steps_taken += 1
        return super().training_step(model, batch, ctx)


if __name__ == "__main__":
    shards_dir, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = build_config(pretrain.Config, "pretrain", "tiny", [
        f"shards_dir={shards_dir}", f"run_dir={run_dir}", "num_points=128", "optim.epochs=2",
        "optim.batch_size=4", "runtime.workers=1", "runtime.progress=false"])
    train_set = pretrain.data.select_shards(shards_dir, None)
    task = CountingTask(cfg, train_set, None)
    pretrain.train(task, cfg.optim, cfg.runtime, run_dir)
    rank = int(os.environ["RANK"])
    (run_dir / f"rank{rank}.json").write_text(json.dumps({"hash": parameter_hash(task.model),
                                                          "steps": task.steps_taken}))
