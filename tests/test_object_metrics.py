"""Hand-worked cases for the classification and part-segmentation metrics, and the augmentations."""

from __future__ import annotations

import numpy as np
import pytest

from pcd.trainer.augment import scale_and_shift, scale_and_translate
from pcd.trainer.classification.metric import (accuracy_scores, mean_class_accuracy, overall_accuracy,
                                               per_class_accuracy, vote)
from pcd.trainer.partseg.metric import PartSegScores, restricted_prediction, shape_iou


def test_mean_class_accuracy_weights_every_class_equally() -> None:
    # class 0: 4 shapes, all right; class 1: 1 shape, wrong; class 2: no shape at all.
    labels = np.array([0, 0, 0, 0, 1])
    predictions = np.array([0, 0, 0, 0, 0])
    assert overall_accuracy(predictions, labels) == pytest.approx(4 / 5)
    per_class = per_class_accuracy(predictions, labels, num_classes=3)
    assert per_class[:2].tolist() == [1.0, 0.0] and np.isnan(per_class[2])
    assert mean_class_accuracy(predictions, labels, num_classes=3) == pytest.approx(0.5)


def test_voting_averages_logits_not_votes() -> None:
    # Two views of one shape with label 1: view 0 prefers class 0 narrowly, view 1 prefers class 1 strongly.
    # A majority (or any tie-break) of per-view argmaxes could say 0; the mean of the logits says 1.
    views = np.array([[[2.0, 1.9]], [[0.0, 3.0]]])
    assert vote(views).tolist() == [[1.0, 2.45]]
    assert accuracy_scores(vote(views), np.array([1]))["overall_accuracy"] == 1.0
    assert accuracy_scores(views[0], np.array([1]))["overall_accuracy"] == 0.0


def test_prediction_is_restricted_to_the_parts_of_the_category() -> None:
    logits = np.zeros((2, 50))
    logits[0, 12] = 5.0  # Chair's part 12 would win without the restriction
    logits[0, 5] = 1.0  # Bag = category 1, parts 4 and 5
    logits[1, 4] = 0.5
    assert restricted_prediction(logits, category=1).tolist() == [5, 4]


def test_a_part_absent_from_prediction_and_truth_has_iou_one() -> None:
    # Airplane (parts 0-3). Truth: parts 0,0,1,1. Prediction: 0,1,1,1.
    # part 0: inter 1, union 2 -> 0.5; part 1: inter 2, union 3 -> 2/3; parts 2, 3 absent from both -> 1 each.
    seg = np.array([0, 0, 1, 1])
    prediction = np.array([0, 1, 1, 1])
    assert shape_iou(prediction, seg, category=0) == pytest.approx((0.5 + 2 / 3 + 1 + 1) / 4)
    # A part predicted but absent from the truth scores 0, not 1.
    assert shape_iou(np.array([2, 2, 1, 1]), seg, category=0) == pytest.approx((0 + 1 + 0 + 1) / 4)


def _logits_for(prediction: list[int]) -> np.ndarray:
    logits = np.zeros((len(prediction), 50))
    logits[np.arange(len(prediction)), prediction] = 1.0
    return logits


def test_class_miou_averages_categories_instance_miou_averages_shapes() -> None:
    scores = PartSegScores()
    # Three Bag shapes (parts 4, 5), all perfect: IoU 1 each.
    for _ in range(3):
        scores.add(_logits_for([4, 5]), np.array([4, 5]), category=1)
    # One Cap shape (parts 6, 7): truth 6,6,7,7, prediction 6,6,6,6 -> part 6: 2/4, part 7: 0/2 -> 0.25.
    scores.add(_logits_for([6, 6, 6, 6]), np.array([6, 6, 7, 7]), category=2)
    result = scores.result()
    assert result["instance_miou"] == pytest.approx((3 * 1.0 + 0.25) / 4)
    assert result["class_miou"] == pytest.approx((1.0 + 0.25) / 2)
    assert result["category_miou"] == {1: 1.0, 2: 0.25}
    assert result["point_accuracy"] == pytest.approx((6 + 2) / 10)


def test_scale_and_translate_scales_each_axis_then_shifts() -> None:
    points = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    rng = np.random.default_rng(3)
    scale = np.random.default_rng(3).uniform(2 / 3, 1.5, 3)  # the first three draws are the scales
    out = scale_and_translate(points, rng)
    shift = out[1]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0] - shift, scale, rtol=1e-6)
    assert np.all(np.abs(shift) <= 0.2) and len(set(np.round(scale, 6))) == 3
    same = scale_and_translate(points, np.random.default_rng(0), scale_low=2.0, scale_high=2.0, translate_range=0.0)
    np.testing.assert_array_equal(same, points * 2)


def test_scale_and_shift_is_isotropic() -> None:
    points = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = scale_and_shift(points, np.random.default_rng(5))
    ratio = (out[0] - out[1]) / points[0]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    assert 0.8 <= ratio[0] <= 1.25 and np.all(np.abs(out[1]) <= 0.1)
    np.testing.assert_allclose(scale_and_shift(points, np.random.default_rng(0), scale_low=1.0, scale_high=1.0,
                                               shift_range=0.0), points)
