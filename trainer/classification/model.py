"""Point-MAE's classifier (`PointTransformer` in models/Point_MAE.py) on pcd's backbone, with Point-MAE's names.

A learned cls token (with its own learned position `cls_pos`) is prepended to the patch tokens; after the
transformer and the final norm, the head reads concat(cls token, max over the patch tokens) through
Linear-BN-ReLU-Dropout twice and a last Linear. The state dict has exactly Point-MAE's keys (`cls_token`,
`cls_pos`, `encoder.*`, `pos_embed.*`, `blocks.blocks.<i>.*`, `norm.*`, `cls_head_finetune.{0,1,4,5,8}.*`), so
Point-MAE's fine-tuned checkpoints load strictly and pcd's load into Point-MAE (see pcd.trainer.point_mae).

Input points must already be in the frame and normalisation of the weights (the data pipeline does that);
the model does not normalise, exactly as Point-MAE, whose datasets normalise before augmenting.

Initialisation: the backbone as pcd's (and Point-MAE's) `init_weights`, cls token and position truncated
normal (std .02), the head PyTorch's defaults: the state Point-MAE fine-tunes from when given a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pcd.trainer.backbone import BackboneConfig, PointBackbone


@dataclass
class ClassifierConfig:
    """Sizes of the classifier; the defaults are Point-MAE's `finetune_modelnet.yaml` (1,024 points, 64x32)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 40
    head_dims: tuple[int, ...] = (256, 256)
    head_dropout: float = 0.5


def classification_head(in_dim: int, hidden: tuple[int, ...], num_classes: int, dropout: float) -> nn.Sequential:
    """Point-MAE's `cls_head_finetune`: (Linear, BN, ReLU, Dropout) per hidden width, then Linear."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, num_classes))
    return nn.Sequential(*layers)


class PointMAEClassifier(PointBackbone):
    """Backbone + cls token + `cls_head_finetune`: points (B,N,3) -> class logits (B,num_classes).

    A PointBackbone subclass so that the backbone's modules sit at the top level under Point-MAE's names
    (as in Point-MAE's `PointTransformer`), not under a `backbone.` prefix.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__(cfg.backbone)
        self.task_cfg = cfg
        dim = cfg.backbone.trans_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        self.cls_head_finetune = classification_head(2 * dim, cfg.head_dims, cfg.num_classes, cfg.head_dropout)

    def forward(self, xyz: Tensor) -> Tensor:  # type: ignore[override]
        """xyz (B,N,3) in the weights' frame -> logits (B,num_classes)."""
        tokens, pos, _, _ = self.embed(xyz)
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        x = self.norm(self.blocks(x, pos)[-1])
        return self.cls_head_finetune(torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1))

