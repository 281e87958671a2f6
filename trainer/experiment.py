"""`pcd experiment run FILE --work DIR`: every cell of a paper table, through the ordinary commands.

A cell is one row that pcd can produce and one seed. Each pre-training run the file names is trained once and
exported (`WORK/pretrain/NAME/`), then shared by every cell that uses it; each cell fine-tunes
(`WORK/cells/ROW/seedN/`, `pcd finetune TASK` with the row's `--init`) and evaluates (`pcd evaluate TASK`), or,
for Table 7, runs `pcd evaluate reconstruction` on the row's backbone. Commands run in this process through
their `run(cfg)` with configs built as the CLI builds them (`command_config`), or under torchrun
(`--nproc N`, N > 1) as `python -m torch.distributed.run ... -m pcd.cli ...`.

Resuming: a cell whose results file exists is skipped; an interrupted fine-tune or pre-training resumes through
the commands' own `--resume`. A failed cell (or a failed pre-training, which fails its cells) is reported in
`WORK/failures.json` and the others go on; the exit code is 1 when any cell failed. A `generated` variant first
writes its inputs under `--data` (default WORK/data) with the generators and the tiny presets: random tiny
teacher, generated scenes and shapes.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console

from pcd.pipeline.atomic import atomic_write_json
from pcd.pipeline.config import command_config, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.trainer.experiment_spec import RECONSTRUCTION, Experiment, Row, load_experiment, slug
from pcd.trainer.tasks import TASKS, evaluate_command, finetune_command

console = Console(stderr=True, soft_wrap=True)
STATE_FILE = "experiment.json"
FAILURES_FILE = "failures.json"
RESULT_FILE = "evaluation_last.json"
RECONSTRUCTION_FILE = "reconstruction.json"


@dataclass
class Config:
    file: str = "table5"                  # an experiment file, or the name of a shipped one (table1 ... table10)
    work_dir: Path = Path("experiments/work")
    variant: Optional[str] = None         # e.g. "tiny": generated data, tiny presets
    inputs: list[str] = field(default_factory=list)  # NAME=PATH overrides of the file's [inputs]
    data_dir: Optional[Path] = None       # where a generated variant writes its data (default WORK/data)
    nproc: int = setting(1, positive)     # > 1: pre-training and fine-tunes under torchrun on this many processes
    only: list[str] = field(default_factory=list)  # run only these rows (method names or folder names)
    seed_limit: Optional[int] = setting(None, non_negative)  # run only the first N seeds


@dataclass(frozen=True)
class Cell:
    row: Row
    seed: int

    def folder(self, work: Path) -> Path:
        return work / "cells" / slug(self.row.method) / f"seed{self.seed}"


def result_path(experiment: Experiment, cell: Cell, work: Path) -> Path:
    """The file whose existence marks the cell finished."""
    name = RECONSTRUCTION_FILE if experiment.task == RECONSTRUCTION else f"run/{RESULT_FILE}"
    return cell.folder(work) / name


def cells(experiment: Experiment, seeds: Optional[tuple[int, ...]] = None) -> list[Cell]:
    return [Cell(row, seed) for row in experiment.rows if row.runs for seed in (seeds or experiment.seeds)]


def pretrain_export(work: Path, name: str) -> Path:
    return work / "pretrain" / name / "export"


def run(cfg: Config) -> int:
    experiment = load_experiment(cfg.file, cfg.variant)
    check_settings(experiment)
    work = Path(cfg.work_dir)
    _claim_work_dir(work, experiment)
    inputs = resolve_inputs(experiment, cfg.inputs, Path(cfg.data_dir) if cfg.data_dir else work / "data")
    seeds = experiment.seeds[:cfg.seed_limit] if cfg.seed_limit else experiment.seeds
    todo = [c for c in cells(experiment, seeds) if _selected(c.row, cfg.only)]
    variant = f", variant {experiment.variant}" if experiment.variant else ""
    console.print(f"table {experiment.number} ({experiment.path.name}{variant}): "
                  f"{len(todo)} cells ({len({c.row.method for c in todo})} rows x {len(seeds)} seeds) in {work}")
    failures: dict[str, str] = {}
    pretrained: dict[str, Optional[str]] = {}  # run name -> None (ready) or the reason it failed
    for cell in todo:
        key = f"{slug(cell.row.method)}/seed{cell.seed}"
        if result_path(experiment, cell, work).is_file():
            console.print(f"{key}: done, skipped")
            continue
        if cell.row.init is not None and experiment.skip_init_rows:
            console.print(f"{key}: skipped (external weights {cell.row.init}; not part of variant "
                          f"{experiment.variant})")
            continue
        started = time.perf_counter()
        try:
            if cell.row.pretrain is not None:
                if cell.row.pretrain not in pretrained:
                    pretrained[cell.row.pretrain] = _attempt(lambda: run_pretrain(experiment, cell.row.pretrain,
                                                                                  inputs, work, cfg.nproc))
                if pretrained[cell.row.pretrain] is not None:
                    raise PcdError(f"pre-training '{cell.row.pretrain}' failed: {pretrained[cell.row.pretrain]}")
            run_cell(experiment, cell, inputs, work, cfg.nproc)
        except Exception as exc:  # a failed cell is reported and the others go on
            failures[key] = _reason(exc)
            console.print(f"[bold red]{key}: FAILED[/] ({failures[key]})")
            continue
        console.print(f"{key}: finished in {time.perf_counter() - started:.1f} s")
    atomic_write_json(work / FAILURES_FILE, {"table": experiment.number, "variant": experiment.variant,
                                             "failed": failures})
    if failures:
        console.print(f"[bold red]{len(failures)} of {len(todo)} cells failed[/] (listed in {work / FAILURES_FILE}); "
                      "rerun to retry them, finished cells are skipped")
        return 1
    console.print(f"all cells finished; `pcd experiment report {cfg.file} --work {work}` writes the table")
    return 0


def check_settings(experiment: Experiment) -> None:
    """Build every command's config from the file's presets and settings before anything runs, so that a typo in
    a `set` list is one line naming the file and the key, not a failed cell hours later."""
    placeholder = {"shards_dir": Path("shards"), "run_dir": Path("run"), "data_dir": Path("data")}
    checks: list[tuple[str, str, str, Optional[str], list[str]]] = [
        (f"pretrain.{run.name}", "pcd.trainer.pretrain", "pretrain", run.preset, list(run.sets))
        for run in experiment.pretrains.values()]
    if experiment.task == RECONSTRUCTION:
        checks.append(("evaluate", "pcd.trainer.evaluate_reconstruction", "evaluate-reconstruction", None,
                       list(experiment.evaluate_sets)))
    else:
        entry = TASKS[experiment.task]
        checks += [("finetune", entry.finetune, finetune_command(experiment.task), experiment.finetune_preset,
                    list(experiment.finetune_sets)),
                   ("evaluate", entry.evaluate, evaluate_command(experiment.task), None,
                    list(experiment.evaluate_sets))]
    variant = f" (variant {experiment.variant})" if experiment.variant else ""
    for key, module, command, preset, sets in checks:
        mod = importlib.import_module(module)
        fields = {name: value for name, value in placeholder.items() if name in mod.Config.__dataclass_fields__}
        try:
            command_config(mod.Config, command, preset, fields, sets)
        except PcdError as exc:
            raise PcdError(f"{experiment.path}: {key}{variant}: {' '.join(str(exc).split())}") from None


def _selected(row: Row, only: list[str]) -> bool:
    return not only or row.method in only or slug(row.method) in only


def _attempt(step: Callable[[], None]) -> Optional[str]:
    try:
        step()
    except Exception as exc:
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, PcdError) else f"{type(exc).__name__}: {text}"


def _claim_work_dir(work: Path, experiment: Experiment) -> None:
    """One table and variant per work folder: cells of another would be mistaken for finished ones."""
    state = {"table": experiment.number, "file": experiment.path.name, "variant": experiment.variant}
    path = work / STATE_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PcdError(f"{path}: cannot read ({exc})") from None
        if {k: recorded.get(k) for k in state} != state:
            raise PcdError(f"{path}: this work folder holds table {recorded.get('table')} variant "
                           f"{recorded.get('variant')}, not table {experiment.number} variant {experiment.variant}; "
                           "use another --work")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, state)


def resolve_inputs(experiment: Experiment, overrides: list[str], data_dir: Path) -> dict[str, Path]:
    """The file's inputs with --input NAME=PATH overrides; a generated variant makes the ones it uses."""
    inputs = {name: Path(value) for name, value in experiment.inputs.items()}
    given: dict[str, Path] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in experiment.inputs:
            raise PcdError(f"--input {item}: expected NAME=PATH with NAME one of {', '.join(experiment.inputs)}")
        given[name] = Path(value)
    if experiment.generated:
        needed = sorted(set(_used_inputs(experiment)) - set(given))
        inputs.update(generate_inputs(data_dir, needed))
    return {**inputs, **given}


def _used_inputs(experiment: Experiment) -> list[str]:
    used = [*experiment.finetune_data.values(), *experiment.evaluate_data.values()]
    for name in {row.pretrain for row in experiment.rows if row.pretrain}:
        run = experiment.pretrains[name]
        used += [v for v in (run.shards, run.split, run.val_split) if v]
    return used


# Generated stand-ins of every input a table names: (step it needs, path under the data folder).
GENERATED_INPUTS: dict[str, tuple[str, str]] = {
    "scans": ("scenes", "scans"),
    "scannet_train_split": ("scenes", "scans/scannetv2_train.txt"),
    "scannet_val_split": ("scenes", "scans/scannetv2_val.txt"),
    "extracted": ("extract", "extracted"),
    "teacher_shards": ("teacher", "shards"),
    "detection": ("detection", "detection"),
    "semseg": ("detection", "detection"),  # `pcd prepare scannet` writes the detection and the full-vertex files
    "modelnet40": ("shapes", "shapes/modelnet40_normal_resampled"),
    "shapenetpart": ("shapes", "shapes/shapenetcore_partanno_segmentation_benchmark_v0_normal"),
}


def _generation_steps(data: Path) -> dict[str, tuple[tuple[str, ...], str, str, Optional[str], dict[str, Any]]]:
    """step -> (steps it needs, module, command, preset, fields): the demo's commands at their tiny presets."""
    scans = data / "scans"
    return {
        "scenes": ((), "pcd.pipeline.synthetic", "generate-scenes", "tiny", {"out_dir": scans, "seed": 0}),
        "extract": (("scenes",), "pcd.pipeline.extract", "extract-scannet", "tiny",
                    {"scans_dir": scans, "out_dir": data / "extracted"}),
        # the random tiny teacher, with patch tokens so that every objective (distill-local too) can train
        "teacher": (("extract",), "pcd.pipeline.cache_teacher", "cache-teacher", "tiny",
                    {"extracted_dir": data / "extracted", "out_dir": data / "shards", "patch_tokens": True,
                     "workers": 0}),
        "detection": (("scenes",), "pcd.trainer.detection.prepare", "prepare-scannet-detection", None,
                      {"scans_dir": scans, "out_dir": data / "detection",
                       "label_map": scans / "scannetv2-labels.combined.tsv"}),
        "shapes": ((), "pcd.pipeline.synthetic_shapes", "generate-shapes", "tiny",
                   {"out_dir": data / "shapes", "seed": 0}),
    }


def generate_inputs(data: Path, names: list[str]) -> dict[str, Path]:
    """Make the generated inputs `names` under `data` (each step once: a finished step leaves a marker)."""
    unknown = [n for n in names if n not in GENERATED_INPUTS]
    if unknown:
        raise PcdError(f"input '{unknown[0]}' has no generated stand-in (generated: {', '.join(GENERATED_INPUTS)}); "
                       f"give it with --input {unknown[0]}=PATH")
    steps = _generation_steps(data)
    done: set[str] = set()

    def make(step: str) -> None:
        if step in done:
            return
        needs, module, command, preset, fields = steps[step]
        for need in needs:
            make(need)
        marker = data / ".done" / step
        if not marker.is_file():
            console.print(f"generating {step} under {data} (pcd {command}"
                          f"{' --preset ' + preset if preset else ''}; the teacher is RANDOM)")
            _run_module(module, command, preset, fields, [])
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(command + "\n")
        done.add(step)

    for name in names:
        make(GENERATED_INPUTS[name][0])
    return {name: data / GENERATED_INPUTS[name][1] for name in names}


def _run_module(module: str, command: str, preset: Optional[str], fields: dict[str, Any], sets: list[str]) -> None:
    mod = importlib.import_module(module)
    code = mod.run(command_config(mod.Config, command, preset, fields, sets))
    if code:
        raise PcdError(f"pcd {command} exited with {code}")


def run_pretrain(experiment: Experiment, name: str, inputs: dict[str, Path], work: Path, nproc: int) -> None:
    """Pre-train and export the run `name` once; a finished export is reused, an interrupted run resumed."""
    spec = experiment.pretrains[name]
    run_dir = work / "pretrain" / name
    if (pretrain_export(work, name) / "backbone.json").is_file():
        return
    fields: dict[str, Any] = {"shards_dir": inputs[spec.shards], "run_dir": run_dir,
                              "objective": spec.objective, "runtime.resume": True}
    if spec.split:
        fields["split"] = inputs[spec.split]
    if spec.val_split:
        fields["val_split"] = inputs[spec.val_split]
    console.rule(f"pre-training '{name}' ({spec.objective}, preset {spec.preset or 'none: the paper settings'})")
    _run_command("pcd.trainer.pretrain", "pretrain", ["pretrain"], ("shards_dir", "run_dir"), spec.preset, fields,
                 list(spec.sets), nproc)
    _run_module("pcd.trainer.export", "export", None, {"run_dir": run_dir, "out_dir": pretrain_export(work, name)}, [])


def _init(cell: Cell, work: Path) -> Optional[Path]:
    if cell.row.pretrain is not None:
        return pretrain_export(work, cell.row.pretrain)
    if cell.row.init is not None:
        init = Path(cell.row.init)
        if not init.exists():
            raise PcdError(f"{init}: the external weights of row '{cell.row.method}' are missing (rows[].init)")
        return init
    return None


def run_cell(experiment: Experiment, cell: Cell, inputs: dict[str, Path], work: Path, nproc: int) -> None:
    folder = cell.folder(work)
    folder.mkdir(parents=True, exist_ok=True)
    init = _init(cell, work)
    data = {key: inputs[name] for key, name in experiment.evaluate_data.items()}
    if experiment.task == RECONSTRUCTION:
        fields: dict[str, Any] = {**data, "out": folder / RECONSTRUCTION_FILE, "seed": cell.seed,
                                  "decoder_seed": cell.seed}
        fields.update({"weights": init} if init is not None else {"random_init": cell.seed})
        _run_module("pcd.trainer.evaluate_reconstruction", "evaluate-reconstruction", None, fields,
                    list(experiment.evaluate_sets))
        return
    entry = TASKS[experiment.task]
    run_dir = folder / "run"
    fields = {**{key: inputs[name] for key, name in experiment.finetune_data.items()},
              "run_dir": run_dir, "init": init, "runtime.resume": True, "runtime.seed": cell.seed}
    positional = tuple(p.key or p.name for p in entry.finetune_params if p.argument)
    _run_command(entry.finetune, finetune_command(experiment.task), ["finetune", experiment.task], positional,
                 experiment.finetune_preset, fields, list(experiment.finetune_sets), nproc)
    _run_module(entry.evaluate, evaluate_command(experiment.task), None, {**data, "run_dir": run_dir},
                list(experiment.evaluate_sets))


def _run_command(module: str, command: str, cli: list[str], positional: tuple[str, ...], preset: Optional[str],
                 fields: dict[str, Any], sets: list[str], nproc: int) -> None:
    """One training command: in this process, or under torchrun on `nproc` processes."""
    if nproc <= 1:
        _run_module(module, command, preset, fields, sets)
        return
    args = [str(fields[name]) for name in positional]
    args += [f"--set={key}={_cli_value(value)}" for key, value in fields.items()
             if key not in positional and value is not None]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pcd.cli", *cli, *args, *(["--preset", preset] if preset else []), *[f"--set={s}" for s in sets]]
    console.print("running " + " ".join(argv))
    code = subprocess.run(argv, check=False).returncode
    if code:
        raise PcdError(f"pcd {' '.join(cli)} under torchrun exited with {code}")


def _cli_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
