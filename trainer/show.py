"""`pcd show SOURCE... --out DIR`: PNG pictures (headless, `pcd.trainer.render`) and .ply files (open3d) of clouds and
of evaluated runs.

A SOURCE is a cloud (anything `pcd.trainer.clouds` reads: files, shard frames, regions of prepared scenes), drawn by
RGB (or height where it has none) from several views; or a run folder holding `evaluation_<checkpoint>.json` and its
predictions npz, drawn per task:
- detection: each scene by RGB, or by ground-truth class (`--color label`), its ground-truth boxes in green and its
  detected boxes (score >= --min-score) in red, from several views;
- partseg: each test shape by predicted part, ground-truth part and error (red where wrong), side by side;
- classification: each test shape titled with its true and predicted class, red when wrong;
- semseg: each evaluated scene by predicted class, ground-truth class and error, side by side, from the benchmark
  files the evaluation wrote (its predictions: one nyu40 id per vertex, `pcd.trainer.semseg.submission`).
Each run also gets a contact sheet of its first N scenes or shapes. The same selection is written as .ply (points
with colours; boxes as line sets) for MeshLab or CloudCompare.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from rich.console import Console

from pcd.pipeline.config import InvalidSetting, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.atomic import temporary_path
from pcd.pipeline.schema import read_npy
from pcd.trainer.clouds import read_cloud
from pcd.trainer.frames import rotate_up
from pcd.trainer.render import (GT_COLOR, PRED_COLOR, caption_band, contact_sheet, draw_box, error_colors,
                                height_colors, label_colors, orbit_views, render_points, write_png)

console = Console(stderr=True, soft_wrap=True)
COLOR_MODES = ("rgb", "label", "height")  # partseg shapes are always drawn by prediction, truth and error


@dataclass
class Config:
    sources: list[str] = field(default_factory=list)  # clouds or evaluated run folders
    out: Path = Path("pictures")
    checkpoint: str = "last"  # which evaluation of a run: evaluation_<checkpoint>.json
    color: str = "rgb"  # rgb, label, height (clouds and scenes); partseg draws prediction, truth and error
    views: int = setting(3, positive)  # views per scene or cloud
    max_items: int = setting(8, positive)  # scenes or shapes drawn per run
    columns: int = setting(4, positive)  # contact sheet columns
    width: int = setting(400, positive)
    height: int = setting(300, positive)
    point_radius: int = setting(1, non_negative)  # splat half-size in pixels
    min_score: float = setting(0.5, non_negative)  # detection: boxes drawn from this score
    max_boxes: int = setting(20, non_negative)  # detection: at most this many boxes per scene, the highest scores
    up_axis: str = "z"  # up axis of cloud files
    ply: bool = True  # also write .ply files

    def validate(self) -> None:
        if self.color not in COLOR_MODES:
            raise InvalidSetting("color", f"must be one of {', '.join(COLOR_MODES)}")
        if self.up_axis not in ("y", "z"):
            raise InvalidSetting("up_axis", "must be y or z")


@dataclass
class Picture:
    """What one item becomes: its views, a title, and the geometry for the .ply files."""

    name: str
    title: str
    views: list[np.ndarray]
    xyz: np.ndarray
    rgb: np.ndarray
    boxes: dict[str, np.ndarray] = field(default_factory=dict)  # "gt"/"pred" -> (K, 6) min/max corners


def safe_name(text: str) -> str:
    """A file name from a cloud spec or a scene id: letters, digits, '.', '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:120] or "cloud"


def views_of(cfg: Config, xyz: np.ndarray, rgb: np.ndarray, boxes: dict[str, np.ndarray],
             count: Optional[int] = None) -> list[np.ndarray]:
    """The cloud from `count` (default cfg.views) orbit cameras, with ground-truth and predicted boxes drawn."""
    images = []
    for camera in orbit_views(xyz, count or cfg.views, size=(cfg.width, cfg.height)):
        image = render_points(xyz, rgb, camera, radius=cfg.point_radius)
        for kind, color in (("gt", GT_COLOR), ("pred", PRED_COLOR)):
            for box in boxes.get(kind, np.zeros((0, 6))):
                draw_box(image, box, camera, color, thickness=2)
        images.append(image)
    return images


def cloud_picture(cfg: Config, spec: str) -> Picture:
    cloud = read_cloud(spec, cfg.up_axis)  # type: ignore[arg-type]
    if cfg.color == "rgb" and cloud.rgb is not None:
        rgb = cloud.rgb
    elif cfg.color in ("rgb", "height"):
        rgb = height_colors(cloud.xyz)
    else:
        raise PcdError(f"{spec}: a cloud has no labels; use --color rgb or height")
    base, _, selector = spec.partition("#")
    name = safe_name(Path(base).name + (f"_{selector}" if selector else ""))
    return Picture(name, f"{spec} ({len(cloud.xyz)} points)", views_of(cfg, cloud.xyz, rgb, {}),
                   cloud.xyz, rgb)


def read_evaluation(run_dir: Path, checkpoint: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A run's evaluation JSON and its predictions npz (numeric arrays, read without unpickling)."""
    path = run_dir / f"evaluation_{Path(checkpoint).stem}.json"
    predictions = run_dir / f"evaluation_{Path(checkpoint).stem}_predictions.npz"
    if not path.is_file():
        found = sorted(p.name for p in run_dir.glob("evaluation_*.json"))
        raise PcdError(f"{path}: no such evaluation (run `pcd evaluate TASK {run_dir}` first"
                       + (f"; the run has {', '.join(found)}" if found else "") + ")")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PcdError(f"{path}: cannot read ({exc})") from None
    if not isinstance(document, dict):
        raise PcdError(f"{path}: not an evaluation results file (not a JSON object)")
    if document.get("task") in TASKS_WITHOUT_NPZ:
        return document, {}
    try:
        with np.load(predictions, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise PcdError(f"{predictions}: missing; evaluate the run again to save its predictions") from None
    except (OSError, ValueError, EOFError) as exc:
        raise PcdError(f"{predictions}: cannot read ({exc})") from None
    return document, arrays


def detection_pictures(cfg: Config, run_dir: Path, document: dict[str, Any], arrays: dict[str, np.ndarray]
                       ) -> list[Picture]:
    """Each evaluated scene with its ground-truth boxes and the boxes 3DETR's post-processing keeps from the first
    pass's saved proposals (`pcd.trainer.detection.saved`)."""
    from pcd.trainer.detection.boxes import CLASS_NAMES, NUM_CLASSES, NYU40_TO_CLASS
    from pcd.trainer.detection.saved import read_saved_detection

    saved = read_saved_detection(run_dir, cfg.checkpoint)
    pictures = []
    for scene in saved.scenes[:cfg.max_items]:
        vertices = read_npy(saved.data_dir / f"{scene}_vert.npy")
        gt = read_npy(saved.data_dir / f"{scene}_bbox.npy").reshape(-1, 7)
        gt = gt[np.isin(gt[:, 6].astype(int), list(NYU40_TO_CLASS))]
        xyz = vertices[:, :3].astype(np.float32)
        if cfg.color == "label" and (saved.data_dir / f"{scene}_sem_label.npy").is_file():
            nyu = read_npy(saved.data_dir / f"{scene}_sem_label.npy").astype(int)
            rgb = label_colors(np.array([NYU40_TO_CLASS.get(int(n), -1) for n in nyu]), NUM_CLASSES)
        elif cfg.color == "height" or vertices.shape[1] < 6:
            rgb = height_colors(xyz)
        else:
            rgb = np.clip(vertices[:, 3:6], 0, 255).astype(np.uint8)
        detected = saved.boxes(scene, xyz)
        shown = detected[detected[:, 7] >= cfg.min_score][:cfg.max_boxes]
        geometry = {"gt": np.concatenate([gt[:, :3] - gt[:, 3:6] / 2, gt[:, :3] + gt[:, 3:6] / 2], 1),
                    "pred": shown[:, :6]}
        names = sorted({CLASS_NAMES[int(c)] for c in shown[:, 6]})
        title = (f"{scene}: {len(gt)} ground truth (green), {len(shown)} of {len(detected)} detections (red, score "
                 f">= {cfg.min_score:g}, best {cfg.max_boxes})" + (f": {', '.join(names[:4])}" if names else ""))
        pictures.append(Picture(safe_name(scene), title, views_of(cfg, xyz, rgb, geometry), xyz, rgb, geometry))
    return pictures


def partseg_pictures(cfg: Config, run_dir: Path, document: dict[str, Any], arrays: dict[str, np.ndarray]
                     ) -> list[Picture]:
    from pcd.trainer.evaluation import load_run_config
    from pcd.trainer.partseg.config import Config as FinetuneConfig
    from pcd.trainer.partseg.data import CATEGORY_NAMES, NUM_PARTS, ShapeNetPart

    if not len(arrays.get("seg", [])):
        raise PcdError(f"{run_dir}: evaluated with --protocol point-mae (random multisets of points); evaluate "
                       "with the default all-points protocol to draw its shapes")
    run_cfg = load_run_config(run_dir, FinetuneConfig, "finetune partseg")
    test = ShapeNetPart(Path(document["data"]["data_dir"]), "test", cache_dir=run_cfg.cache_dir)
    offsets, predictions = arrays["offsets"], arrays["predictions"][0]
    pictures = []
    for i in range(min(cfg.max_items, len(test))):
        item = test[i]
        xyz = rotate_up(item["points"], test.up_axis, "z")  # type: ignore[arg-type]
        predicted = predictions[offsets[i]:offsets[i + 1]].astype(np.int64)
        if len(predicted) != len(xyz):
            raise PcdError(f"{run_dir}: shape {i} has {len(xyz)} points but {len(predicted)} predictions "
                           "(the data changed since the evaluation)")
        panels = []
        for label, rgb in (("prediction", label_colors(predicted, NUM_PARTS)),
                           ("truth", label_colors(item["seg"], NUM_PARTS)),
                           ("error", error_colors(predicted, item["seg"]))):
            panels.append(caption_band(views_of(cfg, xyz, rgb, {}, count=1)[0], label))
        iou = float(arrays["shape_iou"][0][i]) if "shape_iou" in arrays else float("nan")
        name = f"shape{i:04d}_{CATEGORY_NAMES[int(item['category'])]}"
        pictures.append(Picture(name, f"{name}: IoU {100 * iou:.1f}", [np.concatenate(panels, axis=1)], xyz,
                                label_colors(predicted, NUM_PARTS)))
    return pictures


def classification_pictures(cfg: Config, run_dir: Path, document: dict[str, Any], arrays: dict[str, np.ndarray]
                            ) -> list[Picture]:
    from pcd.trainer.classification.config import Config as FinetuneConfig
    from pcd.trainer.classification.inputs import open_split
    from pcd.trainer.evaluation import load_run_config

    run_cfg = load_run_config(run_dir, FinetuneConfig, "finetune classification")
    test = open_split(Path(document["data"]["data_dir"]), "test", run_cfg.variant, run_cfg.cache_dir,
                      run_cfg.cache_points)
    predicted = arrays["logits"].argmax(-1)
    names = getattr(test, "class_names", None) or [str(c) for c in range(int(predicted.max()) + 1)]
    pictures = []
    for i in range(min(cfg.max_items, len(test))):
        item = test[i]
        xyz = rotate_up(item["points"][:, :3], test.up_axis, "z")  # type: ignore[arg-type]
        truth, guess = int(item["label"]), int(predicted[i])
        rgb = np.tile(np.array(GT_COLOR if truth == guess else PRED_COLOR, np.uint8), (len(xyz), 1))
        title = f"{i}: {names[truth]} -> {names[guess]}"
        pictures.append(Picture(f"shape{i:04d}", title, views_of(cfg, xyz, rgb, {}, count=1), xyz, rgb))
    return pictures


def semseg_pictures(cfg: Config, run_dir: Path, document: dict[str, Any], arrays: dict[str, np.ndarray]
                    ) -> list[Picture]:
    """Each evaluated scene: predicted class, ground-truth class (grey: not one of the 20) and error, side by side."""
    from pcd.trainer.semseg.classes import IGNORE_INDEX, NUM_CLASSES, train_ids
    from pcd.trainer.semseg.submission import read_prediction_file

    data_dir, folder = Path(document["data"]["data_dir"]), Path(document["prediction_files"])
    pictures = []
    for scene in document["data"]["scenes"][:cfg.max_items]:
        vertices = read_npy(data_dir / f"{scene}_full_vert.npy")
        xyz = vertices[:, :3].astype(np.float32)
        predicted = train_ids(read_prediction_file(folder / f"{scene}.txt", len(xyz)))
        truth = train_ids(read_npy(data_dir / f"{scene}_full_sem_label.npy"))
        scored = truth != IGNORE_INDEX
        panels = []
        for label, rgb in (("prediction", label_colors(predicted, NUM_CLASSES)),
                           ("truth", label_colors(truth, NUM_CLASSES)),
                           ("error", error_colors(predicted, np.where(scored, truth, predicted)))):
            panels.append(caption_band(views_of(cfg, xyz, rgb, {}, count=1)[0], label))
        accuracy = float((predicted[scored] == truth[scored]).mean()) if scored.any() else float("nan")
        pictures.append(Picture(safe_name(scene), f"{scene}: vertex accuracy {100 * accuracy:.1f}",
                                [np.concatenate(panels, axis=1)], xyz, label_colors(predicted, NUM_CLASSES)))
    return pictures


TASK_PICTURES: dict[str, Callable[[Config, Path, dict[str, Any], dict[str, np.ndarray]], list[Picture]]] = {
    "detection": detection_pictures, "partseg": partseg_pictures, "classification": classification_pictures,
    "semseg": semseg_pictures}
# Tasks whose evaluation saves its predictions in their own documented files instead of the predictions npz.
TASKS_WITHOUT_NPZ = {"semseg"}


def write_ply(path: Path, picture: Picture) -> list[Path]:
    """The picture's points (with colours) as PATH.ply, and its boxes as a line set PATH_boxes.ply (green truth, red
    detections)."""
    import open3d as o3d

    from pcd.trainer.render import BOX_EDGES, box_corners

    written = []
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(picture.xyz.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(picture.rgb.astype(np.float64) / 255.0)
    written.append(_write_o3d(path.with_name(path.name + ".ply"), lambda p: o3d.io.write_point_cloud(str(p), cloud)))
    corners, lines, colors = [], [], []
    for kind, color in (("gt", GT_COLOR), ("pred", PRED_COLOR)):
        for box in picture.boxes.get(kind, []):
            base = len(corners) * 8
            corners.append(box_corners(box))
            lines.extend([(base + a, base + b) for a, b in BOX_EDGES])
            colors.extend([np.array(color) / 255.0] * len(BOX_EDGES))
    if corners:
        line_set = o3d.geometry.LineSet(o3d.utility.Vector3dVector(np.concatenate(corners)),
                                        o3d.utility.Vector2iVector(np.array(lines)))
        line_set.colors = o3d.utility.Vector3dVector(np.array(colors))
        written.append(_write_o3d(path.with_name(path.name + "_boxes.ply"),
                                  lambda p: o3d.io.write_line_set(str(p), line_set)))
    return written


def _write_o3d(path: Path, write: Callable[[Path], bool]) -> Path:
    """open3d writes in place; write to a temporary name and rename, so an interrupted run leaves no torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path).with_suffix(".ply")
    if not write(temporary):
        temporary.unlink(missing_ok=True)
        raise PcdError(f"{path}: open3d could not write it")
    temporary.replace(path)
    return path


def run(cfg: Config) -> int:
    if not cfg.sources:
        raise PcdError("name at least one cloud or evaluated run folder to show")
    out = Path(cfg.out)
    written: list[Path] = []
    for source in cfg.sources:
        path = Path(source)
        if path.is_dir() and (path / "config.json").is_file() and "#" not in source:
            document, arrays = read_evaluation(path, cfg.checkpoint)
            task = document.get("task")
            if task not in TASK_PICTURES:
                raise PcdError(f"{path}: cannot draw the evaluation of task '{task}' "
                               f"(known: {', '.join(TASK_PICTURES)})")
            pictures = TASK_PICTURES[task](cfg, path, document, arrays)
            folder = out / safe_name(path.resolve().name)
            sheet = contact_sheet([caption_band(p.views[0], p.title) for p in pictures], cfg.columns)
            written.append(write_png(folder / f"{task}_sheet.png", sheet))
        else:
            pictures = [cloud_picture(cfg, source)]
            folder = out
        for picture in pictures:
            image = caption_band(contact_sheet(picture.views, len(picture.views)), picture.title)
            written.append(write_png(folder / f"{picture.name}.png", image))
            if cfg.ply:
                written.extend(write_ply(folder / picture.name, picture))
    console.print(f"wrote {len(written)} files under {out}/ (PNG pictures"
                  + (", .ply for MeshLab or CloudCompare)" if cfg.ply else ")"))
    return 0
