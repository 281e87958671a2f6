"""3DETR's set loss: Hungarian matching of queries to ground-truth boxes, then the matched-box losses.

Matching cost (per scene, over its real boxes) = cls * (-p(gt class)) + objectness * (-objectness)
+ center * L1(normalised centres) + giou * (-GIoU). Losses: weighted cross-entropy over the 18 classes plus
background (background weight 0.25), L1 of normalised centres, L1 of normalised sizes, 1 - GIoU; box losses
are summed over matched queries and divided by the number of ground-truth boxes (all-reduced across ranks).
The same loss is added for every decoder layer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from pcd.trainer.detection.boxes import generalized_iou_minmax
from pcd.trainer.detection.config import LossConfig


def gt_minmax(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    centers, sizes = targets["gt_box_centers"], targets["gt_box_sizes"]
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def pairwise_terms(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B,Q,G) L1 distance of normalised centres and GIoU, used by both the matcher and the loss."""
    return {
        "center_dist": torch.cdist(outputs["center_normalized"], targets["gt_box_centers_normalized"], p=1),
        "gious": generalized_iou_minmax(outputs["box_minmax"], gt_minmax(targets)),
    }


class HungarianMatcher:
    """Optimal one-to-one assignment of queries to each scene's ground-truth boxes (scipy)."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                 terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """per_prop_gt_inds (B,Q) ground-truth index of each query (0 when unmatched) and its matched mask."""
        labels = targets["gt_box_sem_cls_label"].long()
        batch, queries, _ = outputs["sem_cls_prob"].shape
        cls_cost = -torch.gather(outputs["sem_cls_prob"], 2, labels[:, None, :].expand(-1, queries, -1))
        cost = (self.cfg.matcher_cls * cls_cost
                + self.cfg.matcher_objectness * -outputs["objectness_prob"][:, :, None]
                + self.cfg.matcher_center * terms["center_dist"]
                + self.cfg.matcher_giou * -terms["gious"]).float().cpu().numpy()
        num_gt = targets["gt_box_present"].sum(1).long().tolist()
        gt_inds = torch.zeros(batch, queries, dtype=torch.long)
        matched = torch.zeros(batch, queries)
        for b in range(batch):
            if num_gt[b] == 0:
                continue
            rows, cols = linear_sum_assignment(cost[b, :, : num_gt[b]])
            gt_inds[b, rows] = torch.from_numpy(cols.astype(np.int64))
            matched[b, rows] = 1.0
        device = outputs["sem_cls_prob"].device
        return {"per_prop_gt_inds": gt_inds.to(device), "proposal_matched_mask": matched.to(device)}


class SetCriterion(nn.Module):
    """Sum over decoder layers of the weighted matched-box losses; returns (loss, per-term values)."""

    def __init__(self, num_classes: int, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(cfg)
        weights = torch.ones(num_classes + 1)
        weights[-1] = cfg.no_object_weight
        self.register_buffer("class_weights", weights, persistent=False)

    def num_boxes(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        total = targets["gt_box_present"].sum().detach().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return total.clamp(min=1.0)

    def single_layer(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                     num_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = pairwise_terms(outputs, targets)
        assign = self.matcher(outputs, targets, terms)
        gt_inds, mask = assign["per_prop_gt_inds"], assign["proposal_matched_mask"]

        labels = torch.gather(targets["gt_box_sem_cls_label"].long(), 1, gt_inds)
        labels = torch.where(mask.bool(), labels, torch.full_like(labels, self.num_classes))
        loss_cls = F.cross_entropy(outputs["sem_cls_logits"].transpose(1, 2).float(), labels,
                                   self.class_weights.to(outputs["sem_cls_logits"].device), reduction="mean")

        center = torch.gather(terms["center_dist"], 2, gt_inds[..., None]).squeeze(-1)
        loss_center = (center * mask).sum() / num_boxes
        giou = torch.gather(terms["gious"], 2, gt_inds[..., None]).squeeze(-1)
        loss_giou = ((1 - giou) * mask).sum() / num_boxes
        gt_sizes = torch.gather(targets["gt_box_sizes_normalized"], 1, gt_inds[..., None].expand(-1, -1, 3))
        size = F.l1_loss(outputs["size_normalized"], gt_sizes, reduction="none").sum(-1)
        loss_size = (size * mask).sum() / num_boxes
        return {"loss_cls": loss_cls, "loss_center": loss_center, "loss_size": loss_size, "loss_giou": loss_giou}

    def forward(self, layer_outputs: list[dict[str, torch.Tensor]],
                targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`layer_outputs`: one prediction dict per decoder layer, the final layer last."""
        num_boxes = self.num_boxes(targets)
        weights = {"loss_cls": self.cfg.loss_cls, "loss_center": self.cfg.loss_center,
                   "loss_size": self.cfg.loss_size, "loss_giou": self.cfg.loss_giou}
        total = torch.zeros((), device=layer_outputs[-1]["sem_cls_logits"].device)
        final: dict[str, torch.Tensor] = {}
        for outputs in layer_outputs:
            losses = self.single_layer(outputs, targets, num_boxes)
            total = total + sum(weights[k] * v for k, v in losses.items() if weights[k] > 0)
            final = losses
        metrics = {k: v.detach() for k, v in final.items()}
        return total, metrics
