"""The student backbone: Point-MAE's encoder in plain PyTorch, with Point-MAE's module names.

Module and parameter names match Point-MAE's `MaskTransformer` (`encoder.first_conv.0.weight`,
`pos_embed.2.bias`, `blocks.blocks.3.attn.qkv.weight`, `norm.weight`, ...), so a state dict moves between
the two code bases by adding or removing the `MAE_encoder.` prefix. Grouping (FPS + kNN) is pure torch,
batched, on CPU and GPU, so no compiled extension (pointnet2_ops, knn_cuda) is needed.

Unlike Point-MAE pre-training, nothing is masked: the distillation student sees every patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd.pipeline.config import InvalidSetting, fraction, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.point_ops import farthest_point_sample, farthest_point_sample_cloud, gather_points, knn


@dataclass
class BackboneConfig:
    """Sizes of the backbone; the defaults are the paper's (and Point-MAE's) encoder."""

    num_groups: int = setting(64, positive)
    group_size: int = setting(32, positive)
    trans_dim: int = setting(384, positive)
    encoder_dims: int = setting(384, positive)
    depth: int = setting(12, positive)
    num_heads: int = setting(6, positive)
    mlp_ratio: float = setting(4.0, positive)
    drop_path_rate: float = setting(0.1, fraction)

    def validate(self) -> None:
        if self.trans_dim % self.num_heads:
            raise InvalidSetting("num_heads", f"must divide trans_dim ({self.trans_dim})")

    def check_points(self, num_points: int) -> None:
        """For the config that owns this backbone: `num_points` per cloud must fill the groups and patches."""
        if self.num_groups > num_points:
            raise InvalidSetting("num_groups", f"must not exceed num_points ({num_points})")
        if self.group_size > num_points:
            raise InvalidSetting("group_size", f"must not exceed num_points ({num_points})")


def check_fetch_blocks(blocks: tuple[int, ...], depth: int) -> None:
    """For a head that reads several blocks' outputs (`fetch_blocks` of its config's `validate()`): each index
    must name one of the `depth` blocks."""
    if not blocks or any(not 0 <= i < depth for i in blocks):
        raise InvalidSetting("fetch_blocks", f"must be block indices in 0..{depth - 1}")


@dataclass
class BackboneOutput:
    tokens: Tensor  # (B,G,C) after the final norm
    centers: Tensor  # (B,G,3) patch centres (FPS picks), in the normalized input frame
    layers: list[Tensor] | None  # per-block outputs (B,G,C) before the final norm, when return_all
    center_idx: Tensor  # (B,G) indices of the centres in xyz


class Group(nn.Module):
    """FPS centres and kNN patches, each patch translated so its centre is the origin (no scaling)."""

    def __init__(self, num_groups: int, group_size: int):
        super().__init__()
        self.num_groups = num_groups
        self.group_size = group_size

    def forward(self, xyz: Tensor, groups: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """xyz (B,N,3) -> neighbourhoods (B,G,M,3), centres (B,G,3), centre indices (B,G).

        `groups` = (centre indices (B,G), patch indices (B,G,M)) computed ahead by `loader_groups` (in data loader
        workers, off the training step); None computes them here."""
        with torch.autocast(device_type=xyz.device.type, enabled=False):
            if groups is None:
                center_idx = farthest_point_sample(xyz, self.num_groups)
                patch_idx = knn(gather_points(xyz, center_idx), xyz, self.group_size)
            else:
                center_idx, patch_idx = groups
            centers = gather_points(xyz, center_idx)
            neighborhood = gather_points(xyz, patch_idx) - centers.unsqueeze(2)
        return neighborhood, centers, center_idx


def loader_groups(xyz: np.ndarray, num_groups: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`Group`'s centre indices (G,) and patch indices (G,M) for ONE normalized cloud (N,3), computed where a data
    loader worker can: the same picks (`farthest_point_sample_cloud`, the same `knn`), so a model fed them computes
    what it would have computed itself."""
    points = np.ascontiguousarray(xyz, dtype=np.float32)
    center_idx = farthest_point_sample_cloud(points, num_groups)
    cloud = torch.from_numpy(points)[None]
    patch_idx = knn(cloud[:, torch.from_numpy(center_idx)], cloud, group_size)[0]
    return center_idx, patch_idx.numpy()


# --- patch embedding ------------------------------------------------------------------------------------

class PointwiseConv(nn.Conv1d):
    """A kernel-1 Conv1d (Point-MAE's parameter names and shapes) applied to channels-last rows (..., C_in): the
    convolution's arithmetic as one matrix product, which CPUs run about 1.4x faster than the convolution."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class PatchEncoder(nn.Module):
    """Point-MAE's mini-PointNet: each patch of M points -> one token of `encoder_dims`.

    Every point is a row, so BatchNorm1d normalises over the same B x G x M values as Point-MAE's (B*G, C, M)
    convolutions do."""

    def __init__(self, encoder_dims: int):
        super().__init__()
        self.encoder_dims = encoder_dims
        self.first_conv = nn.Sequential(
            PointwiseConv(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), PointwiseConv(128, 256, 1))
        self.second_conv = nn.Sequential(
            PointwiseConv(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            PointwiseConv(512, encoder_dims, 1))

    def forward(self, patches: Tensor) -> Tensor:
        """patches (B,G,M,3) -> tokens (B,G,encoder_dims)."""
        batch, groups, size, _ = patches.shape
        x = self.first_conv(patches.reshape(-1, 3)).reshape(batch * groups, size, -1)  # (BG,M,256)
        pooled = x.amax(dim=1, keepdim=True)
        x = torch.cat([pooled.expand(-1, size, -1), x], dim=2).reshape(batch * groups * size, -1)
        x = self.second_conv(x).reshape(batch * groups, size, self.encoder_dims)
        return x.amax(dim=1).reshape(batch, groups, self.encoder_dims)


# --- transformer ----------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p` while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias (Point-MAE); fused SDPA kernel, same maths."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale head_dim^-0.5
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Holds the blocks as `.blocks` so the keys read `blocks.blocks.<i>...` as in Point-MAE."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear 0 -> rate
        self.blocks = nn.ModuleList(
            Block(cfg.trans_dim, cfg.num_heads, cfg.mlp_ratio, rate) for rate in rates)

    def forward(self, x: Tensor, pos: Tensor) -> list[Tensor]:
        """Every block's output; the positional embedding is re-added before each block (Point-MAE)."""
        outputs = []
        for block in self.blocks:
            x = block(x + pos)
            outputs.append(x)
        return outputs


class PointBackbone(nn.Module):
    """Tokenizer + 12 transformer blocks + final norm; the part of the student every fine-tune keeps."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.encoder_dims != cfg.trans_dim:
            # Point-MAE feeds the patch tokens straight into the blocks, without a projection.
            raise PcdError(f"model.encoder_dims ({cfg.encoder_dims}) must equal model.trans_dim ({cfg.trans_dim})")
        if cfg.trans_dim % cfg.num_heads:
            raise PcdError(f"model.trans_dim ({cfg.trans_dim}) is not divisible by model.num_heads ({cfg.num_heads})")
        self.cfg = cfg
        self.group_divider = Group(cfg.num_groups, cfg.group_size)
        self.encoder = PatchEncoder(cfg.encoder_dims)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, cfg.trans_dim))
        self.blocks = TransformerEncoder(cfg)
        self.norm = nn.LayerNorm(cfg.trans_dim)
        self.apply(init_weights)

    def embed(self, xyz: Tensor, groups: Optional[tuple[Tensor, Tensor]] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Patch tokens (B,G,C), their position embeddings (B,G,C), centres (B,G,3) and centre indices (B,G).

        The part before the transformer, shared with the task models that add tokens (classification's cls
        token) or read several blocks (part segmentation). `groups`: see `Group`.
        """
        neighborhood, centers, center_idx = self.group_divider(xyz, groups)
        return self.encoder(neighborhood), self.pos_embed(centers), centers, center_idx

    def forward(self, xyz: Tensor, return_all: bool = False,
                groups: Optional[tuple[Tensor, Tensor]] = None) -> BackboneOutput:
        """xyz (B,N,3), already normalized with `pcd.trainer.normalize.normalize_points`; `groups`: see `Group`."""
        tokens, pos, centers, center_idx = self.embed(xyz, groups)
        layers = self.blocks(tokens, pos)
        return BackboneOutput(tokens=self.norm(layers[-1]), centers=centers,
                              layers=layers if return_all else None, center_idx=center_idx)


def init_weights(module: nn.Module) -> None:
    """Point-MAE's initialisation: truncated normal (std .02) for linear and conv weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
