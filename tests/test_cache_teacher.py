"""`pcd cache-teacher`: training shards from extraction shards, resume, teacher identity, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline import cache_teacher
from pcd.pipeline.cache_teacher import Config, run
from pcd.pipeline.errors import PcdError
from pcd.pipeline.parts import Part
from pcd.pipeline.schema import (MANIFEST_NAME, Manifest, ShardWriter, decode_member, iter_shard, read_manifest,
                                 sha256_file)
from pcd.pipeline.teacher import OPENAI_MEAN, OPENAI_STD, TINY_CLIP_MODEL, load_teacher
from pcd.pipeline.torchvision_compat import import_open_clip
from teacher_helpers import clipcap_mlp_state, extraction_sample, make_extraction, tiny_clip_state, write_tokenizer

SCENES = {"scene0000_00": 5, "scene0001_00": 3, "scene0002_00": 2}


LOCK = cache_teacher.LOCK_NAME  # left in the folder on purpose (see pcd.pipeline.locks)


def decoded(path: Path) -> list[dict]:
    return [{k: (v if k.startswith("__") else decode_member(k, v)) for k, v in raw.items()} for raw in iter_shard(path)]


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.tar"))}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("extracted")
    make_extraction(folder, SCENES)
    return folder


@pytest.fixture(scope="module")
def reference_out(extracted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "train"
    assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=0)) == 0
    return out


def test_training_shards_mirror_the_extraction(extracted, reference_out):
    ext = read_manifest(extracted, "extraction")
    out = read_manifest(reference_out, "training")
    assert [s["name"] for s in out.shards] == [s["name"] for s in ext.shards]
    assert [s["scene"] for s in out.shards] == list(SCENES)
    assert [s["samples"] for s in out.shards] == list(SCENES.values())
    assert out.scenes == ext.scenes and out.extra["extraction"]["options"] == ext.options
    teacher = out.extra["teacher"]
    assert teacher["random"] is True and teacher["name"] == "tiny-random"
    assert (teacher["prefix_length"], teacher["prefix_dim"], teacher["clip_dim"]) == (4, 32, 64)
    assert [p.name for p in reference_out.glob(".*")] == [LOCK]  # no temporary files left, only the part's lock

    # every member but the JPEG is copied; prefix and clip are the teacher's on the independently preprocessed frame
    tiny = load_teacher("tiny-random")
    reference_transform = import_open_clip().image_transform(64, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    for entry in ext.shards:
        inputs, outputs = decoded(extracted / entry["name"]), decoded(reference_out / entry["name"])
        assert [s["__key__"] for s in outputs] == [s["__key__"] for s in inputs]
        for src, dst in zip(inputs, outputs):
            assert set(dst) - {"__key__", "__url__"} == {"points.npy", "colors.npy", "pose.npy", "intrinsics.npy",
                                                         "prefix.npy", "clip.npy", "json"}
            for name in ("points.npy", "colors.npy", "pose.npy", "intrinsics.npy"):
                assert np.array_equal(src[name], dst[name]) and src[name].dtype == dst[name].dtype
            assert dst["json"]["frame"] == src["json"]["frame"] and dst["json"]["teacher"]["random"] is True
            assert dst["prefix.npy"].dtype == np.float16 and dst["prefix.npy"].shape == (4, 32)
            assert dst["clip.npy"].dtype == np.float16 and dst["clip.npy"].shape == (64,)
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(src["jpg"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            with torch.no_grad():
                embedding = tiny.clip.encode_image(reference_transform(Image.fromarray(rgb))[None])
                prefix = tiny.clipcap.prefix(embedding)
            assert np.allclose(dst["clip.npy"], embedding[0].numpy(), atol=2e-3, rtol=1e-3)
            assert np.allclose(dst["prefix.npy"], prefix[0].numpy(), atol=2e-3, rtol=1e-3)


def test_decode_workers_give_identical_shards(extracted, reference_out, tmp_path):
    out = tmp_path / "train"
    assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=2)) == 0
    assert shard_digests(out) == shard_digests(reference_out)


def test_resume_after_an_interruption_gives_the_same_output(extracted, reference_out, tmp_path, monkeypatch):
    out = tmp_path / "train"
    original = cache_teacher._Cacher.process

    def interrupt_in_second_shard(self, chunk, crops):
        if chunk.shard == 1:
            raise KeyboardInterrupt
        return original(self, chunk, crops)

    monkeypatch.setattr(cache_teacher._Cacher, "process", interrupt_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=0))
    partial = read_manifest(out, "training")
    assert [s["name"] for s in partial.shards] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK, MANIFEST_NAME, "shard-000000.tar"]
    first = (out / "shard-000000.tar").stat()

    monkeypatch.setattr(cache_teacher._Cacher, "process", original)
    (out / ".shard-000001.tar.tmp-99999").write_bytes(b"left by a killed run")
    assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=0)) == 0
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # kept, not rewritten
    assert shard_digests(out) == shard_digests(reference_out)
    assert [p.name for p in out.glob(".*")] == [LOCK]
    manifest = read_manifest(out, "training")
    keys = [s["__key__"] for entry in manifest.shards for s in iter_shard(out / entry["name"])]
    assert len(keys) == len(set(keys)) == sum(SCENES.values()) == manifest.num_samples

    # a damaged output shard is redone, a complete run is a no-op
    (out / "shard-000002.tar").write_bytes(b"damaged")
    assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=0)) == 0
    assert shard_digests(out) == shard_digests(reference_out)


def test_output_of_another_teacher_or_options_is_refused(extracted, reference_out, tmp_path):
    out = tmp_path / "train"
    (out).mkdir()
    for path in reference_out.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = shard_digests(out)
    model, clip_state = tiny_clip_state()
    torch.save(clip_state, tmp_path / "clip.pt")
    torch.save(clipcap_mlp_state(clip_dim=64, prefix_length=4, width=32, vocab_size=100), tmp_path / "cc.pt")
    with pytest.raises(PcdError, match="written by another teacher"):
        run(Config(extracted_dir=extracted, out_dir=out, teacher="clipcap", clip=tmp_path / "clip.pt",
                   clipcap=tmp_path / "cc.pt", clip_model=TINY_CLIP_MODEL, workers=0))
    with pytest.raises(PcdError, match="written with other options"):
        run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", keep_images=True, workers=0))
    assert shard_digests(out) == before

    # the real-checkpoint teacher writes its identity (checkpoint names and sha256s) into a fresh folder
    fresh = tmp_path / "fresh"
    assert run(Config(extracted_dir=extracted, out_dir=fresh, teacher="clipcap", clip=tmp_path / "clip.pt",
                      clipcap=tmp_path / "cc.pt", clip_model=TINY_CLIP_MODEL, workers=0)) == 0
    teacher = json.loads((fresh / MANIFEST_NAME).read_text())["teacher"]
    assert teacher["random"] is False and teacher["clipcap_sha256"] == sha256_file(tmp_path / "cc.pt")
    assert teacher["clip_sha256"] == sha256_file(tmp_path / "clip.pt") and teacher["mapping"] == "mlp"


def test_captions_and_kept_images(extracted, tmp_path):
    write_tokenizer(tmp_path / "tok")
    out = tmp_path / "train"
    assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", captions=True,
                      tokenizer=tmp_path / "tok", keep_images=True, workers=0)) == 0
    manifest = read_manifest(out, "training")
    assert manifest.options["output"] == {"captions": True, "caption_decoding": "greedy", "keep_images": True}
    for entry in manifest.shards:
        for src, dst in zip(decoded(extracted / entry["name"]), decoded(out / entry["name"])):
            assert isinstance(dst["caption.txt"], str) and dst["caption.txt"]
            assert dst["jpg"] == src["jpg"]


def _broken_extraction(folder: Path, breaker) -> Path:
    """Two shards; `breaker(members)` spoils the second sample of the second shard."""
    rng = np.random.default_rng(5)
    shards = []
    for index, scene in enumerate(["scene0000_00", "scene0001_00"]):
        writer = ShardWriter(folder / f"shard-{index:06d}.tar")
        for frame in range(3):
            members = extraction_sample(rng, scene, frame)
            if index == 1 and frame == 1:
                breaker(members)
            writer.write(f"{scene}_{frame:06d}", members)
        shards.append({**writer.close(), "scene": scene})
    Manifest(kind="extraction", options={}, shards=shards, scenes={}, extra={}).write(folder)
    return folder


@pytest.mark.parametrize("breaker,message", [
    (lambda m: m.update(jpg=m["jpg"][: len(m["jpg"]) // 2]), r"scene0001_00_000001\.jpg is not a decodable JPEG"),
    (lambda m: m.pop("points.npy"), r"scene0001_00_000001 is not a extraction sample \(missing points\.npy\)"),
    (lambda m: m.pop("jpg"), r"scene0001_00_000001 has no jpg"),
])
def test_bad_input_is_named_and_finished_shards_are_kept(tmp_path, breaker, message):
    extracted = _broken_extraction(tmp_path / "ext", breaker)
    out = tmp_path / "train"
    with pytest.raises(PcdError, match=r"shard-000001\.tar.*" + message):
        run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=0))
    assert [s["name"] for s in read_manifest(out, "training").shards] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK, MANIFEST_NAME, "shard-000000.tar"]


def test_inputs_that_are_not_an_extraction(tmp_path, extracted, reference_out):
    with pytest.raises(PcdError, match=r"no manifest"):
        run(Config(extracted_dir=tmp_path, out_dir=tmp_path / "o", teacher="tiny-random", workers=0))
    with pytest.raises(PcdError, match=r"a 'training' manifest, expected 'extraction'"):
        run(Config(extracted_dir=reference_out, out_dir=tmp_path / "o", teacher="tiny-random", workers=0))
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in extracted.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "shard-000001.tar").write_bytes(b"x" * 100)
    with pytest.raises(PcdError, match=r"shard-000001\.tar: not a readable tar shard"):
        run(Config(extracted_dir=copy, out_dir=tmp_path / "o1", teacher="tiny-random", workers=0))
    (copy / "shard-000001.tar").write_bytes((extracted / "shard-000002.tar").read_bytes())
    with pytest.raises(PcdError, match=r"shard-000001\.tar: sha256 differs"):
        run(Config(extracted_dir=copy, out_dir=tmp_path / "o2", teacher="tiny-random", workers=2))
    assert [s["name"] for s in read_manifest(tmp_path / "o2", "training").shards] == ["shard-000000.tar"]
    with pytest.raises(PcdError, match=r"missing\.pt: CLIP checkpoint not found"):
        run(Config(extracted_dir=extracted, out_dir=tmp_path / "o", clip=tmp_path / "missing.pt",
                   clipcap=tmp_path / "missing-cc.pt", workers=0))


def test_cli(extracted, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["cache-teacher", str(extracted), str(tmp_path / "out"), "--teacher", "tiny-random",
                                 "--batch-size", "4", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out", "training").extra["teacher"]["random"] is True
    result = runner.invoke(app, ["cache-teacher", str(extracted), str(tmp_path / "out2")])
    assert result.exit_code == 2 and "needs --clip" in result.output


def test_torchrun_ranks_cache_disjoint_parts_that_merge_into_the_whole_output(extracted, reference_out, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "train"
    for rank in (0, 1):  # what torchrun --nproc-per-node 2 sets for each of its two processes
        for name, value in (("WORLD_SIZE", 2), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", 2)):
            monkeypatch.setenv(name, str(value))
        assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", batch_size=2, workers=0)) == 0
        part = json.loads((out / f"manifest.part-{rank}-of-2.json").read_text())
        assert part["part"] == {"index": rank, "count": 2, "finished": True}
        assert {s["scene"] for s in part["shards"]} == {s for s in SCENES if Part(rank, 2).holds(s)}
    monkeypatch.delenv("WORLD_SIZE")
    merged, whole = read_manifest(out, "training"), read_manifest(reference_out, "training")
    assert merged.shards == whole.shards and merged.scenes == whole.scenes
    assert merged.extra["teacher"] == whole.extra["teacher"] and whole.extra["teacher"]["precision"] == "fp32"
    assert shard_digests(out) == shard_digests(reference_out)
    result = CliRunner().invoke(app, ["manifest", "merge", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / MANIFEST_NAME).read_text()) == merged.to_json()
