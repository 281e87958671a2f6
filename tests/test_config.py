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
