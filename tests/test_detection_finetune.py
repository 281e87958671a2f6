"""Detection fine-tuning end to end on generated scenes: initialisation from an export, overfitting, evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pcd.pipeline.config import build_config
from pcd.pipeline.errors import PcdError
from pcd.pipeline.synthetic import generate, tiny_config as tiny_scenes
from pcd.trainer.backbone import PointBackbone
from pcd.trainer.detection import evaluate, finetune, prepare
from pcd.trainer.runtime import make_context
from pcd.trainer.weights import write_export

SCENES = ["scene0000_00", "scene0001_00"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two generated rooms (6 boxes each of the 18 classes, walls, floor), prepared for detection."""
    root = tmp_path_factory.mktemp("det")
    infos = generate(tiny_scenes(root / "scans", num_scenes=2, num_frames=1, seed=0))
    assert [info.scene_id for info in infos] == SCENES
    (root / "split.txt").write_text("".join(f"{s}\n" for s in SCENES))
    prepare.run(prepare.Config(scans_dir=root / "scans", out_dir=root / "data", splits=[root / "split.txt"]))
    return root


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> finetune.Config:
    cfg = build_config(finetune.Config, "finetune-detection", "tiny", overrides)
    cfg.data_dir, cfg.run_dir = data / "data", run_dir
    cfg.train_split = cfg.val_split = data / "data" / "split.txt"
    return cfg


def export_backbone(cfg: finetune.Config, out_dir: Path, pretrain_scenes: list[str]) -> dict:
    torch.manual_seed(123)
    backbone = PointBackbone(cfg.model.backbone)
    write_export(out_dir, backbone.state_dict(), cfg.model.backbone, {"pretrain_scenes": pretrain_scenes})
    return backbone.state_dict()


def test_init_from_export_loads_every_backbone_key(data, tmp_path, capsys):
    cfg = tiny_config(data, tmp_path / "run", "init=" + str(tmp_path / "export"))
    exported = export_backbone(cfg, tmp_path / "export", pretrain_scenes=[SCENES[1], "scene0500_00"])
    plan = finetune.check_init(cfg, SCENES)
    assert "1 of the 2 evaluation scenes were seen in pre-training" in " ".join(capsys.readouterr().err.split())
    assert plan.pretrain_scenes == [SCENES[1], "scene0500_00"] and plan.frame.name == "gravity-unit-sphere"
    task = finetune.DetectionTask(cfg, SCENES, SCENES)
    model = task.build_model(make_context(cfg.optim, cfg.runtime, cfg.run_dir))
    loaded = model.encoder.backbone.state_dict()
    assert loaded.keys() == exported.keys()
    for key, value in exported.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert f"loaded {len(exported)} backbone tensors" in " ".join(capsys.readouterr().err.split())


def test_init_refuses_an_export_with_another_normalisation(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", "init=" + str(tmp_path / "export"))
    export_backbone(cfg, tmp_path / "export", [])
    meta_path = tmp_path / "export" / "backbone.json"
    meta = json.loads(meta_path.read_text())
    meta["normalization"]["name"] = "bounding-box"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PcdError, match="normalisation 'bounding-box'"):
        finetune.check_init(cfg, SCENES)


def test_tiny_detector_overfits_generated_scenes(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", "runtime.progress=false")
    assert finetune.run(cfg) == 0
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert final_eval["mAP_0.25"] >= 0.9

    ev = build_config(evaluate.Config, "evaluate-detection", None, ["passes=2", "workers=0"])
    ev.run_dir = cfg.run_dir
    assert evaluate.run(ev) == 0
    report = json.loads((cfg.run_dir / "evaluation_last.json").read_text())
    assert report["seeds"] == [0, 1] and report["checkpoint_kind"] == "last epoch"
    assert report["metrics"]["mAP_0.25"]["mean"] >= 0.9
    assert len(report["passes"]) == 2

    ev.checkpoint, ev.passes = "best", 1
    assert evaluate.run(ev) == 0
    best = json.loads((cfg.run_dir / "evaluation_best.json").read_text())
    assert best["checkpoint_kind"] == "best mAP@0.25 on the validation split"
    assert best["metrics"]["mAP_0.25"]["mean"] >= 0.9


def test_evaluation_writes_the_results_file_and_every_scenes_raw_proposals(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", "runtime.progress=false", "optim.epochs=1", "epoch_repeats=1")
    assert finetune.run(cfg) == 0
    ev = build_config(evaluate.Config, "evaluate-detection", None, ["passes=2", "workers=0"])
    ev.run_dir = cfg.run_dir
    assert evaluate.run(ev) == 0
    report = json.loads((cfg.run_dir / "evaluation_last.json").read_text())
    assert report["task"] == "detection" and report["precision"] == "fp32" and report["data"]["scenes"] == SCENES
    assert report["metrics"]["mAP_0.25"]["passes"] == [p["mAP_0.25"] for p in report["passes"]]
    proposals = np.load(cfg.run_dir / "evaluation_last_predictions.npz")
    assert proposals["box_minmax"].shape == (2, 2, cfg.model.num_queries, 6)  # passes, scenes, queries
    assert proposals["sem_cls_prob"].shape == (2, 2, cfg.model.num_queries, 18)
    assert proposals["objectness"].shape == (2, 2, cfg.model.num_queries)


def test_training_batches_depend_only_on_seed_epoch_and_rank(data, tmp_path):
    import dataclasses

    cfg = tiny_config(data, tmp_path / "run", "augment=true", "epoch_repeats=2", "cuboid_min_points=500")
    task = finetune.DetectionTask(cfg, SCENES, [])
    ctx = make_context(cfg.optim, cfg.runtime, cfg.run_dir)
    assert task.steps_per_epoch(ctx) == 2
    first = [b["point_clouds"] for b in task.train_batches(ctx, 3)]
    again = [b["point_clouds"] for b in task.train_batches(ctx, 3)]
    other_epoch = [b["point_clouds"] for b in task.train_batches(ctx, 4)]
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other_epoch[0])
    # two ranks of a global batch of 2 each take one sample per step, and together they see the same draws
    ranks = [dataclasses.replace(ctx, rank=r, world_size=2, batch_size=1) for r in (0, 1)]
    per_rank = [[b["point_clouds"][0] for b in task.train_batches(c, 3)] for c in ranks]
    for step in range(2):
        torch.testing.assert_close(torch.stack([per_rank[0][step], per_rank[1][step]]), first[step])


def test_a_refused_init_leaves_the_new_run_folder_as_it_was(data, tmp_path):
    """The init is loaded before anything is written: no init.json (nor anything else) in a refused run's folder."""
    bad_init = tmp_path / "init.pth"
    bad_init.write_bytes(b"not a checkpoint")
    cfg = tiny_config(data, tmp_path / "run", "init=" + str(bad_init), "optim.epochs=1")
    with pytest.raises(PcdError, match="init.pth"):
        finetune.run(cfg)
    assert not (tmp_path / "run").exists()
