"""pcd: 3D point-cloud pre-training by knowledge distillation from 2D images.

`__version__` is the one place the version is written (pyproject.toml reads it). Importing `pcd` imports no
torch, so stage one and `pcd --version` stay light; `pcd.load_backbone` imports it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from pcd.trainer.pretrained import PretrainedBackbone

__version__ = "0.1.0"
__all__ = ["__version__", "load_backbone"]


def load_backbone(path: Union[str, Path], *, device: Any = "cpu", num_heads: Optional[int] = None,
                  num_groups: Optional[int] = None, group_size: Optional[int] = None) -> "PretrainedBackbone":
    """The pre-trained backbone in `path` (a `pcd export` folder or file, or a Point-MAE checkpoint) with its input
    frame and normalisation; `model.encode(points)` gives patch tokens and centres. See `pcd.trainer.pretrained`."""
    from pcd.trainer.pretrained import load_backbone as load

    return load(path, device=device, num_heads=num_heads, num_groups=num_groups, group_size=group_size)
