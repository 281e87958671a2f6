"""Generated ScanNet-style scenes: determinism, ScanNet file formats, alignment, ground truth, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline.errors import PcdError
from pcd.pipeline.scan_source import open_scan
from pcd.pipeline.scannet_files import LABEL_MAP_COLUMNS, nyu40_id
from pcd.pipeline.sens import SensReader, decode_color
from pcd.pipeline.synthetic import (DETECTION_NYU40_IDS, Config, SceneInfo, describe_scene, detection_boxes, generate,
                                    generate_dataset, generate_scene, surface_distance, tiny_config)
from pcd.pipeline.synthetic_geometry import CATALOGUE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list[SceneInfo]]:
    cfg = tiny_config(tmp_path_factory.mktemp("scans"), num_scenes=3)
    return cfg, generate(cfg)


def read_label_map(path: Path) -> dict[str, int]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {row["raw_category"]: int(row["nyu40id"]) for row in rows}


def read_axis_alignment(path: Path) -> np.ndarray:
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" = ")
        if key == "axisAlignment":
            return np.array([float(v) for v in value.split()]).reshape(4, 4)
    raise AssertionError("no axisAlignment line")


def backproject(depth: np.ndarray, intrinsics: np.ndarray, pose: np.ndarray, shift: float) -> np.ndarray:
    v, u = np.nonzero(depth)
    z = depth[v, u] / shift
    cam = np.stack([(u - intrinsics[0, 2]) * z / intrinsics[0, 0], (v - intrinsics[1, 2]) * z / intrinsics[1, 1], z], 1)
    return cam @ pose[:3, :3].T.astype(np.float64) + pose[:3, 3]


def test_same_seed_same_bytes_other_seed_other_scene(dataset, tmp_path: Path) -> None:
    cfg, infos = dataset
    again = dataclasses.replace(cfg, out_dir=tmp_path / "again")
    generate_scene(again, 1)
    first, second = infos[1].scene_dir, again.out_dir / infos[1].scene_id
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = describe_scene(dataclasses.replace(cfg, seed=cfg.seed + 1), 1)
    assert not np.allclose(other.layout.room_size, infos[1].layout.room_size)


def test_annotation_files_parse_and_agree(dataset) -> None:
    cfg, infos = dataset
    label_map = read_label_map(cfg.out_dir / "scannetv2-labels.combined.tsv")
    for info in infos:
        scene, folder = info.scene_id, info.scene_dir
        mesh = PlyData.read(str(folder / f"{scene}_vh_clean_2.ply"))
        labels_ply = PlyData.read(str(folder / f"{scene}_vh_clean_2.labels.ply"))
        segs = json.loads((folder / f"{scene}_vh_clean_2.0.010000.segs.json").read_text())
        agg = json.loads((folder / f"{scene}.aggregation.json").read_text())
        n = mesh["vertex"].count
        assert 20_000 <= n <= 60_000
        assert labels_ply["vertex"].count == n and len(segs["segIndices"]) == n
        assert [p.name for p in mesh["vertex"].properties] == ["x", "y", "z", "red", "green", "blue", "alpha"]
        assert labels_ply["vertex"]["label"].dtype == np.uint16
        for axis in "xyz":
            np.testing.assert_array_equal(mesh["vertex"][axis], labels_ply["vertex"][axis])
        faces = np.stack(mesh["face"]["vertex_indices"])
        assert faces.shape[1] == 3 and faces.min() >= 0 and faces.max() < n
        # Rebuild per-vertex nyu40 labels from aggregation + segments + label map, as ScanNet's scripts do.
        seg_indices = np.array(segs["segIndices"])
        rebuilt = np.zeros(n, dtype=np.int64)
        covered = np.zeros(n, dtype=int)
        for group in agg["segGroups"]:
            mask = np.isin(seg_indices, group["segments"])
            rebuilt[mask] = label_map[group["label"]]
            covered += mask
        assert (covered == 1).all()  # every vertex in exactly one object
        np.testing.assert_array_equal(rebuilt, labels_ply["vertex"]["label"])
        furniture = [g for g in agg["segGroups"] if g["label"] not in ("wall", "floor")]
        assert [g["label"] for g in furniture] == [f.raw_category for f in info.furniture]
        for group in furniture:
            assert np.isin(seg_indices, group["segments"]).sum() >= 300


def test_axis_alignment_makes_furniture_boxes_axis_aligned(dataset) -> None:
    _, infos = dataset
    for info in infos:
        scene, folder = info.scene_id, info.scene_dir
        align = read_axis_alignment(folder / f"{scene}.txt")
        assert not np.allclose(align, np.eye(4), atol=1e-3)
        np.testing.assert_allclose(align, info.axis_alignment, atol=1e-5)
        vertex = PlyData.read(str(folder / f"{scene}_vh_clean_2.ply"))["vertex"]
        xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], 1).astype(np.float64)
        aligned = xyz @ align[:3, :3].T + align[:3, 3]
        segs = np.array(json.loads((folder / f"{scene}_vh_clean_2.0.010000.segs.json").read_text())["segIndices"])
        groups = json.loads((folder / f"{scene}.aggregation.json").read_text())["segGroups"]
        by_label = {}
        for group in groups[5:]:  # after the floor and the four walls
            mask = np.isin(segs, group["segments"])
            lo, hi = aligned[mask].min(0), aligned[mask].max(0)
            raw_lo, raw_hi = xyz[mask].min(0), xyz[mask].max(0)
            by_label.setdefault(group["label"], []).append((lo, hi))
            # Every vertex lies on a face of its min/max box once aligned; not so in the scan frame.
            on_face = np.minimum(np.abs(aligned[mask] - lo), np.abs(aligned[mask] - hi)).min(1)
            assert on_face.max() < 1e-4
            assert np.prod(raw_hi[:2] - raw_lo[:2]) > 1.05 * np.prod(hi[:2] - lo[:2])
        assert abs(aligned[:, 2].min()) < 1e-4  # floor at z = 0
        boxes = detection_boxes(info)
        assert len(boxes) == sum(f.nyu40_id in DETECTION_NYU40_IDS for f in info.furniture)
        for f in info.furniture:
            assert any(np.allclose(lo, f.lo, atol=1e-4) and np.allclose(hi, f.hi, atol=1e-4)
                       for lo, hi in by_label[f.raw_category])
        for box in boxes:
            assert int(box[6]) in DETECTION_NYU40_IDS and (box[3:6] > 0).all()


def test_frames_have_invalid_poses_holes_and_empty_depth_and_lie_on_the_geometry(dataset) -> None:
    _, infos = dataset
    info = infos[0]
    assert info.invalid_pose_frames and info.empty_depth_frames and info.dropout_frames
    with open_scan(info.scene_dir) as source:
        assert source.num_frames == 30 and source.depth_size == (64, 48) and source.color_size == (162, 121)
        checked = []
        for frame in source.iter_frames():
            np.testing.assert_array_equal(frame.pose, info.poses[frame.index])
            depth = frame.depth()
            if frame.index in info.invalid_pose_frames:
                assert np.isneginf(frame.pose).all()
                continue
            if frame.index in info.empty_depth_frames:
                assert not depth.any()
                continue
            holes = (depth == 0).mean()
            assert holes > 0.02 if frame.index in info.dropout_frames else holes < 0.02
            points = backproject(depth, source.depth_intrinsics, frame.pose, source.depth_shift)
            assert surface_distance(info, points).max() < 0.01
            assert decode_color(frame.color_jpeg, "x").shape == (121, 162, 3)
            checked.append((frame.pose, points))
    assert len(checked) >= 25
    # Points moved 20 cm towards the camera are off the surfaces, and measured as such.
    pose, points = checked[0]
    rays = points - pose[:3, 3]
    moved = points - 0.2 * rays / np.linalg.norm(rays, axis=1, keepdims=True)
    assert np.median(surface_distance(info, moved)) > 0.05


def test_exported_folder_matches_sens(dataset) -> None:
    _, infos = dataset
    info = infos[2]
    with open_scan(info.scene_dir, layout="sens") as sens, open_scan(info.scene_dir, layout="exported") as exported:
        for name in ("num_frames", "depth_size", "color_size", "depth_shift"):
            assert getattr(sens, name) == getattr(exported, name)
        np.testing.assert_array_equal(sens.depth_intrinsics, exported.depth_intrinsics)
        np.testing.assert_array_equal(sens.color_intrinsics, exported.color_intrinsics)
        for a, b in zip(sens.iter_frames(), exported.iter_frames(), strict=True):
            assert a.index == b.index and a.color_jpeg == b.color_jpeg
            np.testing.assert_array_equal(a.pose, b.pose)
            np.testing.assert_array_equal(a.depth(), b.depth())


def test_label_map_splits_and_catalogue(dataset) -> None:
    cfg, infos = dataset
    with open(cfg.out_dir / "scannetv2-labels.combined.tsv", newline="") as f:
        assert tuple(next(csv.reader(f, delimiter="\t"))) == LABEL_MAP_COLUMNS
    label_map = read_label_map(cfg.out_dir / "scannetv2-labels.combined.tsv")
    for info in infos:
        for f in info.furniture:
            assert label_map[f.raw_category] == f.nyu40_id
    assert set(DETECTION_NYU40_IDS) <= {nyu40_id(entry[0]) for entry in CATALOGUE}
    train = (cfg.out_dir / "scannetv2_train.txt").read_text().split("\n")
    val = (cfg.out_dir / "scannetv2_val.txt").read_text().split("\n")
    assert train[-1] == "" and val[-1] == ""
    train, val = train[:-1], val[:-1]
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == [info.scene_id for info in infos]


def test_full_scannet_resolution(tmp_path: Path) -> None:
    info = generate_dataset(tmp_path, num_scenes=1, num_frames=3, write_exported=False)[0]
    with SensReader(info.scene_dir / f"{info.scene_id}.sens") as reader:
        header = reader.header
        sizes = (header.color_width, header.color_height, header.depth_width, header.depth_height)
        assert sizes == (1296, 968, 640, 480)
        np.testing.assert_allclose(header.intrinsic_color[:3, :3],
                                   [[1170.187988, 0, 647.75], [0, 1170.187988, 483.75], [0, 0, 1]], rtol=1e-6)
        assert abs(header.intrinsic_depth[0, 0] - 577.59) < 4 and header.intrinsic_depth[0, 2] == 319.5
        frame = next(reader.iter_frames())
    color = decode_color(frame.color_bytes, "x")
    assert color.shape == (968, 1296, 3) and color.std() > 10
    with open_scan(info.scene_dir) as source:
        depth = next(source.iter_frames()).depth()
    assert depth.shape == (480, 640) and (depth > 0).mean() > 0.95
    points = backproject(depth, header.intrinsic_depth, frame.camera_to_world, header.depth_shift)
    assert surface_distance(info, points).max() < 0.01


def test_cli_rerun_is_idempotent_and_bad_config_is_an_error(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["generate-scenes", str(tmp_path), "--scenes", "1", "--frames", "4", "--preset", "tiny"]
    assert runner.invoke(app, args).exit_code == 0
    sens = tmp_path / "scene0000_00" / "scene0000_00.sens"
    first = sens.read_bytes()
    assert runner.invoke(app, args).exit_code == 0
    assert sens.read_bytes() == first
    assert not [p for p in tmp_path.rglob(".*tmp*")]
    result = runner.invoke(app, ["generate-scenes", str(tmp_path), "--frames", "0"])
    assert result.exit_code == 2 and "num_frames" in result.output
    with pytest.raises(PcdError):
        generate(tiny_config(tmp_path, num_scenes=0))


def test_a_folder_holding_other_data_is_never_overwritten(tmp_path: Path) -> None:
    real = tmp_path / "scans" / "scene0000_00" / "scene0000_00.txt"
    real.parent.mkdir(parents=True)
    real.write_text("axisAlignment = real scan\n")
    with pytest.raises(PcdError, match=r"scans: not empty and not written by pcd generate-scenes"):
        generate(tiny_config(tmp_path / "scans", num_scenes=1, num_frames=1))
    assert real.read_text() == "axisAlignment = real scan\n"
    assert sorted(p.name for p in (tmp_path / "scans").iterdir()) == ["scene0000_00"]


def test_excluded_categories_leave_the_rest_of_the_room_as_it_was(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "scans", num_scenes=1, num_frames=1)
    room = describe_scene(cfg, 0)
    assert "picture" in [f.raw_category for f in room.furniture]  # scene 0 of the tiny preset hangs a picture
    without = describe_scene(dataclasses.replace(cfg, exclude_categories=("picture",)), 0)
    kept = [(f.raw_category, f.lo.tolist(), f.hi.tolist()) for f in room.furniture if f.raw_category != "picture"]
    assert [(f.raw_category, f.lo.tolist(), f.hi.tolist()) for f in without.furniture] == kept
    surfaces = [i for i in range(len(room.layout.colors)) if i < 5 or i == room.layout.ceiling
                or room.furniture[i - 5].raw_category != "picture"]
    assert np.array_equal(without.layout.colors, room.layout.colors[surfaces])
    assert np.array_equal(without.layout.texture_cells, room.layout.texture_cells[surfaces])
    generate(dataclasses.replace(cfg, exclude_categories=("picture",)))
    aggregation = json.loads((tmp_path / "scans" / "scene0000_00" / "scene0000_00.aggregation.json").read_text())
    assert [g["label"] for g in aggregation["segGroups"]][5:] == [name for name, _, _ in kept]


def test_an_unknown_excluded_category_is_a_config_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate-scenes", str(tmp_path / "scans"), "--preset", "tiny",
                                      "--set", 'exclude_categories=["painting"]'])
    assert result.exit_code != 0 and not (tmp_path / "scans").exists()
    assert "exclude_categories" in str(result.output) + str(result.exception)
