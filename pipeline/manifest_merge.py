"""`pcd manifest merge DIR`: the single manifest.json of a folder written in parts, once every part has finished.

Readers merge part manifests on their own; the merged file is for stores that cannot list a folder (a plain HTTP
server serves manifest.json, not a listing) and for tools that read one manifest. The merge holds the stage's
folder lock exclusively, so no part can be writing while it reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pcd.pipeline.errors import PcdError
from pcd.pipeline.locations import Location
from pcd.pipeline.locks import folder_lock
from pcd.pipeline.parts import COMMAND_OF_STAGE, STAGE_OF_KIND, Part, part_manifest_names
from pcd.pipeline.schema import MANIFEST_NAME, merge_parts, read_manifest_file


@dataclass
class Config:
    folder: Path = Path("shards")  # an output folder of extract-scannet or cache-teacher run in parts


def run(cfg: Config) -> int:
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise PcdError(f"{folder}: no such folder")
    kinds = {read_manifest_file(folder, name).kind for name in _part_names(folder).values()}
    if len(kinds) != 1 or not kinds <= set(STAGE_OF_KIND):
        raise PcdError(f"{folder}: part manifests of kinds {', '.join(map(str, sorted(kinds)))}; one stage's only")
    kind = kinds.pop()
    stage = STAGE_OF_KIND[kind]
    with folder_lock(folder, f".{stage}.lock", COMMAND_OF_STAGE[stage]):
        parts = {part: read_manifest_file(folder, name, kind) for part, name in _part_names(folder).items()}
        unfinished = sorted(str(part) for part, manifest in parts.items() if not manifest.extra["part"].get("finished"))
        if unfinished:
            raise PcdError(f"{folder}: part(s) {', '.join(unfinished)} did not finish (a run was stopped); run them "
                           "again with the same command, then merge")
        merged = merge_parts(Location(str(folder)), parts)
        merged.write(folder)
    failed = merged.extra.get("failed") or {}
    Console().print(f"manifest merge: {len(parts)} parts, {len(merged.scenes)} scenes, {merged.num_samples} samples "
                    f"in {len(merged.shards)} shards into {folder / MANIFEST_NAME}"
                    + (f"; {len(failed)} failed scene(s): {', '.join(failed)}" if failed else ""),
                    markup=False, highlight=False, soft_wrap=True)
    return 0


def _part_names(folder: Path) -> dict[Part, str]:
    parts = part_manifest_names(sorted(os.listdir(folder)))
    if not parts:
        raise PcdError(f"{folder}: no part manifests (manifest.part-I-of-N.json) to merge")
    return parts
