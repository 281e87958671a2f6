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
