"""The distillation student: every objective trains, the cross-attention is one shared block, the head stays small."""

from __future__ import annotations

import pytest
import torch

from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig
from pcd.trainer.distill import ConceptBlock, DistillConfig, DistillModel
from pcd.trainer.normalize import normalize_points

TINY = BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=2, num_heads=2,
                      drop_path_rate=0.0)
PREFIX = (3, 16)
CLIP = 12
OBJECTIVES = ["distill", "distill-no-concept", "distill-clip"]


def batch(n: int = 4, points: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xyz, _, _ = normalize_points(torch.randn(n, points, 3, generator=gen))
    return {"points": xyz, "prefix": torch.randn(n, *PREFIX, generator=gen),
            "clip": torch.randn(n, CLIP, generator=gen)}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_forward_and_backward_reach_every_parameter(objective):
    torch.manual_seed(0)
    model = DistillModel(TINY, DistillConfig(num_concepts=5), PREFIX, CLIP, variant=objective)
    data = batch()
    prediction = model(data["points"])
    assert prediction.shape == ((4, CLIP) if objective == "distill-clip" else (4, *PREFIX))
    loss, logs = model.loss(data)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss"] == pytest.approx(loss.item())
    target = data["clip"] if objective == "distill-clip" else data["prefix"]
    assert loss.item() == pytest.approx(torch.mean((prediction - target) ** 2).item(), rel=1e-5)
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    has_concepts = objective != "distill-no-concept"
    assert hasattr(model, "concept_block") == has_concepts


def test_cross_attention_is_one_block_applied_after_every_backbone_block():
    cfg = BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=12, num_heads=2)
    model = DistillModel(cfg, DistillConfig(num_concepts=4), PREFIX, CLIP).eval()
    blocks = [m for m in model.modules() if isinstance(m, ConceptBlock)]
    assert blocks == [model.concept_block]
    seen_points = []
    model.concept_block.register_forward_hook(lambda module, args, output: seen_points.append(args[1]))
    xyz = batch(2)["points"]
    model(xyz)
    assert len(seen_points) == 12
    out = model.backbone(xyz, return_all=True)
    pos = model.backbone.pos_embed(out.centers)
    for layer, seen in zip(out.layers, seen_points):  # keys/values: each block's own tokens (+ position)
        assert torch.allclose(seen, model.backbone.norm(layer) + pos, atol=1e-6)


def test_paper_size_head_is_small_beside_the_backbone():
    with torch.device("meta"):  # shapes only: skips the slow random initialisation
        model = DistillModel(BackboneConfig(), DistillConfig(), (10, 768), 512)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    concept = sum(p.numel() for n, p in model.named_parameters() if n.startswith("concept"))
    assert head < 0.05 * backbone  # a flattened 12,288 -> 7,680 MLP would be > 4x the backbone
    assert concept < 0.1 * backbone  # one shared block, not twelve
    assert model.concept_tokens.shape == (1, 32, 384)


def test_loss_falls_when_overfitting_a_handful_of_samples():
    torch.manual_seed(0)
    model = DistillModel(TINY, DistillConfig(num_concepts=4, head_hidden=64), PREFIX, CLIP)
    data = batch(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(150):
        loss, logs = model.loss(data)
        first = first if first is not None else logs["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logs["loss"] < 0.35 * first


def test_no_weight_decay_names_norms_biases_and_concept_tokens_only():
    model = DistillModel(TINY, DistillConfig(num_concepts=4), PREFIX, CLIP)
    names = model.no_weight_decay()
    assert "concept_tokens" in names
    assert "backbone.norm.weight" in names and "backbone.blocks.blocks.0.attn.proj.bias" in names
    assert "backbone.encoder.first_conv.1.weight" in names  # batch-norm scale
    assert "backbone.blocks.blocks.0.attn.qkv.weight" not in names
    assert "head.fc1.weight" not in names and "concept_block.attn.in_proj_weight" not in names
    assert names <= {name for name, _ in model.named_parameters()}


def test_teacher_shape_mismatch_is_a_clear_error():
    model = DistillModel(TINY, DistillConfig(num_concepts=4), PREFIX, CLIP)
    data = batch(2)
    data["prefix"] = torch.randn(2, 10, 768)
    with pytest.raises(PcdError, match=r"shape \(10, 768\).*\(3, 16\)"):
        model.loss(data)


def test_inconsistent_sizes_are_config_errors():
    with pytest.raises(PcdError, match="model.num_heads"):
        DistillModel(BackboneConfig(trans_dim=32, encoder_dims=32, num_heads=5, depth=1), DistillConfig(), PREFIX, CLIP)
    with pytest.raises(PcdError, match="distill.concept_heads"):
        DistillModel(TINY, DistillConfig(concept_heads=3), PREFIX, CLIP)
