"""A pre-trained backbone for your own code: `pcd.load_backbone(path)` and `model.encode(points)`.

`load_backbone` reads what `pcd export` writes (the folder, its backbone.safetensors, backbone.json or
point_mae.pth) or a Point-MAE checkpoint (pre-training or fine-tuning; `base_model`/`MAE_encoder.` keys), through
the loaders of `pcd.trainer.weights` (weights_only, strict on every backbone key). The result knows the frame and
the normalisation its weights expect, so `encode` feeds them as pre-training did:

- pcd export: z-up points (ScanNet's gravity frame; `pcd.trainer.normalize.camera_to_gravity` turns camera-frame
  points into it), centred and scaled to the unit sphere (`gravity-unit-sphere`); architecture from backbone.json.
- Point-MAE checkpoint: the y-up frame of Point-MAE's ModelNet/ShapeNet files, the same unit sphere (its
  `pc_norm`); the architecture is read from the tensor shapes, except what the weights do not hold: `num_heads`
  (Point-MAE: 6), `num_groups` and `group_size` (Point-MAE's pre-training: 64 and 32), which may be given.

    import pcd
    model = pcd.load_backbone("runs/pretrain/export")
    encoded = model.encode(points)          # points (N,3) or (B,N,3) in the model's frame (model.up_axis)
    encoded.tokens, encoded.centers         # (G,C) patch tokens after the final norm; (G,3) centres in the input's units
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from pcd.pipeline.config import config_from_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.normalize import NORMALIZATION, normalize_points
from pcd.trainer.weights import LoadReport, load_backbone_weights, read_checkpoint, read_export_metadata

POINT_MAE_FRAME = {"up_axis": "y", "normalization": "unit-sphere"}  # Point-MAE's pc_norm on y-up object files
POINT_MAE_ARCHITECTURE = {"num_heads": 6, "num_groups": 64, "group_size": 32}  # not readable from the weights


@dataclass
class Encoding:
    """What `PretrainedBackbone.encode` returns; unbatched input gives unbatched fields."""

    tokens: Tensor  # (B,G,C) patch tokens after the backbone's final norm
    centers: Tensor  # (B,G,3) patch centres: input points (FPS picks), in the input's frame and units
    center_idx: Tensor  # (B,G) indices of the centres among the input points


class PretrainedBackbone(nn.Module):
    """A backbone with the input frame and normalisation its weights were trained on.

    `forward(points)` (differentiable, for fine-tuning in your own loop) and `encode(points)` (inference: eval
    mode, no gradients) both normalise the points themselves; give them in the frame `up_axis` names.
    """

    def __init__(self, backbone: PointBackbone, up_axis: str, normalization: str, source: Path, kind: str,
                 metadata: Optional[dict[str, Any]] = None):
        super().__init__()
        self.backbone = backbone
        self.up_axis = up_axis
        self.normalization = normalization
        self.source = source
        self.kind = kind  # "pcd-export" or "point-mae"
        self.metadata = metadata  # backbone.json of a pcd export (scenes, teacher, objective, ...); None otherwise

    @property
    def config(self) -> BackboneConfig:
        return self.backbone.cfg

    def forward(self, points: Union[Tensor, np.ndarray]) -> Encoding:
        xyz, batched = self._as_batch(points)
        normalized, _, _ = normalize_points(xyz)
        out = self.backbone(normalized)
        centers = torch.gather(xyz, 1, out.center_idx[..., None].expand(-1, -1, 3))
        encoding = Encoding(tokens=out.tokens, centers=centers, center_idx=out.center_idx)
        if batched:
            return encoding
        return Encoding(tokens=encoding.tokens[0], centers=encoding.centers[0], center_idx=encoding.center_idx[0])

    @torch.no_grad()
    def encode(self, points: Union[Tensor, np.ndarray]) -> Encoding:
        """Patch tokens and centres of points (N,3) or (B,N,3), in eval mode (no drop-path) without gradients."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(points)
        finally:
            self.train(was_training)

    def _as_batch(self, points: Union[Tensor, np.ndarray]) -> tuple[Tensor, bool]:
        xyz = torch.as_tensor(np.asarray(points) if isinstance(points, np.ndarray) else points)
        batched = xyz.ndim == 3
        if xyz.ndim not in (2, 3) or xyz.shape[-1] != 3:
            raise ValueError(f"points must be (N,3) or (B,N,3), got {tuple(xyz.shape)}")
        needed = max(self.config.num_groups, self.config.group_size)
        if xyz.shape[-2] < needed:
            raise ValueError(f"{xyz.shape[-2]} points per cloud; this backbone groups {self.config.num_groups} "
                             f"patches of {self.config.group_size} points, so it needs at least {needed}")
        device = next(self.backbone.parameters()).device
        xyz = xyz.to(device=device, dtype=torch.float32)
        return (xyz if batched else xyz.unsqueeze(0)), batched


def load_backbone(path: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                  num_heads: Optional[int] = None, num_groups: Optional[int] = None,
                  group_size: Optional[int] = None) -> PretrainedBackbone:
    """The backbone of a `pcd export` (folder or one of its files) or of a Point-MAE checkpoint, in eval mode.

    `num_heads`, `num_groups` and `group_size` override the architecture (a pcd export records them; for a
    Point-MAE checkpoint they default to Point-MAE's 6, 64 and 32). Errors are `PcdError`s naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise PcdError(f"{path}: no such file or folder")
    overrides = {k: v for k, v in {"num_heads": num_heads, "num_groups": num_groups,
                                   "group_size": group_size}.items() if v is not None}
    metadata = read_export_metadata(path)
    if metadata is not None:
        cfg = _export_config(path, metadata, overrides)
        up_axis, normalization, kind = "z", str(NORMALIZATION["name"]), "pcd-export"
    else:
        checkpoint = read_checkpoint(path)
        cfg = _point_mae_config(path, checkpoint, overrides)
        # a point_mae.pth that pcd exported and that travelled without its folder still says its frame
        up_axis = str(checkpoint.get("up_axis", POINT_MAE_FRAME["up_axis"]))
        normalization = str(checkpoint.get("normalization", POINT_MAE_FRAME["normalization"]))
        kind = "point-mae"
    backbone = PointBackbone(cfg)
    report: LoadReport = load_backbone_weights(backbone, path)
    model = PretrainedBackbone(backbone, up_axis, normalization, path, kind, report.metadata)
    return model.to(device).eval()


def _export_config(path: Path, metadata: dict[str, Any], overrides: dict[str, int]) -> BackboneConfig:
    if not isinstance(metadata.get("backbone"), dict):
        raise PcdError(f"{path}: the export's backbone.json has no 'backbone' architecture")
    try:
        return config_from_dict(BackboneConfig, {**metadata["backbone"], **overrides})
    except PcdError as exc:
        raise PcdError(f"{path}: backbone.json 'backbone': {exc}") from None


_BLOCK_KEY = re.compile(r"^blocks\.blocks\.(\d+)\.")


def _point_mae_config(path: Path, checkpoint: dict[str, Any], overrides: dict[str, int]) -> BackboneConfig:
    """The architecture of a Point-MAE encoder read from its tensor shapes (and Point-MAE's defaults)."""
    state = next((checkpoint[k] for k in ("base_model", "model", "state_dict") if isinstance(checkpoint.get(k), dict)),
                 checkpoint)
    shapes = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            name = key.replace("module.", "")
            for prefix in ("MAE_encoder.", "base_model.", "backbone."):
                name = name.removeprefix(prefix)
            shapes[name] = tuple(value.shape)
    depth = 1 + max((int(m.group(1)) for m in map(_BLOCK_KEY.match, shapes) if m), default=-1)
    if not depth or "pos_embed.2.weight" not in shapes or "encoder.second_conv.3.weight" not in shapes:
        raise PcdError(f"{path}: no Point-MAE encoder in this checkpoint (no 'blocks.blocks.N', 'pos_embed' and "
                       "'encoder' weights, with or without the MAE_encoder./base_model. prefix)")
    trans_dim = shapes["pos_embed.2.weight"][0]
    hidden = shapes.get("blocks.blocks.0.mlp.fc1.weight", (4 * trans_dim,))[0]
    values = {**POINT_MAE_ARCHITECTURE, "trans_dim": trans_dim, "depth": depth, "mlp_ratio": hidden / trans_dim,
              "encoder_dims": shapes["encoder.second_conv.3.weight"][0], **overrides}
    known = {f.name for f in fields(BackboneConfig)}
    try:
        return config_from_dict(BackboneConfig, {**asdict(BackboneConfig()), **{k: v for k, v in values.items()
                                                                                if k in known}})
    except PcdError as exc:
        raise PcdError(f"{path}: {exc}") from None
