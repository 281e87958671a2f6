"""Semantic-segmentation metrics: the ScanNet benchmark's, and ACT's sampled-block mIoU (numpy).

`BenchmarkScores` follows ScanNet's `evaluate_semantic_label.py` on nyu40 ids: a vertex whose ground truth is not
one of the 20 `VALID_CLASS_IDS` is skipped (unannotated, or a class the benchmark does not score); a prediction
that is not one of them is kept as a wrong answer (it counts as a false negative of the true class and as a false
positive of no class). Per class, IoU = TP / (TP + FP + FN), with FP counted over vertices whose ground truth is
another valid class. A class with TP + FP + FN = 0 (absent from ground truth and never predicted) has no IoU
(NaN, as upstream); mIoU is the mean over the classes that have one, and the result says how many that is.

`BlockScores` is ACT's `semantic_segmentation/main.py` evaluation (from PointNet++'s S3DIS loop) on the points of
sampled blocks: per class, correct and union counts summed over every block, mIoU = mean over ALL classes of
correct / (union + 1e-6), so a class absent from both scores 0. ScanNet adds ignored points, which ACT's S3DIS
has none of: they are left out of every count.
"""

from __future__ import annotations

import numpy as np

from pcd.trainer.semseg.classes import CLASS_NAMES, IGNORE_INDEX, MAX_NYU40_ID, NUM_CLASSES, VALID_CLASS_IDS

OTHER = MAX_NYU40_ID + 1  # confusion column of every predicted id outside 0..40


class BenchmarkScores:
    """Accumulates scenes into a (41, 42) confusion matrix of nyu40 ids (rows: truth, columns: prediction)."""

    def __init__(self) -> None:
        self.confusion = np.zeros((MAX_NYU40_ID + 1, OTHER + 1), dtype=np.int64)

    def add(self, truth_nyu40: np.ndarray, predicted_nyu40: np.ndarray) -> None:
        truth, predicted = np.asarray(truth_nyu40).astype(np.int64), np.asarray(predicted_nyu40).astype(np.int64)
        if truth.shape != predicted.shape:
            raise ValueError(f"{predicted.size} predictions for {truth.size} vertices")
        scored = np.isin(truth, VALID_CLASS_IDS)
        truth, predicted = truth[scored], predicted[scored]
        predicted = np.where((predicted >= 0) & (predicted <= MAX_NYU40_ID), predicted, OTHER)
        np.add.at(self.confusion, (truth, predicted), 1)

    def class_iou(self) -> dict[str, float]:
        """IoU per benchmark class name (NaN where the class has neither truth nor prediction)."""
        valid = list(VALID_CLASS_IDS)
        out = {}
        for name, label in zip(CLASS_NAMES, valid):
            tp = int(self.confusion[label, label])
            fn = int(self.confusion[label].sum()) - tp
            fp = int(self.confusion[[v for v in valid if v != label], label].sum())
            denominator = tp + fp + fn
            out[name] = tp / denominator if denominator else float("nan")
        return out

    def result(self) -> dict[str, object]:
        ious = self.class_iou()
        values = np.array(list(ious.values()), dtype=np.float64)
        scored = int(self.confusion.sum())
        if scored == 0:
            raise ValueError("no vertex with a benchmark class was scored")
        correct = int(sum(self.confusion[v, v] for v in VALID_CLASS_IDS))
        return {"miou": float(np.nanmean(values)), "classes_with_iou": int(np.count_nonzero(~np.isnan(values))),
                "accuracy": correct / scored, "scored_vertices": scored, "class_iou": ious}


class BlockScores:
    """ACT's sampled-block mIoU on class indices (0..19, `IGNORE_INDEX` skipped); see the module docstring."""

    def __init__(self) -> None:
        self.correct = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.union = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.seen = 0
        self.right = 0

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        truth, predicted = np.asarray(truth).reshape(-1), np.asarray(predicted).reshape(-1)
        kept = truth != IGNORE_INDEX
        truth, predicted = truth[kept], predicted[kept]
        for label in range(NUM_CLASSES):
            self.correct[label] += np.count_nonzero((predicted == label) & (truth == label))
            self.union[label] += np.count_nonzero((predicted == label) | (truth == label))
        self.seen += truth.size
        self.right += int(np.count_nonzero(predicted == truth))

    def result(self) -> dict[str, float]:
        return {"block_miou": float(np.mean(self.correct / (self.union.astype(np.float64) + 1e-6))),
                "block_accuracy": self.right / max(self.seen, 1)}
