"""Commands that read a run folder say which kind of run they expected when given another kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcd.pipeline.config import config_to_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer import export, pretrain
from pcd.trainer.detection import evaluate, finetune


def write_run_config(run_dir: Path, cfg: object) -> Path:
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    return run_dir


def test_evaluate_detection_on_a_pretrain_run_names_the_file_and_the_mix_up(tmp_path: Path) -> None:
    run_dir = write_run_config(tmp_path / "pre", pretrain.Config())
    with pytest.raises(PcdError, match=r"pre/config.json: not the config of a `pcd finetune detection` run"):
        evaluate.load_run(run_dir)
    with pytest.raises(PcdError, match=r"empty/config.json: missing \(is .*empty a `pcd finetune detection` run"):
        evaluate.load_run(tmp_path / "empty")


def test_export_of_a_detection_run_names_the_file_and_the_mix_up(tmp_path: Path) -> None:
    run_dir = write_run_config(tmp_path / "det", finetune.Config())
    with pytest.raises(PcdError, match=r"det/config.json: not the config of a `pcd pretrain` run"):
        export.run(export.Config(run_dir=run_dir))
