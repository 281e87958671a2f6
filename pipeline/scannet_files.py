"""Writers for ScanNet's raw annotation files, byte-compatible with what the ScanNet release ships.

Meshes are binary little-endian PLY with the exact element/property layout of `*_vh_clean_2.ply` and
`*_vh_clean_2.labels.ply`; aggregation, segmentation and metadata files follow the release's keys; the label
map has the 17 columns of `scannetv2-labels.combined.tsv`. The generator writes them so that every reader of
the project (detection preparation, semantic labels) runs on the same files it meets in a real download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from pcd.pipeline.atomic import atomic_write_bytes

NYU40_CLASSES = (
    "unannotated", "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

# ScanNet's label-visualisation palette (util.create_color_palette), indexed by nyu40 id.
NYU40_PALETTE = np.array([
    (0, 0, 0), (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34), (140, 86, 75),
    (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189), (196, 156, 148), (23, 190, 207),
    (178, 76, 76), (247, 182, 210), (66, 188, 102), (219, 219, 141), (140, 57, 197), (202, 185, 52),
    (51, 176, 203), (200, 54, 131), (92, 193, 61), (78, 71, 183), (172, 114, 82), (255, 127, 14), (91, 163, 138),
    (153, 98, 156), (140, 153, 101), (158, 218, 229), (100, 125, 154), (178, 127, 135), (120, 185, 128),
    (146, 111, 194), (44, 160, 44), (112, 128, 144), (96, 207, 209), (227, 119, 194), (213, 92, 176),
    (94, 106, 211), (82, 84, 163), (100, 85, 144),
], dtype=np.uint8)

LABEL_MAP_COLUMNS = ("id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
                     "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55", "synsetoffset", "wnsynsetid",
                     "wnsynsetkey", "mpcat40index", "mpcat40")

# raw_category -> (row id, category, count, nyu40id, eigen13id, eigen13class, wnsynsetkey, mpcat40index, mpcat40)
LABEL_ROWS: dict[str, tuple] = {
    "wall": (1, "wall", 8277, 1, 12, "Wall", "wall.n.01", 1, "wall"),
    "chair": (2, "chair", 4646, 5, 4, "Chair", "chair.n.01", 3, "chair"),
    "floor": (3, "floor", 2034, 2, 5, "Floor", "floor.n.01", 2, "floor"),
    "table": (4, "table", 1828, 7, 10, "Table", "table.n.02", 5, "table"),
    "door": (5, "door", 1485, 8, 12, "Wall", "door.n.01", 4, "door"),
    "couch": (6, "couch", 924, 6, 9, "Sofa", "sofa.n.01", 10, "sofa"),
    "cabinet": (7, "cabinet", 731, 3, 6, "Furniture", "cabinet.n.01", 7, "cabinet"),
    "desk": (9, "desk", 680, 14, 10, "Table", "desk.n.01", 5, "table"),
    "office chair": (10, "chair", 595, 5, 4, "Chair", "chair.n.01", 3, "chair"),
    "bed": (11, "bed", 370, 4, 1, "Bed", "bed.n.01", 11, "bed"),
    "sink": (13, "sink", 488, 34, 7, "Objects", "sink.n.01", 15, "sink"),
    "picture": (14, "picture", 467, 11, 8, "Picture", "picture.n.01", 6, "picture"),
    "window": (15, "window", 432, 9, 13, "Window", "window.n.01", 9, "window"),
    "toilet": (16, "toilet", 402, 33, 7, "Objects", "toilet.n.01", 18, "toilet"),
    "bookshelf": (17, "bookshelf", 400, 10, 6, "Furniture", "bookshelf.n.01", 31, "shelving"),
    "curtain": (19, "curtain", 356, 16, 13, "Window", "curtain.n.01", 12, "curtain"),
    "coffee table": (22, "coffee table", 258, 7, 10, "Table", "coffee_table.n.01", 5, "table"),
    "box": (23, "box", 775, 29, 7, "Objects", "box.n.01", 39, "objects"),
    "refrigerator": (24, "refrigerator", 154, 24, 6, "Furniture", "refrigerator.n.01", 37, "appliances"),
    "trash can": (39, "trash can", 369, 39, 6, "Furniture", "ashcan.n.01", 39, "objects"),
    "kitchen counter": (40, "counter", 140, 12, 6, "Furniture", "countertop.n.01", 26, "counter"),
    "shower curtain": (64, "curtain", 80, 28, 7, "Objects", "shower_curtain.n.01", 12, "curtain"),
    "bathtub": (105, "bathtub", 144, 36, 7, "Objects", "bathtub.n.01", 25, "bathtub"),
}

SEGS_PARAMS = {"kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750", "maxPoints": "30000",
               "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1"}


def nyu40_id(raw_category: str) -> int:
    return LABEL_ROWS[raw_category][3]


def _ply_header(comment: str, num_vertices: int, num_faces: int, with_label: bool) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"comment {comment}", f"element vertex {num_vertices}",
             "property float x", "property float y", "property float z", "property uchar red",
             "property uchar green", "property uchar blue", "property uchar alpha"]
    if with_label:
        lines.append("property ushort label")
    lines += [f"element face {num_faces}", "property list uchar int vertex_indices", "end_header"]
    return ("\n".join(lines) + "\n").encode("ascii")


def write_mesh_ply(path: Path, vertices: np.ndarray, colors: np.ndarray, faces: np.ndarray,
                   labels: np.ndarray | None = None) -> None:
    """Binary PLY as ScanNet ships it: float xyz, uchar rgba (+ ushort label for *.labels.ply), int triangles."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
              ("alpha", "u1")]
    if labels is not None:
        fields.append(("label", "<u2"))
    vertex = np.empty(len(vertices), dtype=fields)
    vertex["x"], vertex["y"], vertex["z"] = vertices[:, 0], vertices[:, 1], vertices[:, 2]
    vertex["red"], vertex["green"], vertex["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    vertex["alpha"] = 255
    if labels is not None:
        vertex["label"] = labels
    face = np.empty(len(faces), dtype=[("n", "u1"), ("vertex_indices", "<i4", (3,))])
    face["n"], face["vertex_indices"] = 3, faces
    comment = "MLIB generated" if labels is not None else "VCGLIB generated"
    header = _ply_header(comment, len(vertices), len(faces), labels is not None)
    atomic_write_bytes(path, header + vertex.tobytes() + face.tobytes())


def write_segs(path: Path, scene_id: str, seg_indices: np.ndarray) -> None:
    """`<scene>_vh_clean_2.0.010000.segs.json`: one over-segmentation id per mesh vertex."""
    data = {"params": SEGS_PARAMS, "sceneId": f"{scene_id}_vh_clean_2",
            "segIndices": [int(s) for s in seg_indices]}
    atomic_write_bytes(path, json.dumps(data).encode())


def write_aggregation(path: Path, scene_id: str, groups: Iterable[tuple[int, str, list[int]]]) -> None:
    """`<scene>.aggregation.json`: objects as (objectId, raw category, segment ids)."""
    seg_groups = [{"id": object_id, "objectId": object_id, "segments": [int(s) for s in segments], "label": label}
                  for object_id, label, segments in groups]
    data = {"sceneId": f"scannet.{scene_id}", "appId": "Annotator.v1.0", "segGroups": seg_groups,
            "segmentsFile": f"scannet.{scene_id}_vh_clean_2.0.010000.segs.json"}
    atomic_write_bytes(path, json.dumps(data).encode())


def write_scene_meta(path: Path, fields: dict[str, object]) -> None:
    """`<scene>.txt`: `key = value` lines, matrices as 16 space-separated floats, sorted by key like ScanNet's."""
    lines = []
    for key in sorted(fields, key=str.lower):
        value = fields[key]
        if isinstance(value, np.ndarray):
            value = " ".join(f"{float(v):.6f}" for v in value.ravel())
        elif isinstance(value, float):
            value = f"{value:.6f}"
        lines.append(f"{key} = {value}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_label_map(path: Path, raw_categories: Iterable[str]) -> None:
    """A `scannetv2-labels.combined.tsv` with the real header, one row per raw category, ordered by row id."""
    rows = ["\t".join(LABEL_MAP_COLUMNS)]
    for raw in sorted(set(raw_categories), key=lambda r: LABEL_ROWS[r][0]):
        row_id, category, count, nyu40, eigen13, eigen13class, wnkey, mpcat_index, mpcat = LABEL_ROWS[raw]
        nyu_class = NYU40_CLASSES[nyu40]
        rows.append("\t".join(str(x) for x in (row_id, raw, category, count, nyu40, eigen13, nyu_class, nyu_class,
                                                eigen13class, "", "", "", "", "", wnkey, mpcat_index, mpcat)))
    atomic_write_bytes(path, ("\n".join(rows) + "\n").encode())
