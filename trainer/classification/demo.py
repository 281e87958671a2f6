"""Classification's part of `pcd demo`: generated ModelNet40-style shapes, fine-tuned from the export, evaluated."""

from __future__ import annotations

from pcd.trainer.demo import DemoInputs, DemoStep


def demo_steps(inputs: DemoInputs) -> list[DemoStep]:
    shapes, run_dir = inputs.work / "shapes", inputs.work / "runs" / "classification"
    epochs = {"optim.epochs": inputs.epochs} if inputs.epochs else {}
    return [
        DemoStep("pcd generate-shapes (ModelNet40, ScanObjectNN, ShapeNetPart stand-ins)",
                 "pcd.pipeline.synthetic_shapes", "generate-shapes", "tiny", {"out_dir": shapes, "seed": inputs.seed}),
        DemoStep("pcd finetune classification (ModelNet40 txt layout, y up -> the export's z-up frame)",
                 "pcd.trainer.classification.finetune", "finetune-classification", inputs.preset,
                 {"data_dir": shapes / "modelnet40_normal_resampled", "run_dir": run_dir, "init": inputs.export_dir,
                  "runtime.resume": True, "runtime.seed": inputs.seed, **epochs}),
        DemoStep("pcd evaluate classification (test split; voting as mean ± std over seeded passes)",
                 "pcd.trainer.classification.evaluate", "evaluate-classification", None,
                 {"run_dir": run_dir, "passes": 2}),
    ]
