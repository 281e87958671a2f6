"""The object tasks end to end on generated shapes: fine-tune from the session's tiny pre-trained export, evaluate,
and the refusals of bad input.

Learning thresholds (the `tiny` presets on `pcd generate-shapes --preset tiny`; about 40 s and 30 s of fine-tuning
on a shared 2-core CPU):
- classification (ModelNet40 txt layout, 4 classes present, 12 test shapes): overall accuracy >= 0.6 without and
  with voting, where chance is 0.25;
- part segmentation (4 categories, 12 test shapes, every point scored): instance mIoU >= 0.6, where a model that
  predicts one part per shape scores 0.18-0.19 on this data (measured: constant part 0.18, random weights 0.18).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pcd.pipeline.config import build_config
from pcd.pipeline.errors import PcdError
from pcd.trainer.classification import evaluate as cls_evaluate
from pcd.trainer.classification import finetune as cls_finetune
from pcd.trainer.partseg import evaluate as seg_evaluate
from pcd.trainer.partseg import finetune as seg_finetune
from pcd.trainer.point_mae import CLASSIFICATION_LAYOUT, PARTSEG_LAYOUT, to_point_mae
from pcd.trainer.weights import read_checkpoint
from shape_helpers import tiny_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def classification_config(data_dir: Path, run_dir: Path, *overrides: str) -> cls_finetune.Config:
    return build_config(cls_finetune.Config, "finetune-classification", "tiny",
                        [f"data_dir={data_dir}", f"run_dir={run_dir}", "runtime.progress=false", *overrides])


def partseg_config(data_dir: Path, run_dir: Path, *overrides: str) -> seg_finetune.Config:
    return build_config(seg_finetune.Config, "finetune-partseg", "tiny",
                        [f"data_dir={data_dir}", f"run_dir={run_dir}", "runtime.progress=false", *overrides])


def test_tiny_classifier_learns_generated_shapes_from_the_export(shapes, tiny_export, tmp_path):
    cfg = classification_config(shapes["modelnet40_txt"], tmp_path / "run", f"init={tiny_export}")
    assert cls_finetune.run(cfg) == 0
    run_dir = cfg.run_dir
    init = json.loads((run_dir / "init.json").read_text())
    assert init["kind"] == "pcd-export" and init["frame"] == "gravity-unit-sphere"
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["config"]["frame"] == "gravity-unit-sphere"  # the frame travels with the weights
    assert checkpoint["config"]["model"]["num_classes"] == 40  # the release's 40 names, 4 of them with shapes

    ev = build_config(cls_evaluate.Config, "evaluate-classification", None, [f"run_dir={run_dir}", "passes=2"])
    assert cls_evaluate.run(ev) == 0
    report = json.loads((run_dir / "evaluation_last.json").read_text())
    assert report["task"] == "classification" and report["seeds"] == [0, 1] and report["precision"] == "fp32"
    metrics = report["metrics"]
    assert metrics["overall_accuracy"]["mean"] >= 0.6 and metrics["vote_overall_accuracy"]["mean"] >= 0.6
    assert len(metrics["vote_overall_accuracy"]["passes"]) == 2
    predictions = np.load(run_dir / "evaluation_last_predictions.npz")
    assert predictions["logits"].shape == (12, 40) and predictions["vote_logits"].shape == (2, 12, 40)
    assert np.isclose((predictions["logits"].argmax(1) == predictions["labels"]).mean(),
                      metrics["overall_accuracy"]["mean"])

    # The same weights in Point-MAE's fine-tuned layout ({'base_model': ...}) evaluate to the same numbers.
    exported = tmp_path / "point_mae_cls.pth"
    torch.save(to_point_mae(CLASSIFICATION_LAYOUT, checkpoint["model"], epoch=checkpoint["epoch"]), exported)
    ev.checkpoint = str(exported)
    assert cls_evaluate.run(ev) == 0
    again = json.loads((run_dir / "evaluation_point_mae_cls.json").read_text())
    assert again["checkpoint_kind"] == "given file" and again["metrics"] == report["metrics"]

    # Point-MAE's protocol exists, and says it is optimistic.
    ev.checkpoint, ev.protocol, ev.point_mae_runs = "last", "point-mae", 3
    assert cls_evaluate.run(ev) == 0
    optimistic = json.loads((run_dir / "evaluation_last.json").read_text())
    assert optimistic["protocol"].startswith("point-mae (OPTIMISTIC)")
    assert optimistic["point_mae_best"]["vote_overall_accuracy"] == max(
        optimistic["metrics"]["vote_overall_accuracy"]["passes"])


def test_tiny_part_segmenter_learns_generated_shapes_from_the_export(shapes, tiny_export, tmp_path):
    cfg = partseg_config(shapes["shapenetpart"], tmp_path / "run", f"init={tiny_export}")
    assert seg_finetune.run(cfg) == 0
    ev = build_config(seg_evaluate.Config, "evaluate-partseg", None, [f"run_dir={cfg.run_dir}", "passes=2"])
    assert seg_evaluate.run(ev) == 0
    report = json.loads((cfg.run_dir / "evaluation_last.json").read_text())
    assert report["task"] == "partseg" and report["protocol"].startswith("all-points")
    assert report["metrics"]["instance_miou"]["mean"] >= 0.6
    predictions = np.load(cfg.run_dir / "evaluation_last_predictions.npz")
    offsets = predictions["offsets"]
    assert len(offsets) == 13 and predictions["predictions"].shape == (2, offsets[-1])
    assert predictions["seg"].shape == (offsets[-1],)  # every original point of every test shape has a prediction
    assert np.allclose(predictions["shape_iou"].mean(1), report["metrics"]["instance_miou"]["passes"])

    # Point-MAE's part-segmentation layout ({'model_state_dict': ...}) of the same weights loads strictly.
    checkpoint = read_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    exported = tmp_path / "point_mae_seg.pth"
    torch.save(to_point_mae(PARTSEG_LAYOUT, checkpoint["model"], epoch=checkpoint["epoch"],
                            metrics={"inctance_avg_iou": 0.5}), exported)
    ev.checkpoint, ev.passes, ev.protocol = str(exported), 1, "point-mae"
    assert seg_evaluate.run(ev) == 0
    report = json.loads((cfg.run_dir / "evaluation_point_mae_seg.json").read_text())
    assert report["protocol"].startswith("point-mae")


# --- bad input: one line naming the file, nothing written to the run folder --------------------------------


def test_an_unknown_dataset_layout_is_refused_before_the_run_starts(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = classification_config(tmp_path / "data", tmp_path / "run")
    with pytest.raises(PcdError, match=r"data: unknown dataset layout"):
        cls_finetune.run(cfg)
    assert not (tmp_path / "run").exists()


def test_missing_split_files_are_named(shapes, tmp_path):
    import shutil

    data = tmp_path / "shapenetpart"
    shutil.copytree(shapes["shapenetpart"], data)
    (data / "train_test_split" / "shuffled_val_file_list.json").unlink()
    with pytest.raises(PcdError, match=r"shuffled_val_file_list.json: missing"):
        seg_finetune.run(partseg_config(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_labels_out_of_range_are_named(shapes, tmp_path):
    import shutil

    data = tmp_path / "ScanObjectNN"
    shutil.copytree(shapes["scanobjectnn"], data)
    path = data / "main_split" / "training_objectdataset.h5"
    with h5py.File(path, "r+") as f:
        f["label"][0] = 15
    cfg = classification_config(data, tmp_path / "run", "variant=OBJ_BG", "num_points=256")
    with pytest.raises(PcdError, match=r"training_objectdataset.h5: .*15"):
        cls_finetune.run(cfg)
    assert not (tmp_path / "run").exists()


def test_an_init_of_another_width_is_refused_before_the_run_starts(shapes, tiny_export, tmp_path):
    alone = tmp_path / "alone.pth"  # the export's Point-MAE file without its backbone.json: no architecture
    alone.write_bytes((tiny_export / "point_mae.pth").read_bytes())
    cfg = classification_config(shapes["modelnet40_txt"], tmp_path / "run", f"init={alone}",
                                "model.backbone.trans_dim=32", "model.backbone.encoder_dims=32")
    with pytest.raises(PcdError, match=r"alone.pth: backbone key .* has shape"):
        cls_finetune.run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_class_count_is_refused_at_evaluation(shapes, tmp_path):
    from pcd.pipeline.atomic import atomic_write_json
    from pcd.pipeline.config import config_to_dict
    from pcd.trainer.classification.model import ClassifierConfig, PointMAEClassifier

    cfg = classification_config(shapes["modelnet40_txt"], tmp_path / "run")
    cfg.run_dir.mkdir()
    atomic_write_json(cfg.run_dir / "config.json", config_to_dict(cfg))
    other = PointMAEClassifier(ClassifierConfig(backbone=cfg.model.backbone, num_classes=15, head_dims=(32, 32)))
    torch.save(to_point_mae(CLASSIFICATION_LAYOUT, other.state_dict()), tmp_path / "scanobjectnn.pth")
    ev = build_config(cls_evaluate.Config, "evaluate-classification", None,
                      [f"run_dir={cfg.run_dir}", f"checkpoint={tmp_path / 'scanobjectnn.pth'}", "passes=1"])
    with pytest.raises(PcdError, match=r"scanobjectnn.pth: key 'cls_head_finetune.8.weight' has shape \(15, 32\)"):
        cls_evaluate.run(ev)
    assert not list(cfg.run_dir.glob("evaluation_*"))
