"""Semantic segmentation speed: training samples/s and whole-scene evaluation seconds per scene.

Training: one optimizer step of the segmenter (forward, cross-entropy, backward, Adam) on batches of real crops
(`TrainingSamples`: 1.5 m columns, or whole scenes with --set crop=scene) of a generated room; data loading is
timed separately (it runs in DataLoader workers in a fine-tune). Baseline in the same run: the forward pass alone.
Evaluation: one seeded pass over a room of `--scene-vertices` vertices (150,000 by default, a typical ScanNet
scene; the largest have about 300,000), every vertex labelled (`scene_probabilities`); baseline in the same run:
encoding the same crops without decoding any vertex, so the ratio shows what labelling every vertex costs.
The model has random weights: speed does not depend on them. Each figure is given from wall-clock time and
from this process's CPU time: on a shared machine (other jobs on the same cores) the CPU time of a 1-thread
run is what the work costs, the wall time what it took there.

    .venv/bin/python benchmarks/bench_semseg.py --preset paper --device cpu --threads 1 --batch 2
    .venv/bin/python benchmarks/bench_semseg.py --preset paper --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pcd.pipeline.config import build_config
from pcd.trainer.frames import PCD_FRAME
from pcd.trainer.semseg.config import Config
from pcd.trainer.semseg.data import SemSegScenes, choose
from pcd.trainer.semseg.finetune import segmentation_loss
from pcd.trainer.semseg.inference import scene_crops, scene_probabilities
from pcd.trainer.semseg.inputs import CropFrame, TrainingSamples, collate
from pcd.trainer.semseg.model import PointMAESemSegmenter


def room(rng: np.random.Generator, vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """A 7 x 6 x 2.8 m room as a mesh's vertices: floor, four walls and 12 boxes, with benchmark labels."""
    counts = rng.multinomial(vertices, [0.25, 0.35, 0.4])
    floor = np.column_stack([rng.uniform(0, 7, counts[0]), rng.uniform(0, 6, counts[0]), np.zeros(counts[0])])
    side = rng.integers(0, 4, counts[1])
    along = rng.uniform(0, 1, counts[1])
    walls = np.column_stack([np.where(side < 2, along * 7, np.where(side == 2, 0, 7)),
                             np.where(side >= 2, along * 6, np.where(side == 0, 0, 6)),
                             rng.uniform(0, 2.8, counts[1])])
    centers = np.column_stack([rng.uniform(0.8, 6.2, 12), rng.uniform(0.8, 5.2, 12), np.zeros(12)])
    sizes = rng.uniform(0.4, 1.6, (12, 3))
    which = rng.integers(0, 12, counts[2])
    boxes = centers[which] + rng.uniform(-0.5, 0.5, (counts[2], 3)) * sizes[which]
    boxes[:, 2] = np.abs(boxes[:, 2]) + sizes[which, 2] / 2
    xyz = np.concatenate([floor, walls, boxes]).astype(np.float32)
    box_labels = rng.choice([3, 4, 5, 6, 7, 39], 12)
    labels = np.concatenate([np.full(counts[0], 2), np.full(counts[1], 1), box_labels[which]]).astype(np.uint16)
    return xyz, labels


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="finetune-semseg preset")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=2, help="training crops per step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--scene-vertices", type=int, default=150_000)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (CUDA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = build_config(Config, "finetune-semseg", args.preset, args.sets)
    torch.manual_seed(0)
    model = PointMAESemSegmenter(cfg.model).to(device)
    rng = np.random.default_rng(0)
    xyz, labels = room(rng, args.scene_vertices)

    with tempfile.TemporaryDirectory() as tmp:
        scene = "scene0000_00"
        np.save(Path(tmp) / f"{scene}_full_vert.npy", np.concatenate([xyz, np.zeros_like(xyz)], axis=1))
        np.save(Path(tmp) / f"{scene}_full_sem_label.npy", labels)
        samples = TrainingSamples(SemSegScenes(Path(tmp), [scene]), PCD_FRAME, cfg.num_points, cfg.crop,
                                  cfg.column_size, 1, True, cfg.rotate_degrees)
        start = time.perf_counter()
        items = [samples[0] for _ in range(args.batch * (args.steps + 2))]
        loading = len(items) / (time.perf_counter() - start)
    batches = [{k: v.to(device) for k, v in collate(items[i * args.batch:(i + 1) * args.batch]).items()}
               for i in range(args.steps + 2)]

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def train_step(batch: dict[str, torch.Tensor]) -> None:
        with autocast:
            loss = segmentation_loss(model(batch["points"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad(), autocast:
            model(batch["points"])

    model.train()
    rates, cpu_rates = {}, {}
    for name, fn in (("train", train_step), ("forward", forward)):
        for batch in batches[:2]:
            fn(batch)
        synced(device)
        start, cpu = time.perf_counter(), time.process_time()
        for batch in batches[2:]:
            fn(batch)
        synced(device)
        rates[name] = args.steps * args.batch / (time.perf_counter() - start)
        cpu_rates[name] = args.steps * args.batch / (time.process_time() - cpu)

    model.eval()
    crops = scene_crops(xyz, cfg.crop, cfg.column_size, cfg.eval_stride)
    synced(device)
    start, cpu = time.perf_counter(), time.process_time()
    scene_probabilities(model, xyz, PCD_FRAME, crop=cfg.crop, column_size=cfg.column_size, stride=cfg.eval_stride,
                        num_points=cfg.num_points, rng=np.random.default_rng(0), device=device)
    synced(device)
    whole, whole_cpu = time.perf_counter() - start, time.process_time() - cpu
    pick_rng = np.random.default_rng(0)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for first in range(0, len(crops), 8):
            batch = [members[choose(np.arange(len(members)), cfg.num_points, pick_rng)] for members in crops[first:first + 8]]
            inputs = np.stack([CropFrame.of(xyz[b], PCD_FRAME).apply(xyz[b]) for b in batch])
            model.encode(torch.from_numpy(inputs).to(device))
    synced(device)
    encode_only, encode_cpu = time.perf_counter() - start, time.process_time() - cpu
    coverage = sum(len(c) for c in crops) / len(xyz)

    print(f"preset {args.preset} {args.sets}, device {device}, threads {torch.get_num_threads()}, "
          f"{cfg.num_points} points, {cfg.model.backbone.num_groups}x{cfg.model.backbone.group_size} patches, "
          f"crop {cfg.crop}{' bf16' if args.bf16 else ''}")
    print(f"training: batch {args.batch}: {rates['train']:.3f} samples/s wall, {cpu_rates['train']:.3f} per CPU "
          f"second (forward alone {rates['forward']:.3f} wall, {cpu_rates['forward']:.3f} per CPU second; "
          f"train/forward {cpu_rates['forward'] / cpu_rates['train']:.2f}x); crop loading {loading:.1f} samples/s")
    print(f"evaluation: {len(xyz):,} vertices, {len(crops)} crops, each vertex in {coverage:.2f} crops on average: "
          f"{whole:.1f} s wall, {whole_cpu:.1f} CPU s per scene per pass (encoding the crops alone {encode_only:.1f} "
          f"s wall, {encode_cpu:.1f} CPU s: {whole_cpu / encode_cpu:.2f}x)")

if __name__ == "__main__":
    main()
