"""File handling shared by the object datasets (ModelNet40, ScanObjectNN, ShapeNetPart): checked reads of the
releases' text, list and HDF5 files, and pcd's own point caches (npy, written atomically, built in parallel).

Numpy only (no torch): the readers are plain map-style datasets that the fine-tunes wrap.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import h5py
import numpy as np
from rich.progress import Progress

from pcd.pipeline.atomic import temporary_path
from pcd.pipeline.errors import PcdError

T = TypeVar("T")
R = TypeVar("R")

@dataclass(frozen=True)
class Frame:
    """How a dataset's points are oriented and scaled as its reader returns them (the files' own frame)."""

    up_axis: str  # "y" for ModelNet40, ScanObjectNN and ShapeNetPart
    normalized: bool  # whether Point-MAE's recipe centres each shape and scales it to the unit sphere


# Version of pcd's cache contents: part of every cache file name, so a change of recipe never reuses old files.
CACHE_VERSION = 1


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a file, else a one-line PcdError naming it and what it should be."""
    if not path.is_file():
        raise PcdError(f"{path}: missing ({what})")
    return path


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty, stripped lines of a list file (split lists, class names)."""
    try:
        text = require_file(path, what).read_text()
    except UnicodeDecodeError:
        raise PcdError(f"{path}: not a text file ({what})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_json_list(path: Path, what: str) -> list[str]:
    try:
        entries = json.loads(require_file(path, what).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PcdError(f"{path}: not valid JSON ({what}): {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise PcdError(f"{path}: expected a JSON list of strings ({what})")
    return entries


def read_point_text(path: Path, delimiter: str | None, columns: int) -> np.ndarray:
    """A point file of `columns` numbers per line as float32 (N, columns); bad content is a PcdError naming it."""
    try:
        rows = np.loadtxt(path, delimiter=delimiter, dtype=np.float32, ndmin=2)
    except FileNotFoundError:
        raise PcdError(f"{path}: missing (point file listed in the split)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PcdError(f"{path}: not a point file of {columns} numbers per line ({' '.join(str(exc).split())})") \
            from None
    if rows.shape[1] != columns or rows.shape[0] == 0:
        raise PcdError(f"{path}: expected {columns} numbers per line, found {rows.shape[1]} on {rows.shape[0]} lines")
    if not np.isfinite(rows).all():
        raise PcdError(f"{path}: contains NaN or infinite values")
    return rows


def read_h5(path: Path, keys: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The named datasets of an HDF5 file, read whole; a missing file or key is a PcdError naming the file."""
    require_file(path, what)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise PcdError(f"{path}: no '{missing[0]}' dataset (has: {', '.join(sorted(f.keys())) or 'none'})")
            return {k: np.asarray(f[k]) for k in keys}
    except OSError as exc:
        raise PcdError(f"{path}: not a readable HDF5 file ({' '.join(str(exc).split())})") from None


def check_labels(labels: np.ndarray, count: int, where: Path) -> np.ndarray:
    """Labels as int64 (N,), each in 0..count-1; otherwise a PcdError naming the file and the first bad one."""
    flat = np.asarray(labels).reshape(len(labels), -1)
    if flat.shape[1] != 1:
        raise PcdError(f"{where}: expected one label per shape, got shape {np.asarray(labels).shape}")
    flat = flat[:, 0]
    if flat.dtype.kind == "f" and not np.array_equal(flat, np.round(flat)):
        raise PcdError(f"{where}: labels are not integers")
    out = flat.astype(np.int64)
    bad = np.flatnonzero((out < 0) | (out >= count))
    if bad.size:
        raise PcdError(f"{where}: label {out[bad[0]]} of shape {bad[0]} is out of range 0..{count - 1}")
    return out


def cache_name(prefix: str, keys: Sequence[Any]) -> str:
    """`<prefix>_<hash>.npy`: the hash covers the shape list and the recipe, so a changed split or setting gets a
    new file instead of silently reusing one built from other shapes."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *keys], default=str).encode()).hexdigest()[:12]
    return f"{prefix}_{digest}.npy"


@contextmanager
def atomic_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> Iterator[np.ndarray]:
    """A writable memory-mapped .npy of `shape`, filled by the caller under a temporary name and renamed into
    place only when the block finishes: the cache is never seen half written, and it never has to fit in RAM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> np.ndarray | None:
    """A cache file memory-mapped read-only, or None when absent or not of the expected shape and type."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None
    return array if array.shape == shape and array.dtype == np.dtype(dtype) else None


class MappedState:
    """Pickling support for datasets holding memory-mapped caches: a spawned loader worker reopens the file
    instead of receiving a pickled copy of a gigabyte of points."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, np.memmap):
                state[key] = ("__mapped__", str(value.filename), value.offset, value.shape, value.dtype.str)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if isinstance(value, tuple) and len(value) == 5 and value[0] == "__mapped__":
                _, filename, offset, shape, dtype = value
                state[key] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1) - 1)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, description: str,
                 show_progress: bool) -> Iterator[tuple[int, R]]:
    """(index, fn(item)) for every item, in order, on `workers` processes (0: in this process), with a bar."""
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        if workers <= 0 or len(items) <= 1:
            for i, item in enumerate(items):
                yield i, fn(item)
                progress.advance(task)
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, result in enumerate(pool.map(fn, items, chunksize=max(1, min(64, len(items) // (8 * workers))))):
                yield i, result
                progress.advance(task)
