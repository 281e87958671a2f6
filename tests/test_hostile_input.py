"""Issue 10, security and malformed input: no shell from a file name, nothing read or written outside a shard
folder, no unbounded decompression, and one line (not a traceback) for every malformed file."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from pcd.pipeline import cache_teacher, extract
from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import MANIFEST_NAME, ShardWriter, read_manifest, sample_key
from pcd.pipeline.sens import decode_color, decode_depth, encode_color
from pcd.trainer import data
from training_shards import TEACHER, write_training_shards
from test_sens import make_frames, make_header, write_sens


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    from pcd.cli import main

    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    return exited.value.code, " ".join(capsys.readouterr().err.split())


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    change(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


# --- a shard name must never reach a shell ------------------------------------------------------------------

def test_a_pipe_shard_name_in_a_manifest_runs_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    shards = tmp_path / "shards"
    write_training_shards(shards, {"scene0000_00": 4})
    marker = shards / "marker"
    hostile = "pipe:touch marker; cat scene0000_00.tar"  # a file of that name exists beside the real shard
    (shards / hostile).write_bytes((shards / "scene0000_00.tar").read_bytes())
    edit_manifest(shards, lambda m: m["shards"][0].update(name=hostile))
    monkeypatch.chdir(shards)  # `cd SHARDS && pcd pretrain . RUN`: the relative url was `pipe:...`
    code, err = run_cli("pretrain", ".", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu",
                        "--set", "runtime.workers=0", "--set", "optim.epochs=1", capsys=capsys)
    assert not marker.exists()
    assert code == 2 and "is not a plain file name" in err and "pipe:touch" in err


def test_local_shards_are_opened_without_webdataset_url_openers(tmp_path: Path, monkeypatch) -> None:
    """Even a name that passed every check is opened with open(): webdataset's gopen (pipe:, GOPEN_REWRITE) is
    never called."""
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")
    write_training_shards(tmp_path, {"scene0000_00": 4})

    def refuse(*args, **kwargs):
        raise AssertionError("webdataset's URL opener was called")

    monkeypatch.setattr(gopen_module, "gopen", refuse)
    selection = data.select_shards(tmp_path, None)
    assert all(Path(url).is_absolute() for url in selection.urls)
    batch = next(iter(data.train_loader(selection, batch_size=2, num_points=64, seed=0, epoch=0, rank=0,
                                        world_size=1, workers=0, shuffle_buffer=0)))
    assert batch["points"].shape == (2, 64, 3)


@pytest.mark.parametrize("scene", ["pipe:touch x", "scene 1", "../scene", "a/b", ".hidden"])
def test_scene_ids_that_are_not_plain_names_are_refused_at_extraction(tmp_path: Path, scene: str) -> None:
    (tmp_path / "scans" / "scene0000_00").mkdir(parents=True)
    with pytest.raises(PcdError, match="is not a plain name"):
        extract.select_scenes(extract.Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out",
                                             scenes=["scene0000_00", scene]))


def test_a_scene_folder_named_pipe_is_refused(tmp_path: Path) -> None:
    for name in ("scene0000_00", "pipe:touch x"):
        (tmp_path / "scans" / name).mkdir(parents=True)
    with pytest.raises(PcdError, match="'pipe:touch x' is not a plain name"):
        extract.select_scenes(extract.Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out"))


# --- shard names are plain file names, resolved against the manifest's own folder ---------------------------

@pytest.mark.parametrize("name", ["../../x.tar", "/tmp/x.tar", "sub/x.tar", "pipe:cat x.tar", "file:x.tar",
                                  ".x.tar.tmp-1", "x.tar ", "x.zip", 7, None])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name) -> None:
    write_training_shards(tmp_path, {"scene0000_00": 2})
    edit_manifest(tmp_path, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(PcdError, match=r"manifest.json: shard name .* is not a plain file name"):
        read_manifest(tmp_path, "training")


def test_cache_teacher_writes_nothing_outside_its_output_folder(tmp_path: Path) -> None:
    extracted = tmp_path / "deep" / "extracted"
    writer = ShardWriter(extracted / "scene0000_00-000000.tar")
    writer.write(sample_key("scene0000_00", 0), {"jpg": encode_color(np.zeros((8, 8, 3), np.uint8))})
    entry = {**writer.close(), "scene": "scene0000_00", "name": "../../escaped.tar"}
    (extracted / MANIFEST_NAME).write_text(json.dumps(
        {"schema_version": 1, "kind": "extraction", "options": {}, "shards": [entry], "scenes": {}}))
    with pytest.raises(PcdError, match="'../../escaped.tar' is not a plain file name"):
        cache_teacher.run(cache_teacher.Config(extracted_dir=extracted, out_dir=tmp_path / "deep" / "out",
                                               teacher="tiny-random", workers=0))
    assert not (tmp_path / "escaped.tar").exists() and not (tmp_path / "deep" / "out").exists()


# --- bounded decompression -----------------------------------------------------------------------------------

BOMB_SCRIPT = """
import resource, sys
from pathlib import Path
from pcd.pipeline.errors import PcdError
from pcd.pipeline.sens import decode_depth
from test_sens import make_header
payload = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_depth(payload, make_header(1), "scene0000_00 frame 0")
    outcome = "decoded"
except PcdError as exc:
    outcome = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024, outcome)
"""


def test_a_zlib_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    inflated_mib = 128  # inflates to 128 MiB from about 130 kB
    packer = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    payload = b"".join(packer.compress(chunk) for _ in range(inflated_mib)) + packer.flush()
    (tmp_path / "bomb.zlib").write_bytes(payload)
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(tmp_path / "bomb.zlib")], capture_output=True,
                            text=True, cwd=Path(__file__).parent, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_growth_mib, outcome = result.stdout.split(" ", 1)
    assert "corrupt depth (inflates beyond" in outcome
    assert int(peak_growth_mib) < 16, f"decompression grew the peak memory by {peak_growth_mib} MiB"


def test_a_depth_frame_of_the_right_size_still_decodes() -> None:
    depth = np.arange(20 * 15, dtype=np.uint16).reshape(15, 20)
    assert (decode_depth(zlib.compress(depth.tobytes()), make_header(1), "x") == depth).all()
    with pytest.raises(PcdError, match="truncated"):  # every pixel there, the checksum cut off
        decode_depth(zlib.compress(depth.tobytes())[:-4], make_header(1), "x")


def test_a_jpeg_larger_than_the_scan_colour_size_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    import cv2

    frames = [f for f, _ in make_frames(3)]
    frames[0].color_bytes = encode_color(np.zeros((300, 400, 3), np.uint8))  # the header says 40 x 30
    write_sens(tmp_path / "scans" / "scene0000_00" / "scene0000_00.sens", make_header(3), iter(frames))
    decoded_sizes = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: decoded_sizes.append(len(buf)) or real_imdecode(buf, flags))
    cfg = extract.Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out", frame_skip=1, points=10)
    assert extract.run(cfg) != 0
    failed = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["failed"]
    assert "colour image is 400x300, larger than the scan's 40x30" in failed["scene0000_00"]
    assert len(frames[0].color_bytes) not in decoded_sizes
    with pytest.raises(PcdError, match="larger than"):
        decode_color(frames[0].color_bytes, "x", max_size=(40, 30))


# --- data that must not be silently wrong --------------------------------------------------------------------

def sens_scene(tmp_path: Path, **header_changes) -> Path:
    frames = [f for f, _ in make_frames(4)]
    write_sens(tmp_path / "scans" / "scene0000_00" / "scene0000_00.sens", make_header(4, **header_changes),
               iter(frames))
    return tmp_path / "scans"


def test_absurd_depth_intrinsics_fail_the_scene_naming_it(tmp_path: Path) -> None:
    intrinsics = np.diag([1e30, 17.8, 1, 1]).astype(np.float32)
    intrinsics[:2, 2] = [9.5, 7.0]
    scans = sens_scene(tmp_path, intrinsic_depth=intrinsics)
    out = tmp_path / "out"
    assert extract.run(extract.Config(scans_dir=scans, out_dir=out, frame_skip=1, points=10)) == 1
    failed = json.loads((out / MANIFEST_NAME).read_text())["failed"]["scene0000_00"]
    assert failed.startswith("scene scene0000_00: implausible depth intrinsics") and "fx 1e+30" in failed
    assert not list(out.glob("*.tar"))


def test_a_non_finite_cloud_fails_its_scene_naming_the_frame(tmp_path: Path, monkeypatch) -> None:
    scans = sens_scene(tmp_path)
    real = extract.frame_to_cloud

    def poisoned(*args, **kwargs):
        points, colors = real(*args, **kwargs)
        points[3] = np.nan
        return points, colors

    monkeypatch.setattr(extract, "frame_to_cloud", poisoned)
    out = tmp_path / "out"
    assert extract.run(extract.Config(scans_dir=scans, out_dir=out, frame_skip=1, points=10)) == 1
    failed = json.loads((out / MANIFEST_NAME).read_text())["failed"]["scene0000_00"]
    assert failed.startswith("scene scene0000_00 frame 0: the back-projected cloud has non-finite points")


def test_an_extraction_that_keeps_no_frame_warns_and_fails(tmp_path: Path, capsys) -> None:
    scans = sens_scene(tmp_path)
    out = tmp_path / "out"
    assert extract.run(extract.Config(scans_dir=scans, out_dir=out, frame_skip=1, points=5000)) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: scene scene0000_00 yielded no sample: all 4 selected frames were dropped" in err
    assert f"error: {out / MANIFEST_NAME} holds no sample" in err
    assert json.loads((out / MANIFEST_NAME).read_text())["num_samples"] == 0
    kept = tmp_path / "kept"
    assert extract.run(extract.Config(scans_dir=scans, out_dir=kept, frame_skip=1, points=10)) == 0
    assert extract.run(extract.Config(scans_dir=scans, out_dir=kept, frame_skip=1, points=10)) == 0  # all done


def rewrite_first_sample(folder: Path, change) -> None:
    """Apply `change` to the decoded members of the first sample of the first shard; keep the manifest in step."""
    from pcd.pipeline.schema import decode_member, iter_shard, sha256_file

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    entry = manifest["shards"][0]
    path = folder / entry["name"]
    samples = list(iter_shard(path))
    writer = ShardWriter(path)
    for i, raw in enumerate(samples):
        members = {k: decode_member(k, v) for k, v in raw.items() if not k.startswith("__")}
        if i == 0:
            change(members)
        writer.write(raw["__key__"], members)
    entry.update(writer.close())
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert entry["sha256"] == sha256_file(path)


class _ObjectArray:
    """Stands for a pickled object array in a hostile shard: written with allow_pickle, never read with it."""


def object_npy() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([_ObjectArray()], dtype=object), allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("member, value, message", [
    ("prefix.npy", lambda a: a.astype(np.float64), "prefix.npy is float64, the training schema stores float16"),
    ("points.npy", lambda a: np.where(np.arange(len(a))[:, None] == 5, np.nan, a).astype(np.float32),
     "points.npy holds non-finite values"),
])
def test_pretraining_refuses_a_sample_of_the_wrong_dtype_or_not_finite(tmp_path: Path, member, value,
                                                                       message) -> None:
    write_training_shards(tmp_path, {"scene0000_00": 3})
    rewrite_first_sample(tmp_path, lambda m: m.update({member: value(m[member])}))
    loader = data.train_loader(data.select_shards(tmp_path, None), batch_size=2, num_points=64, seed=0, epoch=0,
                               rank=0, world_size=1, workers=0, shuffle_buffer=0)
    with pytest.raises(PcdError) as caught:
        next(iter(loader))
    assert str(caught.value) == f"{tmp_path / 'scene0000_00.tar'}: sample scene0000_00_000000: {message}" + (
        " (NaN or infinity)" if "finite" in message else "")


def test_an_object_array_in_a_training_shard_is_one_line_naming_shard_and_key(tmp_path: Path) -> None:
    write_training_shards(tmp_path, {"scene0000_00": 3})
    path = tmp_path / "scene0000_00.tar"
    import io
    import tarfile

    members = []
    with tarfile.open(path) as tar:  # swap the first sample's points.npy for a pickled object array
        for info in tar:
            payload = tar.extractfile(info).read()
            if info.name == "scene0000_00_000000.points.npy":
                payload = object_npy()
                info.size = len(payload)
            members.append((info, payload))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))
    edit_manifest(tmp_path, lambda m: m["shards"][0].update(bytes=path.stat().st_size))
    loader = data.train_loader(data.select_shards(tmp_path, None), batch_size=2, num_points=64, seed=0, epoch=0,
                               rank=0, world_size=1, workers=0, shuffle_buffer=0)
    with pytest.raises(PcdError, match=rf"^{path}: member scene0000_00_000000.points.npy cannot be decoded "
                                       r"\(Object arrays cannot be loaded when allow_pickle=False\)$"):
        next(iter(loader))


# --- malformed files are one line ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(shards={"name": "x.tar"}), "'shards' is a dict, not a JSON list"),
    (lambda m: m["shards"][0].pop("name"), r"shards\[0\] has no 'name'"),
    (lambda m: m["shards"][0].pop("samples"), "shard scene0000_00.tar has no sample count"),
    (lambda m: m["shards"][0].update(samples="3"), "shard scene0000_00.tar has no sample count"),
    (lambda m: m["shards"].append(3), r"shards\[1\] is a int, not an object"),
    (lambda m: m.update(scenes=[]), "'scenes' is a list, not a JSON object"),
])
def test_a_manifest_that_breaks_its_schema_is_one_line(tmp_path: Path, change, message) -> None:
    write_training_shards(tmp_path, {"scene0000_00": 2})
    edit_manifest(tmp_path, change)
    with pytest.raises(PcdError, match=f"^{tmp_path / MANIFEST_NAME}: {message}"):
        data.select_shards(tmp_path, None)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(PcdError, match="a JSON list, not an object"):
        read_manifest(tmp_path)


def test_a_sample_json_that_is_not_an_object_is_one_line(tmp_path: Path) -> None:
    from teacher_helpers import make_extraction

    make_extraction(tmp_path / "extracted", {"scene0000_00": 2})
    rewrite_first_sample(tmp_path / "extracted", lambda m: m.update(json=["not", "an", "object"]))
    with pytest.raises(PcdError, match=r"shard-000000.tar: scene0000_00_000000.json is a list, not a JSON object"):
        cache_teacher.run(cache_teacher.Config(extracted_dir=tmp_path / "extracted", out_dir=tmp_path / "out",
                                               teacher="tiny-random", workers=0))


def test_an_os_error_without_a_file_name_is_one_line_not_a_traceback(monkeypatch, capsys) -> None:
    import errno
    import os

    from pcd.trainer import export

    def disk_fails(cfg):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(export, "run", disk_fails)
    code, err = run_cli("export", "somewhere", capsys=capsys)
    assert code == 2 and err == "error: Input/output error"


# --- run folders ---------------------------------------------------------------------------------------------

def test_a_refused_init_leaves_the_new_run_folder_as_it_was(tmp_path: Path) -> None:
    from pcd.pipeline.config import build_config
    from pcd.trainer import pretrain

    write_training_shards(tmp_path / "shards", {"scene0000_00": 4})
    bad_init = tmp_path / "init.pth"
    bad_init.write_bytes(b"not a checkpoint")
    run_dir = tmp_path / "run"
    cfg = build_config(pretrain.Config, "pretrain", "tiny", [
        f"shards_dir={tmp_path / 'shards'}", f"run_dir={run_dir}", f"init={bad_init}", "runtime.workers=0",
        "runtime.progress=false"])
    with pytest.raises(PcdError, match="init.pth"):
        pretrain.run(cfg)
    assert not run_dir.exists()


def test_an_exported_depth_png_larger_than_the_first_frame_is_refused_before_decoding(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    import cv2

    from pcd.pipeline.scan_source import ExportedScanSource, export_sens

    scans = sens_scene(tmp_path)
    exported = tmp_path / "exported" / "scene0000_00"
    export_sens(scans / "scene0000_00" / "scene0000_00.sens", exported)
    big = exported / "depth" / "3.png"
    cv2.imwrite(str(big), np.ones((300, 400), np.uint16))
    source = ExportedScanSource("scene0000_00", exported)
    read = []
    real_imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda path, *flags: read.append(path) or real_imread(path, *flags))
    frames = {frame.index: frame for frame in source.iter_frames()}
    assert frames[0].depth().shape == (15, 20)
    with pytest.raises(PcdError, match=rf"scene0000_00 frame 3: depth {big} is 400x300, other frames are 20x15"):
        frames[3].depth()
    assert str(big) not in read
