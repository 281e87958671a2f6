"""Classification readers (ModelNet40 txt/HDF5, ScanObjectNN), pcd's FPS cache, Point-MAE's point selection,
and the one-line errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcd.pipeline.errors import PcdError
from pcd.trainer.classification import data
from pcd.trainer.classification.data import (ModelNet40H5, ModelNet40Txt, ScanObjectNN, detect_layout, eval_points,
                                             fps_indices, open_classification, preselection_size, training_points,
                                             voting_view)
from shape_helpers import tiny_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def brute_force_fps(xyz: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """The textbook rule, in float64: repeatedly take the point farthest from those taken."""
    xyz = xyz.astype(np.float64)
    nearest = np.full(len(xyz), np.inf)
    picks = [start]
    for _ in range(count - 1):
        nearest = np.minimum(nearest, ((xyz - xyz[picks[-1]]) ** 2).sum(axis=1))
        picks.append(int(nearest.argmax()))
    return np.array(picks)


def test_compiled_fps_equals_brute_force() -> None:
    xyz = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    np.testing.assert_array_equal(fps_indices(xyz, 200, start=0), brute_force_fps(xyz, 200, 0))
    np.testing.assert_array_equal(fps_indices(xyz, 50, start=17), brute_force_fps(xyz, 50, 17))


def test_layouts_are_detected(shapes: dict[str, Path]) -> None:
    assert detect_layout(shapes["modelnet40_txt"]) == "modelnet40_normal_resampled"
    assert detect_layout(shapes["modelnet40_h5"]) == "modelnet40_ply_hdf5_2048"
    assert detect_layout(shapes["scanobjectnn"]) == "scanobjectnn"
    assert detect_layout(shapes["scanobjectnn"] / "main_split_nobg") == "scanobjectnn"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "unknown dataset layout"),
    (lambda p: p.write_text("x"), "not a folder"),
])
def test_unknown_layout_is_one_line(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "d")
    with pytest.raises(PcdError, match=message) as err:
        detect_layout(tmp_path / "d")
    assert str(tmp_path / "d") in str(err.value) and "\n" not in str(err.value)


def test_shapenetpart_folder_is_not_classification(shapes: dict[str, Path]) -> None:
    with pytest.raises(PcdError, match="ShapeNetPart"):
        detect_layout(shapes["shapenetpart"])


def test_modelnet_txt_cache_is_fps_of_the_file_and_reused(tmp_path: Path, shapes: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = shapes["modelnet40_txt"]
    ds = ModelNet40Txt(root, "test", cache_points=256, cache_dir=tmp_path, workers=0)
    assert len(ds) == 12 and ds.num_classes == 40 and ds.up_axis == "y" and ds.normalized
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    item = ds[4]
    assert item["points"].shape == (256, 3) and item["points"].dtype == np.float32
    assert item["label"] == 1 and item["label"].dtype == np.int64
    rows = np.loadtxt(root / "bathtub" / "bathtub_0008.txt", delimiter=",", dtype=np.float32)
    np.testing.assert_array_equal(item["points"], rows[brute_force_fps(rows[:, :3], 256), :3])
    assert [p.name for p in tmp_path.iterdir()] == [ds.cache_path.name]
    # a second reader maps the same file and computes nothing
    monkeypatch.setattr(data, "parallel_map", lambda *a, **k: pytest.fail("cache rebuilt"))
    again = ModelNet40Txt(root, "test", cache_points=256, cache_dir=tmp_path, workers=0)
    np.testing.assert_array_equal(again.points, ds.points)


def test_modelnet_txt_cache_in_parallel_equals_serial(tmp_path: Path, shapes: dict[str, Path]) -> None:
    serial = ModelNet40Txt(shapes["modelnet40_txt"], "test", cache_points=128, cache_dir=tmp_path / "a", workers=0)
    parallel = ModelNet40Txt(shapes["modelnet40_txt"], "test", cache_points=128, cache_dir=tmp_path / "b", workers=2)
    np.testing.assert_array_equal(serial.points, parallel.points)


def test_a_torn_cache_file_is_rebuilt(tmp_path: Path, shapes: dict[str, Path]) -> None:
    ds = ModelNet40Txt(shapes["modelnet40_txt"], "test", cache_points=128, cache_dir=tmp_path, workers=0)
    good = np.array(ds.points)
    ds.cache_path.write_bytes(ds.cache_path.read_bytes()[:1000])
    again = ModelNet40Txt(shapes["modelnet40_txt"], "test", cache_points=128, cache_dir=tmp_path, workers=0)
    np.testing.assert_array_equal(again.points, good)


def test_modelnet_h5(shapes: dict[str, Path]) -> None:
    ds = open_classification(shapes["modelnet40_h5"], "train")
    assert isinstance(ds, ModelNet40H5) and len(ds) == 24 and ds.points.shape == (24, 512, 3)
    assert sorted(np.bincount(ds.labels).tolist()) == [6, 6, 6, 6] and ds[0]["points"].dtype == np.float32


@pytest.mark.parametrize("variant, folder", [("OBJ_BG", "main_split"), ("OBJ_ONLY", "main_split_nobg"),
                                             ("PB_T50_RS", "main_split")])
def test_scanobjectnn_variants(shapes: dict[str, Path], variant: str, folder: str) -> None:
    ds = open_classification(shapes["scanobjectnn"], "test", variant=variant)
    assert isinstance(ds, ScanObjectNN) and len(ds) == 12 and ds.num_classes == 15
    assert ds.up_axis == "y" and not ds.normalized
    direct = ScanObjectNN(shapes["scanobjectnn"] / folder, "test", variant=variant)
    np.testing.assert_array_equal(direct.points, ds.points)


def test_scanobjectnn_variant_folder_must_match(shapes: dict[str, Path]) -> None:
    with pytest.raises(PcdError, match="no main_split folder"):
        ScanObjectNN(shapes["scanobjectnn"] / "main_split_nobg", "test", variant="OBJ_BG")


def test_missing_split_file_names_it(tmp_path: Path, shapes: dict[str, Path]) -> None:
    root = tmp_path / "m"
    shutil.copytree(shapes["modelnet40_txt"], root, ignore=shutil.ignore_patterns("pcd_cache"))
    (root / "modelnet40_train.txt").unlink()
    with pytest.raises(PcdError, match="modelnet40_train.txt: missing"):
        ModelNet40Txt(root, "train", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    h5 = tmp_path / "h"
    shutil.copytree(shapes["modelnet40_h5"], h5)
    (h5 / "ply_data_test0.h5").unlink()
    with pytest.raises(PcdError, match="ply_data_test0.h5: missing"):
        ModelNet40H5(h5, "test")


def test_unknown_class_in_txt_split_names_the_split_file(tmp_path: Path, shapes: dict[str, Path]) -> None:
    root = tmp_path / "m"
    shutil.copytree(shapes["modelnet40_txt"], root, ignore=shutil.ignore_patterns("pcd_cache"))
    (root / "modelnet40_test.txt").write_text("airplane_0007\nspaceship_0001\n")
    with pytest.raises(PcdError, match=r"modelnet40_test.txt: shape 'spaceship_0001' names class 'spaceship'"):
        ModelNet40Txt(root, "test", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("layout", ["modelnet40_h5", "scanobjectnn"])
def test_label_out_of_range_names_the_file(tmp_path: Path, shapes: dict[str, Path], layout: str) -> None:
    root = tmp_path / "d"
    shutil.copytree(shapes[layout], root)
    path = root / ("ply_data_test0.h5" if layout == "modelnet40_h5" else "main_split/test_objectdataset.h5")
    with h5py.File(path, "r+") as f:
        labels = np.asarray(f["label"])
        labels.reshape(-1)[3] = 40 if layout == "modelnet40_h5" else 15
        del f["label"]
        f["label"] = labels
    with pytest.raises(PcdError, match=f"{path}: label {40 if layout == 'modelnet40_h5' else 15} of shape 3 is out "
                                       "of range") as err:
        open_classification(root, "test")
    assert "\n" not in str(err.value)


def test_point_mae_pickle_cache_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "modelnet40_normal_resampled"
    root.mkdir()
    (root / "modelnet40_shape_names.txt").write_text("airplane\n")
    (root / "modelnet40_train.txt").write_text("airplane_0001\n")
    dat = root / "modelnet40_train_8192pts_fps.dat"
    dat.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(PcdError, match="pickle, which pcd never loads") as err:
        ModelNet40Txt(root, "train")
    assert str(dat) in str(err.value) and "builds its own cache" in str(err.value)
    with pytest.raises(PcdError, match="pickle"):
        detect_layout(dat)


def test_preselection_follows_point_mae() -> None:
    assert [preselection_size(n, 8192) for n in (1024, 2048, 4096, 8192)] == [1200, 2400, 4800, 8192]
    assert preselection_size(2048, 2048) == 2048  # ScanObjectNN: every point
    with pytest.raises(PcdError):
        preselection_size(1024, 512)


def test_training_points_are_a_random_subset_of_an_fps_preselection() -> None:
    points = np.random.default_rng(1).normal(size=(600, 3)).astype(np.float32)
    rng = np.random.default_rng(2)
    sample = training_points(points, 128, rng)
    assert sample.shape == (128, 3) and len(np.unique(sample, axis=0)) == 128
    # replay the draws: a random first point, FPS to 150 (= 128 * 75/64) from it, a random 128 of those
    replay = np.random.default_rng(2)
    start = int(replay.integers(600))
    preselection = brute_force_fps(points, 150, start)
    np.testing.assert_array_equal(sample, points[preselection[replay.choice(150, 128, replace=False)]])
    assert not np.array_equal(sample, training_points(points, 128, rng))


def test_eval_points_are_fps_from_the_first_point() -> None:
    points = np.random.default_rng(1).normal(size=(300, 3)).astype(np.float32)
    np.testing.assert_array_equal(eval_points(points, 64), points[brute_force_fps(points, 64, 0)])


def test_voting_views_are_seeded_and_augmented() -> None:
    points = np.random.default_rng(1).normal(size=(600, 3)).astype(np.float32)
    a = voting_view(points, 128, seed=0, sample=5, view=1)
    np.testing.assert_array_equal(a, voting_view(points, 128, seed=0, sample=5, view=1))
    assert not np.array_equal(a, voting_view(points, 128, seed=0, sample=5, view=2))
    assert not np.array_equal(a, voting_view(points, 128, seed=0, sample=6, view=1))
    # undo the augmentation with the view's own draws: the points are among the FPS-150 preselection from index 0
    rng = np.random.default_rng([0, 5, 1])
    rng.choice(150, 128, replace=False)
    scale, shift = rng.uniform(2 / 3, 1.5, 3), rng.uniform(-0.2, 0.2, 3)
    raw = (a - shift) / scale
    preselection = points[brute_force_fps(points, 150, 0)]
    distance = np.linalg.norm(raw[:, None] - preselection[None], axis=2).min(axis=1)
    assert distance.max() < 1e-4


def test_scanobjectnn_voting_view_uses_every_point() -> None:
    points = np.random.default_rng(1).normal(size=(256, 3)).astype(np.float32)
    view = voting_view(points, 256, seed=0, sample=0, view=0, scale_low=1.0, scale_high=1.0, translate_range=0.0)
    np.testing.assert_array_equal(np.sort(view, axis=0), np.sort(points, axis=0))
