"""Point operations shared by the backbone and every head: FPS, kNN, gathering, 3-NN interpolation.

Pure torch, batched, on CPU and GPU, so no compiled extension (pointnet2_ops, knn_cuda) is needed. The
backbone's grouping, the detector's query sampling and the segmentation heads' propagation import from here.
"""

from __future__ import annotations

import torch
from torch import Tensor


# pointnet2_ops' kernel never picks a point whose float32 squared norm is <= 1e-3 (a double literal there):
# this is the largest float32 that passes that test, so comparing in float32 decides exactly as the kernel.
_NEAR_ORIGIN_SQ_NORM = 0.0009999999310821295
# The kernel's initial distance to the chosen set (its `temp` buffer is filled with 1e10, not infinity).
_INITIAL_DISTANCE = 1e10


def farthest_point_sample(xyz: Tensor, n: int) -> Tensor:
    """Indices (B,n) of `n` farthest-point samples of each cloud in xyz (B,N,3).

    The centres of pointnet2_ops' CUDA kernel, which Point-MAE and 3DETR run: the first pick is index 0;
    each further pick is the point farthest from the already chosen set, among the points whose float32
    squared norm exceeds 1e-3 (points at or near the origin are never picked after the first); when no such
    point exists the pick is index 0. Exact ties go to the lowest index (the kernel breaks them by CUDA
    thread order, which is not the index order). Runs in float32 whatever the autocast state, so the picks
    do not depend on the precision of the surrounding model.
    """
    batch, num_points, _ = xyz.shape
    if not 0 < n <= num_points:
        raise ValueError(f"cannot sample {n} centres from {num_points} points")
    with torch.no_grad():
        # Coordinates as rows (B,3,N) and preallocated buffers: the loop runs n times over every point, and
        # on CPU avoiding a fresh temporary per step is ~8x faster for whole scenes (2,048 of 40k points).
        points = xyz.detach().float().transpose(1, 2).contiguous()
        squared_norm = points[:, 0] * points[:, 0] + points[:, 1] * points[:, 1] + points[:, 2] * points[:, 2]
        # Excluded points hold distance -1, below any real distance: argmax (first index on ties) never takes
        # them unless every point is excluded, and then it returns index 0 as the kernel does.
        nearest = torch.full_like(squared_norm, _INITIAL_DISTANCE).masked_fill_(squared_norm <= _NEAR_ORIGIN_SQ_NORM, -1.0)
        picks = torch.empty(batch, n, dtype=torch.long, device=xyz.device)
        dist = torch.empty_like(nearest)
        diff = torch.empty_like(points)
        farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
        rows = torch.arange(batch, device=xyz.device)
        for i in range(n):
            picks[:, i] = farthest
            torch.sub(points, points[rows, :, farthest].unsqueeze(-1), out=diff)
            torch.sum(diff.square_(), dim=1, out=dist)
            torch.minimum(nearest, dist, out=nearest)
            farthest = nearest.argmax(dim=1)
    return picks


# Largest number of query-point distances kNN materialises at once (4 bytes each): 2^26 = 256 MiB.
# 40k scene points x 2048 centres x batch 8 would otherwise need 2.6 GB in one cdist.
_KNN_CHUNK_ELEMENTS = 1 << 26


def knn(query: Tensor, xyz: Tensor, k: int) -> Tensor:
    """Indices (B,G,k) of the k points of xyz (B,N,3) nearest to each query (B,G,3), nearest first.

    A query that is itself in xyz finds itself first (as knn_cuda does). Distances are computed in
    chunks of queries so memory stays bounded for whole scenes.
    """
    batch, num_query, _ = query.shape
    num_points = xyz.shape[1]
    if not 0 < k <= num_points:
        raise ValueError(f"cannot take {k} neighbours among {num_points} points")
    chunk = max(1, _KNN_CHUNK_ELEMENTS // max(1, batch * num_points))
    with torch.no_grad():
        points = xyz.detach().float()
        out = []
        for start in range(0, num_query, chunk):
            part = query[:, start:start + chunk].detach().float()
            dist = torch.cdist(part, points, compute_mode="donot_use_mm_for_euclid_dist")
            out.append(dist.topk(k, dim=-1, largest=False, sorted=True).indices)
    return torch.cat(out, dim=1)


def gather_points(xyz: Tensor, idx: Tensor) -> Tensor:
    """xyz (B,N,C) gathered at idx (B,...) -> (B,...,C)."""
    batch = xyz.shape[0]
    flat = idx.reshape(batch, -1)
    picked = torch.gather(xyz, 1, flat.unsqueeze(-1).expand(-1, -1, xyz.shape[-1]))
    return picked.reshape(*idx.shape, xyz.shape[-1])


def three_nn_interpolate(query_xyz: Tensor, source_xyz: Tensor, source_features: Tensor) -> Tensor:
    """Features (B,Q,C) at query_xyz (B,Q,3), interpolated from the 3 nearest of source_xyz (B,S,3).

    PointNet++'s (and Point-MAE's `PointNetFeaturePropagation`) inverse-distance rule: weights
    1 / (squared distance + 1e-8), normalised to sum to 1; with fewer than 3 sources, all of them. The
    neighbours come from the chunked `knn`, and the weighted sum is accumulated one neighbour at a time, so
    memory is the (B,Q,C) output plus small index tensors, even for whole scenes. Gradients flow to
    source_features (not to the coordinates, which only choose and weigh neighbours).
    """
    if source_xyz.shape[:2] != source_features.shape[:2]:
        raise ValueError(f"source points {tuple(source_xyz.shape)} and features {tuple(source_features.shape)} "
                         f"differ in batch or count")
    k = min(3, source_xyz.shape[1])
    idx = knn(query_xyz, source_xyz, k)  # (B,Q,k)
    with torch.no_grad():
        # Squared distances from the coordinates themselves (not |a|^2+|b|^2-2ab as PointNet++ computes them),
        # so a query on a source point gets distance exactly 0 and, in effect, that point's features.
        offsets = gather_points(source_xyz.detach().float(), idx) - query_xyz.detach().float().unsqueeze(2)
        reciprocal = 1.0 / (offsets.square().sum(dim=-1) + 1e-8)
        weights = (reciprocal / reciprocal.sum(dim=-1, keepdim=True)).to(source_features.dtype)
    out = weights[..., 0:1] * gather_points(source_features, idx[..., 0])
    for j in range(1, k):
        out = out + weights[..., j:j + 1] * gather_points(source_features, idx[..., j])
    return out
