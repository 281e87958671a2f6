"""The streaming .sens reader/writer and the scan-source interface over .sens files and exported folders."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pcd.pipeline import sens as sens_module
from pcd.pipeline.errors import PcdError
from pcd.pipeline.scan_source import ExportedScanSource, SensScanSource, export_sens, open_scan
from pcd.pipeline.sens import (COLOR_JPEG, DEPTH_ZLIB, RGBDFrame, SensHeader, SensReader, decode_color,
                               decode_depth, encode_color, encode_depth, write_sens)

COLOR_W, COLOR_H, DEPTH_W, DEPTH_H = 40, 30, 20, 15


def make_header(num_frames: int, **changes: object) -> SensHeader:
    intrinsic_color = np.diag([36.1, 36.1, 1, 1]).astype(np.float32)
    intrinsic_color[:2, 2] = [19.5, 14.5]
    intrinsic_depth = np.diag([17.8, 17.8, 1, 1]).astype(np.float32)
    intrinsic_depth[:2, 2] = [9.5, 7.0]
    fields = dict(version=4, sensor_name="StructureSensor", intrinsic_color=intrinsic_color,
                  extrinsic_color=np.eye(4, dtype=np.float32), intrinsic_depth=intrinsic_depth,
                  extrinsic_depth=np.eye(4, dtype=np.float32), color_compression=COLOR_JPEG,
                  depth_compression=DEPTH_ZLIB, color_width=COLOR_W, color_height=COLOR_H, depth_width=DEPTH_W,
                  depth_height=DEPTH_H, depth_shift=1000.0, num_frames=num_frames)
    fields.update(changes)
    return SensHeader(**fields)


def make_frames(num_frames: int, seed: int = 0) -> list[tuple[RGBDFrame, np.ndarray]]:
    """Frames with real JPEG colour and zlib depth; frame 1 has an all -inf pose, frame 2 empty depth."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(num_frames):
        pose = np.eye(4, dtype=np.float32)
        pose[:3, 3] = rng.normal(size=3)
        if i == 1:
            pose[:] = -np.inf
        depth = rng.integers(0, 5000, size=(DEPTH_H, DEPTH_W)).astype(np.uint16)
        if i == 2:
            depth[:] = 0
        color = rng.integers(0, 256, size=(COLOR_H, COLOR_W, 3)).astype(np.uint8)
        frames.append((RGBDFrame(i, pose, 1000 + i, 2000 + i, encode_color(color), encode_depth(depth)), depth))
    return frames


def write_scene(tmp_path: Path, num_frames: int = 5, name: str = "scene0000_00") -> tuple[Path, list]:
    frames = make_frames(num_frames)
    path = tmp_path / name / f"{name}.sens"
    write_sens(path, make_header(num_frames), (f for f, _ in frames))
    return path, frames


def test_round_trip_keeps_header_poses_depth_and_jpeg_bytes(tmp_path: Path) -> None:
    path, frames = write_scene(tmp_path)
    header = make_header(len(frames))
    with SensReader(path) as reader:
        got = reader.header
        for name in ("version", "sensor_name", "color_compression", "depth_compression", "color_width",
                     "color_height", "depth_width", "depth_height", "depth_shift", "num_frames"):
            assert getattr(got, name) == getattr(header, name), name
        for name in ("intrinsic_color", "extrinsic_color", "intrinsic_depth", "extrinsic_depth"):
            np.testing.assert_array_equal(getattr(got, name), getattr(header, name))
        read = list(reader.iter_frames())
    assert [f.index for f in read] == list(range(len(frames)))
    for frame, (expected, depth) in zip(read, frames):
        np.testing.assert_array_equal(frame.camera_to_world, expected.camera_to_world)
        assert (frame.timestamp_color, frame.timestamp_depth) == (expected.timestamp_color, expected.timestamp_depth)
        assert frame.color_bytes == expected.color_bytes
        np.testing.assert_array_equal(decode_depth(frame.depth_bytes, got, "x"), depth)
        assert decode_color(frame.color_bytes, "x").shape == (COLOR_H, COLOR_W, 3)
    assert np.isneginf(read[1].camera_to_world).all()


def test_keep_filter_yields_only_kept_frames(tmp_path: Path) -> None:
    path, _ = write_scene(tmp_path, num_frames=7)
    with SensReader(path) as reader:
        assert [f.index for f in reader.iter_frames(lambda i: i % 3 == 0)] == [0, 3, 6]
        assert [f.index for f in reader.iter_frames(lambda i: i == 5)] == [5]  # iterating twice restarts


def big_payload_file(tmp_path: Path, num_frames: int, payload: int) -> Path:
    """A .sens file whose frames carry `payload` bytes of colour each (never decoded by the reader)."""
    rng = np.random.default_rng(1)
    depth = encode_depth(np.zeros((DEPTH_H, DEPTH_W), np.uint16))
    blob = rng.integers(0, 256, payload, dtype=np.uint8).tobytes()
    frames = (RGBDFrame(i, np.eye(4, dtype=np.float32), 0, 0, blob, depth) for i in range(num_frames))
    path = tmp_path / "big.sens"
    write_sens(path, make_header(num_frames), frames)
    return path


def test_skipped_frames_payloads_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload, num_frames = 50_000, 40
    path = big_payload_file(tmp_path, num_frames, payload)
    requested = []

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, size=-1):
            data = self._f.read(size)
            requested.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

    real_open = open
    monkeypatch.setattr(sens_module, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    with SensReader(path) as reader:
        kept = [f.index for f in reader.iter_frames(lambda i: i % 10 == 0)]
    assert kept == [0, 10, 20, 30]
    # Headers of all frames plus the payloads of the 4 kept ones: nowhere near the 40 payloads.
    assert sum(requested) < 400 + num_frames * 96 + 4 * (payload + 200)


def test_memory_stays_about_one_frame(tmp_path: Path) -> None:
    payload, num_frames = 200_000, 60  # 12 MB file
    path = big_payload_file(tmp_path, num_frames, payload)
    tracemalloc.start()
    try:
        with SensReader(path) as reader:
            count = sum(len(f.color_bytes) > 0 for f in reader.iter_frames())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == num_frames
    assert peak < 3 * payload


def corrupt(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_headers_raise_pcd_error_naming_the_file(tmp_path: Path) -> None:
    path, _ = write_scene(tmp_path, num_frames=3)
    good = path.read_bytes()
    name_len = struct.unpack_from("<Q", good, 4)[0]
    compression_at = 12 + name_len + 256
    cases = {
        "version": good[:0] + struct.pack("<I", 3) + good[4:],
        "colour compression": good[:compression_at] + struct.pack("<i", 1) + good[compression_at + 4:],
        "depth compression": good[:compression_at + 4] + struct.pack("<i", 2) + good[compression_at + 8:],
        "truncated": good[:100],
    }
    for expected, data in cases.items():
        bad = corrupt(tmp_path / f"bad_{expected.replace(' ', '_')}.sens", data)
        with pytest.raises(PcdError) as info:
            SensReader(bad)
        message = str(info.value)
        assert str(bad) in message and "\n" not in message
        assert expected in message or expected.split()[0] in message


def test_truncated_frames_name_the_frame(tmp_path: Path) -> None:
    path, frames = write_scene(tmp_path, num_frames=4)
    good = path.read_bytes()
    end_of_frame_2 = len(good) - 8 - sum(96 + len(f.color_bytes) + len(f.depth_bytes) for f, _ in frames[2:])
    cases = {
        "inside frame 2 payload": good[:end_of_frame_2 + 96 + 10],
        "inside frame 2 header": good[:end_of_frame_2 + 50],
    }
    for label, data in cases.items():
        bad = corrupt(tmp_path / "bad.sens", data)
        with SensReader(bad) as reader, pytest.raises(PcdError) as info:
            list(reader.iter_frames(lambda i: i == 0))  # even when frame 2 would be skipped
        assert str(bad) in str(info.value) and "frame 2" in str(info.value), label


def test_frame_count_larger_than_file_is_truncation(tmp_path: Path) -> None:
    frames = make_frames(3)
    path = tmp_path / "short.sens"
    with pytest.raises(ValueError):  # the writer refuses a header that lies about the frame count
        write_sens(path, make_header(5), (f for f, _ in frames))
    assert not path.exists() and not list(tmp_path.iterdir())
    good_path = tmp_path / "good.sens"
    write_sens(good_path, make_header(3), (f for f, _ in frames))
    data = bytearray(good_path.read_bytes()[:-8])  # drop the IMU count so frame 3 starts at EOF
    frames_size = sum(96 + len(f.color_bytes) + len(f.depth_bytes) for f, _ in frames)
    struct.pack_into("<Q", data, len(data) - frames_size - 8, 5)  # the header's frame count
    bad = corrupt(tmp_path / "lying.sens", bytes(data))
    with SensReader(bad) as reader, pytest.raises(PcdError, match=r"lying\.sens.*frame 3"):
        list(reader.iter_frames())


def test_corrupt_payloads_raise_pcd_error() -> None:
    header = make_header(1)
    with pytest.raises(PcdError, match="scene0001_00 frame 7.*zlib"):
        decode_depth(b"not zlib", header, "scene0001_00 frame 7")
    with pytest.raises(PcdError, match="frame 7.*expected"):
        decode_depth(encode_depth(np.zeros((3, 3), np.uint16)), header, "frame 7")
    with pytest.raises(PcdError, match="frame 8"):
        decode_color(b"\xff\xd8garbage", "frame 8")


def test_open_scan_reads_sens_and_exported_folder_identically(tmp_path: Path) -> None:
    path, frames = write_scene(tmp_path, num_frames=6)
    scene_dir = path.parent
    export_sens(path, scene_dir / "exported", keep=lambda i: i % 2 == 0)  # sparse names 0, 2, 4
    with open_scan(scene_dir) as sens_source, open_scan(scene_dir, layout="exported") as exported:
        assert isinstance(sens_source, SensScanSource) and isinstance(exported, ExportedScanSource)
        assert exported.num_frames == 3 and sens_source.num_frames == 6
        for source in (sens_source, exported):
            assert source.name == "scene0000_00"
            assert source.depth_size == (DEPTH_W, DEPTH_H) and source.color_size == (COLOR_W, COLOR_H)
            assert source.depth_shift == 1000.0
            np.testing.assert_array_equal(source.depth_intrinsics, make_header(1).intrinsic_depth[:3, :3])
            np.testing.assert_array_equal(source.color_intrinsics, make_header(1).intrinsic_color[:3, :3])
        keep = lambda i: i in (0, 2, 4)  # noqa: E731
        a, b = list(sens_source.iter_frames(keep)), list(exported.iter_frames(keep))
    assert [f.index for f in a] == [f.index for f in b] == [0, 2, 4]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.pose, y.pose)
        assert x.color_jpeg == y.color_jpeg
        np.testing.assert_array_equal(x.depth(), y.depth())
        np.testing.assert_array_equal(x.depth(), frames[x.index][1])
    # The exported folder alone (no .sens) is found at the scene root too.
    alone = tmp_path / "scene0001_00"
    (scene_dir / "exported").rename(alone)
    with open_scan(alone) as source:
        assert isinstance(source, ExportedScanSource) and source.num_frames == 3


def test_open_scan_errors_name_the_scene(tmp_path: Path) -> None:
    empty = tmp_path / "scene0002_00"
    empty.mkdir()
    with pytest.raises(PcdError, match="scene0002_00.*no scene0002_00.sens"):
        open_scan(empty)
    path, _ = write_scene(tmp_path, num_frames=2, name="scene0003_00")
    export_sens(path, path.parent / "exported")
    (path.parent / "exported" / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(PcdError, match="scene0003_00.*missing depth intrinsics"):
        open_scan(path.parent, layout="exported")
    export_sens(path, path.parent / "exported")
    (path.parent / "exported" / "pose" / "1.txt").unlink()
    with pytest.raises(PcdError, match="scene0003_00: frame 1 is incomplete"):
        open_scan(path.parent, layout="exported")
    export_sens(path, path.parent / "exported")
    (path.parent / "exported" / "depth" / "1.png").write_bytes(b"junk")
    with open_scan(path.parent, layout="exported") as source:
        frames = list(source.iter_frames())
        with pytest.raises(PcdError, match="scene0003_00 frame 1: depth"):
            frames[1].depth()
    (path.parent / f"{path.stem}.sens").write_bytes(b"\x04\x00")
    with pytest.raises(PcdError, match="scene0003_00.sens: truncated"):
        open_scan(path.parent)
