"""Generated object datasets shared by the data tests (the `tiny` preset of `pcd generate-shapes`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pcd.pipeline.config import build_config
from pcd.pipeline.synthetic_shapes import Config, generate


def tiny_shapes(out_dir: Path, **changes: object) -> dict[str, Path]:
    """Write the tiny preset's datasets into `out_dir`; returns {dataset: folder}."""
    cfg = dataclasses.replace(build_config(Config, "generate-shapes", "tiny"), out_dir=Path(out_dir), **changes)
    return generate(cfg)
