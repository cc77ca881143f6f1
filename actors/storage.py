"""Where rayalign reads and writes files: a local path, or an object-store URI (``s3://``, ``gs://``).

A :class:`Location` is one file or directory in either kind of storage, through pyarrow
filesystems, so a run directory, a checkpoint, a model or an adapter can live in object
storage and every node reads and writes it directly: no shared POSIX filesystem needed.

S3 credentials come from the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``), ``~/.aws`` or the instance
profile; an S3-compatible server (MinIO, Ceph, moto) is named by ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``). Errors name the URI and what failed: a bucket that does not exist,
refused credentials, an endpoint nobody answers at.

Object stores have no rename, so nothing here relies on one: writers mark completion with a
marker object written last (see :mod:`orchestrator.rundir`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import ray

REMOTE_SCHEMES = ("s3", "gs", "gcs")
"""URI schemes of object stores; anything else (or no scheme) is a local path."""

CACHE_ENV = "RAYALIGN_CACHE"
"""Directory of the node-local cache of downloaded models and adapters (default ~/.cache/rayalign)."""


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names object storage (``s3://bucket/key``), not a local path."""
    return urllib.parse.urlsplit(str(path)).scheme in REMOTE_SCHEMES


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        # Fail in seconds, not minutes, when the endpoint does not answer.
        "connect_timeout": 5.0,
        "request_timeout": 30.0,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urllib.parse.urlsplit(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**options)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{uri!r} names no bucket; write s3://BUCKET/PATH")
        return _s3_filesystem(parts.netloc), f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot open {uri!r}: {error}") from None


def _explain(uri: str, error: OSError) -> ValueError:
    """A storage error as one line that says what failed and what to do."""
    text = str(error)
    bucket = urllib.parse.urlsplit(uri).netloc
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower():
        return ValueError(f"{uri}: bucket {bucket!r} does not exist; create it or fix the URI")
    if any(code in text for code in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
        return ValueError(
            f"{uri}: the storage refused the credentials ({_last_line(text)}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) to a key that may read and write this bucket"
        )
    if any(code in text for code in ("ACCESS_DENIED", "Forbidden", "403")):
        return ValueError(
            f"{uri}: access denied ({_last_line(text)}); the key in AWS_ACCESS_KEY_ID (or AWS_PROFILE) must be allowed to "
            "read and write under this prefix (check its policy, and the bucket's)"
        )
    if any(code in text for code in ("curlCode: 7", "Couldn't connect", "curlCode: 28", "Connection refused", "Timeout")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
        return ValueError(
            f"{uri}: cannot reach the storage endpoint {endpoint} ({_last_line(text)}); check AWS_ENDPOINT_URL and the network"
        )
    return ValueError(f"{uri}: {_last_line(text)}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


class Location:
    """One file or directory: a local path or an object-store URI."""

    def __init__(self, where: str | os.PathLike | Location):
        if isinstance(where, Location):
            where = where.uri
        text = str(where)
        if is_uri(text):
            self.uri = text.rstrip("/")
            self.fs, self.path = _filesystem(self.uri)
            self.local: Path | None = None
        else:
            self.local = Path(text).expanduser().absolute()
            self.uri = str(self.local)
            self.fs, self.path = pafs.LocalFileSystem(), str(self.local)

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as error:
            raise _explain(self.uri, error) from None

    def _info(self) -> pafs.FileInfo:
        with self._errors():
            info = self.fs.get_file_info(self.path)
            bucket = self.path.split("/", 1)[0]
            if info.type == pafs.FileType.NotFound and self.local is None and bucket != self.path:
                # A missing object in a missing bucket: say which, or every reader reports "not found" instead.
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise OSError("NO_SUCH_BUCKET")
            return info

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def list(self) -> list[str]:
        """Names of the entries directly inside this directory (empty if it does not exist)."""
        with self._errors():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def read_bytes(self) -> bytes:
        with self._errors(), self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object at once: readers see the old or the new content, never a mix."""
        if self.local is not None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.local.with_name(f".{self.local.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.local)
            return
        with self._errors(), self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove this file or directory tree; nothing happens if it does not exist."""
        info = self._info()
        with self._errors():
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)

    def move_to(self, target: Location) -> None:
        """Move this file or directory tree to ``target`` (same storage). Object stores cannot rename:
        every object is copied first and the originals deleted only after, so a failure loses nothing."""
        if self.local is not None and target.local is not None:
            target.local.parent.mkdir(parents=True, exist_ok=True)
            self.local.rename(target.local)
            return
        with self._errors():
            found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
            for info in found:
                if info.type == pafs.FileType.File:
                    self.fs.copy_file(info.path, target.path + info.path[len(self.path) :])
        self.delete()

    def upload(self, source: str | os.PathLike) -> None:
        """Copy a local file or directory tree here (files already here stay unless overwritten)."""
        source = Path(source)
        if self.local is not None and self.local == source.absolute():
            return
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for file in files:
            target = self if file == source else self / file.relative_to(source).as_posix()
            if target.local is not None:
                target.local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target.local)
            else:
                with target._errors(), open(file, "rb") as handle, target.fs.open_output_stream(target.path) as stream:
                    shutil.copyfileobj(handle, stream, length=8 << 20)

    def download(self, destination: str | os.PathLike) -> Path:
        """Copy this file or directory tree to a local path; returns it."""
        destination = Path(destination)
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri} does not exist")
        if info.type == pafs.FileType.File:
            pairs = [(self.path, destination)]
        else:
            with self._errors():
                found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
            destination.mkdir(parents=True, exist_ok=True)
            pairs = [(f.path, destination / f.path[len(self.path) :].lstrip("/")) for f in found if f.type == pafs.FileType.File]
        for remote, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
            with self._errors(), self.fs.open_input_stream(remote) as stream, open(local, "wb") as handle:
                shutil.copyfileobj(stream, handle, length=8 << 20)
        return destination

    @contextlib.contextmanager
    def as_local_dir(self) -> Iterator[Path]:
        """A local directory with this directory's files: itself when local, else a temporary download."""
        if self.local is not None:
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="rayalign-") as tmp:
            target = Path(tmp) / self.name
            if self.exists():
                self.download(target)
            else:
                target.mkdir()
            yield target

    @contextlib.contextmanager
    def writing_dir(self) -> Iterator[Path]:
        """A local directory to write into; its files end up here when the block exits without error."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="rayalign-") as tmp:
            staging = Path(tmp) / self.name
            staging.mkdir()
            yield staging
            if any(staging.iterdir()):
                self.upload(staging)


# --------------------------------------------------------------------------- the node-local cache


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rayalign").expanduser()


def node_name() -> str:
    """This process's node as errors name it: the Ray node id (short) and host, or the host alone outside Ray."""
    host = socket.gethostname()
    if ray.is_initialized():
        return f"node {ray.get_runtime_context().get_node_id()[:12]} ({host})"
    return f"host {host}"


def fetch(where: str | os.PathLike | Location, kind: str, *, keep_parent: bool = False) -> Path:
    """A local path to use for ``where``: itself when local, else a copy in this node's cache.

    A URI is downloaded once per node (and per cache): concurrent callers on the node wait for
    the first download, later ones reuse it. ``kind`` names the cache's subfolder (``models``,
    ``adapters``, ``rewards``); ``keep_parent`` keeps the parent directory's name in the local
    path (an adapter's ``epoch_0040/lora``, whose epoch names its version).
    """
    location = Location(where)
    if location.local is not None:
        return location.local
    uri = location.uri
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    root = cache_root() / kind / digest
    parent = uri.rsplit("/", 2)[-2] if keep_parent else ""
    target = root / parent / location.name
    done = root / ".complete"
    if done.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait for it
        if not done.is_file():
            if not location.exists():
                raise ValueError(f"{uri} does not exist (looked for it from {node_name()})")
            partial = root / f".partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            location.download(partial / location.name)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / location.name, target)
            shutil.rmtree(partial, ignore_errors=True)
            done.write_text(uri + "\n")
    return target
