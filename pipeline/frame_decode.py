"""JPEG decoding and CLIP's evaluation crop, torch-free so that decode worker processes start fast.

The crop reproduces open_clip's evaluation transform for square models exactly: torchvision's
`Resize(size)` on a PIL image (shorter side to `size`, longer side `int(size * long / short)`, PIL bicubic
with antialiasing) followed by `CenterCrop(size)` (offsets rounded half to even, as torchvision does).
Decoding uses cv2; the resize uses PIL because cv2's bicubic does not antialias when shrinking.
"""

from __future__ import annotations

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


def clip_resize_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then the centre `size` x `size` crop; uint8 (size, size, 3)."""
    height, width = rgb.shape[:2]
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    resized = np.asarray(Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BICUBIC))
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    return np.array(resized[top:top + size, left:left + size])  # a writable copy


def decode_and_crop(task: tuple[bytes, int]) -> Optional[np.ndarray]:
    """Worker entry point: (jpeg bytes, crop size) -> cropped RGB uint8, or None when the JPEG is corrupt."""
    jpeg, size = task
    rgb = decode_jpeg_rgb(jpeg)
    return None if rgb is None else clip_resize_crop(rgb, size)
