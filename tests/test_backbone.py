"""The backbone matches Point-MAE's encoder, its grouping is exact, and the input normalisation holds its promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcd.trainer import point_ops
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.point_ops import farthest_point_sample, knn
from pcd.trainer.normalize import NORMALIZATION, camera_to_gravity, denormalize_points, normalize_points

TINY = BackboneConfig(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=2, num_heads=2)


def point_mae_encoder_shapes(dim: int = 384, depth: int = 12, hidden: int = 1536) -> dict[str, tuple[int, ...]]:
    """Point-MAE MaskTransformer parameters as documented (formats.md 4.2-4.3), written out independently."""
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.first_conv.0.weight": (128, 3, 1), "encoder.first_conv.0.bias": (128,),
        "encoder.first_conv.1.weight": (128,), "encoder.first_conv.1.bias": (128,),
        "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
        "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
        "encoder.second_conv.1.weight": (512,), "encoder.second_conv.1.bias": (512,),
        "encoder.second_conv.3.weight": (dim, 512, 1), "encoder.second_conv.3.bias": (dim,),
        "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (dim, 128), "pos_embed.2.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,),
        })
    return shapes


def test_full_size_backbone_has_point_mae_encoder_names_shapes_and_count():
    with torch.device("meta"):  # shapes only: skips the slow random initialisation
        model = PointBackbone(BackboneConfig())
    expected = point_mae_encoder_shapes()
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert params == expected
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in expected.values())
    assert sum(math.prod(s) for s in expected.values()) == 21_825_024
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {f"encoder.{conv}.1.{b}" for conv in ("first_conv", "second_conv")
                       for b in ("running_mean", "running_var", "num_batches_tracked")}


def reference_fps(points: np.ndarray, n: int) -> list[int]:
    """pointnet2_ops' farthest point sampling, one point at a time in float32: start at index 0, never pick a
    point whose squared norm is <= 1e-3 (compared in double, as the kernel's C literal), index 0 when no
    point is left to pick, lowest index on exact ties."""
    points = points.astype(np.float32)
    candidates = [k for k, p in enumerate(points) if float(p[0] * p[0] + p[1] * p[1] + p[2] * p[2]) > 1e-3]
    nearest = {k: np.float32(1e10) for k in candidates}
    chosen = [0]
    while len(chosen) < n:
        last = points[chosen[-1]]
        for k in candidates:
            d = points[k] - last
            nearest[k] = min(nearest[k], d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        chosen.append(max(candidates, key=lambda k: (nearest[k], -k)) if candidates else 0)
    return chosen


def test_fps_matches_reference_picks_per_cloud_in_a_batch():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(3, 50, 3, generator=gen) * 2 - 1
    xyz[:, 5:20] *= 0.03  # points near the origin, some of them never pickable
    xyz[1, 0] = 0.0  # a first point at the origin is still the first pick
    picks = farthest_point_sample(xyz, 12)
    assert picks.dtype == torch.long and picks.shape == (3, 12)
    assert xyz[:, 5:20].square().sum(-1).le(1e-3).any(-1).all()
    for b in range(3):
        assert picks[b].tolist() == reference_fps(xyz[b].numpy(), 12)


def test_fps_never_picks_points_at_the_origin_after_the_first():
    # the kernel's rule: squared norm <= 1e-3 is skipped (0.0316^2 < 1e-3 < 0.0317^2)
    xyz = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0316, 0.0, 0.0], [0.0317, 0.0, 0.0],
                         [0.0, 0.0, 0.0], [0.4, 0.0, 0.0]]])
    # 1, 2 and 4 are never picked; once 0, 3 and 5 are chosen all of them tie at distance 0: lowest index, 0
    assert farthest_point_sample(xyz, 6).tolist() == [[0, 3, 5, 0, 0, 0]]
    xyz[0, 0] = 0.0  # now the first point is at the origin: picked first, then never again
    assert farthest_point_sample(xyz, 4).tolist() == [[0, 5, 3, 3]]
    # no pickable point left (all at the origin but the first): the kernel returns index 0
    xyz = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.01, 0.0]]])
    assert farthest_point_sample(xyz, 3).tolist() == [[0, 0, 0]]
    assert farthest_point_sample(torch.zeros(2, 4, 3), 3).tolist() == [[0, 0, 0]] * 2


def test_fps_breaks_exact_ties_by_lowest_index():
    # from the first point (index 0) points 1, 2 and 3 are all at squared distance 4
    xyz = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 2.0], [1.0, 0.5, 0.0]]])
    # then from {0, 1}: 2 -> 4, 3 -> 4 (tie, lower index 2); then 3 (4 from 0, 8 from 1, 8 from 2)
    assert farthest_point_sample(xyz, 4).tolist() == [[0, 1, 2, 3]]


def test_fps_rejects_more_centres_than_points():
    with pytest.raises(ValueError, match="cannot sample"):
        farthest_point_sample(torch.rand(1, 5, 3), 6)


def test_knn_matches_brute_force_and_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    xyz = torch.rand(2, 200, 3, generator=gen)
    query = xyz[:, :17]
    idx = knn(query, xyz, 9)
    brute = np.argsort(((query[:, :, None] - xyz[:, None]) ** 2).sum(-1).numpy(), axis=-1, kind="stable")[..., :9]
    assert idx.shape == (2, 17, 9)
    assert np.array_equal(idx.numpy(), brute)
    assert torch.equal(idx[..., 0], torch.arange(17).expand(2, -1))  # a centre finds itself first
    monkeypatch.setattr(point_ops, "_KNN_CHUNK_ELEMENTS", 2 * 200 * 4)  # 4 queries per chunk
    assert torch.equal(knn(query, xyz, 9), idx)


def test_grouping_translates_patches_to_their_centres():
    xyz = torch.rand(2, 64, 3)
    neighborhood, centers, center_idx = PointBackbone(TINY).group_divider(xyz)
    assert neighborhood.shape == (2, 8, 8, 3) and centers.shape == (2, 8, 3)
    assert torch.equal(centers, torch.stack([xyz[b, center_idx[b]] for b in range(2)]))
    assert torch.allclose(neighborhood[:, :, 0], torch.zeros(2, 8, 3))  # the centre itself, at the origin
    absolute = neighborhood + centers.unsqueeze(2)
    dists = (absolute.reshape(2, -1, 1, 3) - xyz.unsqueeze(1)).norm(dim=-1).amin(-1)
    assert dists.max() < 1e-6  # every patch point is an input point, unscaled


def test_forward_adds_position_before_every_block_and_norms_the_output():
    torch.manual_seed(0)
    model = PointBackbone(TINY).eval()
    xyz = torch.rand(2, 64, 3)
    out = model(xyz, return_all=True)
    assert out.tokens.shape == (2, 8, 32) and len(out.layers) == 2 and out.center_idx.shape == (2, 8)
    neighborhood, centers, _ = model.group_divider(xyz)
    pos = model.pos_embed(centers)
    x = model.encoder(neighborhood)
    for block, layer in zip(model.blocks.blocks, out.layers):
        x = block(x + pos)
        assert torch.allclose(x, layer, atol=1e-6)
    assert torch.allclose(out.tokens, model.norm(x), atol=1e-6)
    assert model(xyz).layers is None


def test_drop_path_rises_linearly_to_the_configured_rate():
    model = PointBackbone(BackboneConfig(trans_dim=32, encoder_dims=32, num_heads=2, depth=5))
    rates = [block.drop_path.p for block in model.blocks.blocks]
    assert rates == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])


def test_bf16_autocast_forward_keeps_grouping_exact():
    model = PointBackbone(TINY).eval()
    xyz = torch.rand(1, 64, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xyz)
    assert torch.equal(out.center_idx, farthest_point_sample(xyz, 8))
    assert torch.isfinite(out.tokens.float()).all()


# --- normalisation ------------------------------------------------------------------------------------------

def test_normalize_centres_and_scales_each_cloud_to_the_unit_sphere():
    xyz = torch.randn(3, 100, 3) * torch.tensor([5.0, 1.0, 0.2]) + torch.tensor([10.0, -3.0, 1.0])
    normalized, center, scale = normalize_points(xyz)
    assert center.shape == (3, 1, 3) and scale.shape == (3, 1, 1)
    assert torch.allclose(normalized.mean(1), torch.zeros(3, 3), atol=1e-5)
    assert torch.allclose(normalized.norm(dim=-1).amax(1), torch.ones(3))
    assert torch.allclose(denormalize_points(normalized, center, scale), xyz, atol=1e-5)
    single, _, _ = normalize_points(xyz[1])
    assert torch.allclose(single, normalized[1])
    as_numpy, _, _ = normalize_points(xyz.numpy())
    assert isinstance(as_numpy, np.ndarray) and np.allclose(as_numpy, normalized.numpy())
    assert NORMALIZATION == {"name": "gravity-unit-sphere", "version": 1}


def test_normalize_is_invariant_to_translation_and_scale_of_the_input():
    xyz = torch.randn(1, 50, 3)
    a, _, _ = normalize_points(xyz)
    b, _, _ = normalize_points(xyz * 7.5 + torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(a, b, atol=1e-5)


def test_normalize_degenerate_cloud_stays_finite():
    normalized, _, _ = normalize_points(torch.ones(1, 10, 3))
    assert torch.equal(normalized, torch.zeros(1, 10, 3))


def level_camera_pose(translation=(1.0, 2.0, 1.5)) -> np.ndarray:
    """A level ScanNet-convention camera (x right, y down, z forward) looking along world +x."""
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # columns: camera axes in world coordinates
    pose[:3, 3] = translation
    return pose


def test_camera_to_gravity_puts_camera_up_on_world_z_and_ignores_translation():
    pose = level_camera_pose()
    points = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    out = camera_to_gravity(points, pose)
    assert out.dtype == np.float32
    assert np.allclose(out, [[0, 0, 1], [2, 0, 0], [0, -1, 0]])  # up -> +z, forward -> +x, right -> -y
    assert np.allclose(camera_to_gravity(points, level_camera_pose((9.0, 9.0, 9.0))), out)
    batched = camera_to_gravity(torch.from_numpy(points).expand(2, -1, -1),
                                torch.from_numpy(np.stack([pose, np.eye(4)])))
    assert torch.allclose(batched[0], torch.from_numpy(out)) and torch.allclose(batched[1], torch.from_numpy(points))
