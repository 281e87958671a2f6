"""Detection fine-tuning end to end on generated scenes: initialisation from an export, overfitting, evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from pcd.pipeline.config import build_config
from pcd.pipeline.errors import PcdError
from pcd.pipeline.synthetic import generate, tiny_config as tiny_scenes
from pcd.trainer.backbone import PointBackbone
from pcd.trainer.detection import evaluate, finetune, prepare
from pcd.trainer.detection.boxes import CLASS_NAMES, NUM_CLASSES, NYU40_TO_CLASS
from pcd.trainer.runtime import make_context
from pcd.trainer.weights import write_export

SCENES = ["scene0000_00", "scene0001_00"]


def prepared_rooms(root: Path, num_scenes: int, **generator_changes) -> Path:
    """`num_scenes` generated rooms (tiny preset, one frame each) in ROOT/scans, prepared for detection in
    ROOT/data with a split of all of them; returns ROOT."""
    infos = generate(tiny_scenes(root / "scans", num_scenes=num_scenes, num_frames=1, seed=0, **generator_changes))
    assert [info.scene_id for info in infos] == SCENES[:num_scenes]
    (root / "split.txt").write_text("".join(f"{s}\n" for s in SCENES[:num_scenes]))
    prepare.run(prepare.Config(scans_dir=root / "scans", out_dir=root / "data", splits=[root / "split.txt"]))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two generated rooms (6 boxes each of the 18 classes, walls, floor), prepared for detection."""
    return prepared_rooms(tmp_path_factory.mktemp("det"), 2)


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


def test_the_session_tiny_export_initialises_the_detector(data, tmp_path, tiny_export):
    cfg = tiny_config(data, tmp_path / "run", f"init={tiny_export}")
    plan = finetune.check_init(cfg, SCENES)
    exported = json.loads((tiny_export / "backbone.json").read_text())
    assert plan.pretrain_scenes == exported["pretrain_scenes"] and not set(SCENES) & set(exported["pretrain_scenes"])
    model = finetune.DetectionTask(cfg, SCENES, SCENES).build_model(make_context(cfg.optim, cfg.runtime, cfg.run_dir))
    weights = load_safetensors(tiny_export / "backbone.safetensors")
    assert model.encoder.backbone.state_dict().keys() == weights.keys()
    for key, value in model.encoder.backbone.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_init_refuses_an_export_with_another_normalisation(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", "init=" + str(tmp_path / "export"))
    export_backbone(cfg, tmp_path / "export", [])
    meta_path = tmp_path / "export" / "backbone.json"
    meta = json.loads(meta_path.read_text())
    meta["normalization"]["name"] = "bounding-box"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PcdError, match="normalisation 'bounding-box'"):
        finetune.check_init(cfg, SCENES)


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> Path:
    """Generated room 0 (a cabinet, a chair, a refrigerator, a bathtub, a desk) without its 4 cm thick picture,
    prepared for detection. At IoU 0.25 a box that thin must be placed to within about a centimetre: with the
    picture the tiny detector fitted it on 1 of 3 training seeds in 300 steps, and on 1 of 4 runs of 600 steps
    (3DETR's picture AP is its lowest on ScanNet too), so the test would have passed by the luck of its seed."""
    return prepared_rooms(tmp_path_factory.mktemp("room"), 1, exclude_categories=("picture",))


# 30 epochs of 10 steps of the tiny preset on the one room, its points grouped in a loader worker. Each class has
# one box, so a class's AP in a pass is 1, 0.5 or 0; on training seeds 0-6 the mean AP of the room's classes over
# the two evaluation passes was 0.9 to 1.0, each class's at least 0.5. Two seeds landed exactly on 0.9 (one class
# half missed), so the bar is 0.8: room for one more half-missed class; every class must still be found.
OVERFIT = ("optim.epochs=30", "runtime.eval_every=15", "runtime.workers=1")
BAR = 0.8


def test_tiny_detector_overfits_a_generated_scene(room, tmp_path):
    cfg = tiny_config(room, tmp_path / "run", "runtime.progress=false", *OVERFIT)
    assert finetune.run(cfg) == 0
    gt_classes = {CLASS_NAMES[NYU40_TO_CLASS[int(nyu)]] for nyu in np.load(room / "data" / f"{SCENES[0]}_bbox.npy")[:, 6]}
    assert len(gt_classes) == 5
    # 3DETR's mAP averages over every class with ground truth or a detection; per-class proposals detect all
    # 18, so classes absent from this room count 0 and a perfect fit scores len(gt_classes) / 18
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "epoch"]
    assert losses[-1] < 0.3 * losses[0]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert final_eval["mAP_0.25"] >= BAR * len(gt_classes) / NUM_CLASSES

    ev = build_config(evaluate.Config, "evaluate-detection", None, ["passes=2", "workers=0"])
    ev.run_dir = cfg.run_dir
    assert evaluate.run(ev) == 0
    report = json.loads((cfg.run_dir / "evaluation_last.json").read_text())
    assert report["seeds"] == [0, 1] and report["checkpoint_kind"] == "last epoch" and report["precision"] == "fp32"
    assert len(report["passes"]) == 2 and set(report["per_class"]) == set(CLASS_NAMES)
    ap = {name: metrics["AP_0.25"]["mean"] for name, metrics in report["per_class"].items()}
    assert np.mean([ap[name] for name in gt_classes]) >= BAR
    assert min(ap[name] for name in gt_classes) > 0
    assert all(ap[name] == 0.0 for name in set(CLASS_NAMES) - gt_classes)

    ev.checkpoint, ev.passes = "best", 1
    assert evaluate.run(ev) == 0
    best = json.loads((cfg.run_dir / "evaluation_best.json").read_text())
    assert best["checkpoint_kind"] == "best mAP@0.25 on the validation split"
    assert best["metrics"]["mAP_0.25"]["mean"] >= BAR * len(gt_classes) / NUM_CLASSES


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


def test_grouping_in_the_loader_feeds_the_detector_what_it_computes_itself(data, tmp_path):
    """The training batches carry the backbone's FPS + kNN picks (made in the loader workers): the detector fed them
    gives its own outputs exactly; a resumed epoch's batches are the epoch's tail, read without the skipped ones."""
    from pcd.trainer.detection.model import build_detector

    cfg = tiny_config(data, tmp_path / "run", "augment=true", "epoch_repeats=2", "cuboid_min_points=500")
    task = finetune.DetectionTask(cfg, SCENES, [])
    ctx = make_context(cfg.optim, cfg.runtime, cfg.run_dir)
    batches = list(task.train_batches(ctx, 1))
    batch = batches[0]
    assert batch["group_patch_idx"].shape == (2, cfg.model.backbone.num_groups, cfg.model.backbone.group_size)
    torch.manual_seed(0)
    model = build_detector(cfg.model).eval()
    args = (batch["point_clouds"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"])
    with torch.no_grad():
        own, fed = model(*args)[-1], model(*args, (batch["group_center_idx"], batch["group_patch_idx"]))[-1]
    assert all(torch.equal(own[key], fed[key]) for key in own)
    tail = list(task.train_batches_from(ctx, 1, 1))
    assert len(tail) == 1 and all(torch.equal(tail[0][k], batches[1][k]) for k in batch)


def test_a_refused_init_leaves_the_new_run_folder_as_it_was(data, tmp_path):
    """The init is loaded before anything is written: no init.json (nor anything else) in a refused run's folder."""
    bad_init = tmp_path / "init.pth"
    bad_init.write_bytes(b"not a checkpoint")
    cfg = tiny_config(data, tmp_path / "run", "init=" + str(bad_init), "optim.epochs=1")
    with pytest.raises(PcdError, match="init.pth"):
        finetune.run(cfg)
    assert not (tmp_path / "run").exists()
