"""pcd: 3D point-cloud pre-training by knowledge distillation from 2D images.

`__version__` is the one place the version is written (pyproject.toml reads it). Importing `pcd` imports no
torch, so stage one and `pcd --version` stay light.
"""

__version__ = "0.1.0"
