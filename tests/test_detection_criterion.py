"""Hungarian matching and 3DETR's set loss on hand-built boxes."""

import math

import pytest
import torch

from pcd.trainer.detection.boxes import generalized_iou_minmax
from pcd.trainer.detection.criterion import LossConfig, SetCriterion, pairwise_terms

DIMS_MIN = torch.tensor([[0.0, 0.0, 0.0]])
DIMS_MAX = torch.tensor([[10.0, 10.0, 4.0]])


def targets(centers, sizes, labels):
    k = len(centers)
    pad = lambda t, n: torch.cat([t, torch.zeros(n - len(t), *t.shape[1:], dtype=t.dtype)])[None]
    centers, sizes = torch.tensor(centers), torch.tensor(sizes)
    extent = DIMS_MAX - DIMS_MIN
    return {"gt_box_centers": pad(centers, 8), "gt_box_sizes": pad(sizes, 8),
            "gt_box_centers_normalized": pad((centers - DIMS_MIN) / extent, 8),
            "gt_box_sizes_normalized": pad(sizes / extent, 8),
            "gt_box_sem_cls_label": pad(torch.tensor(labels), 8), "gt_box_present": pad(torch.ones(k), 8)}


def outputs(centers, sizes, labels, confidence=8.0):
    centers, sizes = torch.tensor(centers)[None], torch.tensor(sizes)[None]
    logits = torch.zeros(1, len(labels), 19)
    logits[0, torch.arange(len(labels)), torch.tensor(labels)] = confidence
    prob = logits.softmax(-1)
    extent = DIMS_MAX - DIMS_MIN
    return {"sem_cls_logits": logits, "sem_cls_prob": prob[..., :-1], "objectness_prob": 1 - prob[..., -1],
            "center_normalized": (centers - DIMS_MIN) / extent, "size_normalized": sizes / extent,
            "box_minmax": torch.cat([centers - sizes / 2, centers + sizes / 2], -1)}


GT_CENTERS = [[2.0, 2.0, 0.5], [6.0, 3.0, 1.0], [8.0, 8.0, 0.4]]
GT_SIZES = [[1.0, 1.0, 1.0], [2.0, 1.0, 2.0], [0.5, 0.5, 0.8]]
GT_LABELS = [2, 4, 17]


def test_perfect_predictions_match_the_permutation_with_zero_box_losses():
    # queries 3, 0 and 4 hold GT boxes 0, 1, 2; queries 1 and 2 predict background far away
    centers = [GT_CENTERS[1], [9.0, 1.0, 3.0], [1.0, 9.0, 3.0], GT_CENTERS[0], GT_CENTERS[2]]
    sizes = [GT_SIZES[1], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3], GT_SIZES[0], GT_SIZES[2]]
    labels = [GT_LABELS[1], 18, 18, GT_LABELS[0], GT_LABELS[2]]
    criterion = SetCriterion(18, LossConfig())
    out, tgt = outputs(centers, sizes, labels), targets(GT_CENTERS, GT_SIZES, GT_LABELS)
    assign = criterion.matcher(out, tgt, pairwise_terms(out, tgt))
    assert assign["proposal_matched_mask"][0].tolist() == [1, 0, 0, 1, 1]
    assert assign["per_prop_gt_inds"][0, [3, 0, 4]].tolist() == [0, 1, 2]
    total, terms = criterion([out, out], tgt)
    assert terms["loss_center"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_size"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["loss_cls"].item() < 0.01
    assert total.item() == pytest.approx(2 * terms["loss_cls"].item(), rel=1e-4)   # summed over both layers


def test_box_losses_are_hand_computed_values_over_the_number_of_boxes():
    # one query shifted 1 m in x from GT box 0 (a 1 m cube); the other queries are exact
    centers = [[3.0, 2.0, 0.5], GT_CENTERS[1], GT_CENTERS[2]]
    out, tgt = outputs(centers, GT_SIZES, GT_LABELS), targets(GT_CENTERS, GT_SIZES, GT_LABELS)
    cfg = LossConfig()
    _, terms = SetCriterion(18, cfg)([out], tgt)
    assert terms["loss_center"].item() == pytest.approx((1.0 / 10.0) / 3)       # L1 of normalised centres / 3 boxes
    # two unit cubes shifted by their full width touch: IoU 0, hull 2 m^3, union 2 m^3 -> GIoU 0
    assert terms["loss_giou"].item() == pytest.approx(1.0 / 3)
    assert terms["loss_size"].item() == pytest.approx(0.0, abs=1e-6)


def test_generalized_iou_of_disjoint_boxes_is_negative():
    a = torch.tensor([[[0.0, 0, 0, 1, 1, 1]]])
    b = torch.tensor([[[2.0, 0, 0, 3, 1, 1]]])
    # IoU 0, union 2, hull 3 -> -(3 - 2) / 3
    assert generalized_iou_minmax(a, b).item() == pytest.approx(-1 / 3)


def test_background_weight_scales_the_classification_of_unmatched_queries():
    centers = [GT_CENTERS[0], [9.0, 1.0, 3.0]]
    out = outputs(centers, GT_SIZES[:2], [GT_LABELS[0], 5], confidence=8.0)   # query 1 wrongly says class 5
    tgt = targets(GT_CENTERS[:1], GT_SIZES[:1], GT_LABELS[:1])
    _, terms = SetCriterion(18, LossConfig(no_object_weight=0.25))([out], tgt)
    log_z = math.log(math.exp(8.0) + 18)
    matched_ce, background_ce = log_z - 8.0, log_z
    expected = (1.0 * matched_ce + 0.25 * background_ce) / 1.25    # weighted mean over the two queries
    assert terms["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
