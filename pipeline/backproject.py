"""Depth frame -> fixed-size coloured point cloud in camera coordinates.

Three steps, all vectorised or compiled (a Python FPS loop over 300k points costs seconds per frame):

1. Back-projection with the depth intrinsics: a depth pixel (u, v) with raw value d > 0 becomes
   z = d / depth_shift, x = (u - cx) z / fx, y = (v - cy) z / fy (metres; x right, y down, z forward).
   Raw 0 means no measurement.
2. Colour: ScanNet's colour and depth streams are registered (same viewpoint, the maintainers say no
   extrinsic applies), only the resolutions differ (1296x968 vs 640x480, aspect ratios not equal). A depth
   pixel is therefore mapped to the colour image by scaling its centre to the colour resolution and taking
   the nearest colour pixel: uc = floor((u + 0.5) * Wc / Wd), vc = floor((v + 0.5) * Hc / Hd), where Wc x Hc
   is the size of the colour image as decoded. A colour image at least twice the depth resolution is decoded
   at half size (`color_decode_reduction`; libjpeg's DCT-domain scaling, 1296x968 -> 648x484), so each depth
   pixel takes (about) the mean of the 2x2 colour block nearest its centre: one depth pixel's footprint, and
   the full-size image is never built.
3. Downsampling to exactly N points: a voxel grid keeps the first point (in pixel order) of every occupied
   voxel, so kept points are real measurements, not averages floating off the surface. If the grid leaves
   fewer than N points, the voxel is halved until it leaves at least N; after a few halvings the grid is
   skipped and all points are used, so a frame with at least N valid pixels always yields N points. If it
   leaves many more than N, a coarser grid over the survivors (sized from their count, as surface voxels
   scale with 1/size^2) brings them down to about 1.25 N, as long as at least N remain; the estimate
   leaves too many where the first grid is much finer than the point spacing, so the coarsening is repeated on
   the survivors (up to MAX_COARSENINGS times) while more than 1.5 N remain. Then farthest point sampling
   (fpsample's compiled bucket FPS, starting at the first point) picks N of them.
   Speed: when the even rows and columns alone hold at least 4 N valid pixels (a ScanNet frame has about
   250k valid pixels, the lattice about 60k), only they are back-projected and gridded; two depth pixels
   span under 2 cm up to 5 m from the camera (fx ~ 577), so the grid keeps about the same voxels for a
   quarter of the work (the full list of valid pixels is then never built). FPS is the most expensive step
   and its cost grows with its input, hence the coarsening to ~1.25 N.
   Every step is deterministic, so the same frame always gives the same bytes.
"""

from __future__ import annotations

import fpsample
import numpy as np

# Height of fpsample's bucket k-d tree: its authors recommend 5-7 for tens of thousands of points.
FPS_TREE_HEIGHT = 5
# Halvings of the voxel size tried before the grid is dropped (0.02 m -> 1.25 mm).
MAX_VOXEL_HALVINGS = 4
# Smallest voxel a user may ask for (its halvings reach 0.125 mm).
MIN_VOXEL_SIZE = 0.002
# The grid is coarsened when it leaves more than COARSEN_ABOVE * N points, aiming at FPS_INPUT * N.
COARSEN_ABOVE = 1.5
FPS_INPUT = 1.25
MAX_COARSENINGS = 3
# The even-pixel lattice replaces all pixels when it holds at least LATTICE_FACTOR * N valid ones.
LATTICE_FACTOR = 4
FPS_METHOD = f"fpsample.bucket_fps_kdline_sampling(h={FPS_TREE_HEIGHT}, start_idx=0)"
# Recorded in manifests: a folder's shards must all come from the same downsampling.
DOWNSAMPLING = (f"even-pixel lattice if >= {LATTICE_FACTOR}N valid; voxel first point, halved up to "
                f"{MAX_VOXEL_HALVINGS}x until >= N; coarsened to ~{FPS_INPUT}N above {COARSEN_ABOVE}N, repeated up to "
                f"{MAX_COARSENINGS}x; {FPS_METHOD}")


def valid_pixels(depth: np.ndarray) -> np.ndarray:
    """Flat indices of the depth pixels that carry a measurement (raw value > 0)."""
    return np.flatnonzero(depth.reshape(-1))


def backproject(depth: np.ndarray, intrinsics: np.ndarray, depth_shift: float,
                pixels: np.ndarray) -> np.ndarray:
    """float32 (M, 3) camera-frame points in metres for the flat pixel indices `pixels` of `depth`."""
    height, width = depth.shape
    v, u = np.divmod(pixels, width)
    z = depth.reshape(-1)[pixels].astype(np.float32) / np.float32(depth_shift)
    fx, fy = np.float32(intrinsics[0, 0]), np.float32(intrinsics[1, 1])
    cx, cy = np.float32(intrinsics[0, 2]), np.float32(intrinsics[1, 2])
    x = (u.astype(np.float32) - cx) * z / fx
    y = (v.astype(np.float32) - cy) * z / fy
    return np.stack([x, y, z], axis=1)


def color_decode_reduction(color_size: tuple[int, int], depth_size: tuple[int, int]) -> int:
    """2 if the colour image (W, H) is at least twice the depth resolution in both axes, else 1.

    Colour is only needed at depth resolution, and a half-size JPEG decode skips most of the IDCT work.
    """
    twice = color_size[0] >= 2 * depth_size[0] and color_size[1] >= 2 * depth_size[1]
    return 2 if twice else 1


def lookup_colors(color: np.ndarray, depth_size: tuple[int, int], pixels: np.ndarray) -> np.ndarray:
    """uint8 (M, 3) colour of each depth pixel: nearest pixel of `color` (at whatever size it was decoded)
    to the depth pixel's centre scaled to that size (module docstring)."""
    depth_width, depth_height = depth_size
    color_height, color_width = color.shape[:2]
    v, u = np.divmod(pixels, depth_width)
    uc = np.minimum(((2 * u + 1) * color_width) // (2 * depth_width), color_width - 1)
    vc = np.minimum(((2 * v + 1) * color_height) // (2 * depth_height), color_height - 1)
    return color[vc, uc]


def voxel_first_points(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """Sorted indices of the first point (by index) in each occupied voxel of edge `voxel_size`.

    Cell coordinates are shifted to start at 0 and packed into one int64 key per point with the point's
    index in the low bits, so one plain sort (SIMD in numpy, several times faster than a stable argsort)
    orders points by voxel and, within a voxel, by index. Extents too large for 63 bits (tens of metres at
    sub-millimetre voxels) take numpy's slower `unique`, which gives the same first occurrences.
    """
    cells = np.floor(points.T / np.float32(voxel_size)).astype(np.int64)  # (3, M): rows are contiguous
    for axis in cells:
        axis -= axis.min()
    bits = [int(axis.max()).bit_length() for axis in cells]
    shift = max(int(len(points) - 1).bit_length(), 1)
    if sum(bits) + shift > 63:
        _, first_occurrences = np.unique(cells, axis=1, return_index=True)
        return np.sort(first_occurrences)
    keys = cells[0] << (bits[1] + bits[2] + shift)
    keys |= cells[1] << (bits[2] + shift)
    keys |= cells[2] << shift
    keys |= np.arange(len(keys))
    keys.sort()
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:] >> shift, keys[:-1] >> shift, out=first[1:])
    kept = keys[first] & ((1 << shift) - 1)
    kept.sort()
    return kept


def grid_candidates(points: np.ndarray, count: int, voxel_size: float) -> np.ndarray:
    """Indices of the voxel-grid survivors: at least `count`, about FPS_INPUT * count where there are plenty."""
    size = voxel_size
    for _ in range(MAX_VOXEL_HALVINGS + 1):
        if size <= 0:
            break
        kept = voxel_first_points(points, size)
        if len(kept) >= count:
            break
        size /= 2
    else:
        return np.arange(len(points))
    if size <= 0:
        return np.arange(len(points))
    for _ in range(MAX_COARSENINGS):
        if len(kept) <= COARSEN_ABOVE * count:
            break
        size *= float(np.sqrt(len(kept) / (FPS_INPUT * count)))
        fewer = kept[voxel_first_points(points[kept], size)]
        if len(fewer) < count:
            break
        kept = fewer
    return kept


def grid_pixels(depth: np.ndarray, count: int, pixels: np.ndarray | None = None) -> np.ndarray:
    """The pixels the grid works on: the valid even-row, even-column ones if they are plenty, else all valid
    ones (`pixels` if the caller has them, else computed here)."""
    height, width = depth.shape
    lattice = np.flatnonzero(depth[::2, ::2].reshape(-1))
    if len(lattice) < LATTICE_FACTOR * count:
        return valid_pixels(depth) if pixels is None else pixels
    half_width = (width + 1) // 2
    return (lattice // half_width) * (2 * width) + (lattice % half_width) * 2


def farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` points picked by farthest point sampling, starting at point 0."""
    if len(points) == count:
        return np.arange(count)
    picked = fpsample.bucket_fps_kdline_sampling(points, count, h=FPS_TREE_HEIGHT, start_idx=0)
    return np.asarray(picked, dtype=np.int64)


def frame_to_cloud(depth: np.ndarray, color: np.ndarray, intrinsics: np.ndarray, depth_shift: float,
                   count: int, voxel_size: float,
                   pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (count, 3) points, uint8 (count, 3) RGB) of one RGB-D frame.

    `pixels` (from `valid_pixels`) can be passed when the caller already computed it; otherwise it is only
    computed where the even-pixel lattice does not suffice. The frame must have at least `count` valid pixels.
    """
    pixels = grid_pixels(depth, count, pixels)
    if len(pixels) < count:
        raise ValueError(f"frame has {len(pixels)} valid depth pixels, fewer than the {count} points asked for")
    points = backproject(depth, intrinsics, depth_shift, pixels)
    candidates = grid_candidates(points, count, voxel_size)
    chosen = candidates[farthest_points(points[candidates], count)]
    colors = lookup_colors(color, (depth.shape[1], depth.shape[0]), pixels[chosen])
    return np.ascontiguousarray(points[chosen]), np.ascontiguousarray(colors)
