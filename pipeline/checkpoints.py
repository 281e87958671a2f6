"""Reading weight files safely and loading them strictly.

Every checkpoint is read without unpickling arbitrary objects (`weights_only=True`, or safetensors), except
OpenAI's original CLIP file, which is a TorchScript archive and can only be read by `torch.jit.load`.
Loading is strict: a missing, unexpected or mis-shaped key is an error naming the key and the file, so a
wrong checkpoint can never silently produce a half-random teacher.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from pcd.pipeline.errors import PcdError, torch_load_reason


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files holding compiled code next to the tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a `.pt`/`.pth`/`.bin` (torch), `.safetensors` or TorchScript file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise PcdError(f"{path}: {what} checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif is_torchscript_archive(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except PcdError:
        raise
    except Exception as exc:  # any reader failure means the file is not a usable checkpoint
        raise PcdError(f"{path}: not a readable {what} checkpoint ({torch_load_reason(exc)})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PcdError(f"{path}: not a {what} state dict (expected a mapping of names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str,
                droppable: Callable[[str], bool] = lambda key: False) -> None:
    """Copy `state` into `module`, refusing any key that is missing, unexpected or of another shape.

    `droppable` names checkpoint keys that are known not to be weights (e.g. old GPT-2 attention masks).
    Keys naming the module's non-persistent buffers (constants it rebuilds itself, such as a causal mask
    that TorchScript tracing saves) are dropped too.
    """
    expected = module.state_dict()
    rebuilt = {name for name, _ in module.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k in expected or not (k in rebuilt or droppable(k))}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise PcdError(f"{path}: unexpected key '{unexpected[0]}' for a {what} checkpoint"
                       f"{_more(unexpected)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PcdError(f"{path}: missing key '{missing[0]}' for a {what} checkpoint{_more(missing)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise PcdError(f"{path}: key '{key}' has shape {list(tensor.shape)}, "
                           f"a {what} needs {list(expected[key].shape)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
