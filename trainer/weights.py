"""Backbone weights in and out: the pcd export (safetensors + json) and Point-MAE's checkpoint format.

Export folder (written by `write_export`, read by `load_backbone_weights` / `read_export_metadata`):
- ``backbone.safetensors``: the backbone state dict with Point-MAE's key names, no prefix.
- ``backbone.json``: backbone config, input normalisation, pre-training scenes, teacher, source run, and the
  sha256 of both weight files.
- ``point_mae.pth``: ``{'base_model': {'MAE_encoder.<key>': tensor}, 'normalization': ..., 'normalization_version':
  ..., 'up_axis': 'z'}``, which Point-MAE's fine-tuning code loads with only cls_token, cls_pos and its head
  missing; the plain-string fields say which input frame the weights expect (Point-MAE reads only base_model).

Loading is strict for the backbone (every key present with its shape) and reports every key it skipped,
because Point-MAE itself loads with strict=False and only prints mismatches that are easy to miss.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from pcd.pipeline.atomic import atomic_write_bytes, atomic_write_json
from pcd.pipeline.errors import PcdError, torch_load_reason
from pcd.pipeline.schema import sha256_file
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.normalize import NORMALIZATION

EXPORT_FORMAT = "pcd-backbone"
EXPORT_VERSION = 1
WEIGHTS_FILE = "backbone.safetensors"
METADATA_FILE = "backbone.json"
POINT_MAE_FILE = "point_mae.pth"
POINT_MAE_ENCODER_PREFIX = "MAE_encoder."
# Prefixes a backbone key may carry in checkpoints we accept: Point-MAE pre-training, Point-MAE fine-tuning
# (`base_model.`), and pcd's own training checkpoints (`backbone.`). `module.` (DDP) is dropped anywhere.
_STRIPPED_PREFIXES = (POINT_MAE_ENCODER_PREFIX, "base_model.", "backbone.")


@dataclass
class LoadReport:
    """What `load_backbone_weights` did: the backbone keys it took and the source keys it skipped."""

    source: Path
    kind: str  # "pcd-export", "safetensors", "checkpoint"
    loaded: list[str]  # backbone key names (Point-MAE names, no prefix)
    ignored: list[str]  # source key names as stored in the file
    metadata: dict[str, Any] | None  # backbone.json of a pcd export, else None

    def summary(self) -> str:
        """One line for the log: how many tensors were taken from where, and what was skipped."""
        line = f"loaded {len(self.loaded)} backbone tensors from {self.source} ({self.kind})"
        if not self.ignored:
            return line + "; ignored nothing"
        groups = Counter(key.replace("module.", "").split(".")[0] for key in self.ignored)
        parts = [name if count == 1 else f"{name}.* ({count})" for name, count in sorted(groups.items())]
        return line + f"; ignored {len(self.ignored)}: " + ", ".join(parts)


def backbone_state_from_model(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's entries of a DistillModel state dict (keys `backbone.*`, maybe under DDP's `module.`)."""
    prefix = "backbone."
    out = {}
    for key, value in state.items():
        key = key.replace("module.", "")
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
    return out


# The frame pcd feeds the backbone: gravity-aligned with z up (ScanNet's frame); ModelNet and ShapeNet files are y-up.
UP_AXIS = "z"


def to_point_mae(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """A backbone state dict in Point-MAE's checkpoint layout (plain CPU tensors, loadable with weights_only),
    with the input normalisation and up axis as plain strings beside `base_model`."""
    return {"base_model": {POINT_MAE_ENCODER_PREFIX + key: value.detach().cpu().clone().contiguous()
                           for key, value in state.items()},
            "normalization": str(NORMALIZATION["name"]), "normalization_version": str(NORMALIZATION["version"]),
            "up_axis": UP_AXIS}


def write_export(out_dir: Path, state: Mapping[str, Tensor], cfg: BackboneConfig,
                 metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Write backbone.safetensors, point_mae.pth and backbone.json into `out_dir`; returns the json written.

    Each file is written to a temporary name and renamed; the json goes last and carries the hashes, so a
    folder whose json matches its weights is a complete export.
    """
    out_dir = Path(out_dir)
    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in state.items()}
    weights_bytes = save_safetensors_bytes(tensors, metadata={"format": EXPORT_FORMAT,
                                                              "normalization": NORMALIZATION["name"]})
    atomic_write_bytes(out_dir / WEIGHTS_FILE, weights_bytes)
    buffer = io.BytesIO()
    torch.save(to_point_mae(tensors), buffer)
    atomic_write_bytes(out_dir / POINT_MAE_FILE, buffer.getvalue())
    document = {
        **metadata,
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "backbone": asdict(cfg),
        "normalization": dict(NORMALIZATION),
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights_bytes).hexdigest()},
        "point_mae": {"file": POINT_MAE_FILE, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
    }
    atomic_write_json(out_dir / METADATA_FILE, document)
    return document


def read_export_metadata(path: Path) -> dict[str, Any] | None:
    """backbone.json of the pcd export that `path` is (or belongs to), or None for a foreign checkpoint.

    `path` may be the export folder, its backbone.json, or one of its weight files. Fine-tunes use this to
    check the normalisation name and the overlap with the pre-training scenes.
    """
    path = Path(path)
    if path.is_dir():
        json_path = path / METADATA_FILE
        if not json_path.is_file():
            raise PcdError(f"{path}: not a pcd export folder (no {METADATA_FILE})")
    elif path.suffix == ".json":
        json_path = path
    else:
        json_path = path.with_name(METADATA_FILE)
        if not json_path.is_file():
            return None
    try:
        document = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PcdError(f"{json_path}: cannot read export metadata ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise PcdError(f"{json_path}: not a pcd backbone export (format is not '{EXPORT_FORMAT}')")
    if not isinstance(document.get("weights"), dict) or "file" not in document["weights"]:
        raise PcdError(f"{json_path}: export metadata names no weight file ('weights.file')")
    if path.is_file() and path.suffix != ".json":
        entries = [e for e in (document["weights"], document.get("point_mae")) if isinstance(e, dict)]
        entry = next((e for e in entries if e.get("file") == path.name), None)
        if entry is None:
            return None
        if sha256_file(path) != entry.get("sha256"):
            raise PcdError(f"{path}: sha256 does not match {METADATA_FILE} (file changed or truncated)")
    return document


def read_weights(path: Path) -> tuple[str, dict[str, Tensor], dict[str, Any] | None]:
    """(kind, state dict as stored, export metadata or None) of anything `load_backbone_weights` accepts, for
    readers of the other entries of a checkpoint (the reconstruction decoder)."""
    return _read_source(Path(path))


def _read_source(path: Path) -> tuple[str, dict[str, Tensor], dict[str, Any] | None]:
    """(kind, state dict as stored, export metadata) for any file or folder `load_backbone_weights` accepts."""
    if not path.exists():
        raise PcdError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix == ".json":
        metadata = read_export_metadata(path)
        path = path if path.is_dir() else path.parent
        return "pcd-export", _read_safetensors(path / metadata["weights"]["file"], metadata), metadata
    if path.suffix == ".safetensors":
        metadata = read_export_metadata(path)
        kind = "pcd-export" if metadata else "safetensors"
        return kind, _read_safetensors(path, metadata), metadata
    return "checkpoint", _read_torch_checkpoint(path), read_export_metadata(path)


def _read_safetensors(path: Path, metadata: Mapping[str, Any] | None) -> dict[str, Tensor]:
    if not path.is_file():
        raise PcdError(f"{path}: weight file missing from the export")
    data = path.read_bytes()
    if metadata is not None and hashlib.sha256(data).hexdigest() != metadata["weights"].get("sha256"):
        raise PcdError(f"{path}: sha256 does not match {METADATA_FILE} (file changed or truncated)")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as exc:
        raise PcdError(f"{path}: not a readable safetensors file ({exc})") from None


def _numpy_safe_globals() -> list[Any]:
    """numpy's scalar reconstructor (under its numpy 1.x and numpy 2 module names) and dtype classes.

    Point-MAE saves numpy scalars in its checkpoints' 'metrics'; a pickled numpy scalar is a call of
    `multiarray.scalar(dtype, bytes)`, which builds a scalar from raw bytes and nothing else.
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    scalar = core.multiarray.scalar
    dtype_classes = [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtype_classes]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The whole dict of a torch checkpoint (pcd's, Point-MAE's, ...), loaded with `weights_only=True`.

    Only numpy's scalar and dtype types are allowed beyond torch's defaults, because Point-MAE's own
    checkpoints carry numpy scalars. Anything else is refused with one line naming the file and torch's
    `Unsupported global: ...` reason (never its advice to load with weights_only=False).
    """
    path = Path(path)
    if not path.is_file():
        raise PcdError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or damaged files; the user needs one line
        raise PcdError(f"{path}: cannot load as a weights-only torch checkpoint ({torch_load_reason(exc)})") from None
    if not isinstance(checkpoint, dict):
        raise PcdError(f"{path}: not a checkpoint dict (holds a {type(checkpoint).__name__})")
    return checkpoint


def _read_torch_checkpoint(path: Path) -> dict[str, Tensor]:
    """The state dict inside a Point-MAE (`base_model` or `model`) or pcd checkpoint, or a bare state dict."""
    checkpoint = read_checkpoint(path)
    for key in ("base_model", "model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise PcdError(f"{path}: no state dict found (expected 'base_model', 'model' or a dict of tensors)")
    return checkpoint


def _backbone_name(key: str) -> str:
    key = key.replace("module.", "")
    for prefix in _STRIPPED_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def load_backbone_state(backbone: PointBackbone, state: Mapping[str, Tensor], source: Path
                        ) -> tuple[list[str], list[str]]:
    """Strictly load the backbone's keys out of `state` (any of the accepted prefixes); (loaded, ignored).

    Every backbone key must be present with its exact shape, else PcdError naming the key and `source`.
    Everything else in `state` is skipped and returned as ignored, under its stored name.
    """
    expected = backbone.state_dict()
    found: dict[str, tuple[str, Tensor]] = {}
    ignored = []
    for stored, value in state.items():
        name = _backbone_name(stored)
        if name not in expected:
            ignored.append(stored)
            continue
        if name in found:
            raise PcdError(f"{source}: backbone key '{name}' appears twice ('{found[name][0]}' and '{stored}')")
        found[name] = (stored, value)
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PcdError(f"{source}: backbone key '{missing[0]}' is missing{more}")
    for name, target in expected.items():
        stored, value = found[name]
        if tuple(value.shape) != tuple(target.shape):
            raise PcdError(f"{source}: backbone key '{stored}' has shape {tuple(value.shape)}, the backbone "
                           f"needs {tuple(target.shape)}")
    backbone.load_state_dict({name: found[name][1] for name in expected}, strict=True)
    return list(expected), ignored


def load_backbone_weights(backbone: PointBackbone, path: Path) -> LoadReport:
    """Initialise `backbone` from a pcd export (folder or .safetensors) or a Point-MAE / pcd checkpoint."""
    path = Path(path)
    kind, state, metadata = _read_source(path)
    if metadata is not None and metadata.get("normalization") != NORMALIZATION:
        # Every pcd consumer feeds the backbone through pcd.trainer.normalize; other inputs would silently
        # mis-transfer, so weights trained on another normalisation are refused, not loaded.
        raise PcdError(f"{path}: pre-trained with input normalisation {metadata.get('normalization')}, but this "
                       f"version of pcd applies {NORMALIZATION}")
    loaded, ignored = load_backbone_state(backbone, state, path)
    return LoadReport(source=path, kind=kind, loaded=loaded, ignored=ignored, metadata=metadata)
