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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from pcd.pipeline.config import command_config, non_negative, positive, setting
from pcd.pipeline.errors import PcdError

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
    # half the tiny preset's 40: the demo shows the path, the tests show it overfits
    finetune_epochs: int = setting(20, positive)


def run_step(title: str, module: str, command: str, preset: Optional[str], fields: dict[str, Any]) -> float:
    """Run one pipeline command in-process, as `pcd <command> --preset <preset>` would; returns seconds."""
    console.rule(f"[bold]{title}")
    mod = importlib.import_module(module)
    started = time.perf_counter()
    code = mod.run(command_config(mod.Config, command, preset, fields))
    if code:
        raise PcdError(f"demo step '{title}' failed with exit code {code} (see the messages above)")
    return time.perf_counter() - started


def run(cfg: Config) -> int:
    work = cfg.work_dir
    scans, extracted, shards = work / "scans", work / "extracted", work / "shards"
    pretrain_run, export_dir = work / "runs" / "pretrain", work / "runs" / "pretrain" / "export"
    detection_data, detection_run = work / "detection", work / "runs" / "detection"
    console.print(Panel(
        "pcd demo: generated ScanNet-style scenes -> extraction -> teacher caching -> distillation "
        "pre-training -> export -> detection fine-tuning -> evaluation.\n"
        "[bold yellow]The teacher is a RANDOM tiny model[/]: the numbers below test the pipeline, not the method.",
        title="pcd demo"))
    train_split, val_split = scans / "scannetv2_train.txt", scans / "scannetv2_val.txt"
    timings = {
        "generate scenes": run_step("1/8 generate ScanNet-style scenes", "pcd.pipeline.synthetic", "generate-scenes",
                                    cfg.scenes_preset, {"out_dir": scans, "seed": cfg.seed}),
        "extract-scannet": run_step("2/8 pcd extract-scannet", "pcd.pipeline.extract", "extract-scannet",
                                    cfg.extract_preset, {"scans_dir": scans, "out_dir": extracted}),
        "cache-teacher": run_step("3/8 pcd cache-teacher (random tiny teacher)", "pcd.pipeline.cache_teacher",
                                  "cache-teacher", "tiny", {"extracted_dir": extracted, "out_dir": shards}),
        "pretrain": run_step("4/8 pcd pretrain (train split only)", "pcd.trainer.pretrain", "pretrain",
                             cfg.pretrain_preset, {"shards_dir": shards, "run_dir": pretrain_run, "split": train_split,
                                                   "val_split": val_split, "runtime.resume": True,
                                                   "runtime.seed": cfg.seed, "optim.epochs": cfg.pretrain_epochs}),
        "export": run_step("5/8 pcd export", "pcd.trainer.export", "export", None,
                           {"run_dir": pretrain_run, "out_dir": export_dir}),
        "prepare": run_step("6/8 pcd prepare scannet-detection", "pcd.trainer.detection.prepare",
                            "prepare-scannet-detection", None,
                            {"scans_dir": scans, "out_dir": detection_data,
                             "label_map": scans / "scannetv2-labels.combined.tsv"}),
        "finetune detection": run_step("7/8 pcd finetune detection", "pcd.trainer.detection.finetune",
                                       "finetune-detection", cfg.finetune_preset,
                                       {"data_dir": detection_data, "run_dir": detection_run, "init": export_dir,
                                        "train_split": train_split, "val_split": val_split,
                                        "runtime.resume": True, "runtime.seed": cfg.seed,
                                        "optim.epochs": cfg.finetune_epochs}),
        "evaluate detection": run_step("8/8 pcd evaluate detection (val scenes, unseen in pre-training)",
                                       "pcd.trainer.detection.evaluate", "evaluate-detection", None,
                                       {"run_dir": detection_run}),
    }
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
                  f"runs/pretrain/ (checkpoints, metrics.jsonl, tb/, export/), detection/, runs/detection/ "
                  f"(checkpoints, evaluation JSON)")
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
