"""`pcd extract-scannet`: stream ScanNet scans into WebDataset shards of coloured point clouds.

Each scene is extracted on its own into `<scene>-NNNNNN.tar` shards (written under a temporary name and
renamed), and the manifest is rewritten atomically after every finished scene. A scene is therefore the
unit of everything: resume skips the scenes the manifest lists and redoes any other from scratch (after
removing its stale shards and temporary files), workers take whole scenes so N workers write exactly the
bytes one worker writes, and later stages select shards by the scenes of a split file. A scene with bad
input fails alone, with one line naming it; the others go on. Within a scene, a background thread reads and
decodes the next kept frame while the current one becomes a cloud (see `read_ahead`). Torch-free by design.
"""

from __future__ import annotations

import ctypes
import queue
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pcd.pipeline.backproject import DOWNSAMPLING, MIN_VOXEL_SIZE, color_decode_reduction, frame_to_cloud
from pcd.pipeline.config import InvalidSetting, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.parts import (COMMAND_OF_STAGE, STAGE_OF_KIND, Part, check_part_spec, parse_part,
                                part_manifest_names, stage_lock)
from pcd.pipeline.read_ahead import read_ahead
from pcd.pipeline.scan_source import ScanSource, open_scan
from pcd.pipeline.schema import (SCHEMA_VERSION, Manifest, ShardWriter, check_output_layout,
                                 manifest_name, read_manifest_file, sample_key, shard_path)
from pcd.pipeline.sens import decode_color
from pcd.pipeline.splits import read_split

SKIP_REASONS = ("invalid_pose", "empty_depth", "too_few_valid_pixels")
COLOR_MAPPING = ("registered streams; colour decoded at half size if >= 2x depth resolution; depth pixel centre "
                 "scaled to decoded colour resolution, nearest pixel")
STAGE = STAGE_OF_KIND["extraction"]
LOCK_NAME = f".{STAGE}.lock"  # the folder's: exclusive for a whole run, shared by parts (see pcd.pipeline.parts)
READ_AHEAD_FRAMES = 1  # decoded frames waiting beside the one being turned into a cloud (memory ~3 frames)


@dataclass
class Config:
    """Options of `pcd extract-scannet`; defaults are the paper's (every 25th frame, 8,192 points)."""

    scans_dir: Path = Path("scans")
    out_dir: Path = Path("extracted")
    split: Optional[Path] = None  # one scene id per line, e.g. scannetv2_train.txt
    scenes: Optional[list[str]] = None  # explicit scene ids (instead of a split file)
    frame_skip: int = setting(25, positive)
    points: int = setting(8192, positive)
    workers: int = setting(1, positive)
    shard_size: int = setting(256, positive)  # samples per shard; a ScanNet scene gives about 64 at frame_skip 25
    # metres; grid before FPS (halved where a frame needs it, see backproject)
    voxel_size: float = setting(0.02, non_negative)
    layout: Literal["auto", "sens", "exported"] = "auto"  # auto: <scene>.sens if present, else exported
    part: Optional[str] = setting(None, check_part_spec)  # 'I/N' or 'slurm': this run's share of the scenes

    def validate(self) -> None:
        if 0 < self.voxel_size < MIN_VOXEL_SIZE:
            raise InvalidSetting("voxel_size", f"must be 0 (no grid) or at least {MIN_VOXEL_SIZE} m")


def content_options(cfg: Config) -> dict[str, Any]:
    """The options that decide the bytes of the shards; an output folder holds one combination only."""
    return {"frame_skip": cfg.frame_skip, "points": cfg.points, "shard_size": cfg.shard_size,
            "voxel_size": cfg.voxel_size, "downsampling": DOWNSAMPLING, "color_mapping": COLOR_MAPPING}


@dataclass
class SceneResult:
    """What one scene produced: its manifest record and shard entries, or the one-line error."""

    scene: str
    record: dict[str, Any] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None


# ---------------------------------------------------------------------------------------------------- scenes


def select_scenes(cfg: Config) -> list[str]:
    """The scenes to extract: the split file's, or --scenes, or every folder under scans_dir (sorted)."""
    if cfg.split is not None and cfg.scenes:
        raise PcdError("give either a split file or a scene list, not both")
    if not Path(cfg.scans_dir).is_dir():
        what = "is a file, not a scans folder" if Path(cfg.scans_dir).exists() else "scans folder does not exist"
        raise PcdError(f"{cfg.scans_dir}: {what}")
    if cfg.split is not None:
        scenes = read_split(cfg.split)
    elif cfg.scenes:
        scenes = [s.strip() for s in cfg.scenes if s.strip()]
    else:
        out_dir = Path(cfg.out_dir).resolve()
        scenes = sorted(p.name for p in Path(cfg.scans_dir).iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.resolve() != out_dir)
        if not scenes:
            raise PcdError(f"{cfg.scans_dir}: no scene folders")
    named_by = cfg.split if cfg.split is not None else "--scenes" if cfg.scenes else cfg.scans_dir
    for scene in scenes:  # a scene id becomes a shard name and a path: `pipe:cmd`, `../x` or `a b` must never be one
        if not SCENE_ID.fullmatch(scene):
            raise PcdError(f"{named_by}: scene id {scene!r} is not a plain name (letters, digits and ._-; "
                           "no ':', '/' or whitespace)")
    if not any((Path(cfg.scans_dir) / scene).is_dir() for scene in scenes):  # a wrong split file or scans folder
        raise PcdError(f"{named_by}: none of its {len(scenes)} scene(s) is a folder in {cfg.scans_dir} "
                       f"(first: {scenes[0]})")
    return list(dict.fromkeys(scenes))  # keep order, drop repeats


SCENE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def shard_name(scene: str, index: int) -> str:
    return f"{scene}-{index:06d}.tar"


def remove_scene_files(out_dir: Path, scene: str) -> None:
    """Delete shards and temporary shard files a run of `scene` left behind (an unfinished scene's debris)."""
    pattern = re.compile(rf"^\.?{re.escape(scene)}-\d{{6}}\.tar(\.tmp-\d+)?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name):
            path.unlink()


# ---------------------------------------------------------------------------------------------------- one scene


@dataclass
class DecodedFrame:
    """A selected frame after the GIL-free steps: its depth and colour decoded, or the reason it is skipped."""

    index: int
    pose: np.ndarray
    color_jpeg: bytes
    skip: Optional[str] = None  # one of SKIP_REASONS
    depth: Optional[np.ndarray] = None
    valid: int = 0
    color: Optional[np.ndarray] = None


def decode_frames(source: ScanSource, cfg: Config) -> Iterator[DecodedFrame]:
    """Read and decode every selected frame: the part of a frame's work (file reads, zlib inflate, JPEG
    decode) that releases the GIL, so that it can run in a thread beside the cloud building."""
    where = f"scene {source.name}"
    reduction = color_decode_reduction(source.color_size, source.depth_size)
    for frame in source.iter_frames(lambda index: index % cfg.frame_skip == 0):
        if not np.isfinite(frame.pose).all():
            yield DecodedFrame(frame.index, frame.pose, frame.color_jpeg, skip="invalid_pose")
            continue
        depth = frame.depth()
        valid = int(np.count_nonzero(depth))
        if valid < cfg.points:
            reason = "empty_depth" if valid == 0 else "too_few_valid_pixels"
            yield DecodedFrame(frame.index, frame.pose, frame.color_jpeg, skip=reason)
            continue
        color = decode_color(frame.color_jpeg, f"{where} frame {frame.index}", reduction, source.color_size)
        yield DecodedFrame(frame.index, frame.pose, frame.color_jpeg, depth=depth, valid=valid, color=color)


def scene_frames(source: ScanSource, frames: Iterable[DecodedFrame], cfg: Config,
                 record: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(frame index, sample members) of every kept frame of `frames` (from `decode_frames`, in order);
    skipped frames go to `record` with their reason."""
    for frame in frames:
        record["frames_selected"] += 1
        if frame.skip is not None:
            record["frames_skipped"][frame.skip].append(frame.index)
            continue
        points, colors = frame_to_cloud(frame.depth, frame.color, source.depth_intrinsics, source.depth_shift,
                                        cfg.points, cfg.voxel_size)
        if not np.isfinite(points).all():
            raise PcdError(f"scene {source.name} frame {frame.index}: the back-projected cloud has non-finite "
                           f"points (depth intrinsics {source.depth_intrinsics.tolist()} in {source.source_file})")
        record["frames_kept"].append(frame.index)
        yield frame.index, {
            "jpg": frame.color_jpeg,
            "points.npy": points,
            "colors.npy": colors,
            "pose.npy": np.ascontiguousarray(frame.pose, dtype=np.float32),
            "intrinsics.npy": np.ascontiguousarray(source.depth_intrinsics, dtype=np.float32),
            "color_intrinsics.npy": np.ascontiguousarray(source.color_intrinsics, dtype=np.float32),
            "json": {"scene": source.name, "frame": frame.index, "valid_depth_pixels": frame.valid,
                     "source_file": record["source_file"], "schema_version": SCHEMA_VERSION},
        }


# A focal length outside these multiples of the image width (height) means a field of view under about 0.6 or
# over about 175 degrees: no depth camera, so a corrupt calibration (fx = 1e30 back-projects to garbage).
FOCAL_RANGE_IN_IMAGE_SIZES = (0.02, 100.0)


def check_calibration(source: ScanSource) -> None:
    k = np.asarray(source.depth_intrinsics)
    if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise PcdError(f"scene {source.name}: invalid depth intrinsics in {source.source_file} "
                       f"(need finite fx, fy > 0, got {k.tolist()})")
    width, height = source.depth_size
    low, high = FOCAL_RANGE_IN_IMAGE_SIZES
    for name, focal, centre, size in (("fx", k[0, 0], k[0, 2], width), ("fy", k[1, 1], k[1, 2], height)):
        if not low * size <= focal <= high * size:
            raise PcdError(f"scene {source.name}: implausible depth intrinsics in {source.source_file} ({name} "
                           f"{focal:g} for a {width}x{height} depth image; expected {low * size:g} to {high * size:g})")
        if not 0 <= centre <= size:
            raise PcdError(f"scene {source.name}: implausible depth intrinsics in {source.source_file} (principal "
                           f"point {centre:g} outside the {width}x{height} depth image)")
    if not source.depth_shift > 0:
        raise PcdError(f"scene {source.name}: invalid depth shift {source.depth_shift} in {source.source_file}")


def extract_scene(scene: str, cfg: Config, on_frame: Callable[[], None] = lambda: None) -> SceneResult:
    """Extract one scene into its shards; never raises for bad input (the error is in the result)."""
    out_dir = Path(cfg.out_dir)
    remove_scene_files(out_dir, scene)
    result = SceneResult(scene)
    writer: Optional[ShardWriter] = None
    try:
        if "." in scene or "/" in scene:
            raise PcdError(f"scene {scene}: scene ids must not contain '.' or '/'")
        with open_scan(Path(cfg.scans_dir) / scene, cfg.layout) as source:
            check_calibration(source)
            record: dict[str, Any] = {
                "source_file": _relative(source.source_file, cfg.scans_dir), "frames_in_scan": source.num_frames,
                "frames_selected": 0, "frames_kept": [], "frames_skipped": {r: [] for r in SKIP_REASONS}}
            with read_ahead(decode_frames(source, cfg), READ_AHEAD_FRAMES) as decoded:
                for index, members in scene_frames(source, decoded, cfg, record):
                    if writer is None:
                        writer = ShardWriter(out_dir / shard_name(scene, len(result.shards)))
                    writer.write(sample_key(scene, index), members)
                    on_frame()
                    if writer.count >= cfg.shard_size:
                        result.shards.append({**writer.close(), "scene": scene})
                        writer = None
            if writer is not None:
                result.shards.append({**writer.close(), "scene": scene})
                writer = None
        record["samples"] = len(record["frames_kept"])
        record["shards"] = [s["name"] for s in result.shards]
        result.record = record
    except (PcdError, OSError) as exc:
        message = str(exc)
        result.error = message if message.startswith(f"scene {scene}") else f"scene {scene}: {message}"
    except BaseException:
        _discard(writer, out_dir, scene)
        raise
    if result.error is not None:
        _discard(writer, out_dir, scene)
        result.shards = []
    return result


def _discard(writer: Optional[ShardWriter], out_dir: Path, scene: str) -> None:
    if writer is not None:
        writer.abort()
    remove_scene_files(out_dir, scene)


def _relative(path: str, root: Path) -> str:
    """`path` relative to the scans folder, so that manifests do not depend on where the data is mounted."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- workers

# glibc's mallopt parameters (malloc.h) and the values extraction sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD_BYTES, MMAP_THRESHOLD_BYTES = 128 << 20, 32 << 20


def reuse_freed_memory() -> None:
    """Make glibc keep and reuse the memory of freed large arrays instead of unmapping it.

    Every kept frame allocates and frees the same few MB (payloads, depth, decoded colour, point arrays).
    By default glibc serves each of these from a fresh mmap or trims it off the heap when freed, so the
    next frame faults the pages in and zeroes them again: ~1,200 page faults and ~1.5-2 ms of system time
    per frame, about a tenth of its cost. Both thresholds must be raised (either alone does not help).
    Memory stays bounded, as frames reuse the same sizes. Process-wide; nothing happens without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    reuse_freed_memory()


def _extract_in_worker(scene: str, cfg: Config) -> SceneResult:
    return extract_scene(scene, cfg, on_frame=lambda: _progress_queue.put(1))


def _results(todo: list[str], cfg: Config, on_frame: Callable[[int], None]) -> Iterator[SceneResult]:
    """Scene results as scenes finish: in-process for one worker, else from a spawn process pool."""
    if cfg.workers <= 1 or len(todo) <= 1:
        for scene in todo:
            yield extract_scene(scene, cfg, lambda: on_frame(1))
        return
    import multiprocessing  # here, not at the top: a one-worker run does not pay for their import
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        pending: set[Future] = {pool.submit(_extract_in_worker, scene, cfg) for scene in todo}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                on_frame(_drain(progress_queue))
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def _drain(progress_queue: Any) -> int:
    """Frames the workers reported since the last call."""
    count = 0
    while True:
        try:
            count += progress_queue.get_nowait()
        except queue.Empty:
            return count


# ---------------------------------------------------------------------------------------------------- manifest


def load_or_create_manifest(cfg: Config, part: Optional[Part]) -> Manifest:
    """This run's manifest in the output folder (the whole one, or its part's), checked against this run's options
    and the folder's other manifests, or a new empty one."""
    out_dir = Path(cfg.out_dir)
    options = content_options(cfg)
    name = manifest_name(part)
    check_output_layout(out_dir, part)
    for other in sorted(part_manifest_names(sorted(p.name for p in out_dir.iterdir())).values()):
        check_options(read_manifest_file(out_dir, other, "extraction"), out_dir / other, options)
    if not (out_dir / name).exists():
        extra: dict[str, Any] = {"failed": {}}
        if part is not None:
            extra["part"] = {"index": part.index, "count": part.count, "finished": False}
        return Manifest(kind="extraction", options=options, shards=[], scenes={}, extra=extra)
    manifest = read_manifest_file(out_dir, name, "extraction")
    check_options(manifest, out_dir, options)
    manifest.extra.setdefault("failed", {})
    if part is not None:
        manifest.extra["part"] = {"index": part.index, "count": part.count, "finished": False}
    return manifest


def check_options(manifest: Manifest, where: Path, options: dict[str, Any]) -> None:
    changed = [f"{k}={manifest.options.get(k)!r} there, {v!r} now" for k, v in options.items()
               if manifest.options.get(k) != v]
    if changed:
        raise PcdError(f"{where}: already holds an extraction made with other options ({'; '.join(changed)}); "
                       "use another output folder or the same options")


def finished_scenes(manifest: Manifest, out_dir: Path) -> set[str]:
    """Scenes the manifest lists whose shards are all still on disk with their recorded size."""
    complete = set(manifest.scenes)
    for shard in manifest.shards:
        path = shard_path(out_dir, shard["name"])
        if not path.is_file() or path.stat().st_size != shard.get("bytes"):
            complete.discard(shard["scene"])
    return complete


def record_scene(manifest: Manifest, result: SceneResult) -> None:
    """Put a finished (or failed) scene into the manifest, keeping its order independent of timing."""
    failed = manifest.extra["failed"]
    if result.error is None:
        manifest.scenes[result.scene] = result.record
        failed.pop(result.scene, None)
    else:
        manifest.scenes.pop(result.scene, None)
        failed[result.scene] = result.error
    manifest.shards = sorted([s for s in manifest.shards if s["scene"] != result.scene] + result.shards,
                             key=lambda s: s["name"])
    manifest.scenes = dict(sorted(manifest.scenes.items()))
    manifest.extra["failed"] = dict(sorted(failed.items()))


# ---------------------------------------------------------------------------------------------------- run


def run(cfg: Config) -> int:
    """Extract the selected scenes; 0 if all are done, 1 if any failed (each failure printed on one line)."""
    reuse_freed_memory()
    out_dir = Path(cfg.out_dir)
    part = parse_part(cfg.part)
    listed = select_scenes(cfg)
    scenes = listed if part is None else [s for s in listed if part.holds(s)]
    out_dir.mkdir(parents=True, exist_ok=True)
    console, errors = Console(), Console(stderr=True)
    name = manifest_name(part)
    with stage_lock(out_dir, STAGE, COMMAND_OF_STAGE[STAGE], part):
        manifest = load_or_create_manifest(cfg, part)
        for stale in out_dir.glob(f".{name}.tmp-*"):  # left by a run killed while writing it
            stale.unlink()
        done = finished_scenes(manifest, out_dir)
        todo = [s for s in scenes if s not in done]
        failed: list[str] = []
        samples = 0
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=errors, transient=True)
        with progress:
            scene_task = progress.add_task("scenes", total=len(todo), rate="")
            frame_task = progress.add_task("frames", total=None, rate="")

            def on_frame(count: int) -> None:
                progress.advance(frame_task, count)
                speed = progress.tasks[frame_task].speed
                progress.update(frame_task, rate=f"{speed:.1f} frames/s" if speed else "")

            for result in _results(todo, cfg, on_frame):
                record_scene(manifest, result)
                manifest.write(out_dir, name)
                progress.advance(scene_task)
                if result.error is not None:
                    failed.append(result.scene)
                    progress.console.print(f"error: {result.error}", markup=False, highlight=False,
                                           soft_wrap=True)
                else:
                    samples += result.record["samples"]
                    if result.record["samples"] == 0:
                        progress.console.print(f"warning: {empty_scene_reason(result.scene, result.record, cfg)}",
                                               markup=False, highlight=False, soft_wrap=True)
        if part is not None:
            manifest.extra["part"]["finished"] = True
        manifest.write(out_dir, name)  # also when nothing was to do: an empty folder gets its (empty) manifest too
    skipped = len(scenes) - len(todo)
    share = "" if part is None else f"part {part}: {len(scenes)} of the {len(listed)} scenes; "
    console.print(f"extract-scannet: {share}{len(todo) - len(failed)} scene(s) extracted, {skipped} already done, "
                  f"{len(failed)} failed; {samples} new samples; {manifest.num_samples} samples in "
                  f"{len(manifest.shards)} shards in {out_dir}/{name}", markup=False, highlight=False,
                  soft_wrap=True)
    if failed:
        console.print(f"failed scenes (rerun the same command after fixing them): {', '.join(failed)}",
                      markup=False, highlight=False, soft_wrap=True)
    if manifest.num_samples == 0 and scenes:
        errors.print(f"error: {out_dir / name} holds no sample: every frame of every scene was dropped "
                     f"(see the warnings above; is --points {cfg.points} more than the frames have?)",
                     markup=False, highlight=False, soft_wrap=True)
        return 1
    return 1 if failed else 0


def empty_scene_reason(scene: str, record: dict[str, Any], cfg: Config) -> str:
    """The warning for a scene that yields no sample: how many frames were dropped for which reason."""
    reasons = ", ".join(f"{len(frames)} {reason}" for reason, frames in record["frames_skipped"].items() if frames)
    return (f"scene {scene} yielded no sample: all {record['frames_selected']} selected frames were dropped "
            f"({reasons or 'none selected'}; --points {cfg.points}, --frame-skip {cfg.frame_skip})")
