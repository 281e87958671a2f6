"""Detection's part of `pcd demo`: prepare the generated scenes, fine-tune from the export, evaluate on val."""

from __future__ import annotations

from pcd.trainer.demo import DemoInputs, DemoStep

DEMO_EPOCHS = 10  # a quarter of the tiny preset's 40, so the whole demo stays under 3 minutes on 2 CPU cores: the
# demo shows the path, the tests show that the detector overfits


def prepare_step(inputs: DemoInputs) -> DemoStep:
    """`pcd prepare scannet` of the generated scans, shared with semantic segmentation (the demo runs it once)."""
    return DemoStep("pcd prepare scannet", "pcd.trainer.detection.prepare", "prepare-scannet", None,
                    {"scans_dir": inputs.scans, "out_dir": inputs.work / "scannet",
                     "label_map": inputs.scans / "scannetv2-labels.combined.tsv"})


def demo_steps(inputs: DemoInputs) -> list[DemoStep]:
    data, run_dir = inputs.work / "scannet", inputs.work / "runs" / "detection"
    return [
        prepare_step(inputs),
        DemoStep("pcd finetune detection", "pcd.trainer.detection.finetune", "finetune-detection", inputs.preset,
                 {"data_dir": data, "run_dir": run_dir, "init": inputs.export_dir, "train_split": inputs.train_split,
                  "val_split": inputs.val_split, "runtime.resume": True, "runtime.seed": inputs.seed,
                  "optim.epochs": inputs.epochs or DEMO_EPOCHS}),
        DemoStep("pcd evaluate detection (val scenes, unseen in pre-training)", "pcd.trainer.detection.evaluate",
                 "evaluate-detection", None, {"run_dir": run_dir}),
    ]
