"""JPEG decoding and CLIP's evaluation crop, torch-free so that decode worker processes start fast.

The crop reproduces open_clip's evaluation transform for square models exactly: torchvision's
`Resize(size)` on a PIL image (shorter side to `size`, longer side `int(size * long / short)`, PIL bicubic
with antialiasing) followed by `CenterCrop(size)` (offsets rounded half to even, as torchvision does).
Decoding uses cv2; the resize uses PIL because cv2's bicubic does not antialias when shrinking.
"""

from __future__ import annotations

import io
from typing import Optional

import cv2
import numpy as np
from PIL import Image

JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"


def init_decode_worker() -> None:
    """One thread per worker process: parallelism comes from the processes."""
    cv2.setNumThreads(1)


def decode_jpeg_rgb(jpeg: bytes) -> Optional[np.ndarray]:
    """RGB uint8 (H, W, 3), or None for bytes that are not one complete JPEG image.

    libjpeg returns a partly grey image for a truncated file with only a warning, so a missing end-of-image
    marker is treated as corruption too.
    """
    if not jpeg.startswith(JPEG_START) or not jpeg.rstrip(b"\x00").endswith(JPEG_END):
        return None
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the crop: torchvision's Resize(int) and CenterCrop formulas."""
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    return new_width, new_height, int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))


def clip_resize_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then the centre `size` x `size` crop; uint8 (size, size, 3)."""
    height, width = rgb.shape[:2]
    new_width, new_height, left, top = crop_geometry(width, height, size)
    resized = np.asarray(Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BICUBIC))
    return np.array(resized[top:top + size, left:left + size])  # a writable copy


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG header, without decoding the image."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.size


def crop_camera(intrinsics: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """Intrinsics (3,3) of a width x height image carried through `clip_resize_crop`: they map camera-frame points
    to pixels of the crop measured from its top-left corner, pixel i spanning [i, i+1) (edge convention).

    Intrinsics put pixel centres at integers, so the edge coordinate is u + 1/2; the resize scales edge
    coordinates by new/old (PIL resamples pixel areas), and the crop shifts them by its offset."""
    new_width, new_height, left, top = crop_geometry(width, height, size)
    scale_x, scale_y = new_width / width, new_height / height
    k = np.asarray(intrinsics, dtype=np.float64)
    out = np.eye(3)
    out[0, 0], out[0, 1], out[0, 2] = k[0, 0] * scale_x, k[0, 1] * scale_x, (k[0, 2] + 0.5) * scale_x - left
    out[1, 1], out[1, 2] = k[1, 1] * scale_y, (k[1, 2] + 0.5) * scale_y - top
    return out.astype(np.float32)


def decode_and_crop(task: tuple[bytes, int]) -> Optional[np.ndarray]:
    """Worker entry point: (jpeg bytes, crop size) -> cropped RGB uint8, or None when the JPEG is corrupt."""
    jpeg, size = task
    rgb = decode_jpeg_rgb(jpeg)
    return None if rgb is None else clip_resize_crop(rgb, size)
