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
