"""Split files (ScanNet's `scannetv2_*.txt`): one reader for every command that takes one."""

from __future__ import annotations

from pathlib import Path

from pcd.pipeline.errors import PcdError


def read_split(path: Path) -> list[str]:
    """Scene ids of a split file, in file order: one per line; blank lines and '#' comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise PcdError(f"{path}: split file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PcdError(f"{path}: cannot read split file ({exc})") from None
    scenes = [line.split("#", 1)[0].strip() for line in lines]
    scenes = [scene for scene in scenes if scene]
    if not scenes:
        raise PcdError(f"{path}: split file names no scenes")
    return scenes
