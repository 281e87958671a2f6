"""Shards anywhere (issue 15): pre-training reads the same samples from a folder, a brace pattern, a local HTTP
server and fsspec's memory file system; the manifest comes from the same place and names plain files only; a
`pipe:` source runs only with allow_pipe."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pytest
import torch

from pcd.pipeline import cache_teacher
from pcd.pipeline.errors import PcdError
from pcd.pipeline.schema import MANIFEST_NAME, sha256_file
from pcd.trainer import data
from teacher_helpers import make_extraction
from training_shards import write_training_shards

SCENES = {"scene0000_00": 3, "scene0001_00": 2, "scene0002_00": 4}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served") / "shards"
    write_training_shards(folder, SCENES, points=64)
    make_extraction(folder.parent / "extracted", {"scene0000_00": 2, "scene0001_00": 1})
    return folder


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(shards: Path) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving the shards' parent folder (with directory pages, like nginx's
    autoindex); yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(shards.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def batches(selection: data.ShardSelection) -> list[dict[str, np.ndarray]]:
    """Every sample once (validation order, fixed point subsets) and two seeded training batches."""
    kwargs = dict(batch_size=2, num_points=32, seed=3, workers=0)
    loaded = list(data.val_loader(selection, **kwargs))
    stream = iter(data.train_loader(selection, epoch=1, rank=0, world_size=1, shuffle_buffer=4, **kwargs))
    loaded += [next(stream) for _ in range(2)]
    return [{k: v.numpy() for k, v in batch.items()} for batch in loaded]


def assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b) == 5 + 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_shards_over_http_equal_shards_from_disk(shards: Path, server: str) -> None:
    local = data.select_shards(shards, None)
    remote = data.select_shards(f"{server}/shards", None)
    assert remote.location.kind == "url" and remote.urls == [f"{server}/shards/{s}.tar" for s in SCENES]
    assert (remote.scenes, remote.num_samples, remote.teacher) == (local.scenes, local.num_samples, local.teacher)
    assert_same_batches(batches(remote), batches(local))


def test_a_brace_pattern_selects_shards_of_its_folder(shards: Path, server: str) -> None:
    for source in (f"{shards}/scene{{0000..0001}}_00.tar", f"{server}/shards/scene{{0000..0001}}_00.tar"):
        selection = data.select_shards(source, None)
        assert selection.scenes == ["scene0000_00", "scene0001_00"] and selection.num_samples == 5
    with pytest.raises(PcdError, match=r"names 1 shard\(s\) its folder's manifest does not list \(scene0009_00.tar"):
        data.select_shards(f"{shards}/scene{{0000,0009}}_00.tar", None)
    with pytest.raises(PcdError, match="a shard pattern selects shards of one folder"):
        data.select_shards(f"{shards}/{{a,b}}/scene0000_00.tar", None)


def test_fsspec_memory_file_system_and_part_manifests_there(shards: Path) -> None:
    memory = fsspec.filesystem("memory")
    base = "memory://pcd-test-parts/shards"
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    for path in shards.glob("*.tar"):
        memory.pipe(f"{base}/{path.name}", path.read_bytes())
    try:  # the same shards written by two parts: the reader lists the store and merges their manifests
        from pcd.pipeline.parts import Part

        for index in (0, 1):
            part = Part(index, 2)
            own = [s for s in manifest["shards"] if part.holds(s["scene"])]
            memory.pipe(f"{base}/{part.manifest_name}", json.dumps({
                **manifest, "shards": own, "scenes": {s["scene"]: manifest["scenes"][s["scene"]] for s in own},
                "part": {"index": index, "count": 2, "finished": True}}).encode())
        assert_same_batches(batches(data.select_shards(base, None)), batches(data.select_shards(shards, None)))
        memory.rm(f"{base}/{Part(1, 2).manifest_name}")
        with pytest.raises(PcdError, match=r"part\(s\) 1/2 have no manifest yet"):
            data.select_shards(base, None)
    finally:
        memory.rm("memory://pcd-test-parts", recursive=True)


def test_a_manifest_read_from_a_url_names_plain_files_only() -> None:
    memory = fsspec.filesystem("memory")
    for name in ("https://elsewhere.example/x.tar", "../x.tar", "pipe:touch owned.tar"):
        memory.pipe("memory://pcd-test-hostile/manifest.json", json.dumps({
            "schema_version": 1, "kind": "training", "shards": [{"name": name, "samples": 1, "scene": "s"}],
            "teacher": {"prefix_length": 1, "prefix_dim": 1, "clip_dim": 1}}).encode())
        with pytest.raises(PcdError, match="is not a plain file name"):
            data.select_shards("memory://pcd-test-hostile", None)
    memory.rm("memory://pcd-test-hostile", recursive=True)
    with pytest.raises(PcdError, match="not ftp://"):
        data.select_shards("ftp://host/shards", None)


def test_pipe_sources_run_only_when_allowed(shards: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = f"pipe:touch {marker}; cat {shards}/{{name}}"
    with pytest.raises(PcdError, match="pass --allow-pipe if you mean it"):
        data.select_shards(source, None)
    assert not marker.exists()
    with pytest.raises(PcdError, match=r"names the file it reads as \{name\}, once"):
        data.select_shards(f"pipe:cat {shards}/manifest.json", None, allow_pipe=True)
    selection = data.select_shards(source, None, allow_pipe=True)
    assert marker.exists() and selection.urls[0] == f"pipe:touch {marker}; cat {shards}/scene0000_00.tar"
    assert_same_batches(batches(selection), batches(data.select_shards(shards, None)))


def test_a_missing_backend_names_the_extra_to_install() -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(PcdError, match=r"s3://b/shards: reading s3:// needs an optional backend: "
                                           r"pip install 'pcd-distill\[s3\]'"):
            data.select_shards("s3://b/shards", None)
    else:
        pytest.skip("s3fs is installed here")


def test_a_loader_worker_reads_over_http(shards: Path, server: str) -> None:
    selection = data.select_shards(f"{server}/shards", None)
    loader = data.val_loader(selection, batch_size=9, num_points=32, seed=3, workers=1)
    [batch] = list(loader)
    [expected] = list(data.val_loader(data.select_shards(shards, None), batch_size=9, num_points=32, seed=3,
                                      workers=0))
    assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_cache_teacher_reads_an_extraction_over_http(shards: Path, server: str, tmp_path: Path) -> None:
    def cached(source: str, out: Path, workers: int = 0) -> dict[str, str]:
        assert cache_teacher.run(cache_teacher.Config(extracted_dir=source, out_dir=out, teacher="tiny-random",
                                                      batch_size=2, workers=workers)) == 0
        return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}

    local = cached(str(shards.parent / "extracted"), tmp_path / "local")
    assert cached(f"{server}/extracted", tmp_path / "http", workers=1) == local and len(local) == 2  # (sha256 there)
    assert json.loads((tmp_path / "http" / MANIFEST_NAME).read_text())["extraction"]["folder"] == f"{server}/extracted"
    assert cached(f"{server}/extracted/shard-{{000001..000001}}.tar", tmp_path / "one") == {
        "shard-000001.tar": local["shard-000001.tar"]}
