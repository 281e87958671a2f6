"""Typed command configs: one dataclass per command, named presets, and `--set key=value` overrides.

Dataclass defaults are the paper's settings. Named presets (``manifests/presets.toml``) are sets of
overrides on top of them, kept in one file so that every preset of every command can be read in one place.
Nested dataclasses are addressed with dots (``model.depth=2``). Unknown keys and ill-typed values are
errors, never silently ignored: a typo in an override must not train the wrong model for a week.

Validation (one mechanism for every command). Every config that `build_config`, `command_config`,
`apply_overrides` or `config_from_dict` hands out has passed `validate_config`, so a nonsense setting is a
one-line `PcdError` naming its key before the command writes anything. A config dataclass declares:

- per-field rules next to the field, with `setting(default, *checks)` (a `dataclasses.field` whose metadata
  holds the checks; None values are not checked)::

      @dataclass
      class OptimConfig:
          lr: float = setting(1e-3, positive)
          epochs: int = setting(250, positive)
          grad_clip: Optional[float] = setting(None, positive)   # None: no clipping, else > 0

  A check is any function `value -> reason or None`; `positive`, `non_negative` and `fraction` (0 <= x < 1)
  cover most fields, `each(check)` applies one to every item of a list or tuple.
- rules that tie several fields together in a `validate(self)` method that raises
  `InvalidSetting(key, reason)`, `key` relative to that dataclass (nested keys with dots)::

      def validate(self) -> None:
          if self.trans_dim % self.num_heads:
              raise InvalidSetting("num_heads", f"must divide trans_dim ({self.trans_dim})")

Fields are checked first, then nested dataclasses (depth first), then the dataclass's own `validate`, so a
`validate` may assume its fields each pass their own checks. The error reads
``config key 'optim.warmup_epochs': 300.0 must not exceed epochs (250)``. A command's config that nests the
shared ones (OptimConfig, RuntimeConfig, BackboneConfig) inherits their rules; rules across its nested configs
go in its own `validate`, e.g. `pcd.trainer.pretrain.Config` (the backbone's groups must fit in num_points).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, TypeVar

from pcd.pipeline.errors import PcdError

T = TypeVar("T")

PRESETS_RESOURCE = "presets.toml"

Check = Callable[[Any], Optional[str]]  # a field's rule: why `value` is wrong, or None when it is fine
CHECKS_METADATA = "pcd_checks"


class InvalidSetting(Exception):
    """Raised by a config dataclass's `validate()`: `key` (relative to that dataclass) is wrong because `reason`."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def setting(default: Any, *checks: Check) -> Any:
    """A dataclass field with `default` and the `checks` `validate_config` applies to its value (not to None)."""
    return dataclasses.field(default=default, metadata={CHECKS_METADATA: checks})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(value: Any) -> Optional[str]:
    return None if _is_number(value) and value > 0 else "must be a finite number > 0"


def non_negative(value: Any) -> Optional[str]:
    return None if _is_number(value) and value >= 0 else "must be a finite number >= 0"


def fraction(value: Any) -> Optional[str]:
    return None if _is_number(value) and 0 <= value < 1 else "must be in [0, 1)"


def each(check: Check) -> Check:
    """Apply `check` to every item of a list or tuple field (e.g. betas)."""
    def check_items(values: Any) -> Optional[str]:
        return next((f"item {v!r} {reason}" for v in values if (reason := check(v))), None)
    return check_items


def validate_config(cfg: T) -> T:
    """Check every field's rules and every `validate()` hook of `cfg` and its nested configs; returns `cfg`.

    Raises PcdError("config key 'a.b': VALUE REASON") for the first problem found.
    """
    _validate(cfg, "")
    return cfg


def _validate(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        for check in f.metadata.get(CHECKS_METADATA, ()):
            reason = check(value)
            if reason:
                raise PcdError(f"config key '{prefix}{f.name}': {value!r} {reason}")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _validate(value, f"{prefix}{f.name}.")
    hook = getattr(obj, "validate", None)
    if callable(hook):
        try:
            hook()
        except InvalidSetting as exc:
            key = f"{prefix}{exc.key}"
            owner, name = _owner(obj, exc.key) if exc.key else (obj, "")
            value = getattr(owner, name) if name else obj
            raise PcdError(f"config key '{key}': {value!r} {exc.reason}") from None


def load_presets() -> dict[str, dict[str, dict[str, Any]]]:
    """All named presets, as {command: {preset name: {dotted key: value}}}."""
    text = resources.files("pcd.manifests").joinpath(PRESETS_RESOURCE).read_text()
    raw = tomllib.loads(text)
    return {command: {name: _flatten(table) for name, table in presets.items()} for command, presets in raw.items()}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def build_config(cls: type[T], command: str, preset: str | None = None, overrides: Sequence[str] = ()) -> T:
    """The config for `command`: dataclass defaults, then the named preset, then each `key=value` override."""
    return validate_config(_overridden(_preset_config(cls, command, preset), overrides))


def _preset_config(cls: type[T], command: str, preset: str | None) -> T:
    cfg = cls()
    if preset:
        presets = load_presets().get(command, {})
        if preset not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise PcdError(f"unknown preset '{preset}' (the presets of [{command}.*] in manifests/presets.toml: {known})")
        for key, value in presets[preset].items():
            set_field(cfg, key, value)
    return cfg


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Apply command-line `key=value` overrides, each parsed by the type of the field it sets; then validate."""
    return validate_config(_overridden(cfg, overrides))


def _overridden(cfg: T, overrides: Sequence[str]) -> T:
    for item in overrides:
        if "=" not in item:
            raise PcdError(f"override '{item}' is not of the form key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        set_field(cfg, key, parse_value(field_type(cfg, key), text, key))
    return cfg


def command_config(cls: type[T], command: str, preset: str | None, fields: dict[str, Any],
                   overrides: Sequence[str] = ()) -> T:
    """A command's config: defaults, then `preset`, then the command's own options (`fields`; None keeps the
    value before it), then `--set` overrides; validated once all are applied. The CLI and the demo both build
    configs through here."""
    cfg = _preset_config(cls, command, preset)
    for key, value in fields.items():
        if value is not None:
            set_field(cfg, key, value)
    return validate_config(absolute_paths(_overridden(cfg, overrides)))


def absolute_paths(cfg: T) -> T:
    """Every path of a command's config made absolute (against the working directory, as the command would read
    it anyway), so that the config.json a run records still names the same files from any other directory."""
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if isinstance(value, Path):
            setattr(cfg, f.name, value.absolute())
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(cfg, f.name, [v.absolute() for v in value])
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            absolute_paths(value)
    return cfg


def field_type(cfg: Any, dotted: str) -> Any:
    owner, name = _owner(cfg, dotted)
    return typing.get_type_hints(type(owner))[name]


def _owner(cfg: Any, dotted: str) -> tuple[Any, str]:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            where = ".".join(parts[:i]) or type(cfg).__name__
            known = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else "none"
            raise PcdError(f"unknown config key '{dotted}' ('{part}' is not a field of {where}; fields: {known})")
        if i == len(parts) - 1:
            return obj, part
        obj = getattr(obj, part)
    raise AssertionError("unreachable")


def set_field(cfg: Any, dotted: str, value: Any) -> None:
    """Set a (possibly nested) field, checking the value against the field's type."""
    owner, name = _owner(cfg, dotted)
    hint = typing.get_type_hints(type(owner))[name]
    setattr(owner, name, coerce(hint, value, dotted))


def parse_value(hint: Any, text: str, key: str) -> Any:
    """Parse command-line text for a field of type `hint`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if _is_optional(hint):
        if text.lower() in ("none", "null", ""):
            return None
        return parse_value(next(a for a in args if a is not type(None)), text, key)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise PcdError(f"config key '{key}' takes true or false, not '{text}'")
    if origin in (list, tuple) or hint in (list, tuple):
        try:
            value = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
        except json.JSONDecodeError as exc:
            raise PcdError(f"config key '{key}': '{text}' is not a list ({exc.msg})") from None
        return coerce(hint, value, key)
    if hint in (int, float, str, Path) or origin is Literal:
        return coerce(hint, text, key)
    raise PcdError(f"config key '{key}' cannot be set from the command line")


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check (and convert where lossless) `value` to the field type `hint`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if _is_optional(hint):
        return None if value is None else coerce(next(a for a in args if a is not type(None)), value, key)
    try:
        if origin is Literal:
            if value not in args:
                raise ValueError(f"must be one of {', '.join(map(str, args))}")
            return value
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            return value
        if hint is int:
            number = _number(value, "must be an integer")
            if not float(number).is_integer():
                raise ValueError("must be an integer")
            return int(number)
        if hint is float:
            return float(_number(value, "must be a number"))
        if hint is str:
            return str(value)
        if hint is Path:
            return Path(value)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError("must be a list")
            if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, e.g. betas: tuple[float, float]
                if len(value) != len(args):
                    raise ValueError(f"must have {len(args)} items")
                return tuple(coerce(inner, v, key) for inner, v in zip(args, value))
            inner = args[0] if args else Any
            items = [coerce(inner, v, key) if inner is not Any else v for v in value]
            return tuple(items) if origin is tuple else items
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            return _from_dict(hint, value)
    except (TypeError, ValueError) as exc:
        raise PcdError(f"config key '{key}': {value!r} {exc}") from None
    return value


def _number(value: Any, message: str) -> int | float:
    if isinstance(value, bool):
        raise ValueError(message)
    if isinstance(value, (int, float)):
        return value
    try:
        return int(value) if str(value).lstrip("+-").isdigit() else float(value)
    except (TypeError, ValueError):
        raise ValueError(message) from None


def _is_optional(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (Paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config saved by `config_to_dict`, strictly: unknown or missing keys are errors; then validate."""
    return validate_config(_from_dict(cls, data))


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise PcdError(f"unknown keys for {cls.__name__}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise PcdError(f"config key '{name}': {value!r} must be a table of {hint.__name__} settings")
            kwargs[name] = _from_dict(hint, value)
        else:
            kwargs[name] = coerce(hint, value, name)
    return cls(**kwargs)
