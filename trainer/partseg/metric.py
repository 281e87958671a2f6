"""Part-segmentation metrics as Point-MAE's `segmentation/main.py` test loop computes them (numpy).

Per shape: the prediction is the argmax over the parts of the shape's category only; each of those parts has
IoU = |pred & gt| / |pred | gt|, or 1 when the part is absent from both; the shape's IoU is their mean.
Instance mIoU is the mean over shapes; class mIoU is the mean over categories of each category's mean shape IoU
(over the categories that have evaluated shapes: Point-MAE's loop would give NaN for a category without any,
which cannot happen on the full test split). Point accuracy is the fraction of points predicted right.
All values are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np

from pcd.trainer.partseg.data import CATEGORY_PARTS



def restricted_prediction(logits: np.ndarray, category: int) -> np.ndarray:
    """Part ids (N,) predicted from logits (N, 50): the argmax over the parts of `category` only."""
    parts = CATEGORY_PARTS[int(category)]
    return np.asarray(logits)[:, parts[0]:parts[-1] + 1].argmax(axis=1).astype(np.int64) + parts[0]


def shape_iou(prediction: np.ndarray, seg: np.ndarray, category: int) -> float:
    """Mean IoU over the parts of `category` of one shape; a part absent from prediction and truth scores 1."""
    prediction, seg = np.asarray(prediction), np.asarray(seg)
    ious = []
    for part in CATEGORY_PARTS[int(category)]:
        predicted, true = prediction == part, seg == part
        union = np.count_nonzero(predicted | true)
        ious.append(1.0 if union == 0 else np.count_nonzero(predicted & true) / union)
    return float(np.mean(ious))


class PartSegScores:
    """Accumulates shapes one at a time; `result()` gives instance and class mIoU, point accuracy and the
    per-category mean IoU."""

    def __init__(self) -> None:
        self.shape_ious: list[float] = []
        self.shape_categories: list[int] = []
        self.correct = 0
        self.seen = 0

    def add(self, logits: np.ndarray, seg: np.ndarray, category: int) -> np.ndarray:
        """Score one shape from its logits (N, 50) and true part ids (N,); returns the restricted prediction."""
        prediction = restricted_prediction(logits, category)
        seg = np.asarray(seg)
        self.shape_ious.append(shape_iou(prediction, seg, category))
        self.shape_categories.append(int(category))
        self.correct += int(np.count_nonzero(prediction == seg))
        self.seen += int(seg.size)
        return prediction

    def result(self) -> dict[str, object]:
        if not self.shape_ious:
            raise ValueError("no shapes were scored")
        ious, categories = np.array(self.shape_ious), np.array(self.shape_categories)
        per_category = {int(c): float(ious[categories == c].mean()) for c in np.unique(categories)}
        return {"instance_miou": float(ious.mean()), "class_miou": float(np.mean(list(per_category.values()))),
                "point_accuracy": self.correct / self.seen, "category_miou": per_category}
