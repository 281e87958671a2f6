"""The pre-training objectives of `pcd pretrain`, one plain-dict registry: the paper's method and its ablations.

Each entry names the shard members a sample must carry (`pcd pretrain` refuses shards that lack one, naming the
command that writes it) and builds the student from the pretrain config and the shards' teacher. Objectives that
read no teacher member train on the shards of `pcd extract-scannet` directly.

| objective | paper | student |
| --- | --- | --- |
| distill | the method (tables 3-7) | concept extraction + MLP to ClipCap's prefix, MSE |
| distill-no-concept | table 5, "w/o concept extraction" | MLP from the point tokens to the prefix |
| distill-clip | table 5, "w/o caption model" | concept tokens aligned with CLIP's image embedding |
| distill-local | table 5, "direct local alignment" | 3D patch tokens aligned with the CLIP patch tokens they project to |
| reconstruct | table 6, "reconstruction" | Point-MAE masked autoencoding, Chamfer L2 |
| distill+reconstruct | table 6, "both" | both losses on one backbone, two passes per batch |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from pcd.pipeline.errors import PcdError
from pcd.trainer.data import PATCH_MEMBERS
from pcd.trainer.data import POINT_MEMBERS as POINTS
from pcd.trainer.distill import DistillModel
from pcd.trainer.local_align import DistillLocalModel
from pcd.trainer.reconstruct import DistillReconstructModel, ReconstructModel

@dataclass(frozen=True)
class Objective:
    """What an objective reads and how its student is built: `build(cfg, teacher)` with the pretrain Config and
    the manifest's teacher (None for extraction shards)."""

    members: tuple[str, ...]
    build: Callable[[Any, Optional[dict[str, Any]]], nn.Module]
    summary: str

    @property
    def needs_teacher(self) -> bool:
        return any(member not in POINTS for member in self.members)


def _prefix_shape(teacher: dict[str, Any]) -> tuple[int, int]:
    return int(teacher["prefix_length"]), int(teacher["prefix_dim"])


def _distill(variant: str) -> Callable[[Any, Optional[dict[str, Any]]], nn.Module]:
    def build(cfg: Any, teacher: Optional[dict[str, Any]]) -> nn.Module:
        return DistillModel(cfg.model, cfg.distill, _prefix_shape(teacher), int(teacher["clip_dim"]), variant)
    return build


def _distill_reconstruct(cfg: Any, teacher: Optional[dict[str, Any]]) -> nn.Module:
    return DistillReconstructModel(cfg.model, cfg.distill, _prefix_shape(teacher), int(teacher["clip_dim"]),
                                   cfg.reconstruct, cfg.loss_weights)


OBJECTIVES: dict[str, Objective] = {
    "distill": Objective((*POINTS, "prefix.npy"), _distill("distill"),
                         "concept tokens -> ClipCap prefix (the paper's method)"),
    "distill-no-concept": Objective((*POINTS, "prefix.npy"), _distill("distill-no-concept"),
                                    "point tokens -> ClipCap prefix, no concept extraction"),
    "distill-clip": Objective((*POINTS, "clip.npy"), _distill("distill-clip"),
                              "concept tokens -> CLIP image embedding, no caption model"),
    "distill-local": Objective((*POINTS, *PATCH_MEMBERS),
                               lambda cfg, teacher: DistillLocalModel(cfg.model, teacher["patch_tokens"]),
                               "3D patch tokens -> CLIP patch tokens at their projections"),
    "reconstruct": Objective(POINTS, lambda cfg, teacher: ReconstructModel(cfg.model, cfg.reconstruct),
                             "Point-MAE masked reconstruction, no teacher"),
    "distill+reconstruct": Objective((*POINTS, "prefix.npy"), _distill_reconstruct,
                                     "distillation + masked reconstruction on one backbone"),
}


def get_objective(name: str) -> Objective:
    """The registry entry of `name`, or a one-line error listing the known objectives."""
    if name not in OBJECTIVES:
        raise PcdError(f"unknown pre-training objective '{name}' (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]
