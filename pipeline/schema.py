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

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pcd.pipeline.atomic import atomic_write_json, temporary_path
from pcd.pipeline.errors import PcdError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

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


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw WebDataset sample (bytes per extension); keys starting with '__' pass through."""
    return {k: (v if k.startswith("__") else decode_member(k, v)) for k, v in raw.items()}


def check_sample(sample: dict[str, Any], kind: str, where: str) -> None:
    """Raise PcdError naming `where` unless `sample` carries the members of a `kind` sample."""
    members = EXTRACTION_MEMBERS if kind == "extraction" else TRAINING_MEMBERS
    required = set(members) | {"json"} | ({"jpg"} if kind == "extraction" else set())
    missing = sorted(required - set(sample))
    if missing:
        raise PcdError(f"{where}: sample {sample.get('__key__', '?')} is not a {kind} sample (missing {', '.join(missing)})")
    present = {**members, **{k: v for k, v in OPTIONAL_MEMBERS.items() if k in sample}}
    for name, (dtype, shape) in present.items():
        array = sample[name]
        if str(array.dtype) != dtype or (shape and (array.ndim != len(shape) or any(
                s is not None and s != a for s, a in zip(shape, array.shape)))):
            raise PcdError(f"{where}: {sample.get('__key__', '?')}.{name} has {array.dtype}{list(array.shape)}, "
                           f"schema {SCHEMA_VERSION} wants {dtype}{list(shape or [])}")


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
        for extension, value in members.items():
            data = encode_member(extension, value)
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = 0  # byte-identical shards for identical content
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.keys.append(key)

    def close(self) -> dict[str, Any]:
        """Finish the shard; returns its manifest entry (name, samples, sha256, bytes)."""
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        os.replace(self._tmp, self.path)
        return {"name": self.path.name, "samples": self.count, "sha256": digest, "bytes": size}

    def abort(self) -> None:
        self._tar.close()
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


def read_manifest(folder: Path, kind: str | None = None) -> Manifest:
    """Read and check the manifest of a shard folder; `kind` names the stage that must have written it."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise PcdError(f"{path}: no manifest (is {folder} an output folder of pcd?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PcdError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PcdError(f"{path}: shard schema version {version}, this pcd reads version {SCHEMA_VERSION}")
    if kind is not None and data.get("kind") != kind:
        raise PcdError(f"{path}: a '{data.get('kind')}' manifest, expected '{kind}'")
    known = {"schema_version", "kind", "options", "num_samples", "shards", "scenes"}
    return Manifest(kind=data["kind"], options=data.get("options", {}), shards=data.get("shards", []),
                    scenes=data.get("scenes", {}), extra={k: v for k, v in data.items() if k not in known})
