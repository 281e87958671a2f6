"""A short folder for multiprocessing's sockets when $TMPDIR is long.

Python before 3.13 creates the AF_UNIX sockets of its worker machinery (forkserver, the fd passing of torch's
DataLoader workers, managers) under `$TMPDIR/pymp-XXXXXXXX/`. With a TMPDIR longer than about 75 bytes (SLURM job
folders, CI runners) a socket path passes the kernel's limit: a worker pool fails with "AF_UNIX path too long" and a
DataLoader worker hangs for ever. Like CPython 3.13's own fix, pcd then puts that folder under /tmp.
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
import tempfile
from typing import Optional

SOCKET_PATH_MAX = 103  # bytes of a socket path: Linux allows 107, macOS 103
SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")
FALLBACK = "/tmp"


def fits(folder: str) -> bool:
    """Whether multiprocessing's socket paths under `folder` stay within the limit."""
    return len(os.fsencode(folder)) + SOCKET_SUFFIX <= SOCKET_PATH_MAX


def ensure_short_socket_folder() -> Optional[str]:
    """Call before any worker starts. When TMPDIR is too long for socket paths, create this process's
    multiprocessing folder under /tmp (forked workers inherit it); returns that folder, or None when nothing
    had to change."""
    if sys.platform == "win32" or fits(tempfile.gettempdir()) or not os.access(FALLBACK, os.W_OK):
        return None
    saved = tempfile.tempdir
    tempfile.tempdir = FALLBACK
    try:
        return multiprocessing.util.get_temp_dir()  # created once per process, cached, removed at exit
    finally:
        tempfile.tempdir = saved
