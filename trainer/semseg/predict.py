"""`pcd predict semseg RUN_DIR SCENES OUT_DIR`: ScanNet benchmark submission files for any prepared scenes.

SCENES is a folder written by `pcd prepare scannet` (labelled or not: ScanNet's test scans are prepared as
vertices only); `--split` restricts it to the scenes of a split file (e.g. scannetv2_test.txt). Every vertex of
each scene is labelled as `pcd evaluate semseg` labels it, with the probabilities summed over the seeded passes,
and `OUT_DIR/<scene>.txt` gets one nyu40 id per vertex of `_vh_clean_2.ply`, in its order (the format the
benchmark server reads). Files are written atomically; a rerun overwrites them with the same content.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console

from pcd.pipeline.config import non_negative, positive, setting
from pcd.trainer.semseg.data import SemSegScenes, read_scene_ids
from pcd.trainer.semseg.evaluate import describe_crops, load_segmenter, segment_scenes
from pcd.trainer.semseg.submission import write_prediction_file


@dataclass
class Config:
    run_dir: Path = Path("runs/semseg")
    scenes_dir: Path = Path("scannet_data")
    out_dir: Path = Path("submission")
    split: Optional[Path] = None         # default: every scene prepared in SCENES_DIR
    checkpoint: str = "last"
    passes: int = setting(3, positive)   # seeded passes whose probabilities are summed
    seed: int = setting(0, non_negative)
    device: Optional[str] = None
    eval_stride: Optional[float] = setting(None, positive)  # default: the run's
    crops_per_batch: int = setting(8, positive)
    query_chunk: int = setting(32768, positive)


def run(cfg: Config) -> int:
    console = Console()
    segmenter, path, what, epoch = load_segmenter(cfg.run_dir, cfg.checkpoint, cfg.device, cfg.eval_stride,
                                                  cfg.crops_per_batch, cfg.query_chunk)
    scenes = SemSegScenes(cfg.scenes_dir, read_scene_ids(cfg.scenes_dir, cfg.split), labelled=False)
    seeds = [cfg.seed + i for i in range(cfg.passes)]
    console.print(f"predicting {len(scenes)} scenes of {cfg.scenes_dir} with {path} ({what}, after epoch {epoch}), "
                  f"frame {segmenter.frame.name}, probabilities summed over {cfg.passes} seeded passes; "
                  f"{describe_crops(segmenter)}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    segment_scenes(segmenter, scenes, seeds, lambda scene, prediction: write_prediction_file(cfg.out_dir, scene,
                                                                                           prediction), True)
    console.print(f"wrote {len(scenes)} prediction files (one nyu40 id per vertex) to {cfg.out_dir}")
    return 0
