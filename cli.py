"""The `pcd` command line: one typer command per pipeline step, each driven by a typed config.

The fine-tune and evaluation commands are generated from the task registry (`pcd.trainer.tasks.TASKS`), one
pair per task, each with the options its entry lists. Every command builds its config the same way: dataclass defaults (the paper's settings), then
`--preset NAME`, then the command's own options, then `--set key=value` overrides. Command modules are
imported only when their command runs, so `pcd extract-scannet` never imports torch.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from pcd.pipeline.config import command_config
from pcd.pipeline.errors import PcdError, Preempted
from pcd.pipeline.socket_folder import ensure_short_socket_folder
from pcd.trainer.tasks import TASKS, Param, evaluate_command, finetune_command, predict_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="pcd: 3D point-cloud pre-training by knowledge distillation from 2D images.")
prepare_app = typer.Typer(no_args_is_help=True, help="Turn raw datasets into the files a fine-tune reads.")
finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune a pre-trained backbone on a downstream task.")
evaluate_app = typer.Typer(no_args_is_help=True, help="Evaluate a fine-tuned run.")
experiment_app = typer.Typer(no_args_is_help=True, help="Paper tables as data: run every cell, report beside the "
                                                        "paper's numbers.")
manifest_app = typer.Typer(no_args_is_help=True, help="Manifests of shard folders.")
app.add_typer(prepare_app, name="prepare")
app.add_typer(finetune_app, name="finetune")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(experiment_app, name="experiment")
app.add_typer(manifest_app, name="manifest")
predict_app = typer.Typer(no_args_is_help=True, help="Label new data with a fine-tuned run.")
app.add_typer(predict_app, name="predict")


def print_version(value: bool) -> None:
    if value:
        from pcd import __version__

        typer.echo(f"pcd {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                              help="Print pcd's version and exit.")) -> None:
    """pcd: 3D point-cloud pre-training by knowledge distillation from 2D images."""
    ensure_short_socket_folder()


PresetOpt = typer.Option(None, "--preset", help="Named preset from manifests/presets.toml.")
SetOpt = typer.Option(None, "--set", help="Override any config field: --set key=value (repeatable).")
LogOpt = typer.Option(None, "--log", help="Also log to: wandb (repeatable; needs pcd-distill[wandb]).")
AllowPipeOpt = typer.Option(None, "--allow-pipe", help="Let the shard source be 'pipe:COMMAND' with {name} in it "
                            "(runs a shell command per file; see docs/cluster.md).")
PartOpt = typer.Option(None, "--part", help="Do part I of N (I from 0) of the scenes, by a hash of their names; "
                       "'slurm': this task of an sbatch --array job (see docs/cluster.md).")


def run_command(module: str, command: str, preset: Optional[str], sets: Optional[list[str]],
                fields: dict[str, Any]) -> None:
    """Build `module.Config` for `command` and call `module.run(cfg)`; exits with its return code.

    `fields` are the command's own options; those left at None keep the preset's or default value.
    """
    try:
        mod = importlib.import_module(module)
        code = mod.run(command_config(mod.Config, command, preset, fields, sets or []))
    except PcdError as exc:
        typer.echo(f"error: {error_message(exc)}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # the last resort: never a traceback, always the path (when known) and the reason
        typer.echo(f"error: {os_error_message(exc)}", err=True)
        raise typer.Exit(2) from None
    except Preempted as exc:  # a training run stopped by SIGTERM/SIGUSR1 after saving: resumable, not failed
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(int(code or 0))


def one_line(message: str) -> str:
    """Collapse a message to one line: some library errors (tarfile's) span several."""
    return " ".join(message.split())


def error_message(exc: PcdError) -> str:
    """The error's own line, also when a DataLoader worker raised it: torch re-raises it in the main process
    with the worker's whole traceback as its message, ending in `...PcdError: <the message>`."""
    text = str(exc)
    if text.startswith("Caught PcdError"):
        text = text.rpartition("PcdError: ")[2]
    return one_line(text)


def os_error_message(exc: OSError) -> str:
    """The one-line error for a file-system failure no command foresaw, e.g. a file where a folder goes. A
    `write()` error carries no file name: then the reason is all there is to say."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return one_line(reason)
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        path = Path(exc.filename)
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        return f"{in_the_way}: a file is in the way where a folder is needed"
    target = f" -> {exc.filename2}" if exc.filename2 else ""
    return one_line(f"{exc.filename}{target}: {reason}")


@app.command("extract-scannet")
def extract_scannet(
    scans_dir: Path = typer.Argument(..., help="ScanNet scans folder: <scene>/<scene>.sens or exported folders."),
    out_dir: Path = typer.Argument(..., help="Output folder for shards and manifest.json."),
    split: Optional[Path] = typer.Option(None, help="Split file (one scene id per line), e.g. scannetv2_train.txt."),
    scenes: Optional[str] = typer.Option(None, help="Comma-separated scene ids (instead of a split file)."),
    frame_skip: Optional[int] = typer.Option(None, help="Keep frames whose index is a multiple of this (25)."),
    points: Optional[int] = typer.Option(None, help="Points stored per frame (8192)."),
    workers: Optional[int] = typer.Option(None, help="Scenes processed in parallel."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard."),
    part: Optional[str] = PartOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Stream ScanNet RGB-D scans into WebDataset shards of point clouds paired with their frames."""
    # Extraction does no linear algebra: spare numpy's import the start of OpenBLAS's thread pool (~0.05 s of
    # CPU per run and per worker, which inherit the setting); it takes effect as numpy is not imported yet.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run_command("pcd.pipeline.extract", "extract-scannet", preset, set_, {
        "scans_dir": scans_dir, "out_dir": out_dir, "split": split,
        "scenes": scenes.split(",") if scenes else None, "frame_skip": frame_skip, "points": points,
        "workers": workers, "shard_size": shard_size, "part": part})


@app.command("cache-teacher")
def cache_teacher(
    extracted_dir: str = typer.Argument(..., help="Output folder of `pcd extract-scannet`, a brace pattern of its "
                                        "shards, or an s3://, gs://, http(s):// URL of either."),
    out_dir: Path = typer.Argument(..., help="Output folder for training shards."),
    teacher: Optional[str] = typer.Option(None, help="'clipcap' (real weights, default) or 'tiny-random' (tests/demo)."),
    clip: Optional[Path] = typer.Option(None, help="CLIP ViT-B/32 weights: OpenAI ViT-B-32.pt or an open_clip state dict."),
    clipcap: Optional[Path] = typer.Option(None, help="ClipCap checkpoint, e.g. conceptual_weights.pt."),
    captions: Optional[bool] = typer.Option(None, "--captions/--no-captions", help="Also decode a caption per frame."),
    tokenizer: Optional[Path] = typer.Option(None, help="Local GPT-2 tokenizer folder (vocab.json, merges.txt)."),
    keep_images: Optional[bool] = typer.Option(None, "--keep-images/--no-keep-images", help="Copy the JPEG too."),
    patch_tokens: Optional[bool] = typer.Option(None, "--patch-tokens/--no-patch-tokens",
                                                help="Also store CLIP's patch tokens (for the distill-local objective)."),
    clip_model: Optional[str] = typer.Option(None, help="open_clip architecture of --clip (ViT-B-32-quickgelu)."),
    beam_size: Optional[int] = typer.Option(None, help="Caption beam width: 0 greedy (default), 5 as predict.py."),
    batch_size: Optional[int] = typer.Option(None, help="Frames per teacher batch."),
    workers: Optional[int] = typer.Option(None, help="JPEG decode processes (default: CPU cores - 1; 0: none)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: cuda when available)."),
    precision: Optional[str] = typer.Option(None, help="CLIP on a GPU: fp16 (default), bf16 or fp32 (recorded)."),
    part: Optional[str] = PartOpt,
    allow_pipe: Optional[bool] = AllowPipeOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run CLIP + ClipCap once over the extracted frames and write the semantic prefixes into training shards."""
    run_command("pcd.pipeline.cache_teacher", "cache-teacher", preset, set_, {
        "extracted_dir": extracted_dir, "out_dir": out_dir, "teacher": teacher, "clip": clip,
        "clipcap": clipcap, "captions": captions, "tokenizer": tokenizer, "keep_images": keep_images,
        "patch_tokens": patch_tokens,
        "clip_model": clip_model, "beam_size": beam_size, "batch_size": batch_size, "workers": workers,
        "device": device, "precision": precision, "part": part, "allow_pipe": allow_pipe})


@manifest_app.command("merge")
def manifest_merge(
    folder: Path = typer.Argument(..., help="An output folder of extract-scannet or cache-teacher run with --part."),
) -> None:
    """Write the single manifest.json of a folder written in parts, once every part has finished."""
    run_command("pcd.pipeline.manifest_merge", "manifest-merge", None, None, {"folder": folder})


@app.command("pretrain")
def pretrain(
    shards_dir: str = typer.Argument(..., help="Output folder of `pcd cache-teacher` (or of `pcd extract-scannet` "
                                     "for an objective that needs no teacher, e.g. reconstruct), a brace pattern of "
                                     "its shards, or an s3://, gs://, http(s):// URL of either."),
    run_dir: Path = typer.Argument(..., help="Run folder: checkpoints, logs, resolved config."),
    objective: Optional[str] = typer.Option(None, help="distill (default), distill-no-concept, distill-clip, "
                                                       "distill-local, reconstruct or distill+reconstruct."),
    split: Optional[Path] = typer.Option(None, help="Split file of the pre-training scenes (ScanNet train split)."),
    val_split: Optional[Path] = typer.Option(None, help="Split file of held-out scenes for the validation loss."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the run's last checkpoint."),
    init: Optional[Path] = typer.Option(None, help="Initial backbone weights (pcd export or Point-MAE .pth)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda (default: cuda when available)."),
    log: Optional[list[str]] = LogOpt,
    allow_pipe: Optional[bool] = AllowPipeOpt,
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Pre-train the student with one objective: distillation of the cached teacher, or its ablations (works under
    torchrun).

    On SIGTERM or SIGUSR1 (a cluster's preemption notice) it saves a checkpoint and exits with status 75:
    rerun with --resume to continue exactly where it stopped."""
    run_command("pcd.trainer.pretrain", "pretrain", preset, set_, {
        "shards_dir": shards_dir, "run_dir": run_dir, "objective": objective, "split": split, "val_split": val_split,
        "runtime.resume": resume, "init": init, "runtime.device": device, "runtime.log": log or None,
        "allow_pipe": allow_pipe})


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="A `pcd pretrain` run folder."),
    out_dir: Optional[Path] = typer.Option(None, help="Where to write (default: RUN_DIR/export)."),
    checkpoint: Optional[str] = typer.Option(None, help="'last' (default) or a checkpoint file name."),
) -> None:
    """Export the backbone as safetensors + config, and as a Point-MAE checkpoint."""
    run_command("pcd.trainer.export", "export", None, None,
                {"run_dir": run_dir, "out_dir": out_dir, "checkpoint": checkpoint})


@prepare_app.command("scannet")
@prepare_app.command("scannet-detection", hidden=True)
def prepare_scannet(
    scans_dir: Path = typer.Argument(..., help="Raw ScanNet scans (<scene>/<scene>_vh_clean_2.ply, ...)."),
    out_dir: Path = typer.Argument(..., help="Output folder for <scene>_vert.npy, _sem_label, _ins_label, _bbox "
                                             "(detection) and _full_vert, _full_sem_label (every vertex)."),
    label_map: Optional[Path] = typer.Option(None, help="scannetv2-labels.combined.tsv."),
    split: Optional[list[Path]] = typer.Option(None, help="Split file(s) naming the scenes to prepare."),
    workers: Optional[int] = typer.Option(None, help="Scenes processed in parallel."),
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Prepare ScanNet scans for detection (VoteNet's files) and semantic segmentation (every vertex and its label);
    `scannet-detection` is the old name of this command."""
    run_command("pcd.trainer.detection.prepare", "prepare-scannet", preset, set_, {
        "scans_dir": scans_dir, "out_dir": out_dir, "label_map": label_map,
        "splits": list(split) if split else None, "workers": workers})


FINETUNE_SHARED = (
    Param("init", Path, "pcd export folder/file or Point-MAE .pth; none = from scratch."),
    Param("resume", bool, "Continue from the run's last checkpoint.", key="runtime.resume"),
    Param("device", str, "cpu, cuda (default: cuda when available).", key="runtime.device"),
    Param("log", list[str], "Also log to: wandb (repeatable; needs pcd-distill[wandb]).", key="runtime.log"),
)
EVALUATE_SHARED = (
    Param("checkpoint", str, "'last' (default), 'best' (on the validation split, when the run kept one) or a file."),
    Param("passes", int, "Seeded evaluation passes, reported as mean ± std."),
    Param("device", str, "cpu, cuda (default: cuda when available)."),
)


def _typer_parameter(param: Param) -> inspect.Parameter:
    """The typer argument or option of one registry parameter (all options default to None = keep the config's)."""
    flag = "--" + param.name.replace("_", "-")
    if param.argument:
        default = typer.Argument(..., help=param.help)
        annotation: Any = param.type
    elif param.type is bool:
        default = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=param.help)
        annotation = Optional[bool]
    else:
        default = typer.Option(None, flag, help=param.help)
        annotation = Optional[param.type]
    return inspect.Parameter(param.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def task_command(module: str, command: str, doc: str, params: tuple[Param, ...], with_preset: bool) -> Any:
    """A typer command whose options are exactly `params` (+ --preset, --set) and that runs `module.run`."""
    def command_function(**values: Any) -> None:
        # an unused repeatable option arrives empty: None keeps the config's value
        fields = {param.key or param.name: values[param.name] if values[param.name] != [] and
                  values[param.name] != () else None for param in params}
        run_command(module, command, values.get("preset"), values.get("set_"), fields)

    signature = [_typer_parameter(param) for param in params]
    if with_preset:
        signature.append(inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, default=PresetOpt,
                                           annotation=Optional[str]))
    signature.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=SetOpt,
                                       annotation=Optional[list[str]]))
    command_function.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
    command_function.__annotations__ = {p.name: p.annotation for p in signature}
    command_function.__doc__ = doc
    command_function.__name__ = command.replace("-", "_")
    return command_function


for _name, _entry in TASKS.items():
    finetune_app.command(_name)(task_command(
        _entry.finetune, finetune_command(_name), _entry.finetune_help,
        _entry.finetune_params + FINETUNE_SHARED, with_preset=True))
    evaluate_app.command(_name)(task_command(  # evaluations read the run's config: no presets
        _entry.evaluate, evaluate_command(_name), _entry.evaluate_help,
        _entry.evaluate_params + EVALUATE_SHARED, with_preset=False))
    if _entry.predict:  # like the evaluations, predictions read the run's config: no presets
        predict_app.command(_name)(task_command(
            _entry.predict, predict_command(_name), _entry.predict_help,
            _entry.predict_params + EVALUATE_SHARED, with_preset=False))


@evaluate_app.command("reconstruction")
def evaluate_reconstruction(
    shards_dir: Path = typer.Argument(..., help="Shards holding the pre-training frames (cache-teacher or extraction)."),
    weights: Optional[Path] = typer.Option(None, help="A pcd export (folder or file) or a Point-MAE checkpoint."),
    random_init: Optional[int] = typer.Option(None, "--random-init", help="Random encoder and decoder from SEED "
                                                                         "(the 'no training' row)."),
    out: Optional[Path] = typer.Option(None, help="Results JSON (default: EXPORT/reconstruction.json)."),
    split: Optional[Path] = typer.Option(None, help="Frames of these scenes (default: the export's pre-training scenes)."),
    passes: Optional[int] = typer.Option(None, help="Seeded passes, reported as mean ± std (3)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Table 7: masked reconstruction loss (Chamfer L2) of a backbone over its pre-training frames."""
    run_command("pcd.trainer.evaluate_reconstruction", "evaluate-reconstruction", None, set_, {
        "shards_dir": shards_dir, "weights": weights, "random_init": random_init, "out": out, "split": split,
        "passes": passes, "device": device})


@app.command("caption")
def caption(
    weights: Path = typer.Argument(..., help="A `pcd pretrain` run (with its export/) or a `pcd export` folder."),
    clouds: list[str] = typer.Argument(..., help="Clouds: FILE.ply/.pcd/.npy/.npz, SHARDS#KEY (a frame of a shard), "
                                                 "DETECTION_DIR#SCENE:box=x0,y0,z0,x1,y1,z1 or #SCENE:object=K, "
                                                 "DETECTION_RUN#SCENE:detected=K (a box the detector found)."),
    clipcap: Optional[Path] = typer.Option(None, help="ClipCap checkpoint whose GPT-2 decodes (the teacher's)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Local GPT-2 tokenizer folder (vocab.json, merges.txt)."),
    beam: Optional[int] = typer.Option(None, help="Beam width (0: greedy, the default)."),
    up_axis: Optional[str] = typer.Option(None, help="Up axis of cloud files: z (default) or y (ModelNet)."),
    num_points: Optional[int] = typer.Option(None, help="Points fed to the student (default: pre-training's)."),
    out: Optional[Path] = typer.Option(None, help="Also write the captions as JSON lines to this file."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Describe point clouds in words: the student's prefix, decoded by ClipCap's GPT-2 as cache-teacher decodes."""
    run_command("pcd.trainer.caption", "caption", None, set_, {
        "weights": weights, "clouds": list(clouds), "clipcap": clipcap, "tokenizer": tokenizer, "beam": beam,
        "up_axis": up_axis, "num_points": num_points, "out": out, "device": device})


@app.command("show")
def show(
    sources: list[str] = typer.Argument(..., help="Evaluated run folders (detection, partseg, classification) or "
                                                  "clouds (as `pcd caption` reads them)."),
    out: Optional[Path] = typer.Option(None, help="Folder for the PNG and .ply files (default: pictures)."),
    checkpoint: Optional[str] = typer.Option(None, help="Which evaluation of a run: evaluation_<CHECKPOINT>.json."),
    color: Optional[str] = typer.Option(None, help="rgb (default), label (ground-truth class) or height."),
    views: Optional[int] = typer.Option(None, help="Views per scene or cloud (3)."),
    max_items: Optional[int] = typer.Option(None, "--max", help="Scenes or shapes drawn per run (8)."),
    min_score: Optional[float] = typer.Option(None, help="Detection: draw boxes from this score (0.5)."),
    max_boxes: Optional[int] = typer.Option(None, help="Detection: at most this many boxes per scene (20)."),
    up_axis: Optional[str] = typer.Option(None, help="Up axis of cloud files: z (default) or y."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Draw clouds and evaluated runs as PNG (headless) and .ply: boxes, labels, errors, views, contact sheets."""
    run_command("pcd.trainer.show", "show", None, set_, {
        "sources": list(sources), "out": out, "checkpoint": checkpoint, "color": color, "views": views,
        "max_items": max_items, "min_score": min_score, "max_boxes": max_boxes,
        "up_axis": up_axis})


@app.command("plot")
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders: their metrics.jsonl and evaluation_*.json."),
    out: Optional[Path] = typer.Option(None, help="Folder for the PNG files (default: plots)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Training curves (loss, learning rate, validation metrics; runs overlaid) and per-class bar charts, as PNG."""
    run_command("pcd.trainer.plot", "plot", None, set_, {"runs": list(runs), "out": out})


@evaluate_app.command("captions")
def evaluate_captions(
    weights: Path = typer.Argument(..., help="A `pcd pretrain` run (with its export/) or a `pcd export` folder."),
    shards: Path = typer.Option(..., help="Shards with images of held-out frames (extraction shards, or training "
                                          "shards made with --keep-images)."),
    clip: Optional[Path] = typer.Option(None, help="The teacher's CLIP weights (ViT-B-32.pt)."),
    clipcap: Optional[Path] = typer.Option(None, help="The teacher's ClipCap checkpoint."),
    tokenizer: Optional[Path] = typer.Option(None, help="Local GPT-2 tokenizer folder (vocab.json, merges.txt)."),
    teacher: Optional[str] = typer.Option(None, help="'clipcap' (default) or 'tiny-random' (tests/demo)."),
    split: Optional[Path] = typer.Option(None, help="Scenes to evaluate (default: those the export did not see)."),
    max_frames: Optional[int] = typer.Option(None, help="Frames evaluated (200)."),
    beam: Optional[int] = typer.Option(None, help="Beam width for both captions (0: greedy)."),
    out: Optional[Path] = typer.Option(None, help="Results JSON (default: EXPORT/captions.json)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Student vs teacher on held-out frames: prefix MSE and cosine, BLEU-4 and CIDEr of the captions, CLIPScore."""
    run_command("pcd.trainer.evaluate_captions", "evaluate-captions", None, set_, {
        "weights": weights, "shards_dir": shards, "clip": clip, "clipcap": clipcap, "tokenizer": tokenizer,
        "teacher": teacher, "split": split, "max_frames": max_frames, "beam": beam, "out": out, "device": device})


ExperimentFile = typer.Argument(..., help="An experiment file, or a shipped table: table1 ... table7, table10 "
                                         "(manifests/experiments/).")
WorkOpt = typer.Option(..., "--work", help="Work folder: pre-training runs, cells, report.")
VariantOpt = typer.Option(None, "--variant", help="A variant of the file, e.g. 'tiny' (generated data, tiny presets).")


@experiment_app.command("run")
def experiment_run(
    file: str = ExperimentFile,
    work: Path = WorkOpt,
    variant: Optional[str] = VariantOpt,
    input_: Optional[list[str]] = typer.Option(None, "--input", help="NAME=PATH: override one of the file's "
                                                                      "[inputs] (repeatable)."),
    data: Optional[Path] = typer.Option(None, help="Where a generated variant writes its data (default WORK/data)."),
    nproc: Optional[int] = typer.Option(None, help="Run pre-training and fine-tunes under torchrun on N processes."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this row (method name; repeatable)."),
    seed_limit: Optional[int] = typer.Option(None, help="Run only the first N seeds of the table."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run every cell of a paper table (pre-training shared, finished cells skipped, failures reported)."""
    run_command("pcd.trainer.experiment", "experiment-run", None, set_, {
        "file": file, "work_dir": work, "variant": variant, "inputs": list(input_) if input_ else None,
        "data_dir": data, "nproc": nproc, "only": list(only) if only else None, "seed_limit": seed_limit})


@experiment_app.command("report")
def experiment_report(
    file: str = ExperimentFile,
    work: Path = WorkOpt,
    variant: Optional[str] = VariantOpt,
    out: Optional[Path] = typer.Option(None, help="Report folder (default WORK/report)."),
) -> None:
    """Write the table as Markdown and JSON (mean ± std over seeds, paper, difference) and a PNG bar chart."""
    run_command("pcd.trainer.experiment_report", "experiment-report", None, None, {
        "file": file, "work_dir": work, "variant": variant, "out_dir": out})


@app.command("generate-scenes")
def generate_scenes(
    out_dir: Path = typer.Argument(..., help="Folder to write ScanNet-style scans into."),
    scenes: Optional[int] = typer.Option(None, help="Number of scenes."),
    frames: Optional[int] = typer.Option(None, help="RGB-D frames per scene."),
    seed: Optional[int] = typer.Option(None, help="Random seed (the output is deterministic by seed)."),
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Write generated ScanNet-style scans (.sens, exported frames, meshes, annotations) for tests and demos."""
    run_command("pcd.pipeline.synthetic", "generate-scenes", preset, set_, {
        "out_dir": out_dir, "num_scenes": scenes, "num_frames": frames, "seed": seed})


@app.command("generate-shapes")
def generate_shapes(
    out_dir: Path = typer.Argument(..., help="Folder to write ModelNet40, ScanObjectNN and ShapeNetPart stand-ins into."),
    seed: Optional[int] = typer.Option(None, help="Random seed (the output is deterministic by seed)."),
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Write generated object datasets in the real releases' formats and layouts, for tests and demos."""
    run_command("pcd.pipeline.synthetic_shapes", "generate-shapes", preset, set_, {"out_dir": out_dir, "seed": seed})


@app.command("demo")
def demo(
    work_dir: Path = typer.Argument(Path("demo-work"), help="Work folder for generated data and runs."),
    preset: Optional[str] = PresetOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Generate a few scenes and run every stage end to end on them (random tiny teacher; CPU is enough)."""
    run_command("pcd.trainer.demo", "demo", preset, set_, {"work_dir": work_dir})


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="pcd")


if __name__ == "__main__":
    main()
