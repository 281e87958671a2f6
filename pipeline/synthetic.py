"""`pcd generate-scenes`: ScanNet-style scans generated from a seed, the project's test and demo data.

Each scene is a room with labelled box furniture of the 18 ScanNet detection classes. It is written exactly as
the ScanNet release lays a scan out, so every stage runs on it unchanged:

    <out>/<scene>/<scene>.sens                          JPEG colour, zlib depth (mm), poses, intrinsics
    <out>/<scene>/exported/{color,depth,pose,intrinsic}  the same frames as the official exporter writes them
    <out>/<scene>/<scene>_vh_clean_2.ply                 mesh with vertex colours
    <out>/<scene>/<scene>_vh_clean_2.labels.ply          same vertices, nyu40 `label`
    <out>/<scene>/<scene>_vh_clean_2.0.010000.segs.json  over-segmentation
    <out>/<scene>/<scene>.aggregation.json               objects = groups of segments with a raw category
    <out>/<scene>/<scene>.txt                            metadata incl. a non-identity axisAlignment
    <out>/scannetv2-labels.combined.tsv, scannetv2_train.txt, scannetv2_val.txt
    <out>/generated-scenes.txt                           marks the folder as generated (a rerun may reuse it)

Mesh and poses are stored in the unaligned scan frame; `axisAlignment` maps them to the aligned frame where
floor is z = 0 and the furniture boxes are axis-aligned. Some frames have all -inf poses (lost tracking), some
depth holes, and at least one has empty depth, as in real scans. To stay fast at 1000 full-resolution frames,
`distinct_views` views are rendered by ray casting and frames walk back and forth along them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from rich.progress import Progress

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.config import InvalidSetting, build_config, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.scan_source import write_exported
from pcd.pipeline.scannet_files import (LABEL_ROWS, NYU40_PALETTE, nyu40_id, write_aggregation, write_label_map,
                                        write_mesh_ply, write_scene_meta, write_segs)
from pcd.pipeline.sens import COLOR_JPEG, DEPTH_ZLIB, RGBDFrame, SensHeader, encode_color, encode_depth, write_sens
from pcd.pipeline.synthetic_geometry import (CATALOGUE, Layout, Mesh, PixelRays, build_mesh, camera_trajectory,
                                             make_layout, render_color, render_depth, surface_distance_aligned)

DETECTION_NYU40_IDS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET_COLOR = (1296, 968, 1170.187988, 647.75, 483.75)  # width, height, focal, cx, cy
SCANNET_DEPTH = (640, 480, 577.590698, 319.5, 239.5)
SCENE_TYPES = ("Bedroom / Hotel", "Living room / Lounge", "Office", "Kitchen", "Bathroom", "Apartment")
ROOM_OBJECTS = ("floor", "wall", "wall", "wall", "wall")  # objectIds 0..4, then the furniture


@dataclass
class Config:
    """`pcd generate-scenes`: defaults give ScanNet's resolutions; see the `tiny` and `small` presets."""

    out_dir: Path = Path("generated-scans")
    num_scenes: int = setting(8, positive)
    num_frames: int = setting(300, positive)
    seed: int = setting(0, non_negative)
    color_width: int = setting(1296, positive)
    color_height: int = setting(968, positive)
    depth_width: int = setting(640, positive)
    depth_height: int = setting(480, positive)
    distinct_views: int = setting(60, positive)  # views actually rendered; frames walk back and forth along them
    write_exported: bool = True  # also write the exported-folder copy of every scan
    jpeg_quality: int = setting(90, positive)
    room_vertex_spacing: float = setting(0.08, positive)  # metres between mesh vertices on floor and walls
    object_vertex_spacing: float = setting(0.04, positive)  # ... and on furniture
    # raw categories taken out of every room once it is laid out (the rest of the room stays as it was), e.g.
    # ("picture",): thin wall-mounted boxes take a tiny detector far longer to fit than the rest of a room
    exclude_categories: tuple[str, ...] = ()

    def validate(self) -> None:
        unknown = sorted(set(self.exclude_categories) - {entry[0] for entry in CATALOGUE})
        if unknown:
            raise InvalidSetting("exclude_categories", f"names no furniture of the generator: {', '.join(unknown)} "
                                 f"(it has: {', '.join(entry[0] for entry in CATALOGUE)})")


@dataclass
class SceneInfo:
    """Ground truth of a generated scene, for tests and benchmarks."""

    index: int
    scene_id: str
    scene_dir: Path
    layout: Layout  # aligned frame
    axis_alignment: np.ndarray  # (4, 4) float64 scan frame -> aligned frame, as in <scene>.txt
    depth_intrinsics: np.ndarray  # (3, 3) float32
    color_intrinsics: np.ndarray  # (3, 3) float32
    poses: np.ndarray  # (F, 4, 4) float32 camera-to-world in the scan frame as stored (all -inf when invalid)
    view_poses: np.ndarray  # (K, 4, 4) float64 camera-to-world of the rendered views, ALIGNED frame
    frame_views: np.ndarray  # (F,) index of the rendered view each frame shows
    invalid_pose_frames: tuple[int, ...]
    empty_depth_frames: tuple[int, ...]
    dropout_frames: tuple[int, ...]  # frames whose depth has holes (besides the ceiling, never measured)

    @property
    def furniture(self):
        return self.layout.furniture


def scene_id(index: int) -> str:
    return f"scene{index:04d}_00"


def _intrinsics(spec: tuple[float, ...], width: int, height: int, focal_scale: float = 1.0) -> np.ndarray:
    """Intrinsics of a ScanNet camera resized to width x height (pixel-centre convention)."""
    base_w, base_h, focal, cx, cy = spec
    sx, sy = width / base_w, height / base_h
    return np.array([[focal * focal_scale * sx, 0, (cx + 0.5) * sx - 0.5],
                     [0, focal * focal_scale * sy, (cy + 0.5) * sy - 0.5], [0, 0, 1]], dtype=np.float32)


def _axis_alignment(rng: np.random.Generator) -> np.ndarray:
    """A rotation about z and a translation, like ScanNet's per-scan alignments. The angle stays 0.2 rad away
    from multiples of 90 degrees, so that boxes are visibly NOT axis-aligned in the scan frame."""
    angle = int(rng.integers(4)) * math.pi / 2 + rng.uniform(0.2, math.pi / 2 - 0.2)
    matrix = np.eye(4)
    matrix[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    matrix[:3, 3] = [rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-0.3, 0.3)]
    return np.round(matrix, 6)  # exactly what <scene>.txt holds, so readers of the file get this very matrix


def _frame_views(num_frames: int, num_views: int) -> np.ndarray:
    """Frame -> view walking 0..K-1 and back, so consecutive frames stay consecutive views."""
    if num_views == 1:
        return np.zeros(num_frames, dtype=int)
    period = 2 * num_views - 2
    m = np.arange(num_frames) % period
    return np.where(m < num_views, m, period - m)


def describe_scene(cfg: Config, index: int) -> SceneInfo:
    """The ground truth of scene `index` without writing anything (cheap: no rendering)."""
    rng = np.random.default_rng([cfg.seed, index])
    layout = make_layout(rng).without(cfg.exclude_categories)
    align = _axis_alignment(rng)
    focal_scale = 1 + rng.uniform(-0.005, 0.005)  # depth focal length varies per scan in ScanNet
    num_views = min(cfg.distinct_views, cfg.num_frames)
    aligned_poses = camera_trajectory(layout, num_views, rng)
    views = _frame_views(cfg.num_frames, num_views)
    later = np.arange(1, cfg.num_frames)  # frame 0 is always a good frame
    invalid = empty = np.array([], dtype=int)
    if cfg.num_frames >= 3:
        invalid = np.sort(rng.choice(later, size=max(1, round(0.03 * cfg.num_frames)), replace=False))
        rest = np.setdiff1d(later, invalid)
        empty = np.sort(rng.choice(rest, size=min(len(rest), 1 + cfg.num_frames // 200), replace=False))
    poses = np.linalg.inv(align) @ aligned_poses[views]
    poses[invalid] = -np.inf
    holes = {k for k in range(num_views) if k % 3 == 1}
    dropout = [i for i in range(cfg.num_frames) if views[i] in holes and i not in set(empty)]
    return SceneInfo(
        index=index, scene_id=scene_id(index), scene_dir=Path(cfg.out_dir) / scene_id(index), layout=layout,
        axis_alignment=align,
        depth_intrinsics=_intrinsics(SCANNET_DEPTH, cfg.depth_width, cfg.depth_height, focal_scale),
        color_intrinsics=_intrinsics(SCANNET_COLOR, cfg.color_width, cfg.color_height),
        poses=poses.astype(np.float32), view_poses=aligned_poses, frame_views=views,
        invalid_pose_frames=tuple(int(i) for i in invalid),
        empty_depth_frames=tuple(int(i) for i in empty), dropout_frames=tuple(dropout))


def surface_distance(info: SceneInfo, points_world: np.ndarray) -> np.ndarray:
    """Distance (m) of scan-frame points (the frame of the stored poses) to the nearest rendered surface."""
    points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    aligned = points @ info.axis_alignment[:3, :3].T + info.axis_alignment[:3, 3]
    return surface_distance_aligned(info.layout, aligned)


def detection_boxes(info: SceneInfo) -> np.ndarray:
    """(K, 7) float64 `cx, cy, cz, dx, dy, dz, nyu40id` of the furniture of the 18 detection classes, aligned
    frame: what `<scene>_bbox.npy` of VoteNet/3DETR preprocessing must hold for this scene."""
    rows = [[*f.center, *f.size, f.nyu40_id] for f in info.furniture if f.nyu40_id in DETECTION_NYU40_IDS]
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def _homogeneous(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _write_annotations(info: SceneInfo, mesh: Mesh, cfg: Config) -> None:
    scene, folder = info.scene_id, info.scene_dir
    vertices = _homogeneous(mesh.vertices, np.linalg.inv(info.axis_alignment))  # stored in the scan frame
    names = [*ROOM_OBJECTS, *(f.raw_category for f in info.furniture)]
    labels = np.array([nyu40_id(name) for name in names])[mesh.object_ids].astype(np.uint16)
    write_mesh_ply(folder / f"{scene}_vh_clean_2.ply", vertices, mesh.colors, mesh.faces)
    write_mesh_ply(folder / f"{scene}_vh_clean_2.labels.ply", vertices, NYU40_PALETTE[labels], mesh.faces, labels)
    write_segs(folder / f"{scene}_vh_clean_2.0.010000.segs.json", scene, mesh.segments)
    groups = []
    for object_id, name in enumerate(names):
        segments = np.unique(mesh.segments[mesh.object_ids == object_id])
        groups.append((object_id, name, segments.tolist()))
    write_aggregation(folder / f"{scene}.aggregation.json", scene, groups)
    depth_k, color_k = info.depth_intrinsics, info.color_intrinsics
    rng = np.random.default_rng([cfg.seed, info.index, 1])
    write_scene_meta(folder / f"{scene}.txt", {
        "axisAlignment": info.axis_alignment, "colorHeight": cfg.color_height,
        "colorToDepthExtrinsics": np.eye(4), "colorWidth": cfg.color_width, "depthHeight": cfg.depth_height,
        "depthWidth": cfg.depth_width, "fx_color": float(color_k[0, 0]), "fx_depth": float(depth_k[0, 0]),
        "fy_color": float(color_k[1, 1]), "fy_depth": float(depth_k[1, 1]), "mx_color": float(color_k[0, 2]),
        "mx_depth": float(depth_k[0, 2]), "my_color": float(color_k[1, 2]), "my_depth": float(depth_k[1, 2]),
        "numColorFrames": cfg.num_frames, "numDepthFrames": cfg.num_frames, "numIMUmeasurements": 0,
        "sceneType": SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))]})


def _punch_holes(depth: np.ndarray, rng: np.random.Generator) -> None:
    """Sensor dropouts: a few rectangular holes and scattered missing pixels (value 0)."""
    height, width = depth.shape
    for _ in range(int(rng.integers(2, 5))):
        h, w = max(1, int(height * rng.uniform(0.05, 0.2))), max(1, int(width * rng.uniform(0.05, 0.2)))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        depth[top:top + h, left:left + w] = 0
    depth[rng.random(depth.shape) < 0.01] = 0


@dataclass(frozen=True)
class _View:
    jpeg: bytes
    depth: np.ndarray  # uint16 mm
    depth_payload: bytes  # zlib, as the .sens stores it


def _render_views(info: SceneInfo, cfg: Config, progress: Progress | None) -> list[_View]:
    """Every distinct view, rendered and encoded once; every third view has depth holes."""
    task = progress.add_task(f"render {info.scene_id}", total=len(info.view_poses)) if progress else None
    depth_rays = PixelRays.of(info.depth_intrinsics, cfg.depth_width, cfg.depth_height)
    color_rays = PixelRays.of(info.color_intrinsics, cfg.color_width, cfg.color_height)
    views = []
    for k, pose in enumerate(info.view_poses):
        depth_m = render_depth(info.layout, pose, depth_rays)
        depth = np.clip(np.rint(depth_m * 1000.0), 0, 65535).astype(np.uint16)
        if k % 3 == 1:
            _punch_holes(depth, np.random.default_rng([cfg.seed, info.index, 2, k]))
        color = render_color(info.layout, pose, color_rays)
        views.append(_View(encode_color(color, cfg.jpeg_quality), depth, encode_depth(depth)))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return views


def _frame_views_of(info: SceneInfo, views: list[_View]) -> Iterator[tuple[int, _View]]:
    """The view each frame shows, with its depth emptied on the empty-depth frames."""
    empty_depth = np.zeros_like(views[0].depth)
    blank = encode_depth(empty_depth)
    empty = set(info.empty_depth_frames)
    for i, k in enumerate(info.frame_views):
        view = views[k]
        yield i, (_View(view.jpeg, empty_depth, blank) if i in empty else view)


def _sens_header(info: SceneInfo, cfg: Config) -> SensHeader:
    return SensHeader(version=4, sensor_name="StructureSensor", intrinsic_color=_four(info.color_intrinsics),
                      extrinsic_color=np.eye(4, dtype=np.float32), intrinsic_depth=_four(info.depth_intrinsics),
                      extrinsic_depth=np.eye(4, dtype=np.float32), color_compression=COLOR_JPEG,
                      depth_compression=DEPTH_ZLIB, color_width=cfg.color_width, color_height=cfg.color_height,
                      depth_width=cfg.depth_width, depth_height=cfg.depth_height, depth_shift=1000.0,
                      num_frames=cfg.num_frames)


def generate_scene(cfg: Config, index: int, progress: Progress | None = None) -> SceneInfo:
    """Write scene `index` of the dataset `cfg` describes (overwriting it) and return its ground truth."""
    info = describe_scene(cfg, index)
    mesh = build_mesh(info.layout, cfg.room_vertex_spacing, cfg.object_vertex_spacing)
    _write_annotations(info, mesh, cfg)
    views = _render_views(info, cfg, progress)
    microseconds = 33_333  # 30 Hz timestamps
    sens_frames = (RGBDFrame(i, info.poses[i], microseconds * i, microseconds * i, view.jpeg, view.depth_payload)
                   for i, view in _frame_views_of(info, views))
    write_sens(info.scene_dir / f"{info.scene_id}.sens", _sens_header(info, cfg), sens_frames)
    if cfg.write_exported:
        write_exported(info.scene_dir / "exported", _four(info.depth_intrinsics), _four(info.color_intrinsics),
                       ((i, info.poses[i], view.jpeg, view.depth) for i, view in _frame_views_of(info, views)))
    return info


def _four(k: np.ndarray) -> np.ndarray:
    matrix = np.eye(4, dtype=np.float32)
    matrix[:3, :3] = k
    return matrix


def split_scenes(scene_ids: list[str]) -> tuple[list[str], list[str]]:
    """Deterministic train/val split: every fourth scene (starting with the second) is validation."""
    val = [s for i, s in enumerate(scene_ids) if i % 4 == 1]
    return [s for s in scene_ids if s not in val], val


def check_config(cfg: Config) -> None:
    for name in ("num_scenes", "num_frames", "distinct_views", "color_width", "color_height", "depth_width",
                 "depth_height"):
        if getattr(cfg, name) < 1:
            raise PcdError(f"generate-scenes: {name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.num_scenes > 707:
        raise PcdError(f"generate-scenes: at most 707 scenes (ScanNet's train/val space ids), got {cfg.num_scenes}")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise PcdError(f"generate-scenes: jpeg_quality must be in 1..100 (got {cfg.jpeg_quality})")
    if min(cfg.room_vertex_spacing, cfg.object_vertex_spacing) <= 0:
        raise PcdError("generate-scenes: vertex spacings must be positive")


MARKER_NAME = "generated-scenes.txt"


def claim_output_folder(out: Path) -> None:
    """Generated scenes carry ScanNet's own names (scene0000_00, scannetv2_train.txt): never write them over a
    folder that holds anything else, such as real scans. A folder this command wrote before is reused."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).is_file():
        raise PcdError(f"{out}: not empty and not written by pcd generate-scenes; choose an empty or new folder "
                       "(generated scenes would overwrite ScanNet files of the same names)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER_NAME, b"Written by pcd generate-scenes: generated data, not ScanNet.\n")


def generate(cfg: Config, show_progress: bool = False) -> list[SceneInfo]:
    """Write `cfg.num_scenes` scenes, the label map and the train/val split files into `cfg.out_dir`."""
    check_config(cfg)
    out = Path(cfg.out_dir)
    claim_output_folder(out)
    write_label_map(out / "scannetv2-labels.combined.tsv", LABEL_ROWS)
    infos = []
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("scenes", total=cfg.num_scenes)
        for index in range(cfg.num_scenes):
            infos.append(generate_scene(cfg, index, progress))
            progress.advance(task)
    train, val = split_scenes([info.scene_id for info in infos])
    for name, ids in (("scannetv2_train.txt", train), ("scannetv2_val.txt", val)):
        atomic_write_bytes(out / name, "".join(f"{s}\n" for s in ids).encode())
    return infos


def generate_dataset(out_dir: Path, num_scenes: int, num_frames: int, seed: int = 0,
                     **options: object) -> list[SceneInfo]:
    """`generate` with the other `Config` fields as keyword options (default: ScanNet's full resolution)."""
    cfg = Config(out_dir=Path(out_dir), num_scenes=num_scenes, num_frames=num_frames, seed=seed)
    return generate(dataclasses.replace(cfg, **options))


def tiny_config(out_dir: Path, **changes: object) -> Config:
    """The `[generate-scenes.tiny]` preset (64x48 depth, 30 frames): scenes that generate in a fraction of a
    second, for tests."""
    cfg = build_config(Config, "generate-scenes", "tiny")
    return dataclasses.replace(cfg, out_dir=Path(out_dir), **changes)


def run(cfg: Config) -> int:
    infos = generate(cfg, show_progress=True)
    print(f"wrote {len(infos)} scenes x {cfg.num_frames} frames to {cfg.out_dir}")
    return 0
