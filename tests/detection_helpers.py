"""Raw ScanNet-format scenes written by the detection tests themselves (mesh, segs, aggregation, meta, TSV).

Each scene is a floor plus a few box-shaped objects sampled on their surfaces, in an unaligned frame: the
vertices are the aligned points moved by the inverse of the scene's `axisAlignment`, so preparing them must
apply the alignment to get the ground-truth boxes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

# raw category -> nyu40 id (a few rows of scannetv2-labels.combined.tsv; "floor" and "wall" are not detected)
LABELS = {"floor": 2, "wall": 1, "chair": 5, "table": 7, "bed": 4, "sofa": 6, "trash can": 39, "door": 8}
OBJECT_LABELS = ["chair", "table", "bed", "sofa", "trash can", "door"]


def write_label_map(path: Path) -> None:
    rows = ["id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class"]
    rows += [f"{i}\t{raw}\t{raw}\t1\t{nyu}\t0\t{raw}\t{raw}" for i, (raw, nyu) in enumerate(LABELS.items(), 1)]
    path.write_text("\n".join(rows) + "\n")


def box_surface(rng: np.random.Generator, center: np.ndarray, size: np.ndarray, n: int) -> np.ndarray:
    """n points on the surface of an axis-aligned box, including all 8 corners (so min/max are exact)."""
    pts = rng.uniform(-0.5, 0.5, (n, 3))
    axis = rng.integers(0, 3, n)
    pts[np.arange(n), axis] = rng.choice([-0.5, 0.5], n)
    corners = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)])
    pts[:8] = corners
    return center + pts * size


def make_alignment(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    align = np.eye(4)
    align[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    align[:3, 3] = rng.uniform(-3, 3, 3)
    return align


def write_scene(scans_dir: Path, scene: str, seed: int, num_objects: int = 4,
                points_per_object: int = 700, floor_points: int = 3000) -> np.ndarray:
    """Write one raw scene; returns its ground-truth aligned boxes (K,7) cx,cy,cz,dx,dy,dz,nyu40id."""
    rng = np.random.default_rng(seed)
    folder = scans_dir / scene
    folder.mkdir(parents=True, exist_ok=True)
    room = np.array([6.0, 5.0])
    floor = np.column_stack([rng.uniform(0, room[0], floor_points), rng.uniform(0, room[1], floor_points),
                             np.zeros(floor_points)])
    parts, seg_ids, groups, boxes = [floor], [np.zeros(floor_points, int)], [], []
    groups.append({"id": 0, "objectId": 0, "segments": [0], "label": "floor"})
    cells = rng.permutation(6)[:num_objects]
    for k, cell in enumerate(cells):
        label = OBJECT_LABELS[int(rng.integers(len(OBJECT_LABELS)))]
        size = rng.uniform(0.5, 1.3, 3)
        center = np.array([1.0 + 2.0 * (cell % 3), 1.25 + 2.5 * (cell // 3), size[2] / 2 + 0.02])
        pts = box_surface(rng, center, size, points_per_object)
        parts.append(pts)
        # two segments per object, as over-segmentation gives several per instance
        segs = np.where(np.arange(points_per_object) % 2 == 0, 10 * (k + 1), 10 * (k + 1) + 1)
        seg_ids.append(segs)
        groups.append({"id": k + 1, "objectId": k + 1, "segments": [10 * (k + 1), 10 * (k + 1) + 1],
                       "label": label})
        lo, hi = pts.min(0), pts.max(0)
        boxes.append([*(lo + hi) / 2, *(hi - lo), LABELS[label]])
    aligned = np.concatenate(parts)
    align = make_alignment(rng)
    raw = (np.linalg.inv(align) @ np.column_stack([aligned, np.ones(len(aligned))]).T).T[:, :3]
    colors = rng.integers(0, 256, (len(raw), 3))
    vertex = np.empty(len(raw), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                       ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = raw[:, 0], raw[:, 1], raw[:, 2]
    vertex["red"], vertex["green"], vertex["blue"] = colors.T
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(folder / f"{scene}_vh_clean_2.ply"))
    (folder / f"{scene}_vh_clean_2.0.010000.segs.json").write_text(
        json.dumps({"sceneId": scene, "segIndices": np.concatenate(seg_ids).tolist()}))
    (folder / f"{scene}.aggregation.json").write_text(json.dumps({"sceneId": scene, "segGroups": groups}))
    (folder / f"{scene}.txt").write_text(
        "colorHeight = 968\naxisAlignment = " + " ".join(f"{v:.10f}" for v in align.ravel()) + "\nnumColorFrames = 1\n")
    # boxes as the float32 vertices will give them back after alignment
    return np.array(boxes, np.float64)


def write_dataset(root: Path, scenes: list[str], seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    scans = root / "scans"
    root.mkdir(parents=True, exist_ok=True)
    write_label_map(root / "scannetv2-labels.combined.tsv")
    gt = {scene: write_scene(scans, scene, seed + i, **kwargs) for i, scene in enumerate(scenes)}
    (root / "split.txt").write_text("\n".join(scenes) + "\n")
    return gt
