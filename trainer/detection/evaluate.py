"""`pcd evaluate detection RUN_DIR` and the evaluation pass shared with training."""

from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import torch

from pcd.trainer.detection.ap import APCalculator, APConfig, parse_predictions


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                      ap_cfg: APConfig | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """One pass over `batches`: final-layer boxes -> 3DETR post-processing -> AP/AR at IoU 0.25 and 0.5."""
    ap_cfg = ap_cfg or APConfig()
    calculator = APCalculator()
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            precision = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with precision:
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
                detections = parse_predictions(boxes[b], sem_prob[b], objectness[b], points[b], ap_cfg)
                gt_boxes = np.concatenate([centers[b] - sizes[b] / 2, centers[b] + sizes[b] / 2], -1)
                ground_truth = [(int(labels[b, k]), gt_boxes[k]) for k in np.where(present[b])[0]]
                calculator.add_scene(detections, ground_truth)
    finally:
        model.train(was_training)
    return calculator.compute()
