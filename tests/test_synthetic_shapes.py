"""`pcd generate-shapes`: the releases' exact layouts and formats, deterministic by seed, learnable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcd.pipeline.errors import PcdError
from pcd.pipeline.synthetic_shapes import MODELNET40_CLASSES, SHAPENETPART_CATEGORIES
from shape_helpers import tiny_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def test_the_command_writes_every_dataset(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pcd.cli", "generate-shapes", str(tmp_path / "out"), "--preset",
                             "tiny", "--set", "modelnet_classes=2", "--set", "shapenetpart_categories=1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "modelnet40_normal_resampled" / "modelnet40_train.txt").read_text().split() == [
        f"{name}_{i:04d}" for name in ("airplane", "bathtub") for i in range(1, 7)]
    assert (out / "ScanObjectNN" / "main_split_nobg" / "test_objectdataset.h5").is_file()
    assert (out / "shapenetcore_partanno_segmentation_benchmark_v0_normal" / "synsetoffset2category.txt").is_file()


def test_modelnet_txt_layout(shapes: dict[str, Path]) -> None:
    root = shapes["modelnet40_txt"]
    assert (root / "modelnet40_shape_names.txt").read_text().split() == list(MODELNET40_CLASSES)
    test_ids = (root / "modelnet40_test.txt").read_text().split()
    assert test_ids[0] == "airplane_0007" and len(test_ids) == 4 * 3
    rows = np.loadtxt(root / "airplane" / "airplane_0007.txt", delimiter=",")
    assert rows.shape == (1200, 6)
    np.testing.assert_allclose(np.linalg.norm(rows[:, 3:], axis=1), 1.0, atol=1e-5)  # unit normals


def test_modelnet_h5_layout(shapes: dict[str, Path]) -> None:
    root = shapes["modelnet40_h5"]
    assert (root / "shape_names.txt").read_text().split() == list(MODELNET40_CLASSES)
    lines = (root / "train_files.txt").read_text().split()
    assert lines == [f"data/modelnet40_ply_hdf5_2048/ply_data_train{i}.h5" for i in (0, 1)]
    with h5py.File(root / "ply_data_train1.h5") as f:
        assert f["data"].shape == (8, 512, 3) and f["data"].dtype == np.float32
        assert f["label"].shape == (8, 1) and f["label"].dtype == np.uint8
        assert f["normal"].shape == (8, 512, 3)
    assert len(json.loads((root / "ply_data_train_1_id2file.json").read_text())) == 8


@pytest.mark.parametrize("folder, name, count", [
    ("main_split", "training_objectdataset.h5", 24), ("main_split_nobg", "test_objectdataset.h5", 12),
    ("main_split", "training_objectdataset_augmentedrot_scale75.h5", 24)])
def test_scanobjectnn_layout(shapes: dict[str, Path], folder: str, name: str, count: int) -> None:
    with h5py.File(shapes["scanobjectnn"] / folder / name) as f:
        assert f["data"].shape == (count, 512, 3) and f["label"].shape == (count,) and f["mask"].shape == (count, 512)
        mask, data = np.asarray(f["mask"]), np.asarray(f["data"])
    background = mask == -1
    assert background.any() == (folder == "main_split")
    if folder == "main_split" and "augmented" not in name:
        # y is up: the floor (background) lies at the bottom of each object, not at the side.
        for points, bg in zip(data, background):
            floor = points[bg][:, 1]
            assert np.median(floor) < np.median(points[~bg][:, 1])


def test_shapenetpart_layout(shapes: dict[str, Path]) -> None:
    root = shapes["shapenetpart"]
    lines = (root / "synsetoffset2category.txt").read_text().splitlines()
    assert lines == [f"{name}\t{synset}" for name, synset, _ in SHAPENETPART_CATEGORIES]
    for split, count in (("train", 24), ("val", 4), ("test", 12)):
        entries = json.loads((root / "train_test_split" / f"shuffled_{split}_file_list.json").read_text())
        assert len(entries) == count and all(e.startswith("shape_data/") and e.count("/") == 2 for e in entries)
    car = sorted((root / "02958343").iterdir())
    assert len(car) == 10
    rows = np.loadtxt(car[0])
    assert rows.shape[1] == 7 and 300 <= len(rows) <= 600
    assert set(np.unique(rows[:, 6])) <= {8.0, 9.0, 10.0, 11.0} and 8.0 in rows[:, 6]
    # all 16 category folders exist, as in the release; only the first four have shapes
    assert all((root / synset).is_dir() for _, synset, _ in SHAPENETPART_CATEGORIES)


def test_deterministic_by_seed(tmp_path: Path, shapes: dict[str, Path]) -> None:
    again = tiny_shapes(tmp_path / "again", modelnet_classes=1, scanobjectnn_classes=1, shapenetpart_categories=1)
    other = tiny_shapes(tmp_path / "other", modelnet_classes=1, scanobjectnn_classes=1, shapenetpart_categories=1,
                        seed=1)
    name = "airplane/airplane_0001.txt"
    assert (again["modelnet40_txt"] / name).read_bytes() == (shapes["modelnet40_txt"] / name).read_bytes()
    assert (other["modelnet40_txt"] / name).read_bytes() != (shapes["modelnet40_txt"] / name).read_bytes()
    first = sorted((again["shapenetpart"] / "02691156").iterdir())[0].name
    assert (again["shapenetpart"] / "02691156" / first).read_bytes() == (
        shapes["shapenetpart"] / "02691156" / first).read_bytes()


def _descriptor(points: np.ndarray) -> np.ndarray:
    """Rotation-about-y-tolerant shape descriptor: histograms of horizontal radius, height and distance
    after scaling to the unit sphere."""
    centred = points - points.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1).max()
    radial = np.linalg.norm(centred[:, [0, 2]], axis=1)
    distance = np.linalg.norm(centred, axis=1)
    return np.concatenate([np.histogram(radial, 8, (0, 1))[0], np.histogram(centred[:, 1], 8, (-1, 1))[0],
                           np.histogram(distance, 8, (0, 1))[0]]) / len(points)


def test_classes_are_learnable(shapes: dict[str, Path]) -> None:
    """A nearest-class-mean rule on a simple descriptor separates the generated classes: far above chance (1/4)."""
    root = shapes["modelnet40_txt"]
    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        ids = (root / f"modelnet40_{split}.txt").read_text().split()
        x = np.array([_descriptor(np.loadtxt(root / i.rpartition("_")[0] / f"{i}.txt", delimiter=",")[:, :3])
                      for i in ids])
        return x, np.array([MODELNET40_CLASSES.index(i.rpartition("_")[0]) for i in ids])
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    means = np.array([x_train[y_train == c].mean(axis=0) for c in range(4)])
    predicted = np.linalg.norm(x_test[:, None] - means[None], axis=2).argmin(axis=1)
    assert np.mean(predicted == y_test) >= 0.9


def test_parts_are_distinct_regions(shapes: dict[str, Path]) -> None:
    """Part centres learnt on training shapes label test points by nearest centre with high accuracy."""
    root = shapes["shapenetpart"]
    car = [np.loadtxt(p) for p in sorted((root / "02958343").iterdir())]
    train, test = car[:7], car[7:]
    centres = {part: np.concatenate([s[s[:, 6] == part, :3] for s in train]).mean(axis=0) for part in range(8, 12)}
    ids = np.array(list(centres))
    centre_array = np.array([centres[p] for p in ids])
    for shape in test:
        predicted = ids[np.linalg.norm(shape[:, None, :3] - centre_array[None], axis=2).argmin(axis=1)]
        assert np.mean(predicted == shape[:, 6]) >= 0.8


def test_some_shapes_lack_an_optional_part(shapes: dict[str, Path]) -> None:
    root = shapes["shapenetpart"]
    present = [set(np.loadtxt(p)[:, 6].astype(int)) for synset in ("02691156", "02958343")
               for p in (root / synset).iterdir()]
    assert any(len(parts) < 4 for parts in present)


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "modelnet40_shape_names.txt").write_text("keep\n")
    with pytest.raises(PcdError, match="not written by pcd generate-shapes"):
        tiny_shapes(tmp_path / "real")
    assert (tmp_path / "real" / "modelnet40_shape_names.txt").read_text() == "keep\n"


def test_generator_and_readers_do_not_import_torch() -> None:
    code = ("import sys, pcd.pipeline.synthetic_shapes, pcd.trainer.classification.data, pcd.trainer.partseg.data, "
            "pcd.trainer.classification.metric, pcd.trainer.partseg.metric, pcd.trainer.augment; "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
