"""The distillation student: backbone + concept extraction + the MLP that maps concepts to the teacher's prefix.

Paper sections 3.2 and 3.4, appendix A.1: 32 learnable concept queries read the point tokens of every
backbone block through ONE cross-attention block whose parameters are shared across the 12 applications;
a two-layer MLP maps the 32 concept tokens to the teacher's L x D semantic prefix (10 x 768 for ClipCap);
the loss is MSE. Only `backbone` is kept after pre-training.

Variants (objectives of `pcd.trainer.objectives`, the paper's ablations, table 5):
- ``distill``: the method above.
- ``distill-no-concept``: no cross-attention; the same kind of MLP maps the backbone's final point tokens
  to the prefix.
- ``distill-clip``: concept tokens as in ``distill``, but aligned with the teacher's CLIP image embedding
  (B,E) instead of the caption prefix.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd.pipeline.config import positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, Mlp, PointBackbone, init_weights

Variant = Literal["distill", "distill-no-concept", "distill-clip"]
VARIANTS: tuple[Variant, ...] = typing.get_args(Variant)


@dataclass
class DistillConfig:
    """Sizes of the distillation head; the teacher's prefix shape and CLIP width come from the shards' manifest.
    Which variant is trained is the pre-training objective (`pcd pretrain --objective`)."""

    num_concepts: int = setting(32, positive)  # learnable concept queries (paper A.1)
    # heads of the shared cross-attention; None = the backbone's num_heads
    concept_heads: Optional[int] = setting(None, positive)
    # feed-forward width of the cross-attention block, as the backbone's
    concept_mlp_ratio: float = setting(4.0, positive)
    # hidden width of the head MLP; None = max(teacher's D or E, trans_dim)
    head_hidden: Optional[int] = setting(None, positive)


class ConceptBlock(nn.Module):
    """Cross-attention (queries: concept tokens; keys/values: point tokens), then a feed-forward network.

    Written pre-norm like the backbone blocks: each sub-layer normalises its input and adds a residual;
    the concept tokens get a final layer norm after the last application (`DistillModel.concept_norm`).
    The point tokens arrive already normalised (see `DistillModel.concepts`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, concepts: Tensor, points: Tensor) -> Tensor:
        concepts = concepts + self.attn(self.norm_q(concepts), points, points, need_weights=False)[0]
        return concepts + self.mlp(self.norm2(concepts))


class TokenToPrefix(nn.Module):
    """Two-layer MLP from T tokens of width C to the L x D prefix, with token- and channel-separable weights.

    WHY this shape: the paper only says "a two-layer MLP" maps the 32 x 384 concept tokens to the 10 x 768
    prefix. Applied to the flattened tokens that would be Linear(12288, h) + Linear(h, 7680); with h = 7680
    it has 153 M parameters, seven times the 22 M backbone, and the distillation signal would mostly train
    the head. Here both layers keep the two axes separate:
      layer 1: per-token Linear(C -> h) + GELU (weights shared by the T tokens);
      layer 2: Linear over tokens (T -> L) composed with Linear over channels (h -> D).
    Layer 2 is one linear map (a Kronecker product of the two factors), so this is still a two-layer MLP
    on the flattened tokens, just with structured weights: about 0.9 M parameters at the paper's sizes
    (h = 768), while every prefix token can still draw on every concept token.
    """

    def __init__(self, num_tokens: int, dim: int, prefix_shape: tuple[int, int], hidden: int):
        super().__init__()
        prefix_len, prefix_dim = prefix_shape
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.token_mix = nn.Linear(num_tokens, prefix_len)
        self.fc2 = nn.Linear(hidden, prefix_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B,T,C) -> prefix (B,L,D)."""
        hidden = self.act(self.fc1(tokens))  # (B,T,h)
        hidden = self.token_mix(hidden.transpose(1, 2)).transpose(1, 2)  # (B,L,h)
        return self.fc2(hidden)


class DistillModel(nn.Module):
    """Student for `pcd pretrain`: `backbone` (exported) plus the objective's concept extraction and head."""

    def __init__(self, backbone_cfg: BackboneConfig, distill_cfg: DistillConfig, prefix_shape: tuple[int, int],
                 clip_dim: int, variant: Variant = "distill"):
        super().__init__()
        if variant not in VARIANTS:
            raise PcdError(f"unknown distillation variant '{variant}' (known: {', '.join(VARIANTS)})")
        self.distill_cfg = distill_cfg
        self.objective = variant
        self.prefix_shape = (int(prefix_shape[0]), int(prefix_shape[1]))
        self.clip_dim = int(clip_dim)
        dim = backbone_cfg.trans_dim
        self.backbone = PointBackbone(backbone_cfg)
        target_dim = self.clip_dim if self.objective == "distill-clip" else self.prefix_shape[1]
        hidden = distill_cfg.head_hidden or max(target_dim, dim)
        if self.objective in ("distill", "distill-clip"):
            heads = distill_cfg.concept_heads or backbone_cfg.num_heads
            if dim % heads:
                raise PcdError(f"distill.concept_heads ({heads}) does not divide model.trans_dim ({dim})")
            self.concept_tokens = nn.Parameter(torch.zeros(1, distill_cfg.num_concepts, dim))
            self.concept_block = ConceptBlock(dim, heads, distill_cfg.concept_mlp_ratio)  # shared by all layers
            self.concept_norm = nn.LayerNorm(dim)
        if self.objective == "distill":
            self.head = TokenToPrefix(distill_cfg.num_concepts, dim, self.prefix_shape, hidden)
        elif self.objective == "distill-no-concept":
            self.head = TokenToPrefix(backbone_cfg.num_groups, dim, self.prefix_shape, hidden)
        else:
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, self.clip_dim))
        for name, module in self.named_children():
            if name != "backbone":
                module.apply(init_weights)
        if hasattr(self, "concept_tokens"):
            nn.init.trunc_normal_(self.concept_tokens, std=0.02)

    def concepts(self, xyz: Tensor) -> Tensor:
        """Concept tokens (B,K,C): the shared cross-attention block reads every backbone layer in turn.

        Keys/values are each layer's output through the backbone's final norm (shared by all layers, as
        Point-MAE's segmentation head reads intermediate layers; this also trains the exported norm, which
        nothing else here would) plus the centres' positional embedding, so concepts can use where a patch
        is, not only what it looks like.
        """
        out = self.backbone(xyz, return_all=True)
        pos = self.backbone.pos_embed(out.centers)
        concepts = self.concept_tokens.expand(xyz.shape[0], -1, -1)
        for layer in out.layers:
            concepts = self.concept_block(concepts, self.backbone.norm(layer) + pos)
        return self.concept_norm(concepts)

    def forward(self, xyz: Tensor) -> Tensor:
        """Prediction for normalized points (B,N,3): prefix (B,L,D), or CLIP embedding (B,E) for distill-clip."""
        if self.objective == "distill-no-concept":
            return self.head(self.backbone(xyz).tokens)
        concepts = self.concepts(xyz)
        if self.objective == "distill-clip":
            return self.head(concepts.mean(dim=1))
        return self.head(concepts)

    def target_key(self) -> str:
        """The batch entry this objective regresses: "prefix" or "clip"."""
        return "clip" if self.objective == "distill-clip" else "prefix"

    def loss(self, batch: dict[str, Tensor], generator: Optional[torch.Generator] = None
             ) -> tuple[Tensor, dict[str, float]]:
        """MSE between the prediction for batch["points"] and the teacher's batch["prefix"] (or ["clip"]).

        Draws nothing at random; `generator` is accepted so every objective's loss has one signature (the
        reconstruction objectives draw their masks from it)."""
        key = self.target_key()
        target = batch[key]
        expected = (self.clip_dim,) if key == "clip" else self.prefix_shape
        if tuple(target.shape[1:]) != expected:
            raise PcdError(f"teacher '{key}' has shape {tuple(target.shape[1:])} per sample but the student was "
                           f"built for {expected}; rebuild it from the shards' manifest")
        prediction = self(batch["points"])
        loss = F.mse_loss(prediction.float(), target.float())
        return loss, {"loss": loss.item()}

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay: norms and biases (1-D) and the learnable concept tokens."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name == "concept_tokens"}
