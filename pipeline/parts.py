"""Stage one in parts: each job of a SLURM array (or each rank of torchrun) takes a fixed share of the scenes.

A scene belongs to part `hash(scene) mod N`, the hash being the first 8 bytes of the SHA-256 of its name: a
function of the name and N only, so a scene never changes part when scenes are added to the list, every
machine agrees without talking to the others, and the parts are disjoint and together complete.

Parts write into one folder. Each holds its own lock and writes its own `manifest.part-I-of-N.json`; every
run also holds the stage's folder lock shared, so a whole run (no --part, exclusive folder lock) never writes
beside parts and `pcd manifest merge` (exclusive too) knows that no part is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from pcd.pipeline.errors import PcdError
from pcd.pipeline.locks import folder_lock

PART_MANIFEST = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")
PART_SPEC = re.compile(r"(\d+)/(\d+)")
# The stage that writes each kind of manifest: it names the folder lock (.extract.lock) and the parts' locks.
STAGE_OF_KIND = {"extraction": "extract", "training": "cache-teacher"}
COMMAND_OF_STAGE = {"extract": "pcd extract-scannet", "cache-teacher": "pcd cache-teacher"}
SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


@dataclass(frozen=True)
class Part:
    """Part `index` (0 to count-1) of `count`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, scene: str) -> bool:
        return scene_part(scene, self.count) == self.index

    @property
    def manifest_name(self) -> str:
        return f"manifest.part-{self.index}-of-{self.count}.json"

    def lock_name(self, stage: str) -> str:
        return f".{stage}.part-{self.index}-of-{self.count}.lock"


def scene_part(scene: str, count: int) -> int:
    """The part (of `count`) that `scene` belongs to."""
    return int.from_bytes(hashlib.sha256(scene.encode("utf-8")).digest()[:8], "big") % count


def check_part_spec(value: str) -> Optional[str]:
    """Config check for --part: 'I/N' with 0 <= I < N, or 'slurm'."""
    if value == "slurm":
        return None
    match = PART_SPEC.fullmatch(value)
    if not match:
        return "must be I/N (part I of N, counted from 0) or 'slurm'"
    index, count = int(match[1]), int(match[2])
    return None if 0 <= index < count else "must be I/N with 0 <= I < N"


def parse_part(spec: Optional[str], environ: Mapping[str, str] = os.environ) -> Optional[Part]:
    """The part a run caches: None (everything), 'I/N', or 'slurm' (this job's task of a SLURM array, which must
    be a contiguous range, e.g. --array=0-15 or 1-16%4); then split further by torchrun's ranks (see `rank_part`)."""
    if spec is None:
        part = None
    elif spec == "slurm":
        missing = [name for name in SLURM_VARIABLES if not environ.get(name, "").isdigit()]
        if missing:
            raise PcdError(f"--part slurm: {', '.join(missing)} not set (run it as a task of an sbatch --array job)")
        task, first, count = (int(environ[name]) for name in SLURM_VARIABLES)
        last = environ.get("SLURM_ARRAY_TASK_MAX", "")
        if not first <= task < first + count or (last.isdigit() and int(last) != first + count - 1):
            raise PcdError(f"--part slurm: array task {task} of {count} from {first} (max {last or '?'}) is not a "
                           "contiguous range; give --array a range such as 0-15")
        part = Part(task - first, count)
    else:
        reason = check_part_spec(spec)
        if reason:
            raise PcdError(f"--part {spec}: {reason}")
        index, count = spec.split("/")
        part = Part(int(index), int(count))
    return rank_part(part, environ)


def rank_part(part: Optional[Part], environ: Mapping[str, str] = os.environ) -> Optional[Part]:
    """Under torchrun (WORLD_SIZE > 1) each rank is a part of its own: rank r of W splits part I of N into part
    I*W + r of N*W, so every GPU of every array task caches a disjoint share."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return part
    rank = int(environ.get("RANK", "0") or 0)
    base = part or Part(0, 1)
    return Part(base.index * world + rank, base.count * world)


def part_manifest_names(names: list[str]) -> dict[Part, str]:
    """The part manifests among file names, by part."""
    found = {}
    for name in names:
        match = PART_MANIFEST.fullmatch(name)
        if match:
            found[Part(int(match[1]), int(match[2]))] = name
    return found


@contextlib.contextmanager
def stage_lock(folder: Path, stage: str, command: str, part: Optional[Part]) -> Iterator[None]:
    """The locks of a run of `stage` writing into `folder`: the folder lock exclusive for a whole run; shared,
    plus this part's own lock, for a part (so that parts run side by side but never twice, nor beside a whole
    run or a merge)."""
    folder_lock_name = f".{stage}.lock"
    if part is None:
        with folder_lock(folder, folder_lock_name, command):
            yield
        return
    with folder_lock(folder, folder_lock_name, command, shared=True), \
            folder_lock(folder, part.lock_name(stage), f"{command} of part {part}"):
        yield
