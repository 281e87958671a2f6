"""`pcd prepare scannet-detection` on raw ScanNet-format files, and the 3DETR dataset on its output."""

import json

import numpy as np
import pytest
from detection_helpers import write_dataset

from pcd.pipeline.errors import PcdError
from pcd.trainer.detection.dataset import DetectionDataset, read_scene_list
from pcd.trainer.detection.prepare import Config, run

SCENES = ["scene0000_00", "scene0001_00"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    gt = write_dataset(root, SCENES, seed=3)
    cfg = Config(scans_dir=root / "scans", out_dir=root / "out", splits=[root / "split.txt"], max_points=3000)
    assert run(cfg) == 0
    return root, cfg, gt


def test_boxes_are_the_aligned_ground_truth(prepared):
    root, cfg, gt = prepared
    for scene in SCENES:
        boxes = np.load(cfg.out_dir / f"{scene}_bbox.npy")
        assert boxes.dtype == np.float64 and boxes.shape == gt[scene].shape
        np.testing.assert_allclose(boxes, gt[scene], atol=1e-5)


def test_vertices_labels_and_instances(prepared):
    root, cfg, gt = prepared
    for scene in SCENES:
        vert = np.load(cfg.out_dir / f"{scene}_vert.npy")
        sem = np.load(cfg.out_dir / f"{scene}_sem_label.npy")
        ins = np.load(cfg.out_dir / f"{scene}_ins_label.npy")
        assert vert.dtype == np.float32 and vert.shape == (3000, 6)      # 3000 of 5800 vertices kept
        assert sem.dtype == np.uint32 and ins.dtype == np.uint32
        floor = ins == 1                                               # objectId 0 -> instance 1
        assert np.all(sem[floor] == 2)
        np.testing.assert_allclose(vert[floor, 2], 0.0, atol=1e-5)      # aligned: the floor is at z = 0
        for k, box in enumerate(gt[scene], start=2):
            inside = vert[ins == k, :3]
            assert len(inside) and np.all(sem[ins == k] == box[6])
            assert np.all(inside >= box[:3] - box[3:6] / 2 - 1e-5) and np.all(inside <= box[:3] + box[3:6] / 2 + 1e-5)
    assert (cfg.out_dir / "split.txt").read_text() == (root / "split.txt").read_text()


def test_rerun_skips_finished_scenes(prepared):
    root, cfg, gt = prepared
    before = {p.name: p.stat().st_mtime_ns for p in cfg.out_dir.glob("*.npy")}
    assert run(cfg) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in cfg.out_dir.glob("*.npy")}


def test_bad_input_names_scene_and_file(tmp_path):
    write_dataset(tmp_path, ["scene0005_00"], seed=1)
    segs = tmp_path / "scans/scene0005_00/scene0005_00_vh_clean_2.0.010000.segs.json"
    data = json.loads(segs.read_text())
    segs.write_text(json.dumps({"segIndices": data["segIndices"][:-3]}))
    cfg = Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out")
    with pytest.raises(PcdError, match="scene0005_00.*segment indices"):
        run(cfg)
    assert not list((tmp_path / "out").glob("scene0005_00_*"))
    (tmp_path / "other.txt").write_text("scene0009_00\n")
    with pytest.raises(PcdError, match="scene0009_00"):
        run(Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out", splits=[tmp_path / "other.txt"]))


def test_dataset_targets_and_augmentation_keep_points_in_their_boxes(prepared):
    root, cfg, gt = prepared
    scenes = read_scene_list(root / "split.txt", cfg.out_dir)
    plain = DetectionDataset(cfg.out_dir, scenes, num_points=2048)
    item = plain[0]
    assert item["point_clouds"].shape == (2048, 3) and item["gt_box_present"].sum() == len(gt[SCENES[0]])
    k = len(gt[SCENES[0]])
    np.testing.assert_allclose(item["gt_box_centers"][:k], gt[SCENES[0]][:, :3], atol=1e-5)
    extent = item["point_cloud_dims_max"] - item["point_cloud_dims_min"]
    np.testing.assert_allclose(item["gt_box_sizes_normalized"][:k] * extent, gt[SCENES[0]][:, 3:6], rtol=1e-5)
    assert np.all((item["gt_box_centers_normalized"][:k] >= 0) & (item["gt_box_centers_normalized"][:k] <= 1))

    flipped = DetectionDataset(cfg.out_dir, scenes, num_points=2048, augment=True, use_random_cuboid=False)
    cropped = DetectionDataset(cfg.out_dir, scenes, num_points=2048, augment=True, cuboid_min_points=1000)
    for epoch in range(4):
        flipped.set_epoch(epoch)
        item = flipped[0]
        pts = item["point_clouds"][item["point_clouds"][:, 2] > 0.05]   # object points (above the floor)
        lo = item["gt_box_centers"][:k] - item["gt_box_sizes"][:k] / 2 - 1e-4
        hi = item["gt_box_centers"][:k] + item["gt_box_sizes"][:k] / 2 + 1e-4
        assert ((pts[:, None] >= lo) & (pts[:, None] <= hi)).all(-1).any(1).all()
        cropped.set_epoch(epoch)
        item = cropped[0]
        pts = item["point_clouds"][item["point_clouds"][:, 2] > 0.05]
        present = item["gt_box_present"] > 0
        lo = item["gt_box_centers"][present] - item["gt_box_sizes"][present] / 2 - 1e-4
        hi = item["gt_box_centers"][present] + item["gt_box_sizes"][present] / 2 + 1e-4
        assert present.sum() >= 1
        # points of dropped boxes may remain after a crop, so check the kept boxes each contain points
        inside = ((pts[:, None] >= lo) & (pts[:, None] <= hi)).all(-1)
        assert inside.any(0).all()
    cropped.set_epoch(1)
    np.testing.assert_array_equal(cropped[0]["point_clouds"], cropped[0]["point_clouds"])   # seeded per epoch


def test_generated_scenes_prepare_to_the_generators_boxes(tmp_path):
    from pcd.pipeline.synthetic import detection_boxes, generate, tiny_config

    infos = generate(tiny_config(tmp_path / "scans", num_scenes=2, num_frames=1))
    out = tmp_path / "data"
    splits = [tmp_path / "scans" / "scannetv2_train.txt", tmp_path / "scans" / "scannetv2_val.txt"]
    assert run(Config(scans_dir=tmp_path / "scans", out_dir=out, splits=splits, workers=2)) == 0
    for info in infos:
        expected = detection_boxes(info)
        boxes = np.load(out / f"{info.scene_id}_bbox.npy")
        assert len(expected) > 0 and boxes.shape == expected.shape
        np.testing.assert_allclose(boxes, expected, atol=1e-5)
        vert = np.load(out / f"{info.scene_id}_vert.npy")
        assert vert[:, 2].min() == pytest.approx(0.0, abs=1e-4)           # aligned frame: floor at z = 0
