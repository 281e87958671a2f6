"""`pcd experiment`: the shipped table files validate, bad files get one-line errors naming file and key, and the
tiny Table 5 runs end to end on generated data (shared pre-training, resume, failures reported, report files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pcd import cli
from pcd.pipeline.config import command_config, config_to_dict
from pcd.pipeline.errors import PcdError
from pcd.trainer import experiment, experiment_report, pretrain
from pcd.trainer.experiment_spec import load_experiment, shipped_names


@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_table_and_its_tiny_variant_validate(name: str) -> None:
    paper = load_experiment(name)
    tiny = load_experiment(name, "tiny")
    experiment.check_settings(paper)  # every preset and `set` builds its command's config
    experiment.check_settings(tiny)
    assert tiny.generated and tiny.variant == "tiny"
    assert any(row.runs for row in paper.rows) and all(row.paper or row.runs for row in paper.rows)
    assert all(run.preset == "tiny" for run in tiny.pretrains.values())
    assert all(tiny.pretrains[row.pretrain] for row in tiny.rows if row.pretrain)


def test_table_5_and_10_fine_tune_without_voting_and_table_3_with_it() -> None:
    keys = {n: load_experiment(f"table{n}").metrics[0].key for n in (3, 5, 6, 10)}
    assert keys == {3: "vote_overall_accuracy", 5: "overall_accuracy", 6: "overall_accuracy",
                    10: "overall_accuracy"}


GOOD = """
[table]
number = 99
title = "t"
task = "classification"
protocol = "p"
metrics = [{ name = "Accuracy", key = "overall_accuracy", scale = 100 }]
seeds = [0]
[inputs]
shards = "s"
modelnet40 = "m"
[pretrain.run]
objective = "distill"
shards = "shards"
[finetune]
data = { data_dir = "modelnet40" }
[[rows]]
method = "A"
pretrain = "run"
paper = { Accuracy = 90.0 }
"""


@pytest.mark.parametrize("old, new, key", [
    ('objective = "distill"', 'objective = "distil"', "pretrain.run.objective"),
    ('pretrain = "run"', 'pretrain = "nope"', "rows[0].pretrain"),
    ('pretrain = "run"', 'pretrain = "run"\ninit = "w.pth"', "rows[0].pretrain"),
    ('shards = "shards"', 'shards = "elsewhere"', "pretrain.run.shards"),
    ('{ Accuracy = 90.0 }', '{ mIoU = 90.0 }', "rows[0].paper.mIoU"),
    ('{ Accuracy = 90.0 }', '{ Accuracy = "90" }', "rows[0].paper.Accuracy"),
    ('seeds = [0]', 'seeds = [0, 0]', "table.seeds"),
    ('task = "classification"', 'task = "cooking"', "table.task"),
    ('title = "t"', 'title = "t"\ncolour = "red"', "table.colour"),
    ('number = 99', 'number = "99"', "table.number"),
])
def test_a_bad_experiment_file_gets_one_line_naming_the_file_and_key(tmp_path: Path, old: str, new: str,
                                                                      key: str) -> None:
    path = tmp_path / "bad.toml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(PcdError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}:")


def test_a_setting_that_no_config_has_is_refused_before_anything_runs(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(GOOD.replace('shards = "shards"', 'shards = "shards"\nset = ["optim.epoch=3"]'))
    work = tmp_path / "work"
    with pytest.raises(PcdError, match=r"typo.toml: pretrain.run: .*optim.epoch"):
        experiment.run(experiment.Config(file=str(path), work_dir=work))
    assert not work.exists()


def test_under_torchrun_the_command_line_builds_the_config_an_in_process_run_builds(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    launched = []
    monkeypatch.setattr(experiment.subprocess, "run",
                        lambda argv, check: launched.append(argv) or SimpleNamespace(returncode=0))
    fields = {"shards_dir": tmp_path / "shards", "run_dir": tmp_path / "run", "objective": "distill-local",
              "split": tmp_path / "train.txt", "runtime.resume": True}
    sets = ["optim.epochs=1", "model.depth=3"]
    experiment._run_command("pcd.trainer.pretrain", "pretrain", ["pretrain"], ("shards_dir", "run_dir"), "tiny",
                            fields, sets, nproc=2)
    argv = launched[0]
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    built = []
    monkeypatch.setattr(pretrain, "run", lambda cfg: built.append(cfg) and 0)
    with pytest.raises(SystemExit) as exit_code:
        cli.main(argv[argv.index("pcd.cli") + 1:])
    assert exit_code.value.code == 0
    expected = command_config(pretrain.Config, "pretrain", "tiny", fields, sets)
    assert config_to_dict(built[0]) == config_to_dict(expected)


def test_a_variant_that_is_not_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    assert load_experiment(path).rows[0].pretrain == "run"
    with pytest.raises(PcdError, match=r"good.toml: variants: no variant 'tiny'"):
        load_experiment(path, "tiny")


def test_tiny_table_5_runs_end_to_end_resumes_and_reports(tmp_path: Path, experiment_data: Path) -> None:
    work = tmp_path / "work"
    cfg = experiment.Config(file="table5", work_dir=work, variant="tiny", data_dir=experiment_data, seed_limit=1)
    assert experiment.run(cfg) == 0
    table = load_experiment("table5", "tiny")
    # one pre-training run per objective, each exported once and named in its export
    for name, spec in table.pretrains.items():
        metadata = json.loads((work / "pretrain" / name / "export" / "backbone.json").read_text())
        assert metadata["objective"] == spec.objective
    results = {}
    for row in table.rows:
        run_dir = work / "cells" / experiment.slug(row.method) / "seed0" / "run"
        init = json.loads((run_dir / "init.json").read_text())
        assert (init["init"] is None) == row.scratch
        if row.pretrain:
            assert Path(init["init"]) == (work / "pretrain" / row.pretrain / "export").resolve()
        evaluation = json.loads((run_dir / "evaluation_last.json").read_text())
        results[row.method] = 100 * evaluation["metrics"]["overall_accuracy"]["mean"]
        assert not (work / "cells" / experiment.slug(row.method) / "seed1").exists()  # --seed-limit 1
    # a second run finds every cell finished and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.pt")}
    assert experiment.run(cfg) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.pt")} == stamps
    assert experiment_report.run(experiment_report.Config(file="table5", work_dir=work, variant="tiny")) == 0
    report = json.loads((work / "report" / "table5.json").read_text())
    for row in report["rows"]:
        cell = row["metrics"]["Accuracy"]
        assert cell["values"] == pytest.approx([results[row["method"]]])
        assert cell["paper"] == next(r.paper["Accuracy"] for r in table.rows if r.method == row["method"])
        assert cell["difference"] == pytest.approx(cell["mean"] - cell["paper"])
    assert "| Distillation | pretrain:distill |" in (work / "report" / "table5.md").read_text()
    assert (work / "report" / "table5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_cell_is_reported_and_the_others_go_on(tmp_path: Path, experiment_data: Path) -> None:
    table = tmp_path / "t.toml"
    text = GOOD.replace('[[rows]]\nmethod = "A"\npretrain = "run"',
                        '[[rows]]\nmethod = "Missing Weights"\ninit = "nowhere/point_mae.pth"\n'
                        '[[rows]]\nmethod = "Scratch"\nscratch = true')
    table.write_text(text + '\n[variants.tiny]\ninputs = "generated"\nfinetune_preset = "tiny"\n'
                            'finetune_set = ["optim.epochs=1", "runtime.progress=false"]\n'
                            'evaluate_set = ["passes=1", "votes=1"]\n')
    work = tmp_path / "work"
    cfg = experiment.Config(file=str(table), work_dir=work, variant="tiny", data_dir=experiment_data)
    assert experiment.run(cfg) == 1
    failed = json.loads((work / "failures.json").read_text())["failed"]
    assert list(failed) == ["missing-weights/seed0"] and "nowhere/point_mae.pth" in failed["missing-weights/seed0"]
    assert (work / "cells" / "scratch" / "seed0" / "run" / "evaluation_last.json").is_file()
    # another table in the same work folder is refused before anything runs
    other = experiment.Config(file="table5", work_dir=work, variant="tiny", data_dir=experiment_data)
    with pytest.raises(PcdError, match="experiment.json: this work folder holds table 99"):
        experiment.run(other)
    assert sorted(os.listdir(work / "cells")) == ["missing-weights", "scratch"]


def test_pcd_experiment_on_the_command_line_reports_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('objective = "distill"', 'objective = 3'))
    for command in ("run", "report"):
        result = subprocess.run([sys.executable, "-m", "pcd.cli", "experiment", command, str(path), "--work",
                                 str(tmp_path / "work")], capture_output=True, text=True)
        assert result.returncode == 2
        assert " ".join(result.stderr.split()) == f"error: {path}: pretrain.run.objective: must be str, not 3"
    missing = subprocess.run([sys.executable, "-m", "pcd.cli", "experiment", "report", "table5", "--work",
                              str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'}: no such work folder" in missing.stderr


def test_a_report_takes_the_variant_its_work_folder_was_run_with(tmp_path: Path) -> None:
    """`report` without --variant on a tiny work folder lists the tiny seeds and says the numbers are the pipeline's."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "experiment.json").write_text(json.dumps({"table": 5, "file": "table5.toml", "variant": "tiny"}))
    assert experiment_report.recorded_variant(work, None) == "tiny"
    with pytest.raises(PcdError, match="was run with variant tiny, not paper"):
        experiment_report.recorded_variant(work, "paper")
    tiny = load_experiment("table5", "tiny")
    text = experiment_report.markdown(tiny, experiment_report.collect(tiny, work))
    assert f"seeds {list(tiny.seeds)}" in text and "random tiny teacher" in text
