"""`distill-local`: the paper's "direct local alignment" ablation (table 5), 3D patch tokens against CLIP's 2D ones.

The paper (section 4.3.1) compares each 2D encoded patch with the 3D patch "of the nearest projection distance" and
says no more. pcd's reading, written down because the paper is silent:
- 2D tokens: CLIP's patch tokens as `pcd cache-teacher --patch-tokens` stores them (7 x 7 x 768 for ViT-B/32,
  unprojected; through `ln_post` from open_clip 2.23 on, the version is in the teacher identity).
- Where a 3D patch is: the camera-frame point its centre was picked at by FPS (not the normalised, augmented centre),
  projected with the colour intrinsics carried through the teacher's resize and centre crop (`patch_camera.npy`).
  The 2D token compared is the one whose cell holds the projection, which on a regular grid is also the token whose
  cell centre is nearest to it. Patches behind the camera or outside the crop do not count.
- Loss: the backbone's final token of each counted patch goes through one linear layer to the 2D token width, and
  the loss is the mean squared error to its 2D token, averaged over the counted patches of the batch (MSE, as the
  global distillation; a batch without any counted patch contributes zero).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from pcd.trainer.backbone import BackboneConfig, PointBackbone, init_weights
from pcd.trainer.point_ops import gather_points


def project_to_cells(points_cam: Tensor, camera: Tensor, image_size: int, cell: int) -> tuple[Tensor, Tensor]:
    """Token index (row-major over the image_size/cell grid) of each camera-frame point (B,G,3) under the crop
    camera (B,3,3) (edge-convention pixels of the crop), and whether it counts: in front of the camera and inside
    the crop."""
    grid = image_size // cell
    uvw = points_cam.float() @ camera.float().transpose(1, 2)
    depth = uvw[..., 2]
    in_front = depth > 1e-6
    safe = torch.where(in_front, depth, torch.ones_like(depth))
    u, v = uvw[..., 0] / safe, uvw[..., 1] / safe
    inside = in_front & (u >= 0) & (u < image_size) & (v >= 0) & (v < image_size)
    column = torch.floor(u / cell).clamp(0, grid - 1).long()
    row = torch.floor(v / cell).clamp(0, grid - 1).long()
    return row * grid + column, inside


class DistillLocalModel(nn.Module):
    """Student for `distill-local`: `backbone` (exported) and `local_head`, the linear map to the 2D token width."""

    def __init__(self, backbone_cfg: BackboneConfig, patch_tokens: dict[str, Any]):
        super().__init__()
        self.image_size = int(patch_tokens["image_size"])
        self.cell = int(patch_tokens["cell"])
        self.backbone = PointBackbone(backbone_cfg)
        self.local_head = nn.Linear(backbone_cfg.trans_dim, int(patch_tokens["width"]))
        self.local_head.apply(init_weights)

    def loss(self, batch: dict[str, Tensor], generator: Optional[torch.Generator] = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE between projected 3D tokens and the 2D tokens of their cells (see the module docstring); draws
        nothing at random (`generator` only keeps one loss signature for every objective)."""
        out = self.backbone(batch["points"])
        centers_cam = gather_points(batch["points_cam"], out.center_idx)  # (B,G,3) where FPS picked the centres
        cells, counted = project_to_cells(centers_cam, batch["patch_camera"], self.image_size, self.cell)
        tokens = batch["patch_tokens"]
        target = tokens.gather(1, cells.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B,G,W)
        error = (self.local_head(out.tokens).float() - target.float()).square().mean(dim=-1)  # (B,G)
        weight = counted.float()
        loss = (error * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, {"loss": loss.detach(), "counted_patches": weight.mean().detach()}

    def no_weight_decay(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.ndim <= 1}
