"""Point-MAE's part-segmentation model (`get_model` in segmentation/models/pt.py) on pcd's backbone.

The outputs of three blocks (0-based 3, 7, 11 of 12) each go through the shared final norm and are
concatenated per patch centre (3 x 384). Their max and mean over the centres, plus the object category's
one-hot through `label_conv` (64 channels), form a global feature. `propagation_0` interpolates the per-centre
features to every query point from its 3 nearest centres (inverse squared distance), prepends the query's
xyz, and applies two Conv-BN-ReLU layers (1536, 1024). The head reads concat(point feature, global feature)
through convs1/bns1 (512, dropout .5), convs2/bns2 (256) and convs3 (50 parts).

Parameter names are pt.py's (`encoder.*`, `pos_embed.*`, `blocks.blocks.<i>.*`, `norm.*`, `label_conv.*`,
`propagation_0.mlp_convs.<j>.*`, `propagation_0.mlp_bns.<j>.*`, `convs1..3.*`, `bns1..2.*`), so checkpoints
move both ways (pcd.trainer.point_mae).

Differences from pt.py, none of which changes a result: the forward takes points as (B,N,3) and the
category one-hot as (B,16); it returns logits (pt.py returns their log_softmax; argmax and the NLL of
log_softmax are the same as argmax and cross-entropy of the logits); and it can predict at query points other
than the input points (default: the input points, as pt.py). In eval mode the logits at a query point depend
only on the input points and that query, so evaluation can score every original point of a shape from a
2,048-point sample, in as many chunks as it likes. Points must already be in the weights' frame.

Initialisation: the backbone as pcd's `init_weights`, everything else PyTorch's defaults (pt.py's state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd.pipeline.config import validate_config
from pcd.trainer.backbone import BackboneConfig, PointBackbone, check_fetch_blocks
from pcd.trainer.point_ops import three_nn_interpolate


def partseg_backbone_config() -> BackboneConfig:
    """Point-MAE's segmentation grouping: 2,048 points in 128 patches of 32."""
    return BackboneConfig(num_groups=128, group_size=32)


@dataclass
class PartSegConfig:
    """Sizes of the part-segmentation model; the defaults are pt.py's."""

    backbone: BackboneConfig = field(default_factory=partseg_backbone_config)
    num_parts: int = 50
    num_categories: int = 16
    fetch_blocks: tuple[int, ...] = (3, 7, 11)  # 0-based blocks whose outputs feed the head
    label_dim: int = 64
    propagation_dims: tuple[int, ...] = (1536, 1024)  # pt.py: [trans_dim * 4, 1024]
    head_dims: tuple[int, int] = (512, 256)  # convs1, convs2
    head_dropout: float = 0.5

    def validate(self) -> None:
        check_fetch_blocks(self.fetch_blocks, self.backbone.depth)


class PointNetFeaturePropagation(nn.Module):
    """PointNet++'s feature propagation: 3-NN interpolation, the query xyz prepended, then Conv-BN-ReLU layers."""

    def __init__(self, in_channel: int, mlp: tuple[int, ...]):
        super().__init__()
        self.mlp_convs = nn.ModuleList()
        self.mlp_bns = nn.ModuleList()
        for width in mlp:
            self.mlp_convs.append(nn.Conv1d(in_channel, width, 1))
            self.mlp_bns.append(nn.BatchNorm1d(width))
            in_channel = width

    def forward(self, query_xyz: Tensor, source_xyz: Tensor, source_features: Tensor) -> Tensor:
        """query (B,Q,3), sources (B,S,3) with features (B,S,C) -> (B,mlp[-1],Q)."""
        interpolated = three_nn_interpolate(query_xyz, source_xyz, source_features)
        x = torch.cat([query_xyz.to(interpolated.dtype), interpolated], dim=-1).transpose(1, 2)
        for conv, bn in zip(self.mlp_convs, self.mlp_bns):
            x = F.relu(bn(conv(x)))
        return x


class PointMAEPartSegmenter(PointBackbone):
    """Backbone + multi-block features + category branch + propagation + head (pt.py's `get_model`).

    A PointBackbone subclass so that the backbone's modules sit at the top level under Point-MAE's names.
    """

    def __init__(self, cfg: PartSegConfig):
        super().__init__(validate_config(cfg).backbone)
        self.task_cfg = cfg
        features = len(cfg.fetch_blocks) * cfg.backbone.trans_dim
        self.label_conv = nn.Sequential(nn.Conv1d(cfg.num_categories, cfg.label_dim, 1, bias=False),
                                        nn.BatchNorm1d(cfg.label_dim), nn.LeakyReLU(0.2))
        self.propagation_0 = PointNetFeaturePropagation(features + 3, cfg.propagation_dims)
        head_in = cfg.propagation_dims[-1] + 2 * features + cfg.label_dim
        first, second = cfg.head_dims
        self.convs1 = nn.Conv1d(head_in, first, 1)
        self.dp1 = nn.Dropout(cfg.head_dropout)
        self.convs2 = nn.Conv1d(first, second, 1)
        self.convs3 = nn.Conv1d(second, cfg.num_parts, 1)
        self.bns1 = nn.BatchNorm1d(first)
        self.bns2 = nn.BatchNorm1d(second)

    def forward(  # type: ignore[override]
            self, xyz: Tensor, category: Tensor, query_xyz: Tensor | None = None) -> Tensor:
        """xyz (B,N,3), category one-hot (B,16), query points (B,Q,3) (default xyz) -> logits (B,Q,num_parts)."""
        query_xyz = xyz if query_xyz is None else query_xyz
        tokens, pos, centers, _ = self.embed(xyz)
        layers = self.blocks(tokens, pos)
        x = torch.cat([self.norm(layers[i]) for i in self.task_cfg.fetch_blocks], dim=-1)  # (B,G,F)
        label = self.label_conv(category.to(x.dtype).unsqueeze(-1))  # (B,label_dim,1)
        global_feature = torch.cat([x.amax(dim=1), x.mean(dim=1), label.squeeze(-1)], dim=-1)  # (B,2F+label)
        point_feature = self.propagation_0(query_xyz, centers, x)  # (B,P,Q)
        num_query = point_feature.shape[-1]
        h = torch.cat([point_feature, global_feature.unsqueeze(-1).expand(-1, -1, num_query)], dim=1)
        h = self.dp1(F.relu(self.bns1(self.convs1(h))))
        h = F.relu(self.bns2(self.convs2(h)))
        return self.convs3(h).transpose(1, 2)

