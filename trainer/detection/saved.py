"""A detection evaluation read back: the boxes 3DETR's post-processing keeps, per scene, from the saved proposals.

`pcd evaluate detection` saves every scene's raw final-layer proposals per pass (`box_minmax`, `sem_cls_prob`,
`objectness` in `evaluation_<checkpoint>_predictions.npz`, scenes in the results file's `data.scenes`) and the
post-processing settings (`ap_config`). `pcd show` and `pcd caption RUN#SCENE:detected=K` need the detections
themselves: this runs `parse_predictions` on the first pass's proposals with those settings. Its empty-box rule counts
the scene's points inside each box; the model saw a seeded subsample of them, so with the whole scene a box near the
threshold can be kept here that evaluation dropped (never the other way round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcd.pipeline.config import config_from_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer.detection.ap import APConfig, parse_predictions

PROPOSAL_ARRAYS = ("box_minmax", "sem_cls_prob", "objectness")


def detected_boxes(detections: list, num_classes: int) -> np.ndarray:
    """(K, 8) float32 rows (min xyz, max xyz, class, score): each detected box once, with its most probable class.

    `parse_predictions` lists every kept box once per class, in class order (3DETR's per-class proposals)."""
    rows = []
    for start in range(0, len(detections), num_classes):
        best = max(detections[start:start + num_classes], key=lambda d: d[2])
        rows.append([*np.asarray(best[1], np.float64)[:6], best[0], best[2]])
    return np.asarray(rows, np.float32).reshape(-1, 8)


@dataclass
class SavedDetection:
    """An evaluated detection run: its scenes, where their data is, and its saved proposals."""

    results: Path
    document: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def scenes(self) -> list[str]:
        return list(self.document["data"]["scenes"])

    @property
    def data_dir(self) -> Path:
        return Path(self.document["data"]["data_dir"])

    def boxes(self, scene: str, points: np.ndarray) -> np.ndarray:
        """(K, 8) detections of `scene` (first pass), most confident first; `points` are the scene's xyz."""
        index = self.scenes.index(scene)
        cfg = config_from_dict(APConfig, self.document.get("ap_config") or {})
        box, prob, objectness = (self.arrays[name][0, index] for name in PROPOSAL_ARRAYS)
        rows = detected_boxes(parse_predictions(box, prob, objectness, points, cfg), prob.shape[-1])
        return rows[np.argsort(-rows[:, 7], kind="stable")]


def read_saved_detection(run_dir: Path, checkpoint: str = "last") -> SavedDetection:
    """The results file and predictions of `pcd evaluate detection RUN_DIR` (numeric arrays, no unpickling)."""
    results = Path(run_dir) / f"evaluation_{Path(checkpoint).stem}.json"
    predictions = results.with_name(results.stem + "_predictions.npz")
    try:
        document = json.loads(results.read_text())
        with np.load(predictions, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as exc:
        raise PcdError(f"{exc.filename}: missing (run `pcd evaluate detection {run_dir}`)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise PcdError(f"{predictions}: cannot read the saved detections ({exc})") from None
    scenes = (document.get("data") or {}).get("scenes") if isinstance(document, dict) else None
    missing = [name for name in PROPOSAL_ARRAYS if name not in arrays]
    if not isinstance(scenes, list) or missing or arrays["box_minmax"].ndim != 4 \
            or arrays["box_minmax"].shape[1] != len(scenes):
        raise PcdError(f"{predictions}: not the predictions of a detection evaluation of {results.name} "
                       "(evaluate the run again)")
    return SavedDetection(results, document, arrays)
