"""`pcd evaluate reconstruction`: the masked reconstruction loss of a backbone on its pre-training frames (table 7).

Table 7 of the paper reports the reconstruction loss after pre-training for three encoders: no training, only
reconstruction, only distillation. This command measures it: the mean Chamfer L2 (Point-MAE's `cdl2`) of the masked
patches over every frame of the pre-training scenes, with seeded point subsets and seeded random masks, as mean ±
std over `passes` seeded passes. The decoder is
- the run's own, for a run that trained one (`heads.safetensors` of a pcd export, or a Point-MAE pre-training
  checkpoint, which carries its decoder under the same names);
- freshly initialised from `decoder_seed` for a run without one (the paper's "only distillation": "randomly
  initialized"; whether the paper then trained it is not stated, formats.md 7.6), recorded as such;
- random with a random encoder for `--random-init SEED` (the "no training" row).
The results JSON carries the definition (points per cloud, normalisation, masking, loss formula, seeds) beside the
numbers, so a reader can tell what was measured. Evaluation code: it imports models, data and weights, never the
training loop.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console

from pcd.pipeline.atomic import atomic_write_json
from pcd.pipeline.config import config_from_dict, config_to_dict, fraction, positive, setting, validate_config
from pcd.pipeline.errors import PcdError
from pcd.trainer import data
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.heads import read_decoder
from pcd.trainer.normalize import NORMALIZATION
from pcd.trainer.reconstruct import (ReconstructConfig, ReconstructionDecoder, check_masking,
                                     masked_reconstruction_loss, num_masked)
from pcd.trainer.weights import load_backbone_weights, read_export_metadata

RESULTS_FILE = "reconstruction.json"
DEFAULT_POINTS = 4096  # the paper's pre-training points per frame
LOSS_DEFINITION = (
    "Point-MAE cdl2 per masked patch: mean over the decoder's M predicted points of the squared Euclidean distance to "
    "the nearest of the patch's M ground-truth points, plus mean over the ground-truth points of the squared "
    "distance to the nearest prediction; ground truth = the patch's kNN points minus its FPS centre (the centres "
    "are given to the decoder); averaged over all masked patches of all frames; not halved, not x1000")

console = Console(stderr=True, soft_wrap=True)


@dataclass
class Config:
    """What to measure and on which frames; None fields default to what the weights recorded."""

    # training or extraction shards holding the pre-training frames
    shards_dir: Path = Path("shards")
    # a pcd export (folder, backbone.json or weight file) or a Point-MAE pre-training checkpoint
    weights: Optional[Path] = None
    # seed of a random encoder and decoder ("no training"); instead of weights
    random_init: Optional[int] = None
    out: Optional[Path] = None  # results JSON; default: reconstruction.json in the export folder
    split: Optional[Path] = None  # frames of these scenes; default: the export's pre-training scenes, else all
    # points per frame; default: the run's num_points, else 4,096
    num_points: Optional[int] = setting(None, positive)
    # default: the trained decoder's, else `decoder.mask_ratio` (0.6)
    mask_ratio: Optional[float] = setting(None, fraction)
    passes: int = setting(3, positive)  # seeded passes (point subsets and masks), reported as mean ± std
    seed: int = 0
    decoder_seed: int = 0  # initialises the decoder of weights that have none
    batch_size: int = setting(32, positive)
    # only the first N frames (shard order) per pass; None: all
    max_samples: Optional[int] = setting(None, positive)
    device: Optional[str] = None  # default: cuda when available
    # encoder sizes for --random-init and foreign checkpoints
    model: BackboneConfig = field(default_factory=BackboneConfig)
    # a fresh decoder's sizes (paper: 3 blocks)
    decoder: ReconstructConfig = field(default_factory=ReconstructConfig)


def run(cfg: Config) -> int:
    validate_config(cfg)
    if (cfg.weights is None) == (cfg.random_init is None):
        raise PcdError("give exactly one of --weights (a pcd export or Point-MAE checkpoint) and --random-init SEED")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    metadata = read_export_metadata(Path(cfg.weights)) if cfg.weights is not None else None
    out = _results_path(cfg, metadata)
    backbone, decoder, encoder_info, decoder_info = build_models(cfg, metadata)
    mask_ratio = cfg.mask_ratio if cfg.mask_ratio is not None else decoder_info["config"]["mask_ratio"]
    check_masking(backbone.cfg.num_groups, mask_ratio)
    num_points = cfg.num_points or int(((metadata or {}).get("pretrain_config") or {}).get("num_points")
                                       or DEFAULT_POINTS)
    if num_points < backbone.cfg.num_groups:
        raise PcdError(f"num_points {num_points} is fewer than the backbone's {backbone.cfg.num_groups} patches")
    scenes = metadata.get("pretrain_scenes") if metadata is not None and cfg.split is None else None
    selection = data.select_shards(cfg.shards_dir, cfg.split, scenes)
    selection.require(data.POINT_MEMBERS, "pcd evaluate reconstruction")
    if selection.missing:
        console.print(f"[yellow]warning: {len(selection.missing)} of the scenes have no shard in {cfg.shards_dir} "
                      f"({', '.join(selection.missing[:5])}{', ...' if len(selection.missing) > 5 else ''})[/yellow]")

    backbone.to(device).eval()
    decoder.to(device).eval()
    per_pass, frames = [], 0
    for index in range(cfg.passes):
        value, frames = reconstruction_pass(backbone, decoder, selection, num_points, mask_ratio,
                                            seed=cfg.seed + index, batch_size=cfg.batch_size,
                                            max_samples=cfg.max_samples, device=device)
        per_pass.append(value)
        console.print(f"pass {index + 1}/{cfg.passes}: Chamfer L2 {value:.6g} over {frames:,} frames")
    mean = statistics.fmean(per_pass)
    std = statistics.stdev(per_pass) if len(per_pass) > 1 else 0.0
    groups = backbone.cfg.num_groups
    results = {
        "metric": "chamfer_l2", "mean": mean, "std": std, "passes": per_pass, "frames_per_pass": frames,
        "scenes": len(selection.scenes), "shards_dir": str(cfg.shards_dir),
        "frames_from": str(cfg.split) if cfg.split else "the export's pre-training scenes" if scenes else "all",
        "definition": {
            "loss": LOSS_DEFINITION,
            "points_per_cloud": num_points,
            "normalisation": {**NORMALIZATION, "augmentation": "none",
                              "point_subset": "random per frame without replacement, seeded by (seed + pass, "
                                              "sample key)"},
            "groups": groups, "group_size": backbone.cfg.group_size,
            "mask": {"type": "random per frame", "ratio": mask_ratio, "masked": num_masked(groups, mask_ratio),
                     "visible": groups - num_masked(groups, mask_ratio),
                     "seed": "torch.Generator seeded with seed + pass, frames in shard order"},
            "passes": cfg.passes, "seed": cfg.seed, "std": "sample standard deviation over passes",
        },
        "encoder": encoder_info, "decoder": decoder_info,
    }
    atomic_write_json(out, results)
    console.print(f"reconstruction loss (Chamfer L2): {mean:.6g} ± {std:.2g} over {cfg.passes} passes of "
                  f"{frames:,} frames; decoder: {decoder_info['source']}; written to {out}")
    return 0


def _results_path(cfg: Config, metadata: Optional[dict[str, Any]]) -> Path:
    if cfg.out is not None:
        return Path(cfg.out)
    if metadata is None:
        raise PcdError("--out is needed: only a pcd export has a folder to write reconstruction.json into")
    weights = Path(cfg.weights)
    return (weights if weights.is_dir() else weights.parent) / RESULTS_FILE


def build_models(cfg: Config, metadata: Optional[dict[str, Any]]
                 ) -> tuple[PointBackbone, ReconstructionDecoder, dict[str, Any], dict[str, Any]]:
    """(encoder, decoder, how each was obtained) for the weights, or random ones for --random-init."""
    if cfg.random_init is not None:
        torch.manual_seed(cfg.random_init)
        backbone = PointBackbone(cfg.model)
        decoder = ReconstructionDecoder(cfg.model, cfg.decoder)
        return backbone, decoder, {"source": "random", "seed": cfg.random_init, "config": asdict(cfg.model)}, {
            "source": "random", "seed": cfg.random_init, "config": asdict(cfg.decoder)}
    weights = Path(cfg.weights)
    backbone_cfg = cfg.model
    if metadata is not None:
        try:
            backbone_cfg = config_from_dict(BackboneConfig, metadata["backbone"])
        except (KeyError, TypeError, PcdError) as exc:
            raise PcdError(f"{weights}: the export's 'backbone' config is unreadable ({exc})") from None
    backbone = PointBackbone(backbone_cfg)
    report = load_backbone_weights(backbone, weights)
    encoder_info = {"source": str(weights), "kind": report.kind, "config": asdict(backbone_cfg),
                    "objective": (metadata or {}).get("objective")}
    trained = read_decoder(weights, backbone_cfg)
    if trained is not None:
        decoder, info = trained
        return backbone, decoder, encoder_info, {"source": "trained", "kind": info["kind"], "file": info["file"],
                                                 "config": config_to_dict(info["config"])}
    torch.manual_seed(cfg.decoder_seed)
    decoder = ReconstructionDecoder(backbone_cfg, cfg.decoder)
    return backbone, decoder, encoder_info, {"source": "freshly initialised (the weights have no decoder)",
                                             "seed": cfg.decoder_seed, "config": asdict(cfg.decoder)}


@torch.no_grad()
def reconstruction_pass(backbone: PointBackbone, decoder: ReconstructionDecoder, selection: data.ShardSelection,
                        num_points: int, mask_ratio: float, *, seed: int, batch_size: int,
                        max_samples: Optional[int], device: torch.device) -> tuple[float, int]:
    """(mean Chamfer L2 per frame, frames) of one pass: every frame once in shard order, fixed point subsets and
    masks drawn from `seed`. Every frame has the same number of masked patches and points, so the frame mean is
    the batch means weighted by batch size."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in data.val_loader(selection, batch_size=batch_size, num_points=num_points, seed=seed, workers=0,
                                 members=data.POINT_MEMBERS):
        points = batch["points"]
        if max_samples is not None:
            points = points[:max_samples - count]
            if len(points) == 0:
                break
        loss = masked_reconstruction_loss(backbone, decoder, points.to(device), mask_ratio, generator)
        total += float(loss) * len(points)
        count += len(points)
    if count == 0:
        raise PcdError(f"{selection.shards_dir}: no frames to evaluate")
    return total / count, count
