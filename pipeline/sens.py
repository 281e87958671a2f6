"""Streaming reader and writer for ScanNet `.sens` files (version 4).

The official reader loads every compressed frame of a scan into memory (hundreds of MB to GB per scan) and
only runs on Python 2. This one reads the header, then one 96-byte frame header at a time, and reads the
colour/depth payloads only of the frames the caller keeps; the others are skipped with a seek. Memory is
therefore about one frame whatever the file size. All struct formats are explicit little-endian, as the
files are written by x86 `ostream::write`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import cv2
import numpy as np
from PIL import Image

from pcd.pipeline.atomic import temporary_path
from pcd.pipeline.errors import PcdError

SENS_VERSION = 4
COLOR_JPEG = 2
DEPTH_ZLIB = 1
COLOR_COMPRESSION_NAMES = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION_NAMES = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}

_MATRIX = struct.Struct("<16f")
_HEADER_TAIL = struct.Struct("<iiIIIIfQ")  # compressions, colour w/h, depth w/h, depth shift, frame count
_FRAME_HEADER = struct.Struct("<16fQQQQ")  # pose, timestamps colour/depth, payload sizes colour/depth
FRAME_HEADER_SIZE = _FRAME_HEADER.size  # 96
_PAYLOAD_SIZES = struct.Struct("<QQ")  # the last 16 bytes of a frame header


@dataclass
class SensHeader:
    """Everything before the first frame: calibration, stream formats and the frame count."""

    version: int
    sensor_name: str
    intrinsic_color: np.ndarray  # (4, 4) float32
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_compression: int
    depth_compression: int
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    num_frames: int


@dataclass
class RGBDFrame:
    """One frame as stored: the compressed payloads are kept as bytes, decoding is up to the caller."""

    index: int
    camera_to_world: np.ndarray  # (4, 4) float32, all -inf where tracking was lost
    timestamp_color: int
    timestamp_depth: int
    color_bytes: bytes
    depth_bytes: bytes


def _read_exact(f: BinaryIO, size: int, path: Path, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise PcdError(f"{path}: truncated .sens file ({what}: expected {size} bytes, got {len(data)})")
    return data


def _read_matrix(f: BinaryIO, path: Path, what: str) -> np.ndarray:
    return np.array(_MATRIX.unpack(_read_exact(f, _MATRIX.size, path, what)), dtype=np.float32).reshape(4, 4)


def read_header(f: BinaryIO, path: Path) -> SensHeader:
    """Parse and validate the header at the current position of `f` (only JPEG colour + zlib depth are supported)."""
    (version,) = struct.unpack("<I", _read_exact(f, 4, path, "header"))
    if version != SENS_VERSION:
        raise PcdError(f"{path}: unsupported .sens version {version} (expected {SENS_VERSION})")
    (name_len,) = struct.unpack("<Q", _read_exact(f, 8, path, "header"))
    if name_len > 1 << 16:
        raise PcdError(f"{path}: corrupt .sens header (sensor name length {name_len})")
    sensor_name = _read_exact(f, name_len, path, "header").decode("utf-8", errors="replace")
    matrices = [_read_matrix(f, path, "header") for _ in range(4)]
    tail = _HEADER_TAIL.unpack(_read_exact(f, _HEADER_TAIL.size, path, "header"))
    header = SensHeader(version, sensor_name, *matrices, *tail)
    if header.color_compression != COLOR_JPEG:
        name = COLOR_COMPRESSION_NAMES.get(header.color_compression, "invalid")
        raise PcdError(f"{path}: unsupported colour compression type {header.color_compression} ({name}); "
                       "only jpeg (2) is supported")
    if header.depth_compression != DEPTH_ZLIB:
        name = DEPTH_COMPRESSION_NAMES.get(header.depth_compression, "invalid")
        raise PcdError(f"{path}: unsupported depth compression type {header.depth_compression} ({name}); "
                       "only zlib_ushort (1) is supported")
    if min(header.color_width, header.color_height, header.depth_width, header.depth_height) == 0:
        raise PcdError(f"{path}: corrupt .sens header (zero image size)")
    if not header.depth_shift > 0:
        raise PcdError(f"{path}: corrupt .sens header (depth shift {header.depth_shift})")
    return header


class SensReader:
    """Open a `.sens` file, validate its header, and stream its frames.

    Use as a context manager; `header` is available right after construction.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as exc:
            raise PcdError(f"{self.path}: cannot open .sens file ({exc.strerror})") from None
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self.header = read_header(self._file, self.path)
            self._frames_start = self._file.tell()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> "SensReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def iter_frames(self, keep: Callable[[int], bool] | None = None) -> Iterator[RGBDFrame]:
        """Yield the frames whose index passes `keep` (all if None); the others' payloads are never read."""
        f, path = self._file, self.path
        f.seek(self._frames_start)
        for index in range(self.header.num_frames):
            raw = _read_exact(f, FRAME_HEADER_SIZE, path, f"frame {index} header")
            color_size, depth_size = _PAYLOAD_SIZES.unpack_from(raw, FRAME_HEADER_SIZE - _PAYLOAD_SIZES.size)
            end = f.tell() + color_size + depth_size
            if end > self._size:
                raise PcdError(f"{path}: truncated .sens file at frame {index} of {self.header.num_frames} "
                               f"(payload ends at byte {end}, file has {self._size})")
            if keep is not None and not keep(index):
                f.seek(end)
                continue
            fields = _FRAME_HEADER.unpack(raw)  # the pose only for kept frames: most are skipped
            pose = np.array(fields[:16], dtype=np.float32).reshape(4, 4)
            ts_color, ts_depth = fields[16:18]
            color = _read_exact(f, color_size, path, f"frame {index} colour")
            depth = _read_exact(f, depth_size, path, f"frame {index} depth")
            yield RGBDFrame(index, pose, ts_color, ts_depth, color, depth)


def decode_depth(data: bytes, header: SensHeader, where: str) -> np.ndarray:
    """zlib payload -> uint16 (H, W) depth in units of 1/depth_shift metres (mm for ScanNet); 0 = no depth."""
    expected = header.depth_width * header.depth_height * 2
    inflater = zlib.decompressobj()
    try:  # bounded: a small payload that inflates to gigabytes (a zlib bomb) stops one byte past the frame size
        raw = inflater.decompress(data, expected + 1)
    except zlib.error as exc:
        raise PcdError(f"{where}: corrupt depth (zlib: {exc})") from None
    if len(raw) > expected:
        raise PcdError(f"{where}: corrupt depth (inflates beyond the {expected} bytes of a "
                       f"{header.depth_width}x{header.depth_height} uint16 frame)")
    if len(raw) == expected and not inflater.eof:
        raise PcdError(f"{where}: corrupt depth (zlib stream truncated)")
    if len(raw) != expected:
        raise PcdError(f"{where}: corrupt depth ({len(raw)} bytes decompressed, expected {expected} for "
                       f"{header.depth_width}x{header.depth_height} uint16)")
    return np.frombuffer(raw, dtype="<u2").reshape(header.depth_height, header.depth_width).astype(np.uint16)


_DECODE_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}


def image_size(source: bytes | Path, image_format: str = "JPEG") -> tuple[int, int] | None:
    """(W, H) of an image (bytes or a file) from its header alone, nothing decoded; None when it is not an image of
    `image_format` ("JPEG", "PNG")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            with Image.open(opened, formats=[image_format]) as image:
                return image.size
    except Exception:  # Pillow raises several types for bad headers; all mean "not an image we can read"
        return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(W, H) of a JPEG from its header alone (nothing is decoded); None when `data` is not a JPEG."""
    return image_size(data, "JPEG")


def decode_color(data: bytes, where: str, reduction: int = 1, max_size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3) RGB; `reduction` 2 decodes at half size (ceil(W/2) x ceil(H/2)) in the
    DCT domain, which is cheaper than decoding in full and resizing. A JPEG whose header claims more than
    `max_size` (W, H) is refused before anything is decoded (a tiny file can claim 65535 x 65535 pixels)."""
    if max_size is not None:
        size = jpeg_size(data)
        if size is None:
            raise PcdError(f"{where}: corrupt colour image (not a decodable JPEG, {len(data)} bytes)")
        if size[0] > max_size[0] or size[1] > max_size[1]:
            raise PcdError(f"{where}: colour image is {size[0]}x{size[1]}, larger than the scan's "
                           f"{max_size[0]}x{max_size[1]} colour frames")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _DECODE_FLAGS[reduction]) if data else None
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise PcdError(f"{where}: corrupt colour image (not a decodable JPEG, {len(data)} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_depth(depth: np.ndarray, level: int = 1) -> bytes:
    """uint16 (H, W) depth -> the zlib payload a .sens file stores."""
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D uint16 array, got {depth.dtype} {depth.shape}")
    return zlib.compress(np.ascontiguousarray(depth, dtype="<u2").tobytes(), level)


def encode_color(rgb: np.ndarray, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def _pack_header(header: SensHeader) -> bytes:
    name = header.sensor_name.encode("utf-8")
    parts = [struct.pack("<IQ", header.version, len(name)), name]
    for matrix in (header.intrinsic_color, header.extrinsic_color, header.intrinsic_depth, header.extrinsic_depth):
        parts.append(_MATRIX.pack(*np.asarray(matrix, dtype=np.float32).reshape(16)))
    parts.append(_HEADER_TAIL.pack(header.color_compression, header.depth_compression, header.color_width,
                                   header.color_height, header.depth_width, header.depth_height,
                                   header.depth_shift, header.num_frames))
    return b"".join(parts)


def write_sens(path: Path, header: SensHeader, frames: Iterable[RGBDFrame]) -> None:
    """Write a `.sens` file frame by frame (temporary name, then rename), ending with an empty IMU block.

    `header.num_frames` must equal the number of frames given; a mismatch is an error and nothing is renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(_pack_header(header))
            count = 0
            for frame in frames:
                pose = np.asarray(frame.camera_to_world, dtype=np.float32).reshape(16)
                f.write(_FRAME_HEADER.pack(*pose, frame.timestamp_color, frame.timestamp_depth,
                                           len(frame.color_bytes), len(frame.depth_bytes)))
                f.write(frame.color_bytes)
                f.write(frame.depth_bytes)
                count += 1
            if count != header.num_frames:
                raise ValueError(f"{path}: header says {header.num_frames} frames but {count} were given")
            f.write(struct.pack("<Q", 0))  # IMU frame count, as the C++ writer appends
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
