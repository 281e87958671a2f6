"""`pcd cache-teacher`: run the teacher once over the extracted frames and write the training shards.

The extraction is read from a folder, a brace pattern of its shards or a URL (see `pcd.pipeline.locations`); the
output is a local folder.

One output shard per input shard, under the same name, so a run resumes shard by shard: a shard listed in
the output manifest whose file still has the recorded sha256 (and whose input has not changed) is kept.
The manifest is rewritten after every finished shard, and a shard is written under a temporary name and
renamed only when complete, so an interruption or a bad input never loses finished work. JPEGs are decoded
and cropped in worker processes while the teacher runs on the previous batch.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pcd.pipeline.config import config_to_dict, non_negative, positive, setting
from pcd.pipeline.errors import PcdError
from pcd.pipeline.frame_decode import crop_camera, decode_and_crop, init_decode_worker, jpeg_size
from pcd.pipeline.locations import Location, parse_source
from pcd.pipeline.parts import COMMAND_OF_STAGE, STAGE_OF_KIND, Part, check_part_spec, parse_part, stage_lock
from pcd.pipeline.schema import (MANIFEST_NAME, Manifest, ShardWriter, check_output_layout, check_sample,
                                 decode_member, iter_shard, manifest_name, read_manifest, read_manifest_file,
                                 sha256_file, sha256_of, shard_path)

console = Console(stderr=True)
STAGE = STAGE_OF_KIND["training"]
LOCK_NAME = f".{STAGE}.lock"  # the folder's: exclusive for a whole run, shared by parts (see pcd.pipeline.parts)
DECODE_TIMEOUT_S = 600
DECODE_AHEAD = 3  # chunks in the decode workers' hands while the teacher runs


@dataclass
class Config:
    extracted_dir: str = "extracted"  # a folder, a brace pattern of its shards, or an s3:// gs:// http(s):// URL
    allow_pipe: bool = False  # let extracted_dir be a `pipe:` shell command (see pcd.pipeline.locations)
    out_dir: Path = Path("shards")
    teacher: Literal["clipcap", "tiny-random"] = "clipcap"
    clip: Optional[Path] = None  # OpenAI ViT-B-32.pt or an open_clip state dict
    clipcap: Optional[Path] = None  # e.g. conceptual_weights.pt (the paper: Conceptual Captions, MLP mapper)
    clip_model: str = "ViT-B-32-quickgelu"  # open_clip architecture the CLIP file is loaded into
    captions: bool = False
    tokenizer: Optional[Path] = None  # GPT-2 tokenizer folder (vocab.json, merges.txt), for --captions
    # 0 or 1: greedy captions (predict.py's default); 5: predict.py's beam search
    beam_size: int = setting(0, non_negative)
    keep_images: bool = False
    batch_size: int = setting(64, positive)
    # JPEG decode processes; None: one per usable CPU core but one (per rank under torchrun); 0: in-process
    workers: Optional[int] = setting(None, non_negative)
    device: Optional[str] = None  # None: cuda when available, else cpu
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"  # CLIP autocast dtype on a GPU; the CPU runs fp32
    patch_tokens: bool = False  # also CLIP's patch tokens and the crop camera, for the distill-local objective
    # 'I/N' or 'slurm': the share of the scenes this run caches; under torchrun each rank caches a share of it
    part: Optional[str] = setting(None, check_part_spec)


@dataclass
class _Chunk:
    """Up to one batch of samples of one input shard; `last` closes the shard."""

    shard: int
    samples: list[dict[str, Any]]
    jpegs: list[bytes]
    last: bool


def run(cfg: Config) -> int:
    """Cache the teacher's outputs for every extraction shard not already done; returns the exit code.

    Decode workers are started with forkserver/spawn: a script calling this needs the usual
    `if __name__ == "__main__":` guard (the `pcd` command has it).
    """
    out_dir = Path(cfg.out_dir)
    location, chosen = parse_source(cfg.extracted_dir, cfg.allow_pipe)
    if location.kind == "local" and out_dir.resolve() == Path(location.base).resolve():
        raise PcdError(f"{out_dir}: the output folder must differ from the extraction folder")
    part = parse_part(cfg.part)
    extraction = read_manifest(location, "extraction")
    inputs = _input_shards(location, extraction, part, chosen)
    if cfg.captions and cfg.tokenizer is None:
        raise PcdError("--captions needs --tokenizer, a local GPT-2 tokenizer folder (vocab.json, merges.txt)")
    workers = _default_workers() if cfg.workers is None else cfg.workers
    pool = _decode_pool(workers) if workers > 0 and inputs else None
    try:
        return _cache(cfg, location, extraction, inputs, pool, part)
    finally:
        if pool is not None:
            pool.terminate()


def _default_workers() -> int:
    """One decode process per CPU core this process may use (a SLURM allocation's, not the node's) but one,
    shared among the ranks torchrun started on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, ranks_here) - 1)


def _default_device(torch: Any) -> str:
    """cuda when available (under torchrun: this rank's GPU, cuda:LOCAL_RANK), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if os.environ.get("LOCAL_RANK", "").isdigit() else "cuda"


def _cache(cfg: Config, location: Location, extraction: Manifest, inputs: list[tuple[dict[str, Any], str, str]],
           pool: Any, part: Optional[Part]) -> int:
    import torch

    from pcd.pipeline.clipcap import load_tokenizer
    from pcd.pipeline.teacher import load_teacher

    out_dir = Path(cfg.out_dir)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.captions else None
    teacher = load_teacher(cfg.teacher, cfg.clip, cfg.clipcap, cfg.clip_model,
                           vocab_size=len(tokenizer) if tokenizer is not None and cfg.teacher == "tiny-random" else None)
    if teacher.identity["random"]:
        console.print(Panel("[bold red]RANDOM TEACHER[/]: `--teacher tiny-random` has random weights. Its prefixes "
                            "carry no semantics; use it for tests and demos only, never to pre-train a model "
                            "you evaluate.", border_style="red"))
    device = torch.device(cfg.device or _default_device(torch))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PcdError(f"--device {cfg.device}: no CUDA GPU is available to this torch")
    teacher.to(device).precision = cfg.precision if device.type == "cuda" else "fp32"
    teacher.identity["precision"] = teacher.precision  # fp16/bf16 CLIP changes the prefixes: resume only alike
    with stage_lock(out_dir, STAGE, COMMAND_OF_STAGE[STAGE], part):
        return _cache_part(cfg, location, extraction, inputs, pool, teacher, tokenizer, device, part)


def _cache_part(cfg: Config, location: Location, extraction: Manifest, inputs: list[tuple[dict[str, Any], str, str]],
                pool: Any, teacher: Any, tokenizer: Any, device: Any, part: Optional[Part]) -> int:
    """The caching itself, run while the folder's (or this part's) lock is held."""
    out_dir = Path(cfg.out_dir)
    output = {"captions": cfg.captions, "caption_decoding": _decoding(cfg), "keep_images": cfg.keep_images}
    if cfg.patch_tokens:  # only then, so outputs cached before the option existed keep their options
        output["patch_tokens"] = teacher.patch_token_info()
    extra: dict[str, Any] = {"teacher": teacher.identity,
                             "extraction": {"folder": str(location), "options": extraction.options,
                                            "num_samples": extraction.num_samples}}
    if part is not None:
        extra["part"] = {"index": part.index, "count": part.count, "finished": False}
    manifest = Manifest(kind="training", options={**config_to_dict(cfg), "output": output}, shards=[],
                        scenes={s: r for s, r in extraction.scenes.items() if part is None or part.holds(s)},
                        extra=extra)
    name = manifest_name(part)
    check_output_layout(out_dir, part)
    done = _finished_shards(out_dir, name, teacher.identity, output, inputs)
    _remove_temporaries(out_dir, [entry["name"] for entry, _, _ in inputs])
    todo = [i for i, (entry, _, _) in enumerate(inputs) if entry["name"] not in done]
    manifest.shards = [done[entry["name"]] for entry, _, _ in inputs if entry["name"] in done]
    if not todo:
        _finish(manifest, out_dir, name)
        console.print(f"all {len(inputs)} shards {'of part ' + str(part) + ' ' if part else ''}already cached in "
                      f"{out_dir}")
        return 0
    console.print(f"teacher {teacher.identity['name']} on {device}: {len(todo)} of {len(inputs)} shards to cache"
                  + (f" ({len(done)} already done)" if done else ""))

    total = sum(inputs[i][0]["samples"] for i in todo)
    cacher = _Cacher(teacher, tokenizer, cfg, location, inputs, out_dir, manifest, name, pool)
    start = time.perf_counter()
    frames, decode_wait, teacher_time = 0, 0.0, 0.0
    try:
        with _progress() as progress:
            task = progress.add_task("teacher", total=total, fps=0.0)
            pending: deque[tuple[_Chunk, Any]] = deque()
            chunks = _chunks(location, inputs, todo, cfg.batch_size)
            read_error: Optional[PcdError] = None
            while True:
                try:
                    chunk = next(chunks, None) if read_error is None else None
                except PcdError as exc:  # finish the shards before the bad one first
                    chunk, read_error = None, exc
                if chunk is not None:  # decode ahead while the teacher works on earlier chunks
                    tasks = [(jpeg, teacher.image_size) for jpeg in chunk.jpegs]
                    pending.append((chunk, pool.map_async(decode_and_crop, tasks) if pool else tasks))
                    if len(pending) < DECODE_AHEAD:
                        continue
                if not pending:
                    break
                done_chunk, decoded = pending.popleft()
                waited = time.perf_counter()
                crops = _crops(decoded, pool)
                worked = time.perf_counter()
                cacher.process(done_chunk, crops)
                decode_wait += worked - waited
                teacher_time += time.perf_counter() - worked
                frames += len(done_chunk.samples)
                progress.update(task, completed=frames, fps=frames / (time.perf_counter() - start))
            if read_error is not None:
                raise read_error
    except BaseException:
        cacher.abort()
        raise
    _finish(manifest, out_dir, name)
    elapsed = time.perf_counter() - start
    console.print(f"cached {frames} frames in {elapsed:.1f} s ({frames / max(elapsed, 1e-9):.1f} frames/s) "
                  f"into {out_dir / name}; waited {decode_wait:.1f} s for JPEG decoding, "
                  f"{teacher_time:.1f} s in the teacher and writing")
    return 0


def _decode_pool(workers: int) -> Any:
    """JPEG decode worker processes, forked from a fresh server process that imported only the decoder.

    Plain fork would copy the caller's threads' locks (torch, cv2) and can deadlock the workers; spawn and
    forkserver re-import the caller's main module, so a script calling `run` needs the usual
    `if __name__ == "__main__":` guard.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["pcd.pipeline.frame_decode"])
    else:
        context = multiprocessing.get_context("spawn")
    return context.Pool(workers, init_decode_worker)


def _crops(decoded: Any, pool: Any) -> list[Optional[np.ndarray]]:
    if pool is None:
        return [decode_and_crop(task) for task in decoded]
    try:
        return decoded.get(timeout=DECODE_TIMEOUT_S)
    except multiprocessing.TimeoutError:  # a killed worker's tasks never come back
        raise PcdError(f"JPEG decode workers gave no result in {DECODE_TIMEOUT_S} s (a worker died?)") from None


def _decoding(cfg: Config) -> Optional[str]:
    if not cfg.captions:
        return None
    return f"beam{cfg.beam_size}" if cfg.beam_size > 1 else "greedy"


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("frames, {task.fields[fps]:.1f} frames/s"), TimeElapsedColumn(), console=console)


def _finish(manifest: Manifest, out_dir: Path, name: str) -> None:
    """The last write of the run's manifest: a part's says that the part has finished (`pcd manifest merge` waits
    for every part's)."""
    if "part" in manifest.extra:
        manifest.extra["part"]["finished"] = True
    manifest.write(out_dir, name)


def _input_shards(location: Location, extraction: Manifest, part: Optional[Part] = None,
                  chosen: Optional[list[str]] = None) -> list[tuple[dict[str, Any], str, str]]:
    """(manifest entry, path or URL, recorded sha256) of every extraction shard (of `part`'s scenes only, for a
    part; of the `chosen` names only, for a shard pattern).

    The files are hashed later, in a decode worker while their frames go through the teacher, so that a
    large extraction does not wait for a serial checksum pass before the GPU starts.
    """
    manifest_path = location.url(MANIFEST_NAME)
    if not extraction.shards:
        raise PcdError(f"{manifest_path}: the extraction manifest lists no shards")
    if chosen is not None:
        unknown = sorted(set(chosen) - {entry["name"] for entry in extraction.shards})
        if unknown:
            raise PcdError(f"{location}: the shard pattern names {len(unknown)} shard(s) the manifest does not list "
                           f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    inputs = []
    for entry in extraction.shards:
        if chosen is not None and entry["name"] not in chosen:
            continue
        if part is not None and not isinstance(entry.get("scene"), str):
            raise PcdError(f"{manifest_path}: entry of {entry['name']} names no scene (needed to split it in parts)")
        if part is not None and not part.holds(entry["scene"]):
            continue
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("samples"), int):
            raise PcdError(f"{manifest_path}: entry of {entry['name']} has no sha256/samples (not pcd extract-scannet)")
        url = location.url(entry["name"])  # a plain file name: read_manifest checked it
        if location.kind == "local" and not shard_path(Path(location.base), entry["name"]).is_file():
            raise PcdError(f"{url}: shard listed in {manifest_path} is missing")
        inputs.append((entry, url, entry["sha256"]))
    return inputs


def _finished_shards(out_dir: Path, name: str, identity: dict[str, Any], output: dict[str, Any],
                     inputs: list[tuple[dict[str, Any], str, str]]) -> dict[str, dict[str, Any]]:
    """Entries of this run's output manifest (`name`) that can be kept: same teacher, same options, intact, same
    input."""
    if not (out_dir / name).is_file():
        return {}
    previous = read_manifest_file(out_dir, name, "training")
    if previous.extra.get("teacher") != identity:
        old = previous.extra.get("teacher") or {}
        raise PcdError(f"{out_dir / name}: written by another teacher ({old.get('name')}, "
                       f"clip {old.get('clip_sha256')}, clipcap {old.get('clipcap_sha256')}, precision "
                       f"{old.get('precision')}); use a new output folder")
    if previous.options.get("output") != output:
        raise PcdError(f"{out_dir / name}: written with other options ({previous.options.get('output')}, "
                       f"now {output}); use a new output folder")
    sources = {entry["name"]: digest for entry, _, digest in inputs}
    return {entry["name"]: entry for entry in previous.shards
            if sources.get(entry["name"]) == entry.get("source_sha256")
            and shard_path(out_dir, entry["name"]).is_file()
            and sha256_file(shard_path(out_dir, entry["name"])) == entry.get("sha256")}


def _remove_temporaries(out_dir: Path, names: list[str]) -> None:
    """Half-written shards of an interrupted run of this part (ShardWriter's `.<name>.tmp-<pid>` files); never
    another part's, which may be live."""
    for name in names:
        for path in out_dir.glob(f".{name}.tmp-*"):
            path.unlink(missing_ok=True)


def _chunks(location: Location, inputs: list[tuple[dict[str, Any], str, str]], todo: list[int],
            batch_size: int) -> Iterator[_Chunk]:
    """Batches of decoded (non-JPEG) members, checked as extraction samples, shard after shard."""
    for index in todo:
        _, path, _ = inputs[index]
        samples: list[dict[str, Any]] = []
        jpegs: list[bytes] = []
        for raw in iter_shard(path, location):
            sample, jpeg = _extraction_sample(raw, path)
            samples.append(sample)
            jpegs.append(jpeg)
            if len(samples) == batch_size:
                yield _Chunk(index, samples, jpegs, last=False)
                samples, jpegs = [], []
        yield _Chunk(index, samples, jpegs, last=True)


def _extraction_sample(raw: dict[str, Any], path: str) -> tuple[dict[str, Any], bytes]:
    key = raw["__key__"]
    if "jpg" not in raw:
        raise PcdError(f"{path}: sample {key} has no jpg (not a shard of pcd extract-scannet)")
    sample: dict[str, Any] = {"__key__": key}
    for extension, data in raw.items():
        if extension.startswith("__"):
            continue
        try:
            sample[extension] = decode_member(extension, data)
        except Exception as exc:  # unknown member type, bad npy or json
            raise PcdError(f"{path}: member {key}.{extension} cannot be decoded ({exc})") from None
    check_sample(sample, "extraction", str(path))
    return sample, sample["jpg"]


class _Cacher:
    """Writes the teacher's outputs for a stream of chunks, one output shard per input shard."""

    def __init__(self, teacher: Any, tokenizer: Any, cfg: Config, location: Location,
                 inputs: list[tuple[dict[str, Any], str, str]], out_dir: Path, manifest: Manifest, manifest_name: str,
                 pool: Any):
        self.teacher, self.tokenizer, self.cfg, self.pool, self.location = teacher, tokenizer, cfg, pool, location
        self.inputs, self.out_dir, self.manifest, self.manifest_name = inputs, out_dir, manifest, manifest_name
        self.order = {entry["name"]: i for i, (entry, _, _) in enumerate(inputs)}
        self.sample_identity = {k: teacher.identity[k] for k in ("name", "random", "clip_model", "clip_sha256",
                                                                 "clipcap_sha256", "prefix_length", "prefix_dim",
                                                                 "precision")}
        self.writer: Optional[ShardWriter] = None
        self.input_digest: Any = None

    def process(self, chunk: _Chunk, crops: list[Optional[np.ndarray]]) -> None:
        entry, path, source_sha = self.inputs[chunk.shard]
        if self.writer is None:
            self.writer = ShardWriter(shard_path(self.out_dir, entry["name"]))
            self.input_digest = self.pool.apply_async(sha256_of, (self.location, path)) if self.pool else None
        for sample, crop in zip(chunk.samples, crops):
            if crop is None:
                raise PcdError(f"{path}: {sample['__key__']}.jpg is not a decodable JPEG (corrupt or truncated)")
            if self.cfg.patch_tokens and "color_intrinsics.npy" not in sample:
                raise PcdError(f"{path}: sample {sample['__key__']} has no color_intrinsics.npy (extracted before pcd "
                               "stored them); --patch-tokens needs the scans re-extracted into a new folder")
        if chunk.samples:
            self._write(chunk.samples, crops)
        if chunk.last:
            digest = self.input_digest.get() if self.input_digest is not None else sha256_of(self.location, path)
            if digest != source_sha:
                raise PcdError(f"{path}: sha256 differs from its extraction manifest (changed or truncated shard)")
            done = self.writer.close()
            self.writer = None
            done["source_sha256"] = source_sha
            if "scene" in entry:
                done["scene"] = entry["scene"]
            self.manifest.shards.append(done)
            self.manifest.shards.sort(key=lambda e: self.order[e["name"]])
            self.manifest.write(self.out_dir, self.manifest_name)

    def _write(self, samples: list[dict[str, Any]], crops: list[Optional[np.ndarray]]) -> None:
        out = self.teacher.embed(np.stack(crops), patch_tokens=self.cfg.patch_tokens)
        captions = (self.teacher.captions(out.prefix, self.tokenizer, self.cfg.beam_size)
                    if self.tokenizer is not None else None)
        for i, sample in enumerate(samples):
            members = {k: v for k, v in sample.items() if not k.startswith("__") and k not in ("jpg", "json")}
            members["prefix.npy"] = out.prefix[i].astype(np.float16)
            members["clip.npy"] = out.clip[i].astype(np.float16)
            members["json"] = {**sample["json"], "teacher": self.sample_identity}
            if captions is not None:
                members["caption.txt"] = captions[i]
            if self.cfg.keep_images:
                members["jpg"] = sample["jpg"]
            if out.patch_tokens is not None:
                members.update(_patch_members(sample, out.patch_tokens[i], self.teacher.image_size))
            self.writer.write(sample["__key__"], members)

    def abort(self) -> None:
        """Drop the shard being written; finished shards and the manifest stay as they are."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _patch_members(sample: dict[str, Any], tokens: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """patch_tokens.npy and patch_camera.npy (the colour intrinsics through the teacher's resize and crop)."""
    width, height = jpeg_size(sample["jpg"])
    return {"patch_tokens.npy": tokens.astype(np.float16),
            "patch_camera.npy": crop_camera(sample["color_intrinsics.npy"], width, height, size)}
