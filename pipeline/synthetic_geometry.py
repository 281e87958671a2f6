"""Geometry of the generated scenes: a room with box furniture, its mesh, camera trajectory and ray casting.

Everything here lives in the ALIGNED frame (z up, room floor at z = 0, walls parallel to x and y), the frame
ScanNet's `axisAlignment` maps to. Writers move the mesh and poses into the unaligned scan frame, as ScanNet
stores them. Surfaces are numbered: 0 floor, 1..4 walls (y=min, y=max, x=min, x=max), 5..5+M-1 the M
furniture boxes, 5+M the ceiling (rendered, never meshed: depth there is 0, like a sensor out of range).
A surface number is also the aggregation objectId of the mesh object it belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pcd.pipeline.scannet_files import nyu40_id

NUM_ROOM_SURFACES = 5  # floor + 4 walls
MIN_GRID_DIVISIONS = 7  # per box edge: 6 faces x 8 x 8 vertices, so even a picture has a few hundred vertices


@dataclass(frozen=True)
class Furniture:
    """One piece of furniture: an axis-aligned box in the aligned frame."""

    raw_category: str
    nyu40_id: int
    lo: np.ndarray  # (3,) min corner, metres
    hi: np.ndarray  # (3,) max corner

    @property
    def center(self) -> np.ndarray:
        return (self.lo + self.hi) / 2

    @property
    def size(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def on_floor(self) -> bool:
        return bool(self.lo[2] <= 1e-9)


@dataclass(frozen=True)
class Layout:
    """A room [-W/2, W/2] x [-D/2, D/2] x [0, H], its furniture and the look of every surface."""

    room_size: np.ndarray  # (3,) W, D, H
    furniture: tuple[Furniture, ...]
    colors: np.ndarray  # (S, 3) float base RGB in [0, 1] per surface (S = 6 + M, ceiling last)
    texture_cells: np.ndarray  # (S,) checker cell size in metres per surface

    @property
    def room_lo(self) -> np.ndarray:
        return np.array([-self.room_size[0] / 2, -self.room_size[1] / 2, 0.0])

    @property
    def room_hi(self) -> np.ndarray:
        return np.array([self.room_size[0] / 2, self.room_size[1] / 2, self.room_size[2]])

    @property
    def ceiling(self) -> int:
        return NUM_ROOM_SURFACES + len(self.furniture)

    def without(self, raw_categories: Iterable[str]) -> Layout:
        """This room with the furniture of `raw_categories` taken out, and with it their surfaces' looks."""
        leave = set(raw_categories)
        keep = [i for i, piece in enumerate(self.furniture) if piece.raw_category not in leave]
        surfaces = [*range(NUM_ROOM_SURFACES), *(NUM_ROOM_SURFACES + i for i in keep), self.ceiling]
        return Layout(self.room_size, tuple(self.furniture[i] for i in keep), self.colors[surfaces],
                      self.texture_cells[surfaces])


# raw category, size ranges (along wall / x, depth from wall / y, height), placement, base colour
# placement: "wall" stands on the floor against a wall, "hang" hangs on a wall, "free" stands anywhere.
CATALOGUE: tuple[tuple[str, tuple[tuple[float, float], ...], str, tuple[float, float, float]], ...] = (
    ("cabinet", ((0.6, 1.2), (0.4, 0.6), (0.8, 1.0)), "wall", (0.55, 0.35, 0.2)),
    ("bed", ((1.4, 1.9), (1.9, 2.1), (0.45, 0.6)), "wall", (0.8, 0.8, 0.9)),
    ("chair", ((0.45, 0.6), (0.45, 0.6), (0.8, 1.0)), "free", (0.7, 0.2, 0.15)),
    ("office chair", ((0.5, 0.65), (0.5, 0.65), (0.9, 1.0)), "free", (0.15, 0.15, 0.2)),
    ("couch", ((1.6, 2.2), (0.8, 0.95), (0.7, 0.9)), "wall", (0.3, 0.45, 0.6)),
    ("table", ((0.8, 1.6), (0.6, 0.9), (0.7, 0.78)), "free", (0.6, 0.45, 0.3)),
    ("coffee table", ((0.8, 1.2), (0.5, 0.7), (0.35, 0.45)), "free", (0.35, 0.25, 0.15)),
    ("door", ((0.8, 0.95), (0.05, 0.1), (2.0, 2.1)), "wall", (0.75, 0.6, 0.45)),
    ("window", ((0.8, 1.5), (0.05, 0.1), (1.0, 1.3)), "hang", (0.6, 0.8, 0.95)),
    ("bookshelf", ((0.8, 1.2), (0.3, 0.4), (1.6, 2.0)), "wall", (0.45, 0.3, 0.2)),
    ("picture", ((0.4, 0.9), (0.03, 0.05), (0.3, 0.7)), "hang", (0.9, 0.6, 0.2)),
    ("kitchen counter", ((1.2, 2.0), (0.6, 0.65), (0.88, 0.92)), "wall", (0.85, 0.85, 0.8)),
    ("desk", ((1.0, 1.6), (0.6, 0.8), (0.72, 0.76)), "wall", (0.7, 0.55, 0.35)),
    ("curtain", ((1.0, 2.0), (0.08, 0.15), (2.0, 2.3)), "wall", (0.6, 0.3, 0.5)),
    ("refrigerator", ((0.6, 0.8), (0.6, 0.75), (1.6, 1.85)), "wall", (0.92, 0.92, 0.95)),
    ("shower curtain", ((0.8, 1.5), (0.03, 0.06), (1.8, 2.0)), "wall", (0.5, 0.75, 0.75)),
    ("toilet", ((0.4, 0.5), (0.6, 0.7), (0.7, 0.8)), "wall", (0.95, 0.95, 0.92)),
    ("sink", ((0.5, 0.7), (0.4, 0.5), (0.8, 0.9)), "wall", (0.8, 0.85, 0.9)),
    ("bathtub", ((1.5, 1.7), (0.7, 0.8), (0.5, 0.6)), "wall", (0.9, 0.9, 0.85)),
    ("trash can", ((0.3, 0.4), (0.3, 0.4), (0.4, 0.7)), "free", (0.3, 0.5, 0.3)),
    ("box", ((0.3, 0.6), (0.3, 0.6), (0.2, 0.5)), "free", (0.7, 0.6, 0.4)),
)
HANG_HEIGHTS = {"window": (0.8, 1.0), "picture": (1.2, 1.5)}
WALL_GAP = 0.02  # furniture stands this far from its wall
CAMERA_WALL_CLEARANCE = 1.3  # the camera path keeps this far from the walls, clear of anything tall


def make_layout(rng: np.random.Generator) -> Layout:
    """A random room with 6-9 pieces of furniture that do not overlap."""
    room_size = np.array([rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.0)])
    lo_room = np.array([-room_size[0] / 2, -room_size[1] / 2, 0.0])
    hi_room = -lo_room + np.array([0, 0, room_size[2]])
    wanted = rng.choice(len(CATALOGUE), size=int(rng.integers(6, 10)), replace=False)
    furniture: list[Furniture] = []
    colors = []
    for entry in (CATALOGUE[i] for i in wanted):
        box = _place(entry, furniture, lo_room, hi_room, rng)
        if box is not None:
            furniture.append(box)
            colors.append(np.clip(np.array(entry[3]) + rng.uniform(-0.08, 0.08, 3), 0, 1))
    floor = np.clip(np.array([0.55, 0.42, 0.3]) + rng.uniform(-0.1, 0.1, 3), 0, 1)
    wall = np.clip(np.array([0.85, 0.83, 0.78]) + rng.uniform(-0.08, 0.05, 3), 0, 1)
    ceiling = np.array([0.95, 0.95, 0.95])
    all_colors = np.array([floor, wall, wall, wall, wall, *colors, ceiling])
    cells = np.array([0.5, 1.5, 1.5, 1.5, 1.5, *rng.uniform(0.08, 0.25, len(furniture)), 10.0])
    return Layout(room_size, tuple(furniture), all_colors, cells)


def _place(entry, placed: list[Furniture], lo_room: np.ndarray, hi_room: np.ndarray,
           rng: np.random.Generator) -> Furniture | None:
    name, ranges, placement, _ = entry
    for _ in range(50):
        along, depth, height = (rng.uniform(a, b) for a, b in ranges)
        z0 = rng.uniform(*HANG_HEIGHTS[name]) if placement == "hang" else 0.0
        if placement == "free":
            size = np.array([along, depth, height]) if rng.random() < 0.5 else np.array([depth, along, height])
            xy = rng.uniform(lo_room[:2] + size[:2] / 2 + 0.3, hi_room[:2] - size[:2] / 2 - 0.3)
            lo = np.array([*(xy - size[:2] / 2), 0.0])
            hi = lo + size
        else:
            wall = int(rng.integers(4))
            axis = 1 if wall < 2 else 0  # the wall is perpendicular to this axis
            other = 1 - axis
            span = (lo_room[other] + 0.05, hi_room[other] - 0.05 - along)
            if span[1] <= span[0]:
                continue
            lo, hi = np.zeros(3), np.zeros(3)
            lo[other] = rng.uniform(*span)
            hi[other] = lo[other] + along
            if wall % 2 == 0:
                lo[axis] = lo_room[axis] + WALL_GAP
                hi[axis] = lo[axis] + depth
            else:
                hi[axis] = hi_room[axis] - WALL_GAP
                lo[axis] = hi[axis] - depth
            lo[2], hi[2] = z0, z0 + height
        if all(np.any(lo >= p.hi + 0.05) or np.any(hi <= p.lo - 0.05) for p in placed):
            return Furniture(name, nyu40_id(name), lo, hi)
    return None


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world matrix of a ScanNet camera (x right, y down, z forward) at `position` facing `target`."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, position
    return pose


def camera_trajectory(layout: Layout, num_views: int, rng: np.random.Generator) -> np.ndarray:
    """(K, 4, 4) aligned camera-to-world poses on a loop round the room, each looking across it at the far side."""
    a = max(0.5, layout.room_size[0] / 2 - CAMERA_WALL_CLEARANCE)
    b = max(0.5, layout.room_size[1] / 2 - CAMERA_WALL_CLEARANCE)
    start, height, wobble = rng.uniform(0, 2 * math.pi), rng.uniform(1.35, 1.6), rng.uniform(0.15, 0.35)
    poses = []
    for k in range(num_views):
        phi = start + 2 * math.pi * k / num_views
        position = np.array([a * math.cos(phi), b * math.sin(phi), height + 0.08 * math.sin(2 * phi)])
        yaw = wobble * math.sin(5 * phi)
        across = -1.3 * position[:2]
        rotated = np.array([math.cos(yaw) * across[0] - math.sin(yaw) * across[1],
                            math.sin(yaw) * across[0] + math.cos(yaw) * across[1]])
        target = np.array([*(position[:2] + rotated), 0.55 + 0.2 * math.sin(3 * phi)])
        poses.append(look_at(position, target))
    return np.stack(poses)


def _argmin3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.where((a <= b) & (a <= c), 0, np.where(b <= c, 1, 2))


def cast_rays(layout: Layout, origin: np.ndarray, directions: list[np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays from `origin` (inside the room): ray parameter t, surface number and normal axis.

    `directions` holds one (N,) array per axis: reductions over a length-3 axis are several times slower
    in numpy than elementwise work on three flat arrays.
    """
    d = [np.where(np.abs(da) < 1e-9, np.float32(1e-9), da) for da in directions]
    inv = [np.float32(1.0) / da for da in d]
    # Leaving the room through the floor, a wall or the ceiling.
    lo, hi = (layout.room_lo - origin).astype(np.float32), (layout.room_hi - origin).astype(np.float32)
    exits = [np.where(d[a] > 0, hi[a], lo[a]) * inv[a] for a in range(3)]
    t = np.minimum(np.minimum(exits[0], exits[1]), exits[2])
    axis = _argmin3(*exits)
    positive = np.choose(axis, d) > 0
    room_surface = np.array([[3, 4], [1, 2], [0, layout.ceiling]])  # [axis][direction is positive]
    surface = room_surface[axis, positive.astype(int)]
    for j, box in enumerate(layout.furniture):
        box_lo, box_hi = (box.lo - origin).astype(np.float32), (box.hi - origin).astype(np.float32)
        near, far = [], []
        for a in range(3):
            t1, t2 = box_lo[a] * inv[a], box_hi[a] * inv[a]
            near.append(np.minimum(t1, t2))
            far.append(np.maximum(t1, t2))
        t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
        t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
        hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < t)
        if not hit.any():
            continue
        t = np.where(hit, t_near, t)
        surface = np.where(hit, NUM_ROOM_SURFACES + j, surface)
        axis = np.where(hit, _argmin3(-near[0], -near[1], -near[2]), axis)
    return t, surface, axis


def shade(layout: Layout, surface: np.ndarray, points: list[np.ndarray], axis: np.ndarray) -> np.ndarray:
    """uint8 (N, 3) RGB of surface points (one array per axis): base colour, checker and stripe texture, and a
    fixed light per face direction. Used for mesh vertex colours and rendered pixels alike, so they match."""
    cell = layout.texture_cells[surface].astype(np.float32)
    u = np.choose(axis, [points[1], points[2], points[0]])
    v = np.choose(axis, [points[2], points[0], points[1]])
    checker = (np.floor(u / cell) + np.floor(v / cell)) % 2
    stripes = 0.5 + 0.5 * np.sin(u * np.float32(2 * math.pi / 0.31) / cell)
    light = np.array([0.82, 0.7, 1.0], dtype=np.float32)[axis]
    value = layout.colors[surface].astype(np.float32) * (light * (0.78 + 0.17 * checker + 0.05 * stripes))[:, None]
    return np.clip(np.rint(value * 255), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PixelRays:
    """Camera-frame ray directions (x, y, 1) of every pixel, so a ray's parameter t is the pixel's z-depth."""

    x: np.ndarray  # (H*W,) float32
    y: np.ndarray
    width: int
    height: int

    @classmethod
    def of(cls, intrinsics: np.ndarray, width: int, height: int) -> "PixelRays":
        u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        x = (u - intrinsics[0, 2]) / intrinsics[0, 0]
        y = (v - intrinsics[1, 2]) / intrinsics[1, 1]
        return cls(x.ravel().astype(np.float32), y.ravel().astype(np.float32), width, height)

    def world(self, pose: np.ndarray) -> list[np.ndarray]:
        r = pose[:3, :3].astype(np.float32)
        return [r[a, 0] * self.x + r[a, 1] * self.y + r[a, 2] for a in range(3)]


def render_depth(layout: Layout, pose: np.ndarray, rays: PixelRays) -> np.ndarray:
    """float32 (H, W) z-depth in metres seen from aligned camera-to-world `pose`; 0 where the ceiling is seen."""
    t, surface, _ = cast_rays(layout, pose[:3, 3], rays.world(pose))
    return np.where(surface == layout.ceiling, np.float32(0), t).reshape(rays.height, rays.width)


def render_color(layout: Layout, pose: np.ndarray, rays: PixelRays) -> np.ndarray:
    """uint8 (H, W, 3) RGB image seen from aligned camera-to-world `pose`."""
    directions = rays.world(pose)
    t, surface, axis = cast_rays(layout, pose[:3, 3], directions)
    points = [np.float32(pose[a, 3]) + directions[a] * t for a in range(3)]
    return shade(layout, surface, points, axis).reshape(rays.height, rays.width, 3)


@dataclass
class Mesh:
    """A triangle mesh in the aligned frame with per-vertex object and segment numbers."""

    vertices: np.ndarray  # (N, 3) float64
    colors: np.ndarray  # (N, 3) uint8
    faces: np.ndarray  # (F, 3) int32
    object_ids: np.ndarray  # (N,) int: surface number = aggregation objectId
    segments: np.ndarray  # (N,) int: over-segmentation id (the smallest vertex index of the segment)


def _grid(origin: np.ndarray, u: np.ndarray, v: np.ndarray, spacing: float, patch: float):
    """Vertices and triangles of a subdivided parallelogram (normal u x v) and a patch number per vertex."""
    nu = max(MIN_GRID_DIVISIONS, math.ceil(np.linalg.norm(u) / spacing))
    nv = max(MIN_GRID_DIVISIONS, math.ceil(np.linalg.norm(v) / spacing))
    i, j = np.meshgrid(np.arange(nu + 1), np.arange(nv + 1), indexing="ij")
    vertices = origin + (i / nu).reshape(-1, 1) * u + (j / nv).reshape(-1, 1) * v
    index = i * (nv + 1) + j
    a, b, c, d = index[:-1, :-1].ravel(), index[1:, :-1].ravel(), index[1:, 1:].ravel(), index[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    pu = max(1, round(patch / np.linalg.norm(u) * nu))
    pv = max(1, round(patch / np.linalg.norm(v) * nv))
    patches_v = (nv - 1) // pv + 1
    patch_ids = np.minimum(i, nu - 1) // pu * patches_v + np.minimum(j, nv - 1) // pv
    return vertices, faces, patch_ids.ravel()


def _box_faces(lo: np.ndarray, hi: np.ndarray, with_bottom: bool):
    """(origin, u, v, normal axis) of a box's faces with outward normals."""
    sx, sy, sz = (hi - lo)
    X, Y, Z = np.array([sx, 0, 0]), np.array([0, sy, 0]), np.array([0, 0, sz])
    faces = [((hi[0], lo[1], lo[2]), Y, Z, 0), (lo, Z, Y, 0), ((lo[0], hi[1], lo[2]), Z, X, 1),
             (lo, X, Z, 1), ((lo[0], lo[1], hi[2]), X, Y, 2)]
    if with_bottom:
        faces.append((lo, Y, X, 2))
    return [(np.asarray(o, dtype=np.float64), u, v, a) for o, u, v, a in faces]


def _room_faces(lo: np.ndarray, hi: np.ndarray):
    """(surface, origin, u, v, normal axis) of floor and walls, normals pointing into the room."""
    W, D, H = np.array([hi[0] - lo[0], 0, 0]), np.array([0, hi[1] - lo[1], 0]), np.array([0, 0, hi[2]])
    return [(0, lo, W, D, 2), (1, lo, H, W, 1), (2, np.array([lo[0], hi[1], 0.0]), W, H, 1),
            (3, lo, D, H, 0), (4, np.array([hi[0], lo[1], 0.0]), H, D, 0)]


def build_mesh(layout: Layout, room_spacing: float, object_spacing: float) -> Mesh:
    """The scene's mesh: subdivided floor, walls and furniture faces (no ceiling, like a ScanNet reconstruction)."""
    parts = [(s, o, u, v, a, room_spacing, 1.0) for s, o, u, v, a in _room_faces(layout.room_lo, layout.room_hi)]
    for j, box in enumerate(layout.furniture):
        for o, u, v, a in _box_faces(box.lo, box.hi, with_bottom=not box.on_floor):
            parts.append((NUM_ROOM_SURFACES + j, o, u, v, a, object_spacing, 0.5))
    vertices, faces, object_ids, axes, patch_keys = [], [], [], [], []
    offset = patch_offset = 0
    for surface, origin, u, v, axis, spacing, patch in parts:
        verts, tris, patches = _grid(origin, u, v, spacing, patch)
        vertices.append(verts)
        faces.append(tris + offset)
        object_ids.append(np.full(len(verts), surface))
        axes.append(np.full(len(verts), axis))
        patch_keys.append(patches + patch_offset)
        offset += len(verts)
        patch_offset += int(patches.max()) + 1
    all_vertices = np.concatenate(vertices)
    ids, axis_all, keys = np.concatenate(object_ids), np.concatenate(axes), np.concatenate(patch_keys)
    first_vertex = np.full(patch_offset, len(all_vertices))
    np.minimum.at(first_vertex, keys, np.arange(len(all_vertices)))
    colors = shade(layout, ids, [c.astype(np.float32) for c in all_vertices.T], axis_all)
    return Mesh(all_vertices, colors, np.concatenate(faces).astype(np.int32), ids, first_vertex[keys])


def _rect_distance(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.maximum(np.maximum(lo - points, points - hi), 0.0), axis=1)


def surface_distance_aligned(layout: Layout, points: np.ndarray) -> np.ndarray:
    """Distance of aligned-frame points to the nearest rendered surface (floor, walls, furniture faces)."""
    lo, hi = layout.room_lo, layout.room_hi
    planes = [(lo, np.array([hi[0], hi[1], 0.0]))]  # floor
    for axis in (1, 0):
        for value in (lo[axis], hi[axis]):
            a, b = lo.copy(), hi.copy()
            a[axis] = b[axis] = value
            planes.append((a, b))
    best = np.min([_rect_distance(points, a, b) for a, b in planes], axis=0)
    for box in layout.furniture:
        outside = _rect_distance(points, box.lo, box.hi)
        inside = np.minimum(points - box.lo, box.hi - points).min(axis=1)
        best = np.minimum(best, np.where(outside > 0, outside, np.abs(inside)))
    return best
