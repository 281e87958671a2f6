"""Make `open_clip` (and through it torchvision, timm, transformers' GPT-2) importable on any torch install.

Some machines pair a CPU build of torch with a CUDA build of torchvision, whose compiled ops then fail to
load; torchvision's import still registers fake kernels for `torchvision::nms`, which raises
"operator torchvision::nms does not exist". Defining the two op schemas before the (re-)import fixes that.
The shim applies only after that exact failure, so a normal matching install is untouched.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional

import torch

# Kept alive for the life of the process: the op definitions vanish when the Library object is collected.
_TORCHVISION_LIBRARY: Optional[torch.library.Library] = None


def _define_torchvision_ops() -> None:
    global _TORCHVISION_LIBRARY
    if _TORCHVISION_LIBRARY is not None:
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIBRARY = library


def _purge(prefixes: tuple[str, ...]) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in prefixes]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """`import torchvision`, defining its op schemas first when its compiled ops cannot load."""
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _purge(("torchvision",))
        _define_torchvision_ops()
        import torchvision
    return torchvision


def import_open_clip() -> ModuleType:
    """`import open_clip` through the torchvision shim; every pcd module that needs open_clip calls this."""
    import_torchvision()
    import open_clip

    return open_clip
