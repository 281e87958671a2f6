"""`pcd experiment report FILE --work DIR`: the table pcd measured beside the paper's, as Markdown, JSON and PNG.

For each row that pcd runs, each metric's value per seed is the mean over the evaluation's seeded passes (in the
paper's unit: `scale` x the evaluation's number); the table shows the mean ± std over seeds (population std, as
the evaluations report theirs), how many seeds finished, the paper's number and the difference (pcd - paper).
Rows of other methods carry the paper's number only. Files: WORK/report/tableN.md, tableN.json, tableN.png.
Reads only results files: imports no training code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.console import Console

from pcd.pipeline.atomic import atomic_write_bytes, atomic_write_json
from pcd.pipeline.errors import PcdError
from pcd.trainer.experiment import RECONSTRUCTION, STATE_FILE, cells, result_path
from pcd.trainer.experiment_spec import Experiment, Metric, load_experiment


@dataclass
class Config:
    file: str = "table5"
    work_dir: Path = Path("experiments/work")
    variant: Optional[str] = None
    out_dir: Optional[Path] = None  # default WORK/report


def metric_value(document: dict[str, Any], experiment: Experiment, metric: Metric, path: Path) -> float:
    """One cell's number for `metric`, in the paper's unit."""
    if experiment.task == RECONSTRUCTION:
        entry = document if metric.key == "mean" else document.get(metric.key)
        value = entry.get("mean") if isinstance(entry, dict) else None
    else:
        entry = (document.get("metrics") or {}).get(metric.key)
        value = entry.get("mean") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PcdError(f"{path}: no metric '{metric.key}' (table.metrics of {experiment.path.name})")
    return float(value) * metric.scale


def collect(experiment: Experiment, work: Path) -> list[dict[str, Any]]:
    """The report's rows: per metric the seeds' values, their mean and std, the paper's number, the difference."""
    values: dict[str, dict[str, dict[int, float]]] = {}
    for cell in cells(experiment):
        path = result_path(experiment, cell, work)
        if not path.is_file():
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PcdError(f"{path}: cannot read ({exc})") from None
        for metric in experiment.metrics:
            values.setdefault(cell.row.method, {}).setdefault(metric.name, {})[cell.seed] = \
                metric_value(document, experiment, metric, path)
    rows = []
    for row in experiment.rows:
        entry: dict[str, Any] = {"method": row.method, "runs": row.runs, "note": row.note,
                                 "skipped": bool(row.init is not None and experiment.skip_init_rows),
                                 "source": ("pretrain:" + row.pretrain if row.pretrain else
                                            "init:" + row.init if row.init else "scratch" if row.scratch
                                            else "paper only"),
                                 "metrics": {}}
        for metric in experiment.metrics:
            paper = row.paper.get(metric.name)
            seeds = values.get(row.method, {}).get(metric.name, {})
            cell: dict[str, Any] = {"paper": paper}
            if row.runs:
                measured = [seeds[s] for s in sorted(seeds)]
                mean = float(np.mean(measured)) if measured else None
                cell.update({"seeds": sorted(seeds), "values": measured, "mean": mean,
                             "std": float(np.std(measured)) if measured else None,
                             "seeds_planned": len(experiment.seeds),
                             "difference": mean - paper if mean is not None and paper is not None else None})
            entry["metrics"][metric.name] = cell
        rows.append(entry)
    return rows


def _number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    return f"{value:.2e}" if magnitude and (magnitude < 1e-2 or magnitude >= 1e4) else f"{value:.2f}"


def markdown(experiment: Experiment, rows: list[dict[str, Any]]) -> str:
    header = ["method", "source"]
    for metric in experiment.metrics:
        header += [f"{metric.name} (pcd)", f"{metric.name} (paper)", "difference"]
    lines = [f"# Table {experiment.number}: {experiment.title}", "",
             f"Protocol: {experiment.protocol}. pcd: mean ± std over seeds {list(experiment.seeds)} "
             f"(n = seeds finished){'; variant ' + experiment.variant if experiment.variant else ''}.", "",
             *([f"Variant {experiment.variant} runs on generated data with a random tiny teacher and tiny models: its "
                "numbers show that the pipeline runs, not what the method achieves; the paper's column is the "
                "paper's.", ""] if experiment.generated else []),
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["method"], row["source"]]
        for metric in experiment.metrics:
            m = row["metrics"][metric.name]
            if row["runs"] and m.get("mean") is not None:
                ours = f"{_number(m['mean'])} ± {_number(m['std'])} (n={len(m['values'])})"
            elif row["skipped"]:
                ours = f"not in variant {experiment.variant}"
            else:
                ours = "not run yet" if row["runs"] else ""
            cells += [ours, _number(m["paper"]), _number(m.get("difference")) if row["runs"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row['method']}: {row['note']}" for row in rows if row["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def bar_chart(experiment: Experiment, rows: list[dict[str, Any]]) -> bytes:
    """PNG: per metric, the paper's number and pcd's mean (± std over seeds) for every row."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(len(experiment.metrics), 1, squeeze=False,
                                figsize=(max(6.0, 1.1 * len(rows)), 3.2 * len(experiment.metrics)))
    positions = np.arange(len(rows))
    for axis, metric in zip(axes[:, 0], experiment.metrics):
        paper = [row["metrics"][metric.name]["paper"] for row in rows]
        ours = [row["metrics"][metric.name].get("mean") for row in rows]
        spread = [row["metrics"][metric.name].get("std") or 0.0 for row in rows]
        axis.bar(positions - 0.2, [math.nan if v is None else v for v in paper], 0.4, label="paper")
        axis.bar(positions + 0.2, [math.nan if v is None else v for v in ours], 0.4,
                 yerr=[s if v is not None else 0.0 for s, v in zip(spread, ours)], capsize=3,
                 label=f"pcd{' (' + experiment.variant + ')' if experiment.variant else ''}")
        shown = [v for v in paper + ours if v is not None]
        if shown and min(shown) > 0 and max(shown) / min(shown) > 100:  # Table 7 spans 1e-4 to 1
            axis.set_yscale("log")
        axis.set_ylabel(metric.name)
        axis.set_xticks(positions, [row["method"] for row in rows], rotation=30, ha="right", fontsize=8)
        axis.legend(fontsize=8)
    axes[0, 0].set_title(f"Table {experiment.number}: {experiment.title}", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def recorded_variant(work: Path, asked: Optional[str]) -> Optional[str]:
    """The variant the work folder was run with (`experiment.json`): a report of another variant would list seeds
    and settings that did not run."""
    path = work / STATE_FILE
    try:
        recorded = json.loads(path.read_text()).get("variant")
    except (OSError, ValueError, AttributeError):
        return asked
    if asked is not None and asked != recorded:
        raise PcdError(f"{path}: this work folder was run with variant {recorded}, not {asked}")
    return recorded


def run(cfg: Config) -> int:
    work = Path(cfg.work_dir)
    experiment = load_experiment(cfg.file, recorded_variant(work, cfg.variant) if work.is_dir() else cfg.variant)
    if not work.is_dir():
        raise PcdError(f"{work}: no such work folder (run `pcd experiment run {cfg.file} --work {work}` first)")
    out = Path(cfg.out_dir) if cfg.out_dir else work / "report"
    rows = collect(experiment, work)
    stem = f"table{experiment.number}"
    document = {"table": experiment.number, "title": experiment.title, "protocol": experiment.protocol,
                "task": experiment.task, "variant": experiment.variant, "seeds": list(experiment.seeds),
                "file": str(experiment.path), "std": "population std over seeds",
                "metrics": [{"name": m.name, "key": m.key, "scale": m.scale} for m in experiment.metrics],
                "rows": rows}
    atomic_write_json(out / f"{stem}.json", document)
    atomic_write_bytes(out / f"{stem}.md", markdown(experiment, rows).encode())
    atomic_write_bytes(out / f"{stem}.png", bar_chart(experiment, rows))
    Console(stderr=True, soft_wrap=True).print(f"wrote {out / stem}.md, .json and .png")
    return 0
