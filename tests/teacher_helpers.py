"""Builders for the teacher tests: small extraction shards and tiny checkpoints in the upstream layouts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pcd.pipeline.schema import Manifest, ShardWriter, sample_key


def jpeg_bytes(rng: np.random.Generator, width: int = 96, height: int = 72) -> bytes:
    """A small smooth colour image (so that resampling matters), JPEG-encoded with cv2."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def extraction_sample(rng: np.random.Generator, scene: str, frame: int) -> dict:
    points = rng.normal(size=(32, 3)).astype(np.float32)
    return {"jpg": jpeg_bytes(rng), "points.npy": points,
            "colors.npy": rng.integers(0, 256, size=(32, 3), dtype=np.uint8),
            "pose.npy": np.eye(4, dtype=np.float32), "intrinsics.npy": np.eye(3, dtype=np.float32),
            "json": {"scene": scene, "frame": frame, "valid_depth": 100, "source": f"{scene}.sens",
                     "schema_version": 1}}


def make_extraction(folder: Path, scenes: dict[str, int], seed: int = 0) -> Manifest:
    """One shard per scene, `frames` samples each, with an extraction manifest like pcd extract-scannet's."""
    rng = np.random.default_rng(seed)
    shards = []
    for index, (scene, frames) in enumerate(scenes.items()):
        writer = ShardWriter(folder / f"shard-{index:06d}.tar")
        for frame in range(0, frames * 25, 25):
            writer.write(sample_key(scene, frame), extraction_sample(rng, scene, frame))
        shards.append({**writer.close(), "scene": scene})
    manifest = Manifest(kind="extraction", options={"frame_skip": 25, "points": 32}, shards=shards,
                        scenes={scene: {"frames": frames} for scene, frames in scenes.items()}, extra={})
    manifest.write(folder)
    return manifest


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table (openai/gpt-2 encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(folder: Path) -> int:
    """A tiny byte-level BPE tokenizer in GPT-2's file format; returns its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = ["Ġ a", "Ġ t", "Ġt h", "Ġth e", "c a", "ca t", "o n"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)
