"""Detection's part of `pcd demo`: prepare the generated scenes, fine-tune from the export, evaluate on val."""

from __future__ import annotations

from pcd.trainer.demo import DemoInputs, DemoStep

DEMO_EPOCHS = 10  # a quarter of the tiny preset's 40, so the whole demo stays under 3 minutes on 2 CPU cores: the
# demo shows the path, the tests show that the detector overfits


def demo_steps(inputs: DemoInputs) -> list[DemoStep]:
    data, run_dir = inputs.work / "detection", inputs.work / "runs" / "detection"
    return [
        DemoStep("pcd prepare scannet-detection", "pcd.trainer.detection.prepare", "prepare-scannet-detection", None,
                 {"scans_dir": inputs.scans, "out_dir": data,
                  "label_map": inputs.scans / "scannetv2-labels.combined.tsv"}),
        DemoStep("pcd finetune detection", "pcd.trainer.detection.finetune", "finetune-detection", inputs.preset,
                 {"data_dir": data, "run_dir": run_dir, "init": inputs.export_dir, "train_split": inputs.train_split,
                  "val_split": inputs.val_split, "runtime.resume": True, "runtime.seed": inputs.seed,
                  "optim.epochs": inputs.epochs or DEMO_EPOCHS}),
        DemoStep("pcd evaluate detection (val scenes, unseen in pre-training)", "pcd.trainer.detection.evaluate",
                 "evaluate-detection", None, {"run_dir": run_dir}),
    ]
