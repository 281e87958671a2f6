"""`pcd export RUN_DIR`: turn a pre-training run's checkpoint into a backbone that fine-tunes can load.

Reads (all written by `pcd pretrain`):
- ``RUN_DIR/config.json``: the resolved pretrain config; its ``model`` section is the BackboneConfig, its
  ``objective`` the objective, and its ``distill`` / ``reconstruct`` sections the heads' configs;
- ``RUN_DIR/checkpoints/<name>.pt``: a dict whose ``model`` entry is the student's state dict;
- ``RUN_DIR/pretrain_scenes.txt``: the scenes the backbone saw, so fine-tunes can refuse to report on them;
- ``RUN_DIR/teacher.json`` (or the config's ``teacher`` section): which teacher produced the targets.

Writes the export folder described in `pcd.trainer.weights` (safetensors + json + Point-MAE .pth), and the
run's heads (reconstruction decoder, distillation heads) beside it in `heads.safetensors` (`pcd.trainer.heads`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from pcd.pipeline.config import config_from_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.heads import write_heads
from pcd.trainer.weights import (METADATA_FILE, backbone_state_from_model, load_backbone_state, read_checkpoint,
                                write_export)

CONFIG_FILE = "config.json"
SCENES_FILE = "pretrain_scenes.txt"
TEACHER_FILE = "teacher.json"


@dataclass
class Config:
    run_dir: Path = Path("run")
    out_dir: Optional[Path] = None  # default: RUN_DIR/export
    checkpoint: str = "last"  # a name in RUN_DIR/checkpoints ("last" = last.pt), or a path


def run(cfg: Config) -> int:
    run_dir = Path(cfg.run_dir)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "export"
    if not run_dir.is_dir():
        raise PcdError(f"{run_dir}: no such run folder")
    run_config = _read_json(run_dir / CONFIG_FILE)
    backbone_cfg = _backbone_config(run_config, run_dir / CONFIG_FILE)
    checkpoint_path = resolve_checkpoint(run_dir, cfg.checkpoint)
    checkpoint = _load_checkpoint(checkpoint_path)
    backbone = PointBackbone(backbone_cfg)
    load_backbone_state(backbone, backbone_state_from_model(checkpoint["model"]), checkpoint_path)
    teacher = _teacher(run_dir, run_config)
    # runs from before the objective registry named the objective in their distill section
    objective = run_config.get("objective") or (run_config.get("distill") or {}).get("objective")
    metadata = {
        "pretrain_scenes": read_scene_list(run_dir / SCENES_FILE),
        "teacher": teacher,
        "objective": objective,
        "source": {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint_path.name,
                   "epoch": checkpoint.get("epoch") if isinstance(checkpoint.get("epoch"), int) else None},
        "pretrain_config": run_config,
        "heads": write_heads(out_dir, checkpoint["model"], run_config, str(objective),
                             teacher if isinstance(teacher, dict) else None),
    }
    document = write_export(out_dir, backbone.state_dict(), backbone_cfg, metadata)
    Console(stderr=True, soft_wrap=True).print(
        f"exported backbone ({sum(p.numel() for p in backbone.parameters()):,} parameters, "
        f"{len(metadata['pretrain_scenes'])} pre-training scenes) from {checkpoint_path} to {out_dir}/ "
        f"[{document['weights']['file']}, {METADATA_FILE}, {document['point_mae']['file']}"
        + (f", {document['heads']['file']}" if document.get("heads") else "") + "]")
    return 0


def resolve_checkpoint(run_dir: Path, name: str) -> Path:
    """'last' -> RUN_DIR/checkpoints/last.pt; a bare name is looked up in RUN_DIR/checkpoints (.pt optional)."""
    candidates = [Path(name), run_dir / "checkpoints" / name, run_dir / "checkpoints" / f"{name}.pt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PcdError(f"{run_dir}: checkpoint '{name}' not found (looked for {', '.join(map(str, candidates[1:]))})")


def read_scene_list(path: Path) -> list[str]:
    if not path.is_file():
        raise PcdError(f"{path}: missing; the export must record the pre-training scenes")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise PcdError(f"{path}: missing (is this a `pcd pretrain` run folder?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PcdError(f"{path}: cannot read ({exc})") from None
    if not isinstance(document, dict):
        raise PcdError(f"{path}: expected a JSON object")
    return document


def _backbone_config(run_config: dict[str, Any], path: Path) -> BackboneConfig:
    if not isinstance(run_config.get("model"), dict):
        raise PcdError(f"{path}: no 'model' section with the backbone config")
    try:
        return config_from_dict(BackboneConfig, run_config["model"])
    except PcdError as exc:
        raise PcdError(f"{path}: not the config of a `pcd pretrain` run ('model' section: {exc})") from None


def _load_checkpoint(path: Path) -> dict[str, Any]:
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint.get("model"), dict):
        raise PcdError(f"{path}: not a pcd training checkpoint (no 'model' state dict)")
    return checkpoint


def _teacher(run_dir: Path, run_config: dict[str, Any]) -> Any:
    """The teacher's identity: RUN_DIR/teacher.json if the run wrote one, else the config's 'teacher' entry."""
    if (run_dir / TEACHER_FILE).is_file():
        return _read_json(run_dir / TEACHER_FILE)
    return run_config.get("teacher")
