"""`pcd caption`: the student's prefix decoded by ClipCap's GPT-2 through the teacher's decoding code; cloud inputs;
bad input. The student is the session's tiny export (random tiny teacher layout: prefix 2 x 16), the ClipCap a tiny
checkpoint in the released MLP layout with that prefix shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline.clipcap import load_clipcap, load_tokenizer
from pcd.pipeline.errors import PcdError
from pcd.pipeline.teacher import Teacher
from pcd.trainer import caption
from pcd.trainer.clouds import read_cloud
from teacher_helpers import clipcap_mlp_state, write_tokenizer
from training_shards import write_training_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> tuple[Path, Path]:
    """(ClipCap checkpoint with a 2 x 16 prefix over 8-d CLIP embeddings, tokenizer folder)."""
    root = tmp_path_factory.mktemp("decoder")
    vocab = write_tokenizer(root / "tokenizer")
    torch.save(clipcap_mlp_state(clip_dim=8, prefix_length=2, width=16, vocab_size=vocab), root / "clipcap.pt")
    return root / "clipcap.pt", root / "tokenizer"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("caption_shards")
    write_training_shards(folder, {"scene0700_00": 2, "scene0701_00": 1}, points=200, seed=5)
    return folder


def read_shard_member(shards: Path, key: str, member: str) -> np.ndarray:
    from pcd.pipeline.schema import decode_member, iter_shard

    for shard in sorted(shards.glob("*.tar")):
        for raw in iter_shard(shard):
            if raw["__key__"] == key:
                return decode_member(member, raw[member])
    raise KeyError(key)


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_captions_decode_the_students_prefix_as_the_teacher_decodes(tiny_export, decoder, shards, tmp_path):
    clipcap_path, tokenizer_dir = decoder
    cloud = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", cloud)
    np.save(tmp_path / "b.npy", cloud)  # the same cloud twice: the same prefix, so the same caption
    out = tmp_path / "captions.jsonl"
    result = runner.invoke(app, ["caption", str(tiny_export), str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                                 f"{shards}#scene0700_00_000001", "--clipcap", str(clipcap_path),
                                 "--tokenizer", str(tokenizer_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["origin"] for r in records] == ["file", "file", "frame"]
    assert records[0]["caption"] == records[1]["caption"]
    assert all(r["caption"] for r in records)

    # The same prefix through the teacher's own decoding (Teacher.captions, as cache-teacher calls it).
    student = caption.load_student(tiny_export)
    prefix = student.prefixes(caption.student_input(read_cloud(str(tmp_path / "a.npy")), student, student.num_points,
                                                    0)[None], torch.device("cpu"))
    teacher = Teacher(clip=torch.nn.Identity(), clipcap=load_clipcap(clipcap_path), identity={})
    tokenizer = load_tokenizer(tokenizer_dir)
    assert teacher.captions(prefix.numpy(), tokenizer) == [records[0]["caption"]]
    beam = caption.decode_captions(teacher.clipcap, prefix, tokenizer, beam_size=3)
    assert beam == teacher.captions(prefix.numpy(), tokenizer, beam_size=3)


def test_student_input_is_the_pretraining_frame(tiny_export, shards):
    """A shard sample is rotated by its pose into the gravity frame and normalised into the unit sphere."""
    cloud = read_cloud(f"{shards}#scene0700_00_000000")
    assert cloud.origin == "frame" and cloud.xyz.shape == (200, 3)
    student = caption.load_student(tiny_export)
    x = caption.student_input(cloud, student, 128, seed=0)
    assert x.shape == (128, 3)
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.isclose(np.linalg.norm(x, axis=1).max(), 1, atol=1e-5)
    assert student.num_points == 128  # the tiny export's pre-training points per frame
    assert student.prefix_shape == (2, 16) and student.frame.name == "gravity-unit-sphere"
    # the same frame as pre-training feeds it: data.py's sampling and normalisation of the same points
    from pcd.trainer.normalize import camera_to_gravity, normalize_points

    chosen = np.random.default_rng(0).choice(200, 128, replace=False)
    assert np.allclose(x, normalize_points(cloud.xyz[chosen])[0], atol=1e-6)
    key = "scene0700_00_000000"
    points, pose = (read_shard_member(shards, key, member) for member in ("points.npy", "pose.npy"))
    assert np.allclose(cloud.xyz, camera_to_gravity(points, pose), atol=1e-6)


def test_cloud_files_and_scene_regions(tmp_path):
    o3d = pytest.importorskip("open3d")
    xyz = np.random.default_rng(1).uniform(0, 1, size=(50, 3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pcd.colors = o3d.utility.Vector3dVector(np.full((50, 3), 0.5))
    o3d.io.write_point_cloud(str(tmp_path / "c.ply"), pcd)
    o3d.io.write_point_cloud(str(tmp_path / "c.pcd"), pcd)
    for name in ("c.ply", "c.pcd"):
        cloud = read_cloud(str(tmp_path / name))
        assert np.allclose(cloud.xyz, xyz, atol=1e-5) and (cloud.rgb == 128).all()
    np.savez(tmp_path / "c.npz", points=np.concatenate([xyz, np.ones((50, 3))], 1))
    y_up = read_cloud(str(tmp_path / "c.npz"), up_axis="y")
    assert np.allclose(y_up.xyz, np.stack([xyz[:, 0], -xyz[:, 2], xyz[:, 1]], 1), atol=1e-6)
    assert (y_up.rgb == 255).all()

    scene = tmp_path / "detection"
    scene.mkdir()
    vertices = np.concatenate([np.random.default_rng(2).uniform(0, 4, size=(400, 3)), np.zeros((400, 3))], 1)
    np.save(scene / "scene0000_00_vert.npy", vertices.astype(np.float32))
    np.save(scene / "scene0000_00_bbox.npy", np.array([[1, 1, 1, 1, 1, 1, 5]], dtype=np.float32))
    region = read_cloud(f"{scene}#scene0000_00:object=0")
    assert region.origin == "region"
    assert ((region.xyz >= 0.5) & (region.xyz <= 1.5)).all()
    inside = np.all((vertices[:, :3] >= 0.5) & (vertices[:, :3] <= 1.5), axis=1).sum()
    assert len(region.xyz) == inside
    box = read_cloud(f"{scene}#scene0000_00:box=0,0,0,2,2,4")
    assert len(box.xyz) == np.all(vertices[:, :3] <= [2, 2, 4], axis=1).sum()
    with pytest.raises(PcdError, match="no object 3"):
        read_cloud(f"{scene}#scene0000_00:object=3")


@pytest.mark.parametrize("array, problem", [
    (np.zeros((0, 3), np.float32), "empty"),
    (np.array([[0, 0, np.nan], [1, 1, 1]], np.float32), "NaN"),
    (np.zeros((5, 4), np.float32), "shape"),
])
def test_bad_cloud_files_are_one_line_errors(tmp_path, array, problem):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(PcdError, match=problem) as info:
        read_cloud(str(path))
    assert str(path) in str(info.value)
    (tmp_path / "empty.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
                                        "property float z\nend_header\n")
    with pytest.raises(PcdError, match="empty"):
        read_cloud(str(tmp_path / "empty.ply"))


def test_bad_weights_decoder_and_tokenizer(tiny_export, decoder, tmp_path):
    clipcap_path, tokenizer_dir = decoder
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))

    def invoke(weights: Path, clipcap_file: Path = clipcap_path, tokenizer: Path = tokenizer_dir):
        return runner.invoke(app, ["caption", str(weights), str(tmp_path / "a.npy"), "--clipcap", str(clipcap_file),
                                   "--tokenizer", str(tokenizer)])

    # an export without a prefix head (a reconstruction run)
    recon = tmp_path / "recon-export"
    shutil.copytree(tiny_export, recon)
    document = json.loads((recon / "backbone.json").read_text())
    document["objective"], document["heads"] = "reconstruct", None
    (recon / "backbone.json").write_text(json.dumps(document))
    result = invoke(recon)
    assert result.exit_code == 2
    assert "no prefix head" in one_line(result.output) and "backbone.json" in one_line(result.output)

    # a ClipCap checkpoint of another layout (prefix 3 x 16)
    other = tmp_path / "other.pt"
    torch.save(clipcap_mlp_state(clip_dim=8, prefix_length=3, width=16, vocab_size=400), other)
    result = invoke(tiny_export, clipcap_file=other)
    assert result.exit_code == 2 and f"{other}: ClipCap prefix is 3x16" in one_line(result.output)

    # a tokenizer folder without merges.txt
    partial = tmp_path / "tok"
    partial.mkdir()
    shutil.copy(tokenizer_dir / "vocab.json", partial / "vocab.json")
    result = invoke(tiny_export, tokenizer=partial)
    assert result.exit_code == 2 and f"{partial}: no merges.txt" in one_line(result.output)


@pytest.fixture(scope="module")
def random_teacher_export(tmp_path_factory) -> dict[str, Path]:
    """A student distilled (2 steps) from the random tiny teacher as `pcd cache-teacher --teacher tiny-random` runs
    it, on one scene; a second scene of the extraction stays held out."""
    from pcd.pipeline import cache_teacher
    from pcd.pipeline.config import build_config
    from pcd.trainer import export, pretrain
    from teacher_helpers import make_extraction

    root = tmp_path_factory.mktemp("random_teacher")
    write_tokenizer(root / "tokenizer")
    make_extraction(root / "extracted", {"scene0800_00": 2, "scene0801_00": 2})
    assert cache_teacher.run(cache_teacher.Config(
        extracted_dir=root / "extracted", out_dir=root / "shards", teacher="tiny-random", captions=True,
        tokenizer=root / "tokenizer", workers=0)) == 0
    (root / "train.txt").write_text("scene0800_00\n")
    cfg = build_config(pretrain.Config, "pretrain", "tiny", [
        f"shards_dir={root / 'shards'}", f"run_dir={root / 'run'}", f"split={root / 'train.txt'}", "num_points=64",
        "optim.batch_size=2", "optim.epochs=1", "runtime.max_steps_per_epoch=2", "runtime.workers=0",
        "runtime.progress=false", "runtime.eval_every=0"])
    assert pretrain.run(cfg) == 0
    assert export.run(export.Config(run_dir=root / "run")) == 0
    return {"run": root / "run", "extracted": root / "extracted", "shards": root / "shards",
            "tokenizer": root / "tokenizer"}


def test_evaluate_captions_on_held_out_frames(random_teacher_export, tmp_path):
    from pcd.trainer import evaluate_captions
    from pcd.trainer.render import read_png

    paths = random_teacher_export
    out = tmp_path / "captions.json"
    result = runner.invoke(app, ["evaluate", "captions", str(paths["run"]), "--shards", str(paths["extracted"]),
                                 "--teacher", "tiny-random", "--tokenizer", str(paths["tokenizer"]),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["scenes"] == ["scene0801_00"] and document["frames"] == 2  # the held-out scene only
    metrics = document["metrics"]
    assert metrics["prefix_mse"] > 0 and -1 <= metrics["prefix_cosine"] <= 1
    assert 0 <= metrics["bleu4"] <= 1 and metrics["cider"] >= 0
    assert metrics["clipscore_teacher"] is None and "not computed" in document["definitions"]["clipscore"]
    # The teacher's captions are those cache-teacher wrote for the same frames (same decoding code, same prefixes).
    cached = {}
    for shard in sorted(paths["shards"].glob("*.tar")):
        from pcd.pipeline.schema import iter_shard

        cached.update({raw["__key__"]: raw["caption.txt"].decode() for raw in iter_shard(shard)})
    assert all(e["teacher"] == cached[e["frame"]] for e in document["examples"])
    assert read_png(out.with_name("captions_examples.png")).shape[1] >= 320

    # training shards made without --keep-images hold no images
    result = runner.invoke(app, ["evaluate", "captions", str(paths["run"]), "--shards", str(paths["shards"]),
                                 "--teacher", "tiny-random", "--tokenizer", str(paths["tokenizer"])])
    assert result.exit_code == 2 and "without images" in one_line(result.output)

    # identical captions score the maximum BLEU-4; CLIPScore is 2.5 max(cos, 0)
    same = {"a": "a cat on the mat.", "b": "the chair next to a table."}
    assert evaluate_captions.caption_scores(same, same)["bleu4"] == pytest.approx(1.0, abs=1e-6)
    tokens = evaluate_captions.ptb_tokens("A man's T-shirt, isn't it?")
    assert tokens == ["a", "man", "'s", "t-shirt", "is", "n't", "it"]
    image, text = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    assert torch.allclose(evaluate_captions.clip_score(image, text), torch.tensor([2.5 / 2 ** 0.5, 0.0]))
