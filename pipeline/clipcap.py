"""ClipCap (rmokady/CLIP_prefix_caption): the mapping network from a CLIP embedding to a GPT-2 prefix.

The modules keep the upstream attribute names, so a released checkpoint's state dict (`clip_project.*`,
`gpt.*`) loads into `ClipCaptionModel` key for key. Sizes are read from the checkpoint's shapes; GPT-2 is
built from a config (never downloaded) because the checkpoints hold all of its fine-tuned weights.
Decoding follows predict.py: greedy (`generate2`, whose top-p filter cannot change the argmax) or
length-normalised beam search (`generate_beam`), stopping at the "." token, at most 67 tokens.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pcd.pipeline.checkpoints import load_strict, read_state_dict
from pcd.pipeline.errors import PcdError
from pcd.pipeline.torchvision_compat import import_torchvision

Mapping = Literal["mlp", "linear", "transformer"]
TRANSFORMER_HEADS = 8  # fixed in TransformerMapper upstream
GPT2_HEAD_WIDTH = 64  # every released GPT-2 size (small 768/12 ... xl 1600/25)
LEGACY_GPT2_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
CAPTION_MAX_TOKENS = 67
STOP_TOKEN = "."


@dataclass(frozen=True)
class ClipCapShape:
    """Everything needed to build a ClipCap model; read from a checkpoint or chosen for the tiny teacher."""

    mapping: Mapping
    clip_dim: int
    prefix_length: int
    mlp_hidden: tuple[int, ...] = ()  # hidden widths of the MLP mapper (3840 for the released models)
    clip_length: int = 0  # transformer mapper only
    mapper_layers: int = 0  # transformer mapper only
    gpt_vocab: int = 50257
    gpt_positions: int = 1024
    gpt_width: int = 768
    gpt_layers: int = 12

    @property
    def gpt_heads(self) -> int:
        return max(1, self.gpt_width // GPT2_HEAD_WIDTH)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mlp_hidden": list(self.mlp_hidden), "gpt_heads": self.gpt_heads}


class MLP(nn.Module):
    """Linear layers with Tanh between them (not after the last), as upstream's `MLP(sizes)`."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c))


class TransformerLayer(nn.Module):
    """Pre-norm self-attention block with residuals; MLP ratio 2 and ReLU as upstream's `Transformer`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MlpTransformer(dim, int(dim * 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """[linear(clip) reshaped to clip_length tokens ; learned prefix constants] -> transformer -> last tokens."""

    def __init__(self, clip_dim: int, width: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(width, TRANSFORMER_HEADS, num_layers)
        self.linear = nn.Linear(clip_dim, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length:]


class ClipCaptionModel(nn.Module):
    """`clip_project` (the mapper) and `gpt` (GPT-2 with LM head), named as in the released checkpoints."""

    def __init__(self, shape: ClipCapShape):
        super().__init__()
        import_torchvision()  # transformers' GPT-2 imports torchvision when it is installed
        from transformers import GPT2Config, GPT2LMHeadModel

        self.shape = shape
        width = shape.gpt_width
        if shape.mapping == "mlp":
            sizes = (shape.clip_dim, *shape.mlp_hidden, width * shape.prefix_length)
            self.clip_project: nn.Module = MLP(sizes)
        elif shape.mapping == "linear":
            self.clip_project = nn.Linear(shape.clip_dim, width * shape.prefix_length)
        else:
            self.clip_project = TransformerMapper(shape.clip_dim, width, shape.prefix_length, shape.clip_length,
                                                  shape.mapper_layers)
        config = GPT2Config(vocab_size=shape.gpt_vocab, n_positions=shape.gpt_positions, n_embd=width,
                            n_layer=shape.gpt_layers, n_head=shape.gpt_heads,
                            bos_token_id=shape.gpt_vocab - 1, eos_token_id=shape.gpt_vocab - 1)
        self.gpt = GPT2LMHeadModel(config)

    def prefix(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, clip_dim) CLIP embeddings -> (B, prefix_length, gpt_width) prefixes."""
        return self.clip_project(embedding).reshape(embedding.shape[0], self.shape.prefix_length, -1)


def infer_shape(state: dict[str, torch.Tensor], path: Path) -> ClipCapShape:
    """Read the mapping type and every size from a ClipCap state dict's shapes."""
    wte = state.get("gpt.transformer.wte.weight")
    wpe = state.get("gpt.transformer.wpe.weight")
    if wte is None or wpe is None:
        missing = "gpt.transformer.wte.weight" if wte is None else "gpt.transformer.wpe.weight"
        raise PcdError(f"{path}: missing key '{missing}' (not a ClipCap checkpoint with its GPT-2 weights)")
    width = wte.shape[1]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k))}
    gpt = dict(gpt_vocab=wte.shape[0], gpt_positions=wpe.shape[0], gpt_width=width, gpt_layers=len(layers))

    def prefix_length_of(out_features: int) -> int:
        if out_features % width:
            raise PcdError(f"{path}: mapper output {out_features} is not a multiple of GPT-2 width {width}")
        return out_features // width

    if "clip_project.model.0.weight" in state:
        weights = [state[k] for k in sorted((k for k in state if re.fullmatch(r"clip_project\.model\.\d+\.weight", k)),
                                            key=lambda k: int(k.split(".")[2]))]
        return ClipCapShape("mlp", clip_dim=weights[0].shape[1], prefix_length=prefix_length_of(weights[-1].shape[0]),
                            mlp_hidden=tuple(w.shape[0] for w in weights[:-1]), **gpt)
    if "clip_project.weight" in state:
        weight = state["clip_project.weight"]
        return ClipCapShape("linear", clip_dim=weight.shape[1], prefix_length=prefix_length_of(weight.shape[0]), **gpt)
    if "clip_project.linear.weight" in state and "clip_project.prefix_const" in state:
        linear = state["clip_project.linear.weight"]
        mapper_layers = {int(m.group(1)) for k in state
                         if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))}
        return ClipCapShape("transformer", clip_dim=linear.shape[1],
                            prefix_length=state["clip_project.prefix_const"].shape[0],
                            clip_length=prefix_length_of(linear.shape[0]), mapper_layers=len(mapper_layers), **gpt)
    raise PcdError(f"{path}: no ClipCap mapper keys (clip_project.model.0.weight, clip_project.weight or "
                   f"clip_project.linear.weight + clip_project.prefix_const)")


def load_clipcap(path: Path) -> ClipCaptionModel:
    """A ClipCap model from a local checkpoint, loaded strictly (legacy GPT-2 mask buffers dropped by name)."""
    state = read_state_dict(path, "ClipCap")
    if "gpt.lm_head.weight" not in state and "gpt.transformer.wte.weight" in state:
        state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"]  # tied; some savers omit it
    model = ClipCaptionModel(infer_shape(state, path))
    load_strict(model, state, path, "ClipCap", droppable=lambda key: bool(LEGACY_GPT2_BUFFER.match(key)))
    return model.eval()


def random_clipcap(shape: ClipCapShape, seed: int) -> ClipCaptionModel:
    """A ClipCap model with seeded random weights (the tiny test/demo teacher)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipCaptionModel(shape).eval()


def load_tokenizer(folder: Path) -> Any:
    """GPT-2 BPE tokenizer from a local folder with vocab.json and merges.txt (never downloaded)."""
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise PcdError(f"{folder}: no {name} (a GPT-2 tokenizer folder needs vocab.json and merges.txt)")
    import_torchvision()
    from transformers import GPT2Tokenizer

    try:
        return GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as exc:  # malformed vocabulary or merges
        raise PcdError(f"{folder}: not a GPT-2 tokenizer ({type(exc).__name__}: {exc})") from None


def stop_token_id(tokenizer: Any) -> int:
    return tokenizer.encode(STOP_TOKEN)[0]


@torch.no_grad()
def greedy_captions(model: ClipCaptionModel, prefixes: torch.Tensor, tokenizer: Any,
                    max_tokens: int = CAPTION_MAX_TOKENS) -> list[str]:
    """predict.py's `generate2` for a batch: argmax token by token until "." (kept) or `max_tokens`.

    All prefixes have the same length, so batching needs no padding; a KV cache replaces re-running the
    whole sequence, which gives the same tokens.
    """
    stop = stop_token_id(tokenizer)
    gpt = model.gpt
    batch = prefixes.shape[0]
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=prefixes.device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=prefixes.device)
    inputs, past = prefixes, None
    for _ in range(max_tokens):
        out = gpt(inputs_embeds=inputs, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_token = out.logits[:, -1, :].argmax(-1)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        stopped |= next_token == stop
        if bool(stopped.all()):
            break
        inputs = gpt.transformer.wte(next_token)[:, None, :]
    texts = []
    for row in tokens.tolist():
        end = row.index(stop) + 1 if stop in row else len(row)
        texts.append(tokenizer.decode(row[:end]))
    return texts


@torch.no_grad()
def beam_caption(model: ClipCaptionModel, prefix: torch.Tensor, tokenizer: Any, beam_size: int = 5,
                 max_tokens: int = CAPTION_MAX_TOKENS) -> str:
    """predict.py's `generate_beam` for one (L, D) prefix: the best length-normalised beam's text."""
    stop = stop_token_id(tokenizer)
    gpt = model.gpt
    device = prefix.device
    generated = prefix[None].float()
    tokens: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    seq_lengths = torch.ones(beam_size, device=device)
    is_stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
    for _ in range(max_tokens):
        logits = gpt(inputs_embeds=generated, use_cache=False).logits[:, -1, :].float().log_softmax(-1)
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            average, next_tokens = (scores_sum / seq_lengths[:, None]).view(-1).topk(beam_size, -1)
            source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = average * seq_lengths
            is_stopped = is_stopped[source]
        embedded = gpt.transformer.wte(next_tokens.view(-1)).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, embedded.to(generated.dtype)), dim=1)
        is_stopped = is_stopped | next_tokens.view(-1).eq(stop)
        if bool(is_stopped.all()):
            break
    best = int((scores / seq_lengths).argmax())
    return tokenizer.decode(tokens[best, : int(seq_lengths[best])].tolist())


def decode_captions(model: ClipCaptionModel, prefixes: torch.Tensor, tokenizer: Any, beam_size: int = 0) -> list[str]:
    """Captions of (B, L, D) prefixes with the checkpoint's own GPT-2: greedy, or beam search when beam_size > 1.

    The one decoding path: `pcd cache-teacher` decodes the teacher's prefixes with it, `pcd caption` the student's.
    """
    if beam_size > 1:
        return [beam_caption(model, p, tokenizer, beam_size) for p in prefixes]
    return greedy_captions(model, prefixes, tokenizer)
