"""Write-then-rename helpers: a file either has its complete new content or its old one, never half.

A write that fails (a full disk, a quota, an I/O error) removes its temporary file, so a failed run leaves no
debris on a disk that is already full; a full disk becomes the one line `no space left on device while writing
PATH` (a `write()` that hits ENOSPC carries no file name, so the helper that knows the path says it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

from pcd.pipeline.errors import PcdError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def temporary_path(path: Path) -> Path:
    """The name a file is written under before it is renamed into place (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def no_space(path: Path) -> PcdError:
    return PcdError(f"no space left on device while writing {path}")


@contextlib.contextmanager
def failed_write_removes(tmp: Path, path: Path) -> Iterator[None]:
    """Run the writing of `tmp` (to become `path`): on any failure `tmp` is removed, and a full disk is re-raised
    as the one-line PcdError naming `path`."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space(path) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with failed_write_removes(tmp, path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
