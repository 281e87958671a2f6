"""Point clouds from wherever a user has them, in the z-up frame, for `pcd caption` and `pcd show`.

A cloud is named on the command line by one string:
- `FILE.ply` / `FILE.pcd` (read with open3d), `FILE.npy` (N x 3 or N x 6: xyz, then rgb in 0..1 or 0..255),
  `FILE.npz` (the array `points`, `xyz` or its only array; `colors`/`rgb` beside it if any);
- `SHARDS#KEY`: the sample KEY (`<scene>_<frame:06d>`) of an extraction or training shard (a `.tar`, or the folder
  with its manifest.json): the camera-frame points rotated into the scan's gravity frame with the sample's pose,
  which is exactly what the student was pre-trained on;
- `DETECTION_DIR#SCENE:box=x0,y0,z0,x1,y1,z1` or `DETECTION_DIR#SCENE:object=K`: the points of a prepared ScanNet
  scene (`pcd prepare scannet-detection`) inside an axis-aligned box, given in metres or as the scene's K-th
  ground-truth box; `DETECTION_DIR#SCENE` is the whole scene;
- `DETECTION_RUN#SCENE:detected=K`: the points inside the K-th most confident box the detector found in that scene
  (from the run's `pcd evaluate detection` predictions; the scene's points from the run's data folder).
Files whose up axis is y (ModelNet, ShapeNet) are rotated to z with `up_axis="y"` (`pcd.trainer.frames.rotate_up`).
Every reader checks what it read: an empty cloud, a non-finite coordinate or a wrong shape is a one-line error
that names the file.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import MANIFEST_NAME, decode_npy, read_npy
from pcd.trainer.frames import Axis, rotate_up
from pcd.trainer.normalize import camera_to_gravity

Origin = Literal["file", "frame", "region", "scene"]
SELECTOR = "#"
DETECTION_EVALUATION = "evaluation_last.json"  # of a detection run: its saved proposals give the detected boxes


@dataclass
class Cloud:
    """A point cloud in a z-up frame (metres for frames and scenes): xyz (N, 3) float32, rgb (N, 3) uint8 or None."""

    name: str
    xyz: np.ndarray
    rgb: Optional[np.ndarray]
    origin: Origin  # "frame": one camera frame, what the student saw; the others are not

    def __post_init__(self) -> None:
        check_points(self.xyz, self.name)


def check_points(xyz: np.ndarray, where: str) -> None:
    """Refuse what no model can take: a wrong shape, no points, NaN or infinite coordinates."""
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise PcdError(f"{where}: expected points of shape (N, 3) or (N, 6), got {tuple(xyz.shape)}")
    if len(xyz) == 0:
        raise PcdError(f"{where}: the cloud is empty (no points)")
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise PcdError(f"{where}: {int(bad.sum())} of {len(xyz)} points have NaN or infinite coordinates")


def read_cloud(spec: str, up_axis: Axis = "z") -> Cloud:
    """The cloud `spec` names (see the module docstring), z up."""
    base, _, selector = spec.partition(SELECTOR)
    path = Path(base)
    if selector:
        if (path.is_file() and path.suffix == ".tar") or (path / MANIFEST_NAME).is_file():
            return shard_sample(path, selector, spec)
        if (path / DETECTION_EVALUATION).is_file():
            return detected_region(path, selector, spec)
        if path.is_dir():
            return scene_region(path, selector, spec)
        raise PcdError(f"{path}: no such shard (.tar), shard folder (with {MANIFEST_NAME}) or prepared scene folder")
    if not path.is_file():
        raise PcdError(f"{path}: no such cloud file")
    suffix = path.suffix.lower()
    if suffix in (".ply", ".pcd"):
        xyz, rgb = _read_open3d(path)
    elif suffix == ".npy":
        xyz, rgb = _split_columns(read_npy(path), path)
    elif suffix == ".npz":
        xyz, rgb = _read_npz(path)
    else:
        raise PcdError(f"{path}: unknown cloud format '{path.suffix}' (use .ply, .pcd, .npy, .npz, SHARDS#KEY or "
                       f"DETECTION_DIR#SCENE:box=...)")
    check_points(xyz, str(path))
    return Cloud(spec, rotate_up(xyz, up_axis, "z"), rgb, "file")


def _read_open3d(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    import open3d as o3d

    cloud = o3d.io.read_point_cloud(str(path))  # warns and returns an empty cloud for an unreadable file
    xyz = np.asarray(cloud.points, dtype=np.float32)
    if len(xyz) == 0:
        raise PcdError(f"{path}: the cloud is empty (no points, or not a point cloud open3d can read)")
    rgb = (np.clip(np.asarray(cloud.colors), 0, 1) * 255).round().astype(np.uint8) if cloud.has_colors() else None
    return xyz, rgb


def _read_npz(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        reason = "holds an object array" if "pickle" in str(exc) else str(exc)
        raise PcdError(f"{path}: cannot read ({reason})") from None
    name = next((n for n in ("points", "xyz") if n in arrays), None)
    if name is None and len(arrays) == 1:
        name = next(iter(arrays))
    if name is None:
        raise PcdError(f"{path}: no array named 'points' or 'xyz' (it has {', '.join(sorted(arrays)) or 'none'})")
    xyz, rgb = _split_columns(arrays[name], path)
    color = next((arrays[n] for n in ("colors", "rgb") if n in arrays), None)
    if color is not None:
        rgb = _colors(np.asarray(color), path, len(xyz))
    return xyz, rgb


def _split_columns(array: np.ndarray, path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[1] not in (3, 6):
        raise PcdError(f"{path}: expected numeric points of shape (N, 3) or (N, 6), got {array.dtype} "
                       f"{tuple(array.shape)}")
    xyz = np.ascontiguousarray(array[:, :3], dtype=np.float32)
    rgb = _colors(array[:, 3:6], path, len(xyz)) if array.shape[1] == 6 else None
    return xyz, rgb


def _colors(color: np.ndarray, path: Path, count: int) -> np.ndarray:
    """uint8 RGB from 0..1 floats or 0..255 values."""
    if color.shape != (count, 3) or color.dtype.kind not in "iuf" or not np.isfinite(color).all():
        raise PcdError(f"{path}: colours must be finite numbers of shape ({count}, 3), got {tuple(color.shape)}")
    if color.dtype.kind == "f" and color.max(initial=0) <= 1.0:
        color = color * 255.0
    return np.clip(np.round(color), 0, 255).astype(np.uint8)


def shard_sample(path: Path, key: str, spec: str) -> Cloud:
    """Sample `key` of a shard (or of the shard folder's manifest), rotated into its scan's gravity frame."""
    shards = [path] if path.is_file() else _shards_of(path, key)
    for shard in shards:
        members = _read_members(shard, key, ("points.npy", "pose.npy", "colors.npy"))
        if members is None:
            continue
        where = f"{shard}: sample {key}"
        if "points.npy" not in members or "pose.npy" not in members:
            raise PcdError(f"{where} has no points.npy/pose.npy (not a pcd shard)")
        points, pose = members["points.npy"], members["pose.npy"]
        if points.ndim != 2 or points.shape[1] != 3 or pose.shape != (4, 4):
            raise PcdError(f"{where}: points {tuple(points.shape)} / pose {tuple(pose.shape)} are not (N, 3) / (4, 4)")
        check_points(points, where)
        xyz = camera_to_gravity(points.astype(np.float32), pose.astype(np.float32))
        rgb = members.get("colors.npy")
        return Cloud(spec, xyz, rgb if rgb is not None and rgb.shape == points.shape else None, "frame")
    raise PcdError(f"{path}: no sample with key '{key}'")


def _shards_of(folder: Path, key: str) -> list[Path]:
    """The folder's shards, those of the key's scene first (keys are `<scene>_<frame:06d>`)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        names = [(str(s["name"]), str(s.get("scene", ""))) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PcdError(f"{folder / MANIFEST_NAME}: cannot read the shard list ({exc})") from None
    scene = key.rpartition("_")[0]
    ordered = sorted(names, key=lambda item: item[1] != scene)
    return [folder / Path(name).name for name, _ in ordered]


def _read_members(shard: Path, key: str, wanted: tuple[str, ...]) -> Optional[dict[str, np.ndarray]]:
    """The wanted .npy members of sample `key` in one tar shard, decoded without unpickling; None if absent."""
    found: dict[str, np.ndarray] = {}
    seen = False
    try:
        with tarfile.open(shard, "r") as tar:
            for info in tar:
                sample, _, member = Path(info.name).name.partition(".")
                if sample != key or not info.isfile():
                    if seen:
                        break  # a sample's members are adjacent in a WebDataset tar
                    continue
                seen = True
                if member in wanted:
                    found[member] = decode_npy(tar.extractfile(info).read())
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise PcdError(f"{shard}: not a readable tar shard ({exc})") from None
    return found if seen else None


def scene_region(folder: Path, selector: str, spec: str) -> Cloud:
    """The points of a prepared scene (aligned, z up, metres) inside a box: `SCENE`, `SCENE:box=...` or
    `SCENE:object=K` (the K-th row of `<scene>_bbox.npy`, counted from 0)."""
    scene, _, region = selector.partition(":")
    vertices = read_npy(folder / f"{scene}_vert.npy") if (folder / f"{scene}_vert.npy").is_file() else None
    if vertices is None:
        raise PcdError(f"{folder}: no {scene}_vert.npy (is this a `pcd prepare scannet-detection` folder?)")
    if vertices.ndim != 2 or vertices.shape[1] < 3 or vertices.dtype.kind != "f":
        raise PcdError(f"{folder / f'{scene}_vert.npy'}: expected float (N, 6) vertices, got {tuple(vertices.shape)}")
    xyz = np.ascontiguousarray(vertices[:, :3], dtype=np.float32)
    rgb = _colors(vertices[:, 3:6], folder, len(xyz)) if vertices.shape[1] >= 6 else None
    if not region:
        return Cloud(spec, xyz, rgb, "scene")
    box = region_box(folder, scene, region)
    inside = np.all((xyz >= box[:3]) & (xyz <= box[3:]), axis=1)
    if not inside.any():
        raise PcdError(f"{spec}: no point of {scene} lies inside the box {box.round(3).tolist()}")
    return Cloud(spec, xyz[inside], rgb[inside] if rgb is not None else None, "region")


def region_box(folder: Path, scene: str, region: str) -> np.ndarray:
    """(6,) min/max corners named by `box=x0,y0,z0,x1,y1,z1` or `object=K`."""
    kind, _, value = region.partition("=")
    if kind == "box":
        try:
            box = np.array([float(v) for v in value.split(",")], dtype=np.float64)
        except ValueError:
            box = np.zeros(0)
        if box.shape != (6,) or not np.isfinite(box).all() or (box[3:] < box[:3]).any():
            raise PcdError(f"{folder}#{scene}:{region}: a box is six numbers x0,y0,z0,x1,y1,z1 with min <= max")
        return box
    if kind == "object":
        path = folder / f"{scene}_bbox.npy"
        boxes = read_npy(path).reshape(-1, 7) if path.is_file() else np.zeros((0, 7))
        if not value.isdigit() or int(value) >= len(boxes):
            raise PcdError(f"{path}: no object {value} (the scene has {len(boxes)} boxes, counted from 0)")
        center, size = boxes[int(value), :3], boxes[int(value), 3:6]
        return np.concatenate([center - size / 2, center + size / 2])
    raise PcdError(f"{folder}#{scene}:{region}: a region is box=x0,y0,z0,x1,y1,z1 or object=K")


def detected_region(run_dir: Path, selector: str, spec: str) -> Cloud:
    """The points of an evaluated scene inside the K-th most confident detected box (`SCENE:detected=K`)."""
    from pcd.trainer.detection.saved import read_saved_detection

    scene, _, region = selector.partition(":")
    kind, _, value = region.partition("=")
    if kind != "detected" or not value.isdigit():
        raise PcdError(f"{spec}: in a detection run folder, name a detected box: SCENE:detected=K")
    saved = read_saved_detection(run_dir)
    if scene not in saved.scenes:
        raise PcdError(f"{saved.results}: scene '{scene}' was not evaluated (it has {', '.join(saved.scenes[:5])})")
    whole = scene_region(saved.data_dir, scene, spec)
    found = saved.boxes(scene, whole.xyz)
    if int(value) >= len(found):
        raise PcdError(f"{saved.results}: {scene} has {len(found)} detected boxes, no box {value} (counted from 0)")
    box = found[int(value), :6].astype(np.float64)
    return scene_region(saved.data_dir, f"{scene}:box={','.join(repr(float(v)) for v in box)}", spec)
