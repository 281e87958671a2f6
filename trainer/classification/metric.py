"""Classification metrics: overall and mean-class accuracy, and voting over views (numpy).

Accuracies are fractions in [0, 1]. Mean-class accuracy averages the per-class accuracy over the classes that
occur in the labels (a class with no evaluated shape has no accuracy; on ModelNet40 and ScanObjectNN every class
occurs in the test split, so this is the usual mean over all classes).
"""

from __future__ import annotations

import numpy as np


def vote(view_logits: np.ndarray) -> np.ndarray:
    """Logits of each shape averaged over its views: (V, S, C) -> (S, C), as Point-MAE's `test_vote` (the mean of
    the raw logits, not of probabilities or of votes)."""
    view_logits = np.asarray(view_logits)
    if view_logits.ndim != 3 or view_logits.shape[0] == 0:
        raise ValueError(f"expected logits (views, shapes, classes) with at least one view, got {view_logits.shape}")
    return view_logits.mean(axis=0)


def _check(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape or labels.size == 0:
        raise ValueError(f"expected as many predictions as labels (at least one), got {predictions.shape} and "
                         f"{labels.shape}")
    return predictions, labels


def overall_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of shapes whose predicted class is their label."""
    predictions, labels = _check(predictions, labels)
    return float(np.mean(predictions == labels))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) accuracy of each class over its own shapes; NaN for a class with no shape."""
    predictions, labels = _check(predictions, labels)
    seen = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, correct / seen, np.nan)


def mean_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean of the per-class accuracies of the classes present in `labels`."""
    return float(np.nanmean(per_class_accuracy(predictions, labels, num_classes)))


def accuracy_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Overall and mean-class accuracy of logits (S, C) (use `vote` first for voting)."""
    logits = np.asarray(logits)
    predictions = logits.argmax(axis=1)
    return {"overall_accuracy": overall_accuracy(predictions, labels),
            "mean_class_accuracy": mean_class_accuracy(predictions, labels, logits.shape[1])}
