"""The training runtime on a small real task: learning, exact resume, DDP, checkpoint format, logs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcd.pipeline.errors import PcdError
from pcd.trainer.runtime import OptimConfig, RuntimeConfig, lr_at, train
from regression_task import RegressionTask

OPTIM = dict(lr=3e-2, epochs=4, warmup_epochs=1, batch_size=32, grad_clip=1.0)


def runtime(**kw) -> RuntimeConfig:
    return RuntimeConfig(**{"device": "cpu", "workers": 0, "log_every": 1, "progress": False, **kw})


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_loss_falls_and_run_folder_is_complete(tmp_path: Path) -> None:
    summary = train(RegressionTask(), OptimConfig(**OPTIM), runtime(checkpoint_every=2), tmp_path)
    losses = summary["epoch_losses"]
    assert losses[3] < 0.4 * losses[0]
    assert summary["step"] == 4 * 8 and summary["eval"]["val_mse"] < losses[0]
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "regression"
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 32 and kinds.count("epoch") == 4 and kinds.count("eval") == 4
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0002.pt", "epoch_0004.pt", "last.pt"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["step"] == 32 and set(ckpt["model"]) >= {"token", "net.0.weight"}
    assert {"torch", "numpy", "python", "cuda"} <= set(ckpt["rng"][0])
    assert ckpt["scheduler"]["total_steps"] == 32


def test_interrupted_then_resumed_run_repeats_the_same_losses(tmp_path: Path) -> None:
    train(RegressionTask(), OptimConfig(**OPTIM), runtime(), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(RegressionTask(crash_at_step=8 * 2 + 5), OptimConfig(**OPTIM), runtime(), tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    with pytest.raises(PcdError, match="--resume"):
        train(RegressionTask(), OptimConfig(**OPTIM), runtime(), tmp_path / "cut")
    stale = tmp_path / "cut" / "checkpoints" / ".last.pt.tmp-12345"  # as a run killed while saving leaves it
    stale.write_bytes(b"partial")
    train(RegressionTask(), OptimConfig(**OPTIM), runtime(resume=True), tmp_path / "cut")
    assert not stale.exists()
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "cut")
    assert resumed == whole  # bit-exact, and no duplicated records of the interrupted epoch
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_weight_decay_on_norms_biases_and_tokens(tmp_path: Path) -> None:
    task = RegressionTask()
    from pcd.trainer.runtime import make_context
    model = task.build_model(make_context(OptimConfig(**OPTIM), runtime(), tmp_path))
    decay, no_decay = task.param_groups(model, OptimConfig(**OPTIM))
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["net.0.weight", "net.4.weight"]
    assert "token" in {names[id(p)] for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0


def test_schedule_warms_up_linearly_then_decays_to_min_lr() -> None:
    cfg = OptimConfig(lr=1.0, warmup_start_lr=0.0, min_lr=0.1)
    assert lr_at(0, 100, 10, cfg) == 0.0 and lr_at(5, 100, 10, cfg) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, cfg) == pytest.approx(0.1)


def test_per_epoch_schedule_is_timms_cosine_as_point_mae_configures_it() -> None:
    from pcd.trainer.runtime import lr_at_epoch, scheduled_lr

    cfg = OptimConfig(lr=5e-4, warmup_start_lr=1e-6, min_lr=1e-6, epochs=300, warmup_epochs=10,
                      schedule_unit="epoch")
    # timm CosineLRScheduler(t_initial=300, warmup_t=10, warmup_lr_init=1e-6, lr_min=1e-6), warmup_prefix False
    assert lr_at_epoch(0, cfg) == pytest.approx(1e-6)
    assert lr_at_epoch(5, cfg) == pytest.approx(1e-6 + 5 * (5e-4 - 1e-6) / 10)
    assert lr_at_epoch(10, cfg) == pytest.approx(1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * 10 / 300)))
    assert lr_at_epoch(150, cfg) == pytest.approx(1e-6 + 0.5 * (5e-4 - 1e-6))
    # held for a whole epoch of 7 steps, then the next epoch's value
    assert {scheduled_lr(s, 7, cfg) for s in range(70, 77)} == {lr_at_epoch(10, cfg)}
    assert scheduled_lr(77, 7, cfg) == lr_at_epoch(11, cfg)
    per_step = OptimConfig(lr=1.0, warmup_start_lr=0.0, min_lr=0.1, epochs=10, warmup_epochs=1)
    assert scheduled_lr(5, 10, per_step) == lr_at(5, 100, 10, per_step)


def test_adam_puts_weight_decay_in_the_gradient_adamw_decouples_it() -> None:
    from pcd.trainer.runtime import make_optimizer

    finals = {}
    for name in ("adam", "adamw"):
        weight = torch.nn.Parameter(torch.tensor([2.0]))
        optimizer = make_optimizer([{"params": [weight]}], OptimConfig(lr=0.1, weight_decay=0.5, optimizer=name))
        weight.grad = torch.zeros(1)
        optimizer.step()
        finals[name] = float(weight)
    assert finals["adamw"] == pytest.approx(2.0 * (1 - 0.1 * 0.5))  # decoupled: w -= lr * wd * w
    assert finals["adam"] == pytest.approx(2.0 - 0.1, rel=1e-4)  # L2: gradient wd * w, Adam-normalised to lr


def test_two_process_torchrun_keeps_ranks_in_sync_and_stops_them_together(tmp_path: Path) -> None:
    """Two gloo ranks: the same weights on both; a SIGTERM on rank 1 alone stops both after the same step, and the
    resumed run ends with the uninterrupted run's weights."""
    script = Path(__file__).with_name("regression_task.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (256 // 32)
    ckpt = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    assert ranks[0]["preempted"] and ranks[1]["preempted"] and ranks[0]["cut_steps"] == ranks[1]["cut_steps"] == 11
    assert ranks[0]["resumed_steps"] == ranks[1]["resumed_steps"] == 16 - 11
    assert ranks[0]["resumed_hash"] == ranks[1]["resumed_hash"] == ranks[0]["hash"]


class NoisyDataset(torch.utils.data.Dataset):
    """Index plus a random 'augmentation' drawn from numpy's global RNG, as dataset code usually does."""

    def __len__(self) -> int:
        return 21

    def __getitem__(self, i: int) -> torch.Tensor:
        import numpy as np
        return torch.tensor([float(i), float(np.random.uniform())])


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_loader_shares_equally_and_repeats_exactly(tmp_path: Path, workers: int) -> None:
    from pcd.trainer.runtime import make_context, map_style_loader, map_style_steps, _seed_everything
    ctx = make_context(OptimConfig(batch_size=4), runtime(workers=workers), tmp_path)
    shares = []
    for rank in range(2):
        ctx.rank, ctx.world_size, ctx.batch_size = rank, 2, 2
        _seed_everything(7)
        first = list(map_style_loader(NoisyDataset(), ctx, epoch=3))
        _seed_everything(7)
        again = list(map_style_loader(NoisyDataset(), ctx, epoch=3))
        assert len(first) == map_style_steps(21, ctx) == 5
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        shares.append({int(i) for batch in first for i in batch[:, 0]})
    assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) == 10
    ctx.rank = 0
    other = list(map_style_loader(NoisyDataset(), ctx, epoch=4))
    assert {int(i) for batch in other for i in batch[:, 0]} != shares[0]


def test_resuming_with_another_model_is_a_one_line_error(tmp_path: Path) -> None:
    train(RegressionTask(), OptimConfig(**{**OPTIM, "epochs": 1}), runtime(), tmp_path)

    class WiderTask(RegressionTask):
        def build_model(self, ctx):
            return torch.nn.Linear(8, 3)

    with pytest.raises(PcdError, match="does not fit the configured model"):
        train(WiderTask(), OptimConfig(**{**OPTIM, "epochs": 2}), runtime(resume=True), tmp_path)


class PrecisionProbe(RegressionTask):
    """Records whether autocast was on in its training steps and in its evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.autocast_in_step: set[bool] = set()
        self.autocast_in_eval: set[bool] = set()

    def training_step(self, model, batch, ctx):
        self.autocast_in_step.add(torch.is_autocast_enabled("cpu"))
        return super().training_step(model, batch, ctx)

    def evaluate(self, model, ctx, epoch):
        self.autocast_in_eval.add(torch.is_autocast_enabled("cpu"))
        return super().evaluate(model, ctx, epoch)


def test_evaluation_runs_in_float32_when_training_runs_in_bf16(tmp_path: Path) -> None:
    task = PrecisionProbe()
    train(task, OptimConfig(**{**OPTIM, "epochs": 1}), runtime(precision="bf16", max_steps_per_epoch=2), tmp_path)
    assert task.autocast_in_step == {True} and task.autocast_in_eval == {False}


def test_point_mae_classifier_decays_neither_1d_parameters_nor_its_cls_token(tmp_path: Path) -> None:
    from pcd.trainer.classification.model import ClassifierConfig, PointMAEClassifier
    from pcd.trainer.models import tiny_backbone

    model = PointMAEClassifier(ClassifierConfig(backbone=tiny_backbone(), head_dims=(8, 8)))
    decay, no_decay = RegressionTask().param_groups(model, OptimConfig(**OPTIM))
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "cls_token" in skipped and "cls_pos" not in skipped  # Point-MAE: 'token' in name
    assert all(model.get_parameter(n).ndim <= 1 for n in skipped - {"cls_token"})


def records(run_dir: Path, kind: str) -> list[dict]:
    found = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in found if r["kind"] == kind]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_mid_epoch_saves_stops_resumably_and_resumes_exactly(tmp_path: Path, accumulate: int) -> None:
    """SLURM's preemption notice in the middle of epoch 1: the run finishes that step, saves, raises Preempted
    (the CLI's exit 75); resumed, it skips the batches it took and ends with an uninterrupted run's weights."""
    import signal

    from pcd.pipeline.errors import Preempted

    settings = runtime(accumulate=accumulate, checkpoint_steps=3)
    train(RegressionTask(), OptimConfig(**OPTIM), settings, tmp_path / "whole")
    handler = signal.getsignal(signal.SIGTERM)
    cut = RegressionTask(signal_at_step=(8 + 5) * accumulate)  # in the 6th optimizer step of epoch 1
    with pytest.raises(Preempted, match="SIGTERM after step 13"):
        train(cut, OptimConfig(**OPTIM), settings, tmp_path / "cut")
    assert signal.getsignal(signal.SIGTERM) is handler  # the runtime's handler is gone with the run
    assert cut.steps_taken == 13 * accumulate  # it stopped after the step the signal arrived in
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 13 and ckpt["epoch_progress"]["steps"] == 5
    resumed = RegressionTask()
    train(resumed, OptimConfig(**OPTIM), runtime(resume=True, accumulate=accumulate, checkpoint_steps=3),
          tmp_path / "cut")
    assert resumed.steps_taken == (32 - 13) * accumulate  # the 5 batches of epoch 1 were skipped, not trained on
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the logs read as one run: every step once, the resumed epoch's mean loss over all of its steps
    assert records(tmp_path / "cut", "train") == records(tmp_path / "whole", "train")
    assert records(tmp_path / "cut", "epoch") == records(tmp_path / "whole", "epoch")


def test_a_signal_at_an_epochs_last_step_resumes_with_its_evaluation(tmp_path: Path) -> None:
    from pcd.pipeline.errors import Preempted

    train(RegressionTask(), OptimConfig(**{**OPTIM, "epochs": 2}), runtime(), tmp_path / "whole")
    with pytest.raises(Preempted):
        train(RegressionTask(signal_at_step=8), OptimConfig(**{**OPTIM, "epochs": 2}), runtime(), tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["epoch_progress"]["steps"] == 8
    resumed = RegressionTask()
    train(resumed, OptimConfig(**{**OPTIM, "epochs": 2}), runtime(resume=True), tmp_path / "cut")
    assert resumed.steps_taken == 8
    for kind in ("train", "eval", "epoch"):
        assert records(tmp_path / "cut", kind) == records(tmp_path / "whole", kind)


class FixedDataTask(RegressionTask):
    """The regression task on one fixed data set, no dropout: an optimizer step depends only on its samples."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        x = torch.randn(64, 8, generator=generator)
        self.data = torch.utils.data.TensorDataset(x, x @ self.weight)

    def build_model(self, ctx):
        model = super().build_model(ctx)
        model.net[3].p = 0.0
        return model

    def steps_per_epoch(self, ctx):
        from pcd.trainer.runtime import map_style_steps
        return map_style_steps(len(self.data), ctx)

    def train_batches(self, ctx, epoch):
        from pcd.trainer.runtime import map_style_loader
        return ({"x": x, "y": y} for x, y in map_style_loader(self.data, ctx, epoch))


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path: Path) -> None:
    optim = OptimConfig(**{**OPTIM, "epochs": 1, "grad_clip": None})
    whole, halves = FixedDataTask(), FixedDataTask()
    train(whole, optim, runtime(), tmp_path / "whole")
    train(halves, optim, runtime(accumulate=4), tmp_path / "halves")
    assert halves.steps_taken == 4 * whole.steps_taken == 4 * 2
    for (name, a), b in zip(whole.model.named_parameters(), halves.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(PcdError, match="does not divide over 1 ranks x 3 accumulated"):
        train(FixedDataTask(), optim, runtime(accumulate=3), tmp_path / "odd")


def test_log_wandb_writes_an_offline_run_and_resumes_the_same_one(tmp_path: Path, monkeypatch) -> None:
    # wandb is an optional extra for users (pcd-distill[wandb]); the `test` extra installs it for this test
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from pcd.pipeline.errors import Preempted

    with pytest.raises(Preempted):  # a preempted run, then its resumption: one wandb run
        train(RegressionTask(signal_at_step=5), OptimConfig(**OPTIM), runtime(log=["wandb"]), tmp_path)
    run_id = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    train(RegressionTask(), OptimConfig(**OPTIM), runtime(log=["wandb"], resume=True), tmp_path)
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == run_id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all(list(run.glob("*.wandb")) for run in runs)  # history files for `wandb sync`


def test_log_wandb_without_wandb_installed_is_one_line_before_the_run_starts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where the extra is not installed
    with pytest.raises(PcdError, match=r"pip install 'pcd-distill\[wandb\]'"):
        train(RegressionTask(), OptimConfig(**OPTIM), runtime(log=["wandb"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
