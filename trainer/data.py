"""Streaming the shards for pre-training: shard selection by split, WebDataset loaders, augmentation.

The shards are those of `pcd cache-teacher` (training shards, with the teacher's targets) or, for objectives that
need no teacher, those of `pcd extract-scannet`; each objective names the members it reads (`members`), and only
those are decoded. Each sample is read from its tar shard, every member decoded explicitly by `decode_sample` (never
WebDataset's pickle-capable default decoders), then a random `num_points` of the stored camera-frame points are
rotated into the scan's gravity frame and normalised with the ONE normalisation of `pcd.trainer.normalize`, and
scaled and translated at random as Point-MAE's PointcloudScaleAndTranslate.

Shards are read from a folder, a brace pattern of shards or a URL (s3://, gs://, http(s)://; see
`pcd.pipeline.locations`), with the manifest from the same place; a `pipe:` command only with allow_pipe.

Training streams are infinite per rank and worker (each worker cycles over its own shards) and the runtime takes
`steps_per_epoch(...)` batches from them: every rank gets the same number of batches however unevenly the shards
split. Everything random is drawn from generators seeded by (seed, epoch, rank, worker), so an epoch's batches are
the same on every run with the same seed, world size and worker count: that is what makes resume exact.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from pcd.pipeline.errors import PcdError
from pcd.pipeline.locations import Location, parse_source
from pcd.pipeline.schema import (EXTRACTION_MEMBERS, MANIFEST_NAME, OPTIONAL_MEMBERS, TRAINING_MEMBERS, decode_sample,
                                 read_manifest, shard_path)
from pcd.pipeline.splits import read_split
from pcd.trainer.normalize import camera_to_gravity, normalize_points

POINT_MEMBERS = ("points.npy", "pose.npy")  # the cloud, and the pose that rotates it into the gravity frame
NEEDED_MEMBERS = (*POINT_MEMBERS, "prefix.npy", "clip.npy")  # what the loaders read unless told otherwise
# The command that writes each member a loader can read: named in the error when shards lack one.
MEMBER_SOURCES = {"points.npy": "pcd extract-scannet", "pose.npy": "pcd extract-scannet",
                  "prefix.npy": "pcd cache-teacher", "clip.npy": "pcd cache-teacher",
                  "patch_tokens.npy": "pcd cache-teacher --patch-tokens",
                  "patch_camera.npy": "pcd cache-teacher --patch-tokens"}
PATCH_MEMBERS = ("patch_tokens.npy", "patch_camera.npy")
_MEMBER_DTYPES = {name: dtype for name, (dtype, _) in {**TRAINING_MEMBERS, **OPTIONAL_MEMBERS}.items()}
# Batch entry of each teacher member (the points and pose together make the batch's "points"; with patch tokens
# the batch also carries "points_cam", the same points in the camera frame, to project the patch centres).
_TARGET_KEYS = {"prefix.npy": "prefix", "clip.npy": "clip", "patch_tokens.npy": "patch_tokens",
                "patch_camera.npy": "patch_camera"}
SCALE_RANGE = (2.0 / 3.0, 3.0 / 2.0)  # Point-MAE PointcloudScaleAndTranslate, per axis
TRANSLATE_RANGE = (-0.2, 0.2)


@dataclass
class ShardSelection:
    """The shards of the chosen scenes, and what the manifest says about them."""

    shards_dir: str  # the source as given: a folder, a shard pattern or a URL
    location: Location  # the folder the manifest and the shards are read from
    urls: list[str]
    samples_per_url: dict[str, int]  # what the manifest lists, checked against what each shard yields
    scenes: list[str]  # sorted scene ids present in the selected shards
    num_samples: int
    teacher: Optional[dict[str, Any]]  # the manifest's teacher; None for extraction shards
    missing: list[str]  # scenes the split names that have no shard here (e.g. an unfinished extraction)
    members: frozenset[str] = frozenset()  # the .npy members every sample carries, by the manifest's kind

    def require(self, members: Iterable[str], what: str) -> None:
        """Refuse shards that lack a member `what` (e.g. "objective 'distill'") needs, naming the command that
        writes it."""
        for member in members:
            if member not in self.members:
                source = MEMBER_SOURCES.get(member, "another pcd command")
                raise PcdError(f"{self.shards_dir}: {what} needs the shard member {member}, which these shards lack "
                               f"(`{source}` writes it)")


def select_shards(shards_dir: Path | str, split: Optional[Path], only_scenes: Optional[Iterable[str]] = None,
                  allow_pipe: bool = False) -> ShardSelection:
    """The shards whose scene is in `split` (or in `only_scenes`; all shards when both are None), of
    `pcd cache-teacher` (training shards) or `pcd extract-scannet` (extraction shards: no teacher), among those
    `shards_dir` names: a folder or folder URL (every shard of its manifest), or a brace pattern (those of its
    manifest it matches)."""
    location, chosen = parse_source(shards_dir, allow_pipe)
    where = location.url(MANIFEST_NAME)
    manifest = read_manifest(location)
    if manifest.kind not in ("training", "extraction"):
        raise PcdError(f"{where}: a '{manifest.kind}' manifest, expected the output of pcd cache-teacher or "
                       "pcd extract-scannet")
    teacher = manifest.extra.get("teacher") if manifest.kind == "training" else None
    needed = ("prefix_length", "prefix_dim", "clip_dim")
    if manifest.kind == "training" and (not isinstance(teacher, dict) or any(k not in teacher for k in needed)):
        raise PcdError(f"{where}: no 'teacher' with {', '.join(needed)} (was it written by pcd cache-teacher?)")
    if chosen is not None:
        unknown = sorted(set(chosen) - {entry["name"] for entry in manifest.shards})
        if unknown:
            raise PcdError(f"{shards_dir}: names {len(unknown)} shard(s) its folder's manifest does not list "
                           f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    wanted = set(read_split(split)) if split is not None else set(only_scenes) if only_scenes is not None else None
    urls, scenes, samples, per_url = [], set(), 0, {}
    for entry in manifest.shards:
        scene = entry.get("scene")
        if scene is None:
            raise PcdError(f"{where}: shard {entry.get('name')} does not name its scene")
        if (wanted is not None and scene not in wanted) or (chosen is not None and entry["name"] not in chosen):
            continue
        url = _shard_url(location, entry)
        if entry["samples"] > 0:
            urls.append(url)
            per_url[url] = int(entry["samples"])
            scenes.add(scene)
            samples += int(entry["samples"])
    if not urls:
        what = f"scenes of {split}" if split is not None else "scenes"
        raise PcdError(f"{shards_dir}: no training samples for the {what}")
    missing = sorted(wanted - scenes) if wanted is not None else []
    members = set(TRAINING_MEMBERS if manifest.kind == "training" else EXTRACTION_MEMBERS)
    patch_tokens = (manifest.options.get("output") or {}).get("patch_tokens") if manifest.kind == "training" else None
    if patch_tokens:
        members.update(PATCH_MEMBERS)
        teacher = {**teacher, "patch_tokens": patch_tokens}
    return ShardSelection(str(shards_dir), location, urls, per_url, sorted(scenes), samples,
                          dict(teacher) if teacher else None, missing, frozenset(members))


def _shard_url(location: Location, entry: dict[str, Any]) -> str:
    """Where the manifest entry's shard is read from; a local one is checked against its recorded size first."""
    if location.kind != "local":
        return location.url(entry["name"])  # a plain file name (read_manifest checked it), under the manifest's URL
    path = shard_path(Path(location.base), entry["name"]).absolute()  # a path, never a URL webdataset interprets
    if not path.is_file():
        raise PcdError(f"{path}: listed in the manifest but missing")
    size, listed = path.stat().st_size, entry.get("bytes")
    if listed is not None and size != listed:  # a truncated copy would otherwise crash a loader worker mid-epoch
        raise PcdError(f"{path}: {size} bytes, the manifest lists {listed} (truncated or replaced?)")
    return str(path)


def _worker_id() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ProcessStage:
    """WebDataset stage: decode, check, sample points, normalise, augment; optional seeded shuffle buffer.

    Training: its random generator is created on first use inside each worker from (seed, epoch, rank, worker) and
    then kept, so re-iterating the shards (the infinite training stream) keeps drawing fresh subsets.
    Validation (`per_sample_seed`): each sample's points come from a generator seeded by (seed, sample key), so the
    validation loss does not depend on how many ranks or workers read the shards.
    """

    def __init__(self, num_points: int, teacher: Optional[dict[str, Any]], seed: int, epoch: int, rank: int,
                 augment: bool, shuffle_buffer: int, per_sample_seed: bool = False,
                 members: Sequence[str] = NEEDED_MEMBERS):
        self.per_sample_seed = per_sample_seed
        self.num_points = num_points
        self.members = tuple(dict.fromkeys((*POINT_MEMBERS, *members)))
        self.target_shapes: dict[str, tuple[int, ...]] = {}
        if teacher is not None:
            self.target_shapes = {"prefix.npy": (int(teacher["prefix_length"]), int(teacher["prefix_dim"])),
                                  "clip.npy": (int(teacher["clip_dim"]),)}
            patches = teacher.get("patch_tokens")
            if patches:
                self.target_shapes["patch_tokens.npy"] = (int(patches["grid"]) ** 2, int(patches["width"]))
                self.target_shapes["patch_camera.npy"] = (3, 3)
        unknown = [m for m in self.members if m not in MEMBER_SOURCES]
        if unknown:
            raise ValueError(f"no loader for shard member(s) {', '.join(unknown)}")
        self.seed_parts = [seed, epoch, rank]
        self.augment = augment
        self.shuffle_buffer = shuffle_buffer
        self._rng: Optional[np.random.Generator] = None

    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng([*self.seed_parts, _worker_id()[0]])
        return self._rng

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
        rng = self.rng()
        samples = (self.process(raw, rng) for raw in source)
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, np.ndarray]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def process(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
        missing = [m for m in self.members if m not in raw]
        if missing:
            raise PcdError(f"{where} lacks {missing[0]} (`{MEMBER_SOURCES[missing[0]]}` writes it)")
        sample = decode_sample({"__key__": raw.get("__key__"), **{m: raw[m] for m in self.members}},
                               str(raw.get("__url__", "?")))
        for name in self.members:
            array = sample[name]
            expected = _MEMBER_DTYPES[name]
            if array.dtype != np.dtype(expected):
                raise PcdError(f"{where}: {name} is {array.dtype}, the training schema stores {expected}")
            if not np.isfinite(array).all():
                raise PcdError(f"{where}: {name} holds non-finite values (NaN or infinity)")
        points, pose = sample["points.npy"], sample["pose.npy"]
        if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or pose.shape != (4, 4):
            raise PcdError(f"{where}: points {list(points.shape)} / pose {list(pose.shape)} are not (N>0,3) / (4,4)")
        out = {}
        for member, key in _TARGET_KEYS.items():
            if member not in self.members:
                continue
            expected = self.target_shapes.get(member)
            if expected is None:
                raise PcdError(f"{where}: {member} read, but the manifest names no teacher")
            if tuple(sample[member].shape) != expected:
                raise PcdError(f"{where}: {key} {list(sample[member].shape)} does not match the manifest's teacher "
                               f"{list(expected)}")
            out[key] = sample[member].astype(np.float32)
        if self.per_sample_seed:
            rng = np.random.default_rng([self.seed_parts[0], zlib.crc32(str(raw.get("__key__")).encode())])
        chosen = self.subset(points, rng)
        if "patch_tokens" in out:
            out["points_cam"] = chosen
        return {"points": self.transform(chosen, pose, rng), **out}

    def points(self, points: np.ndarray, pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random num_points subset (with repeats only if the frame has fewer), gravity frame, unit sphere."""
        return self.transform(self.subset(points, rng), pose, rng)

    def subset(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        replace = len(points) < self.num_points
        return points[rng.choice(len(points), self.num_points, replace=replace)].astype(np.float32)

    def transform(self, chosen: np.ndarray, pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Camera-frame points -> gravity frame, unit sphere, then the random scale and shift when augmenting."""
        normalized, _, _ = normalize_points(camera_to_gravity(chosen, pose.astype(np.float32)))
        if self.augment:
            scale = rng.uniform(*SCALE_RANGE, size=3).astype(np.float32)
            shift = rng.uniform(*TRANSLATE_RANGE, size=3).astype(np.float32)
            normalized = normalized * scale + shift
        return np.ascontiguousarray(normalized, dtype=np.float32)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def _cycle(source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Repeat this worker's shard list forever (it is never empty, see `train_loader`)."""
    shards = list(source)
    while shards:
        yield from shards


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Batches per rank per epoch: the selected samples over the global batch, at least one."""
    return max(1, num_samples // global_batch_size)


def train_loader(selection: ShardSelection, *, batch_size: int, num_points: int, seed: int, epoch: int,
                 rank: int, world_size: int, workers: int, augment: bool = True, shuffle_buffer: int = 512,
                 pin_memory: bool = False, members: Sequence[str] = NEEDED_MEMBERS
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of this rank's batches for `epoch` (the caller takes steps_per_epoch of them).

    The shard order is a permutation seeded by (seed, epoch), then split by node and by worker; the list is repeated
    until every worker of every rank has at least one shard, so no rank or worker ever runs dry.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(selection.urls))
    urls = [selection.urls[i] for i in order]
    slots = world_size * max(1, workers)
    urls = urls * math.ceil(slots / len(urls))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        _cycle,
        _CheckedShards(selection.samples_per_url, selection.location),
        _ProcessStage(num_points, selection.teacher, seed, epoch, rank, augment, shuffle_buffer, members=members),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    return _loader(pipeline, workers, pin_memory)


def val_loader(selection: ShardSelection, *, batch_size: int, num_points: int, seed: int, workers: int,
               pin_memory: bool = False, members: Sequence[str] = NEEDED_MEMBERS) -> Iterable[dict[str, torch.Tensor]]:
    """Every held-out sample once, split over ranks: fixed point subsets, no augmentation, no shuffling."""
    dataset = wds.DataPipeline(wds.SimpleShardList(selection.urls), wds.split_by_node, wds.split_by_worker,
                               _CheckedShards(selection.samples_per_url, selection.location))
    dataset = dataset.compose(_ProcessStage(num_points, selection.teacher, seed, 0, 0, augment=False,
                                            shuffle_buffer=0, per_sample_seed=True, members=members))
    dataset = dataset.compose(wds.batched(batch_size, collation_fn=collate, partial=True))
    workers = min(workers, len(selection.urls))
    return _loader(dataset, workers, pin_memory)


class _CheckedShards:
    """WebDataset stage: the samples of each shard, then a check that the shard held as many as its manifest entry.

    A shard damaged in place (same size, zeroed header) reads as a shorter or empty tar without any error; unchecked,
    it would silently drop samples, or make the endless training stream spin forever on shards that yield nothing.
    """

    def __init__(self, samples_per_url: dict[str, int], location: Location):
        self.samples_per_url = samples_per_url
        self.location = location

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            count = 0
            for sample in tar_samples(self.location, shard["url"]):
                count += 1
                yield sample
            expected = self.samples_per_url[shard["url"]]
            if count != expected:
                raise PcdError(f"{shard['url']}: {count} samples read, the manifest lists {expected} (damaged shard?)")


def tar_samples(location: Location, url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard of `location`. A local one is opened with `open()`: never through webdataset's
    `gopen`, whose `pipe:` scheme runs the name in a shell and whose GOPEN_REWRITE setting can turn a path into any
    URL; a URL through fsspec; a `pipe:` command (allowed by the user) through webdataset's opener."""
    try:
        stream = location.open_url(url)
    except OSError as exc:
        raise PcdError(f"{url}: cannot open the shard ({exc.strerror or exc})") from None
    with stream:
        files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": stream}]), handler=_unreadable_shard)
        yield from wds.tariterators.group_by_keys(files, handler=_unreadable_shard)


def _unreadable_shard(exn: Exception) -> bool:
    """webdataset's error handler: a damaged shard stops the run with one line naming it (never skipped, which
    would silently change the data). webdataset appends the shard's url to the exception's args."""
    url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "a training shard"
    reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
    raise PcdError(f"{url}: not a readable tar shard ({type(exn).__name__}: {reason})") from None


def _loader(dataset: Any, workers: int, pin_memory: bool) -> Any:
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=False)

