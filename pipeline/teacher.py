"""The paper's teacher: CLIP ViT-B/32's image embedding, mapped by ClipCap to a 10 x 768 semantic prefix.

CLIP comes from a local file through open_clip (never a pretrained tag: nothing is downloaded): OpenAI's
TorchScript `ViT-B-32.pt` or an open_clip state dict, loaded strictly into `ViT-B-32-quickgelu` because the
OpenAI weights were trained with QuickGELU. ClipCap's MLP checkpoints were trained on the *unnormalised*
`encode_image` output, so that is what is mapped and stored. The tiny random teacher is this same code at
small sizes, for tests and the demo only, and says so loudly wherever it goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from pcd.pipeline.checkpoints import load_strict, read_state_dict
from pcd.pipeline.clipcap import ClipCapShape, ClipCaptionModel, beam_caption, greedy_captions, load_clipcap, random_clipcap
from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import sha256_file
from pcd.pipeline.torchvision_compat import import_open_clip

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODEL = "ViT-B-32-quickgelu"
# Keys of OpenAI's TorchScript model that are hyper-parameters, not weights (open_clip drops them too).
OPENAI_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")

TINY_CLIP_MODEL = "pcd-tiny-quickgelu"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}
TINY_CLIPCAP_SHAPE = ClipCapShape("mlp", clip_dim=64, prefix_length=4, mlp_hidden=(64,), gpt_vocab=512,
                                  gpt_positions=128, gpt_width=32, gpt_layers=2)
TINY_SEED = 0

Precision = Literal["fp16", "bf16", "fp32"]


def clip_model_config(name: str) -> dict[str, Any]:
    """The open_clip architecture config for `name` (an open_clip model name or pcd's tiny model)."""
    if name == TINY_CLIP_MODEL:
        return {**TINY_CLIP_CONFIG}
    config = import_open_clip().get_model_config(name)
    if config is None:
        raise PcdError(f"unknown open_clip model '{name}' (use {DEFAULT_CLIP_MODEL} for the paper's teacher)")
    if "timm_model_name" in config.get("vision_cfg", {}) or "hf_model_name" in config.get("text_cfg", {}):
        raise PcdError(f"open_clip model '{name}' needs timm/HF towers; the teacher supports plain CLIP models")
    return config


def build_clip(name: str) -> nn.Module:
    """An open_clip `CLIP` of architecture `name` with freshly initialised weights, float32, eval mode."""
    config = clip_model_config(name)
    config.pop("custom_text", None)
    return import_open_clip().CLIP(**config).eval()


def load_clip(name: str, path: Path) -> nn.Module:
    """open_clip model `name` with the weights of a local file, loaded strictly and cast to float32."""
    state = read_state_dict(path, "CLIP")
    for key in OPENAI_NON_WEIGHT_KEYS:
        state.pop(key, None)
    model = build_clip(name)
    load_strict(model, state, path, f"open_clip {name}")
    return model


def normalise_images(crops: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) centre crops -> CLIP input (B, 3, S, S): ToTensor then Normalize(OpenAI mean, std)."""
    x = crops.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class TeacherOutput:
    clip: np.ndarray  # float32 (B, clip_dim), unnormalised
    prefix: np.ndarray  # float32 (B, prefix_length, prefix_dim)
    patch_tokens: Optional[np.ndarray] = None  # float32 (B, g*g, width), row-major grid; only when asked for


@dataclass
class Teacher:
    """CLIP + ClipCap on one device; `identity` is what the manifests record about it."""

    clip: nn.Module
    clipcap: ClipCaptionModel
    identity: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = "fp16"

    @property
    def image_size(self) -> int:
        return int(self.identity["image_size"])

    def to(self, device: torch.device) -> "Teacher":
        self.clip.to(device)
        self.clipcap.to(device)
        self.device = device
        return self

    def patch_token_info(self) -> dict[str, Any]:
        """What `embed(..., patch_tokens=True)` returns, for the manifest: grid, cell size and width of CLIP's patch
        tokens, and the open_clip version, which decides whether they went through `ln_post` (2.23 and later)."""
        visual = self.clip.visual
        version = import_open_clip().__version__
        major, minor = (int(part) for part in version.split(".")[:2])
        return {"grid": int(visual.grid_size[0]), "cell": int(visual.patch_size[0]), "image_size": self.image_size,
                "width": int(visual.transformer.width), "open_clip": version, "ln_post": (major, minor) >= (2, 23)}

    @torch.no_grad()
    def embed(self, crops: np.ndarray, patch_tokens: bool = False) -> TeacherOutput:
        """uint8 centre crops (B, S, S, 3) -> unnormalised CLIP embeddings and ClipCap prefixes, and with
        `patch_tokens` the visual tower's patch tokens (unprojected; see `patch_token_info`).

        CLIP runs under fp16/bf16 autocast on a GPU (as ClipCap's features were made in fp16); the
        mapper gets the float32 embedding, as predict.py does.
        """
        images = torch.from_numpy(crops)
        if self.device.type == "cuda":  # page-locked, so that the copy runs asynchronously beside the GPU's work
            images = images.pin_memory()
        x = normalise_images(images.to(self.device, non_blocking=True))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        autocast = self.device.type == "cuda" and dtype is not None
        tokens = None
        with torch.autocast(self.device.type, dtype=dtype, enabled=autocast):
            if patch_tokens:  # open_clip's visual tower returns (pooled, tokens) while output_tokens is set
                self.clip.visual.output_tokens = True
                try:
                    embedding, tokens = self.clip.visual(x)
                finally:
                    self.clip.visual.output_tokens = False
            else:
                embedding = self.clip.encode_image(x)
        embedding = embedding.float()
        prefix = self.clipcap.prefix(embedding)
        return TeacherOutput(embedding.cpu().numpy(), prefix.float().cpu().numpy(),
                             tokens.float().cpu().numpy() if tokens is not None else None)

    @torch.no_grad()
    def captions(self, prefixes: np.ndarray, tokenizer: Any, beam_size: int = 0) -> list[str]:
        """Decode prefixes with the checkpoint's own GPT-2: greedy, or beam search when beam_size > 1."""
        prefix = torch.from_numpy(prefixes).float().to(self.device)
        if beam_size > 1:
            return [beam_caption(self.clipcap, p, tokenizer, beam_size) for p in prefix]
        return greedy_captions(self.clipcap, prefix, tokenizer)


def _identity(name: str, random: bool, clip_model: str, clip: nn.Module, clipcap: ClipCaptionModel,
              files: dict[str, Optional[Path]]) -> dict[str, Any]:
    shape = clipcap.shape
    clip_dim = int(clip.visual.output_dim)
    if clip_dim != shape.clip_dim:
        raise PcdError(f"{files.get('clipcap') or 'ClipCap'}: the mapper takes {shape.clip_dim}-d CLIP embeddings, "
                       f"open_clip {clip_model} gives {clip_dim}-d")
    identity: dict[str, Any] = {
        "name": name, "random": random, "clip_model": clip_model, "embedding": "unnormalised",
        "image_size": int(clip.visual.image_size[0]), "clip_dim": clip_dim,
        "prefix_length": shape.prefix_length, "prefix_dim": shape.gpt_width, "mapping": shape.mapping,
        "clipcap": shape.to_json(),
    }
    for role, path in files.items():
        identity[f"{role}_checkpoint"] = Path(path).name if path else None
        identity[f"{role}_sha256"] = sha256_file(path) if path else None
    return identity


def load_teacher(kind: str = "clipcap", clip: Optional[Path] = None, clipcap: Optional[Path] = None,
                 clip_model: str = DEFAULT_CLIP_MODEL, vocab_size: Optional[int] = None) -> Teacher:
    """The teacher on the CPU: 'clipcap' from the user's two checkpoint files, or 'tiny-random'.

    `vocab_size` sizes the tiny teacher's GPT-2 to a caption tokenizer; the real one takes it from ClipCap.
    """
    if kind == "tiny-random":
        shape = TINY_CLIPCAP_SHAPE if vocab_size is None else replace(TINY_CLIPCAP_SHAPE, gpt_vocab=vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            clip_net = build_clip(TINY_CLIP_MODEL)
        clipcap_net = random_clipcap(shape, TINY_SEED + 1)
        identity = _identity("tiny-random", True, TINY_CLIP_MODEL, clip_net, clipcap_net, {"clip": None, "clipcap": None})
        identity["seed"] = TINY_SEED
        return Teacher(clip_net, clipcap_net, identity)
    if kind != "clipcap":
        raise PcdError(f"unknown teacher '{kind}' (use 'clipcap', or 'tiny-random' for tests and demos)")
    if clip is None or clipcap is None:
        raise PcdError("the clipcap teacher needs --clip (e.g. ViT-B-32.pt) and --clipcap (e.g. conceptual_weights.pt)")
    clip_net = load_clip(clip_model, Path(clip))
    clipcap_net = load_clipcap(Path(clipcap))
    identity = _identity("clipcap", False, clip_model, clip_net, clipcap_net, {"clip": clip, "clipcap": clipcap})
    return Teacher(clip_net, clipcap_net, identity)
