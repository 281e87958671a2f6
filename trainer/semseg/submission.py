"""ScanNet benchmark submission files: `<scene>.txt` with one nyu40 id per mesh vertex, one per line, in the
vertex order of `<scene>_vh_clean_2.ply` (what `evaluate_semantic_label.py` and the benchmark server read).
Written atomically; read back with the evaluator's checks (integers only, one per vertex)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.errors import PcdError


def write_prediction_file(out_dir: Path, scene: str, nyu40: np.ndarray) -> Path:
    """Write `OUT_DIR/<scene>.txt` (one nyu40 id per line) under a temporary name, then rename."""
    values = np.asarray(nyu40)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise ValueError(f"scene {scene}: predictions must be a 1-d integer array, got {values.dtype} {values.shape}")
    path = Path(out_dir) / f"{scene}.txt"
    atomic_write_bytes(path, ("\n".join(map(str, values.tolist())) + "\n").encode() if values.size else b"")
    return path


def read_prediction_file(path: Path, num_vertices: int | None = None) -> np.ndarray:
    """The ids of one prediction file as int64; a one-line PcdError for text that is not one integer per line or
    (given `num_vertices`) a count that differs from the mesh's."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PcdError(f"{path}: cannot read the prediction file ({exc})") from None
    try:
        ids = np.array([int(line) for line in lines], dtype=np.int64)
    except ValueError:
        bad = next(i for i, line in enumerate(lines) if not line.strip().lstrip("-").isdigit())
        raise PcdError(f"{path}: line {bad + 1} is not an integer label") from None
    if num_vertices is not None and len(ids) != num_vertices:
        raise PcdError(f"{path}: {len(ids)} predicted values for a mesh of {num_vertices} vertices")
    return ids
