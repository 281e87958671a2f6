"""ShapeNetPart reader: the release's layout, Point-MAE's shape order and splits, pcd's cache, bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from pcd.pipeline.errors import PcdError
from pcd.trainer.partseg import data
from pcd.trainer.partseg.data import CATEGORY_PARTS, ShapeNetPart, choose_points
from shape_helpers import tiny_shapes


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shapes(tmp_path_factory.mktemp("shapes"), modelnet_classes=1, scanobjectnn_classes=1)["shapenetpart"]


@pytest.fixture
def copy(tmp_path: Path, root: Path) -> Path:
    out = tmp_path / "shapenet"
    shutil.copytree(root, out, ignore=shutil.ignore_patterns("pcd_cache"))
    return out


def test_part_ids_are_numbered_as_upstream() -> None:
    flat = [p for parts in CATEGORY_PARTS for p in parts]
    assert flat == list(range(50))
    assert CATEGORY_PARTS[4] == (12, 13, 14, 15) and CATEGORY_PARTS[10] == (30, 31, 32, 33, 34, 35)


def test_items_hold_every_point_of_the_file(root: Path, tmp_path: Path) -> None:
    ds = ShapeNetPart(root, "test", cache_dir=tmp_path, workers=0)
    assert len(ds) == 12 and ds.up_axis == "y" and ds.normalized
    assert ds.categories.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # shapes are ordered by category, then by file name, as Point-MAE's PartNormalDataset
    assert ds.shape_ids[:3] == sorted(ds.shape_ids[:3])
    item = ds[7]
    rows = np.loadtxt(root / f"{ds.shape_ids[7]}.txt")
    np.testing.assert_allclose(item["points"], rows[:, :3], atol=1e-6)
    np.testing.assert_array_equal(item["seg"], rows[:, 6].astype(np.int64))
    assert item["points"].dtype == np.float32 and item["seg"].dtype == np.int64 and item["category"] == 2


def test_splits_follow_the_json_lists(root: Path, tmp_path: Path) -> None:
    sizes = {split: len(ShapeNetPart(root, split, cache_dir=tmp_path, workers=0))
             for split in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 24, "val": 4, "trainval": 28, "test": 12}
    test_ids = {e.split("/", 1)[1] for e in json.loads(
        (root / "train_test_split" / "shuffled_test_file_list.json").read_text())}
    assert set(ShapeNetPart(root, "test", cache_dir=tmp_path, workers=0).shape_ids) == test_ids


def test_cache_is_reused(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ShapeNetPart(root, "val", cache_dir=tmp_path, workers=2)
    monkeypatch.setattr(data, "parallel_map", lambda *a, **k: pytest.fail("cache rebuilt"))
    again = ShapeNetPart(root, "val", cache_dir=tmp_path, workers=0)
    np.testing.assert_array_equal(again.points, first.points)
    np.testing.assert_array_equal(again.offsets, first.offsets)


def test_part_label_out_of_range_names_the_file(copy: Path, tmp_path: Path) -> None:
    shape = sorted((copy / "02773838").iterdir())[0]  # a Bag: parts 4 and 5
    lines = shape.read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:6] + ["12.000000"])
    shape.write_text("\n".join(lines) + "\n")
    with pytest.raises(PcdError) as err:
        for split in ("trainval", "test"):
            ShapeNetPart(copy, split, cache_dir=tmp_path / "c", workers=0)
    assert str(err.value) == f"{shape}: part label 12 on line 3 is out of range 4..5 of Bag"


def test_missing_split_list_names_it(copy: Path, tmp_path: Path) -> None:
    (copy / "train_test_split" / "shuffled_val_file_list.json").unlink()
    assert len(ShapeNetPart(copy, "test", cache_dir=tmp_path, workers=0)) == 12
    with pytest.raises(PcdError, match="shuffled_val_file_list.json: missing"):
        ShapeNetPart(copy, "trainval", cache_dir=tmp_path, workers=0)


def test_a_listed_shape_without_its_file_is_named(copy: Path, tmp_path: Path) -> None:
    victim = sorted((copy / "02954340").iterdir())[-1]
    victim.unlink()
    with pytest.raises(PcdError, match=f"shape '{victim.stem}' of the") as err:
        for split in ("trainval", "test"):
            ShapeNetPart(copy, split, cache_dir=tmp_path, workers=0)
    assert "\n" not in str(err.value)


def test_categories_must_be_shapenetparts(copy: Path, tmp_path: Path) -> None:
    cat = copy / "synsetoffset2category.txt"
    cat.write_text("".join(reversed(cat.read_text().splitlines(keepends=True))))
    with pytest.raises(PcdError, match="synsetoffset2category.txt: expected ShapeNetPart's 16 categories"):
        ShapeNetPart(copy, "test", cache_dir=tmp_path, workers=0)


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(PcdError, match="unknown dataset layout"):
        ShapeNetPart(tmp_path / "x", "test")


def test_choose_points() -> None:
    rng = np.random.default_rng(0)
    with_replacement = choose_points(10, 2048, rng, replace=True)
    assert with_replacement.shape == (2048,) and with_replacement.max() < 10
    distinct = choose_points(3000, 2048, rng, replace=False)
    assert len(np.unique(distinct)) == 2048
    filled = choose_points(100, 150, rng, replace=False)
    assert set(filled[:100]) == set(range(100)) and filled.max() < 100


def test_a_pickled_dataset_reopens_its_cache(root: Path, tmp_path: Path) -> None:
    """Loader workers started by spawn get the dataset pickled: the cache travels as its file name, not its bytes."""
    ds = ShapeNetPart(root, "test", cache_dir=tmp_path, workers=0)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.points.nbytes
    again = pickle.loads(blob)
    assert isinstance(again.points, np.memmap)
    np.testing.assert_array_equal(again[5]["points"], ds[5]["points"])
