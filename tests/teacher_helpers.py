"""Builders for the teacher tests: small extraction shards and tiny checkpoints in the upstream layouts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pcd.pipeline.schema import Manifest, ShardWriter, sample_key


def jpeg_bytes(rng: np.random.Generator, width: int = 96, height: int = 72) -> bytes:
    """A small smooth colour image (so that resampling matters), JPEG-encoded with cv2."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def extraction_sample(rng: np.random.Generator, scene: str, frame: int) -> dict:
    points = rng.normal(size=(32, 3)).astype(np.float32)
    return {"jpg": jpeg_bytes(rng), "points.npy": points,
            "colors.npy": rng.integers(0, 256, size=(32, 3), dtype=np.uint8),
            "pose.npy": np.eye(4, dtype=np.float32), "intrinsics.npy": np.eye(3, dtype=np.float32),
            "json": {"scene": scene, "frame": frame, "valid_depth": 100, "source": f"{scene}.sens",
                     "schema_version": 1}}


def make_extraction(folder: Path, scenes: dict[str, int], seed: int = 0) -> Manifest:
    """One shard per scene, `frames` samples each, with an extraction manifest like pcd extract-scannet's."""
    rng = np.random.default_rng(seed)
    shards = []
    for index, (scene, frames) in enumerate(scenes.items()):
        writer = ShardWriter(folder / f"shard-{index:06d}.tar")
        for frame in range(0, frames * 25, 25):
            writer.write(sample_key(scene, frame), extraction_sample(rng, scene, frame))
        shards.append({**writer.close(), "scene": scene})
    manifest = Manifest(kind="extraction", options={"frame_skip": 25, "points": 32}, shards=shards,
                        scenes={scene: {"frames": frames} for scene, frames in scenes.items()}, extra={})
    manifest.write(folder)
    return manifest


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table (openai/gpt-2 encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(folder: Path) -> int:
    """A tiny byte-level BPE tokenizer in GPT-2's file format; returns its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = ["Ġ a", "Ġ t", "Ġt h", "Ġth e", "c a", "ca t", "o n"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_clip_state(seed: int = 1):
    """An open_clip state dict of pcd's tiny CLIP config, with fp16-representable weights (exact in half)."""
    import torch

    from pcd.pipeline.teacher import TINY_CLIP_MODEL, build_clip

    torch.manual_seed(seed)
    model = build_clip(TINY_CLIP_MODEL)
    model.half().float()
    return model, model.state_dict()


def save_torchscript_clip(model, path: Path) -> None:
    """A TorchScript archive laid out like OpenAI's ViT-B-32.pt: traced model, fp16 weights, and the
    `input_resolution`/`context_length`/`vocab_size` entries that are not weights."""
    import copy

    import torch

    scripted = copy.deepcopy(model)
    for name, value in (("input_resolution", 64), ("context_length", 16), ("vocab_size", 512)):
        if hasattr(scripted, name):
            delattr(scripted, name)
        scripted.register_buffer(name, torch.tensor(value))
    traced = torch.jit.trace_module(scripted, {"encode_image": torch.zeros(1, 3, 64, 64)}, check_trace=False)
    traced.half()
    traced.save(str(path))


def tiny_gpt2_state(vocab_size: int, width: int = 32, layers: int = 2, positions: int = 128, seed: int = 2,
                    legacy_buffers: bool = True) -> dict:
    """`gpt.*` keys of a ClipCap checkpoint (a GPT2LMHeadModel state dict), optionally with the attention
    buffers transformers 4.11 saved (`attn.bias` causal mask, `attn.masked_bias`)."""
    import torch

    from pcd.pipeline.torchvision_compat import import_torchvision

    import_torchvision()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=width, n_layer=layers,
                                     n_head=max(1, width // 64), bos_token_id=0, eos_token_id=0))
    state = {f"gpt.{k}": v.clone() for k, v in gpt.state_dict().items()}
    if legacy_buffers:
        for i in range(layers):
            state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.uint8)).view(
                1, 1, positions, positions)
            state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def clipcap_mlp_state(clip_dim: int, prefix_length: int, width: int, vocab_size: int, hidden: int = 48) -> dict:
    """A released-layout ClipCap MLP checkpoint: clip_project.model.{0,2}.* plus the whole GPT-2."""
    import torch

    g = torch.Generator().manual_seed(3)
    state = {"clip_project.model.0.weight": torch.randn(hidden, clip_dim, generator=g) * 0.1,
             "clip_project.model.0.bias": torch.randn(hidden, generator=g) * 0.1,
             "clip_project.model.2.weight": torch.randn(width * prefix_length, hidden, generator=g) * 0.1,
             "clip_project.model.2.bias": torch.randn(width * prefix_length, generator=g) * 0.1}
    return {**state, **tiny_gpt2_state(vocab_size, width)}


def clipcap_transformer_state(clip_dim: int, prefix_length: int, clip_length: int, width: int, layers: int,
                              vocab_size: int) -> dict:
    """The transformer-mapper layout (clip_project.linear, prefix_const, transformer.layers.{i}.*)."""
    import torch

    g = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    state = {"clip_project.linear.weight": rand(clip_length * width, clip_dim),
             "clip_project.linear.bias": rand(clip_length * width),
             "clip_project.prefix_const": rand(prefix_length, width)}
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        state.update({p + "norm1.weight": 1 + rand(width), p + "norm1.bias": rand(width),
                      p + "attn.to_queries.weight": rand(width, width),
                      p + "attn.to_keys_values.weight": rand(2 * width, width),
                      p + "attn.project.weight": rand(width, width), p + "attn.project.bias": rand(width),
                      p + "norm2.weight": 1 + rand(width), p + "norm2.bias": rand(width),
                      p + "mlp.fc1.weight": rand(2 * width, width), p + "mlp.fc1.bias": rand(2 * width),
                      p + "mlp.fc2.weight": rand(width, 2 * width), p + "mlp.fc2.bias": rand(width)})
    return {**state, **tiny_gpt2_state(vocab_size, width)}
