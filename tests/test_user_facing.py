"""What users see: errors for bad input paths (a run folder of another command, a missing folder, a corrupt
file) and printed summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest

from pcd.pipeline.config import config_to_dict
from pcd.pipeline.errors import PcdError
from pcd.pipeline import extract
from pcd.trainer import export, pretrain
from pcd.trainer.detection import evaluate, finetune


def write_run_config(run_dir: Path, cfg: object) -> Path:
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    return run_dir


def test_evaluate_detection_on_a_pretrain_run_names_the_file_and_the_mix_up(tmp_path: Path) -> None:
    run_dir = write_run_config(tmp_path / "pre", pretrain.Config())
    with pytest.raises(PcdError, match=r"pre/config.json: not the config of a `pcd finetune detection` run"):
        evaluate.load_run(run_dir)
    with pytest.raises(PcdError, match=r"empty/config.json: missing \(is .*empty a `pcd finetune detection` run"):
        evaluate.load_run(tmp_path / "empty")


def test_export_of_a_detection_run_names_the_file_and_the_mix_up(tmp_path: Path) -> None:
    run_dir = write_run_config(tmp_path / "det", finetune.Config())
    with pytest.raises(PcdError, match=r"det/config.json: not the config of a `pcd pretrain` run"):
        export.run(export.Config(run_dir=run_dir))


def test_finetune_detection_on_a_missing_data_folder_says_so(tmp_path: Path) -> None:
    cfg = finetune.Config(data_dir=tmp_path / "nowhere", run_dir=tmp_path / "run")
    with pytest.raises(PcdError, match=r"nowhere: no such folder \(the output of `pcd prepare scannet`\)"):
        finetune.run(cfg)
    assert not (tmp_path / "run").exists()


def test_extract_from_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "scans.txt").write_text("scene0000_00\n")
    with pytest.raises(PcdError, match=r"scans.txt: is a file, not a scans folder"):
        extract.run(extract.Config(scans_dir=tmp_path / "scans.txt", out_dir=tmp_path / "out"))


def test_extract_with_a_split_naming_no_scene_of_the_scans_folder_stops_before_writing(tmp_path: Path) -> None:
    (tmp_path / "scans" / "scene0000_00").mkdir(parents=True)
    split = tmp_path / "other_split.txt"
    split.write_text("scene9999_00\nscene9998_00\n")
    with pytest.raises(PcdError, match=r"other_split.txt: none of its 2 scene\(s\) is a folder in .*scans "
                                       r"\(first: scene9999_00\)"):
        extract.run(extract.Config(scans_dir=tmp_path / "scans", out_dir=tmp_path / "out", split=split))
    assert not (tmp_path / "out").exists()


def test_a_corrupted_prepared_scene_names_its_file_without_advising_pickles(tmp_path: Path) -> None:
    from pcd.trainer.detection.dataset import load_scene

    np.save(tmp_path / "scene0000_00_bbox.npy", np.zeros((0, 7)))
    (tmp_path / "scene0000_00_vert.npy").write_bytes(b"junk")
    with pytest.raises(PcdError) as caught:
        load_scene(tmp_path, "scene0000_00")
    assert str(caught.value) == f"{tmp_path / 'scene0000_00_vert.npy'}: cannot read (not a plain .npy array)"


def test_the_final_detection_evaluation_is_printed_like_the_epoch_lines() -> None:
    line = finetune.final_evaluation_line({"mAP_0.25": 0.008543823326432021, "mAR_0.25": 0.5})
    assert line == "final evaluation: mAP_0.25 0.0085  mAR_0.25 0.5000"


@pytest.mark.parametrize("content", [b"", b"junk", b"\x80\x02}q\x00."])
def test_unloadable_init_files_are_named_without_advice_to_unpickle(tmp_path: Path, content: bytes) -> None:
    from pcd.trainer.weights import load_backbone_weights
    import tarfile

    legacy_tar = tmp_path / "shard.tar"
    with tarfile.open(legacy_tar, "w") as tar:  # torch reads a .tar as its legacy format and refuses it
        (tmp_path / "x.txt").write_bytes(content)
        tar.add(tmp_path / "x.txt", arcname="x.txt")
    for path in (legacy_tar, tmp_path / "x.txt"):
        with pytest.raises(PcdError) as caught:
            load_backbone_weights(torch.nn.Linear(2, 2), path)
        message = str(caught.value)
        assert message.startswith(f"{path}: cannot load as a weights-only torch checkpoint (")
        assert "False" not in message and "\n" not in message
