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
    assert run(cfg) == 1
    failed = json.loads((tmp_path / "out" / "prepare.json").read_text())["failed"]
    assert list(failed) == ["scene0005_00"] and "segment indices" in failed["scene0005_00"]
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


# --- VoteNet's labelling rules on edge-case aggregations (scannet/load_scannet_data.py) ---------------------
# Each scene of write_scene has a floor (objectId 0, segment 0, "floor") and objects k = 1..4 with segments
# 10k and 10k+1; the tests rewrite the aggregation and check the four files against hand-derived values.


def edge_case_scene(tmp_path, groups, scenes=("scene0100_00",)):
    """Prepare scenes whose first one has `groups` as its aggregation; returns (arrays of it, prepare.json, code)."""
    write_dataset(tmp_path, list(scenes), seed=11, num_objects=4)
    scene = scenes[0]
    folder = tmp_path / "scans" / scene
    (folder / f"{scene}.aggregation.json").write_text(json.dumps({"sceneId": scene, "segGroups": groups}))
    code = run(Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())
    if not (tmp_path / "out" / f"{scene}_bbox.npy").exists():
        return None, record, code
    arrays = {key: np.load(tmp_path / "out" / f"{scene}_{key}.npy") for key in ("vert", "sem_label", "ins_label", "bbox")}
    segs = np.array(json.loads((folder / f"{scene}_vh_clean_2.0.010000.segs.json").read_text())["segIndices"])
    return {**arrays, "segs": segs}, record, code


def group(object_id, label, segments):
    return {"objectId": object_id, "label": label, "segments": segments}


def box_of(vertices, mask, label):
    """VoteNet's box: float32 min/max, centre and size computed in float32, stored as float64."""
    points = vertices[mask, :3]
    lo, hi = points.min(0), points.max(0)
    return np.array([*((lo + hi) / 2), *(hi - lo), label], np.float64)


def test_a_segment_of_two_objects_of_different_labels(tmp_path):
    # segment 10 belongs to chair 1 and to table 2; labels are written label by label, chair first
    a, record, code = edge_case_scene(tmp_path, [group(0, "floor", [0]), group(1, "chair", [10, 11]),
                                                 group(2, "table", [10, 20, 21])])
    assert code == 0 and record["warnings"] == {}
    seg10, seg11, obj2 = a["segs"] == 10, a["segs"] == 11, np.isin(a["segs"], [20, 21])
    assert np.all(a["sem_label"][seg10] == 7) and np.all(a["sem_label"][seg11] == 5)   # the later label wins
    assert np.all(a["ins_label"][seg10] == 3) and np.all(a["ins_label"][seg11] == 2)   # the later object wins
    # the chair's box label is the semantic label of its first segment's first vertex: table (7)
    expected = np.stack([box_of(a["vert"], seg11, 7), box_of(a["vert"], seg10 | obj2, 7)])
    np.testing.assert_array_equal(a["bbox"], expected)


def test_an_object_listed_twice_keeps_its_last_listing_for_instances_and_box(tmp_path):
    # scene0217_00-like: objectId 1 listed as chair with segment 10, then again as chair with segment 11
    a, record, code = edge_case_scene(tmp_path, [group(0, "floor", [0]), group(1, "chair", [10]),
                                                 group(2, "table", [20, 21]), group(1, "chair", [11])])
    assert code == 0
    seg10, seg11 = a["segs"] == 10, a["segs"] == 11
    assert np.all(a["sem_label"][seg10 | seg11] == 5)           # semantic labels come from both listings
    # the first chair listing's segment list is also the label's, so it received segment 11 in place; the
    # last listing (segment 11) is the instance's, so segment 10 keeps no instance
    assert np.all(a["ins_label"][seg11] == 2) and np.all(a["ins_label"][seg10] == 0)
    expected = np.stack([box_of(a["vert"], seg11, 5), box_of(a["vert"], np.isin(a["segs"], [20, 21]), 7)])
    np.testing.assert_array_equal(a["bbox"], expected)


def test_where_votenet_drops_the_scene_pcd_skips_the_bad_part_with_a_warning(tmp_path):
    groups = [group(0, "floor", [0]), group(1, "chair", [10, 11, 999]), group(2, "table", []),
              group(5, "bed", [30, 31])]                        # 999: no such segment; ids 1, 2, 5: a gap
    a, record, code = edge_case_scene(tmp_path, groups)
    assert code == 0
    lines = record["warnings"]["scene0100_00"]
    assert lines == ["scene scene0100_00: object 1 ('chair'): segment(s) 999 not in the segmentation; skipped",
                     "scene scene0100_00: object 2 ('table') has no segments; skipped",
                     "scene scene0100_00: objectIds are not 0..3 (VoteNet drops such a scene); every object is kept"]
    chair, bed = np.isin(a["segs"], [10, 11]), np.isin(a["segs"], [30, 31])
    assert np.all(a["ins_label"][chair] == 2) and np.all(a["ins_label"][bed] == 6)
    np.testing.assert_array_equal(a["bbox"], np.stack([box_of(a["vert"], chair, 5), box_of(a["vert"], bed, 4)]))


def test_an_unknown_category_fails_its_scene_only(tmp_path):
    a, record, code = edge_case_scene(tmp_path, [group(0, "floor", [0]), group(1, "spaceship", [10, 11])],
                                      scenes=("scene0100_00", "scene0101_00"))
    assert code == 1 and a is None
    assert record["failed"] == {"scene0100_00": f"{tmp_path}/scans/scene0100_00/scene0100_00.aggregation.json: "
                                                "scene scene0100_00 category 'spaceship' is not in the label map"}
    assert record["scenes"] == ["scene0101_00"] and (tmp_path / "out" / "scene0101_00_bbox.npy").is_file()
