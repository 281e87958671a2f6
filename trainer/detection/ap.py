"""The VoteNet/3DETR detection metric, so that numbers are comparable with 3DETR's tables.

Post-processing (3DETR `parse_predictions` with its evaluation settings): drop boxes with fewer than 5
points inside (`remove_empty_box`; a scene where that drops every box keeps its highest-objectness one), 3D NMS
per class on the axis-aligned boxes (IoU 0.25, scored by
objectness), then every kept box with objectness above 0.05 is emitted once per class with score
p(class) x objectness (`per_class_proposal`). Matching (`eval_det_cls`): detections sorted by score, a
detection is a true positive when its best-IoU ground truth has IoU strictly above the threshold and is not
yet taken; duplicates are false positives. AP is the VOC all-point interpolated area; mAP and mAR are the
means over the classes 3DETR averages over: every class with ground truth or a detection (a class without
ground truth or without detections scores 0), the AP mean taken in float32 as 3DETR's. Ties in score are
broken by a stable order (3DETR's NumPy quicksort leaves them unspecified); docs/detection.md lists every rule
and the upstream line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pcd.trainer.detection.boxes import CLASS_NAMES, aabb_iou

Detection = tuple[int, np.ndarray, float]   # class index, (6,) min/max box, score
GroundTruth = tuple[int, np.ndarray]        # class index, (6,) min/max box


@dataclass
class APConfig:
    """3DETR's `get_ap_config_dict` at evaluation (exact_eval=True)."""

    remove_empty_box: bool = True
    empty_box_min_points: int = 5
    nms_iou: float = 0.25
    conf_thresh: float = 0.05


def nms_3d_same_class(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_thresh: float) -> list[int]:
    """Greedy 3D NMS that only suppresses boxes of the same class (VoteNet `nms_3d_faster_samecls`)."""
    order = list(np.argsort(scores, kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop()
        keep.append(int(i))
        if not order:
            break
        rest = np.array(order)
        overlap = aabb_iou(boxes[i][None], boxes[rest]) * (classes[rest] == classes[i])
        order = [int(j) for j, o in zip(rest, overlap) if o <= iou_thresh]
    return keep


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Number of points inside each (K,6) min/max box (boundary included)."""
    inside = (points[None, :, :] >= boxes[:, None, :3]) & (points[None, :, :] <= boxes[:, None, 3:])
    return inside.all(-1).sum(1)


def parse_predictions(boxes: np.ndarray, sem_cls_prob: np.ndarray, objectness: np.ndarray,
                      points: np.ndarray | None, cfg: APConfig) -> list[Detection]:
    """One scene's raw proposals -> scored detections (3DETR `parse_predictions`, per-class proposals).

    boxes (Q,6) min/max, sem_cls_prob (Q,C) class probabilities without background, objectness (Q,),
    points (N,3) the scene points the model saw (for `remove_empty_box`).
    """
    candidates = np.arange(len(boxes))
    if cfg.remove_empty_box and points is not None:
        candidates = candidates[points_in_boxes(points, boxes) >= cfg.empty_box_min_points]
        if len(candidates) == 0 and len(boxes):  # as 3DETR: an all-empty scene keeps its most confident box
            candidates = np.array([int(np.argmax(objectness))])
    pred_cls = sem_cls_prob.argmax(-1)
    kept = candidates[nms_3d_same_class(boxes[candidates], objectness[candidates], pred_cls[candidates],
                                        cfg.nms_iou)] if len(candidates) else candidates
    detections: list[Detection] = []
    for j in sorted(int(k) for k in kept):
        if objectness[j] > cfg.conf_thresh:
            for c in range(sem_cls_prob.shape[1]):
                detections.append((c, boxes[j], float(sem_cls_prob[j, c] * objectness[j])))
    return detections


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolated average precision (area under the monotone precision envelope)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    changes = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def eval_det_cls(pred: dict[int, list[tuple[np.ndarray, float]]], gt: dict[int, list[np.ndarray]],
                 iou_thresh: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Recall curve, precision curve and AP of one class (VoteNet `eval_det_cls`, all-point AP)."""
    gt_boxes = {scene: np.array(boxes).reshape(-1, 6) for scene, boxes in gt.items()}
    taken = {scene: np.zeros(len(boxes), bool) for scene, boxes in gt_boxes.items()}
    npos = sum(len(b) for b in gt_boxes.values())
    flat = [(scene, box, score) for scene, dets in pred.items() for box, score in dets]
    flat.sort(key=lambda d: -d[2])
    tp = np.zeros(len(flat))
    fp = np.zeros(len(flat))
    for d, (scene, box, _) in enumerate(flat):
        candidates = gt_boxes.get(scene, np.zeros((0, 6)))
        if len(candidates) == 0:
            fp[d] = 1
            continue
        ious = aabb_iou(box[None], candidates)
        best = int(np.argmax(ious))
        if ious[best] > iou_thresh and not taken[scene][best]:
            tp[d] = 1
            taken[scene][best] = True
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(npos, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, voc_ap(recall, precision)


class APCalculator:
    """Accumulates detections and ground truth over scenes, then computes AP/AR per class at each IoU."""

    def __init__(self, iou_thresholds: Sequence[float] = (0.25, 0.5), class_names: Sequence[str] = CLASS_NAMES):
        self.iou_thresholds = tuple(iou_thresholds)
        self.class_names = tuple(class_names)
        self.predictions: list[list[Detection]] = []
        self.ground_truth: list[list[GroundTruth]] = []

    def add_scene(self, detections: list[Detection], ground_truth: list[GroundTruth]) -> None:
        self.predictions.append(detections)
        self.ground_truth.append(ground_truth)

    def compute(self) -> dict:
        """{"mAP_0.25": .., "mAR_0.25": .., ..., "per_class": {name: {"AP_0.25": .., "AR_0.25": ..}}}."""
        gt_by_class: dict[int, dict[int, list[np.ndarray]]] = {}
        pred_by_class: dict[int, dict[int, list[tuple[np.ndarray, float]]]] = {}
        for scene, gts in enumerate(self.ground_truth):
            for cls, box in gts:
                gt_by_class.setdefault(cls, {}).setdefault(scene, []).append(box)
        for scene, dets in enumerate(self.predictions):
            for cls, box, score in dets:
                pred_by_class.setdefault(cls, {}).setdefault(scene, []).append((box, score))
        result: dict = {"per_class": {}, "num_scenes": len(self.ground_truth)}
        for thresh in self.iou_thresholds:
            aps, ars = [], []
            for cls in sorted(set(gt_by_class) | set(pred_by_class)):
                if cls in pred_by_class:
                    recall, _, ap = eval_det_cls(pred_by_class[cls], gt_by_class.get(cls, {}), thresh)
                    ar = float(recall[-1]) if len(recall) else 0.0
                else:
                    ap, ar = 0.0, 0.0
                aps.append(ap)
                ars.append(ar)
                entry = result["per_class"].setdefault(self.class_names[cls], {})
                entry[f"AP_{thresh}"] = ap
                entry[f"AR_{thresh}"] = ar
            # 3DETR takes the mean of its per-class APs as a float32 array; the same here, to the last bit
            result[f"mAP_{thresh}"] = float(np.array(aps, dtype=np.float32).mean()) if aps else 0.0
            result[f"mAR_{thresh}"] = float(np.mean(ars)) if ars else 0.0
        return result
