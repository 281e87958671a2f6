"""Weights & Biases logging for `--log wandb`: the runtime's log records, beside metrics.jsonl and TensorBoard.

wandb is an optional extra (`pip install 'pcd-distill[wandb]'`), imported only when asked for. Its usual
environment applies: WANDB_MODE=offline keeps the run on disk (RUN_DIR/wandb/) for a later `wandb sync`,
WANDB_PROJECT names the project (default "pcd"), WANDB_API_KEY logs in. The wandb run id is kept in
RUN_DIR/wandb_run.json, so a resumed training run (after a preemption) continues the same wandb run.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from pcd.pipeline.atomic import atomic_write_json
from pcd.pipeline.errors import PcdError

RUN_ID_FILE = "wandb_run.json"


class WandbLog:
    """One wandb run per pcd run folder; `log` takes the runtime's records ({"kind", "epoch", "step", ...})."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        wandb = import_wandb()
        id_path = Path(run_dir) / RUN_ID_FILE
        run_id = _saved_run_id(id_path) or secrets.token_hex(8)
        atomic_write_json(id_path, {"id": run_id})
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pcd"), name=Path(run_dir).name, id=run_id,
                               resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        """The record's numbers as `<kind>/<name>` at its optimizer step (TensorBoard's names)."""
        values = {f"{record['kind']}/{key}": value for key, value in record.items()
                  if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}
        self._run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()


def import_wandb() -> Any:
    """The wandb module, or one line saying how to install it (checked before a run touches its folder)."""
    try:
        import wandb
    except ImportError:
        raise PcdError("--log wandb: the wandb package is not installed (pip install 'pcd-distill[wandb]')") from None
    return wandb


def _saved_run_id(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text()).get("id")
    except (OSError, ValueError, AttributeError) as exc:
        raise PcdError(f"{path}: cannot read the wandb run id ({exc}); remove the file to start a new wandb run") \
            from None
    if not isinstance(run_id, str) or not run_id.isalnum():
        raise PcdError(f"{path}: 'id' is not a wandb run id")
    return run_id
