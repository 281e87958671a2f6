"""`pcd plot`: curves from metrics.jsonl and per-class bars from evaluation JSONs, as PNG files."""

from __future__ import annotations

import json

import cv2
import numpy as np
from typer.testing import CliRunner

from pcd.cli import app
from pcd.trainer.plot import per_class_bars, read_metrics, series

runner = CliRunner()


def write_run(folder, losses, torn: bool = False):
    folder.mkdir()
    lines = []
    for step, loss in enumerate(losses):
        lines.append({"kind": "train", "epoch": step // 2, "step": step, "lr": 0.1 / (step + 1), "loss": loss})
        if step % 2:
            lines.append({"kind": "epoch", "epoch": step // 2, "step": step, "loss": loss})
            lines.append({"kind": "eval", "epoch": step // 2, "step": step, "mAP_0.25": 0.1 * step})
    text = "".join(json.dumps(r) + "\n" for r in lines) + ('{"kind": "tra' if torn else "")
    (folder / "metrics.jsonl").write_text(text)


def test_plot_curves_and_per_class_bars(tmp_path):
    write_run(tmp_path / "a", [3.0, 2.0, 1.5, 1.0])
    write_run(tmp_path / "b", [3.0, 2.5, 2.2, 2.0], torn=True)
    per_class = {name: {"AP_0.25": {"mean": m, "std": 0.01}, "AP_0.5": {"mean": m / 2, "std": 0.0}}
                 for name, m in (("chair", 0.5), ("table", 0.25))}
    (tmp_path / "a" / "evaluation_last.json").write_text(json.dumps(
        {"task": "detection", "seeds": [0, 1], "metrics": {"mAP_0.25": {"mean": 0.375, "std": 0.0}},
         "per_class": per_class}))
    result = runner.invoke(app, ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    for name in ("curves.png", "a_evaluation_last_per_class.png"):
        image = cv2.imread(str(tmp_path / "plots" / name))
        assert image is not None and image.shape[0] > 100 and (image < 250).any()
    records = read_metrics(tmp_path / "b")  # the torn last line of an interrupted run is skipped
    assert series(records, "epoch", "loss") == ([1.0, 3.0], [2.5, 2.0])
    label, bars = per_class_bars(json.loads((tmp_path / "a" / "evaluation_last.json").read_text()))
    assert label == "AP (%)" and bars["AP_0.5"] == {"chair": (0.25, 0.0), "table": (0.125, 0.0)}
    partseg = {"metrics": {"instance_miou": {"mean": 0.8, "std": 0.0}, "miou_Airplane": {"mean": 0.7, "std": 0.1}}}
    assert per_class_bars(partseg) == ("mIoU (%)", {"mIoU": {"Airplane": (0.7, 0.1)}})


def test_plot_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "neither metrics.jsonl nor an evaluation" in " ".join(result.output.split())
    write_run(tmp_path / "bad", [1.0, 2.0])
    text = (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "bad" / "metrics.jsonl").write_text("\n".join(["garbage", *text]) + "\n")
    result = runner.invoke(app, ["plot", str(tmp_path / "bad"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "metrics.jsonl: line 1 is not JSON" in " ".join(result.output.split())
    assert not np.any([p.exists() for p in (tmp_path / "p").glob("*")])
