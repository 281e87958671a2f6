"""pcd's task models give Point-MAE's outputs, and Point-MAE's fine-tuned checkpoint layouts load both ways.

tests/data/point_mae_reference.pt holds inputs and outputs of Point-MAE's own `PointTransformer` and
segmentation `get_model`, with weights set by `seeded_state` below (docs/point_mae_compat.md says how it was
made); the tests rebuild the same weights in pcd's models and compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig
from pcd.trainer.classification.model import ClassifierConfig, PointMAEClassifier
from pcd.trainer.models import MODELS
from pcd.trainer.partseg.model import PartSegConfig, PointMAEPartSegmenter
from pcd.trainer.point_mae import (CLASSIFICATION_LAYOUT, PARTSEG_LAYOUT, load_point_mae_checkpoint,
                                   read_point_mae_checkpoint, state_from_point_mae, to_point_mae,
                                   write_point_mae_checkpoint)
from pcd.trainer.weights import to_point_mae as backbone_to_point_mae

REFERENCE = Path(__file__).parent / "data" / "point_mae_reference.pt"


def seeded_state(model: torch.nn.Module, seed: int) -> None:
    """Weights that keep activations O(1) in every layer, so a mis-wired tensor shows in the output: keys in
    sorted order, one normal draw each; matrices N(0, 1/fan_in), norm scales 1 + N(0, .1^2), other vectors
    N(0, .1^2), running variances .5 + .5|N(0,1)|, counters untouched."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        if not value.is_floating_point():
            continue
        noise = torch.randn(value.shape, generator=gen)
        if key.endswith("running_var"):
            value.copy_(0.5 + 0.5 * noise.abs())
        elif value.ndim >= 2:
            value.copy_(noise / value[0].numel() ** 0.5)
        elif key.endswith("weight"):
            value.copy_(1 + 0.1 * noise)
        else:
            value.copy_(0.1 * noise)
    model.load_state_dict(state)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(REFERENCE, map_location="cpu", weights_only=True)


def test_classifier_gives_point_mae_logits(reference):
    backbone = BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=2, num_heads=2)
    model = PointMAEClassifier(ClassifierConfig(backbone=backbone)).eval()
    seeded_state(model, 10)
    expected = reference["classification_logits"]
    assert expected.std() > 0.3  # the reference is not degenerate
    with torch.no_grad():
        logits = model(reference["classification_points"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-6)


def test_part_segmenter_gives_point_mae_outputs_at_full_size(reference):
    model = PointMAEPartSegmenter(PartSegConfig()).eval()
    seeded_state(model, 11)
    with torch.no_grad():
        logits = model(reference["partseg_points"], reference["partseg_category"])
    expected = reference["partseg_log_softmax"]  # every 8th point of Point-MAE's output
    assert expected.std(dim=1).mean() > 0.05  # outputs vary from point to point
    torch.testing.assert_close(logits.log_softmax(dim=-1)[:, ::8], expected, rtol=1e-4, atol=1e-5)


def tiny(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name].build(MODELS[name].tiny())
    seeded_state(model, seed)
    return model


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_point_mae_classification_checkpoint_file_loads_strictly(tmp_path):
    source = tiny("classification", 1).state_dict()
    # What Point-MAE's save_checkpoint writes from an nn.DataParallel run: 'module.' keys, tensor metrics.
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 5e-4, "weight_decay": 0.05, "params": [0]}]}
    torch.save({"base_model": {"module." + k: v for k, v in source.items()}, "optimizer": optimizer,
                "epoch": 299, "metrics": {"acc": torch.tensor(93.1)}, "best_metrics": {"acc": torch.tensor(93.5)}},
               tmp_path / "ckpt-best.pth")
    model = tiny("classification", 2)
    assert read_point_mae_checkpoint(model, tmp_path / "ckpt-best.pth") == CLASSIFICATION_LAYOUT
    assert_same_state(model, source)


def test_point_mae_partseg_checkpoint_file_with_numpy_metrics_loads_strictly(tmp_path):
    source = tiny("partseg", 1).state_dict()
    # segmentation/main.py's best_model.pth: numpy float64 metrics beside the state and optimizer dicts.
    torch.save({"epoch": 251, "train_acc": np.float64(0.95), "test_acc": np.float64(0.94),
                "class_avg_iou": np.mean([0.8, 0.88]), "inctance_avg_iou": np.float64(0.86),
                "model_state_dict": source, "optimizer_state_dict": {"state": {}, "param_groups": []}},
               tmp_path / "best_model.pth")
    model = tiny("partseg", 2)
    assert read_point_mae_checkpoint(model, tmp_path / "best_model.pth") == PARTSEG_LAYOUT
    assert_same_state(model, source)


@pytest.mark.parametrize("name,layout,state_key", [("classification", CLASSIFICATION_LAYOUT, "base_model"),
                                                    ("partseg", PARTSEG_LAYOUT, "model_state_dict")])
def test_pcd_weights_written_in_point_mae_layout_round_trip(name, layout, state_key, tmp_path):
    model = tiny(name, 3)
    write_point_mae_checkpoint(tmp_path / "out.pth", layout, model.state_dict(), epoch=7, metrics={"acc": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]  # no temporary left behind
    loaded = torch.load(tmp_path / "out.pth", map_location="cpu", weights_only=True)  # no allow-list needed
    expected_keys = {"base_model", "epoch", "metrics", "best_metrics"} if layout == CLASSIFICATION_LAYOUT \
        else {"model_state_dict", "epoch", "acc"}
    assert set(loaded) == expected_keys and loaded["epoch"] == 7
    assert list(loaded[state_key]) == list(model.state_dict())  # Point-MAE's names, no prefix
    other = tiny(name, 4)
    assert read_point_mae_checkpoint(other, tmp_path / "out.pth") == layout
    assert_same_state(other, model.state_dict())


def test_unknown_layout_and_clashing_metric_names_are_refused():
    state = tiny("partseg", 1).state_dict()
    with pytest.raises(ValueError, match="unknown Point-MAE layout 'seg'"):
        to_point_mae("seg", state)
    with pytest.raises(ValueError, match=r"metric names \['epoch'\] clash"):
        to_point_mae(PARTSEG_LAYOUT, state, metrics={"epoch": 3.0})


def test_missing_and_unexpected_keys_are_one_line_naming_file_and_keys(tmp_path):
    state = tiny("classification", 1).state_dict()
    del state["cls_pos"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(PcdError) as err:
        load_point_mae_checkpoint(tiny("classification", 2), {"base_model": state}, tmp_path / "c.pth")
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{tmp_path / 'c.pth'}: does not fit PointMAEClassifier: missing 1 keys (cls_pos), "
                       f"unexpected 1 keys (extra.weight)")


def test_a_pre_training_checkpoint_is_refused_with_a_hint(tmp_path):
    model = tiny("classification", 1)
    pretrain = backbone_to_point_mae({k: v for k, v in model.state_dict().items()
                                      if not k.startswith("cls")})
    keys = len(model.state_dict())
    with pytest.raises(PcdError, match=rf"p\.pth: does not fit PointMAEClassifier: missing {keys} keys "
                                       r"\(cls_token, cls_pos, encoder\.first_conv\.0\.weight and \d+ more\), "
                                       r"unexpected \d+ keys \(MAE_encoder\.encoder\.first_conv\.0\.weight, .*\); "
                                       r"this looks like a pre-trained backbone: load it as initialisation instead$"):
        load_point_mae_checkpoint(model, pretrain, tmp_path / "p.pth")


def test_a_wrong_shape_and_a_missing_state_are_refused(tmp_path):
    state = tiny("partseg", 1).state_dict()
    state["convs3.weight"] = torch.zeros(13, 16, 1)
    with pytest.raises(PcdError, match=r"b\.pth: key 'convs3\.weight' has shape \(13, 16, 1\), "
                                       r"PointMAEPartSegmenter needs \(50, 16, 1\)"):
        load_point_mae_checkpoint(tiny("partseg", 2), {"model_state_dict": state}, tmp_path / "b.pth")
    with pytest.raises(PcdError, match=r"b\.pth: not a Point-MAE fine-tuned checkpoint \(no 'base_model', 'model' "
                                       r"or 'model_state_dict'; found epoch, state\)"):
        state_from_point_mae({"epoch": 1, "state": {}}, tmp_path / "b.pth")
    with pytest.raises(PcdError, match=r"'base_model' is not a state dict"):
        state_from_point_mae({"base_model": {"a": 1}}, tmp_path / "b.pth")
