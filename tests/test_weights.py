"""`pcd export` and backbone loading: bit-exact round trips, Point-MAE's format both ways, strict errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pcd.pipeline.config import config_to_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer import export
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.distill import DistillConfig, DistillModel
from pcd.trainer.normalize import NORMALIZATION
from pcd.trainer.weights import load_backbone_weights, read_checkpoint, read_export_metadata

TINY = BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=2, num_heads=2)
SCENES = ["scene0000_00", "scene0001_00"]


def perturbed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every float entry randomised, so a load that skips a tensor is caught."""
    gen = torch.Generator().manual_seed(123)
    state = model.state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.copy_(torch.randn(value.shape, generator=gen))
        else:
            value.fill_(7)
    model.load_state_dict(state)
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_run(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run folder as `pcd pretrain` leaves it; returns it and the backbone state it holds."""
    run_dir = tmp_path / "run"
    model = DistillModel(TINY, DistillConfig(num_concepts=4), (3, 16), 12)
    state = perturbed_state(model)
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 5},
               run_dir / "checkpoints" / "last.pt")
    config = {"model": config_to_dict(TINY), "objective": "distill",
              "distill": config_to_dict(DistillConfig(num_concepts=4)), "shards_dir": "/data/shards"}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "pretrain_scenes.txt").write_text("\n".join(SCENES) + "\n")
    (run_dir / "teacher.json").write_text(json.dumps({"name": "tiny-random", "prefix_shape": [3, 16]}))
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return run_dir, backbone


def assert_same_state(backbone: PointBackbone, expected: dict[str, torch.Tensor]) -> None:
    actual = backbone.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_export_then_import_is_bit_exact_in_both_formats(tmp_path):
    run_dir, expected = make_run(tmp_path)
    assert export.run(export.Config(run_dir=run_dir)) == 0
    out = run_dir / "export"
    assert sorted(p.name for p in out.iterdir()) == ["backbone.json", "backbone.safetensors", "heads.safetensors",
                                                     "point_mae.pth"]

    for source in (out, out / "backbone.safetensors", out / "point_mae.pth"):
        backbone = PointBackbone(TINY)
        report = load_backbone_weights(backbone, source)
        assert_same_state(backbone, expected)
        assert report.ignored == [] and sorted(report.loaded) == sorted(expected)
        assert report.metadata["pretrain_scenes"] == SCENES
        assert "ignored nothing" in report.summary()

    meta = read_export_metadata(out)
    assert meta["normalization"] == NORMALIZATION and meta["backbone"] == config_to_dict(TINY)
    assert meta["teacher"]["name"] == "tiny-random" and meta["objective"] == "distill"
    assert meta["source"]["checkpoint"] == "last.pt" and meta["source"]["epoch"] == 5
    assert meta["weights"]["sha256"] == hashlib.sha256((out / "backbone.safetensors").read_bytes()).hexdigest()


def test_point_mae_file_is_weights_only_and_what_point_mae_finetuning_expects(tmp_path):
    run_dir, expected = make_run(tmp_path)
    export.run(export.Config(run_dir=run_dir, out_dir=tmp_path / "exp"))
    checkpoint = torch.load(tmp_path / "exp" / "point_mae.pth", weights_only=True)
    assert list(checkpoint) == ["base_model", "normalization", "normalization_version", "up_axis"]
    assert (checkpoint["normalization"], checkpoint["normalization_version"], checkpoint["up_axis"]) == (
        "gravity-unit-sphere", "1", "z")
    # Point-MAE's load_model_from_ckpt: drop "module.", strip "MAE_encoder.", load with strict=False.
    renamed = {k.replace("module.", "").removeprefix("MAE_encoder."): v for k, v in checkpoint["base_model"].items()}
    finetune_keys = set(expected) | {"cls_token", "cls_pos"} | {
        f"cls_head_finetune.{i}.{p}" for i in (0, 1, 4, 5, 8) for p in ("weight", "bias")}
    assert finetune_keys - set(renamed) == {"cls_token", "cls_pos"} | {k for k in finetune_keys if "cls_head" in k}
    assert set(renamed) - finetune_keys == set()
    assert all(v.device.type == "cpu" and torch.equal(v, expected[k]) for k, v in renamed.items())


def point_mae_pretrain_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A full-size Point-MAE pre-training checkpoint (DDP-prefixed) with decoder keys; (encoder, extras)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PointBackbone(BackboneConfig()).state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    encoder = {k: torch.randn(shape, generator=gen) if shape else torch.tensor(9) for k, shape in shapes.items()}
    extras = {"mask_token": torch.zeros(1, 1, 384), "decoder_pos_embed.0.weight": torch.zeros(128, 3),
              "decoder_pos_embed.2.weight": torch.zeros(384, 128),
              "MAE_decoder.blocks.0.attn.qkv.weight": torch.zeros(1152, 384),
              "MAE_decoder.norm.weight": torch.zeros(384), "increase_dim.0.weight": torch.zeros(96, 384, 1)}
    base = {f"module.MAE_encoder.{k}": v for k, v in encoder.items()}
    base.update({f"module.{k}": v for k, v in extras.items()})
    torch.save({"base_model": base, "optimizer": {"state": {}, "param_groups": []}, "epoch": 300,
                "metrics": {}, "best_metrics": {}}, path)
    return encoder, [f"module.{k}" for k in extras]


def test_point_mae_checkpoint_loads_with_only_non_encoder_keys_ignored(tmp_path):
    path = tmp_path / "pretrain.pth"
    encoder, extras = point_mae_pretrain_checkpoint(path)
    backbone = PointBackbone(BackboneConfig())
    report = load_backbone_weights(backbone, path)
    assert_same_state(backbone, encoder)
    assert sorted(report.ignored) == sorted(extras) and report.metadata is None
    assert report.summary().startswith(f"loaded {len(encoder)} backbone tensors from {path} (checkpoint)")
    assert "MAE_decoder.* (2)" in report.summary() and "mask_token" in report.summary()


def test_point_mae_finetuned_and_pcd_training_checkpoints_load(tmp_path):
    encoder = perturbed_state(PointBackbone(TINY))
    finetuned = {f"module.{k}": v for k, v in encoder.items()}
    finetuned.update({"module.cls_token": torch.zeros(1, 1, 32), "module.cls_head_finetune.0.weight": torch.zeros(4, 64)})
    torch.save({"model": finetuned}, tmp_path / "ft.pth")
    backbone = PointBackbone(TINY)
    report = load_backbone_weights(backbone, tmp_path / "ft.pth")
    assert_same_state(backbone, encoder)
    assert sorted(report.ignored) == ["module.cls_head_finetune.0.weight", "module.cls_token"]

    run_dir, expected = make_run(tmp_path)
    backbone = PointBackbone(TINY)
    report = load_backbone_weights(backbone, run_dir / "checkpoints" / "last.pt")
    assert_same_state(backbone, expected)
    assert report.ignored and all(not k.startswith("backbone.") for k in report.ignored)


def test_missing_or_misshaped_backbone_key_fails_naming_it(tmp_path):
    state = {f"MAE_encoder.{k}": v for k, v in PointBackbone(TINY).state_dict().items()}
    missing = dict(state)
    del missing["MAE_encoder.blocks.blocks.1.mlp.fc2.bias"]
    torch.save({"base_model": missing}, tmp_path / "missing.pth")
    with pytest.raises(PcdError, match=r"missing\.pth: backbone key 'blocks\.blocks\.1\.mlp\.fc2\.bias' is missing"):
        load_backbone_weights(PointBackbone(TINY), tmp_path / "missing.pth")
    misshaped = dict(state)
    misshaped["MAE_encoder.pos_embed.2.weight"] = torch.zeros(33, 128)
    torch.save({"base_model": misshaped}, tmp_path / "shape.pth")
    with pytest.raises(PcdError, match=r"shape\.pth: backbone key 'MAE_encoder\.pos_embed\.2\.weight' has shape"):
        load_backbone_weights(PointBackbone(TINY), tmp_path / "shape.pth")
    with pytest.raises(PcdError, match="backbone key 'MAE_encoder.encoder.second_conv.3.weight' has shape"):
        load_backbone_weights(PointBackbone(BackboneConfig(trans_dim=48, encoder_dims=48, depth=2, num_heads=2)),
                              tmp_path / "shape.pth")  # a checkpoint of another width


def test_damaged_or_foreign_inputs_are_one_line_errors(tmp_path):
    run_dir, _ = make_run(tmp_path)
    export.run(export.Config(run_dir=run_dir))
    weights = run_dir / "export" / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    for source in (run_dir / "export", weights):
        with pytest.raises(PcdError, match="sha256 does not match"):
            load_backbone_weights(PointBackbone(TINY), source)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PcdError, match="junk.pth: cannot load"):
        load_backbone_weights(PointBackbone(TINY), tmp_path / "junk.pth")
    with pytest.raises(PcdError, match="not a pcd export folder"):
        load_backbone_weights(PointBackbone(TINY), tmp_path)


def test_export_with_another_normalisation_is_refused(tmp_path):
    run_dir, _ = make_run(tmp_path)
    export.run(export.Config(run_dir=run_dir))
    meta_path = run_dir / "export" / "backbone.json"
    meta = json.loads(meta_path.read_text())
    meta["normalization"] = {"name": "gravity-unit-sphere", "version": 2}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PcdError, match="pre-trained with input normalisation"):
        load_backbone_weights(PointBackbone(TINY), run_dir / "export")


def test_export_refuses_incomplete_runs_without_touching_an_existing_export(tmp_path):
    run_dir, _ = make_run(tmp_path)
    export.run(export.Config(run_dir=run_dir))
    before = (run_dir / "export" / "backbone.json").read_bytes()
    (run_dir / "pretrain_scenes.txt").unlink()
    with pytest.raises(PcdError, match="pretrain_scenes.txt: missing"):
        export.run(export.Config(run_dir=run_dir))
    with pytest.raises(PcdError, match="checkpoint 'epoch7' not found"):
        export.run(export.Config(run_dir=run_dir, checkpoint="epoch7"))
    assert (run_dir / "export" / "backbone.json").read_bytes() == before


def rename_pickled_global(path: Path, old: str, new: str) -> None:
    """Rewrite a torch zip checkpoint so its pickle names `new` where it named `old`, e.g. numpy 2's
    `numpy._core.multiarray` as numpy 1.x writes it (`numpy.core.multiarray`). Protocol-2 pickles spell a
    global as newline-terminated text, so the rename needs no length fix-up."""
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in members:
            if info.filename.endswith("/data.pkl"):
                assert (old + "\n").encode() in data
                data = data.replace((old + "\n").encode(), (new + "\n").encode())
            target.writestr(info.filename, data)


def point_mae_finetune_checkpoint(path: Path) -> dict:
    """What Point-MAE's fine-tuning saves: weights, optimizer, epoch and metrics holding numpy scalars."""
    checkpoint = {"base_model": {"module.cls_token": torch.ones(1, 1, 4)}, "optimizer": {"state": {}, "param_groups": []},
                  "epoch": 12, "metrics": {"acc": np.float64(93.2)}, "best_metrics": {"acc": np.float32(93.5)},
                  "counts": np.int64(7)}
    torch.save(checkpoint, path)
    return checkpoint


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_point_mae_checkpoints_with_numpy_scalars_load_weights_only(tmp_path, numpy_module):
    path = tmp_path / "ckpt-best.pth"
    written = point_mae_finetune_checkpoint(path)
    written_by = "numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray"
    if numpy_module != written_by:  # a checkpoint as the other numpy major version writes it
        rename_pickled_global(path, written_by, numpy_module)
    assert f"{numpy_module}\nscalar".encode() in zipfile.ZipFile(path).read("ckpt-best/data.pkl")
    checkpoint = read_checkpoint(path)
    assert checkpoint["metrics"] == {"acc": 93.2} and type(checkpoint["metrics"]["acc"]) is np.float64
    assert type(checkpoint["best_metrics"]["acc"]) is np.float32 and checkpoint["counts"] == 7
    assert torch.equal(checkpoint["base_model"]["module.cls_token"], written["base_model"]["module.cls_token"])
    assert checkpoint["epoch"] == 12 and checkpoint["optimizer"] == written["optimizer"]


def test_a_checkpoint_with_other_globals_is_refused_naming_the_file_and_global(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "args.pth")
    torch.save({"model": {}, "metrics": np.zeros(3)}, tmp_path / "array.pth")  # arrays are not scalars
    for name, refused in (("args.pth", "argparse.Namespace"), ("array.pth", "numpy")):
        with pytest.raises(PcdError) as raised:
            read_checkpoint(tmp_path / name)
        message = str(raised.value)
        assert message.startswith(f"{tmp_path / name}: cannot load as a weights-only torch checkpoint (Unsupported "
                                  f"global: GLOBAL {refused}")
        assert "\n" not in message and "weights_only=False" not in message and "weights_only` set" not in message
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")
    with pytest.raises(PcdError, match=r"tensor\.pth: not a checkpoint dict \(holds a Tensor\)"):
        read_checkpoint(tmp_path / "tensor.pth")
    with pytest.raises(PcdError, match=r"absent\.pth: no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.pth")
