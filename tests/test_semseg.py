"""ScanNet semantic segmentation pieces: the benchmark metric against hand-worked confusion matrices and the
official evaluator's rules, ACT's block mIoU, the class mapping, submission files, column tiling, whole-scene
inference, and `pcd prepare scannet`'s full-resolution vertices and labels (with its bad input)."""

import json

import numpy as np
import pytest
import torch
from plyfile import PlyData

from pcd.pipeline.errors import PcdError
from pcd.trainer.frames import PCD_FRAME
from pcd.trainer.models import MODELS
from pcd.trainer.semseg.classes import CLASS_NAMES, IGNORE_INDEX, VALID_CLASS_IDS, nyu40_ids, train_ids
from pcd.trainer.semseg.data import tile_columns
from pcd.trainer.semseg.inference import scene_probabilities
from pcd.trainer.semseg.metric import BenchmarkScores, BlockScores
from pcd.trainer.semseg.submission import read_prediction_file, write_prediction_file

NAN = float("nan")


def iou_table(scores):
    result = scores.result()
    return result, {name: value for name, value in result["class_iou"].items() if not np.isnan(value)}


def test_benchmark_metric_on_a_hand_worked_confusion_matrix():
    truth = [1, 1, 2, 2, 0, 5, 5, 13, 2]
    predicted = [1, 2, 2, 2, 1, 5, 13, 5, 255]
    # vertex 4 (unannotated) and 7 (nyu40 13 is not a benchmark class) are skipped whatever they predict;
    # vertex 6 predicts 13 and vertex 8 predicts 255 (not benchmark classes): wrong, a false positive of nothing.
    # wall: tp 1, fn 1 (-> floor)            IoU 1/2
    # floor: tp 2, fn 1 (-> 255), fp 1 (wall) IoU 2/4
    # chair: tp 1, fn 1 (-> 13)               IoU 1/2
    scores = BenchmarkScores()
    scores.add(np.array(truth), np.array(predicted))
    result, defined = iou_table(scores)
    assert defined == {"wall": 0.5, "floor": 0.5, "chair": 0.5}
    assert result["miou"] == pytest.approx(0.5) and result["classes_with_iou"] == 3
    assert result["scored_vertices"] == 7 and result["accuracy"] == pytest.approx(4 / 7)


def test_a_predicted_class_absent_from_the_truth_scores_zero_and_counts_in_the_mean():
    scores = BenchmarkScores()
    scores.add(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 3]))  # one wall vertex called cabinet
    result, defined = iou_table(scores)
    assert defined == {"wall": 0.75, "cabinet": 0.0}
    assert result["miou"] == pytest.approx(0.375)
    # accumulating a second scene adds to the same confusion matrix (the benchmark scores all scenes at once)
    scores.add(np.array([3, 3]), np.array([3, 3]))
    assert iou_table(scores)[1] == {"wall": 0.75, "cabinet": 2 / 3}


def official_ious(truth, predicted):
    """ScanNet's evaluate_semantic_label.py, restated: 40x40 confusion of the vertices whose truth is valid."""
    confusion = np.zeros((40, 40), dtype=np.int64)
    for t, p in zip(truth, predicted):
        if t in VALID_CLASS_IDS:
            confusion[t][p] += 1
    out = {}
    for name, label in zip(CLASS_NAMES, VALID_CLASS_IDS):
        tp = confusion[label, label]
        fn = confusion[label, :].sum() - tp
        fp = confusion[[v for v in VALID_CLASS_IDS if v != label], label].sum()
        out[name] = tp / (tp + fp + fn) if tp + fp + fn else NAN
    return out


def test_benchmark_metric_equals_the_official_evaluator_on_random_scenes():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 40, 5000), rng.integers(0, 40, 5000)
    predicted[rng.random(5000) < 0.5] = truth[rng.random(5000) < 0.5][:1]  # some agreement
    agree = rng.random(5000) < 0.4
    predicted[agree] = truth[agree]
    scores = BenchmarkScores()
    scores.add(truth[:2000], predicted[:2000])
    scores.add(truth[2000:], predicted[2000:])
    expected = official_ious(truth, predicted)
    got = scores.result()["class_iou"]
    for name in CLASS_NAMES:
        assert got[name] == pytest.approx(expected[name], nan_ok=True), name


def test_block_miou_is_acts_mean_over_all_classes():
    blocks = BlockScores()
    blocks.add(np.array([0, 0, 1, IGNORE_INDEX]), np.array([0, 1, 1, 0]))
    # class 0: correct 1 of union 2; class 1: 1 of 2; the 18 others 0 / (0 + 1e-6) = 0
    assert blocks.result()["block_miou"] == pytest.approx(1.0 / 20, rel=1e-5)
    assert blocks.result()["block_accuracy"] == pytest.approx(2 / 3)


def test_class_mapping_and_its_inverse():
    nyu = np.array([0, 1, 2, 13, 39, 40, 41, 65535], dtype=np.uint16)
    assert train_ids(nyu).tolist() == [IGNORE_INDEX, 0, 1, IGNORE_INDEX, 19, IGNORE_INDEX, IGNORE_INDEX,
                                       IGNORE_INDEX]
    assert nyu40_ids(np.arange(20)).tolist() == list(VALID_CLASS_IDS)
    assert (train_ids(nyu40_ids(np.arange(20))) == np.arange(20)).all()
    with pytest.raises(ValueError):
        nyu40_ids(np.array([IGNORE_INDEX]))


def test_prediction_files_round_trip_and_refuse_a_wrong_count(tmp_path):
    ids = nyu40_ids(np.random.default_rng(1).integers(0, 20, 1000))
    path = write_prediction_file(tmp_path, "scene0707_00", ids)
    assert path.name == "scene0707_00.txt"
    lines = path.read_text().splitlines()
    assert len(lines) == 1000 and lines[0] == str(ids[0])  # one id per line, as the evaluator's load_ids reads
    np.testing.assert_array_equal(read_prediction_file(path, 1000), ids)
    with pytest.raises(PcdError, match="1000 predicted values for a mesh of 999 vertices"):
        read_prediction_file(path, 999)
    path.write_text("1\n2\nchair\n")
    with pytest.raises(PcdError, match="line 3 is not an integer label"):
        read_prediction_file(path)


@pytest.mark.parametrize("size,stride", [(1.5, 0.75), (1.5, 1.5), (1.0, 0.3), (20.0, 5.0)])
def test_column_tiling_covers_every_vertex(size, stride):
    rng = np.random.default_rng(2)
    xyz = (rng.random((20000, 3)) * [7.3, 4.1, 2.5] + [-3.0, 11.0, 0.0]).astype(np.float32)
    xyz[:4, :2] = [[-3.0, 11.0], [4.3, 15.1], [-3.0, 15.1], [4.3, 11.0]]  # points on the corners of the extent
    columns = tile_columns(xyz, size, stride)
    covered = np.zeros(len(xyz), dtype=int)
    for members in columns:
        covered[members] += 1
        extent = xyz[members, :2].max(0) - xyz[members, :2].min(0)
        assert (extent <= size + 1e-5).all()
    assert covered.min() >= 1
    if stride < size and len(columns) > 1:
        assert covered.max() > 1  # columns overlap
    if size > 10:
        assert len(columns) == 1


def test_tiling_refuses_a_stride_that_leaves_gaps():
    with pytest.raises(PcdError, match="eval_stride 2.0 must be in"):
        tile_columns(np.zeros((3, 3), np.float32), 1.5, 2.0)


def tiny_model():
    entry = MODELS["semseg"]
    torch.manual_seed(0)
    return entry.build(entry.tiny()).eval()


def test_every_vertex_gets_probabilities_from_each_column_covering_it_and_chunks_change_nothing():
    rng = np.random.default_rng(3)
    xyz = (rng.random((3000, 3)) * [4.0, 3.0, 2.0]).astype(np.float32)
    model = tiny_model()
    common = dict(crop="column", column_size=1.5, stride=0.75, num_points=128, device=torch.device("cpu"))
    probs = scene_probabilities(model, xyz, PCD_FRAME, rng=np.random.default_rng(7), query_chunk=100000,
                                crops_per_batch=8, **common)
    chunked = scene_probabilities(model, xyz, PCD_FRAME, rng=np.random.default_rng(7), query_chunk=97,
                                  crops_per_batch=3, **common)
    covering = np.zeros(len(xyz))
    for members in tile_columns(xyz, 1.5, 0.75):
        covering[members] += 1
    np.testing.assert_allclose(probs.sum(axis=1), covering, rtol=1e-5)  # softmax sums to 1 per covering column
    np.testing.assert_allclose(chunked, probs, rtol=1e-4, atol=1e-6)
    whole = scene_probabilities(model, xyz, PCD_FRAME, rng=np.random.default_rng(7), **{**common, "crop": "scene"})
    np.testing.assert_allclose(whole.sum(axis=1), 1.0, rtol=1e-5)


# --- pcd prepare scannet: every vertex, its label, unlabelled scans ---------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    from pcd.pipeline.synthetic import generate, tiny_config

    root = tmp_path_factory.mktemp("semseg_scans")
    generate(tiny_config(root / "scans", num_scenes=2, num_frames=1, seed=0))
    return root / "scans"


def copy_scan(scans, tmp_path, scene="scene0000_00"):
    import shutil

    target = tmp_path / "scans"
    shutil.copytree(scans / scene, target / scene, ignore=shutil.ignore_patterns("*.sens", "exported"))
    shutil.copy(scans / "scannetv2-labels.combined.tsv", target)
    return target, target / scene


def prepare(scans_dir, out_dir):
    from pcd.trainer.detection.prepare import Config, run

    code = run(Config(scans_dir=scans_dir, out_dir=out_dir))
    return code, json.loads((out_dir / "prepare.json").read_text())


def ply_labels(path):
    return np.asarray(PlyData.read(str(path))["vertex"]["label"])


def test_prepare_writes_every_vertex_aligned_with_its_labels_ply_label(scans, tmp_path):
    source, folder = copy_scan(scans, tmp_path)
    code, record = prepare(source, tmp_path / "out")
    assert code == 0 and record["warnings"] == {} and record["unlabelled"] == []
    vertices = np.load(tmp_path / "out" / "scene0000_00_full_vert.npy")
    labels = np.load(tmp_path / "out" / "scene0000_00_full_sem_label.npy")
    mesh = PlyData.read(str(folder / "scene0000_00_vh_clean_2.ply"))["vertex"]
    assert vertices.shape == (mesh.count, 6) and vertices.dtype == np.float32 and labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, ply_labels(folder / "scene0000_00_vh_clean_2.labels.ply"))
    assert vertices[:, 2].min() == pytest.approx(0.0, abs=1e-4)  # axis-aligned: the floor at z = 0
    np.testing.assert_array_equal(vertices[:, 3], np.asarray(mesh["red"], np.float32))  # mesh colours, not labels'
    assert len(np.load(tmp_path / "out" / "scene0000_00_vert.npy")) <= 50000  # VoteNet's files stay


def test_labels_are_rebuilt_from_the_aggregation_without_labels_ply_and_disagreement_is_counted(scans, tmp_path):
    source, folder = copy_scan(scans, tmp_path)
    labels_ply = folder / "scene0000_00_vh_clean_2.labels.ply"
    truth = ply_labels(labels_ply)
    labels_ply.unlink()
    assert prepare(source, tmp_path / "rebuilt")[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "rebuilt" / "scene0000_00_full_sem_label.npy"), truth)

    _, folder2 = copy_scan(scans, tmp_path / "other")
    ply = PlyData.read(str(folder2 / "scene0000_00_vh_clean_2.labels.ply"), mmap=False)
    ply["vertex"].data["label"][:7] = 0
    changed = int(np.count_nonzero(truth[:7] != 0))
    ply.write(str(folder2 / "scene0000_00_vh_clean_2.labels.ply"))
    code, record = prepare(tmp_path / "other" / "scans", tmp_path / "kept")
    assert code == 0 and changed > 0
    assert f"{changed} of {len(truth)} vertices have another label" in record["warnings"]["scene0000_00"][0]
    assert (np.load(tmp_path / "kept" / "scene0000_00_full_sem_label.npy")[:7] == 0).all()  # labels.ply wins


def test_a_vertex_count_mismatch_between_mesh_and_labels_is_a_one_line_error(scans, tmp_path):
    source, folder = copy_scan(scans, tmp_path)
    path = folder / "scene0000_00_vh_clean_2.labels.ply"
    ply = PlyData.read(str(path), mmap=False)
    from plyfile import PlyElement

    shorter = PlyElement.describe(ply["vertex"].data[:-5], "vertex")
    PlyData([shorter], text=False).write(str(path))
    code, record = prepare(source, tmp_path / "out")
    message = record["failed"]["scene0000_00"]
    assert code == 1 and "\n" not in message
    assert message.startswith(str(path)) and "labels mesh has" in message and "but _vh_clean_2.ply has" in message
    assert not (tmp_path / "out" / "scene0000_00_full_vert.npy").exists()


def test_unlabelled_scans_are_prepared_as_vertices_only(scans, tmp_path):
    source, folder = copy_scan(scans, tmp_path, "scene0001_00")
    for name in ("scene0001_00.aggregation.json", "scene0001_00_vh_clean_2.0.010000.segs.json",
                 "scene0001_00_vh_clean_2.labels.ply"):
        (folder / name).unlink()
    meta = folder / "scene0001_00.txt"
    meta.write_text("".join(line + "\n" for line in meta.read_text().splitlines()
                            if not line.startswith("axisAlignment")))
    code, record = prepare(source, tmp_path / "out")
    assert code == 0 and record["unlabelled"] == ["scene0001_00"]
    written = sorted(p.name for p in (tmp_path / "out").glob("scene0001_00*"))
    assert written == ["scene0001_00_full_vert.npy"]
    mesh = PlyData.read(str(folder / "scene0001_00_vh_clean_2.ply"))["vertex"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / written[0])[:, 0], mesh["x"])  # no alignment
    assert prepare(source, tmp_path / "out")[0] == 0  # a rerun finds it done


def test_pcd_prepare_scannet_and_its_old_name_write_the_same_files(scans, tmp_path):
    import subprocess
    import sys

    source, _ = copy_scan(scans, tmp_path)
    for command in ("scannet", "scannet-detection"):
        result = subprocess.run([sys.executable, "-m", "pcd.cli", "prepare", command, str(source),
                                 str(tmp_path / command)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    for suffix in ("_full_vert.npy", "_full_sem_label.npy", "_vert.npy", "_bbox.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "scannet" / f"scene0000_00{suffix}"),
                                      np.load(tmp_path / "scannet-detection" / f"scene0000_00{suffix}"))
