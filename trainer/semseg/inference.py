"""Whole-scene inference: class probabilities for EVERY vertex of a scene, in bounded memory.

The scene is cut into crops (`tile_columns`: overlapping full-height columns `stride` apart that cover every
vertex; or the whole scene), each crop is sampled (`num_points`, seeded), put in its own frame, encoded once,
and the head's 3-NN propagation gives logits for every vertex of the crop, decoded `query_chunk` vertices at a
time. Softmax probabilities are summed per vertex over the crops that cover it (as Pointcept's and ACT's
whole-scene testers accumulate votes); the caller sums them again over seeded passes. Memory: the (N, 20)
float32 sum, one batch of crops, and one chunk of queries.

The points each crop's model read are also scored on their own predictions (`BlockScores`, ACT's `main.py`
metric on sampled blocks), when labels are given.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pcd.trainer.frames import Frame
from pcd.trainer.semseg.data import Crop, choose, tile_columns
from pcd.trainer.semseg.inputs import CropFrame
from pcd.trainer.semseg.metric import BlockScores


def scene_crops(xyz: np.ndarray, crop: Crop, column_size: float, stride: float) -> list[np.ndarray]:
    """Vertex indices of each crop of a scene (see the module docstring)."""
    return tile_columns(xyz, column_size, stride) if crop == "column" else [np.arange(len(xyz))]


@torch.no_grad()
def scene_probabilities(model: torch.nn.Module, xyz: np.ndarray, frame: Frame, *, crop: Crop, column_size: float,
                        stride: float, num_points: int, rng: np.random.Generator, device: torch.device,
                        crops_per_batch: int = 8, query_chunk: int = 32768, labels: Optional[np.ndarray] = None,
                        blocks: Optional[BlockScores] = None) -> np.ndarray:
    """Summed softmax probabilities (N, classes) float32 over the crops covering each vertex of one scene."""
    was_training = model.training
    model.eval()
    crops = scene_crops(xyz, crop, column_size, stride)
    probabilities: Optional[np.ndarray] = None
    try:
        for first in range(0, len(crops), crops_per_batch):
            batch = crops[first:first + crops_per_batch]
            picks = [choose(np.arange(len(members)), num_points, rng) for members in batch]
            frames = [CropFrame.of(xyz[members[pick]], frame) for members, pick in zip(batch, picks)]
            inputs = np.stack([f.apply(xyz[members[pick]]) for f, members, pick in zip(frames, batch, picks)])
            centers, features = model.encode(torch.from_numpy(inputs).to(device))
            for b, (members, pick, crop_frame) in enumerate(zip(batch, picks, frames)):
                crop_prediction = np.empty(len(members), dtype=np.int64)
                for start in range(0, len(members), query_chunk):
                    part = members[start:start + query_chunk]
                    query = torch.from_numpy(crop_frame.apply(xyz[part])).to(device).unsqueeze(0)
                    logits = model.decode(query, centers[b:b + 1], features[b:b + 1])[0].float()
                    probs = torch.softmax(logits, dim=-1).cpu().numpy()
                    if probabilities is None:
                        probabilities = np.zeros((len(xyz), probs.shape[1]), dtype=np.float32)
                    probabilities[part] += probs
                    crop_prediction[start:start + len(part)] = probs.argmax(axis=1)
                if blocks is not None and labels is not None:
                    blocks.add(labels[members[pick]], crop_prediction[pick])
    finally:
        model.train(was_training)
    assert probabilities is not None  # a scene has at least one vertex, so at least one crop
    return probabilities
