"""The one function that puts data into the frame of the weights, and how the frame is found from --init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig, PointBackbone
from pcd.trainer.frames import PCD_FRAME, POINT_MAE_FRAME, Frame, frame_of_weights, rotate_up, to_frame
from pcd.trainer.initialization import plan_init
from pcd.trainer.weights import to_point_mae


def test_y_up_data_becomes_z_up_by_a_proper_rotation() -> None:
    up, forward, right = np.array([[0.0, 1.0, 0.0]]), np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]])
    assert np.allclose(rotate_up(up, "y", "z"), [[0, 0, 1]])
    assert np.allclose(rotate_up(forward, "y", "z"), [[0, -1, 0]])
    assert np.allclose(rotate_up(right, "y", "z"), [[1, 0, 0]])
    basis = rotate_up(np.eye(3), "y", "z")
    assert np.isclose(np.linalg.det(basis), 1.0)  # never a mirror
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    assert np.allclose(rotate_up(rotate_up(points, "y", "z"), "z", "y"), points)
    assert rotate_up(points, "z", "z") is points
    torch.testing.assert_close(rotate_up(torch.from_numpy(points), "y", "z"),
                               torch.from_numpy(rotate_up(points, "y", "z")))


def test_to_frame_rotates_then_normalises_into_the_unit_sphere() -> None:
    rng = np.random.default_rng(1)
    tall = rng.normal(size=(200, 3)) * [0.1, 5.0, 0.1] + [3.0, 7.0, -2.0]  # a pole along y (up) in the file
    out = to_frame(np.concatenate([tall, np.tile([[0.0, 1.0, 0.0]], (200, 1)), np.ones((200, 1))], 1), "y",
                   PCD_FRAME)
    xyz = out[:, :3]
    assert out.dtype == np.float32 and out.shape == (200, 7)
    assert np.allclose(xyz.mean(0), 0, atol=1e-5)
    assert np.isclose(np.linalg.norm(xyz, axis=1).max(), 1.0)
    assert xyz[:, 2].std() > 5 * xyz[:, 0].std()  # the pole now stands along z
    assert np.allclose(out[:, 3:6], [0, 0, 1])  # normals rotate with the points
    assert np.allclose(out[:, 6], 1)  # other columns pass through
    same = to_frame(tall, "y", POINT_MAE_FRAME)  # Point-MAE's frame is y up: only normalised
    assert np.allclose(same, (tall - tall.mean(0)) / np.linalg.norm(tall - tall.mean(0), axis=1).max(), atol=1e-5)
    raw = to_frame(tall, "y", Frame("raw", up="y", unit_sphere=False))
    assert np.allclose(raw, tall.astype(np.float32))


def test_frame_of_weights() -> None:
    assert frame_of_weights(None, has_init=False) == PCD_FRAME
    assert frame_of_weights(None, has_init=True) == POINT_MAE_FRAME
    assert frame_of_weights({"normalization": {"name": "gravity-unit-sphere", "version": 1}}, True) == PCD_FRAME
    with pytest.raises(KeyError):
        frame_of_weights({"normalization": {"name": "bounding-box"}}, True)


TINY = dict(num_groups=8, group_size=8, trans_dim=32, encoder_dims=32, depth=2, num_heads=2)


def test_plan_init_finds_the_frame_of_each_kind_of_weights(tiny_export, tmp_path) -> None:
    export_plan = plan_init(tiny_export, BackboneConfig())
    assert export_plan.frame == PCD_FRAME and export_plan.kind == "pcd-export"
    assert export_plan.pretrain_scenes  # recorded for the overlap warning
    # the export's own point_mae.pth, copied away from its backbone.json, still says it is pcd's frame
    alone = tmp_path / "alone.pth"
    alone.write_bytes((tiny_export / "point_mae.pth").read_bytes())
    plan = plan_init(alone, BackboneConfig(trans_dim=64, encoder_dims=64, depth=2, num_heads=2))  # [pretrain.tiny]
    assert plan.frame == PCD_FRAME and plan.kind == "pcd-file"
    # Point-MAE's own pre-training checkpoint records nothing: Point-MAE's frame
    foreign = tmp_path / "pretrain.pth"
    torch.save({"base_model": to_point_mae(PointBackbone(BackboneConfig(**TINY)).state_dict())["base_model"]},
               foreign)
    plan = plan_init(foreign, BackboneConfig(**TINY))
    assert plan.frame == POINT_MAE_FRAME and plan.kind == "point-mae" and plan.record()["frame"] == "point-mae"
    assert plan_init(None, BackboneConfig()).frame == PCD_FRAME


def test_plan_init_refuses_a_point_mae_checkpoint_of_another_width(tmp_path) -> None:
    foreign = tmp_path / "wide.pth"
    torch.save({"base_model": to_point_mae(PointBackbone(BackboneConfig(**TINY)).state_dict())["base_model"]},
               foreign)
    with pytest.raises(PcdError, match=r"wide.pth: backbone key .* has shape"):
        plan_init(foreign, BackboneConfig(**{**TINY, "trans_dim": 64, "encoder_dims": 64}))
