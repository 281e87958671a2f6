"""The shard schema: explicit decoding, atomic shards with honest sha256, and manifest checks."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import (Manifest, ShardWriter, check_sample, decode_member, decode_sample, iter_shard,
                                 read_manifest, sample_key)


def extraction_members(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"jpg": b"\xff\xd8fakejpeg", "points.npy": rng.normal(size=(n, 3)).astype(np.float32),
            "colors.npy": rng.integers(0, 255, (n, 3), dtype=np.uint8), "pose.npy": np.eye(4, dtype=np.float32),
            "intrinsics.npy": np.eye(3, dtype=np.float32), "json": {"scene": "scene0000_00", "frame": 25}}


def test_shard_round_trip_and_sha(tmp_path):
    writer = ShardWriter(tmp_path / "a-000000.tar")
    written = {}
    for frame in (0, 25):
        key = sample_key("scene0000_00", frame)
        written[key] = extraction_members(seed=frame)
        writer.write(key, written[key])
    assert not (tmp_path / "a-000000.tar").exists(), "a shard must not appear under its final name before close"
    entry = writer.close()
    data = (tmp_path / "a-000000.tar").read_bytes()
    assert entry == {"name": "a-000000.tar", "samples": 2, "sha256": hashlib.sha256(data).hexdigest(),
                     "bytes": len(data)}
    samples = [decode_sample(raw) for raw in iter_shard(tmp_path / "a-000000.tar")]
    assert [s["__key__"] for s in samples] == ["scene0000_00_000000", "scene0000_00_000025"]
    for sample in samples:
        check_sample(sample, "extraction", "a-000000.tar")
        expected = written[sample["__key__"]]
        np.testing.assert_array_equal(sample["points.npy"], expected["points.npy"])
        assert sample["jpg"] == expected["jpg"] and sample["json"] == expected["json"]


def test_identical_content_gives_identical_bytes(tmp_path):
    digests = []
    for name in ("x.tar", "y.tar"):
        w = ShardWriter(tmp_path / name)
        w.write("k_000000", extraction_members())
        digests.append(w.close()["sha256"])
    assert digests[0] == digests[1]


def test_pickled_npy_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object))  # np.save pickles object arrays by default
    with pytest.raises(ValueError):
        decode_member("points.npy", buf.getvalue())
    with pytest.raises(ValueError, match="no decoder"):
        decode_member("pyd", pickle.dumps({"a": 1}))


def test_check_sample_names_the_problem():
    sample = decode_sample({k: v for k, v in _encoded(extraction_members()).items()})
    sample["__key__"] = "s_000000"
    sample["points.npy"] = sample["points.npy"].astype(np.float64)
    with pytest.raises(PcdError, match="shard.tar: s_000000.points.npy has float64"):
        check_sample(sample, "extraction", "shard.tar")
    del sample["pose.npy"]
    with pytest.raises(PcdError, match="missing pose.npy"):
        check_sample(sample, "extraction", "shard.tar")


def _encoded(members):
    from pcd.pipeline.schema import encode_member
    return {k: encode_member(k, v) for k, v in members.items()}


def test_manifest_checks(tmp_path):
    Manifest(kind="extraction", options={"points": 16}, shards=[{"name": "a.tar", "samples": 3, "sha256": "0"}],
             scenes={}, extra={"note": 1}).write(tmp_path)
    manifest = read_manifest(tmp_path, "extraction")
    assert manifest.num_samples == 3 and manifest.extra == {"note": 1}
    with pytest.raises(PcdError, match="a 'extraction' manifest, expected 'training'"):
        read_manifest(tmp_path, "training")
    with pytest.raises(PcdError, match="no manifest"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(PcdError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_truncated_shard_is_a_one_line_error(tmp_path):
    w = ShardWriter(tmp_path / "t.tar")
    w.write("k_000000", extraction_members(n=2000))
    w.close()
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(PcdError, match="t.tar: not a readable tar shard"):
        list(iter_shard(tmp_path / "t.tar"))
    assert tarfile  # stdlib reader, no webdataset needed
