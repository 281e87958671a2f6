"""Pre-training: shard selection and streaming, the distillation task on the runtime, and `pcd pretrain`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline.config import build_config
from pcd.pipeline.errors import PcdError
from pcd.trainer import data, pretrain
from pcd.trainer.runtime import train
from training_shards import TEACHER, write_training_shards

SCENES = {"scene0000_00": 10, "scene0001_00": 7, "scene0002_00": 5, "scene0003_00": 6}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_training_shards(folder, SCENES, points=300)
    (folder / "train.txt").write_text("scene0000_00\nscene0001_00\n\n# comment\nscene0002_00\n")
    (folder / "val.txt").write_text("scene0003_00\n")
    return folder


def tiny_config(shards: Path, run_dir: Path, *sets: str) -> pretrain.Config:
    return build_config(pretrain.Config, "pretrain", "tiny", [
        f"shards_dir={shards}", f"run_dir={run_dir}", "num_points=128", "optim.batch_size=4",
        "runtime.workers=0", "runtime.progress=false", "runtime.log_every=1", *sets])


def batches(loader, n: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def test_split_selects_only_its_scenes_and_counts_their_samples(shards: Path) -> None:
    selected = data.select_shards(shards, shards / "train.txt")
    assert selected.scenes == ["scene0000_00", "scene0001_00", "scene0002_00"]
    assert selected.num_samples == 22 and len(selected.urls) == 3 and selected.missing == []
    assert selected.teacher["prefix_dim"] == TEACHER["prefix_dim"]
    assert data.steps_per_epoch(selected.num_samples, 8) == 2 and data.steps_per_epoch(3, 8) == 1
    (shards / "partial.txt").write_text("scene0001_00\nscene9999_00\n")
    assert data.select_shards(shards, shards / "partial.txt").missing == ["scene9999_00"]
    (shards / "other.txt").write_text("scene9999_00\n")
    with pytest.raises(PcdError, match="no training samples"):
        data.select_shards(shards, shards / "other.txt")


def test_a_truncated_shard_is_refused_before_training(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    write_training_shards(copy, {"scene0000_00": 2}, points=300)
    shard = copy / "scene0000_00.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(PcdError, match=r"scene0000_00.tar: 5000 bytes, the manifest lists \d+ \(truncated"):
        data.select_shards(copy, None)


def test_a_missing_init_is_refused_before_the_run_folder_is_written(shards: Path, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(shards, tmp_path / "run", f"init={tmp_path / 'nowhere.pth'}")
    with pytest.raises(PcdError, match=r"nowhere.pth: --init names no such file or folder"):
        pretrain.run(cfg)
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_a_damaged_shard_of_the_right_size_stops_the_loader_with_one_line(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    write_training_shards(copy, {"scene0000_00": 3}, points=300)
    shard = copy / "scene0000_00.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[0:512] = b"x" * 512  # the first member's header
    shard.write_bytes(bytes(damaged))
    selected = data.select_shards(copy, None)
    for loader in (data.train_loader(selected, batch_size=1, num_points=64, seed=0, epoch=0, rank=0, world_size=1,
                                     workers=0),
                   data.val_loader(selected, batch_size=1, num_points=64, seed=0, workers=0)):
        with pytest.raises(PcdError, match=r"scene0000_00.tar: not a readable tar shard \(ReadError: "):
            next(iter(loader))


@pytest.mark.parametrize("sample", [0, 1])
def test_a_shard_zeroed_in_place_is_refused_not_read_short_or_forever(tmp_path: Path, sample: int) -> None:
    """Zeroed headers read as a tar's end: zeroing sample 0 would spin the endless training stream on a shard that
    yields nothing, zeroing sample 1 would silently drop samples 1 and 2."""
    copy = tmp_path / "copy"
    write_training_shards(copy, {"scene0000_00": 3}, points=300)
    shard = copy / "scene0000_00.tar"
    with tarfile.open(shard) as tar:
        start = next(m.offset for m in tar.getmembers() if m.name.startswith(f"scene0000_00_{sample:06d}."))
    damaged = bytearray(shard.read_bytes())
    damaged[start:start + 1024] = bytes(1024)
    shard.write_bytes(bytes(damaged))
    selected = data.select_shards(copy, None)
    train = data.train_loader(selected, batch_size=1, num_points=64, seed=0, epoch=0, rank=0, world_size=1, workers=0)
    val = data.val_loader(selected, batch_size=1, num_points=64, seed=0, workers=0)
    for loader in (train, val):
        with pytest.raises(PcdError, match=r"scene0000_00.tar: \d samples read, the manifest lists 3 \(damaged"):
            for _ in zip(range(10), loader):
                pass


def test_loader_normalises_augments_and_is_deterministic_per_epoch(shards: Path) -> None:
    selected = data.select_shards(shards, None)
    common = dict(batch_size=4, num_points=64, seed=3, rank=0, world_size=1, workers=0, shuffle_buffer=8)
    plain = batches(data.train_loader(selected, epoch=0, augment=False, **common), 3)
    assert plain[0]["points"].shape == (4, 64, 3) and plain[0]["prefix"].shape == (4, 2, 16)
    assert plain[0]["prefix"].dtype == torch.float32 and plain[0]["clip"].shape == (4, 8)
    radius = plain[0]["points"].norm(dim=-1).amax(dim=-1)
    assert torch.allclose(radius, torch.ones(4)) and plain[0]["points"].mean(dim=1).abs().max() < 1e-5
    again = batches(data.train_loader(selected, epoch=0, augment=False, **common), 3)
    assert all(torch.equal(a["points"], b["points"]) for a, b in zip(plain, again))
    other_epoch = batches(data.train_loader(selected, epoch=1, augment=False, **common), 3)
    assert not torch.equal(plain[0]["points"], other_epoch[0]["points"])
    augmented = batches(data.train_loader(selected, epoch=0, augment=True, **common), 3)
    assert not torch.equal(plain[0]["points"], augmented[0]["points"])
    # more batches than the shards hold: the stream cycles instead of running dry
    assert len(batches(data.train_loader(selected, epoch=0, **common), 12)) == 12


def test_loader_is_deterministic_with_worker_processes(shards: Path) -> None:
    selected = data.select_shards(shards, None)
    common = dict(batch_size=4, num_points=64, seed=0, epoch=2, rank=0, world_size=1, workers=2)
    a, b = (batches(data.train_loader(selected, **common), 4) for _ in range(2))
    assert all(torch.equal(x["points"], y["points"]) and torch.equal(x["prefix"], y["prefix"]) for x, y in zip(a, b))


def test_gravity_frame_uses_the_pose_rotation(shards: Path) -> None:
    selected = data.select_shards(shards, None)
    stage = data._ProcessStage(4, selected.teacher, 0, 0, 0, augment=False, shuffle_buffer=0)
    points = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0]], np.float32)
    pose = np.eye(4, dtype=np.float32)
    pose[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]  # camera-to-world: camera y (down) becomes world -z
    out = stage.points(points, pose, np.random.default_rng(0))
    assert sorted(map(tuple, np.round(out, 5).tolist())) == sorted(map(tuple, (points @ pose[:3, :3].T).tolist()))


def test_distillation_loss_falls_and_validation_is_reported(shards: Path, tmp_path: Path) -> None:
    (tmp_path / "few.txt").write_text("scene0002_00\n")  # a handful of frames to overfit
    cfg = tiny_config(shards, tmp_path, "optim.epochs=20", "augment=false", "optim.lr=1e-2", "optim.batch_size=5")
    task = pretrain.PretrainTask(cfg, data.select_shards(shards, tmp_path / "few.txt"),
                                 data.select_shards(shards, shards / "val.txt"))
    summary = train(task, cfg.optim, cfg.runtime, tmp_path)
    losses = [summary["epoch_losses"][e] for e in range(20)]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert "val_loss" in summary["eval"] and np.isfinite(summary["eval"]["val_loss"])


class CrashingTask(pretrain.PretrainTask):
    steps = 0

    def training_step(self, model, batch, ctx):
        self.steps += 1
        if self.steps == 5:
            raise RuntimeError("simulated crash")
        return super().training_step(model, batch, ctx)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_interrupted_pretraining_resumes_bit_exactly(shards: Path, tmp_path: Path) -> None:
    sets = ("optim.epochs=3", "runtime.max_steps_per_epoch=2", "model.drop_path_rate=0.1", "runtime.eval_every=0")
    train_set = data.select_shards(shards, None)
    whole = tiny_config(shards, tmp_path / "whole", *sets)
    train(pretrain.PretrainTask(whole, train_set, None), whole.optim, whole.runtime, whole.run_dir)
    cut = tiny_config(shards, tmp_path / "cut", *sets)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(CrashingTask(cut, train_set, None), cut.optim, cut.runtime, cut.run_dir)
    cut.runtime.resume = True
    train(pretrain.PretrainTask(cut, train_set, None), cut.optim, cut.runtime, cut.run_dir)
    assert train_losses(cut.run_dir) == train_losses(whole.run_dir) and len(train_losses(cut.run_dir)) == 6


def test_resuming_with_other_settings_is_refused_and_keeps_the_run_record(shards: Path, tmp_path: Path) -> None:
    sets = ("optim.epochs=1", "runtime.max_steps_per_epoch=1", "runtime.eval_every=0")
    train_set = data.select_shards(shards, None)
    first = tiny_config(shards, tmp_path / "run", *sets)
    train(pretrain.PretrainTask(first, train_set, None), first.optim, first.runtime, first.run_dir)
    recorded = (first.run_dir / "config.json").read_text()
    changed = tiny_config(shards, tmp_path / "run", *sets, "optim.lr=5e-4", "runtime.resume=true",
                          "runtime.workers=2")
    with pytest.raises(PcdError, match=r"last.pt: the run was started with other settings \(optim.lr: 0.002 -> "
                                       r"0.0005\); resume with the same"):
        train(pretrain.PretrainTask(changed, train_set, None), changed.optim, changed.runtime, changed.run_dir)
    assert (first.run_dir / "config.json").read_text() == recorded


def test_a_refused_resume_writes_nothing_into_the_other_run(shards: Path, tmp_path: Path) -> None:
    """`--resume` into a run folder of other settings (e.g. a fine-tune run's) is refused before anything of the
    pre-training is recorded there."""
    sets = ("optim.epochs=1", "runtime.max_steps_per_epoch=1", "runtime.eval_every=0")
    first = tiny_config(shards, tmp_path / "run", *sets)
    pretrain.run(first)
    records = [first.run_dir / "pretrain_scenes.txt", first.run_dir / "teacher.json"]
    for path in records:
        path.unlink()  # now the folder holds a checkpoint of other settings and no pre-training record
    other = tiny_config(shards, tmp_path / "run", *sets, "runtime.resume=true", "optim.lr=5e-4")
    with pytest.raises(PcdError, match="other settings"):
        pretrain.run(other)
    assert not any(path.exists() for path in records)


def test_pcd_pretrain_cli_end_to_end(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["pretrain", str(shards), str(run_dir), "--preset", "tiny", "--split", str(shards / "train.txt"),
            "--val-split", str(shards / "val.txt"), "--device", "cpu", "--set", "optim.epochs=2",
            "--set", "num_points=128", "--set", "runtime.workers=0", "--set", "runtime.max_steps_per_epoch=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # what the run decided, from its records (the screen panel wraps with the terminal width and path length)
    assert (run_dir / "pretrain_scenes.txt").read_text().split() == ["scene0000_00", "scene0001_00", "scene0002_00"]
    assert json.loads((run_dir / "teacher.json").read_text()) == TEACHER
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["depth"] == 2 and config["objective"] == "distill"
    assert config["optim"]["epochs"] == 2 and config["runtime"]["device"] == "cpu"
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and any(k.startswith("backbone.") for k in ckpt["model"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "epoch", "eval"} <= {record["kind"] for record in records}
    assert [r["epoch"] for r in records if r["kind"] == "epoch" and math.isfinite(r["loss"])] == [0, 1]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    again = CliRunner().invoke(app, args)  # a second run into the same folder must not overwrite the first
    assert again.exit_code == 2 and "--resume" in " ".join(again.output.split())


def test_overlapping_train_and_val_scenes_are_refused(shards: Path, tmp_path: Path) -> None:
    cfg = tiny_config(shards, tmp_path, f"split={shards / 'train.txt'}", f"val_split={shards / 'train.txt'}")
    with pytest.raises(PcdError, match="also pre-training scenes"):
        pretrain.run(cfg)
    assert not (tmp_path / "pretrain_scenes.txt").exists()


def test_two_process_pretraining_keeps_ranks_in_sync(shards: Path, tmp_path: Path) -> None:
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(tests_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tests_dir / "pretrain_ddp.py"), str(shards), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (sum(SCENES.values()) // 4)


def test_export_of_a_pretrain_run_initialises_the_next_one(shards: Path, tmp_path: Path) -> None:
    first = tiny_config(shards, tmp_path / "first", "optim.epochs=1", "runtime.max_steps_per_epoch=1")
    assert pretrain.run(first) == 0
    exported = CliRunner().invoke(app, ["export", str(first.run_dir), "--out-dir", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    second = tiny_config(shards, tmp_path / "second", "optim.epochs=1", "runtime.max_steps_per_epoch=1",
                         f"init={tmp_path / 'export'}")
    task = pretrain.PretrainTask(second, data.select_shards(shards, None), None)
    from pcd.trainer.runtime import make_context
    model = task.build_model(make_context(second.optim, second.runtime, second.run_dir))
    source = torch.load(first.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, source[f"backbone.{name}"]), name
