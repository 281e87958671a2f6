"""The teacher: preprocessing, strict checkpoint loading in the upstream layouts, prefixes, captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from pcd.pipeline.clipcap import beam_caption, greedy_captions, load_clipcap, load_tokenizer, stop_token_id
from pcd.pipeline.errors import PcdError
from pcd.pipeline.frame_decode import clip_resize_crop, decode_and_crop, decode_jpeg_rgb
from pcd.pipeline.teacher import (OPENAI_MEAN, OPENAI_STD, TINY_CLIP_MODEL, load_clip, load_teacher,
                                  normalise_images)
from pcd.pipeline.torchvision_compat import import_open_clip
from teacher_helpers import (clipcap_mlp_state, clipcap_transformer_state, jpeg_bytes, save_torchscript_clip,
                             tiny_clip_state, write_tokenizer)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, 128 + 100 * np.sin(xx / 7.0)], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height,width", [(968 // 4, 1296 // 4), (300, 200), (480, 640), (224, 224)])
def test_preprocessing_equals_open_clips_eval_transform(height, width):
    open_clip = import_open_clip()
    reference = open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                          interpolation="bicubic", resize_mode="shortest")
    rgb = smooth_image(height, width)
    expected = reference(Image.fromarray(rgb))
    ours = normalise_images(torch.from_numpy(clip_resize_crop(rgb, 224))[None])[0]
    assert ours.shape == expected.shape == (3, 224, 224)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_jpeg_decoding_and_corruption():
    rng = np.random.default_rng(0)
    data = jpeg_bytes(rng)
    rgb = decode_jpeg_rgb(data)
    assert rgb.shape == (72, 96, 3)
    assert np.abs(rgb.astype(int) - np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))).max() <= 2
    assert decode_and_crop((data, 64)).shape == (64, 64, 3)
    assert decode_and_crop((data[: len(data) // 2], 64)) is None  # truncated
    assert decode_and_crop((b"not a jpeg at all", 64)) is None


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors", "torchscript"])
def test_clip_checkpoint_formats_load_strictly(tmp_path, fmt):
    model, state = tiny_clip_state()
    path = tmp_path / f"clip.{ 'pt' if fmt == 'torchscript' else fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "torchscript":
        save_torchscript_clip(model, path)
    else:
        torch.save({k: v.half() for k, v in state.items()}, path)  # partly-fp16 files are cast to float32
    loaded = load_clip(TINY_CLIP_MODEL, path)
    assert loaded.visual.proj.dtype == torch.float32
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-5)


def test_clip_wrong_key_or_shape_is_named(tmp_path):
    _, state = tiny_clip_state()
    renamed = dict(state)
    renamed["visual.projection"] = renamed.pop("visual.proj")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(PcdError, match=r"renamed\.pt: unexpected key 'visual\.projection'"):
        load_clip(TINY_CLIP_MODEL, tmp_path / "renamed.pt")
    del renamed["visual.projection"]
    torch.save(renamed, tmp_path / "missing.pt")
    with pytest.raises(PcdError, match=r"missing\.pt: missing key 'visual\.proj'"):
        load_clip(TINY_CLIP_MODEL, tmp_path / "missing.pt")
    reshaped = {**state, "visual.ln_post.weight": torch.ones(65)}
    torch.save(reshaped, tmp_path / "reshaped.pt")
    with pytest.raises(PcdError, match=r"reshaped\.pt: key 'visual\.ln_post\.weight' has shape \[65\]"):
        load_clip(TINY_CLIP_MODEL, tmp_path / "reshaped.pt")
    with pytest.raises(PcdError, match=r"nothere\.pt: CLIP checkpoint not found"):
        load_clip(TINY_CLIP_MODEL, tmp_path / "nothere.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PcdError, match=r"garbage\.pt: not a readable CLIP checkpoint"):
        load_clip(TINY_CLIP_MODEL, tmp_path / "garbage.pt")


def test_clipcap_mlp_checkpoint_gives_the_independent_prefix(tmp_path):
    state = clipcap_mlp_state(clip_dim=64, prefix_length=4, width=32, vocab_size=100)
    assert any(k.endswith("attn.masked_bias") for k in state) and any(k.endswith("attn.bias") for k in state)
    torch.save(state, tmp_path / "conceptual_weights.pt")
    model = load_clipcap(tmp_path / "conceptual_weights.pt")
    shape = model.shape
    assert (shape.mapping, shape.clip_dim, shape.prefix_length, shape.mlp_hidden) == ("mlp", 64, 4, (48,))
    assert (shape.gpt_vocab, shape.gpt_width, shape.gpt_layers, shape.gpt_positions) == (100, 32, 2, 128)
    embedding = torch.randn(5, 64) * 3
    hidden = torch.tanh(embedding @ state["clip_project.model.0.weight"].T + state["clip_project.model.0.bias"])
    expected = (hidden @ state["clip_project.model.2.weight"].T + state["clip_project.model.2.bias"]).view(5, 4, 32)
    with torch.no_grad():
        assert torch.allclose(model.prefix(embedding), expected, atol=1e-5)
    assert torch.equal(model.gpt.transformer.h[1].mlp.c_fc.weight, state["gpt.transformer.h.1.mlp.c_fc.weight"])


def test_clipcap_single_linear_mapper_of_predict_py(tmp_path):
    """predict.py builds a single Linear (keys clip_project.weight/bias) when prefix_length > 10."""
    gpt = {k: v for k, v in clipcap_mlp_state(clip_dim=64, prefix_length=12, width=32, vocab_size=100).items()
           if k.startswith("gpt.")}
    weight, bias = torch.randn(12 * 32, 64), torch.randn(12 * 32)
    torch.save({"clip_project.weight": weight, "clip_project.bias": bias, **gpt}, tmp_path / "linear.pt")
    model = load_clipcap(tmp_path / "linear.pt")
    assert (model.shape.mapping, model.shape.prefix_length) == ("linear", 12)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(model.prefix(x), (x @ weight.T + bias).view(2, 12, 32), atol=1e-5)


def _reference_transformer_mapper(state: dict, x: torch.Tensor, clip_length: int, layers: int) -> torch.Tensor:
    """ClipCap's TransformerMapper written out with plain tensor ops (8 heads, pre-norm, ReLU MLP)."""
    b = x.shape[0]
    const = state["clip_project.prefix_const"]
    width = const.shape[1]
    tokens = torch.cat([(x @ state["clip_project.linear.weight"].T + state["clip_project.linear.bias"]).view(
        b, clip_length, width), const.expand(b, *const.shape)], 1)
    heads, n = 8, tokens.shape[1]
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        h = F.layer_norm(tokens, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        q = (h @ state[p + "attn.to_queries.weight"].T).view(b, n, heads, -1).transpose(1, 2)
        kv = (h @ state[p + "attn.to_keys_values.weight"].T).view(b, n, 2, heads, -1)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        attention = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, -1)
        out = (attention @ v).transpose(1, 2).reshape(b, n, width)
        tokens = tokens + out @ state[p + "attn.project.weight"].T + state[p + "attn.project.bias"]
        h = F.layer_norm(tokens, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        h = torch.relu(h @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        tokens = tokens + h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    return tokens[:, clip_length:]


def test_clipcap_transformer_mapper_checkpoint(tmp_path):
    state = clipcap_transformer_state(clip_dim=64, prefix_length=5, clip_length=3, width=32, layers=2, vocab_size=100)
    torch.save(state, tmp_path / "transformer_weights.pt")
    model = load_clipcap(tmp_path / "transformer_weights.pt")
    shape = model.shape
    assert (shape.mapping, shape.prefix_length, shape.clip_length, shape.mapper_layers) == ("transformer", 5, 3, 2)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.allclose(model.prefix(x), _reference_transformer_mapper(state, x, 3, 2), atol=1e-5)


def test_clipcap_wrong_key_or_shape_is_named(tmp_path):
    state = clipcap_mlp_state(clip_dim=64, prefix_length=4, width=32, vocab_size=100)
    renamed = dict(state)
    renamed["gpt.transformer.ln_final.weight"] = renamed.pop("gpt.transformer.ln_f.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(PcdError, match=r"renamed\.pt: unexpected key 'gpt\.transformer\.ln_final\.weight'"):
        load_clipcap(tmp_path / "renamed.pt")
    reshaped = {**state, "gpt.transformer.h.1.mlp.c_fc.bias": torch.zeros(7)}
    torch.save(reshaped, tmp_path / "reshaped.pt")
    with pytest.raises(PcdError, match=r"reshaped\.pt: key 'gpt\.transformer\.h\.1\.mlp\.c_fc\.bias' has shape \[7\]"):
        load_clipcap(tmp_path / "reshaped.pt")
    no_gpt = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    torch.save(no_gpt, tmp_path / "mapper_only.pt")
    with pytest.raises(PcdError, match=r"mapper_only\.pt: missing key 'gpt\.transformer\.wte\.weight'"):
        load_clipcap(tmp_path / "mapper_only.pt")
    stray_buffer = {**state, "gpt.transformer.h.0.attn.bias_extra": torch.zeros(1)}
    torch.save(stray_buffer, tmp_path / "stray.pt")
    with pytest.raises(PcdError, match=r"stray\.pt: unexpected key 'gpt\.transformer\.h\.0\.attn\.bias_extra'"):
        load_clipcap(tmp_path / "stray.pt")


def test_teacher_from_checkpoints_matches_its_parts(tmp_path):
    model, clip_state = tiny_clip_state()
    torch.save(clip_state, tmp_path / "clip.pt")
    torch.save(clipcap_mlp_state(clip_dim=64, prefix_length=4, width=32, vocab_size=100), tmp_path / "cc.pt")
    teacher = load_teacher("clipcap", tmp_path / "clip.pt", tmp_path / "cc.pt", TINY_CLIP_MODEL)
    ident = teacher.identity
    assert (ident["prefix_length"], ident["prefix_dim"], ident["clip_dim"], ident["random"]) == (4, 32, 64, False)
    assert len(ident["clip_sha256"]) == 64 and ident["clipcap_checkpoint"] == "cc.pt"
    crops = np.stack([clip_resize_crop(smooth_image(90, 120, seed=s), 64) for s in range(3)])
    out = teacher.embed(crops)
    with torch.no_grad():
        embedding = model.encode_image(normalise_images(torch.from_numpy(crops)))  # unnormalised
        assert np.allclose(out.clip, embedding.numpy(), atol=1e-5)
        assert np.allclose(out.prefix, teacher.clipcap.prefix(embedding).numpy(), atol=1e-5)
    assert not np.allclose(np.linalg.norm(out.clip, axis=1), 1.0)


def test_teacher_refuses_mismatched_clip_and_clipcap(tmp_path):
    _, clip_state = tiny_clip_state()
    torch.save(clip_state, tmp_path / "clip.pt")
    torch.save(clipcap_mlp_state(clip_dim=512, prefix_length=4, width=32, vocab_size=100), tmp_path / "cc.pt")
    with pytest.raises(PcdError, match=r"cc\.pt: the mapper takes 512-d CLIP embeddings"):
        load_teacher("clipcap", tmp_path / "clip.pt", tmp_path / "cc.pt", TINY_CLIP_MODEL)


def _generate2(model, prefix: torch.Tensor, stop: int, max_tokens: int = 67) -> list[int]:
    """predict.py's generate2 for one prefix: full forward each step, top-p 0.8 filter, argmax."""
    generated, tokens = prefix[None], []
    for _ in range(max_tokens):
        logits = model.gpt(inputs_embeds=generated, use_cache=False).logits[:, -1, :]
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > 0.8
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[:, sorted_indices[remove]] = -float("inf")
        token = int(torch.argmax(logits, -1))
        tokens.append(token)
        generated = torch.cat((generated, model.gpt.transformer.wte(torch.tensor([[token]]))), dim=1)
        if token == stop:
            break
    return tokens


def test_caption_decoding_with_a_tiny_gpt2_and_tokenizer(tmp_path):
    vocab_size = write_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    stop = stop_token_id(tokenizer)
    assert len(tokenizer) == vocab_size and tokenizer.decode([stop]) == "."
    torch.save(clipcap_mlp_state(clip_dim=64, prefix_length=4, width=32, vocab_size=vocab_size), tmp_path / "cc.pt")
    model = load_clipcap(tmp_path / "cc.pt")
    prefixes = model.prefix(torch.randn(3, 64) * 2).detach()
    captions = greedy_captions(model, prefixes, tokenizer)
    with torch.no_grad():
        reference = [_generate2(model, p, stop) for p in prefixes]
    assert captions == [tokenizer.decode(tokens) for tokens in reference]
    # beam search with one beam is greedy; with five it returns the best length-normalised text
    assert beam_caption(model, prefixes[0], tokenizer, beam_size=1) == captions[0]
    beamed = beam_caption(model, prefixes[0], tokenizer, beam_size=5, max_tokens=10)
    assert isinstance(beamed, str) and beamed

    # a GPT-2 whose every output favours "." stops after one token, greedy and beam alike
    with torch.no_grad():
        direction = torch.randn(32)
        model.gpt.transformer.ln_f.weight.zero_()
        model.gpt.transformer.ln_f.bias.copy_(direction)
        model.gpt.transformer.wte.weight[stop] = 10 * direction
    assert greedy_captions(model, prefixes, tokenizer) == ["."] * 3
    assert beam_caption(model, prefixes[0], tokenizer, beam_size=5) == "."


def test_tokenizer_folder_must_hold_the_bpe_files(tmp_path):
    with pytest.raises(PcdError, match=r"no vocab\.json"):
        load_tokenizer(tmp_path)


def test_tiny_random_teacher_is_seeded_and_flagged():
    first, second = load_teacher("tiny-random"), load_teacher("tiny-random")
    crops = np.stack([clip_resize_crop(smooth_image(50, 70, seed=s), 64) for s in range(2)])
    assert np.array_equal(first.embed(crops).prefix, second.embed(crops).prefix)
    assert first.identity["random"] is True and first.identity["name"] == "tiny-random"
    assert first.embed(crops).prefix.shape == (2, first.identity["prefix_length"], first.identity["prefix_dim"])


def test_open_clip_imports_through_the_shim_in_the_tested_range():
    open_clip = import_open_clip()
    assert import_open_clip() is open_clip
    assert int(open_clip.__version__.split(".")[0]) == 3  # pyproject pins open_clip_torch>=3.0,<4
    assert open_clip.get_model_config("ViT-B-32-quickgelu")["quick_gelu"] is True
