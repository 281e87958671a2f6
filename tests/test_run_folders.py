"""Issue 10, runs that must not be lost or mixed: one run per folder (locks), a torn log line, a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pcd.pipeline import cache_teacher, extract
from pcd.pipeline import schema as schema_module
from pcd.pipeline.errors import PcdError
from pcd.pipeline.locks import folder_lock
from pcd.pipeline.parts import Part
from pcd.pipeline.schema import MANIFEST_NAME
from pcd.trainer import runtime as runtime_module
from pcd.trainer.runtime import OptimConfig, RuntimeConfig, run_lock, train
from regression_task import RegressionTask
from teacher_helpers import make_extraction
from test_sens import make_frames, make_header, write_sens


def optim(epochs: int) -> OptimConfig:
    return OptimConfig(lr=3e-2, epochs=epochs, warmup_epochs=1, batch_size=32, grad_clip=1.0)


RUNTIME = RuntimeConfig(device="cpu", workers=0, log_every=4, progress=False, eval_every=0)


def resumed() -> RuntimeConfig:
    return RuntimeConfig(**{**RUNTIME.__dict__, "resume": True})


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- one run per folder --------------------------------------------------------------------------------------

def test_a_second_run_on_a_live_run_folder_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    train(RegressionTask(), optim(1), RUNTIME, tmp_path)
    before = folder_state(tmp_path)
    with run_lock(tmp_path):  # as the first run holds it while it trains (flock: per open file, so per run)
        with pytest.raises(PcdError, match=f"{tmp_path}: another training run is writing there"):
            train(RegressionTask(), optim(2), resumed(), tmp_path)
    assert folder_state(tmp_path) == before
    train(RegressionTask(), optim(2), resumed(), tmp_path)  # the lock goes with the run that held it


def test_cache_teacher_locks_its_part_and_leaves_other_parts_files_alone(tmp_path: Path) -> None:
    make_extraction(tmp_path / "extracted", {"scene0000_00": 2})
    out = tmp_path / "out"
    cfg = cache_teacher.Config(extracted_dir=tmp_path / "extracted", out_dir=out, teacher="tiny-random", workers=0)
    with folder_lock(out, cache_teacher.LOCK_NAME, "test"):  # a whole run (or a merge) holds the folder
        with pytest.raises(PcdError, match=f"{out}: another pcd cache-teacher is writing there"):
            cache_teacher.run(cfg)
        with pytest.raises(PcdError, match=f"{out}: another pcd cache-teacher is writing there"):
            cache_teacher.run(replace(cfg, part="0/2"))
    with folder_lock(out, Part(0, 2).lock_name(cache_teacher.STAGE), "test"):  # a live run of part 0/2
        with pytest.raises(PcdError, match=f"{out}: another pcd cache-teacher of part 0/2 is writing there"):
            cache_teacher.run(replace(cfg, part="0/2"))
    assert not any(out.glob("manifest*.json"))
    live = out / ".shard-000099.tar.tmp-4242"  # a shard another part's live run is writing
    live.write_bytes(b"in progress")
    mine = Part(0, 2) if Part(0, 2).holds("scene0000_00") else Part(1, 2)
    other = Part(1 - mine.index, 2)
    with folder_lock(out, cache_teacher.LOCK_NAME, "test", shared=True), \
            folder_lock(out, other.lock_name(cache_teacher.STAGE), "test"):  # the other part runs beside this one
        assert cache_teacher.run(replace(cfg, part=str(mine))) == 0
        with pytest.raises(PcdError, match=f"{out}: another pcd cache-teacher is writing there"):
            cache_teacher.run(cfg)  # a whole run is refused while parts run
    assert live.read_bytes() == b"in progress"
    assert json.loads((out / mine.manifest_name).read_text())["num_samples"] == 2


# --- a torn log line -----------------------------------------------------------------------------------------

def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path: Path) -> None:
    train(RegressionTask(), optim(1), RUNTIME, tmp_path)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines) + '\n{"kind": "train", "epo')  # killed mid-write
    train(RegressionTask(), optim(2), resumed(), tmp_path)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert records[: len(lines)] == [json.loads(line) for line in lines]
    log.write_text('{"kind": "train", "epo\n' + log.read_text())  # damage before the last line is not a tear
    with pytest.raises(PcdError, match="metrics.jsonl: line 1 is not a JSON record"):
        train(RegressionTask(), optim(3), resumed(), tmp_path)


# --- a full disk ---------------------------------------------------------------------------------------------

class _FullDiskFile:
    """A file on a disk that fills up after `room` bytes: the write that crosses it raises ENOSPC."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._file.write(bytes(data[: self._room]))
            self._room = 0
            self._file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def full_disk_open(room: int):
    def opener(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return _FullDiskFile(handle, room) if "w" in mode and ".tmp-" in str(file) else handle
    return opener


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    train(RegressionTask(), optim(1), RUNTIME, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    monkeypatch.setattr(runtime_module, "open", full_disk_open(room=1000), raising=False)
    with pytest.raises(PcdError) as caught:
        train(RegressionTask(), optim(2), resumed(), tmp_path)
    assert str(caught.value) == f"no space left on device while writing {last}"
    assert list(last.parent.iterdir()) == [last] and last.read_bytes() == before
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_a_full_disk_during_extraction_fails_the_scene_and_removes_its_partial_shards(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    frames = [f for f, _ in make_frames(6)]
    write_sens(tmp_path / "scans" / "scene0000_00" / "scene0000_00.sens", make_header(6), iter(frames))
    monkeypatch.setattr(schema_module.tarfile, "bltn_open", full_disk_open(room=5000))
    out = tmp_path / "out"
    cfg = extract.Config(scans_dir=tmp_path / "scans", out_dir=out, frame_skip=1, points=10, shard_size=2)
    assert extract.run(cfg) == 1
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["failed"]["scene0000_00"].startswith(
        f"scene scene0000_00: no space left on device while writing {out / 'scene0000_00-'}")
    assert sorted(p.name for p in out.iterdir()) == [".extract.lock", MANIFEST_NAME]


def test_workers_start_and_return_tensors_under_a_long_tmpdir(tmp_path):
    """With TMPDIR past the socket-path limit, Python 3.11's multiprocessing fails ("AF_UNIX path too long") and
    a DataLoader worker hangs; every pcd command first moves multiprocessing's sockets under /tmp."""
    long_tmp = tmp_path / ("t" * 60) / ("m" * 60)
    long_tmp.mkdir(parents=True)
    script = (
        "import sys, torch, multiprocessing.util\n"
        "from pcd.cli import main\n"
        "try:\n"
        f"    main(['generate-scenes', {str(tmp_path / 'scans')!r}, '--preset', 'tiny', '--scenes', '1', '--frames', '1'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert len(multiprocessing.util.get_temp_dir()) < 60, multiprocessing.util.get_temp_dir()\n"
        "data = torch.utils.data.DataLoader(torch.arange(8.0).reshape(4, 2), batch_size=2, num_workers=1)\n"
        "print(sum(float(b.sum()) for b in data))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TMPDIR": str(long_tmp)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "28.0"
