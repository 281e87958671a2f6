"""Stage one in parts (issue 15): a hash share of the scenes per part, part manifests merged by every reader
(refusing overlaps, missing parts and mixed part counts), `pcd manifest merge`, and a SLURM array simulated."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pcd.cli import app
from pcd.pipeline import extract, synthetic
from pcd.pipeline.errors import PcdError
from pcd.pipeline.locks import folder_lock
from pcd.pipeline.manifest_merge import Config as MergeConfig
from pcd.pipeline.manifest_merge import run as merge
from pcd.pipeline.parts import Part, parse_part, scene_part
from pcd.pipeline.schema import MANIFEST_NAME, read_manifest

SCENES = [f"scene{i:04d}_00" for i in range(5)]


def test_parts_are_disjoint_complete_and_stable_when_scenes_are_added() -> None:
    scenes = [f"scene{i:04d}_{j:02d}" for i in range(150) for j in range(2)]
    more = scenes + [f"scene{i:04d}_00" for i in range(150, 400)]
    for count in (1, 3, 8):
        parts = [[s for s in scenes if Part(i, count).holds(s)] for i in range(count)]
        assert sorted(s for part in parts for s in part) == sorted(scenes)  # complete, and disjoint (no repeats)
        assert all(len(part) > len(scenes) / count / 2 for part in parts)  # a fair share each
        grown = [[s for s in more if Part(i, count).holds(s)] for i in range(count)]
        assert all(set(part) <= set(bigger) for part, bigger in zip(parts, grown))  # no scene moves
    # SHA-256 of the name: the same on every machine, in every process and pcd version (never Python's hash())
    assert scene_part("scene0000_00", 8) == int(hashlib.sha256(b"scene0000_00").hexdigest()[:16], 16) % 8
    assert [scene_part(s, 4) for s in ("scene0000_00", "scene0001_00", "scene0706_00")] == [3, 1, 2]


def test_part_specs_slurm_arrays_and_torchrun_ranks() -> None:
    assert parse_part(None, {}) is None
    assert parse_part("2/4", {}) == Part(2, 4)
    for bad in ("4/4", "-1/4", "1/0", "1", "a/b"):
        with pytest.raises(PcdError, match=f"--part {bad}: must be I/N"):
            parse_part(bad, {})
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4",
             "SLURM_ARRAY_TASK_MAX": "6"}
    assert parse_part("slurm", slurm) == Part(2, 4)
    with pytest.raises(PcdError, match="not a contiguous range"):  # --array=3-9:2 has 4 tasks, not 3..6
        parse_part("slurm", {**slurm, "SLURM_ARRAY_TASK_MAX": "9"})
    with pytest.raises(PcdError, match="SLURM_ARRAY_TASK_COUNT not set"):
        parse_part("slurm", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3"})
    ranks = {"WORLD_SIZE": "2", "RANK": "1"}
    assert parse_part(None, ranks) == Part(1, 2)  # torchrun: each rank a part
    assert parse_part("1/3", ranks) == Part(3, 6)  # array task 1 of 3, rank 1 of 2
    shares = {r: [s for s in SCENES * 40 if parse_part("1/3", {**ranks, "RANK": str(r)}).holds(s)] for r in (0, 1)}
    assert not set(shares[0]) & set(shares[1])


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    synthetic.generate(synthetic.tiny_config(root, num_scenes=len(SCENES), num_frames=10, distinct_views=10))
    return root


def extraction_config(scans: Path, out: Path, **changes: object) -> extract.Config:
    return replace(extract.Config(scans_dir=scans, out_dir=out, frame_skip=5, points=1024, shard_size=16), **changes)


@pytest.fixture(scope="module")
def whole(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert extract.run(extraction_config(scans, out)) == 0
    return out


@pytest.fixture(scope="module")
def in_parts(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same extraction as a SLURM array of 2 tasks (--array=1-2), run one task after the other."""
    out = tmp_path_factory.mktemp("parts")
    with pytest.MonkeyPatch.context() as env:
        for task in (1, 2):
            for name, value in (("ID", task), ("MIN", 1), ("MAX", 2), ("COUNT", 2)):
                env.setenv(f"SLURM_ARRAY_TASK_{name}", str(value))
            assert extract.run(extraction_config(scans, out, part="slurm")) == 0
    return out


def manifest_json(folder: Path, name: str = MANIFEST_NAME) -> dict:
    return json.loads((folder / name).read_text())


def test_an_extraction_in_parts_reads_as_the_whole_one(whole: Path, in_parts: Path) -> None:
    names = sorted(p.name for p in in_parts.iterdir() if p.name.startswith(("manifest", ".")))
    assert names == [".extract.lock", ".extract.part-0-of-2.lock", ".extract.part-1-of-2.lock",
                     "manifest.part-0-of-2.json", "manifest.part-1-of-2.json"]
    for index in (0, 1):
        part = manifest_json(in_parts, f"manifest.part-{index}-of-2.json")
        assert part["part"] == {"index": index, "count": 2, "finished": True}
        assert part["scenes"] and all(Part(index, 2).holds(s) for s in part["scenes"])
    merged, reference = read_manifest(in_parts, "extraction"), read_manifest(whole, "extraction")
    assert (merged.shards, merged.scenes, merged.options) == (reference.shards, reference.scenes, reference.options)
    assert merged.extra["merged_parts"] == 2 and sorted(merged.scenes) == SCENES
    for shard in merged.shards:  # same bytes as the whole run's
        assert (in_parts / shard["name"]).read_bytes() == (whole / shard["name"]).read_bytes()


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_overlapping_missing_and_mixed_parts_are_refused(in_parts: Path, tmp_path: Path) -> None:
    folder = copy_folder(in_parts, tmp_path / "parts")
    first, second = (manifest_json(folder, f"manifest.part-{i}-of-2.json") for i in (0, 1))
    scene = next(iter(first["scenes"]))
    overlapping = {**second, "scenes": {**second["scenes"], scene: first["scenes"][scene]}}
    (folder / "manifest.part-1-of-2.json").write_text(json.dumps(overlapping))
    with pytest.raises(PcdError, match=f"manifest.part-1-of-2.json: scene {scene} is also listed by .*"
                                       r"manifest.part-0-of-2.json \(overlapping parts\)"):
        read_manifest(folder)
    shard = {k: v for k, v in first["shards"][0].items() if k != "scene"}  # (with its scene, the scene overlaps)
    (folder / "manifest.part-1-of-2.json").write_text(json.dumps({**second, "shards": second["shards"] + [shard]}))
    with pytest.raises(PcdError, match=f"shard {shard['name']} is also listed by"):
        read_manifest(folder)
    (folder / "manifest.part-1-of-2.json").write_text(json.dumps(second))
    (folder / "manifest.part-0-of-3.json").write_text(json.dumps({**first, "part": {"index": 0, "count": 3}}))
    with pytest.raises(PcdError, match=r"part manifests of different part counts \(2, 3"):
        read_manifest(folder)
    (folder / "manifest.part-0-of-3.json").unlink()
    (folder / "manifest.part-1-of-2.json").unlink()
    with pytest.raises(PcdError, match=r"part\(s\) 1/2 have no manifest yet"):
        read_manifest(folder)


def test_runs_that_would_mix_part_counts_or_whole_and_parts_are_refused(scans: Path, whole: Path, in_parts: Path,
                                                                        tmp_path: Path) -> None:
    folder = copy_folder(in_parts, tmp_path / "parts")
    with pytest.raises(PcdError, match="holds parts of another split"):
        extract.run(extraction_config(scans, folder, part="0/3"))
    with pytest.raises(PcdError, match="holds the output of a run in 2 parts"):
        extract.run(extraction_config(scans, folder))
    with pytest.raises(PcdError, match="holds a whole run's output"):
        extract.run(extraction_config(scans, copy_folder(whole, tmp_path / "whole"), part="0/2"))
    with pytest.raises(PcdError, match="frame_skip=5 there, 4 now"):  # another part's options count too
        extract.run(extraction_config(scans, folder, part="0/2", frame_skip=4))


def test_merge_waits_for_every_part_and_a_stale_merge_is_refused(in_parts: Path, tmp_path: Path) -> None:
    folder = copy_folder(in_parts, tmp_path / "parts")
    with folder_lock(folder, extract.LOCK_NAME, "test", shared=True):  # a part is still running
        with pytest.raises(PcdError, match="another pcd extract-scannet is writing there"):
            merge(MergeConfig(folder))
    part_one = manifest_json(folder, "manifest.part-1-of-2.json")
    (folder / "manifest.part-1-of-2.json").write_text(json.dumps({**part_one, "part": {**part_one["part"],
                                                                                       "finished": False}}))
    with pytest.raises(PcdError, match=r"part\(s\) 1/2 did not finish"):
        merge(MergeConfig(folder))
    (folder / "manifest.part-1-of-2.json").write_text(json.dumps(part_one))
    assert merge(MergeConfig(folder)) == 0
    merged = manifest_json(folder)
    assert merged["merged_parts"] == 2 and merged == read_manifest(folder).to_json()
    assert "part" not in merged and sorted(merged["scenes"]) == SCENES
    dropped = next(iter(part_one["scenes"]))  # part 1 runs again on fewer scenes: the merge is now stale
    (folder / "manifest.part-1-of-2.json").write_text(json.dumps({**part_one, "scenes": {
        s: r for s, r in part_one["scenes"].items() if s != dropped}}))
    with pytest.raises(PcdError, match="differs from the merge of the part manifests beside it"):
        read_manifest(folder)


def test_the_command_line_takes_a_part(scans: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    command = ["extract-scannet", str(scans), str(tmp_path / "out"), "--preset", "tiny"]
    result = runner.invoke(app, [*command, "--part", "2/2"])
    assert result.exit_code == 2 and "config key 'part': '2/2' must be I/N with 0 <= I < N" in " ".join(
        result.output.split())
    assert runner.invoke(app, [*command, "--part", "1/2"]).exit_code == 0
    written = manifest_json(tmp_path / "out", "manifest.part-1-of-2.json")
    assert sorted(written["scenes"]) == [s for s in SCENES if scene_part(s, 2) == 1]
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
