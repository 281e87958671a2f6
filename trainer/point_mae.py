"""Point-MAE's fine-tuned checkpoint layouts, both ways: explicit, strict converters (timm's habit).

Point-MAE writes two layouts for fine-tuned models:
- classification (tools/builder.py `save_checkpoint`): ``{'base_model': state, 'optimizer', 'epoch', 'metrics',
  'best_metrics'}``; `builder.load_model` also accepts ``'model'`` in place of ``'base_model'``. Runs wrapped in
  `nn.DataParallel` store every key with a ``module.`` prefix.
- part segmentation (segmentation/main.py): ``{'epoch', 'train_acc', 'test_acc', 'class_avg_iou',
  'inctance_avg_iou', 'model_state_dict', 'optimizer_state_dict'}``, the metrics numpy scalars.

Both hold the model's state dict under Point-MAE's names, which are pcd's names for `PointMAEClassifier` and
`PointMAEPartSegmenter`, so converting is taking the state out (or putting it in) and loading it strictly:
every key present with its shape, nothing extra, else a one-line PcdError naming the file and the keys.
Files are read with `pcd.trainer.weights.read_checkpoint` (weights_only, numpy scalars allowed) and
written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.errors import PcdError
from pcd.trainer.weights import read_checkpoint

CLASSIFICATION_LAYOUT = "classification"  # {'base_model': ...}
PARTSEG_LAYOUT = "partseg"  # {'model_state_dict': ...}
# Where each layout keeps the state dict, in the order they are looked for.
_STATE_KEYS = {"base_model": CLASSIFICATION_LAYOUT, "model": CLASSIFICATION_LAYOUT,
               "model_state_dict": PARTSEG_LAYOUT}
_SHOWN_KEYS = 3  # key names an error message lists before "and N more"


def state_from_point_mae(checkpoint: Mapping[str, Any], source: Path) -> tuple[str, dict[str, Tensor]]:
    """(layout, model state dict) of a Point-MAE fine-tuned checkpoint, with DataParallel's `module.` removed.

    The state is under 'base_model' or 'model' (classification) or 'model_state_dict' (part segmentation).
    """
    if not isinstance(checkpoint, Mapping):
        raise PcdError(f"{source}: not a Point-MAE checkpoint (a {type(checkpoint).__name__}, not a dict)")
    for key, layout in _STATE_KEYS.items():
        state = checkpoint.get(key)
        if state is None:
            continue
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise PcdError(f"{source}: '{key}' is not a state dict (name -> tensor)")
        return layout, {name.replace("module.", ""): value for name, value in state.items()}
    raise PcdError(f"{source}: not a Point-MAE fine-tuned checkpoint (no 'base_model', 'model' or "
                   f"'model_state_dict'; found {_names(list(checkpoint))})")


def load_point_mae_state(model: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Load `state` into `model` strictly, or raise one PcdError line naming the missing, unexpected or
    mis-shaped keys (a Point-MAE *pre-training* checkpoint here means `--init` was meant)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({_names(missing)})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys ({_names(unexpected)})")
        hint = ("; this looks like a pre-trained backbone: load it as initialisation instead"
                if any(key.startswith("MAE_encoder.") for key in unexpected) else "")
        raise PcdError(f"{source}: does not fit {type(model).__name__}: " + ", ".join(problems) + hint)
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise PcdError(f"{source}: key '{key}' has shape {tuple(state[key].shape)}, "
                           f"{type(model).__name__} needs {tuple(target.shape)}")
    model.load_state_dict(state, strict=True)


def load_point_mae_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any], source: Path) -> str:
    """Load a Point-MAE fine-tuned checkpoint (either layout) into `model` strictly; returns the layout."""
    layout, state = state_from_point_mae(checkpoint, source)
    load_point_mae_state(model, state, source)
    return layout


def read_point_mae_checkpoint(model: nn.Module, path: Path) -> str:
    """Load the Point-MAE fine-tuned checkpoint file `path` (either layout) into `model` strictly; the layout."""
    return load_point_mae_checkpoint(model, read_checkpoint(Path(path)), Path(path))


def write_point_mae_checkpoint(path: Path, layout: str, state: Mapping[str, Tensor], epoch: int = -1,
                               metrics: Mapping[str, float] | None = None,
                               optimizer: Mapping[str, Any] | None = None) -> None:
    """Write `to_point_mae(...)` to `path` under a temporary name, then rename it into place."""
    buffer = io.BytesIO()
    torch.save(to_point_mae(layout, state, epoch, metrics, optimizer), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def to_point_mae(layout: str, state: Mapping[str, Tensor], epoch: int = -1,
                 metrics: Mapping[str, float] | None = None,
                 optimizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A pcd fine-tuned model's state dict in Point-MAE's checkpoint layout, as plain CPU tensors and floats.

    classification: {'base_model', 'epoch', 'metrics', 'best_metrics'} (+ 'optimizer' if given), which Point-MAE's
    `--test` (builder.load_model, strict) and `--ckpts` read; the metrics are the chosen checkpoint's, so they are
    also its best. partseg: {'model_state_dict', 'epoch', <metrics>} (+ 'optimizer_state_dict' if given), as
    segmentation/main.py writes it. Point-MAE's optimizer groups differ from pcd's, so resuming Point-MAE's own
    training from pcd's optimizer state is not a goal; it is carried only when asked.
    """
    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in state.items()}
    values = {str(key): float(value) for key, value in (metrics or {}).items()}
    if layout == CLASSIFICATION_LAYOUT:
        out: dict[str, Any] = {"base_model": tensors, "epoch": int(epoch), "metrics": values,
                               "best_metrics": dict(values)}
        if optimizer is not None:
            out["optimizer"] = optimizer
        return out
    if layout == PARTSEG_LAYOUT:
        reserved = {"model_state_dict", "optimizer_state_dict", "epoch"} & set(values)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} clash with the part-segmentation layout's keys")
        out = {**values, "epoch": int(epoch), "model_state_dict": tensors}
        if optimizer is not None:
            out["optimizer_state_dict"] = optimizer
        return out
    raise ValueError(f"unknown Point-MAE layout '{layout}' (expected '{CLASSIFICATION_LAYOUT}' or '{PARTSEG_LAYOUT}')")


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")
