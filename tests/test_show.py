"""`pcd show`: pictures and .ply files of clouds and of an evaluated detection run (its saved boxes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline.errors import PcdError
from pcd.trainer import show
from pcd.trainer.detection.saved import detected_boxes
from pcd.trainer.render import GT_COLOR, PRED_COLOR, read_png

runner = CliRunner()


def test_detected_boxes_keep_each_box_once_with_its_best_class():
    box_a, box_b = np.arange(6.0), np.arange(6.0) + 10
    # parse_predictions lists every kept box once per class (3 classes here), in class order
    detections = [(0, box_a, 0.1), (1, box_a, 0.7), (2, box_a, 0.2), (0, box_b, 0.5), (1, box_b, 0.1), (2, box_b, 0.3)]
    rows = detected_boxes(detections, 3)
    assert rows.shape == (2, 8)
    assert np.allclose(rows[0], [*box_a, 1, 0.7]) and np.allclose(rows[1], [*box_b, 0, 0.5])
    assert detected_boxes([], 3).shape == (0, 8)


@pytest.fixture
def evaluated_run(tmp_path) -> Path:
    """A prepared scene (a floor of points and one chair's box of points) and a detection run whose saved evaluation
    found the chair (score 0.9), a spurious table (score 0.2) and a room-sized box below the confidence threshold."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run_dir.mkdir()
    rng = np.random.default_rng(0)
    floor = np.concatenate([rng.uniform(0, 4, (2000, 2)), np.zeros((2000, 1))], 1)
    chair = rng.uniform([1, 1, 0], [2, 2, 1], (1000, 3))
    xyz = np.concatenate([floor, chair])
    rgb = np.full((len(xyz), 3), 90.0)
    np.save(data / "scene0000_00_vert.npy", np.concatenate([xyz, rgb], 1).astype(np.float32))
    np.save(data / "scene0000_00_bbox.npy", np.array([[1.5, 1.5, 0.5, 1, 1, 1, 5]], np.float32))  # nyu40 5: chair
    (run_dir / "config.json").write_text("{}")
    # as `pcd evaluate detection` saves them: raw proposals per pass and scene, post-processing settings
    (run_dir / "evaluation_last.json").write_text(json.dumps({
        "task": "detection", "data": {"data_dir": str(data), "scenes": ["scene0000_00"]},
        "ap_config": {"remove_empty_box": True, "empty_box_min_points": 5, "nms_iou": 0.25, "conf_thresh": 0.05}}))
    prob = np.full((3, 18), 0.001, np.float32)
    prob[0, 2], prob[1, 4], prob[2, 7] = 0.95, 0.9, 0.9
    np.savez(run_dir / "evaluation_last_predictions.npz",
             box_minmax=np.array([[[[1, 1, 0, 2, 2, 1], [3, 3, 0, 3.5, 3.5, 0.5], [0, 0, 0, 4, 4, 1]]]], np.float32),
             sem_cls_prob=prob[None, None], objectness=np.array([[[0.95, 0.22, 0.01]]], np.float32))
    return run_dir


def test_show_draws_a_detection_run(evaluated_run, tmp_path):
    out = tmp_path / "pictures"
    assert show.run(show.Config(sources=[str(evaluated_run)], out=out, views=2, width=120, height=90)) == 0
    folder = out / evaluated_run.name
    picture = read_png(folder / "scene0000_00.png")
    green = (picture == GT_COLOR).all(-1).sum()
    red = (picture == PRED_COLOR).all(-1).sum()
    # The detection is the ground-truth box itself: drawn after it, red covers the green edges. The 0.2 box is not
    # drawn (min_score 0.5), so no red pixel lies outside the chair's projection.
    assert red > 50 and green < red / 4
    sheet = read_png(folder / "detection_sheet.png")
    assert (sheet == PRED_COLOR).all(-1).sum() > 20
    assert (folder / "scene0000_00.ply").is_file() and (folder / "scene0000_00_boxes.ply").is_file()
    import open3d as o3d

    assert len(o3d.io.read_point_cloud(str(folder / "scene0000_00.ply")).points) == 3000
    assert len(o3d.io.read_line_set(str(folder / "scene0000_00_boxes.ply")).lines) == 24  # truth + 1 detection

    assert show.run(show.Config(sources=[str(evaluated_run)], out=out / "all", views=1, width=120, height=90,
                                min_score=0.1, ply=False)) == 0
    assert not list((out / "all").rglob("*.ply"))
    both = read_png(out / "all" / evaluated_run.name / "scene0000_00.png")
    assert (both == PRED_COLOR).all(-1).sum() > (picture[:, :both.shape[1] // 1] == PRED_COLOR).all(-1).sum() / 2


def test_show_a_cloud_file_and_bad_input(tmp_path):
    np.save(tmp_path / "room.npy", np.random.default_rng(1).uniform(0, 3, (400, 3)).astype(np.float32))
    result = runner.invoke(app, ["show", str(tmp_path / "room.npy"), "--out", str(tmp_path / "pics"), "--views", "2"])
    assert result.exit_code == 0, result.output
    image = read_png(tmp_path / "pics" / "room.npy.png")
    assert image.shape[1] == 2 * 400 + 4 and (image != 255).any(-1).sum() > 500
    result = runner.invoke(app, ["show", str(tmp_path / "run-without-evaluation"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no such cloud file" in " ".join(result.output.split())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    result = runner.invoke(app, ["show", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "evaluation_last.json: no such evaluation" in " ".join(result.output.split())


def test_caption_input_from_a_detected_box(evaluated_run):
    """`RUN#SCENE:detected=K` is the scene's points inside the K-th most confident detected box."""
    from pcd.trainer.clouds import read_cloud

    cloud = read_cloud(f"{evaluated_run}#scene0000_00:detected=0")  # the chair box, score 0.9
    assert cloud.origin == "region" and len(cloud.xyz) >= 1000
    assert ((cloud.xyz >= [1, 1, 0]) & (cloud.xyz <= [2, 2, 1])).all()
    second = read_cloud(f"{evaluated_run}#scene0000_00:detected=1")  # the 0.2 box: floor points only
    assert (second.xyz[:, 2] == 0).all() and ((second.xyz[:, :2] >= 3) & (second.xyz[:, :2] <= 3.5)).all()
    with pytest.raises(PcdError, match="no box 2"):
        read_cloud(f"{evaluated_run}#scene0000_00:detected=2")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from pcd.pipeline.config import build_config
    from pcd.pipeline.synthetic_shapes import Config, generate

    root = tmp_path_factory.mktemp("shapes")
    generate(build_config(Config, "generate-shapes", "tiny", [f"out_dir={root / 'shapes'}"]))
    return root / "shapes"


def fake_run(run_dir: Path, config: object, document: dict, arrays: dict) -> Path:
    """A run folder as `pcd finetune TASK` + `pcd evaluate TASK` leave it: config, evaluation JSON, predictions."""
    from pcd.pipeline.config import config_to_dict

    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(config)))
    (run_dir / "evaluation_last.json").write_text(json.dumps(document))
    np.savez(run_dir / "evaluation_last_predictions.npz", **arrays)
    return run_dir


def test_show_partseg_and_classification_runs(shapes, tmp_path):
    from pcd.trainer.classification.config import Config as ClassificationConfig
    from pcd.trainer.partseg.config import Config as PartsegConfig
    from pcd.trainer.partseg.data import ShapeNetPart
    from pcd.trainer.render import CORRECT_COLOR, WRONG_COLOR

    data = shapes / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    test = ShapeNetPart(data, "test")
    seg = [test[i]["seg"] for i in range(len(test))]
    predictions = np.concatenate(seg).copy()
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seg])])
    predictions[offsets[1]:offsets[2]] = seg[1] + 1  # shape 1: every point wrong; shape 0: all right
    partseg = fake_run(tmp_path / "partseg", PartsegConfig(data_dir=data),
                       {"task": "partseg", "data": {"data_dir": str(data)}},
                       {"offsets": offsets, "seg": np.concatenate(seg).astype(np.int8),
                        "predictions": predictions[None].astype(np.int8),
                        "shape_iou": np.ones((1, len(seg)), np.float32)})
    assert show.run(show.Config(sources=[str(partseg)], out=tmp_path / "pics", max_items=2, width=80, height=60,
                                ply=False)) == 0
    # below the title bands (their anti-aliased text has grey pixels)
    right = read_png(next((tmp_path / "pics" / "partseg").glob("shape0000_*.png")))[2 * 22:]
    wrong = read_png(next((tmp_path / "pics" / "partseg").glob("shape0001_*.png")))[2 * 22:]
    assert (right == CORRECT_COLOR).all(-1).sum() > 20 and not (right == WRONG_COLOR).all(-1).any()
    assert (wrong == WRONG_COLOR).all(-1).sum() > 20 and not (wrong == CORRECT_COLOR).all(-1).any()

    h5 = shapes / "modelnet40_ply_hdf5_2048"
    from pcd.trainer.classification.data import open_classification

    labels = open_classification(h5, "test").labels
    logits = np.eye(40, dtype=np.float32)[labels]
    logits[0] = np.roll(logits[0], 1)  # shape 0 misclassified
    classification = fake_run(tmp_path / "cls", ClassificationConfig(data_dir=h5),
                              {"task": "classification", "data": {"data_dir": str(h5)}},
                              {"labels": labels, "logits": logits})
    assert show.run(show.Config(sources=[str(classification)], out=tmp_path / "pics", max_items=2, width=80,
                                height=60, ply=False)) == 0
    first, second = (read_png(tmp_path / "pics" / "cls" / f"shape000{i}.png")[22:] for i in (0, 1))
    assert (first == PRED_COLOR).all(-1).sum() > 20 and not (first == GT_COLOR).all(-1).any()
    assert (second == GT_COLOR).all(-1).sum() > 20 and not (second == PRED_COLOR).all(-1).any()
    assert (tmp_path / "pics" / "cls" / "classification_sheet.png").is_file()
