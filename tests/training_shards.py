"""Writes small training shards (one per scene) with the real schema and manifest, for pre-training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcd.pipeline.schema import Manifest, ShardWriter, sample_key

TEACHER = {"name": "tiny-random", "random": True, "prefix_length": 2, "prefix_dim": 16, "clip_dim": 8}


def write_training_shards(folder: Path, scenes: dict[str, int], points: int = 600, seed: int = 0,
                          teacher: dict | None = None, kind: str = "training",
                          patch_tokens: dict | None = None) -> Manifest:
    """`scenes` maps scene id -> frames; each frame's prefix/clip is a fixed function of its geometry.
    kind="extraction" writes the same frames as `pcd extract-scannet` shards: a JPEG stand-in, no teacher members.
    `patch_tokens` (as `Teacher.patch_token_info`: grid, cell, image_size, width) adds random patch tokens and a crop
    camera looking down +z with a 90-degree field of view, as `pcd cache-teacher --patch-tokens`."""
    teacher = dict(teacher or TEACHER)
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(6, teacher["prefix_length"] * teacher["prefix_dim"] + teacher["clip_dim"]))
    shards, scene_info = [], {}
    for scene, frames in scenes.items():
        writer = ShardWriter(Path(folder) / f"{scene}.tar")
        for frame in range(frames):
            extent = rng.uniform(0.5, 2.0, size=3)
            cloud = (rng.uniform(-1, 1, size=(points, 3)) * extent + [0, 0, 3]).astype(np.float32)
            angle = rng.uniform(0, 2 * np.pi)
            pose = np.eye(4, dtype=np.float32)
            pose[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
            target = np.tanh(np.concatenate([extent, extent ** 2]) @ mixing / 3)
            split = teacher["prefix_length"] * teacher["prefix_dim"]
            members = {"points.npy": cloud, "colors.npy": np.zeros((points, 3), np.uint8), "pose.npy": pose,
                       "intrinsics.npy": np.eye(3, dtype=np.float32)}
            if kind == "extraction":
                members.update({"jpg": b"\xff\xd8 not decoded by pre-training",
                                "json": {"scene": scene, "frame": frame}})
            else:
                members.update({
                    "prefix.npy": target[:split].reshape(teacher["prefix_length"], -1).astype(np.float16),
                    "clip.npy": target[split:].astype(np.float16),
                    "json": {"scene": scene, "frame": frame, "teacher": teacher["name"]}})
            if patch_tokens is not None:
                size = patch_tokens["image_size"]
                members["patch_tokens.npy"] = rng.normal(
                    size=(patch_tokens["grid"] ** 2, patch_tokens["width"])).astype(np.float16)
                members["patch_camera.npy"] = np.array([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]],
                                                       np.float32)
            writer.write(sample_key(scene, frame), members)
        shards.append({**writer.close(), "scene": scene})
        scene_info[scene] = {"frames": frames}
    options = {"output": {"patch_tokens": dict(patch_tokens)}} if patch_tokens is not None else {}
    manifest = Manifest(kind=kind, options=options, shards=shards, scenes=scene_info,
                        extra={"teacher": teacher} if kind == "training" else {"failed": {}})
    manifest.write(folder)
    return manifest
