"""`pcd plot RUN... --out DIR`: training curves and per-class results as PNG, with matplotlib (no display needed).

- `curves.png`: from each run's `metrics.jsonl` (written by the runtime), the training loss by step (and the epoch
  means), the learning rate, and every validation metric (`kind: "eval"` records), the runs overlaid in one colour
  each;
- `<run>_<evaluation>_per_class.png`: from each `evaluation_<checkpoint>.json`, a bar per class with its standard
  deviation over the seeded passes: AP@0.25 and AP@0.5 per class for detection, mIoU per category for part
  segmentation; the metrics table of other tasks.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.config import positive, setting
from pcd.pipeline.errors import PcdError

console = Console(stderr=True, soft_wrap=True)
MAX_METRIC_PANELS = 6


@dataclass
class Config:
    runs: list[Path] = field(default_factory=list)
    out: Path = Path("plots")
    dpi: int = setting(110, positive)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records; a torn last line (a run killed mid-write) is skipped, any other bad line is
    an error naming the file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise PcdError(f"{path}: line {number} is not JSON") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in the records of `kind`, in log order."""
    number = (int, float)
    points = [(float(r["step"]), float(r[key])) for r in records
              if r.get("kind") == kind and isinstance(r.get(key), number) and isinstance(r.get("step"), number)]
    return [p[0] for p in points], [p[1] for p in points]


def _figure_bytes(figure: Any, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, dpi: int) -> Path:
    """One figure: training loss, learning rate and each validation metric, every run overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for records in runs.values() for r in records if r.get("kind") == "eval"
                        for k, v in r.items() if k not in ("kind", "epoch", "step") and isinstance(v, (int, float))})
    panels = ["loss", "lr", *eval_keys[:MAX_METRIC_PANELS]]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, panel in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for number, (name, records) in enumerate(runs.items()):
            color = colors[number % len(colors)]
            if panel == "loss":
                ax.plot(*series(records, "train", "loss"), color=color, alpha=0.45, linewidth=1)
                ax.plot(*series(records, "epoch", "loss"), color=color, marker="o", markersize=3, label=name)
            elif panel == "lr":
                ax.plot(*series(records, "train", "lr"), color=color, label=name)
            else:
                ax.plot(*series(records, "eval", panel), color=color, marker="o", markersize=3, label=name)
        ax.set_title({"loss": "training loss (line: logged steps, dots: epoch means)",
                      "lr": "learning rate"}.get(panel, f"validation {panel}"), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel == "loss":
            ax.legend(fontsize=7)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    atomic_write_bytes(path, _figure_bytes(figure, dpi))
    plt.close(figure)
    return path


def per_class_bars(document: dict[str, Any]) -> tuple[str, dict[str, dict[str, tuple[float, float]]]]:
    """(y label, {series: {class: (mean, std)}}) of an evaluation JSON."""
    if isinstance(document.get("per_class"), dict):  # detection
        bars: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
        for name, metrics in document["per_class"].items():
            for key in ("AP_0.25", "AP_0.5"):
                if isinstance(metrics.get(key), dict):
                    bars[key][name] = (metrics[key]["mean"], metrics[key]["std"])
        return "AP (%)", dict(bars)
    metrics = document.get("metrics") or {}
    per_category = {k.removeprefix("miou_"): (v["mean"], v["std"]) for k, v in metrics.items()
                    if k.startswith("miou_") and isinstance(v, dict)}
    if per_category:  # part segmentation
        return "mIoU (%)", {"mIoU": per_category}
    return "%", {"metric": {k: (v["mean"], v["std"]) for k, v in metrics.items()
                            if isinstance(v, dict) and "mean" in v}}


def plot_per_class(document: dict[str, Any], title: str, path: Path, dpi: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    label, bars = per_class_bars(document)
    names = sorted({name for values in bars.values() for name in values})
    if not names:
        raise PcdError(f"{title}: the evaluation has no per-class or summary metrics to plot")
    width = 0.8 / max(1, len(bars))
    figure, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) * max(1, len(bars))), 4))
    positions = np.arange(len(names))
    for number, (key, values) in enumerate(bars.items()):
        means = [100 * values.get(n, (np.nan, 0))[0] for n in names]
        stds = [100 * values.get(n, (0, 0))[1] for n in names]
        ax.bar(positions + (number - (len(bars) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=key)
    ax.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(bars) > 1:
        ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write_bytes(path, _figure_bytes(figure, dpi))
    plt.close(figure)
    return path


def run(cfg: Config) -> int:
    if not cfg.runs:
        raise PcdError("name at least one run folder to plot")
    out = Path(cfg.out)
    curves: dict[str, list[dict[str, Any]]] = {}
    written = []
    for run_dir in map(Path, cfg.runs):
        if not run_dir.is_dir():
            raise PcdError(f"{run_dir}: no such run folder")
        records = read_metrics(run_dir)
        evaluations = sorted(run_dir.glob("evaluation_*.json"))
        if not records and not evaluations:
            raise PcdError(f"{run_dir}: neither metrics.jsonl nor an evaluation_*.json to plot")
        name = run_dir.resolve().name
        if records:
            curves[name if name not in curves else str(run_dir)] = records
        for path in evaluations:
            try:
                document = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise PcdError(f"{path}: cannot read ({exc})") from None
            title = (f"{name} {path.stem.removeprefix('evaluation_')}: {document.get('task', '?')}, mean ± std over "
                     f"{len(document.get('seeds') or [])} seeded passes")
            written.append(plot_per_class(document, title, out / f"{name}_{path.stem}_per_class.png", cfg.dpi))
    if curves:
        written.insert(0, plot_curves(curves, out / "curves.png", cfg.dpi))
    console.print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
