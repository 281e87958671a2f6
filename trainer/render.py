"""Headless pictures of point clouds and boxes: pcd's own pinhole projection, a z-buffer and OpenCV lines.

No display, no GPU and no OpenGL (open3d's offscreen renderer needs EGL or a display, which servers lack): a point
is a square splat of `radius` pixels at its projection, the nearest point wins each pixel (a z-buffer, exact and
deterministic), and box edges are OpenCV lines between projected corners, clipped at the camera's near plane. The
camera is OpenCV's (x right, y down, z forward), as ScanNet's; a world point p maps to pixel
(f x / z + W / 2, f y / z + H / 2) with (x, y, z) = R (p - eye). Images are RGB uint8 arrays until written.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.errors import PcdError

BACKGROUND = (255, 255, 255)
GT_COLOR = (0, 170, 0)  # ground-truth boxes: green
PRED_COLOR = (220, 0, 0)  # predicted boxes: red
CORRECT_COLOR = (170, 170, 170)  # points whose prediction is right: grey
WRONG_COLOR = (230, 0, 0)  # and wrong: red
NEAR = 1e-3
# The 12 edges of a box whose 8 corners are numbered by bits (x: 1, y: 2, z: 4) of min (0) or max (1).
BOX_EDGES = [(a, a | bit) for a in range(8) for bit in (1, 2, 4) if not a & bit]


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: `rotation` rows are the camera's right, down and forward axes in world coordinates."""

    rotation: np.ndarray  # (3, 3) world -> camera
    eye: np.ndarray  # (3,) camera centre in the world
    focal: float  # pixels
    width: int
    height: int

    def to_camera(self, xyz: np.ndarray) -> np.ndarray:
        return (np.asarray(xyz, dtype=np.float64) - self.eye) @ self.rotation.T

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) world points -> (N, 2) float pixel coordinates (u right, v down) and (N,) depths."""
        cam = self.to_camera(xyz)
        depth = cam[:, 2]
        safe = np.where(depth > NEAR, depth, np.inf)
        uv = np.stack([self.focal * cam[:, 0] / safe + self.width / 2,
                       self.focal * cam[:, 1] / safe + self.height / 2], axis=1)
        return uv, depth


def look_at(eye: Sequence[float], target: Sequence[float], focal: float, width: int, height: int,
            up: Sequence[float] = (0.0, 0.0, 1.0)) -> Camera:
    """A camera at `eye` looking at `target` with `up` (z: ScanNet's gravity axis) pointing up in the image."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight along `up`: any right angle will do
        right = np.cross(forward, [0.0, 1.0, 0.0] if abs(forward[1]) < 0.9 else [1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return Camera(np.stack([right, down, forward]), eye, float(focal), int(width), int(height))


def orbit_views(xyz: np.ndarray, count: int, size: tuple[int, int] = (480, 360), elevation: float = 35.0,
                margin: float = 0.92) -> list[Camera]:
    """`count` cameras around the cloud at `elevation` degrees (azimuths 45, 135, ... degrees), each framing the
    cloud's bounding sphere (the sphere of the box centre through the farthest point) in the image."""
    lo, hi = xyz.min(0), xyz.max(0)
    center = (lo + hi) / 2
    radius = max(float(np.linalg.norm(xyz - center, axis=1).max()), 1e-6)
    distance = 2.5 * radius
    width, height = size
    focal = margin * min(width, height) / 2 / np.tan(np.arcsin(radius / distance))
    cameras = []
    for i in range(count):
        azimuth = np.radians(45.0 + 360.0 * i / count)
        el = np.radians(elevation)
        direction = np.array([np.cos(el) * np.cos(azimuth), np.cos(el) * np.sin(azimuth), np.sin(el)])
        cameras.append(look_at(center + distance * direction, center, focal, width, height))
    return cameras


def render_points(xyz: np.ndarray, colors: np.ndarray, camera: Camera, radius: int = 1,
                  image: Optional[np.ndarray] = None) -> np.ndarray:
    """Splat points (N, 3) with RGB colours (N, 3) uint8 into a (H, W, 3) image: each pixel takes the colour of
    the nearest point whose (2 radius + 1)^2 splat covers it; pixels no point covers keep the background."""
    out = np.full((camera.height, camera.width, 3), BACKGROUND, np.uint8) if image is None else image.copy()
    uv, depth = camera.project(xyz)
    visible = depth > NEAR
    pixels = np.floor(uv[visible]).astype(np.int64)
    depth, colors = depth[visible], np.asarray(colors, np.uint8)[visible]
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    u = np.concatenate([pixels[:, 0] + dx for dx, _ in offsets])
    v = np.concatenate([pixels[:, 1] + dy for _, dy in offsets])
    d = np.tile(depth, len(offsets))
    c = np.tile(colors, (len(offsets), 1))
    inside = (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
    flat = (v * camera.width + u)[inside]
    d, c = d[inside], c[inside]
    order = np.lexsort((d, flat))  # by pixel, nearest first
    first = np.unique(flat[order], return_index=True)[1]
    winners = order[first]
    out.reshape(-1, 3)[flat[winners]] = c[winners]
    return out


def box_corners(box: np.ndarray) -> np.ndarray:
    """(8, 3) corners of an axis-aligned box given as (6,) min/max corners; corner i takes max on axis k when
    bit k of i is set."""
    lo, hi = np.asarray(box[:3], np.float64), np.asarray(box[3:6], np.float64)
    return np.array([[hi[k] if i >> k & 1 else lo[k] for k in range(3)] for i in range(8)])


def draw_box(image: np.ndarray, box: np.ndarray, camera: Camera, color: Sequence[int], thickness: int = 1) -> None:
    """Draw the 12 edges of an axis-aligned (6,) min/max box into `image` (in place), clipped at the near plane."""
    cam = camera.to_camera(box_corners(box))
    for a, b in BOX_EDGES:
        p, q = cam[a], cam[b]
        if p[2] <= NEAR and q[2] <= NEAR:
            continue
        if p[2] <= NEAR or q[2] <= NEAR:  # move the end behind the camera onto the near plane
            t = (NEAR * 2 - p[2]) / (q[2] - p[2])
            cut = p + t * (q - p)
            p, q = (cut, q) if p[2] <= NEAR else (p, cut)
        ends = [(int(np.floor(camera.focal * e[0] / e[2] + camera.width / 2)),
                 int(np.floor(camera.focal * e[1] / e[2] + camera.height / 2))) for e in (p, q)]
        cv2.line(image, ends[0], ends[1], tuple(int(x) for x in color), thickness, cv2.LINE_8)


def label_palette(count: int) -> np.ndarray:
    """(count, 3) uint8 distinct colours for labels 0..count-1 (golden-ratio hues, fixed for a given count)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([[round(255 * x) for x in colorsys.hsv_to_rgb(h, 0.75, 0.9)] for h in hues], np.uint8)


def label_colors(labels: np.ndarray, count: int) -> np.ndarray:
    """Colours of integer labels; labels outside 0..count-1 (ignored, unannotated) are grey."""
    labels = np.asarray(labels, np.int64)
    out = np.full((len(labels), 3), 128, np.uint8)
    valid = (labels >= 0) & (labels < count)
    out[valid] = label_palette(count)[labels[valid]]
    return out


def error_colors(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Grey where the prediction equals the truth, red where it does not."""
    wrong = np.asarray(predicted) != np.asarray(truth)
    return np.where(wrong[:, None], np.array(WRONG_COLOR, np.uint8), np.array(CORRECT_COLOR, np.uint8))


def height_colors(xyz: np.ndarray) -> np.ndarray:
    """Colours by height (z) through OpenCV's viridis map, for clouds without RGB."""
    z = xyz[:, 2]
    scaled = np.zeros(len(z), np.uint8) if np.ptp(z) == 0 else ((z - z.min()) / np.ptp(z) * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(scaled[:, None], cv2.COLORMAP_VIRIDIS)[:, 0]
    return bgr[:, ::-1].copy()


def caption_band(image: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """The image with a white band above it holding `text` (ASCII; OpenCV's Hershey font)."""
    band = np.full((height, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text.encode("ascii", "replace").decode(), (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def contact_sheet(images: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Tile same-sized images row by row (blank cells at the end are white), 4 white pixels between them."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    gap = 4
    sheet = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        y, x = r * (height + gap), c * (width + gap)
        sheet[y:y + image.shape[0], x:x + image.shape[1]] = image
    return sheet


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write an RGB image as PNG, atomically (a reader never sees half a file)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise PcdError(f"{path}: OpenCV could not encode the image")
    atomic_write_bytes(Path(path), data.tobytes())
    return Path(path)


def read_png(path: Path) -> np.ndarray:
    """An RGB image written by `write_png`."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PcdError(f"{path}: not a readable image")
    return image[:, :, ::-1].copy()
