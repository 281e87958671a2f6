"""`pcd evaluate semseg RUN_DIR`: mIoU on every vertex of the validation scenes, scored like the ScanNet benchmark.

The checkpoint is chosen without the evaluated scenes (`last`, or `best` on the validation split the run named,
which is then the evaluated split too: say so when reporting it). Each seeded pass labels every vertex of every
scene from its own crop samples (`pcd.trainer.semseg.inference`) and is scored with the official evaluator's
rules (`BenchmarkScores`); each metric is mean ± std over the passes, with every pass's value. The probabilities
of all passes are also summed per vertex: that prediction is written as benchmark files and scored (`summed`). Per class, the IoU table; and, labelled so, ACT's mIoU on the sampled points of the crops alone
(`block_miou`), a number that is not comparable with whole-scene mIoU.

Results: RUN_DIR/evaluation_<checkpoint>.json (pcd.trainer.evaluation) and RUN_DIR/evaluation_<checkpoint>_scannet/
with `<scene>.txt` per scene (one nyu40 id per vertex, the benchmark's submission format).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pcd.pipeline.config import non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.evaluation import (evaluation_device, load_model_weights, load_run_config, prepare_fp32,
                                    print_metrics, resolve_checkpoint, summarise, write_results)
from pcd.trainer.frames import Frame, frame_named
from pcd.trainer.initialization import read_init_record, warn_overlap
from pcd.trainer.semseg.classes import CLASS_NAMES, nyu40_ids
from pcd.trainer.semseg.config import Config as FinetuneConfig
from pcd.trainer.semseg.data import SemSegScenes, read_scene_ids
from pcd.trainer.semseg.inference import scene_probabilities
from pcd.trainer.semseg.metric import BenchmarkScores, BlockScores
from pcd.trainer.semseg.model import PointMAESemSegmenter
from pcd.trainer.semseg.submission import write_prediction_file

BEST_KIND = "best mIoU on the validation split"


@dataclass
class Config:
    run_dir: Path = Path("runs/semseg")
    checkpoint: str = "last"             # "last", "best" (on the validation split, when the run kept one) or a file
    passes: int = setting(3, positive)   # seeded passes (each draws other crop samples), mean ± std
    seed: int = setting(0, non_negative)  # pass i uses seed + i
    device: Optional[str] = None
    data_dir: Optional[Path] = None      # default: the run's data folder
    split: Optional[Path] = None         # default: the run's validation split
    eval_stride: Optional[float] = setting(None, positive)  # metres between columns (default: the run's)
    crops_per_batch: int = setting(8, positive)  # crops encoded per forward pass
    query_chunk: int = setting(32768, positive)  # vertices decoded per forward pass (bounds memory on big scenes)


@dataclass
class SceneSegmenter:
    """How a run labels whole scenes: its model, frame and crop settings, and the evaluation's batch sizes."""

    model: torch.nn.Module
    frame: Frame
    run: FinetuneConfig
    device: torch.device
    stride: float
    crops_per_batch: int = 8
    query_chunk: int = 32768

    def probabilities(self, xyz: np.ndarray, seed: int, scene: str, labels: Optional[np.ndarray] = None,
                      blocks: Optional[BlockScores] = None) -> np.ndarray:
        """One seeded pass over one scene: summed probabilities (N, classes). The samples depend on the seed and
        the scene's name only, so a scene gets the same prediction whatever other scenes are labelled with it."""
        return scene_probabilities(
            self.model, xyz, self.frame, crop=self.run.crop, column_size=self.run.column_size, stride=self.stride,
            num_points=self.run.num_points, rng=np.random.default_rng([seed, zlib.crc32(scene.encode())]),
            device=self.device, crops_per_batch=self.crops_per_batch, query_chunk=self.query_chunk, labels=labels,
            blocks=blocks)


def segment_scenes(segmenter: SceneSegmenter, scenes: SemSegScenes, seeds: list[int],
                   on_scene: Optional[Callable[[str, np.ndarray], None]] = None,
                   progress: bool = False) -> dict[str, Any]:
    """Label every vertex of `scenes` with each seed and with the probabilities summed over seeds.

    Scene by scene (memory: one scene's probabilities): `on_scene(scene, nyu40 prediction)` gets the summed
    prediction. With labelled scenes, returns per-pass results and the summed result (else {})."""
    passes = [(BenchmarkScores(), BlockScores()) for _ in seeds]
    summed = BenchmarkScores()
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("scenes", total=len(scenes))
        for index, scene in enumerate(scenes.scenes):
            xyz = scenes.xyz(index)
            nyu40 = scenes.nyu40(index) if scenes.labelled else None
            labels = scenes.labels(index) if scenes.labelled else None
            total: Optional[np.ndarray] = None
            for (bench, blocks), seed in zip(passes, seeds):
                probs = segmenter.probabilities(xyz, seed, scene, labels, blocks)
                if nyu40 is not None:
                    bench.add(nyu40, nyu40_ids(probs.argmax(axis=1)))
                total = probs if total is None else total + probs
            assert total is not None
            prediction = nyu40_ids(total.argmax(axis=1))
            if nyu40 is not None:
                summed.add(nyu40, prediction)
            if on_scene is not None:
                on_scene(scene, prediction)
            bar.advance(task)
    if not scenes.labelled:
        return {}
    return {"passes": [{**bench.result(), **blocks.result()} for bench, blocks in passes],
            "summed": summed.result()}


def class_table(passes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per class: mean and std of its IoU over the passes where it has one, and every pass's value (None: none)."""
    table = {}
    for name in CLASS_NAMES:
        values = [p["class_iou"][name] for p in passes]
        defined = [v for v in values if not np.isnan(v)]
        table[name] = {"mean": float(np.mean(defined)) if defined else None,
                       "std": float(np.std(defined)) if defined else None,
                       "passes": [None if np.isnan(v) else float(v) for v in values]}
    return table


def print_class_table(console: Console, title: str, table: dict[str, dict[str, Any]],
                      summed: dict[str, float]) -> None:
    out = Table(title=title)
    out.add_column("class")
    out.add_column("IoU mean ± std", justify="right")
    out.add_column("IoU summed", justify="right")
    for name, value in table.items():
        cell = "—" if value["mean"] is None else f"{100 * value['mean']:.2f} ± {100 * value['std']:.2f}"
        out.add_row(name, cell, "—" if np.isnan(summed[name]) else f"{100 * summed[name]:.2f}")
    console.print(out)


def load_segmenter(run_dir: Path, checkpoint: str, device_name: Optional[str], stride: Optional[float],
                   crops_per_batch: int, query_chunk: int) -> tuple[SceneSegmenter, Path, str, Any]:
    """The run's model with `checkpoint` loaded strictly, float32, on the device; (segmenter, path, kind, epoch)."""
    run_cfg = load_run_config(run_dir, FinetuneConfig, "finetune semseg")
    path, what = resolve_checkpoint(run_dir, checkpoint, BEST_KIND)
    model = PointMAESemSegmenter(run_cfg.model)
    loaded = load_model_weights(model, path, "semantic segmenter")
    device = evaluation_device(device_name)
    segmenter = SceneSegmenter(prepare_fp32(model, device), frame_named(run_cfg.frame), run_cfg, device,
                               stride if stride is not None else run_cfg.eval_stride, crops_per_batch, query_chunk)
    return segmenter, path, what, loaded.get("epoch")


def describe_crops(segmenter: SceneSegmenter) -> str:
    """How every vertex gets its prediction, in words (for the screen and the results file)."""
    run = segmenter.run
    if run.crop == "column":
        crops = f"{run.column_size} m full-height columns every {segmenter.stride} m"
    else:
        crops = "the whole scene"
    return (f"every vertex labelled from crops ({crops}), {run.num_points} points sampled per crop, softmax "
            f"summed over the crops covering a vertex")


def run(cfg: Config) -> int:
    console = Console()
    segmenter, path, what, epoch = load_segmenter(cfg.run_dir, cfg.checkpoint, cfg.device, cfg.eval_stride,
                                                  cfg.crops_per_batch, cfg.query_chunk)
    run_cfg = segmenter.run
    data_dir = cfg.data_dir or run_cfg.data_dir
    split = cfg.split or run_cfg.val_split
    if split is None:
        raise PcdError(f"{cfg.run_dir}: the run has no validation split; pass --split")
    scenes = SemSegScenes(data_dir, read_scene_ids(data_dir, split))
    seeds = [cfg.seed + i for i in range(cfg.passes)]
    console.print(f"evaluating {path} ({what}, after epoch {epoch}) on {len(scenes)} scenes of {split}, "
                  f"frame {segmenter.frame.name}, float32, {cfg.passes} seeded passes")
    chosen_here = cfg.checkpoint == "best" and run_cfg.val_split is not None and \
        set(scenes.scenes) & set(read_scene_ids(data_dir, run_cfg.val_split))
    if chosen_here:
        console.print("[bold yellow]best.pt was chosen by mIoU on these scenes: its score on them is OPTIMISTIC "
                      "(report `last`, or hold out other scenes for choosing)")
    init = read_init_record(cfg.run_dir) or {}
    overlap = warn_overlap(init.get("pretrain_scenes"), scenes.scenes, "evaluated")
    out_dir = Path(cfg.run_dir) / f"evaluation_{path.stem}_scannet"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = segment_scenes(segmenter, scenes, seeds,
                            lambda scene, prediction: write_prediction_file(out_dir, scene, prediction), True)
    passes, summed = result["passes"], result["summed"]
    scalar_keys = ["miou", "accuracy", "block_miou", "block_accuracy"]
    metrics = summarise(passes, scalar_keys)
    table = class_table(passes)
    print_metrics(console, f"{cfg.run_dir} — {what} (epoch {epoch}), mean ± std over {len(seeds)} passes",
                  {"mIoU (every vertex)": metrics["miou"], "accuracy (every vertex)": metrics["accuracy"],
                   "block mIoU (sampled points only, ACT main.py)": metrics["block_miou"]})
    console.print(f"mIoU of the probabilities summed over the {len(seeds)} passes (the benchmark files): "
                  f"{100 * summed['miou']:.2f}")
    print_class_table(console, "IoU per class", table, summed["class_iou"])
    out = write_results(cfg.run_dir, path, {
        "task": "semseg", "checkpoint": str(path), "checkpoint_kind": what, "epoch": epoch,
        "data": {"data_dir": str(data_dir), "split": str(split), "scenes": scenes.scenes,
                 "vertices": int(sum(scenes.vertex_counts)), "scored_vertices": summed["scored_vertices"]},
        "frame": segmenter.frame.name,
        "protocol": ("OPTIMISTIC (checkpoint chosen on the evaluated scenes): " if chosen_here else "")
                    + describe_crops(segmenter) + "; scored with ScanNet's evaluator rules (ground truth outside "
                    "the 20 classes skipped, predictions outside them wrong)", "seeds": seeds,
        "metrics": metrics, "class_iou": table,
        "summed": {"miou": summed["miou"], "accuracy": summed["accuracy"],
                   "classes_with_iou": summed["classes_with_iou"],
                   "class_iou": {k: None if np.isnan(v) else v for k, v in summed["class_iou"].items()}},
        "prediction_files": str(out_dir), "pretrain_overlap": overlap})
    console.print(f"wrote {out} and {len(scenes)} benchmark files in {out_dir}")
    return 0
