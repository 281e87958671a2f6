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
from typing import Any, Iterator

import numpy as np

from pcd.pipeline.atomic import atomic_write_json, failed_write_removes, is_no_space, no_space, temporary_path
from pcd.pipeline.errors import PcdError

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


def iter_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Raw samples of a shard in file order: {'__key__', '__url__', extension: bytes}. Torch-free."""
    path = Path(path)
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r") as tar:
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

    def write(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST_NAME, self.to_json())


def shard_path(folder: Path, name: Any) -> Path:
    """The file of the shard a manifest in `folder` calls `name`; refuses anything but a plain shard file name."""
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise PcdError(f"{Path(folder) / MANIFEST_NAME}: shard name {name!r} is not a plain file name "
                       "(letters, digits and ._- ending in .tar)")
    return Path(folder) / name


def read_manifest(folder: Path, kind: str | None = None) -> Manifest:
    """Read and check the manifest of a shard folder against its schema; `kind` names the stage that must have
    written it. Every shard name is checked to be a plain file name (see `shard_path`), so a hostile manifest can
    make pcd neither read nor write outside its folder, nor hand webdataset a `pipe:` command."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise PcdError(f"{path}: no manifest (is {folder} an output folder of pcd?)")
    try:
        data = json.loads(path.read_bytes())
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
        shard_path(folder, entry["name"])
        if entry["name"] in names:
            raise PcdError(f"{path}: shard {entry['name']} is listed twice")
        names.add(entry["name"])
        samples = entry.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise PcdError(f"{path}: shard {entry['name']} has no sample count ('samples': {samples!r})")
        for field_name, field_type in (("scene", str), ("sha256", str), ("source_sha256", str), ("bytes", int)):
            if field_name in entry and not isinstance(entry[field_name], field_type):
                raise PcdError(f"{path}: shard {entry['name']} has a bad '{field_name}' ({entry[field_name]!r})")
    known = {"schema_version", "kind", "options", "num_samples", "shards", "scenes"}
    return Manifest(kind=data["kind"], options=data.get("options", {}), shards=shards,
                    scenes=data.get("scenes", {}), extra={k: v for k, v in data.items() if k not in known})
