"""The VoteNet/3DETR AP calculator against hand-worked cases."""

import numpy as np
import pytest

from pcd.trainer.detection.ap import APCalculator, APConfig, eval_det_cls, nms_3d_same_class, parse_predictions, voc_ap
from pcd.trainer.detection.boxes import aabb_iou


def box(x, y, z, dx=1.0, dy=1.0, dz=1.0):
    return np.array([x, y, z, x + dx, y + dy, z + dz], float)


def test_perfect_detections_give_one():
    calc = APCalculator()
    for scene in range(3):
        gts = [(2, box(0, 0, 0)), (4, box(3, scene, 0, 2, 1, 1)), (2, box(-3, 0, 0, 0.5, 0.5, 2))]
        calc.add_scene([(c, b, 0.9) for c, b in gts], gts)
    result = calc.compute()
    assert result["mAP_0.25"] == pytest.approx(1.0)
    assert result["mAP_0.5"] == pytest.approx(1.0)
    assert set(result["per_class"]) == {"chair", "table"}
    assert result["per_class"]["chair"]["AR_0.5"] == pytest.approx(1.0)


def test_known_precision_recall_curve_area():
    gt = {0: [box(0, 0, 0), box(5, 0, 0), box(10, 0, 0)]}
    # scores sorted: TP, FP, TP, FP, TP -> recall 1/3,1/3,2/3,2/3,1 ; precision 1,1/2,2/3,1/2,3/5
    pred = {0: [(box(0, 0, 0), 0.9), (box(20, 0, 0), 0.8), (box(5, 0, 0), 0.7), (box(30, 0, 0), 0.6),
                (box(10, 0, 0), 0.5)]}
    recall, precision, ap = eval_det_cls(pred, gt, 0.25)
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    # monotone envelope: 1 on (0,1/3], 2/3 on (1/3,2/3], 3/5 on (2/3,1]
    assert ap == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)


def test_voc_ap_all_point_interpolation():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)
    assert voc_ap(np.array([0.5, 0.5]), np.array([0.2, 1.0])) == pytest.approx(0.5)


def test_duplicates_are_false_positives():
    gt = {0: [box(0, 0, 0), box(5, 0, 0)]}
    pred = {0: [(box(0, 0, 0), 0.9), (box(0.05, 0, 0), 0.8), (box(5, 0, 0), 0.7)]}
    recall, precision, ap = eval_det_cls(pred, gt, 0.25)
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_iou_must_exceed_threshold_strictly():
    gt_box, half = box(0, 0, 0), box(0, 0, 0, 1, 1, 0.5)
    assert aabb_iou(gt_box, half) == 0.5
    assert eval_det_cls({0: [(half, 1.0)]}, {0: [gt_box]}, 0.5)[2] == 0.0
    assert eval_det_cls({0: [(half, 1.0)]}, {0: [gt_box]}, 0.25)[2] == 1.0


def test_map_averages_classes_with_ground_truth_or_a_detection():
    calc = APCalculator()
    calc.add_scene([(0, box(0, 0, 0), 0.9), (5, box(9, 9, 9), 0.9)],   # class 5 is detected, has no GT: AP 0
                   [(0, box(0, 0, 0)), (1, box(4, 0, 0))])              # class 1 has no detection: AP 0
    result = calc.compute()
    assert result["mAP_0.25"] == pytest.approx(1 / 3) and result["mAR_0.25"] == pytest.approx(1 / 3)
    assert set(result["per_class"]) == {"cabinet", "bed", "door"}
    assert result["per_class"]["bed"]["AP_0.25"] == 0.0 and result["per_class"]["door"]["AP_0.25"] == 0.0
    assert result["per_class"]["door"]["AR_0.25"] == 0.0


def test_a_detected_class_without_ground_truth_halves_a_two_class_map():
    calc = APCalculator()
    calc.add_scene([(2, box(0, 0, 0), 0.9)], [(2, box(0, 0, 0))])
    assert calc.compute()["mAP_0.5"] == 1.0
    calc.add_scene([(7, box(0, 0, 0), 0.3)], [])   # a bookshelf in a scene without one, nor any GT bookshelf
    result = calc.compute()
    assert result["mAP_0.5"] == 0.5 and result["mAR_0.5"] == 0.5
    assert result["per_class"]["bookshelf"] == {"AP_0.25": 0.0, "AR_0.25": 0.0, "AP_0.5": 0.0, "AR_0.5": 0.0}


def test_map_is_the_float32_mean_of_the_class_aps():
    calc = APCalculator()
    gts = [(0, box(0, 0, 0)), (0, box(5, 0, 0)), (0, box(10, 0, 0)), (1, box(20, 0, 0))]
    calc.add_scene([(0, box(0, 0, 0), 0.9), (0, box(30, 0, 0), 0.8), (0, box(5, 0, 0), 0.7),
                    (1, box(20, 0, 0), 0.5)], gts)
    result = calc.compute()
    aps = [result["per_class"][name]["AP_0.25"] for name in ("cabinet", "bed")]
    assert aps[0] == pytest.approx(1 / 3 + 2 / 9)
    assert result["mAP_0.25"] == float(np.float32(np.array(aps, np.float32).mean()))


def test_nms_suppresses_only_same_class_overlaps():
    boxes = np.stack([box(0, 0, 0), box(0.1, 0, 0), box(0.1, 0, 0), box(5, 0, 0)])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([1, 1, 2, 1])
    assert sorted(nms_3d_same_class(boxes, scores, classes, 0.25)) == [0, 2, 3]


def test_parse_predictions_per_class_proposals_and_filters():
    boxes = np.stack([box(0, 0, 0), box(0.05, 0, 0), box(5, 0, 0), box(9, 9, 9)])
    sem = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    objectness = np.array([0.9, 0.5, 0.04, 0.9])
    points = np.concatenate([np.full((10, 3), 0.5), np.full((10, 3), 5.5)])   # box 3 is empty
    dets = parse_predictions(boxes, sem, objectness, points, APConfig())
    # box 1 is suppressed by box 0 (same argmax class), box 2 is below conf_thresh, box 3 is empty
    assert [(c, round(s, 6)) for c, _, s in dets] == [(0, 0.63), (1, 0.27)]
    kept_all = parse_predictions(boxes, sem, objectness, points, APConfig(remove_empty_box=False))
    assert len(kept_all) == 4


def test_a_scene_whose_boxes_are_all_empty_keeps_its_most_confident_one():
    boxes = np.stack([box(0, 0, 0), box(3, 0, 0), box(6, 0, 0)])
    sem = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    objectness = np.array([0.3, 0.8, 0.6])
    points = np.full((4, 3), 100.0)   # no box holds 5 points
    dets = parse_predictions(boxes, sem, objectness, points, APConfig())
    # box 1 alone survives, and is emitted per class with p(class) x objectness
    assert [(c, round(s, 6)) for c, _, s in dets] == [(0, 0.32), (1, 0.48)]
    assert all(np.array_equal(b, boxes[1]) for _, b, _ in dets)
    # it still has to pass the objectness threshold
    assert parse_predictions(boxes, sem, np.array([0.01, 0.04, 0.02]), points, APConfig()) == []
