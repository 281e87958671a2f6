"""`pcd demo` runs every stage end to end on generated scenes and leaves each stage's outputs behind."""

import json
import os
import subprocess
import sys


def test_demo_runs_every_stage(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pcd.cli", "demo", str(work), "--set", "pretrain_epochs=1",
         "--set", "finetune_epochs=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    extraction = json.loads((work / "extracted" / "manifest.json").read_text())
    training = json.loads((work / "shards" / "manifest.json").read_text())
    assert extraction["num_samples"] > 0 and training["num_samples"] == extraction["num_samples"]
    assert training["teacher"]["random"] is True
    pretrained = (work / "runs" / "pretrain" / "pretrain_scenes.txt").read_text().split()
    val_scenes = (work / "scans" / "scannetv2_val.txt").read_text().split()
    assert pretrained and not set(pretrained) & set(val_scenes)
    assert (work / "runs" / "pretrain" / "export" / "backbone.safetensors").is_file()
    evaluation = json.loads((work / "runs" / "detection" / "evaluation_last.json").read_text())
    records = [json.loads(line) for line in (work / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch" and "loss" in r] == [0]
    assert evaluation["checkpoint"] and 0 <= evaluation["metrics"]["mAP_0.25"]["mean"] <= 1
    semseg = json.loads((work / "runs" / "semseg" / "evaluation_last.json").read_text())
    assert 0 <= semseg["metrics"]["miou"]["mean"] <= 1
    assert sorted(p.stem for p in (work / "runs" / "semseg" / "evaluation_last_scannet").iterdir()) == sorted(val_scenes)
    pictures = work / "pictures"
    assert (pictures / "curves.png").is_file() and (pictures / "detection" / "detection_sheet.png").is_file()
    assert (pictures / "detection_evaluation_last_per_class.png").is_file()
    assert (pictures / "semseg" / "semseg_sheet.png").is_file()  # from the benchmark files evaluate wrote
