"""`pcd evaluate detection RUN_DIR` and the evaluation pass that training also uses (training imports this
module; this module imports no training code).

Evaluation is random (3DETR samples the points of every scene), so the command runs several seeded float32
passes (`pcd.trainer.evaluation`) and reports mean ± std, naming the checkpoint (last epoch, or best on the
validation split) and the seeds. Beside the results file: RUN_DIR/evaluation_<checkpoint>_predictions.npz with
every scene's raw final-layer proposals per pass (docs/finetuning.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pcd.pipeline.config import config_to_dict, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.detection.ap import APCalculator, APConfig, parse_predictions
from pcd.trainer.detection.config import Config as FinetuneConfig
from pcd.trainer.detection.dataset import DetectionDataset, collate, read_scene_list
from pcd.trainer.detection.model import build_detector
from pcd.trainer.evaluation import (evaluation_device, load_model_weights, load_run_config, prepare_fp32,
                                    resolve_checkpoint, seeded_passes, write_predictions, write_results)
from pcd.trainer.evaluation import summarise as summarise_passes
from pcd.trainer.initialization import read_init_record, warn_overlap


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                      ap_cfg: APConfig | None = None, proposals: Optional[list[tuple[np.ndarray, ...]]] = None) -> dict:
    """One pass over `batches`: final-layer boxes -> 3DETR post-processing -> AP/AR at IoU 0.25 and 0.5.

    With `proposals`, each scene's raw final-layer proposals (box min/max (Q,6), class probabilities (Q,C),
    objectness (Q,)) are appended to it, in scene order: the predictions file stores them.

    The model runs in the precision it is called in: float32 (the runtime calls every evaluation with autocast
    off, and `pcd evaluate detection` never enables it), as 3DETR evaluates.
    """
    ap_cfg = ap_cfg or APConfig()
    calculator = APCalculator()
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            final = model(batch["point_clouds"], batch["point_cloud_dims_min"], batch["point_cloud_dims_max"])[-1]
            boxes = final["box_minmax"].float().cpu().numpy()
            sem_prob = final["sem_cls_prob"].float().cpu().numpy()
            objectness = final["objectness_prob"].float().cpu().numpy()
            points = batch["point_clouds"].float().cpu().numpy()
            present = batch["gt_box_present"].cpu().numpy() > 0
            centers = batch["gt_box_centers"].float().cpu().numpy()
            sizes = batch["gt_box_sizes"].float().cpu().numpy()
            labels = batch["gt_box_sem_cls_label"].cpu().numpy()
            for b in range(len(boxes)):
                if proposals is not None:
                    proposals.append((boxes[b], sem_prob[b], objectness[b]))
                detections = parse_predictions(boxes[b], sem_prob[b], objectness[b], points[b], ap_cfg)
                gt_boxes = np.concatenate([centers[b] - sizes[b] / 2, centers[b] + sizes[b] / 2], -1)
                ground_truth = [(int(labels[b, k]), gt_boxes[k]) for k in np.where(present[b])[0]]
                calculator.add_scene(detections, ground_truth)
    finally:
        model.train(was_training)
    return calculator.compute()


@dataclass
class Config:
    run_dir: Path = Path("runs/detection")
    checkpoint: str = "last"            # "last", "best" (best mAP@0.25 on the validation split) or a file
    passes: int = setting(3, positive)  # seeded passes: evaluation samples points, so it is random
    seed: int = setting(0, non_negative)  # pass i uses seed + i
    device: Optional[str] = None        # default: cuda when available
    split: Optional[Path] = None        # default: the run's validation split
    data_dir: Optional[Path] = None     # default: the run's data folder (set it when the data has moved)
    batch_size: Optional[int] = setting(None, positive)  # default: the run's batch size
    workers: int = setting(2, non_negative)


BEST_KIND = "best mAP@0.25 on the validation split"


def load_run(run_dir: Path) -> FinetuneConfig:
    """The config of a `pcd finetune detection` run."""
    return load_run_config(run_dir, FinetuneConfig, "finetune detection")


def summarise(passes: list[dict]) -> dict:
    """Mean, standard deviation and per-pass values of mAP/mAR and of every class's AP/AR."""
    keys = [k for k in passes[0] if k.startswith(("mAP_", "mAR_"))]
    per_class = {name: summarise_passes([p["per_class"][name] for p in passes])
                 for name in passes[0]["per_class"]}
    return {"metrics": summarise_passes(passes, keys), "per_class": per_class}


def print_table(summary: dict, title: str, console: Console) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("AP@0.25", justify="right")
    table.add_column("AP@0.5", justify="right")
    fmt = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"  # noqa: E731
    for name, metrics in summary["per_class"].items():
        table.add_row(name, fmt(metrics["AP_0.25"]), fmt(metrics["AP_0.5"]))
    table.add_section()
    table.add_row("mAP", fmt(summary["metrics"]["mAP_0.25"]), fmt(summary["metrics"]["mAP_0.5"]), style="bold")
    console.print(table)


def run(cfg: Config) -> int:
    console = Console()
    run_cfg = load_run(cfg.run_dir)
    if cfg.data_dir is not None:
        run_cfg.data_dir = cfg.data_dir
    split = cfg.split or run_cfg.val_split
    if split is None:
        raise PcdError(f"{cfg.run_dir}: the run has no validation split; pass --set split=FILE")
    scenes = read_scene_list(split, run_cfg.data_dir, console)
    path, what = resolve_checkpoint(cfg.run_dir, cfg.checkpoint, BEST_KIND)
    model = build_detector(run_cfg.model)
    checkpoint = load_model_weights(model, path, "detector")
    device = evaluation_device(cfg.device)
    model = prepare_fp32(model, device)
    epoch = checkpoint.get("epoch")
    console.print(f"evaluating {path} ({what}, after epoch {epoch}) on {len(scenes)} scenes of {split}, "
                  f"{cfg.passes} seeded passes, float32")
    init = read_init_record(cfg.run_dir) or {}
    overlap = warn_overlap(init.get("pretrain_scenes"), scenes, "evaluated")

    raw: list[list[tuple[np.ndarray, ...]]] = []

    def one_pass(seed: int) -> dict:
        dataset = DetectionDataset(run_cfg.data_dir, scenes, run_cfg.num_points, seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size or run_cfg.optim.batch_size,
                                             num_workers=cfg.workers, collate_fn=collate)
        raw.append([])
        result = evaluate_detector(model, loader, device, run_cfg.ap, proposals=raw[-1])
        console.print(f"pass seed {seed}: mAP@0.25 {100 * result['mAP_0.25']:.2f}  "
                      f"mAP@0.5 {100 * result['mAP_0.5']:.2f}")
        return result

    seeds, passes = seeded_passes(cfg.seed, cfg.passes, one_pass)
    summary = summarise(passes)
    print_table(summary, f"{cfg.run_dir} — {what} (epoch {epoch}), mean ± std over {len(seeds)} passes", console)
    out = write_results(cfg.run_dir, path, {
        "task": "detection", "checkpoint": str(path), "checkpoint_kind": what, "epoch": epoch,
        "data": {"data_dir": str(run_cfg.data_dir), "split": str(split), "num_scenes": len(scenes),
                 "num_points": run_cfg.num_points, "scenes": scenes},
        "protocol": "3detr: seeded point sampling per scene, VoteNet/3DETR AP", "seeds": seeds,
        "frame": run_cfg.model.frame, "iou_thresholds": [0.25, 0.5], "ap_config": config_to_dict(run_cfg.ap),
        **summary, "passes": passes, "pretrain_overlap": overlap})
    write_predictions(cfg.run_dir, path, {
        "box_minmax": np.stack([np.stack([p[0] for p in one]) for one in raw]).astype(np.float32),
        "sem_cls_prob": np.stack([np.stack([p[1] for p in one]) for one in raw]).astype(np.float32),
        "objectness": np.stack([np.stack([p[2] for p in one]) for one in raw]).astype(np.float32)})
    console.print(f"wrote {out}")
    return 0
