"""`pcd extract-scannet` on generated ScanNet scenes: geometry, frame selection, both input layouts, resume,
workers, bad input, and the torch-free promise of stage one."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pcd.pipeline import extract
from pcd.pipeline.config import build_config
from pcd.pipeline.backproject import (backproject, color_decode_reduction, frame_to_cloud, grid_candidates,
                                     lookup_colors, valid_pixels, voxel_first_points)
from pcd.pipeline.errors import PcdError
from pcd.pipeline.extract import Config, run
from pcd.pipeline.schema import check_sample, decode_sample, iter_shard, read_manifest
from pcd.pipeline.sens import RGBDFrame, SensReader, decode_color, encode_color, encode_depth, write_sens

from pcd.pipeline import synthetic

POINTS = 1024
SCENES = ["scene0000_00", "scene0001_00", "scene0002_00"]
FRAMES = 30


# ---------------------------------------------------------------------------------------------------- helpers


INJECTED = {5: "invalid_pose", 10: "empty", 15: "sparse"}  # into scene0000_00.sens, besides the generator's own


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, synthetic.SceneInfo]:
    """Generated scans (quarter resolution); scene0000_00.sens gets the damaged frames of INJECTED."""
    root = tmp_path_factory.mktemp("scans")
    infos = {info.scene_id: info for info in synthetic.generate_dataset(
        root, len(SCENES), FRAMES, seed=3, color_width=324, color_height=242, depth_width=160, depth_height=120,
        distinct_views=6)}
    assert sorted(infos) == SCENES
    rewrite_sens(root / "scene0000_00" / "scene0000_00.sens", INJECTED)
    return infos


@pytest.fixture(scope="module")
def dataset(generated: dict[str, synthetic.SceneInfo]) -> Path:
    return generated[SCENES[0]].scene_dir.parent


def rewrite_sens(path: Path, edits: dict[int, str]) -> None:
    """Rewrite a .sens file with some frames damaged the way real scans are (or corrupt, for error tests)."""
    with SensReader(path) as reader:
        header = reader.header
        frames = []
        for f in reader.iter_frames():
            edit = edits.get(f.index)
            pose, color, depth = f.camera_to_world, f.color_bytes, f.depth_bytes
            if edit == "invalid_pose":
                pose = np.full((4, 4), -np.inf, dtype=np.float32)
            elif edit == "empty":
                depth = encode_depth(np.zeros((header.depth_height, header.depth_width), np.uint16))
            elif edit == "sparse":
                sparse = np.zeros((header.depth_height, header.depth_width), np.uint16)
                sparse.reshape(-1)[: POINTS - 1] = 1500
                depth = encode_depth(sparse)
            elif edit == "bad_jpeg":
                color = b"\xff\xd8 this is not a JPEG stream" * 10
            elif edit == "bad_zlib":
                depth = b"\x78\x9c definitely not zlib" * 10
            frames.append(RGBDFrame(f.index, pose, f.timestamp_color, f.timestamp_depth, color, depth))
    tmp = path.with_name("rewrite.sens")
    write_sens(tmp, header, frames)
    os.replace(tmp, path)


def config(scans: Path, out: Path, **changes: object) -> Config:
    cfg = Config(scans_dir=scans, out_dir=out, frame_skip=5, points=POINTS, shard_size=2)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def samples(out: Path, scene: str | None = None) -> dict[str, dict]:
    """Decoded, schema-checked samples of every shard in the manifest (of one scene), by key."""
    manifest = read_manifest(out, "extraction")
    found = {}
    for shard in manifest.shards:
        if scene is not None and shard["scene"] != scene:
            continue
        raw = list(iter_shard(out / shard["name"]))
        assert len(raw) == shard["samples"]
        for r in raw:
            sample = decode_sample(r)
            check_sample(sample, "extraction", shard["name"])
            assert sample["__key__"] not in found, "duplicated sample"
            found[sample["__key__"]] = sample
    return found


def folder_digest(out: Path) -> dict[str, str]:
    """sha256 of every visible file of an output folder (shards and manifest)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if not p.name.startswith(".")}


def scene_subset(dataset: Path, tmp: Path, scenes: list[str]) -> Path:
    root = tmp / "scans"
    for scene in scenes:
        shutil.copytree(dataset / scene, root / scene)
    return root


# ---------------------------------------------------------------------------------------------------- back-projection


def test_backprojection_follows_the_pinhole_model_and_colour_lookup_scales_pixel_centres() -> None:
    depth = np.zeros((4, 6), np.uint16)
    depth[1, 2] = 2000
    depth[3, 5] = 500
    k = np.array([[2.0, 0, 2.5], [0, 4.0, 1.5], [0, 0, 1]], np.float32)
    pixels = valid_pixels(depth)
    np.testing.assert_allclose(backproject(depth, k, 1000.0, pixels),
                               [[(2 - 2.5) * 2 / 2, (1 - 1.5) * 2 / 4, 2.0], [(5 - 2.5) * 0.5 / 2, (3 - 1.5) * 0.5 / 4, 0.5]])
    color = np.arange(8 * 13 * 3, dtype=np.uint8).reshape(8, 13, 3)  # 13/6 and 8/4: pixel centres scale
    np.testing.assert_array_equal(lookup_colors(color, (6, 4), pixels), color[[3, 7], [5, 11]])


def test_downsampling_is_exact_in_size_deterministic_and_falls_back_below_the_grid() -> None:
    rng = np.random.default_rng(0)
    depth = rng.integers(800, 4000, (48, 64)).astype(np.uint16)
    color = rng.integers(0, 255, (96, 128, 3)).astype(np.uint8)
    k = np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]], np.float32)
    points, colors = frame_to_cloud(depth, color, k, 1000.0, 3000, voxel_size=0.5)  # grid alone leaves < 3000
    assert points.shape == (3000, 3) and points.dtype == np.float32 and colors.dtype == np.uint8
    assert len(np.unique(points, axis=0)) == 3000
    again, _ = frame_to_cloud(depth, color, k, 1000.0, 3000, voxel_size=0.5)
    np.testing.assert_array_equal(points, again)
    every = backproject(depth, k, 1000.0, valid_pixels(depth))
    assert {tuple(p) for p in points} <= {tuple(p) for p in every}  # real measurements, not averages


@pytest.mark.parametrize("extent, voxel", [(5.0, 0.02), (100.0, 1e-4)])  # packed keys / too wide: np.unique
def test_voxel_grid_keeps_the_first_point_of_every_occupied_voxel(extent: float, voxel: float) -> None:
    rng = np.random.default_rng(1)
    points = (rng.random((2000, 3)) * extent - extent / 2).astype(np.float32)
    points[1000:] = points[:1000] + np.float32(voxel / 3)  # later near-duplicates: often in the same voxel
    _, first = np.unique(np.floor(points / np.float32(voxel)).astype(np.int64), axis=0, return_index=True)
    np.testing.assert_array_equal(voxel_first_points(points, voxel), np.sort(first))


def test_grid_coarsening_leaves_between_n_and_one_and_a_half_n_candidates() -> None:
    """A fine grid over dense points keeps almost all of them; one coarsening sized from that count leaves far
    too many (20k here), the repeated coarsening about 1.4k."""
    rng = np.random.default_rng(2)
    points = np.concatenate([rng.random((60000, 2)), np.zeros((60000, 1))], axis=1).astype(np.float32)
    candidates = grid_candidates(points, 1000, 0.001)
    assert 1000 <= len(candidates) <= 1500
    np.testing.assert_array_equal(candidates, np.unique(candidates))


def test_colour_at_least_twice_the_depth_size_is_decoded_at_half_size() -> None:
    assert color_decode_reduction((1296, 968), (640, 480)) == 2
    assert color_decode_reduction((1296, 968), (660, 480)) == 1 and color_decode_reduction((640, 480), (640, 480)) == 1
    rng = np.random.default_rng(3)
    image = np.repeat(np.repeat(rng.integers(0, 255, (61, 81, 3)), 2, axis=0), 2, axis=1).astype(np.uint8)
    jpeg = encode_color(image[:121, :161], 95)  # odd size: the half-size decode rounds up
    half = decode_color(jpeg, "x", 2)
    assert half.shape == (61, 81, 3)
    assert np.abs(half.astype(int) - image[::2, ::2]).mean() < 8  # 2x2 blocks of one colour keep it


# ---------------------------------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def extracted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extracted")
    assert run(config(dataset, out)) == 0
    return out


def test_points_moved_to_world_lie_on_the_generated_geometry(generated: dict, extracted: Path) -> None:
    found = samples(extracted)
    assert len(found) >= 10
    for key, sample in found.items():
        pose = sample["pose.npy"].astype(np.float64)
        world = sample["points.npy"] @ pose[:3, :3].T + pose[:3, 3]
        info = generated[sample["json"]["scene"]]
        assert synthetic.surface_distance(info, world).max() < 0.01, key
        assert sample["points.npy"].shape == (POINTS, 3) and sample["colors.npy"].shape == (POINTS, 3)


def test_point_colours_are_those_the_colour_camera_sees_at_the_point(generated: dict, extracted: Path) -> None:
    """Projecting each point with the COLOUR intrinsics lands on (about) the pixel its colour came from."""
    for key, sample in samples(extracted, "scene0002_00").items():
        image = decode_color(sample["jpg"], key)
        k = generated["scene0002_00"].color_intrinsics
        x, y, z = sample["points.npy"].T
        u = np.clip(np.rint(k[0, 0] * x / z + k[0, 2]).astype(int), 0, image.shape[1] - 1)
        v = np.clip(np.rint(k[1, 1] * y / z + k[1, 2]).astype(int), 0, image.shape[0] - 1)
        error = np.abs(image[v, u].astype(int) - sample["colors.npy"].astype(int)).max(axis=1)
        assert np.mean(error <= 16) > 0.9, key


def test_full_scannet_resolution_with_the_paper_defaults(tmp_path: Path) -> None:
    """1296x968 colour, 640x480 depth, 8,192 points: the even-pixel lattice and grid coarsening are used here."""
    info, = synthetic.generate_dataset(tmp_path / "scans", 1, 8, seed=5, distinct_views=4, write_exported=False)
    assert run(Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out", frame_skip=2)) == 0
    found = samples(tmp_path / "out")
    assert len(found) >= 2
    for key, sample in found.items():
        assert sample["points.npy"].shape == (8192, 3) and len(np.unique(sample["points.npy"], axis=0)) == 8192
        pose = sample["pose.npy"].astype(np.float64)
        world = sample["points.npy"] @ pose[:3, :3].T + pose[:3, 3]
        assert synthetic.surface_distance(info, world).max() < 0.01, key


def test_samples_carry_the_original_jpeg_pose_intrinsics_and_metadata(dataset: Path, extracted: Path) -> None:
    found = samples(extracted, "scene0001_00")
    with SensReader(dataset / "scene0001_00" / "scene0001_00.sens") as reader:
        frames = {f.index: f for f in reader.iter_frames(lambda i: i % 5 == 0)}
        k = reader.header.intrinsic_depth[:3, :3]
        k_color = reader.header.intrinsic_color[:3, :3]
    assert len(found) >= 4 and {int(key[-6:]) for key in found} <= set(frames)
    for key, sample in found.items():
        frame = frames[int(key[-6:])]
        assert sample["jpg"] == frame.color_bytes
        np.testing.assert_array_equal(sample["pose.npy"], frame.camera_to_world)
        np.testing.assert_array_equal(sample["intrinsics.npy"], k)
        np.testing.assert_array_equal(sample["color_intrinsics.npy"], k_color)
        assert sample["json"] == {"scene": "scene0001_00", "frame": frame.index, "schema_version": 1,
                                  "valid_depth_pixels": sample["json"]["valid_depth_pixels"],
                                  "source_file": "scene0001_00/scene0001_00.sens"}
        assert sample["json"]["valid_depth_pixels"] >= POINTS


def test_frame_selection_and_skipped_frames_are_recorded(generated: dict, extracted: Path) -> None:
    manifest = read_manifest(extracted, "extraction")
    for scene_id, info in generated.items():
        injected = INJECTED if scene_id == "scene0000_00" else {}
        selected = list(range(0, FRAMES, 5))
        invalid = [i for i in selected if i in info.invalid_pose_frames or injected.get(i) == "invalid_pose"]
        empty = [i for i in selected if i not in invalid and (i in info.empty_depth_frames or injected.get(i) == "empty")]
        sparse = [i for i in selected if injected.get(i) == "sparse"]
        kept = [i for i in selected if i not in invalid + empty + sparse]
        scene = manifest.scenes[scene_id]
        assert scene["frames_skipped"] == {"invalid_pose": invalid, "empty_depth": empty, "too_few_valid_pixels": sparse}
        assert scene["frames_kept"] == kept and scene["samples"] == len(kept)
        assert scene["frames_selected"] == len(selected) and scene["frames_in_scan"] == FRAMES
        assert sorted(samples(extracted, scene_id)) == [f"{scene_id}_{i:06d}" for i in kept]
    assert manifest.scenes["scene0000_00"]["frames_skipped"]["too_few_valid_pixels"] == [15]
    assert manifest.options["frame_skip"] == 5 and manifest.options["points"] == POINTS
    assert set(manifest.scenes) == set(SCENES)
    for shard in manifest.shards:
        assert shard["name"].startswith(shard["scene"] + "-")
        assert hashlib.sha256((extracted / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        assert shard["samples"] <= 2
    assert manifest.num_samples == sum(s["samples"] for s in manifest.scenes.values())


def test_exported_folder_gives_the_same_samples_as_the_sens_file(dataset: Path, extracted: Path,
                                                                   tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    shutil.copytree(dataset / "scene0001_00", scans / "scene0001_00", ignore=shutil.ignore_patterns("*.sens"))
    assert run(config(scans, tmp_path / "out")) == 0
    from_export, from_sens = samples(tmp_path / "out"), samples(extracted, "scene0001_00")
    assert sorted(from_export) == sorted(from_sens)
    for key, sample in from_sens.items():
        other = from_export[key]
        for member in ("points.npy", "colors.npy", "pose.npy", "intrinsics.npy"):
            np.testing.assert_array_equal(other[member], sample[member], err_msg=f"{key}.{member}")
        assert other["jpg"] == sample["jpg"]
        assert {**other["json"], "source_file": ""} == {**sample["json"], "source_file": ""}


def test_two_workers_write_the_same_bytes_as_one(dataset: Path, extracted: Path, tmp_path: Path) -> None:
    assert run(config(dataset, tmp_path / "two", workers=2)) == 0
    assert folder_digest(tmp_path / "two") == folder_digest(extracted)


def test_resume_after_interruption_gives_the_uninterrupted_result(dataset: Path, extracted: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real_write = extract.ShardWriter.write
    calls = {"n": 0}

    def dying_write(self, key, members):  # the process dies in the middle of the second scene
        calls["n"] += 1
        if key.startswith("scene0001_00") and calls["n"] > 5:
            raise KeyboardInterrupt
        real_write(self, key, members)

    monkeypatch.setattr(extract.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(config(dataset, out))
    monkeypatch.setattr(extract.ShardWriter, "write", real_write)
    assert list(read_manifest(out, "extraction").scenes) == ["scene0000_00"]
    # what a kill -9 leaves: a temporary shard and a complete shard of the unfinished scene
    (out / ".scene0001_00-000001.tar.tmp-99999").write_bytes(b"half a tar")
    shutil.copy(out / "scene0000_00-000000.tar", out / "scene0001_00-000000.tar")
    before = folder_digest(out)
    assert run(config(dataset, out)) == 0
    assert all(folder_digest(out)[name] == digest for name, digest in before.items() if name.startswith("scene0000"))
    assert folder_digest(out) == folder_digest(extracted)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert run(config(dataset, out)) == 0  # a finished folder: nothing to do, nothing changes
    assert folder_digest(out) == folder_digest(extracted)


def test_resume_after_kill_9_of_the_command_gives_the_uninterrupted_result(dataset: Path, extracted: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pcd.cli", "extract-scannet", str(dataset), str(out), "--frame-skip", "5",
               "--points", str(POINTS), "--shard-size", "2"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:  # kill as soon as the first scene is done
        if (out / "manifest.json").exists():
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    child.wait()
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert folder_digest(out) == folder_digest(extracted)


def test_other_options_or_a_second_writer_in_the_same_folder_are_refused(dataset: Path, extracted: Path) -> None:
    before = folder_digest(extracted)
    with pytest.raises(PcdError, match="frame_skip=5 there, 4 now"):
        run(config(dataset, extracted, frame_skip=4))
    with open(extracted / extract.LOCK_NAME, "w") as lock:  # another extract-scannet holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(PcdError, match="another pcd extract-scannet is writing there"):
            run(config(dataset, extracted))
    assert folder_digest(extracted) == before


# ---------------------------------------------------------------------------------------------------- bad input


def _patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _name_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[4:12])[0]


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size * 2 // 3)


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "truncated .sens file"),
    "version": (lambda p: _patch_bytes(p, 0, struct.pack("<I", 3)), "unsupported .sens version 3"),
    "compression": (lambda p: _patch_bytes(p, 12 + _name_length(p) + 256, struct.pack("<i", 7)),
                    "unsupported colour compression type 7"),
    "jpeg": (lambda p: rewrite_sens(p, {10: "bad_jpeg"}), "corrupt colour image"),
    "zlib": (lambda p: rewrite_sens(p, {20: "bad_zlib"}), "corrupt depth"),
}


def test_bad_input_fails_its_scene_alone_with_one_line_and_keeps_what_was_written(dataset: Path,
                                                                                   tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    good, also_good = "scene0002_00", "scene0000_00"
    for scene in (good, also_good):
        shutil.copytree(dataset / scene, scans / scene)
    bad_scenes = {}
    for i, (kind, (damage, problem)) in enumerate(BAD_INPUTS.items()):
        scene = f"scene01{i:02d}_00"
        (scans / scene).mkdir()
        shutil.copy(dataset / "scene0001_00" / "scene0001_00.sens", scans / scene / f"{scene}.sens")
        damage(scans / scene / f"{scene}.sens")
        bad_scenes[scene] = problem
    no_intrinsics = "scene0200_00"
    shutil.copytree(dataset / "scene0001_00", scans / no_intrinsics, ignore=shutil.ignore_patterns("*.sens"))
    for exported in scans.joinpath(no_intrinsics).rglob("intrinsic_depth.txt"):
        exported.unlink()
    bad_scenes[no_intrinsics] = "missing depth intrinsics"
    bad_png = "scene0203_00"
    shutil.copytree(dataset / "scene0001_00", scans / bad_png, ignore=shutil.ignore_patterns("*.sens"))
    (scans / bad_png / "exported" / "depth" / "5.png").write_bytes(b"\x89PNG but cut short")
    bad_scenes[bad_png] = "is not a 16-bit grey PNG"
    (scans / "scene0201_00").mkdir()  # neither a .sens file nor an export
    bad_scenes["scene0201_00"] = "no scene0201_00.sens and no exported folder"
    bad_scenes["scene0202_00"] = "is not a folder"  # listed, but not there

    out = tmp_path / "out"
    cli = [sys.executable, "-m", "pcd.cli", "extract-scannet", str(scans), str(out), "--frame-skip", "5",
           "--points", str(POINTS), "--shard-size", "2"]
    first = subprocess.run(cli + ["--scenes", good], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    written = folder_digest(out)

    result = subprocess.run(cli + ["--scenes", ",".join([*bad_scenes, good, also_good])], capture_output=True,
                            text=True)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == len(bad_scenes), result.stderr
    for scene, problem in bad_scenes.items():
        line = next(line for line in lines if f"scene {scene}" in line)
        assert problem in line, line
    assert f"1 scene(s) extracted, 1 already done, {len(bad_scenes)} failed" in result.stdout
    manifest = read_manifest(out, "extraction")
    assert list(manifest.scenes) == [also_good, good] and sorted(manifest.extra["failed"]) == sorted(bad_scenes)
    after = folder_digest(out)
    assert all(after[name] == digest for name, digest in written.items() if name != "manifest.json")
    assert all(name.startswith((good, also_good)) or name == "manifest.json" for name in after)
    assert len(samples(out)) == manifest.num_samples


FAULTS_PROBE = """
import resource, sys
import numpy as np
from pcd.pipeline.extract import reuse_freed_memory
if sys.argv[1] == "tuned":
    reuse_freed_memory()
def frame():  # like a kept frame: a few MB of arrays alive together, all freed at its end
    arrays = [np.ones(1 << 18, np.float32) for _ in range(8)]
for _ in range(3):  # warm up: the first arrays are new memory either way
    frame()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    frame()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="extraction tunes glibc's malloc (mallopt); other C libraries keep their defaults")
def test_freed_frame_arrays_are_reused_without_new_page_faults() -> None:
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "tuned")}
    assert faults["default"] > 20 * 1000  # each frame faults its 8 MB (2,048 pages) in again
    assert faults["tuned"] < 200


def test_the_command_starts_numpy_without_an_openblas_thread_pool(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pcd.cli import app

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    result = CliRunner().invoke(app, ["extract-scannet", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_split_file_selects_scenes_and_stage_one_does_not_import_torch(dataset: Path, tmp_path: Path) -> None:
    split = tmp_path / "scannetv2_mini.txt"
    split.write_text("scene0002_00\n\nscene0001_00\n")
    cfg = config(dataset, tmp_path / "out", split=split)
    assert extract.select_scenes(cfg) == ["scene0002_00", "scene0001_00"]
    generated_split = dataset / "scannetv2_train.txt"  # written by the generator, in ScanNet's format
    assert extract.select_scenes(config(dataset, tmp_path / "out", split=generated_split)) == \
        generated_split.read_text().split()
    assert extract.select_scenes(config(dataset, tmp_path / "out")) == SCENES
    with pytest.raises(PcdError, match="either a split file or a scene list"):
        extract.select_scenes(config(dataset, tmp_path / "out", split=split, scenes=["scene0001_00"]))
    code = "import pcd.pipeline.extract, sys; assert 'torch' not in sys.modules and 'webdataset' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dataset_preset_matches_the_defaults() -> None:
    from importlib import resources

    preset = json.loads(resources.files("pcd.manifests").joinpath("scannet.json").read_text())
    assert preset["extract"] == {"frame_skip": Config.frame_skip, "points": Config.points}
    tiny = build_config(Config, "extract-scannet", "tiny")
    assert (tiny.frame_skip, tiny.points) == (5, 1024)


@pytest.mark.parametrize("damage", ["bad_zlib", "bad_jpeg"])
def test_a_corrupt_frame_decoded_ahead_fails_its_scene_with_the_same_line_and_no_hang(dataset: Path, tmp_path: Path,
                                                                                    damage: str) -> None:
    """Frames are decoded in a background thread; its error must surface in order, as the same one line."""
    scans = scene_subset(dataset, tmp_path, ["scene0001_00", "scene0002_00"])
    path = scans / "scene0001_00" / "scene0001_00.sens"
    rewrite_sens(path, {15: damage})  # kept frames 0, 5 and 10 come before it, 20 and 25 after
    with SensReader(path) as reader:
        frame = next(reader.iter_frames(lambda i: i == 15))
    if damage == "bad_zlib":
        try:
            zlib.decompress(frame.depth_bytes)
        except zlib.error as exc:
            problem = f"corrupt depth (zlib: {exc})"
        expected = f"scene scene0001_00 ({path}) frame 15: {problem}"
    else:
        expected = (f"scene scene0001_00 frame 15: corrupt colour image (not a decodable JPEG, "
                    f"{len(frame.color_bytes)} bytes)")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pcd.cli", "extract-scannet", str(scans), str(out),
                             "--frame-skip", "5", "--points", str(POINTS), "--shard-size", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [f"error: {expected}"]
    manifest = read_manifest(out, "extraction")
    assert list(manifest.scenes) == ["scene0002_00"] and manifest.extra["failed"] == {"scene0001_00": expected}
    assert all(name.startswith("scene0002_00") or name == "manifest.json" for name in folder_digest(out))
    in_process = extract.extract_scene("scene0001_00", config(scans, out))  # and in process: no thread left
    assert in_process.error == expected and in_process.shards == []
    assert not any(t.name == "pcd-read-ahead" for t in threading.enumerate())
