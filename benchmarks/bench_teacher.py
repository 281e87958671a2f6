"""Frames/s of `pcd cache-teacher`, split into JPEG decode (+ CLIP crop) time and teacher model time.

Frames are generated at ScanNet's colour resolution (1296 x 968 JPEG). Teachers: the tiny random one, and
the paper's full-size architecture (open_clip ViT-B-32-quickgelu + ClipCap MLP 512 -> 3840 -> 7680 with a
GPT-2 small) at random weights, saved to local checkpoint files so that the real loading path runs.

    python benchmarks/bench_teacher.py                       # CPU: tiny and full size
    python benchmarks/bench_teacher.py --device cuda --batch-sizes 32,64,128,256,512 --frames 2048
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pcd.pipeline.cache_teacher import Config, run
from pcd.pipeline.frame_decode import decode_and_crop
from pcd.pipeline.schema import Manifest, ShardWriter, sample_key

SCANNET_COLOR = (968, 1296)  # height, width


def scannet_like_jpeg(rng: np.random.Generator) -> bytes:
    """A 1296 x 968 frame with smooth structure and noise, so JPEG size (~150-250 kB) is realistic."""
    h, w = SCANNET_COLOR
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    image = np.stack([127 + 100 * np.sin(xx / (40 + 30 * i) + yy / 90 + phase[i]) for i in range(3)], -1)
    image += rng.normal(0, 3, image.shape)
    ok, data = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def make_extraction(folder: Path, frames: int, per_shard: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    distinct = [scannet_like_jpeg(rng) for _ in range(16)]
    shards = []
    for start in range(0, frames, per_shard):
        scene = f"scene{start // per_shard:04d}_00"
        writer = ShardWriter(folder / f"shard-{start // per_shard:06d}.tar")
        for frame in range(start, min(frames, start + per_shard)):
            writer.write(sample_key(scene, frame), {
                "jpg": distinct[frame % len(distinct)],
                "points.npy": rng.normal(size=(8192, 3)).astype(np.float32),
                "colors.npy": rng.integers(0, 256, (8192, 3), dtype=np.uint8),
                "pose.npy": np.eye(4, dtype=np.float32), "intrinsics.npy": np.eye(3, dtype=np.float32),
                "json": {"scene": scene, "frame": frame}})
        shards.append({**writer.close(), "scene": scene})
    Manifest(kind="extraction", options={}, shards=shards, scenes={}, extra={}).write(folder)
    return distinct


def decode_seconds_per_frame(jpegs: list[bytes], size: int, repeat: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for jpeg in jpegs:
            decode_and_crop((jpeg, size))
    return (time.perf_counter() - start) / (repeat * len(jpegs))


def model_seconds_per_frame(teacher, batch_size: int, batches: int) -> float:
    import torch

    crops = np.random.default_rng(0).integers(0, 256, (batch_size, teacher.image_size, teacher.image_size, 3),
                                              dtype=np.uint8)
    teacher.embed(crops)  # warm-up
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        teacher.embed(crops)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (batches * batch_size)


def full_size_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Random-weight files in the paper teacher's layouts (open_clip state dict; ClipCap MLP + GPT-2 small)."""
    import torch

    from pcd.pipeline.clipcap import ClipCapShape, random_clipcap
    from pcd.pipeline.teacher import DEFAULT_CLIP_MODEL, build_clip

    torch.manual_seed(0)
    torch.save(build_clip(DEFAULT_CLIP_MODEL).state_dict(), folder / "ViT-B-32-random.pt")
    clipcap = random_clipcap(ClipCapShape("mlp", clip_dim=512, prefix_length=10, mlp_hidden=(3840,)), seed=1)
    torch.save(clipcap.state_dict(), folder / "clipcap-mlp-random.pt")
    return folder / "ViT-B-32-random.pt", folder / "clipcap-mlp-random.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=256, help="frames in the end-to-end runs")
    parser.add_argument("--batch-sizes", default="32", help="comma-separated teacher batch sizes to time")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: cores - 1)")
    parser.add_argument("--teachers", default="tiny-random,full-random")
    args = parser.parse_args()
    import torch

    from pcd.pipeline.teacher import load_teacher

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jpegs = make_extraction(tmp / "extracted", args.frames, per_shard=128)
        print(f"frames: {args.frames} at 1296x968, mean JPEG {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB")
        for name in args.teachers.split(","):
            if name == "tiny-random":
                teacher_cfg = dict(teacher="tiny-random")
                teacher = load_teacher("tiny-random")
            else:
                clip_path, clipcap_path = full_size_checkpoints(tmp)
                teacher_cfg = dict(teacher="clipcap", clip=clip_path, clipcap=clipcap_path)
                teacher = load_teacher("clipcap", clip_path, clipcap_path)
            teacher.to(torch.device(args.device))
            decode = decode_seconds_per_frame(jpegs, teacher.image_size)
            print(f"\n[{name}] JPEG decode + crop, one process: {decode * 1e3:.2f} ms/frame "
                  f"({1 / decode:.0f} frames/s per core)")
            for batch_size in batch_sizes:
                batches = max(2, min(20, 512 // batch_size)) if args.device != "cpu" else 2
                model = model_seconds_per_frame(teacher, batch_size, batches)
                print(f"[{name}] teacher model, batch {batch_size}: {model * 1e3:.2f} ms/frame ({1 / model:.0f} frames/s)")
            del teacher
            best = batch_sizes[-1]
            out = tmp / f"out-{name}"
            start = time.perf_counter()
            run(Config(extracted_dir=tmp / "extracted", out_dir=out, batch_size=best, workers=args.workers,
                       device=args.device, **teacher_cfg))
            elapsed = time.perf_counter() - start
            print(f"[{name}] end to end (incl. loading), batch {best}: {args.frames / elapsed:.1f} frames/s "
                  f"({elapsed:.1f} s for {args.frames} frames)")


if __name__ == "__main__":
    main()
