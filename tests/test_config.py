"""Typed configs: presets and overrides reach the right field with the right type, and mistakes are errors."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from pcd.pipeline import config as config_mod
from pcd.pipeline.config import apply_overrides, build_config, config_from_dict, config_to_dict
from pcd.pipeline.errors import PcdError


@dataclass
class Inner:
    depth: int = 12
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    out: Path = Path("out")
    enabled: bool = False
    limit: Optional[int] = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    betas: tuple[float, float] = (0.9, 0.999)
    inner: Inner = field(default_factory=Inner)


def test_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(Outer(), ["inner.depth=2", "inner.rate=1e-3", "enabled=true", "limit=5",
                                    "sizes=[3,4,5]", "out=/tmp/o", "inner.mode=b"])
    assert cfg.inner.depth == 2 and isinstance(cfg.inner.depth, int)
    assert cfg.inner.rate == pytest.approx(1e-3)
    assert cfg.enabled is True and cfg.limit == 5 and cfg.sizes == [3, 4, 5]
    assert cfg.out == Path("/tmp/o") and cfg.inner.mode == "b"
    assert apply_overrides(Outer(limit=3), ["limit=none"]).limit is None
    assert apply_overrides(Outer(), ["betas=0.8,0.99"]).betas == (0.8, 0.99)


@pytest.mark.parametrize("override, words", [
    ("inner.dpeth=2", "unknown config key 'inner.dpeth'"),
    ("inner.depth=2.5", "integer"),
    ("enabled=maybe", "true or false"),
    ("inner.mode=c", "one of a, b"),
    ("nokey", "key=value"),
    ("betas=0.9", r"'betas': \['0.9'\] must have 2 items"),
    ("betas=[0.9,0.99,0.5]", "must have 2 items"),
])
def test_bad_overrides_are_one_line_errors(override, words):
    with pytest.raises(PcdError, match=words):
        apply_overrides(Outer(), [override])


def test_presets_apply_before_overrides(monkeypatch):
    monkeypatch.setattr(config_mod, "load_presets",
                        lambda: {"cmd": {"small": {"inner.depth": 2, "name": "small"}}})
    cfg = build_config(Outer, "cmd", "small", ["name=mine"])
    assert cfg.inner.depth == 2 and cfg.name == "mine"
    with pytest.raises(PcdError, match="unknown preset 'huge'.*small"):
        build_config(Outer, "cmd", "huge")


def test_shipped_presets_parse_and_name_real_fields():
    presets = config_mod.load_presets()
    assert isinstance(presets, dict)
    for command, named in presets.items():
        for name, overrides in named.items():
            assert all(isinstance(k, str) for k in overrides), (command, name)


def test_round_trip_through_dict_is_strict():
    cfg = apply_overrides(Outer(), ["inner.depth=3", "sizes=7,8"])
    assert config_from_dict(Outer, config_to_dict(cfg)) == cfg
    data = config_to_dict(cfg)
    data["inner"]["extra"] = 1
    with pytest.raises(PcdError, match="unknown keys for Inner: extra"):
        config_from_dict(Outer, data)


# --- validation: every setting is checked when the config is built, before the command writes anything ---

@dataclass
class Checked:
    width: int = config_mod.setting(64, config_mod.positive)
    heads: int = config_mod.setting(2, config_mod.positive)
    clip: Optional[float] = config_mod.setting(None, config_mod.positive)

    def validate(self) -> None:
        if self.width % self.heads:
            raise config_mod.InvalidSetting("heads", f"must divide width ({self.width})")


@dataclass
class HoldsChecked:
    model: Checked = field(default_factory=Checked)


@pytest.mark.parametrize("override, message", [
    ("model.width=0", "config key 'model.width': 0 must be a finite number > 0"),
    ("model.clip=nan", "config key 'model.clip': nan must be a finite number > 0"),
    ("model.heads=3", "config key 'model.heads': 3 must divide width (64)"),
])
def test_field_rules_and_validate_hooks_name_the_dotted_key(override, message):
    assert apply_overrides(HoldsChecked(), ["model.clip=none", "model.heads=4"]).model.heads == 4
    with pytest.raises(PcdError) as caught:
        apply_overrides(HoldsChecked(), [override])
    assert str(caught.value) == message
    with pytest.raises(PcdError, match="'model.width'"):
        config_from_dict(HoldsChecked, {"model": {"width": -1, "heads": 2, "clip": None}})


def test_every_shipped_preset_passes_validation():
    import importlib
    import inspect
    import re

    import pcd.cli

    # command name -> module, as the CLI pairs them in its run_command(...) calls
    pairs = re.findall(r'run_command\(\s*"([\w.]+)",\s*"([\w-]+)"', inspect.getsource(pcd.cli))
    modules = {command: module for module, command in pairs}
    # the fine-tune and evaluation commands the CLI generates from the task registry
    from pcd.trainer.tasks import TASKS, evaluate_command, finetune_command
    for task, entry in TASKS.items():
        modules[finetune_command(task)] = entry.finetune
        modules[evaluate_command(task)] = entry.evaluate
    for command, named in config_mod.load_presets().items():
        assert command in modules, f"presets for '{command}', which no CLI command builds"
        for name in named:
            build_config(importlib.import_module(modules[command]).Config, command, name)


BAD_SETTINGS = [  # (command line with {run} for the folder it would create, the key the error must name)
    (["pretrain", "shards", "{run}", "--preset", "tiny", "--set", "optim.epochs=0"], "optim.epochs"),
    (["pretrain", "shards", "{run}", "--set", "optim.batch_size=0"], "optim.batch_size"),
    (["pretrain", "shards", "{run}", "--preset", "tiny", "--set", "model.group_size=600"], "model.group_size"),
    (["pretrain", "shards", "{run}", "--set", "optim.lr=0"], "optim.lr"),
    (["pretrain", "shards", "{run}", "--set", "optim.lr=inf"], "optim.lr"),
    (["pretrain", "shards", "{run}", "--set", "optim.lr=nan"], "optim.lr"),
    (["pretrain", "shards", "{run}", "--set", "model.num_heads=0"], "model.num_heads"),
    (["pretrain", "shards", "{run}", "--set", "model.num_heads=5"], "model.num_heads"),
    (["pretrain", "shards", "{run}", "--set", "runtime.workers=-1"], "runtime.workers"),
    (["pretrain", "shards", "{run}", "--set", "optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["pretrain", "shards", "{run}", "--preset", "tiny", "--set", "optim.warmup_epochs=6"], "optim.warmup_epochs"),
    (["pretrain", "shards", "{run}", "--set", "distill.num_concepts=0"], "distill.num_concepts"),
    (["cache-teacher", "extracted", "{run}", "--batch-size", "0"], "batch_size"),
    (["extract-scannet", "scans", "{run}", "--points", "0"], "points"),
    (["finetune", "detection", "data", "{run}", "--set", "optim.epochs=-3"], "optim.epochs"),
    (["finetune", "detection", "data", "{run}", "--set", "model.decoder_heads=3"], "model.decoder_heads"),
    (["prepare", "scannet-detection", "scans", "{run}", "--workers", "0"], "workers"),
    (["generate-scenes", "{run}", "--frames", "0"], "num_frames"),
    (["evaluate", "detection", "{run}", "--passes", "0"], "passes"),
]


@pytest.mark.parametrize("argv, key", BAD_SETTINGS, ids=[" ".join(a[-2:]) for a, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_before_the_run_folder_exists(tmp_path, capsys, argv, key):
    from pcd.cli import main

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main([arg.format(run=run) for arg in argv])
    assert exited.value.code == 2
    line = " ".join(capsys.readouterr().err.split())
    assert line.startswith(f"error: config key '{key}': ")
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_command_configs_record_absolute_paths(tmp_path, monkeypatch) -> None:
    """A run folder's config.json must name the same files from any directory (evaluate, show, --resume)."""
    from pcd.pipeline.config import command_config
    from pcd.trainer.detection.config import Config as DetectionConfig

    monkeypatch.chdir(tmp_path)
    cfg = command_config(DetectionConfig, "finetune-detection", "tiny",
                         {"data_dir": Path("scannet"), "run_dir": Path("runs/det"), "init": Path("runs/pre/export"),
                          "train_split": None}, ["val_split=scans/val.txt"])
    assert cfg.data_dir == tmp_path / "scannet" and cfg.run_dir == tmp_path / "runs" / "det"
    assert cfg.init == tmp_path / "runs" / "pre" / "export" and cfg.val_split == tmp_path / "scans" / "val.txt"
    assert cfg.train_split is None
