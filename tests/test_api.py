"""The Python API: `pcd.load_backbone` on a pcd export and on Point-MAE checkpoints, `encode`, a torch-free import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pcd
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.normalize import normalize_points
from pcd.trainer.weights import load_backbone_weights


def cloud(n: int = 300, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, 3)) * [2.0, 1.5, 0.8] + [4.0, 2.0, 1.0]).astype(np.float32)


def test_import_pcd_stays_torch_free_and_names_load_backbone() -> None:
    code = ("import sys, pcd; assert callable(pcd.load_backbone); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_export_loads_with_its_frame_and_encodes_as_its_backbone(tiny_export: Path) -> None:
    model = pcd.load_backbone(tiny_export)
    assert (model.kind, model.up_axis, model.normalization) == ("pcd-export", "z", "gravity-unit-sphere")
    assert not model.training and model.metadata["pretrain_scenes"] == ["scene0500_00", "scene0501_00"]
    points = cloud()
    encoded = model.encode(points)
    cfg = model.config
    assert encoded.tokens.shape == (cfg.num_groups, cfg.trans_dim) and encoded.centers.shape == (cfg.num_groups, 3)
    # the tokens are those of the exported backbone fed the one normalisation, the centres are input points
    reference = PointBackbone(cfg)
    load_backbone_weights(reference, tiny_export)
    expected = reference.eval()(normalize_points(torch.from_numpy(points)[None])[0])
    assert torch.equal(encoded.tokens, expected.tokens[0])
    assert torch.equal(encoded.centers, torch.from_numpy(points)[encoded.center_idx])
    batched = model.encode(torch.from_numpy(np.stack([points, cloud(seed=1)])))
    assert torch.allclose(batched.tokens[0], encoded.tokens, atol=1e-5) and batched.tokens.shape[0] == 2
    # the export's other files load the same weights
    for name in ("backbone.safetensors", "point_mae.pth", "backbone.json"):
        again = pcd.load_backbone(tiny_export / name)
        assert again.kind == "pcd-export" and torch.equal(again.encode(points).tokens, encoded.tokens)


def test_a_point_mae_checkpoint_loads_as_y_up_with_its_architecture_read_from_the_weights(tmp_path: Path) -> None:
    """A checkpoint in Point-MAE's pre-training layout (MAE_encoder. keys, decoder weights, numpy metrics)."""
    cfg = BackboneConfig(num_groups=64, group_size=32, trans_dim=48, encoder_dims=48, depth=3, num_heads=6)
    torch.manual_seed(3)
    source = PointBackbone(cfg)
    state = {f"MAE_encoder.{k}": v for k, v in source.state_dict().items()}
    state.update({"MAE_decoder.blocks.0.norm1.weight": torch.ones(48), "mask_token": torch.zeros(1, 1, 48)})
    path = tmp_path / "Point-MAE.pth"
    torch.save({"base_model": state, "epoch": 300, "metrics": {"acc": np.float64(0.9)}}, path)
    model = pcd.load_backbone(path)
    assert (model.kind, model.up_axis, model.normalization) == ("point-mae", "y", "unit-sphere")
    got = model.config
    assert (got.trans_dim, got.depth, got.num_heads, got.num_groups, got.group_size) == (48, 3, 6, 64, 32)
    points = cloud(200)
    expected = source.eval()(normalize_points(torch.from_numpy(points)[None])[0]).tokens[0]
    assert torch.equal(model.encode(points).tokens, expected)
    # a fine-tuned checkpoint (no prefix, a classification head) and the architecture overrides
    finetuned = tmp_path / "finetuned.pth"
    torch.save({"base_model": {**source.state_dict(), "cls_token": torch.zeros(1, 1, 48)}}, finetuned)
    fewer = pcd.load_backbone(finetuned, num_groups=16, group_size=8)
    assert (fewer.config.num_groups, fewer.config.group_size) == (16, 8)
    assert fewer.encode(points).tokens.shape == (16, 48)


def test_unusable_inputs_are_one_line_errors(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(PcdError, match="no such file"):
        pcd.load_backbone(tmp_path / "missing")
    other = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(PcdError, match="other.pth: no Point-MAE encoder"):
        pcd.load_backbone(other)
    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    (copy / "backbone.safetensors").write_bytes(b"torn")
    with pytest.raises(PcdError, match="sha256 does not match"):
        pcd.load_backbone(copy)
    with pytest.raises(ValueError, match="needs at least"):
        pcd.load_backbone(tiny_export).encode(cloud(4))
