"""One interface over a ScanNet scan, whether it is a `.sens` file or an exported frame folder.

Accepted layouts for a scene folder `<scene_dir>` (scene name = folder name), tried in this order:

1. `<scene_dir>/<name>.sens` (the ScanNet release).
2. An exported folder: `<scene_dir>` itself, or `<scene_dir>/exported/`, holding `color/<i>.jpg`,
   `depth/<i>.png` (16-bit), `pose/<i>.txt` (4x4 camera-to-world, may be `-inf`) and
   `intrinsic/intrinsic_depth.txt` + `intrinsic/intrinsic_color.txt` (4x4), as written by ScanNet's official
   Python exporter (`reader.py`). Indices may be sparse: the exporter names files by the original frame index.
   Exported depth PNGs carry no depth shift; ScanNet's is always 1000 (values in mm), so 1000 is assumed.
   Note that the official exporter re-encodes colour JPEGs; the bytes given here are the files' bytes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import cv2
import numpy as np

from pcd.pipeline.atomic import temporary_path
from pcd.pipeline.errors import PcdError
from pcd.pipeline.sens import SensReader, decode_depth, image_size

EXPORTED_DEPTH_SHIFT = 1000.0
EXPORTED_SUBDIRS = ("color", "depth", "pose", "intrinsic")


@dataclass
class ScanFrame:
    """One RGB-D frame: pose and original JPEG bytes now, depth decoded only when asked for."""

    index: int
    pose: np.ndarray  # (4, 4) float32 camera-to-world, may contain -inf
    color_jpeg: bytes
    _load_depth: Callable[[], np.ndarray] = field(repr=False)

    def depth(self) -> np.ndarray:
        """uint16 (H, W) depth in units of 1/depth_shift metres; 0 = no measurement."""
        return self._load_depth()


class ScanSource:
    """A scan's calibration and a stream of its frames. Use as a context manager."""

    name: str
    source_file: str
    depth_intrinsics: np.ndarray  # (3, 3) float32
    color_intrinsics: np.ndarray  # (3, 3) float32
    depth_shift: float
    depth_size: tuple[int, int]  # (W, H)
    color_size: tuple[int, int]  # (W, H)
    num_frames: int

    def iter_frames(self, keep: Callable[[int], bool] | None = None) -> Iterator[ScanFrame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (nothing to do for sources that open files per frame)."""

    def __enter__(self) -> "ScanSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SensScanSource(ScanSource):
    """A scan stored as `<name>.sens`, streamed frame by frame."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.source_file = str(path)
        self._reader = SensReader(path)
        header = self._reader.header
        self._header = header
        self.depth_intrinsics = np.ascontiguousarray(header.intrinsic_depth[:3, :3], dtype=np.float32)
        self.color_intrinsics = np.ascontiguousarray(header.intrinsic_color[:3, :3], dtype=np.float32)
        self.depth_shift = float(header.depth_shift)
        self.depth_size = (header.depth_width, header.depth_height)
        self.color_size = (header.color_width, header.color_height)
        self.num_frames = header.num_frames

    def iter_frames(self, keep: Callable[[int], bool] | None = None) -> Iterator[ScanFrame]:
        header, where = self._header, f"scene {self.name} ({self.source_file})"
        for frame in self._reader.iter_frames(keep):
            data = frame.depth_bytes
            load = (lambda data=data, i=frame.index: decode_depth(data, header, f"{where} frame {i}"))
            yield ScanFrame(frame.index, frame.camera_to_world, frame.color_bytes, load)

    def close(self) -> None:
        self._reader.close()


def _frame_indices(folder: Path, suffix: str, scene: str) -> set[int]:
    indices = set()
    for path in folder.iterdir():
        if path.suffix != suffix or path.name.startswith("."):
            continue
        if not path.stem.isdigit():
            raise PcdError(f"scene {scene}: unexpected file {path} (exported frames are named <index>{suffix})")
        indices.add(int(path.stem))
    return indices


def _load_matrix(path: Path, scene: str, what: str) -> np.ndarray:
    if not path.is_file():
        raise PcdError(f"scene {scene}: missing {what} file {path}")
    try:
        matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise PcdError(f"scene {scene}: cannot parse {what} file {path} ({exc})") from None
    if matrix.shape != (4, 4):
        raise PcdError(f"scene {scene}: {what} file {path} holds a {matrix.shape} matrix, expected 4x4")
    return matrix.astype(np.float32)


class ExportedScanSource(ScanSource):
    """A scan exported to color/ depth/ pose/ intrinsic/ folders (see the module docstring)."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.source_file = str(folder)
        self._folder = folder
        self.depth_intrinsics = _load_matrix(folder / "intrinsic" / "intrinsic_depth.txt", name,
                                             "depth intrinsics")[:3, :3].copy()
        self.color_intrinsics = _load_matrix(folder / "intrinsic" / "intrinsic_color.txt", name,
                                             "colour intrinsics")[:3, :3].copy()
        self.depth_shift = EXPORTED_DEPTH_SHIFT
        try:
            colors = _frame_indices(folder / "color", ".jpg", name)
            depths = _frame_indices(folder / "depth", ".png", name)
            poses = _frame_indices(folder / "pose", ".txt", name)
        except OSError as exc:
            raise PcdError(f"scene {name}: cannot read exported folder {folder} ({exc})") from None
        for what, have, file_name in (("depth", depths, "depth/{}.png"), ("pose", poses, "pose/{}.txt")):
            missing = sorted(colors - have) or sorted(have - colors)
            if missing:
                i = missing[0]
                raise PcdError(f"scene {name}: frame {i} is incomplete in {folder} (color/{i}.jpg and "
                               f"{file_name.format(i)} must both exist; {len(missing)} such frame(s))")
        if not colors:
            raise PcdError(f"scene {name}: exported folder {folder} holds no frames")
        self._indices = sorted(colors)
        self.num_frames = len(self._indices)
        first = self._indices[0]
        depth = self._read_depth(first, check_size=False)
        self.depth_size = (depth.shape[1], depth.shape[0])
        color = cv2.imread(str(folder / "color" / f"{first}.jpg"), cv2.IMREAD_COLOR)
        if color is None:
            raise PcdError(f"scene {name} frame {first}: corrupt colour image {folder / 'color' / f'{first}.jpg'}")
        self.color_size = (color.shape[1], color.shape[0])

    def _read_depth(self, index: int, check_size: bool = True) -> np.ndarray:
        path = self._folder / "depth" / f"{index}.png"
        if check_size:  # refuse from the header, before decoding: a small PNG can claim gigapixels
            size = image_size(path, "PNG")
            if size is not None and size != self.depth_size:
                raise PcdError(f"scene {self.name} frame {index}: depth {path} is {size[0]}x{size[1]}, "
                               f"other frames are {self.depth_size[0]}x{self.depth_size[1]}")
        depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if depth is None or depth.dtype != np.uint16 or depth.ndim != 2:
            kind = "unreadable" if depth is None else f"{depth.dtype} with shape {depth.shape}"
            raise PcdError(f"scene {self.name} frame {index}: depth {path} is not a 16-bit grey PNG ({kind})")
        if check_size and (depth.shape[1], depth.shape[0]) != self.depth_size:
            raise PcdError(f"scene {self.name} frame {index}: depth {path} is {depth.shape[1]}x{depth.shape[0]}, "
                           f"other frames are {self.depth_size[0]}x{self.depth_size[1]}")
        return depth

    def iter_frames(self, keep: Callable[[int], bool] | None = None) -> Iterator[ScanFrame]:
        for index in self._indices:
            if keep is not None and not keep(index):
                continue
            color_path = self._folder / "color" / f"{index}.jpg"
            try:
                color = color_path.read_bytes()
            except OSError as exc:
                raise PcdError(f"scene {self.name} frame {index}: cannot read {color_path} ({exc.strerror})") from None
            pose = _load_matrix(self._folder / "pose" / f"{index}.txt", self.name, f"frame {index} pose")
            yield ScanFrame(index, pose, color, lambda i=index: self._read_depth(i))


def _is_exported(folder: Path) -> bool:
    return all((folder / sub).is_dir() for sub in EXPORTED_SUBDIRS)


def open_scan(scene_dir: Path, layout: Literal["auto", "sens", "exported"] = "auto") -> ScanSource:
    """The scan in `scene_dir`: its `<name>.sens` if present, else its exported folder (see module docstring).

    `layout` forces one of the two (e.g. to read the exported copy of a scene that also has a .sens).
    """
    scene_dir = Path(scene_dir)
    name = scene_dir.name
    if not scene_dir.is_dir():
        raise PcdError(f"scene {name}: {scene_dir} is not a folder")
    sens = scene_dir / f"{name}.sens"
    if layout != "exported" and sens.is_file():
        return SensScanSource(name, sens)
    if layout != "sens":
        for folder in (scene_dir, scene_dir / "exported"):
            if _is_exported(folder):
                return ExportedScanSource(name, folder)
    wanted = {"auto": f"no {sens.name} and no exported folder (color/, depth/, pose/, intrinsic/)",
              "sens": f"no {sens.name}", "exported": "no exported folder (color/, depth/, pose/, intrinsic/)"}
    raise PcdError(f"scene {name}: {wanted[layout]} in {scene_dir}")


def _format_matrix(matrix: np.ndarray) -> bytes:
    """Rows of a 4x4 matrix as text; '%.9g' round-trips float32 exactly and writes '-inf' as np.loadtxt reads it."""
    rows = np.asarray(matrix, dtype=np.float32).reshape(4, 4)
    return "".join(" ".join(f"{float(v):.9g}" for v in row) + "\n" for row in rows).encode()


def write_exported(folder: Path, intrinsic_depth: np.ndarray, intrinsic_color: np.ndarray,
                   frames: Iterable[tuple[int, np.ndarray, bytes, np.ndarray]]) -> None:
    """Write frames `(index, camera_to_world, jpeg bytes, uint16 depth)` in the official exporter's layout.

    Unlike the official exporter the JPEG bytes are copied, not re-encoded, and poses keep full float32
    precision. The folder is built under a temporary name and renamed into place, replacing an older one.
    """
    folder = Path(folder)
    tmp = temporary_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in EXPORTED_SUBDIRS:
            (tmp / sub).mkdir(parents=True)
        identity = np.eye(4, dtype=np.float32)
        for file_name, matrix in (("intrinsic_depth.txt", intrinsic_depth), ("intrinsic_color.txt", intrinsic_color),
                                  ("extrinsic_depth.txt", identity), ("extrinsic_color.txt", identity)):
            (tmp / "intrinsic" / file_name).write_bytes(_format_matrix(matrix))
        for index, pose, jpeg, depth in frames:
            (tmp / "color" / f"{index}.jpg").write_bytes(jpeg)
            (tmp / "pose" / f"{index}.txt").write_bytes(_format_matrix(pose))
            if depth.dtype != np.uint16 or not cv2.imwrite(str(tmp / "depth" / f"{index}.png"), depth):
                raise ValueError(f"cannot write 16-bit depth PNG for frame {index} in {folder}")
        if folder.exists():
            foreign = sorted(p.name for p in folder.iterdir() if p.name not in EXPORTED_SUBDIRS)
            if foreign:
                raise ValueError(f"refusing to replace {folder}: it holds more than an export ({foreign[0]})")
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_sens(sens_path: Path, folder: Path, keep: Callable[[int], bool] | None = None) -> None:
    """Export a `.sens` file (frames passing `keep`) to an exported folder, streaming one frame at a time."""
    with SensReader(sens_path) as reader:
        header = reader.header
        frames = ((f.index, f.camera_to_world, f.color_bytes,
                   decode_depth(f.depth_bytes, header, f"{sens_path} frame {f.index}"))
                  for f in reader.iter_frames(keep))
        write_exported(folder, header.intrinsic_depth, header.intrinsic_color, frames)
