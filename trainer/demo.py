"""`pcd demo`: every stage of the pipeline, end to end, on scenes the project generates.

It runs the same commands a researcher runs on ScanNet, through the same configs (the `tiny`/`small`
presets), so a green demo means the real pipeline works on this machine. The teacher is a RANDOM tiny
model (nothing is downloaded), so the numbers it prints show that the plumbing works, not what the method
achieves. Rerunning it resumes: finished stages are skipped or resumed by the commands themselves.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from pcd.pipeline.config import command_config, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.tasks import TASKS

console = Console()


@dataclass
class Config:
    work_dir: Path = Path("demo-work")
    seed: int = setting(0, non_negative)
    scenes_preset: str = "small"  # generate-scenes preset: 4 scenes x 100 frames at 160x120 depth
    extract_preset: str = "tiny"
    pretrain_preset: str = "tiny"
    finetune_preset: str = "tiny"
    pretrain_epochs: int = setting(5, positive)
    finetune_epochs: Optional[int] = setting(None, positive)  # None: each task's demo length (the tests show that they learn)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # downstream tasks to run, registry order


@dataclass
class DemoInputs:
    """What a task's demo step gets: the work folder, the generated scans and their splits, the export."""

    work: Path
    scans: Path
    train_split: Path
    val_split: Path
    export_dir: Path
    seed: int
    preset: str
    epochs: Optional[int]


@dataclass
class DemoStep:
    """One command of a task's demo, run in-process as `pcd <command> --preset <preset>` would run it."""

    title: str
    module: str
    command: str
    preset: Optional[str]
    fields: dict[str, Any]


def run_step(title: str, module: str, command: str, preset: Optional[str], fields: dict[str, Any]) -> float:
    """Run one pipeline command in-process, as `pcd <command> --preset <preset>` would; returns seconds."""
    console.rule(f"[bold]{title}")
    mod = importlib.import_module(module)
    started = time.perf_counter()
    code = mod.run(command_config(mod.Config, command, preset, fields))
    if code:
        raise PcdError(f"demo step '{title}' failed with exit code {code} (see the messages above)")
    return time.perf_counter() - started


def task_steps(task: str, inputs: DemoInputs) -> list[DemoStep]:
    """The demo steps of a registered task (its entry's `demo` function)."""
    if task not in TASKS:
        raise PcdError(f"demo: unknown task '{task}' (known: {', '.join(TASKS)})")
    module, _, function = TASKS[task].demo.partition(":")
    return getattr(importlib.import_module(module), function)(inputs)


def run(cfg: Config) -> int:
    work = cfg.work_dir
    scans, extracted, shards = work / "scans", work / "extracted", work / "shards"
    pretrain_run, export_dir = work / "runs" / "pretrain", work / "runs" / "pretrain" / "export"
    console.print(Panel(
        "pcd demo: generated ScanNet-style scenes -> extraction -> teacher caching -> distillation "
        f"pre-training -> export -> fine-tuning and evaluation ({', '.join(cfg.tasks)}).\n"
        "[bold yellow]The teacher is a RANDOM tiny model[/]: the numbers below test the pipeline, not the method.",
        title="pcd demo"))
    train_split, val_split = scans / "scannetv2_train.txt", scans / "scannetv2_val.txt"
    inputs = DemoInputs(work=work, scans=scans, train_split=train_split, val_split=val_split,
                        export_dir=export_dir, seed=cfg.seed, preset=cfg.finetune_preset, epochs=cfg.finetune_epochs)
    steps = [
        DemoStep("generate ScanNet-style scenes", "pcd.pipeline.synthetic", "generate-scenes", cfg.scenes_preset,
                 {"out_dir": scans, "seed": cfg.seed}),
        DemoStep("pcd extract-scannet", "pcd.pipeline.extract", "extract-scannet", cfg.extract_preset,
                 {"scans_dir": scans, "out_dir": extracted}),
        DemoStep("pcd cache-teacher (random tiny teacher)", "pcd.pipeline.cache_teacher", "cache-teacher", "tiny",
                 {"extracted_dir": extracted, "out_dir": shards}),
        DemoStep("pcd pretrain (train split only)", "pcd.trainer.pretrain", "pretrain", cfg.pretrain_preset,
                 {"shards_dir": shards, "run_dir": pretrain_run, "split": train_split, "val_split": val_split,
                  "runtime.resume": True, "runtime.seed": cfg.seed, "optim.epochs": cfg.pretrain_epochs}),
        DemoStep("pcd export", "pcd.trainer.export", "export", None, {"run_dir": pretrain_run, "out_dir": export_dir}),
    ]
    for task in cfg.tasks:
        steps.extend(step for step in task_steps(task, inputs) if step not in steps)  # shared steps run once
    timings = {}
    for number, step in enumerate(steps, 1):
        timings[step.title] = run_step(f"{number}/{len(steps)} {step.title}", step.module, step.command,
                                       step.preset, step.fields)
    print_summary(work, timings, pretrain_run)
    return 0


def print_summary(work: Path, timings: dict[str, float], pretrain_run: Path) -> None:
    """Where everything is, how long each stage took, and the pre-training loss curve."""
    table = Table(title="pcd demo: done", show_lines=False)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.1f}")
    console.print(table)
    curve = pretrain_loss_curve(pretrain_run / "metrics.jsonl")
    if curve:
        console.print("pre-training loss per epoch: " + "  ".join(f"{e + 1}:{v:.4f}" for e, v in curve))
    console.print(f"results under {work}/: scans/ (generated), extracted/ and shards/ (WebDataset + manifest.json), "
                  f"runs/pretrain/ (checkpoints, metrics.jsonl, tb/, export/), and per task its data and "
                  f"runs/<task>/ (checkpoints, evaluation JSON and predictions)")
    console.print("[bold yellow]reminder: the teacher was random; these numbers say nothing about the method.")


def pretrain_loss_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """(epoch, mean training loss) from the run's JSONL log; epochs count from 0 there."""
    if not metrics_path.is_file():
        return []
    curve = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "epoch" and "loss" in record:
            curve[int(record["epoch"])] = float(record["loss"])
    return sorted(curve.items())
