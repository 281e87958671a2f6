"""The model card `pcd export` writes beside the weights (README.md in the export folder).

Everything in it is read from what the run recorded (backbone.json's metadata, RUN_DIR/metrics.jsonl): the data and
scenes the backbone saw, the objective, the teacher (a random teacher is said first), the training length and the
evaluations found in the run. Nothing is typed in by hand, so the card cannot claim what the run did not do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from pcd.pipeline.atomic import atomic_write_bytes

CARD_FILE = "README.md"
_SCENES_SHOWN = 20


def write_model_card(out_dir: Path, document: Mapping[str, Any], run_dir: Path) -> Path:
    """Write out_dir/README.md for the export whose backbone.json is `document` (from `run_dir`)."""
    path = Path(out_dir) / CARD_FILE
    atomic_write_bytes(path, model_card(document, run_evaluations(Path(run_dir))).encode())
    return path


def run_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluation records (`kind: "eval"` in metrics.jsonl), in order; none when it has no log."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a torn last line of a killed run: the card reports what is readable
            continue
        if isinstance(record, dict) and record.get("kind") == "eval":
            found.append(record)
    return found


def model_card(document: Mapping[str, Any], evaluations: list[dict[str, Any]]) -> str:
    """The card's Markdown text."""
    config = document.get("pretrain_config") or {}
    teacher = document.get("teacher") or {}
    source = document.get("source") or {}
    scenes = list(document.get("pretrain_scenes") or [])
    backbone = document.get("backbone") or {}
    normalization = document.get("normalization") or {}
    optim = config.get("optim") or {}
    name = Path(str(source.get("run_dir", "pcd"))).name
    lines = [f"# pcd backbone: {name}", ""]
    if teacher.get("random"):
        lines += ["**Trained on targets of a RANDOM teacher** "
                  f"(`{teacher.get('name', '?')}`): for tests and demos only; it has learnt nothing meaningful.", ""]
    lines += [
        "A Point-MAE encoder (patch tokenizer and transformer) pre-trained by pcd: its point tokens were distilled "
        "from the semantic prefixes a 2D image captioner (the teacher) produced for the RGB frames the points were "
        "back-projected from.", "",
        "```python", "import pcd", 'model = pcd.load_backbone("path/to/this/folder")',
        "encoded = model.encode(points)  # points (N,3) z-up; patch tokens and centres", "```", "",
        "## Input", "",
        f"- Frame: z up (the scan's gravity-aligned frame; camera-frame points are rotated by the pose first).",
        f"- Normalisation: `{normalization.get('name', '?')}` version {normalization.get('version', '?')}: centred "
        "on the centroid and scaled into the unit sphere; `encode` applies it.", "",
        "## Architecture", "",
        "| setting | value |", "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in backbone.items()], "",
        "## Data", "",
        f"- Training shards: `{config.get('shards_dir', '?')}`; split: "
        + (f"`{config['split']}`" if config.get("split") else "none (every scene in the shards)") + ".",
        f"- {len(scenes)} pre-training scenes" + (": " + ", ".join(scenes[:_SCENES_SHOWN])
                                                + (", ..." if len(scenes) > _SCENES_SHOWN else "") if scenes else "")
        + ". The full list is `pretrain_scenes` in backbone.json: results on these scenes are not held-out results.",
        f"- Points per frame: {config.get('num_points', '?')}; augmentation: {config.get('augment', '?')}.", "",
        "## Objective", "",
        f"- `{document.get('objective') or '?'}`" + _settings(config.get("distill")), "",
        "## Teacher", "",
        *[f"- {key}: {_plain(value)}" for key, value in teacher.items() if not isinstance(value, dict)], "",
        "## Training", "",
        f"- Exported checkpoint: `{source.get('checkpoint', '?')}` after {source.get('epoch', '?')} of "
        f"{optim.get('epochs', '?')} epochs.",
        f"- Optimiser: lr {optim.get('lr', '?')}, weight decay {optim.get('weight_decay', '?')}, global batch "
        f"{optim.get('batch_size', '?')}, {optim.get('warmup_epochs', '?')} warm-up epochs.", "",
        "## Evaluation", "",
        *_evaluation_lines(evaluations), "",
        "## Files", "",
        *[f"- `{entry.get('file')}` (sha256 `{entry.get('sha256')}`)"
          for entry in (document.get("weights"), document.get("point_mae"), document.get("heads"))
          if isinstance(entry, dict)],
        "- `backbone.json`: architecture, normalisation, scenes, teacher and the whole pre-training config.", "",
    ]
    return "\n".join(lines)


def _evaluation_lines(evaluations: list[dict[str, Any]]) -> list[str]:
    if not evaluations:
        return ["No evaluation was recorded in this run (pre-training without a validation split)."]
    names = sorted({key for record in evaluations for key in record if key not in ("kind", "epoch", "step")})
    rows = [f"| {record.get('epoch', '?')} | {record.get('step', '?')} | "
            + " | ".join(_number(record.get(name)) for name in names) + " |" for record in evaluations]
    return ["Validation during pre-training (held-out scenes of the run's validation split), by epoch:", "",
            "| epoch | step | " + " | ".join(names) + " |", "| --- | --- | " + " | ".join("---" for _ in names) + " |",
            *rows]


def _settings(section: Optional[Mapping[str, Any]]) -> str:
    if not isinstance(section, Mapping):
        return ""
    shown = {k: v for k, v in section.items() if k != "objective"}
    return (" (" + ", ".join(f"{k} {_plain(v)}" for k, v in shown.items()) + ")") if shown else ""


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
