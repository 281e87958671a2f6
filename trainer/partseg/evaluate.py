"""`pcd evaluate partseg RUN_DIR`: instance and class mIoU on ShapeNetPart's test list, honestly.

The checkpoint is chosen without the test set (`last`, or `best` by instance mIoU on the official val list when
the run trained on the train list). By default every point of each test shape is scored: the model reads a seeded
sample of 2,048 distinct points and its 3-NN propagation gives every original point its logits. Each seeded pass
draws other samples, so each metric is mean ± std over passes, with every pass's value. `--protocol point-mae`
scores as Point-MAE does, on 2,048 points drawn with replacement per shape (a random multiset, not the shape), and
the output says so. Per shape: argmax over the parts of its category only; a part absent from both prediction and
truth has IoU 1; instance mIoU averages shapes, class mIoU the 16 categories (trainer/partseg/metric.py).

Results: RUN_DIR/evaluation_<checkpoint>.json (pcd.trainer.evaluation) and per-point predictions in
RUN_DIR/evaluation_<checkpoint>_predictions.npz: `offsets` (S+1,) int64 (shape s owns entries offsets[s] to
offsets[s+1]), `categories` (S,) int64, `seg` (T,) int8 true parts, `predictions` (P, T) int8 per pass,
`shape_iou` (P, S) float32, shapes in the reader's order (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

import numpy as np
import torch
from rich.console import Console

from pcd.pipeline.config import non_negative, positive, setting
from pcd.trainer.evaluation import (evaluation_device, load_model_weights, load_run_config, prepare_fp32,
                                    print_metrics, resolve_checkpoint, seeded_passes, summarise, write_predictions,
                                    write_results)
from pcd.trainer.frames import Frame, frame_named
from pcd.trainer.partseg.config import Config as FinetuneConfig
from pcd.trainer.partseg.data import ShapeNetPart
from pcd.trainer.partseg.inputs import EvaluationShape, collate_shapes
from pcd.trainer.partseg.metric import PartSegScores
from pcd.trainer.partseg.model import PointMAEPartSegmenter

BEST_KIND = "best instance mIoU on the official val list"
Protocol = Literal["all-points", "point-mae"]


@dataclass
class Config:
    run_dir: Path = Path("runs/partseg")
    checkpoint: str = "last"             # "last", "best" (on the val list, when the run kept one) or a file
    passes: int = setting(3, positive)   # seeded passes (each draws other input samples), mean ± std
    seed: int = setting(0, non_negative)  # pass i uses seed + i
    protocol: Protocol = "all-points"    # or "point-mae": 2,048 points drawn with replacement are scored
    device: Optional[str] = None
    data_dir: Optional[Path] = None      # default: the run's data folder
    batch_size: int = setting(8, positive)  # shapes per forward pass
    query_chunk: int = setting(8192, positive)  # query points per forward pass (bounds memory on large shapes)
    workers: int = setting(0, non_negative)


@torch.no_grad()
def segment_shapes(model: torch.nn.Module, batches: Iterable[list[dict[str, np.ndarray]]], device: torch.device,
                   num_categories: int, query_chunk: int, scores: PartSegScores) -> list[np.ndarray]:
    """Score every shape of `batches` into `scores`; returns each shape's restricted prediction at its queries.

    Shapes are batched with their query points padded to the longest (the padding's logits are dropped); in
    eval mode a query's logits depend only on its shape's input sample and itself, so padding and chunking
    change nothing."""
    was_training = model.training
    model.eval()
    predictions: list[np.ndarray] = []
    try:
        for items in batches:
            points = torch.from_numpy(np.stack([item["points"] for item in items])).to(device).float()
            categories = torch.tensor([int(item["category"]) for item in items])
            onehot = torch.nn.functional.one_hot(categories, num_categories).float().to(device)
            longest = max(len(item["query"]) for item in items)
            logits = []
            for start in range(0, longest, query_chunk):
                stop = min(start + query_chunk, longest)
                query = np.stack([_padded(item["query"], stop)[start:stop] for item in items])
                logits.append(model(points, onehot, torch.from_numpy(query).to(device).float()).float().cpu())
            all_logits = torch.cat(logits, dim=1).numpy()
            for b, item in enumerate(items):
                shape_logits = all_logits[b, :len(item["query"])]
                predictions.append(scores.add(shape_logits, item["seg"], int(item["category"])))
    finally:
        model.train(was_training)
    return predictions


def _padded(query: np.ndarray, length: int) -> np.ndarray:
    if len(query) >= length:
        return query
    return np.concatenate([query, np.repeat(query[:1], length - len(query), axis=0)])


def evaluate_split(model: torch.nn.Module, dataset: ShapeNetPart, frame: Frame, num_points: int, seed: int,
                   protocol: str, device: torch.device, batch_size: int, query_chunk: int, workers: int
                   ) -> tuple[PartSegScores, list[np.ndarray]]:
    """One seeded pass over `dataset`: the scores and every shape's prediction at its query points."""
    shapes = EvaluationShape(dataset, frame, num_points, seed, protocol)
    batches = torch.utils.data.DataLoader(shapes, batch_size=batch_size, shuffle=False, num_workers=workers,
                                          collate_fn=collate_shapes)
    scores = PartSegScores()
    predictions = segment_shapes(model, batches, device, len(dataset.category_names), query_chunk, scores)
    return scores, predictions


def run(cfg: Config) -> int:
    console = Console()
    run_cfg = load_run_config(cfg.run_dir, FinetuneConfig, "finetune partseg")
    data_dir = cfg.data_dir or run_cfg.data_dir
    test = ShapeNetPart(data_dir, "test", cache_dir=run_cfg.cache_dir, show_progress=True)
    path, what = resolve_checkpoint(cfg.run_dir, cfg.checkpoint, BEST_KIND)
    model = PointMAEPartSegmenter(run_cfg.model)
    checkpoint = load_model_weights(model, path, "part segmenter")
    device = evaluation_device(cfg.device)
    model = prepare_fp32(model, device)
    frame = frame_named(run_cfg.frame)
    epoch = checkpoint.get("epoch")
    console.print(f"evaluating {path} ({what}, after epoch {epoch}) on {len(test)} test shapes of {data_dir}, "
                  f"frame {frame.name}, float32, {cfg.passes} seeded passes")
    if cfg.protocol == "point-mae":
        console.print("[bold yellow]--protocol point-mae: each test shape is scored on 2,048 points drawn WITH "
                      "replacement (a random multiset, as Point-MAE), not on its own points")
    else:
        console.print(f"every point of each shape is scored; the model reads {run_cfg.num_points} of them")
    per_pass: list[list[np.ndarray]] = []
    shape_ious: list[list[float]] = []

    def one_pass(seed: int) -> dict[str, float]:
        scores, predictions = evaluate_split(model, test, frame, run_cfg.num_points, seed, cfg.protocol, device,
                                             cfg.batch_size, cfg.query_chunk, cfg.workers)
        per_pass.append(predictions)
        shape_ious.append(scores.shape_ious)
        result = scores.result()
        console.print(f"pass seed {seed}: instance mIoU {100 * result['instance_miou']:.2f}  "
                      f"class mIoU {100 * result['class_miou']:.2f}")
        return {k: float(v) for k, v in result.items() if k != "category_miou"} | {
            f"miou_{test.category_names[c]}": v for c, v in result["category_miou"].items()}

    seeds, results = seeded_passes(cfg.seed, cfg.passes, one_pass)
    metrics = summarise(results)
    headline = {k: metrics[k] for k in ("instance_miou", "class_miou", "point_accuracy")}
    print_metrics(console, f"{cfg.run_dir} — {what} (epoch {epoch}), mean ± std over {len(seeds)} passes", headline)
    protocol = ("all-points: every point of each test shape, from a seeded sample of distinct points"
                if cfg.protocol == "all-points" else
                "point-mae: 2,048 points drawn with replacement per shape are scored, as Point-MAE")
    out = write_results(cfg.run_dir, path, {
        "task": "partseg", "checkpoint": str(path), "checkpoint_kind": what, "epoch": epoch,
        "data": {"data_dir": str(data_dir), "split": "test", "num_shapes": len(test),
                 "num_points": run_cfg.num_points, "shape_ids": test.shape_ids},
        "frame": frame.name, "protocol": protocol, "seeds": seeds, "metrics": metrics})
    if cfg.protocol == "all-points":
        lengths = [len(p) for p in per_pass[0]]
        seg = np.concatenate([test[i]["seg"] for i in range(len(test))])
    else:
        lengths = [run_cfg.num_points] * len(test)
        seg = np.zeros(0, dtype=np.int8)  # the scored multiset differs per pass; its truth is not stored
    write_predictions(cfg.run_dir, path, {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "categories": np.asarray(test.categories, dtype=np.int64), "seg": seg.astype(np.int8),
        "predictions": np.stack([np.concatenate(p) for p in per_pass]).astype(np.int8),
        "shape_iou": np.asarray(shape_ious, dtype=np.float32)})
    console.print(f"wrote {out}")
    return 0
