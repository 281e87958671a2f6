"""Exclusive locks on output folders, so that two runs never write into one folder at once.

A lock is an advisory `flock` on a small file in the folder, held for as long as the run writes there and
released by the kernel when the process ends, however it ends (kill -9 included): a stale lock cannot block
the next run. The lock file itself is left in place on purpose; deleting it would let a third run lock a
fresh file while a second still holds the old one.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

from pcd.pipeline.errors import PcdError


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, command: str, shared: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on `folder`/`name` (creating the folder) for the block; refuse with a one-line
    PcdError naming the folder when another process holds it. `command` says what the other process is.
    `shared`: a lock many holders share (the parts of one job), refused only while someone holds it exclusively."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PcdError(f"{folder}: another {command} is writing there (it holds {name}); wait for it to "
                           "finish or choose another folder") from None
        yield path
