"""The pre-training heads an export keeps beside the backbone: `heads.safetensors`.

`pcd export` writes the backbone alone into `backbone.safetensors` and `point_mae.pth` (Point-MAE-compatible), and
everything else the run trained into `heads.safetensors`, so later commands (`pcd evaluate reconstruction`) can use
it:
- the reconstruction decoder (objectives `reconstruct`, `distill+reconstruct`) under Point-MAE's key names:
  `mask_token`, `decoder_pos_embed.*`, `MAE_decoder.blocks.<i>.*`, `MAE_decoder.norm.*`, `increase_dim.0.*`; with
  `point_mae.pth` it makes up a Point-MAE pre-training checkpoint;
- the distillation heads under pcd's names: `concept_tokens`, `concept_block.*`, `concept_norm.*`, `head.*`
  (`distill`, `distill-no-concept`, `distill-clip`, `distill+reconstruct`), `local_head.*` (`distill-local`).
`backbone.json` describes the file under `heads`: its name and sha256, the objective, and what each part was built
with (`decoder`: the ReconstructConfig; `distill`: the DistillConfig, teacher prefix shape and CLIP width; `local`:
the patch tokens' grid and width), null for a part the run does not have.

A Point-MAE pre-training checkpoint carries its decoder under the same names, so `read_decoder` takes either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Optional

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from pcd.pipeline.atomic import atomic_write_bytes
from pcd.pipeline.config import config_from_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer.backbone import BackboneConfig
from pcd.trainer.reconstruct import ReconstructConfig, ReconstructionDecoder
from pcd.trainer.weights import METADATA_FILE, read_weights

HEADS_FILE = "heads.safetensors"
DECODER_PREFIX = "decoder."  # the decoder's prefix in pcd's training state dicts, dropped in heads.safetensors
_DECODER_KEYS = ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.")


def heads_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Everything but the backbone of a training state dict, the decoder under Point-MAE's names."""
    out = {}
    for key, value in model_state.items():
        key = key.replace("module.", "")
        if key.startswith("backbone."):
            continue
        out[key.removeprefix(DECODER_PREFIX)] = value.detach().cpu().clone().contiguous()
    return out


def write_heads(out_dir: Path, model_state: Mapping[str, Tensor], run_config: Mapping[str, Any], objective: str,
                teacher: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Write heads.safetensors (atomically) and return its `heads` entry for backbone.json; None if the model has
    nothing beside its backbone."""
    state = heads_state(model_state)
    if not state:
        return None
    data = save_safetensors_bytes(state, metadata={"format": "pcd-heads", "objective": objective})
    atomic_write_bytes(Path(out_dir) / HEADS_FILE, data)
    teacher = teacher or {}
    has = {part: any(key.startswith(prefixes) for key in state)
           for part, prefixes in (("decoder", _DECODER_KEYS), ("distill", ("concept_", "head.")),
                                  ("local", ("local_head.",)))}
    return {"file": HEADS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "objective": objective,
            "decoder": {"config": run_config.get("reconstruct")} if has["decoder"] else None,
            "distill": {"config": run_config.get("distill"),
                        "prefix_shape": [teacher.get("prefix_length"), teacher.get("prefix_dim")],
                        "clip_dim": teacher.get("clip_dim")} if has["distill"] else None,
            "local": {"patch_tokens": teacher.get("patch_tokens")} if has["local"] else None}


def read_decoder(path: Path, backbone_cfg: BackboneConfig) -> Optional[tuple[ReconstructionDecoder, dict[str, Any]]]:
    """The trained decoder of a pcd export (folder, backbone.json or a weight file of one) or of a Point-MAE
    pre-training checkpoint, loaded strictly, with a description of where it came from; None if there is none."""
    path = Path(path)
    kind, state, metadata = read_weights(path)
    if metadata is not None:
        heads = metadata.get("heads")
        if not isinstance(heads, dict) or not heads.get("decoder"):
            return None
        folder = path if path.is_dir() else path.parent
        heads_path = folder / heads["file"]
        state = _read_heads_file(heads_path, heads.get("sha256"))
        try:
            cfg = config_from_dict(ReconstructConfig, heads["decoder"]["config"])
        except (PcdError, TypeError) as exc:
            raise PcdError(f"{folder / METADATA_FILE}: 'heads.decoder.config' is not a reconstruction config "
                           f"({exc})") from None
        source = {"kind": "pcd-export heads", "file": str(heads_path)}
    else:
        state = {key.replace("module.", ""): value for key, value in state.items()}
        blocks = {int(key.split(".")[2]) for key in state if key.startswith("MAE_decoder.blocks.")}
        if not blocks:
            return None
        cfg = ReconstructConfig(decoder_depth=max(blocks) + 1)
        source = {"kind": f"{kind} (Point-MAE decoder keys)", "file": str(path)}
    decoder_state = {key: value for key, value in state.items() if key.startswith(_DECODER_KEYS)}
    decoder = ReconstructionDecoder(backbone_cfg, cfg)
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(decoder_state))
    if missing:
        raise PcdError(f"{source['file']}: decoder key '{missing[0]}' is missing")
    for key, value in decoder_state.items():
        if key not in expected or tuple(value.shape) != tuple(expected[key].shape):
            want = tuple(expected[key].shape) if key in expected else "no such key"
            raise PcdError(f"{source['file']}: decoder key '{key}' has shape {tuple(value.shape)}, the decoder "
                           f"needs {want}")
    decoder.load_state_dict(decoder_state, strict=True)
    return decoder, {**source, "config": cfg}


def read_distill_heads(export_dir: Path, heads: Mapping[str, Any]) -> dict[str, Tensor]:
    """The distillation heads of an export (`concept_*`, `head.*` under DistillModel's names), checked against the
    sha256 its backbone.json records; the reconstruction decoder, if any, is left out."""
    state = _read_heads_file(Path(export_dir) / str(heads["file"]), heads.get("sha256"))
    return {key: value for key, value in state.items() if not key.startswith(_DECODER_KEYS)}


def _read_heads_file(path: Path, sha256: Optional[str]) -> dict[str, Tensor]:
    if not path.is_file():
        raise PcdError(f"{path}: heads file missing from the export")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise PcdError(f"{path}: sha256 does not match {METADATA_FILE} (file changed or truncated)")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as exc:
        raise PcdError(f"{path}: not a readable safetensors file ({exc})") from None
