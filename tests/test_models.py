"""The model registry (tiny forward + backward), Point-MAE's parameter names, and pre-trained initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from pcd.pipeline.config import config_from_dict, config_to_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.classification.model import ClassifierConfig, PointMAEClassifier
from pcd.trainer.models import MODELS, load_pretrained_backbone, tiny_backbone
from pcd.trainer.partseg.model import PartSegConfig, PointMAEPartSegmenter
from pcd.trainer.semseg.model import PointMAESemSegmenter, SemSegConfig
from pcd.trainer.weights import to_point_mae, write_export

BACKBONE_PREFIXES = ("encoder.", "pos_embed.", "blocks.", "norm.")


def float_leaves(output) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (tensor, dataclass, list or dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for value in output.values() for t in float_leaves(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in float_leaves(value)]
    return [t for value in vars(output).values() if value is not None for t in float_leaves(value)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_model_runs_forward_and_backward(name):
    entry = MODELS[name]
    torch.manual_seed(0)
    cfg = entry.tiny()
    assert isinstance(cfg, entry.config)
    model = entry.build(cfg).train()
    outputs = float_leaves(model(*entry.example_inputs(cfg, torch.Generator().manual_seed(0))))
    assert outputs and all(torch.isfinite(t).all() for t in outputs)
    sum(t.square().mean() for t in outputs).backward()
    params = dict(model.named_parameters())
    without = [n for n, p in params.items() if p.grad is None]
    assert not without, f"no gradient reaches {without[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    zero = [n for n, p in params.items() if not p.grad.any()]
    assert len(zero) <= len(params) // 20, f"zero gradients: {zero[:5]}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_configs_round_trip_through_the_saved_form(name):
    entry = MODELS[name]
    for cfg in (entry.paper(), entry.tiny()):
        assert config_from_dict(entry.config, config_to_dict(cfg)) == cfg


def test_tiny_models_switch_to_eval_deterministically():
    for name, entry in MODELS.items():
        torch.manual_seed(0)
        cfg = entry.tiny()
        model = entry.build(cfg).eval()
        inputs = entry.example_inputs(cfg, torch.Generator().manual_seed(1))
        with torch.no_grad():
            first, second = float_leaves(model(*inputs)), float_leaves(model(*inputs))
        assert all(torch.equal(a, b) for a, b in zip(first, second)), name


def point_mae_backbone_shapes(dim: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Point-MAE's encoder parameters (formats.md 4.2-4.3), written out independently of pcd's modules."""
    shapes = {"encoder.first_conv.0.weight": (128, 3, 1), "encoder.first_conv.0.bias": (128,),
              "encoder.first_conv.1.weight": (128,), "encoder.first_conv.1.bias": (128,),
              "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
              "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
              "encoder.second_conv.1.weight": (512,), "encoder.second_conv.1.bias": (512,),
              "encoder.second_conv.3.weight": (dim, 512, 1), "encoder.second_conv.3.bias": (dim,),
              "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
              "pos_embed.2.weight": (dim, 128), "pos_embed.2.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "attn.qkv.weight": (3 * dim, dim),
                       p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                       p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                       p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                       p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})
    return shapes


def test_classifier_has_point_mae_point_transformer_names_and_shapes():
    with torch.device("meta"):
        model = PointMAEClassifier(ClassifierConfig())
    expected = point_mae_backbone_shapes(384, 12)
    expected.update({"cls_token": (1, 1, 384), "cls_pos": (1, 1, 384),
                     "cls_head_finetune.0.weight": (256, 768), "cls_head_finetune.0.bias": (256,),
                     "cls_head_finetune.1.weight": (256,), "cls_head_finetune.1.bias": (256,),
                     "cls_head_finetune.4.weight": (256, 256), "cls_head_finetune.4.bias": (256,),
                     "cls_head_finetune.5.weight": (256,), "cls_head_finetune.5.bias": (256,),
                     "cls_head_finetune.8.weight": (40, 256), "cls_head_finetune.8.bias": (40,)})
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected
    buffers = {n for n, _ in model.named_buffers()}
    assert {n.rsplit(".", 1)[0] for n in buffers} == {"encoder.first_conv.1", "encoder.second_conv.1",
                                                      "cls_head_finetune.1", "cls_head_finetune.5"}


def test_partseg_model_has_pt_py_names_and_shapes():
    with torch.device("meta"):
        model = PointMAEPartSegmenter(PartSegConfig())
    expected = point_mae_backbone_shapes(384, 12)
    expected.update({"label_conv.0.weight": (64, 16, 1), "label_conv.1.weight": (64,), "label_conv.1.bias": (64,),
                     "propagation_0.mlp_convs.0.weight": (1536, 1155, 1), "propagation_0.mlp_convs.0.bias": (1536,),
                     "propagation_0.mlp_convs.1.weight": (1024, 1536, 1), "propagation_0.mlp_convs.1.bias": (1024,),
                     "propagation_0.mlp_bns.0.weight": (1536,), "propagation_0.mlp_bns.0.bias": (1536,),
                     "propagation_0.mlp_bns.1.weight": (1024,), "propagation_0.mlp_bns.1.bias": (1024,),
                     "convs1.weight": (512, 3392, 1), "convs1.bias": (512,), "bns1.weight": (512,),
                     "bns1.bias": (512,), "convs2.weight": (256, 512, 1), "convs2.bias": (256,),
                     "bns2.weight": (256,), "bns2.bias": (256,), "convs3.weight": (50, 256, 1),
                     "convs3.bias": (50,)})
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected
    assert sum(math.prod(s) for s in expected.values()) == sum(p.numel() for p in model.parameters())
    assert model.cfg == BackboneConfig(num_groups=128, group_size=32)


@pytest.mark.parametrize("model, config", [(PointMAEPartSegmenter, PartSegConfig),
                                           (PointMAESemSegmenter, SemSegConfig)])
def test_fetch_blocks_outside_the_depth_are_refused(model, config):
    with pytest.raises(PcdError, match=r"config key .fetch_blocks.: \(0, 2\) must be block indices in 0..1"):
        model(config(backbone=tiny_backbone(depth=2), fetch_blocks=(0, 2)))


def test_partseg_logits_at_a_query_depend_only_on_the_points_and_that_query():
    torch.manual_seed(0)
    entry = MODELS["partseg"]
    model = entry.build(entry.tiny()).eval()
    points, category, _ = entry.example_inputs(entry.tiny(), torch.Generator().manual_seed(2))
    with torch.no_grad():
        at_points = model(points, category)
        assert torch.equal(model(points, category, points), at_points)  # the default query is the input
        query = torch.rand(2, 30, 3) * 2 - 1
        whole = model(points, category, query)
        parts = torch.cat([model(points, category, query[:, :7]), model(points, category, query[:, 7:])], dim=1)
    assert at_points.shape == (2, 64, 50) and whole.shape == (2, 30, 50)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    # and the category matters
    with torch.no_grad():
        other = model(points, category.flip(0), query)
    assert not torch.allclose(other, whole)


def randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.copy_(torch.randn(value.shape, generator=gen))
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("name", ["classification", "partseg"])
def test_pretrained_backbone_loads_strictly_and_the_rest_stays_fresh(name, tmp_path):
    entry = MODELS[name]
    torch.manual_seed(0)
    cfg = entry.tiny()
    model = entry.build(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    donor = PointBackbone(model.cfg)
    pretrained = randomised(donor, 5)
    write_export(tmp_path / "export", pretrained, model.cfg, {"pretrain_scenes": ["scene0000_00"]})
    torch.save({"base_model": {**to_point_mae(pretrained)["base_model"], "MAE_decoder.norm.weight": torch.ones(3)},
                "epoch": 300}, tmp_path / "pretrain.pth")
    for source, kind in ((tmp_path / "export", "pcd-export"), (tmp_path / "pretrain.pth", "checkpoint")):
        report = load_pretrained_backbone(model, source)
        state = model.state_dict()
        assert report.kind == kind
        assert sorted(report.loaded) == sorted(pretrained)
        assert sorted(report.initialised) == sorted(k for k in state if not k.startswith(BACKBONE_PREFIXES))
        for key in state:
            assert torch.equal(state[key], pretrained[key] if key in pretrained else fresh[key]), key
    assert report.ignored == ["MAE_decoder.norm.weight"]
    assert report.summary().endswith("; ignored MAE_decoder")


def test_pretrained_backbone_of_another_width_is_refused_naming_file_and_key(tmp_path):
    wide = PointBackbone(BackboneConfig(num_groups=8, group_size=8, trans_dim=64, encoder_dims=64, depth=2,
                                        num_heads=2))
    torch.save(to_point_mae(wide.state_dict()), tmp_path / "wide.pth")
    model = MODELS["classification"].build(MODELS["classification"].tiny())
    with pytest.raises(PcdError, match=r"wide\.pth: backbone key .* has shape \(64, 512, 1\)"):
        load_pretrained_backbone(model, tmp_path / "wide.pth")
