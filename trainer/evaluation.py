"""What every `pcd evaluate TASK` shares, written once: the checkpoint, the run's config, float32 passes, the results.

Evaluation never imports training code: it reads the run's `config.json` into the task's config dataclass (a
plain dataclass module), builds the model from it, and loads the checkpoint strictly.

Honest by default:
- the checkpoint is chosen without looking at the test set: `last` (the last epoch) or `best` (best on a validation
  split held out of the training data, if the run kept one), or a file the user names;
- evaluation is random where the protocol samples (points, voting views), so it runs seeded passes and reports
  each metric as mean ± std with every pass's value;
- the model runs in float32, whatever precision it was trained in.

Results file: `RUN_DIR/evaluation_<checkpoint stem>.json` (written atomically) with at least
`task`, `checkpoint` (path), `checkpoint_kind`, `epoch`, `data` (what was evaluated), `protocol`, `seeds`,
`precision` ("fp32") and `metrics` = {name: {"mean", "std", "passes": [one value per seed]}}.
Per-sample predictions: `RUN_DIR/evaluation_<checkpoint stem>_predictions.npz`, numeric arrays only (no pickles;
`np.load(path)` reads it, `allow_pickle` stays False); each task documents its arrays (docs/evaluation.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pcd.pipeline.atomic import atomic_write_bytes, atomic_write_json
from pcd.pipeline.config import config_from_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer.point_mae import load_point_mae_checkpoint
from pcd.trainer.weights import read_checkpoint

T = TypeVar("T")


def resolve_checkpoint(run_dir: Path, name: str, best_kind: str) -> tuple[Path, str]:
    """(path, description) of 'last', 'best' or an explicit checkpoint file; `best_kind` says what best means."""
    if name in ("last", "best"):
        path = Path(run_dir) / "checkpoints" / f"{name}.pt"
        if not path.is_file():
            hint = " (a run without a validation split keeps no best.pt)" if name == "best" else ""
            raise PcdError(f"{path}: no such checkpoint{hint}")
        return path, "last epoch" if name == "last" else best_kind
    path = Path(name)
    if not path.is_file():
        raise PcdError(f"{path}: no such checkpoint file")
    return path, "given file"


def load_run_config(run_dir: Path, config_cls: type[T], command: str) -> T:
    """The config a `pcd COMMAND` run was trained with (RUN_DIR/config.json), as `config_cls`."""
    path = Path(run_dir) / "config.json"
    try:
        return config_from_dict(config_cls, json.loads(path.read_text()))
    except FileNotFoundError:
        raise PcdError(f"{path}: missing (is {run_dir} a `pcd {command}` run folder?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PcdError(f"{path}: cannot read the run's config ({exc})") from None
    except PcdError as exc:  # e.g. the folder of another command's run
        raise PcdError(f"{path}: not the config of a `pcd {command}` run ({exc})") from None


def load_model_weights(model: torch.nn.Module, path: Path, what: str) -> dict[str, Any]:
    """Strictly load the model state of a checkpoint into `model`; returns the whole checkpoint.

    One loader for every layout: pcd's training checkpoints (`model`), Point-MAE's fine-tuned classification
    (`base_model`) and part-segmentation (`model_state_dict`) checkpoints, read with weights_only
    (`pcd.trainer.weights.read_checkpoint`); every key present with its shape, nothing extra, else one line
    naming the file and the `what` it does not fit."""
    checkpoint = read_checkpoint(Path(path))
    try:
        load_point_mae_checkpoint(model, checkpoint, Path(path))
    except PcdError as exc:
        raise PcdError(f"{exc} (the run's {what} config)") from None
    return checkpoint


def evaluation_device(name: Optional[str]) -> torch.device:
    """The named device, or CUDA when available."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PcdError(f"device '{name}' asked for, but this torch sees no CUDA device")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_fp32(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in evaluation mode, float32, on `device`: evaluation numbers do not depend on training precision."""
    return model.float().to(device).eval()


def seeded_passes(seed: int, passes: int, one_pass: Callable[[int], dict[str, float]]) -> tuple[list[int], list[dict]]:
    """Run `one_pass(seed_i)` for seeds seed, seed+1, ...; each pass seeds torch and numpy's global RNGs first."""
    if passes < 1:
        raise PcdError(f"passes must be at least 1, not {passes}")
    seeds = [seed + i for i in range(passes)]
    results = []
    for s in seeds:
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        results.append(one_pass(s))
    return seeds, results


def summarise(passes: list[dict[str, float]], keys: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    """{metric: {"mean", "std" (population, over passes), "passes": [values]}} for every scalar metric."""
    keys = keys if keys is not None else [k for k, v in passes[0].items() if isinstance(v, (int, float))]
    out = {}
    for key in keys:
        values = [float(p[key]) for p in passes]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "passes": values}
    return out


def results_path(run_dir: Path, checkpoint: Path) -> Path:
    return Path(run_dir) / f"evaluation_{Path(checkpoint).stem}.json"


def predictions_path(run_dir: Path, checkpoint: Path) -> Path:
    return Path(run_dir) / f"evaluation_{Path(checkpoint).stem}_predictions.npz"


def write_results(run_dir: Path, checkpoint: Path, document: dict[str, Any]) -> Path:
    """Write the evaluation's JSON atomically; `document` must carry the documented keys."""
    required = ("task", "checkpoint", "checkpoint_kind", "data", "protocol", "seeds", "metrics")
    missing = [k for k in required if k not in document]
    if missing:
        raise ValueError(f"evaluation results lack {', '.join(missing)}")
    path = results_path(run_dir, checkpoint)
    atomic_write_json(path, {"precision": "fp32", **document})
    return path


def write_predictions(run_dir: Path, checkpoint: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write per-sample predictions as an uncompressed .npz of numeric arrays, atomically."""
    for name, array in arrays.items():
        if np.asarray(array).dtype.kind not in "biuf":
            raise ValueError(f"prediction array '{name}' is not numeric ({np.asarray(array).dtype})")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    path = predictions_path(run_dir, checkpoint)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def print_metrics(console: Console, title: str, metrics: dict[str, dict[str, Any]], percent: bool = True) -> None:
    """One table row per metric: mean ± std over the passes."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    scale = 100.0 if percent else 1.0
    for name, value in metrics.items():
        table.add_row(name, f"{scale * value['mean']:.2f} ± {scale * value['std']:.2f}")
    console.print(table)
