"""Every model pcd builds, in one plain registry, and pre-trained backbone weights into any of them.

`MODELS` maps a name to its config class, its paper-size and tiny configs, its builder and example inputs;
the tiny config is the same code at toy sizes, which the tests run forward and backward (timm's habit).
The task models are `PointBackbone` subclasses whose extra parameters (cls token, heads) sit beside the
backbone's under Point-MAE's names; `load_pretrained_backbone` fills the backbone part of such a model from a
pcd export or a Point-MAE checkpoint, strictly, and says which tensors it loaded and which stay fresh.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.classification.model import ClassifierConfig, PointMAEClassifier
from pcd.trainer.detection.model import DetectorConfig, build_detector
from pcd.trainer.partseg.model import PartSegConfig, PointMAEPartSegmenter
from pcd.trainer.weights import load_backbone_weights


def tiny_backbone(depth: int = 2) -> BackboneConfig:
    """The backbone at toy size: 8 patches of 8 points, 32 wide."""
    return BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=depth, num_heads=2,
                          drop_path_rate=0.1)


def _cloud(batch: int, points: int, gen: torch.Generator) -> Tensor:
    return torch.rand(batch, points, 3, generator=gen) * 2 - 1


def _detection_inputs(cfg: DetectorConfig, gen: torch.Generator) -> tuple[Tensor, ...]:
    clouds = torch.rand(2, max(64, cfg.backbone.num_groups), 3, generator=gen) * 4
    return clouds, clouds.amin(dim=1), clouds.amax(dim=1)


def _partseg_inputs(cfg: PartSegConfig, gen: torch.Generator) -> tuple[Tensor, ...]:
    category = torch.randint(cfg.num_categories, (2,), generator=gen)
    return _cloud(2, 64, gen), nn.functional.one_hot(category, cfg.num_categories).float(), _cloud(2, 40, gen)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model: its config class, full-size and tiny configs, builder and example inputs."""

    config: type
    paper: Callable[[], Any]
    tiny: Callable[[], Any]
    build: Callable[[Any], nn.Module]
    example_inputs: Callable[[Any, torch.Generator], tuple[Tensor, ...]]


MODELS: dict[str, ModelEntry] = {
    "backbone": ModelEntry(
        BackboneConfig, BackboneConfig, tiny_backbone, PointBackbone,
        lambda cfg, gen: (_cloud(2, 64, gen),)),
    "detection": ModelEntry(
        DetectorConfig, DetectorConfig,
        lambda: DetectorConfig(backbone=BackboneConfig(num_groups=16, group_size=8, trans_dim=32, encoder_dims=32,
                                                       depth=2, num_heads=2),
                               decoder_dim=32, decoder_layers=2, decoder_heads=2, decoder_ffn=64, num_queries=8),
        build_detector, _detection_inputs),
    "classification": ModelEntry(
        ClassifierConfig, ClassifierConfig,
        lambda: ClassifierConfig(backbone=tiny_backbone(), head_dims=(16, 16)),
        PointMAEClassifier, lambda cfg, gen: (_cloud(3, 64, gen),)),
    "partseg": ModelEntry(
        PartSegConfig, PartSegConfig,
        lambda: PartSegConfig(backbone=tiny_backbone(depth=3), fetch_blocks=(0, 1, 2), label_dim=8,
                              propagation_dims=(48, 32), head_dims=(32, 16)),
        PointMAEPartSegmenter, _partseg_inputs),
}


@dataclass
class InitReport:
    """What `load_pretrained_backbone` did: tensors loaded, left freshly initialised, and skipped in the file."""

    source: Path
    kind: str  # as pcd.trainer.weights.LoadReport: "pcd-export", "safetensors", "checkpoint"
    loaded: list[str]  # the model's backbone keys, all from the file
    initialised: list[str]  # the model's other keys (cls token, heads), as the constructor made them
    ignored: list[str]  # keys of the file that are not part of the backbone
    metadata: dict[str, Any] | None  # the pcd export's backbone.json, None for a Point-MAE checkpoint

    def summary(self) -> str:
        """One line for the log and the run folder."""
        return (f"loaded {len(self.loaded)} backbone tensors from {self.source} ({self.kind}); "
                f"freshly initialised {_grouped(self.initialised)}; ignored {_grouped(self.ignored)}")


def load_pretrained_backbone(model: PointBackbone, path: Path) -> InitReport:
    """Initialise the backbone part of `model` (a PointBackbone or a task model built on one) from `path`.

    `path` is anything `pcd.trainer.weights.load_backbone_weights` accepts: a pcd export, a Point-MAE
    pre-training checkpoint (`MAE_encoder.*`), a Point-MAE or pcd fine-tuned checkpoint. Every backbone
    tensor must be there with the model's shape (else a PcdError naming the file and key); the rest of the
    model keeps its fresh initialisation and is listed as such.
    """
    donor = PointBackbone(model.cfg)
    report = load_backbone_weights(donor, Path(path))
    backbone_state = donor.state_dict()
    result = model.load_state_dict(backbone_state, strict=False)
    if result.unexpected_keys:  # a model that is not built on PointBackbone
        raise PcdError(f"{type(model).__name__} has no backbone keys {result.unexpected_keys[:3]}")
    # Not result.missing_keys: BatchNorm does not report its num_batches_tracked as missing.
    fresh = [key for key in model.state_dict() if key not in backbone_state]
    return InitReport(source=report.source, kind=report.kind, loaded=report.loaded, initialised=fresh,
                      ignored=report.ignored, metadata=report.metadata)


def _grouped(keys: list[str]) -> str:
    if not keys:
        return "nothing"
    groups = Counter(key.replace("module.", "").split(".")[0] for key in keys)
    return ", ".join(name if count == 1 else f"{name}.* ({count})" for name, count in sorted(groups.items()))
