"""3-NN inverse-distance interpolation (PointNet++'s feature propagation) against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcd.trainer import point_ops
from pcd.trainer.point_ops import three_nn_interpolate


def brute_force(query: np.ndarray, source: np.ndarray, features: np.ndarray) -> np.ndarray:
    """One query at a time in float64: the 3 nearest sources by squared distance, weights 1/(d^2+1e-8)."""
    out = np.zeros((len(query), features.shape[1]))
    for i, q in enumerate(query):
        d2 = ((source - q) ** 2).sum(axis=1)
        nearest = np.argsort(d2, kind="stable")[:3]
        w = 1.0 / (d2[nearest] + 1e-8)
        out[i] = (w[:, None] * features[nearest]).sum(axis=0) / w.sum()
    return out


def test_matches_brute_force_per_cloud_in_a_batch():
    gen = torch.Generator().manual_seed(0)
    query, source, features = torch.rand(2, 30, 3, generator=gen), torch.rand(2, 12, 3, generator=gen), \
        torch.randn(2, 12, 5, generator=gen)
    out = three_nn_interpolate(query, source, features)
    assert out.shape == (2, 30, 5)
    for b in range(2):
        expected = brute_force(query[b].double().numpy(), source[b].double().numpy(), features[b].double().numpy())
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_query_on_a_source_point_takes_its_features():
    gen = torch.Generator().manual_seed(1)
    source, features = torch.rand(1, 10, 3, generator=gen), torch.randn(1, 10, 4, generator=gen)
    out = three_nn_interpolate(source[:, [3, 7]], source, features)
    torch.testing.assert_close(out, features[:, [3, 7]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_sources", [1, 2])
def test_fewer_than_three_sources_uses_all_of_them(num_sources):
    gen = torch.Generator().manual_seed(2)
    query, source = torch.rand(1, 6, 3, generator=gen), torch.rand(1, num_sources, 3, generator=gen)
    features = torch.randn(1, num_sources, 3, generator=gen)
    expected = brute_force(query[0].double().numpy(), source[0].double().numpy(), features[0].double().numpy())
    np.testing.assert_allclose(three_nn_interpolate(query, source, features)[0].numpy(), expected, rtol=1e-5)


def test_chunked_neighbour_search_gives_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    query, source, features = torch.rand(2, 50, 3, generator=gen), torch.rand(2, 9, 3, generator=gen), \
        torch.randn(2, 9, 4, generator=gen)
    whole = three_nn_interpolate(query, source, features)
    calls = []
    original_cdist = torch.cdist
    monkeypatch.setattr(point_ops, "_KNN_CHUNK_ELEMENTS", 2 * 9 * 7)  # 7 queries per chunk
    monkeypatch.setattr(torch, "cdist",
                        lambda a, *args, **kw: calls.append(a.shape[1]) or original_cdist(a, *args, **kw))
    chunked = three_nn_interpolate(query, source, features)
    assert calls and max(calls) == 7 and sum(calls) == 50
    assert torch.equal(chunked, whole)


def test_gradients_reach_the_source_features_with_the_weights():
    gen = torch.Generator().manual_seed(4)
    query, source = torch.rand(1, 5, 3, generator=gen), torch.rand(1, 8, 3, generator=gen)
    features = torch.randn(1, 8, 2, generator=gen, requires_grad=True)
    three_nn_interpolate(query, source, features).sum().backward()
    # d(sum)/d(feature_j) = the total weight source j receives over all queries, for both channels.
    weights = np.zeros(8)
    for q in query[0].double().numpy():
        d2 = ((source[0].double().numpy() - q) ** 2).sum(axis=1)
        nearest = np.argsort(d2)[:3]
        w = 1.0 / (d2[nearest] + 1e-8)
        weights[nearest] += w / w.sum()
    np.testing.assert_allclose(features.grad[0].numpy(), np.stack([weights, weights], axis=1), rtol=1e-5)


def test_source_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in batch or count"):
        three_nn_interpolate(torch.rand(1, 4, 3), torch.rand(1, 5, 3), torch.rand(1, 6, 2))
