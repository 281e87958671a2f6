"""Reconstruction pre-training (Point-MAE): masking, the decoder, Chamfer L2, the objective registry, export of the
decoder and `pcd evaluate reconstruction`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline.config import build_config
from pcd.pipeline.errors import PcdError
from pcd.trainer import data, evaluate_reconstruction, pretrain
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.heads import read_decoder
from pcd.trainer.normalize import normalize_points
from pcd.trainer.objectives import OBJECTIVES, get_objective
from pcd.trainer.reconstruct import (ReconstructConfig, ReconstructionDecoder, chamfer_l2, encode_visible,
                                     masked_reconstruction_loss, random_mask)
from training_shards import TEACHER, write_training_shards

TINY = BackboneConfig(num_groups=10, group_size=8, trans_dim=32, encoder_dims=32, depth=2, num_heads=2,
                      drop_path_rate=0.0)
SCENES = {"scene0000_00": 6, "scene0001_00": 5}


def clouds(n: int, points: int = 96, seed: int = 0) -> torch.Tensor:
    xyz, _, _ = normalize_points(torch.randn(n, points, 3, generator=torch.Generator().manual_seed(seed)))
    return xyz


def test_random_mask_masks_int_ratio_of_every_sample_each_its_own_set() -> None:
    mask = random_mask(400, 64, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (400, 64) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == 38).all()  # int(0.6 * 64), Point-MAE's 38 masked / 26 visible
    assert len({tuple(row.tolist()) for row in mask}) == 400  # every sample draws its own set
    frequency = mask.float().mean(dim=0)
    assert frequency.min() > 0.45 and frequency.max() < 0.75  # uniform over patches (expected 0.59)
    assert torch.equal(mask, random_mask(400, 64, 0.6, torch.Generator().manual_seed(0)))
    assert not torch.equal(mask, random_mask(400, 64, 0.6, torch.Generator().manual_seed(1)))
    assert (random_mask(3, 10, 0.6).sum(dim=1) == 6).all()


def test_encoder_sees_only_the_visible_patches_of_each_sample_in_order() -> None:
    torch.manual_seed(0)
    backbone = PointBackbone(TINY).eval()
    neighborhood, centers, _ = backbone.group_divider(clouds(3))
    mask = random_mask(3, TINY.num_groups, 0.6, torch.Generator().manual_seed(2))
    with torch.no_grad():
        visible = encode_visible(backbone, neighborhood, centers, mask)
        assert visible.shape == (3, 4, 32)  # 10 patches, 6 masked
        for b in range(3):  # sample by sample: the backbone's own layers on that sample's visible patches only
            keep = ~mask[b]
            tokens = backbone.encoder(neighborhood[b:b + 1, keep])
            layers = backbone.blocks(tokens, backbone.pos_embed(centers[b:b + 1, keep]))
            assert torch.allclose(visible[b], backbone.norm(layers[-1])[0], atol=1e-5)
        moved = neighborhood.clone(), centers.clone()
        moved[0][mask] += 5.0
        moved[1][mask] -= 3.0
        assert torch.equal(encode_visible(backbone, *moved, mask), visible)  # masked patches never reach it


def test_decoder_gets_visible_then_masked_centres_and_loss_compares_masked_patches() -> None:
    torch.manual_seed(0)
    backbone = PointBackbone(TINY).eval()
    decoder = ReconstructionDecoder(TINY, ReconstructConfig(decoder_depth=2)).eval()
    seen = {}
    decoder.register_forward_hook(lambda module, args, output: seen.update(args=args, output=output))
    xyz = clouds(4)
    with torch.no_grad():
        loss = masked_reconstruction_loss(backbone, decoder, xyz, 0.6, torch.Generator().manual_seed(7))
        neighborhood, centers, _ = backbone.group_divider(xyz)
    mask = random_mask(4, TINY.num_groups, 0.6, torch.Generator().manual_seed(7))
    visible, visible_centers, masked_centers = seen["args"]
    assert visible.shape == (4, 4, 32) and seen["output"].shape == (4, 6, 8, 3)
    for b in range(4):
        assert torch.equal(visible_centers[b], centers[b][~mask[b]])
        assert torch.equal(masked_centers[b], centers[b][mask[b]])
    expected = chamfer_l2(seen["output"].reshape(-1, 8, 3), neighborhood[mask].reshape(-1, 8, 3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_chamfer_l2_matches_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 5, 3, generator=gen), torch.randn(3, 7, 3, generator=gen)
    forward, backward = [], []
    for b in range(3):
        for p in prediction[b]:
            forward.append(min(float(((p - t) ** 2).sum()) for t in target[b]))
        for t in target[b]:
            backward.append(min(float(((p - t) ** 2).sum()) for p in prediction[b]))
    reference = sum(forward) / len(forward) + sum(backward) / len(backward)  # mean(dist1) + mean(dist2)
    assert chamfer_l2(prediction, target).item() == pytest.approx(reference, rel=1e-6)
    assert chamfer_l2(target, target[:, torch.randperm(7)]).item() == 0.0  # a set against itself, any order
    shifted = chamfer_l2(target + torch.tensor([0.1, 0.0, 0.0]), target)
    assert shifted.item() <= 2 * 0.01 + 1e-6  # each point is at most 0.1 from its own shifted copy


def test_decoder_shapes_and_point_mae_key_names() -> None:
    torch.manual_seed(0)
    decoder = ReconstructionDecoder(TINY, ReconstructConfig(decoder_depth=3))
    out = decoder(torch.randn(2, 4, 32), torch.randn(2, 4, 3), torch.randn(2, 6, 3))
    assert out.shape == (2, 6, TINY.group_size, 3)
    with torch.device("meta"):  # the paper-size decoder of Point-MAE's pretrain.yaml: shapes as its checkpoint's
        shapes = {k: tuple(v.shape) for k, v in
                  ReconstructionDecoder(BackboneConfig(), ReconstructConfig(decoder_depth=4)).state_dict().items()}
    block = {"norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384),
             "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "norm2.weight": (384,), "norm2.bias": (384,),
             "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536),
             "mlp.fc2.bias": (384,)}
    expected = {"mask_token": (1, 1, 384), "decoder_pos_embed.0.weight": (128, 3), "decoder_pos_embed.0.bias": (128,),
                "decoder_pos_embed.2.weight": (384, 128), "decoder_pos_embed.2.bias": (384,),
                "MAE_decoder.norm.weight": (384,), "MAE_decoder.norm.bias": (384,),
                "increase_dim.0.weight": (96, 384, 1), "increase_dim.0.bias": (96,),
                **{f"MAE_decoder.blocks.{i}.{k}": s for i, (k, s) in itertools.product(range(4), block.items())}}
    assert shapes == expected


def tiny_pretrain_config(*sets: str) -> pretrain.Config:
    return build_config(pretrain.Config, "pretrain", "tiny", ["num_points=128", *sets])


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_trains_one_step_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_pretrain_config(f"objective={name}")
    objective = get_objective(name)
    patches = {"grid": 2, "cell": 32, "image_size": 64, "width": 16}
    model = objective.build(cfg, {**TEACHER, "patch_tokens": patches})
    gen = torch.Generator().manual_seed(1)
    camera_points = torch.rand(3, 128, 3, generator=gen) + torch.tensor([-0.5, -0.5, 1.0])  # in front of the camera
    batch = {"points": clouds(3, 128), "prefix": torch.randn(3, TEACHER["prefix_length"], TEACHER["prefix_dim"],
                                                            generator=gen),
             "clip": torch.randn(3, TEACHER["clip_dim"], generator=gen), "points_cam": camera_points,
             "patch_camera": torch.tensor([[32.0, 0, 32], [0, 32.0, 32], [0, 0, 1]]).expand(3, 3, 3),
             "patch_tokens": torch.randn(3, 4, 16, generator=gen)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, metrics = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["loss"]) == pytest.approx(loss.item())
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(model.state_dict()["backbone.pos_embed.0.weight"], before["backbone.pos_embed.0.weight"])
    has_decoder = "reconstruct" in name
    assert hasattr(model, "decoder") == has_decoder
    assert objective.needs_teacher == (name != "reconstruct")
    if name == "distill+reconstruct":
        assert loss.item() == pytest.approx(float(metrics["loss_distill"]) + float(metrics["loss_reconstruct"]),
                                            rel=1e-5)


@pytest.fixture(scope="module")
def extraction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("extracted")
    write_training_shards(folder, SCENES, points=300, kind="extraction")
    return folder


@pytest.mark.parametrize("objective,member", [("distill", "prefix.npy"), ("distill-clip", "clip.npy"),
                                              ("distill+reconstruct", "prefix.npy")])
def test_an_objective_whose_members_the_shards_lack_is_refused_in_one_line(extraction: Path, tmp_path: Path,
                                                                           objective: str, member: str) -> None:
    result = CliRunner().invoke(app, ["pretrain", str(extraction), str(tmp_path / "run"), "--objective", objective,
                                      "--preset", "tiny"])
    assert result.exit_code == 2
    assert " ".join(result.stderr.split()) == (
        f"error: {extraction}: objective '{objective}' needs the shard member {member}, which these shards lack "
        "(`pcd cache-teacher` writes it)")
    assert not (tmp_path / "run").exists()


def test_the_loader_names_a_member_a_sample_lacks_and_its_command(extraction: Path) -> None:
    selection = data.select_shards(extraction, None)
    assert selection.teacher is None and "prefix.npy" not in selection.members
    loader = data.train_loader(selection, batch_size=2, num_points=64, seed=0, epoch=0, rank=0, world_size=1,
                               workers=0, members=("prefix.npy",))
    with pytest.raises(PcdError, match=r"scene0000_00_000000 lacks prefix.npy \(`pcd cache-teacher` writes it\)"):
        next(iter(loader))


def test_unknown_objectives_and_unusable_masking_are_refused_with_the_config() -> None:
    with pytest.raises(PcdError, match=r"config key 'objective': 'mae' is not one of distill, distill-no-concept"):
        tiny_pretrain_config("objective=mae")
    with pytest.raises(PcdError, match=r"config key 'reconstruct.mask_ratio': 0.05 masks 0 of model.num_groups 16"):
        tiny_pretrain_config("reconstruct.mask_ratio=0.05")
    with pytest.raises(PcdError, match=r"config key 'reconstruct.decoder_num_heads': 5 must divide model.trans_dim"):
        tiny_pretrain_config("reconstruct.decoder_num_heads=5")
    with pytest.raises(PcdError, match=r"unknown pre-training objective 'mae' \(known: distill, distill-no-concept"):
        get_objective("mae")


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def test_reconstruct_pretrains_on_extraction_shards_exports_its_decoder_and_is_evaluated(extraction: Path,
                                                                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli("pretrain", extraction, run_dir, "--objective", "reconstruct", "--preset", "tiny", "--set",
            "num_points=128", "--set", "optim.epochs=2", "--set", "optim.batch_size=4", "--set", "runtime.workers=0",
            "--set", "runtime.progress=false")
    assert not (run_dir / "teacher.json").exists()
    assert json.loads((run_dir / "config.json").read_text())["objective"] == "reconstruct"
    run_cli("export", run_dir)
    export = run_dir / "export"
    meta = json.loads((export / "backbone.json").read_text())
    assert meta["objective"] == "reconstruct" and meta["teacher"] is None
    assert meta["heads"]["file"] == "heads.safetensors" and meta["heads"]["distill"] is None
    assert meta["heads"]["decoder"]["config"] == {"mask_ratio": 0.6, "decoder_depth": 1, "decoder_num_heads": None,
                                                  "decoder_drop_path_rate": 0.1}
    heads = load_file(export / "heads.safetensors")
    assert {"mask_token", "MAE_decoder.blocks.0.attn.qkv.weight", "increase_dim.0.weight"} <= set(heads)
    assert not any(k.startswith(("backbone", "decoder.")) for k in heads)
    # the decoder read back for evaluation is the trained one, bit for bit
    trained = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    decoder, info = read_decoder(export, build_config(pretrain.Config, "pretrain", "tiny").model)
    assert info["kind"] == "pcd-export heads"
    assert all(torch.equal(v, trained[f"decoder.{k}"]) for k, v in decoder.state_dict().items())

    run_cli("evaluate", "reconstruction", extraction, "--weights", export, "--passes", "2", "--set", "batch_size=4")
    result = json.loads((export / "reconstruction.json").read_text())
    assert result["decoder"]["source"] == "trained" and len(result["passes"]) == 2
    assert result["frames_per_pass"] == sum(SCENES.values()) and result["scenes"] == 2
    definition = result["definition"]
    assert definition["points_per_cloud"] == 128 and definition["mask"]["ratio"] == 0.6
    assert definition["mask"]["masked"] == 9 and definition["groups"] == 16 and "cdl2" in definition["loss"]
    assert result["passes"][0] != result["passes"][1] and result["std"] > 0  # each pass its own subsets and masks
    again = tmp_path / "again.json"
    run_cli("evaluate", "reconstruction", extraction, "--weights", export, "--passes", "2", "--out", again)
    assert json.loads(again.read_text())["passes"] == pytest.approx(result["passes"], rel=1e-6)  # seeded, any batch

    random_out = tmp_path / "random.json"
    run_cli("evaluate", "reconstruction", extraction, "--random-init", "3", "--out", random_out, "--passes", "1",
            "--set", "num_points=128", "--set", "model.num_groups=16", "--set", "model.group_size=16",
            "--set", "model.trans_dim=64", "--set", "model.encoder_dims=64", "--set", "model.depth=2",
            "--set", "model.num_heads=2")
    random_result = json.loads(random_out.read_text())
    assert random_result["encoder"] == {"source": "random", "seed": 3, "config": random_result["encoder"]["config"]}
    assert random_result["decoder"]["source"] == "random" and random_result["decoder"]["config"]["decoder_depth"] == 3


def test_a_run_without_decoder_is_evaluated_with_a_fresh_seeded_one(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_training_shards(shards, {"scene0000_00": 4}, points=300)
    run_dir = tmp_path / "run"
    run_cli("pretrain", shards, run_dir, "--preset", "tiny", "--set", "num_points=128", "--set", "optim.epochs=1",
            "--set", "optim.batch_size=4", "--set", "runtime.workers=0", "--set", "runtime.progress=false")
    run_cli("export", run_dir)
    heads = load_file(run_dir / "export" / "heads.safetensors")
    assert "concept_tokens" in heads and not any(k.startswith("MAE_decoder") for k in heads)
    outs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"r{len(outs)}.json"
        run_cli("evaluate", "reconstruction", shards, "--weights", run_dir / "export", "--out", out, "--passes", "1",
                "--set", f"decoder_seed={seed}")
        outs.append(json.loads(out.read_text()))
    assert outs[0]["decoder"]["source"].startswith("freshly initialised") and outs[0]["decoder"]["seed"] == 0
    assert outs[0]["decoder"]["config"]["decoder_depth"] == 3  # the paper's decoder
    assert outs[0]["mean"] == outs[1]["mean"] != outs[2]["mean"]
    with pytest.raises(PcdError, match="give exactly one of --weights"):
        evaluate_reconstruction.run(evaluate_reconstruction.Config(shards_dir=shards))


def test_the_decoder_of_a_point_mae_pretraining_checkpoint_is_read_with_its_depth(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = PointBackbone(TINY)
    decoder = ReconstructionDecoder(TINY, ReconstructConfig(decoder_depth=2))
    base = {f"module.MAE_encoder.{k}": v for k, v in backbone.state_dict().items()}
    base.update({f"module.{k}": v for k, v in decoder.state_dict().items()})  # Point-MAE's layout under DDP
    torch.save({"base_model": base, "epoch": 300}, tmp_path / "ckpt-last.pth")
    loaded, info = read_decoder(tmp_path / "ckpt-last.pth", TINY)
    assert info["config"].decoder_depth == 2
    assert all(torch.equal(v, decoder.state_dict()[k]) for k, v in loaded.state_dict().items())
    del base["module.increase_dim.0.bias"]
    torch.save({"base_model": base}, tmp_path / "torn.pth")
    with pytest.raises(PcdError, match=r"torn.pth: decoder key 'increase_dim.0.bias' is missing"):
        read_decoder(tmp_path / "torn.pth", TINY)
