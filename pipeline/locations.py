"""Where shards are read from: a local folder, a URL opened by fsspec, or a `pipe:` command the user allowed.

A shard source names a folder (`shards/`, `s3://bucket/shards`, `https://host/shards`), or a brace pattern of
shards in one folder (`shards/scene{0000..0099}_00-000000.tar`, the same under a URL). The manifest is always
read from that folder, and the shards are the manifest's plain file names resolved against it, so a manifest can
never send pcd to another host, another folder or a shell.

Local files are opened with `open()`. URLs go through fsspec (s3:// needs the `pcd-distill[s3]` extra, gs:// the
`[gcs]` one, http(s):// the `[http]` one; memory:// is fsspec's own, for tests). A `pipe:` source runs a shell
command through WebDataset's opener, and only when the user passed --allow-pipe: `pipe:aws s3 cp
s3://bucket/shards/{name} -` is run with `{name}` replaced by `manifest.json` and by each shard's name. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Optional

from pcd.pipeline.errors import PcdError

# URL scheme -> the pcd-distill extra that installs its fsspec backend (None: built into fsspec).
URL_SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http", "memory": None}
PIPE_PLACEHOLDER = "{name}"


@dataclass(frozen=True)
class Location:
    """A folder of shards and manifests; `base` is a local path, a folder URL, or a pipe command template."""

    base: str
    kind: Literal["local", "url", "pipe"] = "local"

    def __str__(self) -> str:
        return self.base

    def url(self, name: str) -> str:
        """Where the file `name` (a plain file name, checked by the caller) of this folder is."""
        if self.kind == "local":
            return str(Path(self.base) / name)
        if self.kind == "url":
            return f"{self.base}/{name}"
        return self.base.replace(PIPE_PLACEHOLDER, name)

    def open_url(self, url: str) -> BinaryIO:
        """A binary stream of `url` (one of this location's `url(name)`); PcdError naming it when it cannot be read."""
        try:
            if self.kind == "local":
                return open(url, "rb")
            if self.kind == "url":
                return _fsspec_open(url)
            import webdataset  # the user allowed this pipe: command with --allow-pipe

            return webdataset.gopen(url, "rb")
        except FileNotFoundError:
            raise
        except PcdError:
            raise
        except Exception as exc:  # OSError, an aiohttp or botocore error: one line naming the URL
            raise PcdError(f"{url}: cannot be opened ({_reason(exc)})") from None

    def read_bytes(self, name: str) -> bytes:
        """The content of the file `name`; FileNotFoundError when there is none."""
        url = self.url(name)
        with self.open_url(url) as stream:
            try:
                data = stream.read()
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise PcdError(f"{url}: cannot be read ({_reason(exc)})") from None
        if self.kind == "pipe" and not data:  # a failed command prints nothing on stdout
            raise FileNotFoundError(url)
        return data

    def names(self) -> list[str]:
        """File names in the folder (for finding part manifests); empty where the store cannot list (a plain
        HTTP server without directory pages, a pipe)."""
        if self.kind == "local":
            try:
                return sorted(os.listdir(self.base))
            except OSError:
                return []
        if self.kind == "pipe":
            return []
        try:
            fs, path = _filesystem(self.base)
            return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
        except PcdError:
            raise
        except Exception:  # no listing (HTTP without an index page, a bucket policy): only manifest.json is read
            return []


def as_location(source: Any) -> Location:
    """A Location from a Location, a local path, or a folder URL of a supported scheme (never `pipe:`)."""
    if isinstance(source, Location):
        return source
    text = str(source)
    if isinstance(source, str) and "://" in text:
        _check_scheme(text)
        return Location(text.rstrip("/"), "url")
    if text.startswith("pipe:"):
        raise PcdError(f"{text}: a pipe: source runs a shell command; it is read only with --allow-pipe")
    return Location(text, "local")


def parse_source(source: Any, allow_pipe: bool = False) -> tuple[Location, Optional[list[str]]]:
    """The folder a shard source names, and the shard file names it selects (None: the manifest's every shard).

    `source`: a folder, a folder URL, a brace pattern of shards in one folder (local or URL), or with
    `allow_pipe` a `pipe:` command containing `{name}` once.
    """
    text = str(source)
    if text.startswith("pipe:"):
        if not allow_pipe:
            raise PcdError(f"{text}: a pipe: source runs a shell command; pass --allow-pipe if you mean it")
        if text.count(PIPE_PLACEHOLDER) != 1:
            raise PcdError(f"{text}: a pipe: source names the file it reads as {PIPE_PLACEHOLDER}, once (pcd puts "
                           "manifest.json and each shard's name there)")
        return Location(text, "pipe"), None
    is_url = "://" in text
    if is_url:
        _check_scheme(text)
    import braceexpand

    expanded = list(braceexpand.braceexpand(text)) if "{" in text else [text]
    if not all(item.endswith(".tar") for item in expanded):  # a folder (whose name may hold braces)
        return (Location(text.rstrip("/") or "/", "url") if is_url else Location(text, "local")), None
    folders = {item.rsplit("/", 1)[0] if "/" in item else "." for item in expanded}
    if len(folders) != 1:
        raise PcdError(f"{text}: a shard pattern selects shards of one folder, the one of their manifest "
                       f"({len(folders)} folders here)")
    folder = folders.pop()
    names = [item.rsplit("/", 1)[-1] for item in expanded]
    return (Location(folder, "url") if is_url else Location(folder or "/", "local")), list(dict.fromkeys(names))


def _check_scheme(url: str) -> None:
    scheme = url.split("://", 1)[0].lower()
    if scheme not in URL_SCHEMES:
        raise PcdError(f"{url}: pcd reads shards from folders and {', '.join(s + '://' for s in URL_SCHEMES)} "
                       f"URLs, not {scheme}://")


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = URL_SCHEMES.get(scheme)
        raise PcdError(f"{url}: reading {scheme}:// needs an optional backend: pip install 'pcd-distill[{extra}]' "
                       f"({_reason(exc)})") from None


def _fsspec_open(url: str) -> BinaryIO:
    fs, path = _filesystem(url)
    return fs.open(path, "rb")


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
