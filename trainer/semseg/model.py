"""The semantic-segmentation model of the paper's Table 2 on pcd's backbone.

The paper: 8,192 points, 256 patches of 32, the 12-block encoder, the 3 nearest patch centres per point, two
1-D convolution blocks, 20 classes. Where it is silent, pcd follows the part-segmentation heads of Point-MAE and
ACT (docs/semseg.md): the outputs of blocks 4, 8 and 12 (0-based 3, 7, 11) each go through the backbone's shared
final norm and are concatenated per patch centre (3 x 384 = 1,152 channels); PointNet++ feature propagation
(Point-MAE's `PointNetFeaturePropagation`, reused from the part-segmentation model) interpolates them to each
query point from its 3 nearest centres (inverse squared distance), prepends the point's xyz and applies
Conv 1,155 -> 512 + BN + ReLU (the first conv block); dropout 0.5 and Conv 512 -> 20 (the second) give the
logits. No global feature (ACT's has one; the paper does not mention it).

`encode` (backbone + multi-block features) and `decode` (propagation + head at any query points) are separate,
so whole-scene evaluation encodes a crop once and decodes every vertex in it in chunks. In eval mode a query's
logits depend only on the crop's input points and the query itself. Points must already be in the weights' frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pcd.pipeline.config import InvalidSetting, positive, setting, validate_config
from pcd.trainer.backbone import BackboneConfig, PointBackbone, check_fetch_blocks
from pcd.trainer.partseg.model import PointNetFeaturePropagation
from pcd.trainer.semseg.classes import NUM_CLASSES


def semseg_backbone_config() -> BackboneConfig:
    """The paper's grouping for scenes: 8,192 points in 256 patches of 32."""
    return BackboneConfig(num_groups=256, group_size=32)


@dataclass
class SemSegConfig:
    """Sizes of the segmentation model; the defaults are the paper's (and pcd's where it is silent)."""

    backbone: BackboneConfig = field(default_factory=semseg_backbone_config)
    num_classes: int = setting(NUM_CLASSES, positive)
    fetch_blocks: tuple[int, ...] = (3, 7, 11)  # 0-based blocks whose normed outputs feed the head
    head_dim: int = setting(512, positive)
    head_dropout: float = 0.5

    def validate(self) -> None:
        check_fetch_blocks(self.fetch_blocks, self.backbone.depth)
        if not 0 <= self.head_dropout < 1:
            raise InvalidSetting("head_dropout", "must be in [0, 1)")


class PointMAESemSegmenter(PointBackbone):
    """Backbone + multi-block features + 3-NN propagation + two conv blocks.

    A PointBackbone subclass so that the backbone's modules sit at the top level under Point-MAE's names and
    `--init` fills them strictly.
    """

    def __init__(self, cfg: SemSegConfig):
        super().__init__(validate_config(cfg).backbone)
        self.task_cfg = cfg
        features = len(cfg.fetch_blocks) * cfg.backbone.trans_dim
        self.propagation_0 = PointNetFeaturePropagation(features + 3, (cfg.head_dim,))
        self.dp1 = nn.Dropout(cfg.head_dropout)
        self.convs2 = nn.Conv1d(cfg.head_dim, cfg.num_classes, 1)

    def encode(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        """xyz (B,N,3) -> patch centres (B,G,3) and their features (B,G,len(fetch_blocks)*trans_dim)."""
        tokens, pos, centers, _ = self.embed(xyz)
        layers = self.blocks(tokens, pos)
        return centers, torch.cat([self.norm(layers[i]) for i in self.task_cfg.fetch_blocks], dim=-1)

    def decode(self, query_xyz: Tensor, centers: Tensor, features: Tensor) -> Tensor:
        """Logits (B,Q,num_classes) at query points (B,Q,3) from an encoded crop."""
        h = self.propagation_0(query_xyz, centers, features)
        return self.convs2(self.dp1(h)).transpose(1, 2)

    def forward(self, xyz: Tensor, query_xyz: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """xyz (B,N,3), query points (B,Q,3) (default: xyz) -> logits (B,Q,num_classes)."""
        centers, features = self.encode(xyz)
        return self.decode(xyz if query_xyz is None else query_xyz, centers, features)

