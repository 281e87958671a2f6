"""The command line's promise for bad input: one `error:` line naming the file, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import torch

from pcd.cli import error_message, one_line
from pcd.pipeline.errors import PcdError


def pcd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pcd.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", [["generate-scenes", "{out}", "--preset", "tiny", "--scenes", "1"],
                                     ["generate-shapes", "{out}", "--preset", "tiny"],
                                     ["demo", "{out}"]])
def test_a_file_where_an_output_folder_goes_is_one_error_line(tmp_path: Path, command: list[str]) -> None:
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("keep me")
    result = pcd(*[arg.format(out=in_the_way) for arg in command])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {in_the_way}: a file is in the way where a folder is needed")
    assert in_the_way.read_text() == "keep me"


def test_multi_line_library_messages_become_one_line() -> None:
    assert one_line("x.tar: not readable (could not open:\n- method gz: bad\n- method tar: bad)") == (
        "x.tar: not readable (could not open: - method gz: bad - method tar: bad)")


class _FailingDataset(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise PcdError("shards/a.tar: sample a_000000 lacks prefix.npy")


def test_an_error_raised_in_a_loader_worker_keeps_its_own_line() -> None:
    loader = torch.utils.data.DataLoader(_FailingDataset(), batch_size=None, num_workers=1)
    with pytest.raises(PcdError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what torch hands the main process
    assert error_message(caught.value) == "shards/a.tar: sample a_000000 lacks prefix.npy"
    assert error_message(PcdError("x.json: bad\n  value")) == "x.json: bad value"


def test_every_registered_task_has_its_finetune_and_evaluate_command_and_presets() -> None:
    import importlib

    from pcd.cli import evaluate_app, finetune_app
    from pcd.pipeline.config import build_config, load_presets
    from pcd.trainer.tasks import TASKS, evaluate_command, finetune_command

    assert [c.name for c in finetune_app.registered_commands] == list(TASKS)
    # every task's evaluation, in registry order; `pcd evaluate reconstruction` (of pre-training) is no task
    assert [c.name for c in evaluate_app.registered_commands if c.name != "reconstruction"] == list(TASKS)
    presets = load_presets()
    for name, entry in TASKS.items():
        for module_name, command in ((entry.finetune, finetune_command(name)), (entry.evaluate, evaluate_command(name))):
            module = importlib.import_module(module_name)
            assert callable(module.run)
            build_config(module.Config, command)
        assert "tiny" in presets[finetune_command(name)]
        build_config(importlib.import_module(entry.finetune).Config, finetune_command(name), "tiny")
        demo_module, _, function = entry.demo.partition(":")
        assert callable(getattr(importlib.import_module(demo_module), function))


def test_evaluation_modules_import_no_training_code() -> None:
    code = ("import sys; from pcd.trainer.tasks import TASKS; import importlib\n"
            "for entry in TASKS.values(): importlib.import_module(entry.evaluate)\n"
            "print(sorted(m for m in sys.modules if m.endswith(('.finetune', '.pretrain', '.distill'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_generated_task_command_maps_its_options_and_reports_bad_data(tmp_path: Path) -> None:
    result = pcd("finetune", "classification", str(tmp_path / "nowhere"), str(tmp_path / "run"), "--preset", "tiny",
                 "--val-fraction", "0.1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: not a folder (expected a ModelNet40 or ScanObjectNN dataset folder)")
    assert not (tmp_path / "run").exists()
    result = pcd("evaluate", "partseg", str(tmp_path / "run"), "--passes", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'run' / 'config.json'}: missing")
