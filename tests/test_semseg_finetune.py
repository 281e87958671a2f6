"""Semantic segmentation end to end on generated scenes: fine-tune from the session's tiny export, evaluate every
vertex like the ScanNet benchmark, write and re-score the benchmark files, predict unlabelled scenes.

Learning threshold: the `tiny` preset (512 points, 16 patches of 32, 40 epochs of 4 steps of 4 crops) on two
generated rooms reaches a whole-scene mIoU of at least MIN_MIOU = 0.12 on them (measured 0.18, 0.19 and 0.27 from
scratch with seeds 1, 2 and 0; an untrained model scores 0.00-0.01); the fine-tune takes about 27 s of CPU
time and each evaluation pass about 2 s (one thread).
"""

import json
import shutil

import numpy as np
import pytest

from pcd.pipeline.config import build_config
from pcd.pipeline.errors import PcdError
from pcd.pipeline.synthetic import generate, tiny_config as tiny_scenes
from pcd.trainer.detection import prepare
from pcd.trainer.semseg import evaluate, finetune, predict
from pcd.trainer.semseg.classes import CLASS_NAMES, VALID_CLASS_IDS
from pcd.trainer.semseg.metric import BenchmarkScores
from pcd.trainer.semseg.submission import read_prediction_file

SCENES = ["scene0000_00", "scene0001_00"]
MIN_MIOU = 0.12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two generated rooms (walls, floor, furniture of the benchmark classes), prepared with `pcd prepare scannet`."""
    root = tmp_path_factory.mktemp("semseg")
    generate(tiny_scenes(root / "scans", num_scenes=2, num_frames=1, seed=0))
    (root / "split.txt").write_text("".join(f"{s}\n" for s in SCENES))
    assert prepare.run(prepare.Config(scans_dir=root / "scans", out_dir=root / "data",
                                      splits=[root / "split.txt"])) == 0
    return root


def semseg_config(data, run_dir, *overrides):
    cfg = build_config(finetune.Config, "finetune-semseg", "tiny", ["runtime.progress=false", *overrides])
    cfg.data_dir, cfg.run_dir = data / "data", run_dir
    cfg.train_split = cfg.val_split = data / "data" / "split.txt"
    return cfg


@pytest.fixture(scope="module")
def trained(data, tiny_export, tmp_path_factory):
    cfg = semseg_config(data, tmp_path_factory.mktemp("semseg_run") / "run", f"init={tiny_export}")
    assert finetune.run(cfg) == 0
    return cfg.run_dir


def test_tiny_segmenter_learns_generated_scenes_and_is_scored_like_the_benchmark(data, trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "eval"][-1]["val_miou"] >= MIN_MIOU
    assert json.loads((trained / "init.json").read_text())["kind"] == "pcd-export"

    ev = build_config(evaluate.Config, "evaluate-semseg", None, ["passes=2"])
    ev.run_dir = trained
    assert evaluate.run(ev) == 0
    report = json.loads((trained / "evaluation_last.json").read_text())
    assert report["seeds"] == [0, 1] and report["task"] == "semseg"
    assert report["metrics"]["miou"]["mean"] >= MIN_MIOU and len(report["metrics"]["miou"]["passes"]) == 2
    assert set(report["class_iou"]) == set(CLASS_NAMES)
    assert 0 <= report["metrics"]["block_miou"]["mean"] <= 1
    assert report["pretrain_overlap"] == []  # the tiny export was pre-trained on other scenes
    assert not report["protocol"].startswith("OPTIMISTIC")

    # the benchmark files hold one valid nyu40 id per vertex; scored again from disk they give the summed mIoU
    files = trained / "evaluation_last_scannet"
    rescored = BenchmarkScores()
    for scene in SCENES:
        vertices = np.load(data / "data" / f"{scene}_full_vert.npy")
        predicted = read_prediction_file(files / f"{scene}.txt", len(vertices))
        assert np.isin(predicted, VALID_CLASS_IDS).all()
        rescored.add(np.load(data / "data" / f"{scene}_full_sem_label.npy"), predicted)
    assert report["data"]["scored_vertices"] == rescored.result()["scored_vertices"]
    assert rescored.result()["miou"] == pytest.approx(report["summed"]["miou"])


def test_the_best_checkpoint_scored_on_the_scenes_that_chose_it_is_labelled_optimistic(trained):
    ev = build_config(evaluate.Config, "evaluate-semseg", None, ["passes=1", "checkpoint=best"])
    ev.run_dir = trained
    assert evaluate.run(ev) == 0
    report = json.loads((trained / "evaluation_best.json").read_text())
    assert report["protocol"].startswith("OPTIMISTIC") and report["checkpoint_kind"] == evaluate.BEST_KIND


def test_predict_labels_unlabelled_scenes_as_evaluate_labels_them(data, trained, tmp_path):
    scenes = tmp_path / "test_scenes"
    scenes.mkdir()
    shutil.copy(data / "data" / "scene0001_00_full_vert.npy", scenes)  # vertices only, as a ScanNet test scan
    cfg = build_config(predict.Config, "predict-semseg", None, ["passes=2"])
    cfg.run_dir, cfg.scenes_dir, cfg.out_dir = trained, scenes, tmp_path / "out"
    assert predict.run(cfg) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene0001_00.txt"]
    ev = build_config(evaluate.Config, "evaluate-semseg", None, ["passes=2"])
    ev.run_dir = trained
    if not (trained / "evaluation_last_scannet" / "scene0001_00.txt").exists():
        assert evaluate.run(ev) == 0
    assert (tmp_path / "out" / "scene0001_00.txt").read_text() == \
        (trained / "evaluation_last_scannet" / "scene0001_00.txt").read_text()


def test_labels_that_do_not_fit_the_vertices_are_named(data, trained, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data / "data", broken)
    np.save(broken / "scene0000_00_full_sem_label.npy", np.zeros(5, np.uint16))
    ev = build_config(evaluate.Config, "evaluate-semseg", None, ["passes=1"])
    ev.run_dir, ev.data_dir = trained, broken
    with pytest.raises(PcdError, match="5 labels for the .* vertices of scene scene0000_00"):
        evaluate.run(ev)


def test_scene_ids_that_are_paths_are_refused_before_anything_is_written(data, trained, tmp_path):
    (tmp_path / "split.txt").write_text("../scene0000_00\n")
    cfg = build_config(predict.Config, "predict-semseg", None, ["passes=1"])
    cfg.run_dir, cfg.scenes_dir, cfg.out_dir, cfg.split = trained, data / "data", tmp_path / "out", tmp_path / "split.txt"
    with pytest.raises(PcdError, match="'../scene0000_00' is not a plain name"):
        predict.run(cfg)
    assert not (tmp_path / "out").exists()


def test_settings_that_would_leave_vertices_unscored_are_refused(data, tmp_path):
    with pytest.raises(PcdError, match="eval_stride"):
        semseg_config(data, tmp_path / "run", "eval_stride=2.0")
    with pytest.raises(PcdError, match="crop"):
        semseg_config(data, tmp_path / "run", "crop=room")
