"""The shard schema of both stages, versioned in one place.

Shards are plain POSIX tar files in the WebDataset layout: the members of one sample share a key
(``<scene>_<frame:06d>``) and differ by extension. Every member is decoded explicitly by its extension
(npy with ``allow_pickle=False``, json, utf-8 text, raw JPEG bytes): nothing is ever unpickled, unlike
WebDataset's default decoders. Writing uses the standard library only, so stage one never imports torch.

Extraction sample (``kind = "extraction"``):
    jpg             original JPEG bytes of the colour frame, as stored in the .sens file (not re-encoded)
    points.npy      float32 (N, 3) camera-frame points in metres (x right, y down, z forward)
    colors.npy      uint8 (N, 3) RGB per point
    pose.npy        float32 (4, 4) camera-to-world pose of the frame
    intrinsics.npy  float32 (3, 3) depth intrinsics
    color_intrinsics.npy  float32 (3, 3) colour intrinsics (optional: shards extracted before it lack it)
    json            scene, frame index, valid depth pixels, source file, schema version

Training sample (``kind = "training"``): the extraction members except ``jpg``, plus
    prefix.npy      float16 (L, D) ClipCap semantic prefix (10 x 768 for the paper's teacher)
    clip.npy        float16 (E,) unnormalised CLIP image embedding (512 for ViT-B/32)
    caption.txt     optional decoded caption
    patch_tokens.npy  float16 (g*g, W) CLIP's patch tokens, row-major over the g x g grid (``--patch-tokens``)
    patch_camera.npy  float32 (3, 3) the colour intrinsics carried through the teacher's resize and centre crop:
                    maps camera-frame points to pixels of the crop, measured from its top-left corner (edge
                    convention: pixel i spans [i, i+1)) (``--patch-tokens``)
    jpg             only with ``--keep-images``
and the json gains the teacher identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from pcd.pipeline.atomic import atomic_write_json, failed_write_removes, is_no_space, no_space, temporary_path
from pcd.pipeline.errors import PcdError
from pcd.pipeline.locations import Location, as_location
from pcd.pipeline.parts import PART_MANIFEST, Part, part_manifest_names, scene_part

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A shard is named by a plain file name in its manifest's folder: no folder part (no `../x.tar`, no absolute path),
# no URL scheme (`pipe:...` would run a shell inside webdataset), no hidden or temporary name.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.tar")

EXTRACTION_MEMBERS: dict[str, tuple[str, tuple[int | None, ...] | None]] = {
    "points.npy": ("float32", (None, 3)),
    "colors.npy": ("uint8", (None, 3)),
    "pose.npy": ("float32", (4, 4)),
    "intrinsics.npy": ("float32", (3, 3)),
}
TRAINING_MEMBERS: dict[str, tuple[str, tuple[int | None, ...] | None]] = {
    **EXTRACTION_MEMBERS,
    "prefix.npy": ("float16", (None, None)),
    "clip.npy": ("float16", (None,)),
}
# Members a sample may carry (checked when present): newer extractions' colour intrinsics, and the teacher's patch
# tokens with their crop camera from `pcd cache-teacher --patch-tokens`.
OPTIONAL_MEMBERS: dict[str, tuple[str, tuple[int | None, ...] | None]] = {
    "color_intrinsics.npy": ("float32", (3, 3)),
    "patch_tokens.npy": ("float16", (None, None)),
    "patch_camera.npy": ("float32", (3, 3)),
}


def sample_key(scene: str, frame: int) -> str:
    return f"{scene}_{frame:06d}"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_npy(path: Path) -> np.ndarray:
    """A plain .npy file, never unpickled; the error names the file (numpy's advice, to allow pickles, is not
    taken)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = "not a plain .npy array" if "pickle" in str(exc) else str(exc)
        raise PcdError(f"{path}: cannot read ({reason})") from None


def encode_member(extension: str, value: Any) -> bytes:
    """Bytes for one member, chosen by its extension."""
    if extension.endswith(".npy"):
        return encode_npy(value)
    if extension == "json":
        return json.dumps(value, sort_keys=True).encode()
    if extension.endswith(".txt"):
        return str(value).encode("utf-8")
    if extension == "jpg":
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError("jpg members are stored as the original JPEG bytes")
        return bytes(value)
    raise ValueError(f"no encoder for member extension '{extension}'")


def decode_member(extension: str, data: bytes) -> Any:
    """Decode one member by its extension; never unpickles."""
    if extension.endswith(".npy"):
        return decode_npy(data)
    if extension == "json":
        return json.loads(data)
    if extension.endswith(".txt"):
        return data.decode("utf-8")
    if extension == "jpg":
        return bytes(data)
    raise ValueError(f"no decoder for member extension '{extension}'")


def decode_sample(raw: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Decode a raw WebDataset sample (bytes per extension); keys starting with '__' pass through.

    Raises PcdError naming `where` (the shard), the sample key and the member that cannot be decoded.
    """
    decoded = {}
    for name, value in raw.items():
        if name.startswith("__"):
            decoded[name] = value
            continue
        try:
            decoded[name] = decode_member(name, value)
        except Exception as exc:  # a bad npy header, an object array, broken json or utf-8: one line, not a traceback
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise PcdError(f"{where or raw.get('__url__', '?')}: member {raw.get('__key__', '?')}.{name} cannot "
                           f"be decoded ({reason})") from None
    return decoded


def check_sample(sample: dict[str, Any], kind: str, where: str) -> None:
    """Raise PcdError naming `where` unless `sample` carries the members of a `kind` sample."""
    members = EXTRACTION_MEMBERS if kind == "extraction" else TRAINING_MEMBERS
    required = set(members) | {"json"} | ({"jpg"} if kind == "extraction" else set())
    missing = sorted(required - set(sample))
    if missing:
        raise PcdError(f"{where}: sample {sample.get('__key__', '?')} is not a {kind} sample (missing {', '.join(missing)})")
    key = sample.get('__key__', '?')
    present = {**members, **{k: v for k, v in OPTIONAL_MEMBERS.items() if k in sample}}
    for name, (dtype, shape) in present.items():
        array = sample[name]
        if str(array.dtype) != dtype or (shape and (array.ndim != len(shape) or any(
                s is not None and s != a for s, a in zip(shape, array.shape)))):
            raise PcdError(f"{where}: {key}.{name} has {array.dtype}{list(array.shape)}, "
                           f"schema {SCHEMA_VERSION} wants {dtype}{list(shape or [])}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise PcdError(f"{where}: {key}.{name} holds non-finite values (NaN or infinity)")
    if not isinstance(sample["json"], dict):
        raise PcdError(f"{where}: {key}.json is a {type(sample['json']).__name__}, not a JSON object")


class ShardWriter:
    """Writes one tar shard under a temporary name and renames it into place on `close`.

    A shard that exists under its final name is therefore always complete; an interrupted write leaves
    only a temporary file, which the next run overwrites.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_path(self.path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self.count = 0
        self.keys: list[str] = []

    def write(self, key: str, members: dict[str, Any]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/'")
        encoded = [(extension, encode_member(extension, value)) for extension, value in members.items()]
        try:
            for extension, data in encoded:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mtime = 0  # byte-identical shards for identical content
                info.mode = 0o644
                self._tar.addfile(info, io.BytesIO(data))
        except OSError as exc:  # a full disk: the half-written shard goes, the error names it
            self.abort()
            raise no_space(self.path) if is_no_space(exc) else exc from None
        self.count += 1
        self.keys.append(key)

    def close(self) -> dict[str, Any]:
        """Finish the shard; returns its manifest entry (name, samples, sha256, bytes)."""
        with failed_write_removes(self._tmp, self.path):
            self._tar.close()
            with open(self._tmp, "rb") as f:
                os.fsync(f.fileno())
            digest = sha256_file(self._tmp)
            size = self._tmp.stat().st_size
            os.replace(self._tmp, self.path)
        return {"name": self.path.name, "samples": self.count, "sha256": digest, "bytes": size}

    def abort(self) -> None:
        """Drop the shard being written. Never raises for the disk: on a full disk, closing the tar flushes into
        the same error, and the temporary file must go all the same."""
        with contextlib.suppress(OSError):
            self._tar.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_of(location: Location, url: str) -> str:
    """The sha256 of the file `url` of `location` (a local path, or streamed from a URL)."""
    if location.kind == "local":
        return sha256_file(Path(url))
    h = hashlib.sha256()
    with location.open_url(url) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_shard(path: Path | str, location: Optional[Location] = None) -> Iterator[dict[str, Any]]:
    """Raw samples of a shard in file order: {'__key__', '__url__', extension: bytes}. Torch-free. A shard of a
    remote `location` (its `url(name)` as `path`) is streamed through its opener."""
    current: dict[str, Any] | None = None
    try:
        with contextlib.ExitStack() as stack:
            if location is None or location.kind == "local":
                path = Path(path)
                tar = stack.enter_context(tarfile.open(path, "r"))
            else:
                tar = stack.enter_context(tarfile.open(fileobj=stack.enter_context(location.open_url(str(path))),
                                                       mode="r|"))
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                key, _, extension = base.partition(".")
                data = tar.extractfile(info).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": str(path)}
                current[extension] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PcdError(f"{path}: not a readable tar shard ({exc})") from None
    if current is not None:
        yield current


@dataclass
class Manifest:
    """The JSON file beside a set of shards: what is there, how it was made, and what was skipped."""

    kind: str  # "extraction" or "training"
    options: dict[str, Any]
    shards: list[dict[str, Any]]
    scenes: dict[str, dict[str, Any]]
    extra: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind": self.kind, "options": self.options,
                "num_samples": self.num_samples, "shards": self.shards, "scenes": self.scenes, **self.extra}

    def write(self, folder: Path, name: str = MANIFEST_NAME) -> None:
        """Write atomically as `name` (manifest.json, or a part's manifest.part-I-of-N.json) in `folder`."""
        atomic_write_json(Path(folder) / name, self.to_json())


def shard_path(folder: Path, name: Any) -> Path:
    """The file of the shard a manifest in `folder` calls `name`; refuses anything but a plain shard file name."""
    _check_shard_name(Path(folder) / MANIFEST_NAME, name)
    return Path(folder) / name


def _check_shard_name(manifest: Any, name: Any) -> None:
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise PcdError(f"{manifest}: shard name {name!r} is not a plain file name "
                       "(letters, digits and ._- ending in .tar)")


def read_manifest(folder: Path | str | Location, kind: str | None = None) -> Manifest:
    """Read and check the manifest of a shard folder (a path, a folder URL or a Location) against its schema; `kind`
    names the stage that must have written it. Every shard name is checked to be a plain file name (see
    `shard_path`), so a hostile manifest can make pcd neither read nor write outside its folder, nor hand webdataset
    a `pipe:` command.

    A folder written in parts (`--part I/N`) holds `manifest.part-I-of-N.json` files: they are merged, refusing
    missing parts, mixed part counts, scenes or shards listed by two parts, and parts made with other options. A
    `manifest.json` beside them must be their merge (`pcd manifest merge` writes it), else it is refused as stale.
    Where the store cannot list its files (plain HTTP), only `manifest.json` is read."""
    location = as_location(folder)
    parts = part_manifest_names(location.names())
    if not parts:
        return read_manifest_file(location, MANIFEST_NAME, kind)
    merged = merge_parts(location, {part: read_manifest_file(location, name, kind) for part, name in parts.items()})
    try:
        whole = read_manifest_file(location, MANIFEST_NAME, kind, required=False)
    except FileNotFoundError:
        return merged
    where = location.url(MANIFEST_NAME)
    if "merged_parts" not in whole.extra:
        raise PcdError(f"{where}: a whole run's manifest beside part manifests ({', '.join(sorted(parts.values()))}); "
                       "a folder holds one run's output, whole or in parts")
    if whole.to_json() != merged.to_json():
        raise PcdError(f"{where}: differs from the merge of the part manifests beside it (a part ran again since "
                       f"the merge?); run `pcd manifest merge {location}` again")
    return whole


def read_manifest_file(folder: Path | str | Location, name: str = MANIFEST_NAME, kind: str | None = None,
                       required: bool = True) -> Manifest:
    """Read and check one manifest file `name` of `folder` (the whole one, or one part's). A missing file is a
    PcdError, or FileNotFoundError when not `required`."""
    location = as_location(folder)
    path = location.url(name)
    try:
        raw = location.read_bytes(name)
    except FileNotFoundError:
        if not required:
            raise
        raise PcdError(f"{path}: no manifest (is {location} an output folder of pcd?)") from None
    except IsADirectoryError:
        raise PcdError(f"{path}: a folder, not a manifest file") from None
    except OSError as exc:
        raise PcdError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PcdError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise PcdError(f"{path}: not valid JSON ({exc.reason})") from None
    if not isinstance(data, dict):
        raise PcdError(f"{path}: a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PcdError(f"{path}: shard schema version {version}, this pcd reads version {SCHEMA_VERSION}")
    if kind is not None and data.get("kind") != kind:
        raise PcdError(f"{path}: a '{data.get('kind')}' manifest, expected '{kind}'")
    for key, kind_of in (("options", dict), ("shards", list), ("scenes", dict)):
        if not isinstance(data.get(key, kind_of()), kind_of):
            raise PcdError(f"{path}: '{key}' is a {type(data[key]).__name__}, not a JSON "
                           f"{'list' if kind_of is list else 'object'}")
    shards = data.get("shards", [])
    names: set[str] = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise PcdError(f"{path}: shards[{i}] is a {type(entry).__name__}, not an object")
        if "name" not in entry:
            raise PcdError(f"{path}: shards[{i}] has no 'name'")
        _check_shard_name(path, entry["name"])
        if entry["name"] in names:
            raise PcdError(f"{path}: shard {entry['name']} is listed twice")
        names.add(entry["name"])
        samples = entry.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise PcdError(f"{path}: shard {entry['name']} has no sample count ('samples': {samples!r})")
        for field_name, field_type in (("scene", str), ("sha256", str), ("source_sha256", str), ("bytes", int)):
            if field_name in entry and not isinstance(entry[field_name], field_type):
                raise PcdError(f"{path}: shard {entry['name']} has a bad '{field_name}' ({entry[field_name]!r})")
    part = data.get("part")
    if name != MANIFEST_NAME and (not isinstance(part, dict) or [part.get("index"), part.get("count")] !=
                                  [int(n) for n in PART_MANIFEST.fullmatch(name).groups()]):
        raise PcdError(f"{path}: its 'part' ({part!r}) is not the part its name says")
    known = {"schema_version", "kind", "options", "num_samples", "shards", "scenes"}
    return Manifest(kind=data["kind"], options=data.get("options", {}), shards=shards,
                    scenes=data.get("scenes", {}), extra={k: v for k, v in data.items() if k not in known})


def content(manifest: Manifest) -> dict[str, Any]:
    """What must be equal in every part of one output: the options that decide the shards' bytes (an extraction's
    options; a training output's teacher, output options and extraction options), not where or how fast a part ran."""
    if manifest.kind == "extraction":
        return {"kind": manifest.kind, "options": manifest.options}
    extraction = manifest.extra.get("extraction")
    return {"kind": manifest.kind, "teacher": manifest.extra.get("teacher"), "output": manifest.options.get("output"),
            "extraction": extraction.get("options") if isinstance(extraction, dict) else None}


def merge_parts(location: Location, parts: dict[Part, Manifest]) -> Manifest:
    """The one manifest of a folder written in parts, refusing mixed part counts, missing parts, parts made with
    other options, and any scene or shard listed by two parts (or by a part it does not hash to)."""
    counts = sorted({part.count for part in parts})
    if len(counts) > 1:
        raise PcdError(f"{location}: part manifests of different part counts ({', '.join(map(str, counts))}: "
                       f"{', '.join(sorted(p.manifest_name for p in parts))}); a folder holds the parts of one "
                       "--part I/N split")
    count = counts[0]
    missing = [i for i in range(count) if Part(i, count) not in parts]
    if missing:
        raise PcdError(f"{location}: part(s) {', '.join(f'{i}/{count}' for i in missing)} have no manifest yet "
                       "(still running, or not started?)")
    ordered = [parts[Part(i, count)] for i in range(count)]
    first = ordered[0]
    owner_of_scene: dict[str, Part] = {}
    owner_of_shard: dict[str, Part] = {}
    for index, manifest in enumerate(ordered):
        part = Part(index, count)
        where = location.url(part.manifest_name)
        if content(manifest) != content(first):
            raise PcdError(f"{where}: made with other options than {location.url(Part(0, count).manifest_name)} "
                           f"({content(manifest)} vs {content(first)})")
        failed = manifest.extra.get("failed") or {}
        scenes = [*manifest.scenes, *failed, *(s["scene"] for s in manifest.shards if "scene" in s)]
        for scene in dict.fromkeys(scenes):
            if scene in owner_of_scene:
                raise PcdError(f"{where}: scene {scene} is also listed by "
                               f"{location.url(owner_of_scene[scene].manifest_name)} (overlapping parts)")
            if not part.holds(scene):
                raise PcdError(f"{where}: scene {scene} belongs to part {scene_part(scene, count)}/{count}, "
                               f"not {part}")
            owner_of_scene[scene] = part
        for shard in manifest.shards:
            if shard["name"] in owner_of_shard:
                raise PcdError(f"{where}: shard {shard['name']} is also listed by "
                               f"{location.url(owner_of_shard[shard['name']].manifest_name)} (overlapping parts)")
            owner_of_shard[shard["name"]] = part
    extra = {k: v for k, v in first.extra.items() if k != "part"}
    if any("failed" in m.extra for m in ordered):
        extra["failed"] = dict(sorted((k, v) for m in ordered for k, v in (m.extra.get("failed") or {}).items()))
    extra["merged_parts"] = count
    return Manifest(kind=first.kind, options=first.options,
                    shards=sorted((s for m in ordered for s in m.shards), key=lambda s: s["name"]),
                    scenes=dict(sorted((k, v) for m in ordered for k, v in m.scenes.items())), extra=extra)


def manifest_name(part: Optional[Part]) -> str:
    """The manifest a run writes: manifest.json for a whole run, manifest.part-I-of-N.json for a part."""
    return MANIFEST_NAME if part is None else part.manifest_name


def check_output_layout(out_dir: Path, part: Optional[Part]) -> None:
    """A folder holds one output, whole or in parts of one count: refuse a run that would mix them."""
    out_dir = Path(out_dir)
    parts = part_manifest_names(sorted(p.name for p in out_dir.iterdir())) if out_dir.is_dir() else {}
    counts = sorted({p.count for p in parts})
    if part is None and parts:
        raise PcdError(f"{out_dir}: holds the output of a run in {counts[0]} parts "
                       f"({', '.join(sorted(parts.values()))}); run with --part I/{counts[0]}, or use another folder")
    if part is not None and any(count != part.count for count in counts):
        raise PcdError(f"{out_dir}: holds parts of another split ({', '.join(sorted(parts.values()))}); "
                       f"--part {part} would mix part counts; use --part I/{counts[0]} or another folder")
    whole = out_dir / MANIFEST_NAME
    if part is not None and whole.exists() and not parts:
        raise PcdError(f"{whole}: the folder holds a whole run's output; a run in parts needs a folder of its own")
