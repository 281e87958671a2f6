"""`distill-local`: the crop camera, projection of patch centres to CLIP tokens, `cache-teacher --patch-tokens`,
and the objective's loss."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline.cache_teacher import Config, run
from pcd.pipeline.errors import PcdError
from pcd.pipeline.frame_decode import clip_resize_crop, crop_camera
from pcd.pipeline.schema import Manifest, ShardWriter, decode_member, iter_shard, read_manifest, sample_key
from pcd.pipeline.teacher import load_teacher, normalise_images
from pcd.trainer.backbone import BackboneConfig
from pcd.trainer.local_align import DistillLocalModel, project_to_cells
from teacher_helpers import extraction_sample
from training_shards import TEACHER, write_training_shards

TINY = BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=1, num_heads=2,
                      drop_path_rate=0.0)
K_640 = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]], np.float32)  # pixel centres at integers


def test_crop_camera_follows_the_resize_and_crop_of_the_image() -> None:
    """A bright square at a known pixel lands, after CLIP's resize and centre crop, where the crop camera says."""
    image = np.zeros((480, 640, 3), np.uint8)
    image[296:305, 396:405] = 255  # 9 x 9 square centred on pixel (400, 300)
    crop = clip_resize_crop(image, 224).astype(np.float64).sum(axis=2)
    rows, cols = np.mgrid[0:224, 0:224]
    centroid = ((crop * (cols + 0.5)).sum() / crop.sum(), (crop * (rows + 0.5)).sum() / crop.sum())  # edge coords
    camera = crop_camera(K_640, 640, 480, 224)
    point = np.array([(400 - 319.5) / 500, (300 - 239.5) / 500, 1.0])  # projects to pixel (400, 300)
    u, v, w = camera @ point
    assert (u / w, v / w) == pytest.approx(centroid, abs=0.2)
    # 298 x 224 after the resize, 37 columns cut on the left (formats.md 10.2)
    assert camera[0, 0] == pytest.approx(500 * 298 / 640) and camera[0, 2] == pytest.approx(320 * 298 / 640 - 37)


def test_a_known_point_projects_to_its_known_token_on_a_hand_built_camera() -> None:
    camera = torch.from_numpy(crop_camera(K_640, 640, 480, 224))[None]
    points = torch.tensor([[[0.0, 0.0, 1.0],  # the optical axis: pixel (319.5, 239.5) -> crop (112, 112): token 24
                            [(100 - 319.5) * 2 / 500, (479 - 239.5) * 2 / 500, 2.0],  # crop (9.8, 223.8): token 42
                            [(50 - 319.5) / 500, 0.0, 1.0],  # left of the crop (x' = -13.5): not counted
                            [0.0, 0.0, -1.0],  # behind the camera: not counted
                            [(560 - 319.5) / 500, (10 - 239.5) / 500, 1.0]]])  # crop (223.7, 4.9): token 6
    cells, counted = project_to_cells(points, camera, image_size=224, cell=32)
    assert counted.tolist() == [[True, True, False, False, True]]
    assert cells[0, [0, 1, 4]].tolist() == [24, 42, 6]


def extraction_with_colour_intrinsics(folder: Path, frames: int, colour: bool = True) -> None:
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder / "shard-000000.tar")
    for frame in range(frames):
        sample = extraction_sample(rng, "scene0000_00", frame)  # a 96 x 72 JPEG
        if colour:
            sample["color_intrinsics.npy"] = np.array([[80, 0, 47.5], [0, 80, 35.5], [0, 0, 1]], np.float32)
        writer.write(sample_key("scene0000_00", frame), sample)
    Manifest(kind="extraction", options={}, shards=[{**writer.close(), "scene": "scene0000_00"}],
             scenes={"scene0000_00": {"frames": frames}}, extra={}).write(folder)


def test_cache_teacher_stores_patch_tokens_and_the_crop_camera(tmp_path: Path) -> None:
    extracted, out = tmp_path / "extracted", tmp_path / "train"
    extraction_with_colour_intrinsics(extracted, 3)
    assert run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", workers=0,
                      patch_tokens=True)) == 0
    info = read_manifest(out, "training").options["output"]["patch_tokens"]
    assert {k: info[k] for k in ("grid", "cell", "image_size", "width")} == {"grid": 2, "cell": 32, "image_size": 64,
                                                                             "width": 64}
    assert info["open_clip"] and info["ln_post"] in (True, False)
    teacher = load_teacher("tiny-random")
    for raw in iter_shard(out / "shard-000000.tar"):
        sample = {k: decode_member(k, v) for k, v in raw.items() if not k.startswith("__")}
        source = {k: decode_member(k, v) for k, v in next(r for r in iter_shard(extracted / "shard-000000.tar")
                                                          if r["__key__"] == raw["__key__"]).items()
                  if not k.startswith("__")}
        assert sample["patch_tokens.npy"].dtype == np.float16 and sample["patch_tokens.npy"].shape == (4, 64)
        np.testing.assert_array_equal(sample["patch_camera.npy"],
                                      crop_camera(source["color_intrinsics.npy"], 96, 72, 64))
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(source["jpg"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        teacher.clip.visual.output_tokens = True
        with torch.no_grad():
            _, tokens = teacher.clip.visual(normalise_images(torch.from_numpy(clip_resize_crop(rgb, 64))[None]))
        np.testing.assert_allclose(sample["patch_tokens.npy"], tokens[0].numpy(), atol=5e-3, rtol=1e-2)
    with pytest.raises(PcdError, match="written with other options"):  # no mixing of options in one output
        run(Config(extracted_dir=extracted, out_dir=out, teacher="tiny-random", workers=0))


def test_patch_tokens_of_an_extraction_without_colour_intrinsics_are_refused(tmp_path: Path) -> None:
    extracted = tmp_path / "extracted"
    extraction_with_colour_intrinsics(extracted, 2, colour=False)
    result = CliRunner().invoke(app, ["cache-teacher", str(extracted), str(tmp_path / "train"), "--preset", "tiny",
                                      "--patch-tokens", "--workers", "0"])
    assert result.exit_code == 2
    message = result.stderr.strip().splitlines()[-1]  # after the random teacher's warning panel
    assert message.startswith(f"error: {extracted / 'shard-000000.tar'}: sample scene0000_00_000000 has no "
                              "color_intrinsics.npy (extracted before pcd stored them)")


PATCHES = {"grid": 2, "cell": 32, "image_size": 64, "width": 16}


def local_batch(n: int = 3, points: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    cam = torch.rand(n, points, 3, generator=gen) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([-1.0, -1.0, 1.5])
    centred = cam - cam.mean(dim=1, keepdim=True)
    return {"points": centred / centred.norm(dim=-1).amax(dim=1)[:, None, None], "points_cam": cam,
            "patch_camera": torch.tensor([[80.0, 0, 32], [0, 80.0, 32], [0, 0, 1]]).expand(n, 3, 3),
            "patch_tokens": torch.randn(n, 4, 16, generator=gen)}


def test_distill_local_compares_each_counted_patch_with_the_token_of_its_cell() -> None:
    torch.manual_seed(0)
    model = DistillLocalModel(TINY, PATCHES)
    batch = local_batch()
    loss, metrics = model.loss(batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # by hand: project the FPS centres' camera points, pick their cells' tokens
        out = model.backbone(batch["points"])
        centres = torch.stack([batch["points_cam"][b, out.center_idx[b]] for b in range(3)])
        uvw = centres @ batch["patch_camera"][0].T
        u, v = uvw[..., 0] / uvw[..., 2], uvw[..., 1] / uvw[..., 2]
        inside = (u >= 0) & (u < 64) & (v >= 0) & (v < 64)
        cells = (v // 32).clamp(0, 1).long() * 2 + (u // 32).clamp(0, 1).long()
        errors = [((model.local_head(out.tokens[b, g]) - batch["patch_tokens"][b, cells[b, g]]) ** 2).mean()
                  for b in range(3) for g in range(8) if inside[b, g]]
    assert 0 < len(errors) < 24  # some centres fall outside the crop
    assert loss.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)
    assert float(metrics["counted_patches"]) == pytest.approx(len(errors) / 24)
    nothing = dict(batch, patch_camera=batch["patch_camera"] * torch.tensor([1.0, 1.0, -1.0])[:, None])  # all behind
    assert model.loss(nothing)[0].item() == 0.0


def test_distill_local_pretrains_on_patch_token_shards_and_is_refused_without_them(tmp_path: Path) -> None:
    with_tokens, without = tmp_path / "with", tmp_path / "without"
    write_training_shards(with_tokens, {"scene0000_00": 6}, points=300, patch_tokens=PATCHES)
    write_training_shards(without, {"scene0000_00": 2}, points=300)
    common = ["--objective", "distill-local", "--preset", "tiny", "--set", "num_points=128", "--set",
              "optim.epochs=1", "--set", "optim.batch_size=3", "--set", "runtime.workers=0",
              "--set", "runtime.progress=false"]
    result = CliRunner().invoke(app, ["pretrain", str(with_tokens), str(tmp_path / "run"), *common])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    result = CliRunner().invoke(app, ["pretrain", str(without), str(tmp_path / "run2"), *common])
    assert result.exit_code == 2
    assert " ".join(result.stderr.split()) == (
        f"error: {without}: objective 'distill-local' needs the shard member patch_tokens.npy, which these shards "
        "lack (`pcd cache-teacher --patch-tokens` writes it)")
    assert TEACHER["prefix_dim"] == 16  # the random tokens of write_training_shards are of the teacher's sizes
