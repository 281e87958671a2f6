"""Semantic segmentation's part of `pcd demo`: the prepared generated scenes (every vertex and its label), a
fine-tune from the export, every vertex of the val scenes scored and written as benchmark files."""

from __future__ import annotations

from pcd.trainer.demo import DemoInputs, DemoStep
from pcd.trainer.detection.demo import prepare_step

DEMO_EPOCHS = 5  # an eighth of the tiny preset's 40, so the whole demo stays under 3 minutes on 2 CPU cores: the
# demo shows the path, tests/test_semseg_finetune.py shows that the segmenter learns


def demo_steps(inputs: DemoInputs) -> list[DemoStep]:
    prepare = prepare_step(inputs)
    data, run_dir = prepare.fields["out_dir"], inputs.work / "runs" / "semseg"
    return [
        prepare,
        DemoStep("pcd finetune semseg (1.5 m columns of the train scenes)", "pcd.trainer.semseg.finetune",
                 "finetune-semseg", inputs.preset,
                 {"data_dir": data, "run_dir": run_dir, "init": inputs.export_dir, "train_split": inputs.train_split,
                  "val_split": inputs.val_split, "runtime.resume": True, "runtime.seed": inputs.seed,
                  "optim.epochs": inputs.epochs or DEMO_EPOCHS, "runtime.eval_every": 0}),
        DemoStep("pcd evaluate semseg (every vertex of the val scenes; benchmark files)",
                 "pcd.trainer.semseg.evaluate", "evaluate-semseg", None, {"run_dir": run_dir, "passes": 2}),
    ]
