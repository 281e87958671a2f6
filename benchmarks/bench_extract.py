"""Benchmark: `pcd extract-scannet` (streaming reader, one worker) against the official reader's way of reading.

For each file size it writes one generated ScanNet scene at full resolution (1296x968 JPEG colour, 640x480
zlib depth) of N frames: a handful of distinct views rendered by the generator, cycled to N frames (every
frame is stored in full, so the file has the size of an N-frame scan). Then, each in its own subprocess:

* pcd:      `python -m pcd.cli extract-scannet SCANS OUT --workers 1` (defaults: every 25th frame, 8,192 points)
* baseline: the official ScanNet `SensorData.py` as its common Python-3 ports run it: every frame's colour
            and depth bytes go through `b''.join(struct.unpack('c'*n, f.read(n)))` and are held in a list
            (all frames in memory), then every 25th frame is decoded (zlib + JPEG) and back-projected with
            the same back-projection and voxel+FPS downsampling pcd uses (so only the reading differs).

Wall time, CPU time (user + system) and peak RSS come from `os.wait4` on each child; CPU time is the
fairer measure on a shared machine, where wall time includes waiting for a core. Run: `python benchmarks/bench_extract.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np


FRAME_SKIP = 25
POINTS = 8192


# ---------------------------------------------------------------------------------------------------- baseline


class BaselineFrame:
    """`RGBDFrame.load` of ScanNet's SensorData.py, with the Python-3 `b''.join` of its ports."""

    def load(self, f) -> None:
        self.camera_to_world = np.asarray(struct.unpack("f" * 16, f.read(16 * 4)), dtype=np.float32).reshape(4, 4)
        self.timestamp_color = struct.unpack("Q", f.read(8))[0]
        self.timestamp_depth = struct.unpack("Q", f.read(8))[0]
        self.color_size_bytes = struct.unpack("Q", f.read(8))[0]
        self.depth_size_bytes = struct.unpack("Q", f.read(8))[0]
        self.color_data = b"".join(struct.unpack("c" * self.color_size_bytes, f.read(self.color_size_bytes)))
        self.depth_data = b"".join(struct.unpack("c" * self.depth_size_bytes, f.read(self.depth_size_bytes)))


def baseline(path: Path) -> None:
    """`SensorData.load` (every frame into a list), then every 25th frame decoded and back-projected."""
    import cv2

    from pcd.pipeline.backproject import frame_to_cloud, valid_pixels

    with open(path, "rb") as f:
        version = struct.unpack("I", f.read(4))[0]
        assert version == 4
        strlen = struct.unpack("Q", f.read(8))[0]
        b"".join(struct.unpack("c" * strlen, f.read(strlen)))
        f.read(16 * 4)  # intrinsic_color
        f.read(16 * 4)  # extrinsic_color
        intrinsic_depth = np.asarray(struct.unpack("f" * 16, f.read(16 * 4)), dtype=np.float32).reshape(4, 4)
        f.read(16 * 4)  # extrinsic_depth
        struct.unpack("i", f.read(4))  # color compression type
        struct.unpack("i", f.read(4))  # depth compression type
        struct.unpack("I", f.read(4))  # color width
        struct.unpack("I", f.read(4))  # color height
        depth_width = struct.unpack("I", f.read(4))[0]
        depth_height = struct.unpack("I", f.read(4))[0]
        depth_shift = struct.unpack("f", f.read(4))[0]
        num_frames = struct.unpack("Q", f.read(8))[0]
        frames = []
        for _ in range(num_frames):
            frame = BaselineFrame()
            frame.load(f)
            frames.append(frame)
    clouds = 0
    for index in range(0, len(frames), FRAME_SKIP):
        frame = frames[index]
        if not np.isfinite(frame.camera_to_world).all():
            continue
        depth = np.frombuffer(zlib.decompress(frame.depth_data), dtype=np.uint16).reshape(depth_height, depth_width)
        pixels = valid_pixels(depth)
        if len(pixels) < POINTS:
            continue
        color = cv2.cvtColor(cv2.imdecode(np.frombuffer(frame.color_data, np.uint8), cv2.IMREAD_COLOR),
                             cv2.COLOR_BGR2RGB)
        frame_to_cloud(depth, color, intrinsic_depth[:3, :3], depth_shift, POINTS, 0.02, pixels)
        clouds += 1
    print(f"baseline: {clouds} clouds from {len(frames)} frames")


# ---------------------------------------------------------------------------------------------------- data


def add_sensor_noise(jpeg: bytes, depth: np.ndarray, seed: int) -> tuple[bytes, np.ndarray]:
    """Noise of a real RGB-D sensor, which is what makes real frames 2-3x larger than rendered ones:
    depth sigma = 1.5 mm * z^2 (z in metres, a common structured-light model) and colour sigma = 4 levels."""
    from pcd.pipeline.sens import decode_color, encode_color

    rng = np.random.default_rng(seed)
    z = depth.astype(np.float64) / 1000.0
    noisy = np.where(depth > 0, np.rint(depth + rng.normal(size=depth.shape) * 1.5 * z * z), 0)
    color = decode_color(jpeg, "view").astype(np.float64)
    color += rng.normal(scale=4.0, size=color.shape)
    return encode_color(np.clip(color, 0, 255).astype(np.uint8), 90), np.clip(noisy, 0, 65535).astype(np.uint16)


def write_scene(scans: Path, num_frames: int, views_dir: Path, sensor_noise: bool) -> Path:
    """A full-resolution scene of `num_frames` frames, cycling the generated views in `views_dir`.

    As in a real scan every frame gets its own payload sizes: a JPEG comment segment of (i mod 512) bytes
    and (i mod 1000) more depth dropouts. Identical sizes would flatter the baseline, whose `struct`
    module caches the compiled 'c'*n formats of repeated sizes.
    """
    from pcd.pipeline.sens import RGBDFrame, SensReader, decode_depth, encode_depth, write_sens

    source = next(views_dir.glob("*/*.sens"))
    with SensReader(source) as reader:
        header = reader.header
        views = [(f.camera_to_world, f.color_bytes, decode_depth(f.depth_bytes, header, str(source)))
                 for f in reader.iter_frames()]
    if sensor_noise:
        views = [(pose, *add_sensor_noise(jpeg, depth, k)) for k, (pose, jpeg, depth) in enumerate(views)]
    header.num_frames = num_frames

    def frame(i: int) -> RGBDFrame:
        pose, jpeg, depth = views[i % len(views)]
        comment = f"frame {i:06d} ".encode().ljust(12 + i % 512, b".")
        jpeg = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
        depth = depth.copy()
        depth.reshape(-1)[(np.arange(i % 1000) * 7919) % depth.size] = 0
        return RGBDFrame(i, pose, i, i, jpeg, encode_depth(depth))

    path = scans / "scene0000_00" / "scene0000_00.sens"
    write_sens(path, header, (frame(i) for i in range(num_frames)))
    return path


def generate_views(folder: Path, views: int) -> None:
    """One generated full-resolution scene of `views` distinct frames (1296x968 colour, 640x480 depth)."""
    from pcd.pipeline import synthetic

    synthetic.generate_dataset(folder, num_scenes=1, num_frames=views, seed=0, distinct_views=views,
                               write_exported=False)


# ---------------------------------------------------------------------------------------------------- measuring


def measure(command: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds (user + system), peak RSS in MB, output) of a child process.

    The parent stays small (standard library only): a child's peak RSS counts the memory it shares with
    its parent between fork and exec.
    """
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n{output}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[1000, 2000], help="frames per generated scene")
    parser.add_argument("--views", type=int, default=8, help="distinct generated views, cycled")
    parser.add_argument("--sensor-noise", action="store_true", help="add real-sensor noise (real frame sizes)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)  # internal steps, run in children
    parser.add_argument("--generate-views", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-scene", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline(args.baseline)
    if args.generate_views:
        return generate_views(args.generate_views, args.views)
    if args.write_scene:
        write_scene(args.write_scene, args.frames[0], args.write_scene.parent / "views", args.sensor_noise)
        return None
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    me = [sys.executable, __file__, "--views", str(args.views)] + (["--sensor-noise"] if args.sensor_noise else [])
    measure(me + ["--generate-views", str(work / "views")])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"sensor noise: {'yes' if args.sensor_noise else 'no'}; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| frames | .sens size | pcd wall / CPU | pcd peak RSS | pcd fixed CPU | baseline wall / CPU "
          "| baseline peak RSS | speed-up wall / CPU |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for num_frames in args.frames:
        scans = work / f"scans_{num_frames}"
        measure(me + ["--frames", str(num_frames), "--write-scene", str(scans)])
        path = scans / "scene0000_00" / "scene0000_00.sens"
        out = work / f"out_{num_frames}"
        shutil.rmtree(out, ignore_errors=True)
        ours = measure([sys.executable, "-m", "pcd.cli", "extract-scannet", str(scans), str(out), "--workers", "1"])
        # The same command keeping frame 0 only: start-up and the scan of all frame headers, paid once per run.
        fixed = measure([sys.executable, "-m", "pcd.cli", "extract-scannet", str(scans), str(out) + "_fixed",
                         "--workers", "1", "--frame-skip", str(num_frames)])
        base = measure([sys.executable, __file__, "--baseline", str(path)])
        print(f"| {num_frames} | {path.stat().st_size / 2**20:.0f} MB ({path.stat().st_size / num_frames / 1024:.0f} "
              f"KB/frame) | {ours[0]:.2f} s / {ours[1]:.2f} s | {ours[2]:.0f} MB | {fixed[1]:.2f} s | "
              f"{base[0]:.1f} s / {base[1]:.1f} s | {base[2]:.0f} MB | {base[0] / ours[0]:.1f}x / "
              f"{base[1] / ours[1]:.1f}x |", flush=True)
        shutil.rmtree(str(out) + "_fixed", ignore_errors=True)
        shutil.rmtree(scans)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
