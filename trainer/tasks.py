"""The registry of downstream tasks: one plain dict entry per task, from which come its commands, presets and demo.

A task is one folder under trainer/ (its data, its head, its metric, its glue) plus one entry here. From the
entry, cli.py generates `pcd finetune TASK` and `pcd evaluate TASK` with the options listed below (each
explicit, with its help) plus the options every fine-tune or evaluation has (`--init`, `--resume`, `--device`,
`--preset`, `--set`; `--checkpoint`, `--passes`, `--device`, `--set`). The configs are `Config` of the entry's
modules, their presets the tables `[finetune-TASK.NAME]` / `[evaluate-TASK.NAME]` of manifests/presets.toml, and
`pcd demo` runs the entry's demo step. Module paths are strings, imported only when a command runs: listing the
registry imports neither torch nor the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Param:
    """One command-line parameter of a task command, mapped onto a config key."""

    name: str                    # Python name; the option is --name-with-dashes
    type: Any                    # Path, int, float, str or bool (bool gives --name/--no-name)
    help: str
    key: Optional[str] = None    # dotted config key (default: name)
    argument: bool = False       # a required positional argument instead of an option


@dataclass(frozen=True)
class TaskEntry:
    """Where a task's pieces are: the modules with `Config` and `run(cfg)`, its own parameters, its demo step."""

    finetune: str                      # module of `pcd finetune TASK`
    evaluate: str                      # module of `pcd evaluate TASK` (imports no training code)
    finetune_help: str
    evaluate_help: str
    finetune_params: tuple[Param, ...]
    evaluate_params: tuple[Param, ...]
    demo: str                          # "module:function" called by `pcd demo` (see pcd.trainer.demo.DemoInputs)


RUN_DIR = Param("run_dir", Path, "Run folder: checkpoints, logs, resolved config, evaluations.", argument=True)


def evaluated_run(task: str) -> Param:
    return Param("run_dir", Path, f"A `pcd finetune {task}` run folder.", argument=True)


TASKS: dict[str, TaskEntry] = {
    "detection": TaskEntry(
        finetune="pcd.trainer.detection.finetune",
        evaluate="pcd.trainer.detection.evaluate",
        finetune_help="Fine-tune the pre-trained backbone as the encoder of a 3DETR detector on ScanNet.",
        evaluate_help="Evaluate a detection run: per-class AP at IoU 0.25 and 0.5, mean ± std over seeded passes.",
        finetune_params=(
            Param("data_dir", Path, "Output folder of `pcd prepare scannet-detection`.", argument=True),
            RUN_DIR,
            Param("train_split", Path, "Split file of training scenes (default: DATA_DIR/scannetv2_train.txt)."),
            Param("val_split", Path, "Split file of evaluation scenes (default: DATA_DIR/scannetv2_val.txt)."),
        ),
        evaluate_params=(evaluated_run("detection"),),
        demo="pcd.trainer.detection.demo:demo_steps",
    ),
    "classification": TaskEntry(
        finetune="pcd.trainer.classification.finetune",
        evaluate="pcd.trainer.classification.evaluate",
        finetune_help="Fine-tune Point-MAE's classifier (cls token, concat(cls, max) head) on ModelNet40 or "
                      "ScanObjectNN.",
        evaluate_help="Evaluate a classification run: overall and mean-class accuracy, without and with voting, "
                      "mean ± std over seeded passes.",
        finetune_params=(
            Param("data_dir", Path, "modelnet40_normal_resampled/, modelnet40_ply_hdf5_2048/, or ScanObjectNN's "
                                    "main_split/ or main_split_nobg/ folder.", argument=True),
            RUN_DIR,
            Param("variant", str, "ScanObjectNN files: OBJ_BG, OBJ_ONLY (main_split_nobg) or PB_T50_RS."),
            Param("val_fraction", float, "Hold out this stratified fraction of the training set for choosing "
                                         "the best checkpoint (0: none, keep the last epoch)."),
            Param("cache_dir", Path, "Where pcd's FPS cache of ModelNet40 txt files goes (default: DATA_DIR)."),
        ),
        evaluate_params=(
            evaluated_run("classification"),
            Param("protocol", str, "'pcd' (default: seeded passes, mean ± std) or 'point-mae' (best of many "
                                   "voting runs on the test set; optimistic, labelled so)."),
            Param("votes", int, "Views averaged per shape in the voting metrics (10)."),
        ),
        demo="pcd.trainer.classification.demo:demo_steps",
    ),
    "partseg": TaskEntry(
        finetune="pcd.trainer.partseg.finetune",
        evaluate="pcd.trainer.partseg.evaluate",
        finetune_help="Fine-tune Point-MAE's part-segmentation model on ShapeNetPart "
                      "(shapenetcore_partanno_segmentation_benchmark_v0_normal).",
        evaluate_help="Evaluate a part-segmentation run: instance and class mIoU on every point of each test "
                      "shape, mean ± std over seeded passes.",
        finetune_params=(
            Param("data_dir", Path, "shapenetcore_partanno_segmentation_benchmark_v0_normal/ folder.",
                  argument=True),
            RUN_DIR,
            Param("select_on_val", bool, "Train on the official train list and keep the best epoch on its val "
                                         "list (default: train on trainval, keep the last epoch)."),
        ),
        evaluate_params=(
            evaluated_run("partseg"),
            Param("protocol", str, "'all-points' (default: every point of each test shape) or 'point-mae' "
                                   "(2,048 points drawn with replacement, as Point-MAE scores)."),
        ),
        demo="pcd.trainer.partseg.demo:demo_steps",
    ),
}


def finetune_command(task: str) -> str:
    """The config/preset name of `pcd finetune TASK` (e.g. `[finetune-classification.paper]`)."""
    return f"finetune-{task}"


def evaluate_command(task: str) -> str:
    return f"evaluate-{task}"
