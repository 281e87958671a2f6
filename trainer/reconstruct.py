"""Masked point reconstruction (Point-MAE): random patch masking, the decoder, and Chamfer L2.

Facts from Point-MAE (`models/Point_MAE.py`, `extensions/chamfer_dist`; see formats.md section 7):
- Masking: per sample, exactly int(ratio x G) of the G patches are masked, chosen uniformly at random (38 of 64 at
  60%). The patch tokenizer runs on every patch; only the visible tokens, in FPS order, enter the encoder blocks, so
  the encoder never sees a mask token.
- Decoder: the visible tokens (after the encoder's final norm) followed by one shared mask token per masked patch;
  a separate positional MLP embeds the visible and the masked centres and is re-added before every block; the
  decoder's final norm is applied to the masked positions only, and one Conv1d maps each to the 3 x M coordinates of
  its patch's M points, relative to the patch centre (the centres themselves are given, not predicted).
- Loss `cdl2`: for each masked patch, the squared distance from every predicted point to its nearest target point
  and from every target point to its nearest prediction; the loss is the mean of the first plus the mean of the
  second, over all patches of the batch (not halved, not scaled by 1,000 as Point-MAE's text log prints it).

The decoder's modules carry Point-MAE's names (`mask_token`, `decoder_pos_embed`, `MAE_decoder.blocks.<i>`,
`MAE_decoder.norm`, `increase_dim.0`), so its state dict is the decoder part of a Point-MAE pre-training checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from pcd.pipeline.config import InvalidSetting, fraction, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, Block, PointBackbone
from pcd.trainer.distill import DistillConfig, DistillModel


@dataclass
class ReconstructConfig:
    """The reconstruction objective. Defaults: the paper's variant (3-layer decoder, 60% random masking); Point-MAE's
    own decoder has 4 blocks (preset `point-mae`)."""

    mask_ratio: float = setting(0.6, fraction)
    decoder_depth: int = setting(3, positive)
    # None: the backbone's num_heads (Point-MAE: 6 at width 384)
    decoder_num_heads: Optional[int] = setting(None, positive)
    # stochastic depth, linear from 0 over the decoder blocks (Point-MAE)
    decoder_drop_path_rate: float = setting(0.1, fraction)

    def check_for(self, backbone: BackboneConfig) -> None:
        """For the config that owns this one: the masking and the decoder's heads must fit the backbone."""
        problem = masking_problem(backbone.num_groups, self.mask_ratio)
        if problem:
            raise InvalidSetting("mask_ratio", problem)
        heads = self.decoder_num_heads or backbone.num_heads
        if backbone.trans_dim % heads:
            raise InvalidSetting("decoder_num_heads", f"must divide model.trans_dim ({backbone.trans_dim})")


def num_masked(num_groups: int, mask_ratio: float) -> int:
    """Patches masked per sample: int(ratio x G), as Point-MAE (38 of 64 at 0.6)."""
    return int(mask_ratio * num_groups)


def masking_problem(num_groups: int, mask_ratio: float) -> Optional[str]:
    """Why a ratio cannot be used with `num_groups` patches (it masks none, or all), or None."""
    masked = num_masked(num_groups, mask_ratio)
    if 0 < masked < num_groups:
        return None
    return (f"masks {masked} of model.num_groups {num_groups} patches; it must mask at least one and leave at least "
            "one visible")


def check_masking(num_groups: int, mask_ratio: float) -> None:
    """Refuse a ratio that masks no patch (nothing to reconstruct) or every patch (nothing to encode)."""
    problem = masking_problem(num_groups, mask_ratio)
    if problem:
        raise PcdError(f"reconstruct.mask_ratio {mask_ratio} {problem}")


def random_mask(batch: int, num_groups: int, mask_ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """A (B,G) bool mask, True = masked, with exactly num_masked(G, ratio) masked patches per sample, each sample's
    set drawn uniformly. Drawn on the CPU (from `generator`, else torch's global RNG, which checkpoints restore), so
    a seed gives the same masks on every device."""
    masked = num_masked(num_groups, mask_ratio)
    order = torch.rand(batch, num_groups, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_groups, dtype=torch.bool)
    mask.scatter_(1, order[:, :masked], True)
    return mask


def chamfer_l2(prediction: Tensor, target: Tensor) -> Tensor:
    """Point-MAE's `cdl2` over a batch of point sets (B,N,3) and (B,M,3): mean over all predicted points of the
    squared distance to the nearest target point of the same set, plus the same from target to prediction."""
    prediction, target = prediction.float(), target.float()
    squared = (prediction.unsqueeze(2) - target.unsqueeze(1)).square().sum(dim=-1)  # (B,N,M), exact, no matmul
    return squared.amin(dim=2).mean() + squared.amin(dim=1).mean()


class DecoderBlocks(nn.Module):
    """Point-MAE's TransformerDecoder: blocks with the positions re-added before each, then a norm of the last
    `num_query` tokens only (the masked ones)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, num_query: int) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x[:, -num_query:])


class ReconstructionDecoder(nn.Module):
    """Mask token, decoder positions, decoder blocks and the point head: everything reconstruction adds to the
    backbone. Attribute names are Point-MAE's, for checkpoint compatibility (see the module docstring)."""

    def __init__(self, backbone_cfg: BackboneConfig, cfg: ReconstructConfig):
        super().__init__()
        dim = backbone_cfg.trans_dim
        heads = cfg.decoder_num_heads or backbone_cfg.num_heads
        if dim % heads:
            raise PcdError(f"reconstruct.decoder_num_heads ({heads}) does not divide model.trans_dim ({dim})")
        if cfg.decoder_depth < 1:
            raise PcdError(f"reconstruct.decoder_depth must be at least 1, not {cfg.decoder_depth}")
        self.group_size = backbone_cfg.group_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.MAE_decoder = DecoderBlocks(dim, cfg.decoder_depth, heads, backbone_cfg.mlp_ratio,  # noqa: N815
                                         cfg.decoder_drop_path_rate)
        self.increase_dim = nn.Sequential(nn.Conv1d(dim, 3 * backbone_cfg.group_size, 1))
        # Point-MAE's initialisation: xavier for the decoder blocks, trunc-normal for the mask token, PyTorch's
        # default for the positional MLP and the point head (neither of Point-MAE's _init_weights reaches them).
        self.MAE_decoder.apply(_xavier_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: Tensor, visible_centers: Tensor, masked_centers: Tensor) -> Tensor:
        """Visible tokens (B,V,C) with their centres (B,V,3), masked centres (B,K,3) -> points (B,K,M,3) relative
        to the masked centres."""
        batch, num_masked_patches, _ = masked_centers.shape
        pos = self.decoder_pos_embed(torch.cat([visible_centers, masked_centers], dim=1))
        tokens = torch.cat([visible, self.mask_token.expand(batch, num_masked_patches, -1)], dim=1)
        decoded = self.MAE_decoder(tokens, pos, num_masked_patches)  # (B,K,C)
        points = self.increase_dim(decoded.transpose(1, 2)).transpose(1, 2)  # (B,K,3M), point-major as Point-MAE
        return points.reshape(batch, num_masked_patches, self.group_size, 3)


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def encode_visible(backbone: PointBackbone, neighborhood: Tensor, centers: Tensor, mask: Tensor) -> Tensor:
    """The backbone on the visible patches only: tokens of every patch, keep the unmasked ones (FPS order), then the
    blocks with their centres' positions and the final norm -> (B,V,C)."""
    batch, groups = mask.shape
    tokens = backbone.encoder(neighborhood)  # (B,G,C): Point-MAE tokenizes every patch, then drops the masked
    visible = ~mask
    tokens = tokens[visible].reshape(batch, -1, tokens.shape[-1])
    visible_centers = centers[visible].reshape(batch, -1, 3)
    layers = backbone.blocks(tokens, backbone.pos_embed(visible_centers))
    return backbone.norm(layers[-1])


def masked_reconstruction_loss(backbone: PointBackbone, decoder: ReconstructionDecoder, xyz: Tensor,
                               mask_ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Point-MAE's pre-training loss for normalized clouds xyz (B,N,3): mask, encode the visible patches, decode the
    masked ones, Chamfer L2 against their points relative to their centres."""
    neighborhood, centers, _ = backbone.group_divider(xyz)
    batch, groups, size, _ = neighborhood.shape
    mask = random_mask(batch, groups, mask_ratio, generator).to(xyz.device)
    visible = encode_visible(backbone, neighborhood, centers, mask)
    prediction = decoder(visible, centers[~mask].reshape(batch, -1, 3), centers[mask].reshape(batch, -1, 3))
    target = neighborhood[mask].reshape(-1, size, 3)
    return chamfer_l2(prediction.reshape(-1, size, 3), target)


class ReconstructModel(nn.Module):
    """Student for the `reconstruct` objective: `backbone` (exported) and `decoder` (kept beside it by export)."""

    def __init__(self, backbone_cfg: BackboneConfig, cfg: ReconstructConfig):
        super().__init__()
        check_masking(backbone_cfg.num_groups, cfg.mask_ratio)
        self.mask_ratio = cfg.mask_ratio
        self.backbone = PointBackbone(backbone_cfg)
        self.decoder = ReconstructionDecoder(backbone_cfg, cfg)

    def loss(self, batch: dict[str, Tensor], generator: Optional[torch.Generator] = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = masked_reconstruction_loss(self.backbone, self.decoder, batch["points"], self.mask_ratio, generator)
        return loss, {"loss": loss.detach()}

    def no_weight_decay(self) -> set[str]:
        """Norms, biases and the mask token (Point-MAE skips 1-D parameters and names containing 'token')."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or "token" in name}


@dataclass
class LossWeights:
    """Weights of the two losses of `distill+reconstruct` (the paper gives none: 1:1)."""

    distill: float = setting(1.0, non_negative)
    reconstruct: float = setting(1.0, non_negative)


class DistillReconstructModel(DistillModel):
    """`distill+reconstruct`: the distillation student plus the reconstruction decoder on one backbone. Each batch
    takes two passes: the full cloud for distillation, the masked one for reconstruction."""

    def __init__(self, backbone_cfg: BackboneConfig, distill_cfg: DistillConfig, prefix_shape: tuple[int, int],
                 clip_dim: int, cfg: ReconstructConfig, weights: LossWeights):
        super().__init__(backbone_cfg, distill_cfg, prefix_shape, clip_dim, variant="distill")
        check_masking(backbone_cfg.num_groups, cfg.mask_ratio)
        self.mask_ratio = cfg.mask_ratio
        self.weights = weights
        self.decoder = ReconstructionDecoder(backbone_cfg, cfg)

    def loss(self, batch: dict[str, Tensor], generator: Optional[torch.Generator] = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        distill, _ = super().loss(batch)
        reconstruct = masked_reconstruction_loss(self.backbone, self.decoder, batch["points"], self.mask_ratio,
                                                 generator)
        loss = self.weights.distill * distill + self.weights.reconstruct * reconstruct
        return loss, {"loss": loss.detach(), "loss_distill": distill.detach(),
                      "loss_reconstruct": reconstruct.detach()}

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}
