"""Part segmentation's part of `pcd demo`: generated ShapeNetPart-style shapes, fine-tuned from the export,
evaluated on every point of the test shapes."""

from __future__ import annotations

from pcd.trainer.demo import DemoInputs, DemoStep


def demo_steps(inputs: DemoInputs) -> list[DemoStep]:
    shapes, run_dir = inputs.work / "shapes", inputs.work / "runs" / "partseg"
    data = shapes / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    epochs = {"optim.epochs": inputs.epochs} if inputs.epochs else {}
    return [
        DemoStep("pcd generate-shapes (ModelNet40, ScanObjectNN, ShapeNetPart stand-ins)",
                 "pcd.pipeline.synthetic_shapes", "generate-shapes", "tiny", {"out_dir": shapes, "seed": inputs.seed}),
        DemoStep("pcd finetune partseg (ShapeNetPart layout, y up -> the export's z-up frame)",
                 "pcd.trainer.partseg.finetune", "finetune-partseg", inputs.preset,
                 {"data_dir": data, "run_dir": run_dir, "init": inputs.export_dir, "runtime.resume": True,
                  "runtime.seed": inputs.seed, **epochs}),
        DemoStep("pcd evaluate partseg (every point of each test shape; mean ± std over seeded passes)",
                 "pcd.trainer.partseg.evaluate", "evaluate-partseg", None, {"run_dir": run_dir, "passes": 2}),
    ]
