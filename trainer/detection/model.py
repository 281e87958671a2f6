"""3DETR with the pre-trained backbone as its encoder (3DETR `Model3DETR`, assembled from modules passed in).

The encoder is pcd's tokenizer + transformer backbone. It sees the scene through `normalize_points`, the one
normalisation used in pre-training; its patch centres are input points (FPS indices), so their coordinates
are taken back from the input in metres and everything downstream (queries, boxes, losses) is in metres, as
in 3DETR. Tokens are projected to the decoder width; 256 queries are FPS-sampled from the encoder centres and
embedded with Fourier features of their position normalised by the scene's min/max; an 8-layer decoder
returns every layer's output; shared heads predict class logits (18 + background), a centre offset
(sigmoid - 0.5, in metres, added to the query position) and a size (sigmoid x scene extent) per query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pcd.pipeline.config import InvalidSetting, fraction, positive, setting
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.frames import PCD_FRAME, frame_named, rotate_up
from pcd.trainer.point_ops import farthest_point_sample
from pcd.trainer.detection.boxes import NUM_CLASSES
from pcd.trainer.normalize import normalize_points


def detection_backbone_config() -> BackboneConfig:
    """The paper's backbone (12 blocks, 384 wide) with enough patch centres for 256 queries."""
    return BackboneConfig(num_groups=2048)


@dataclass
class DetectorConfig:
    backbone: BackboneConfig = field(default_factory=detection_backbone_config)
    decoder_dim: int = setting(256, positive)
    decoder_layers: int = setting(8, positive)
    decoder_heads: int = setting(4, positive)
    decoder_ffn: int = setting(256, positive)
    decoder_dropout: float = setting(0.1, fraction)
    num_queries: int = setting(256, positive)
    head_dropout: float = setting(0.3, fraction)
    fourier_scale: float = setting(1.0, positive)
    frame: str = PCD_FRAME.name  # frame of the backbone's weights (pcd.trainer.frames); scenes are z up

    def validate(self) -> None:
        if self.decoder_dim % self.decoder_heads:
            raise InvalidSetting("decoder_heads", f"must divide decoder_dim ({self.decoder_dim})")


def conv_mlp(dims: list[int], norm: bool, dropout: float = 0.0, last_activation: bool = False,
             last_bias: bool = True) -> nn.Sequential:
    """3DETR's GenericMLP with 1x1 convolutions: hidden layers are conv (no bias with BN) + BN + ReLU + dropout."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Conv1d(d_in, d_out, 1, bias=(last_bias if last else not norm)))
        if not last or last_activation:
            if norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU())
            if dropout > 0 and not last:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class BackboneEncoder(nn.Module):
    """The pre-trained backbone as a 3DETR encoder: (B,N,3) metres -> centres (B,G,3) metres, tokens (B,G,C).

    The scene (z up) reaches the backbone in the frame of its weights: unit-sphere normalised, and rotated when the
    weights are y-up (a Point-MAE checkpoint). Centres are taken back from the input by index, so boxes stay in the
    scene's metres whatever the frame.
    """

    def __init__(self, backbone: PointBackbone, frame: str = PCD_FRAME.name):
        super().__init__()
        self.backbone = backbone
        self.out_dim = backbone.cfg.trans_dim
        self.up = frame_named(frame).up

    def forward(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xyz_normalized, _, _ = normalize_points(xyz)
        out = self.backbone(rotate_up(xyz_normalized, "z", self.up))
        centers = torch.gather(xyz, 1, out.center_idx[..., None].expand(-1, -1, 3))
        return centers, out.tokens


class FourierPositionEmbedding(nn.Module):
    """3DETR's Fourier features of positions normalised to [0,1] by the scene's min/max."""

    def __init__(self, d_pos: int, scale: float):
        super().__init__()
        self.register_buffer("gauss_b", torch.randn(3, d_pos // 2) * scale)

    def forward(self, xyz: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor) -> torch.Tensor:
        unit = (xyz - dims_min[:, None]) / (dims_max - dims_min).clamp(min=1e-6)[:, None]
        proj = (unit * 2 * math.pi) @ self.gauss_b
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


class DecoderLayer(nn.Module):
    """3DETR's pre-norm decoder layer: self-attention, cross-attention to the tokens, feed-forward."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor,
                memory_pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(tgt)
        q = x + query_pos
        tgt = tgt + self.drop1(self.self_attn(q, q, x, need_weights=False)[0])
        x = self.norm2(tgt)
        tgt = tgt + self.drop2(self.cross_attn(x + query_pos, memory + memory_pos, memory, need_weights=False)[0])
        return tgt + self.drop3(self.ffn(self.norm3(tgt)))


class Decoder(nn.Module):
    """Stack of decoder layers returning every layer's (shared-LayerNorm) output, 3DETR's return_intermediate."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_ffn,
                                                 cfg.decoder_dropout) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.decoder_dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor,
                memory_pos: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, memory_pos)
            outputs.append(self.norm(tgt))
        return outputs


class Detector(nn.Module):
    """3DETR on an external encoder: returns one prediction dict per decoder layer (the last is final)."""

    def __init__(self, encoder: BackboneEncoder, decoder: Decoder, cfg: DetectorConfig,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        dim = cfg.decoder_dim
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = encoder
        self.encoder_to_decoder = conv_mlp([encoder.out_dim, dim, dim], norm=True, last_activation=True,
                                           last_bias=False)
        self.position_embedding = FourierPositionEmbedding(dim, cfg.fourier_scale)
        self.query_projection = conv_mlp([dim, dim, dim], norm=False, last_activation=True)
        self.decoder = decoder
        self.heads = nn.ModuleDict({
            "sem_cls": conv_mlp([dim, dim, dim, num_classes + 1], norm=True, dropout=cfg.head_dropout),
            "center": conv_mlp([dim, dim, dim, 3], norm=True, dropout=cfg.head_dropout),
            "size": conv_mlp([dim, dim, dim, 3], norm=True, dropout=cfg.head_dropout),
        })

    def forward(self, point_clouds: torch.Tensor, dims_min: torch.Tensor,
                dims_max: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        enc_xyz, tokens = self.encoder(point_clouds)
        memory = self.encoder_to_decoder(tokens.transpose(1, 2)).transpose(1, 2)
        num_queries = min(self.cfg.num_queries, enc_xyz.shape[1])
        query_idx = farthest_point_sample(enc_xyz, num_queries)
        query_xyz = torch.gather(enc_xyz, 1, query_idx[..., None].expand(-1, -1, 3))
        query_pos = self.query_projection(
            self.position_embedding(query_xyz, dims_min, dims_max).transpose(1, 2)).transpose(1, 2)
        memory_pos = self.position_embedding(enc_xyz, dims_min, dims_max)
        layers = self.decoder(torch.zeros_like(query_pos), memory, query_pos, memory_pos)
        return self.predict_boxes(torch.stack(layers), query_xyz, dims_min, dims_max)

    def predict_boxes(self, features: torch.Tensor, query_xyz: torch.Tensor, dims_min: torch.Tensor,
                      dims_max: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Heads on all layers at once (L,B,Q,D) -> per-layer dicts of boxes in metres and normalised."""
        num_layers, batch, queries, dim = features.shape
        flat = features.reshape(num_layers * batch, queries, dim).transpose(1, 2)
        head = {k: h(flat).transpose(1, 2).reshape(num_layers, batch, queries, -1) for k, h in self.heads.items()}
        extent = (dims_max - dims_min).clamp(min=1e-6)[:, None]
        outputs = []
        for layer in range(num_layers):
            logits = head["sem_cls"][layer]
            center = query_xyz + head["center"][layer].sigmoid() - 0.5
            size_normalized = head["size"][layer].sigmoid()
            size = size_normalized * extent
            prob = logits.float().softmax(-1)
            outputs.append({
                "sem_cls_logits": logits,
                "sem_cls_prob": prob[..., :-1],
                "objectness_prob": 1 - prob[..., -1],
                "center_unnormalized": center,
                "center_normalized": (center - dims_min[:, None]) / extent,
                "size_normalized": size_normalized,
                "size_unnormalized": size,
                "box_minmax": torch.cat([center - size / 2, center + size / 2], dim=-1),
            })
        return outputs


def build_detector(cfg: DetectorConfig, num_classes: int = NUM_CLASSES) -> Detector:
    return Detector(BackboneEncoder(PointBackbone(cfg.backbone), cfg.frame), Decoder(cfg), cfg, num_classes)
