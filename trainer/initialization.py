"""`--init` for every fine-tune, written once: check it, adopt its architecture and frame, load it strictly, record it.

`--init` is a `pcd export` (folder, backbone.json or backbone.safetensors), a Point-MAE checkpoint (pre-training
`MAE_encoder.*` or fine-tuning `base_model.*` layout), or nothing (from scratch). `plan_init` runs before anything
is written to the run folder, so a file that does not fit is a one-line error that leaves no trace; `load_init`
loads every backbone tensor (strict: all present, all shapes equal) and prints what it took and skipped;
`write_init_record` keeps `RUN_DIR/init.json` (what was loaded, its frame, the scenes/shapes it was pre-trained on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from safetensors import safe_open
from pcd.pipeline.atomic import atomic_write_json
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.frames import FRAMES, Frame, frame_of_weights
from pcd.trainer.models import InitReport, load_pretrained_backbone
from pcd.trainer.weights import load_backbone_weights, read_checkpoint, read_export_metadata

console = Console(stderr=True)
INIT_FILE = "init.json"
# Sizes that decide the shapes of the weights; the number and size of patches do not, so each task keeps its own.
ARCHITECTURE_FIELDS = ("trans_dim", "encoder_dims", "depth", "num_heads", "mlp_ratio")


@dataclass
class InitPlan:
    """What `--init` is, decided before the run starts."""

    path: Optional[Path]
    kind: str  # "pcd-export", "pcd-file" (an export's weight file alone), "point-mae" (no pcd record) or "none"
    frame: Frame
    pretrain_scenes: Optional[list[str]] = None
    metadata: Optional[dict[str, Any]] = None
    adopted: list[str] = field(default_factory=list)  # "trans_dim 384 -> 64", ...

    def record(self) -> dict[str, Any]:
        """The JSON of RUN_DIR/init.json."""
        return {"init": str(self.path) if self.path else None, "kind": self.kind, "frame": self.frame.name,
                "pretrain_scenes": self.pretrain_scenes,
                "normalization": (self.metadata or {}).get("normalization")}


def plan_init(init: Optional[Path], backbone: BackboneConfig) -> InitPlan:
    """Check `init`, adopt the export's architecture into `backbone` (in place) and find the weights' frame.

    A Point-MAE checkpoint carries no architecture: its tensors are loaded once into a backbone of the configured
    sizes here, so a width or depth that does not fit fails now, naming the file, before any run file exists.
    """
    if init is None:
        return InitPlan(path=None, kind="none", frame=frame_of_weights(None, has_init=False))
    init = Path(init)
    if not init.exists():
        raise PcdError(f"{init}: --init names no such file or folder")
    metadata = read_export_metadata(init)
    if metadata is None:
        load_backbone_weights(PointBackbone(backbone), init)  # raises PcdError naming the key that does not fit
        recorded = recorded_normalization(init)
        if recorded is not None:  # a pcd export's file moved away from its backbone.json
            metadata = {"normalization": {"name": recorded}}
            console.print(f"init: {init} has no backbone.json beside it; its frame is the '{recorded}' it records, "
                          "the scenes it was pre-trained on cannot be checked")
            return InitPlan(path=init, kind="pcd-file", frame=_frame(init, metadata), metadata=metadata)
        console.print(f"init: {init} is a Point-MAE checkpoint (no pcd export metadata): its frame is taken to be "
                      "Point-MAE's (y up, unit sphere) and the shapes it was pre-trained on cannot be checked")
        return InitPlan(path=init, kind="point-mae", frame=frame_of_weights(None, has_init=True))
    frame = _frame(init, metadata)
    exported = metadata.get("backbone") or {}
    adopted = [f"{k} {getattr(backbone, k)} -> {exported[k]}" for k in ARCHITECTURE_FIELDS
               if k in exported and exported[k] != getattr(backbone, k)]
    for key in ARCHITECTURE_FIELDS:
        if key in exported:
            setattr(backbone, key, type(getattr(backbone, key))(exported[key]))
    if adopted:
        console.print(f"init: backbone architecture taken from the export ({', '.join(adopted)})")
    return InitPlan(path=init, kind="pcd-export", frame=frame, metadata=metadata, adopted=adopted,
                    pretrain_scenes=list(metadata.get("pretrain_scenes") or []))


def _frame(init: Path, metadata: dict[str, Any]) -> Frame:
    try:
        return frame_of_weights(metadata, has_init=True)
    except KeyError:
        name = (metadata.get("normalization") or {}).get("name")
        raise PcdError(f"{init}: exported with input normalisation '{name}', which this version of pcd cannot "
                       f"feed (it knows {', '.join(FRAMES)})") from None


def recorded_normalization(path: Path) -> Optional[str]:
    """The normalisation a pcd weight file records in itself (safetensors header metadata, or the plain string
    beside `base_model` in point_mae.pth); None for a file that records none (Point-MAE's own)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("normalization")
    value = read_checkpoint(path).get("normalization")
    return value if isinstance(value, str) else None


def load_init(model: PointBackbone, init: Optional[Path], announce: bool = True) -> Optional[InitReport]:
    """Load `init`'s backbone strictly into `model` (the backbone itself, or a task model built on one).

    Every backbone tensor must be in the file with the model's shape; the task's own parameters keep their fresh
    initialisation (`pcd.trainer.models.load_pretrained_backbone`). Prints (when `announce`: rank 0) one line
    saying what was loaded, what stays fresh and what was skipped.
    """
    if init is None:
        if announce:
            console.print("init: none, the backbone starts from random weights")
        return None
    report = load_pretrained_backbone(model, Path(init))
    if announce:
        console.print(f"init: {report.summary()}")
    return report


def write_init_record(run_dir: Path, plan: InitPlan) -> None:
    """RUN_DIR/init.json: written by rank 0 once the run folder is known to be free (in `Task.build_model`)."""
    atomic_write_json(Path(run_dir) / INIT_FILE, plan.record())


def read_init_record(run_dir: Path) -> Optional[dict[str, Any]]:
    """RUN_DIR/init.json, or None for a run that has none (older runs)."""
    path = Path(run_dir) / INIT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PcdError(f"{path}: cannot read the run's init record ({exc})") from None


def warn_overlap(pretrain_scenes: Optional[list[str]], eval_items: list[str], what: str) -> list[str]:
    """Evaluated items the backbone was pre-trained on; printed as a warning when there are any."""
    overlap = sorted(set(pretrain_scenes or []) & set(eval_items))
    if overlap:
        console.print(f"[yellow]warning: {len(overlap)} of the {len(eval_items)} {what} scenes were seen in "
                      f"pre-training (e.g. {', '.join(overlap[:3])}); results on them are not held-out[/yellow]")
    return overlap

