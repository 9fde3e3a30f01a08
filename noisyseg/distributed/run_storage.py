"""Where Ray Train runs live: a local folder or any pyarrow / fsspec filesystem (``s3://``, ...).

A run directory ``<storage>/<run name>`` is a :class:`RunLocation`: the user's URL, the pyarrow
filesystem that reaches it and the prefix-stripped path on that filesystem, the form Ray Train
takes (``RunConfig(storage_path=<path>, storage_filesystem=<filesystem>)``, ``Tuner.restore``).
The same object travels to the workers (it pickles), so checkpoint discovery
(:mod:`noisyseg.distributed.checkpoints`) reads the same place on every machine.

Resolution (:func:`resolve_filesystem`):

* a plain path or ``file://``: pyarrow's local filesystem;
* ``s3://`` / ``s3a://``: ``pyarrow.fs.S3FileSystem`` built from the standard environment
  (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for an S3-compatible server,
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``AWS_DEFAULT_REGION`` / ``AWS_REGION``). Keys and endpoint are given to the filesystem
  *explicitly*, so they travel with it to Ray's controller and workers, which need not have the
  variables themselves; without keys the AWS default chain applies on every node;
* anything else pyarrow knows (``gs://``, ``hdfs://``): ``pyarrow.fs.FileSystem.from_uri``;
  what only fsspec knows: fsspec's filesystem wrapped in ``pyarrow.fs.PyFileSystem``.

Object stores have no rename: :func:`set_aside_remote` (``--force-new``) copies the run's objects
to ``<run>.old-<time>`` and then deletes the originals (not atomic; a failure between the two
leaves both copies, nothing lost).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow.fs as pafs

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.filesystems import filesystem_errors, is_remote, open_filesystem

#: Protocols served by ``pyarrow.fs.S3FileSystem``.
S3_PROTOCOLS = ("s3", "s3a")


@contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """:func:`~noisyseg.storage.filesystems.filesystem_errors`, and pyarrow's ``OSError``
    (endpoint down, bucket missing, access denied) as one line naming ``url``."""
    try:
        with filesystem_errors(url, action):
            yield
    except NoisysegInputError:
        raise
    except OSError as error:
        first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
        raise NoisysegInputError(f"{action}: {first}", path=url) from error


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_filesystem() -> pafs.S3FileSystem:
    """``S3FileSystem`` from the standard AWS environment, keys and endpoint explicit."""
    options: dict[str, str] = {}
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_override"] = endpoint
    region = _env("AWS_DEFAULT_REGION", "AWS_REGION")
    if region:
        options["region"] = region
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(access_key=key, secret_key=secret)
        token = _env("AWS_SESSION_TOKEN")
        if token:
            options["session_token"] = token
    return pafs.S3FileSystem(**options)


def resolve_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path on it)`` of ``url`` (module docstring)."""
    url = str(url)
    if not is_remote(url):
        path = url.split("://", 1)[1] if "://" in url else url
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    protocol, rest = url.split("://", 1)
    if protocol.lower() in S3_PROTOCOLS:
        return s3_filesystem(), rest.rstrip("/")
    try:
        filesystem, path = pafs.FileSystem.from_uri(url)
    except (pafs.ArrowInvalid, pafs.ArrowNotImplementedError, ValueError):
        fsspec_fs, path = open_filesystem(url)
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    return filesystem, path.rstrip("/")


@dataclass(frozen=True)
class RunLocation:
    """A directory on some filesystem: ``url`` as given, ``filesystem`` and ``path`` on it."""

    url: str
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def resolve(cls, url: str) -> RunLocation:
        """The location of ``url`` (a local path or a URL; see :func:`resolve_filesystem`)."""
        filesystem, path = resolve_filesystem(url)
        return cls(str(url).rstrip("/") if is_remote(str(url)) else path, filesystem, path)

    @property
    def remote(self) -> bool:
        """Whether the location is outside this machine's filesystem."""
        return is_remote(self.url)

    def child(self, name: str) -> RunLocation:
        """``<self>/<name>``."""
        return RunLocation(f"{self.url}/{name}", self.filesystem, f"{self.path}/{name}")

    def check_reachable(self) -> None:
        """Refuse (one line) when the bucket (first path component) is missing or unreachable."""
        bucket = self.path.split("/", 1)[0]
        with storage_errors(self.url, "opening the run storage"):
            found = self.filesystem.get_file_info(bucket).type != pafs.FileType.NotFound
        if not found:
            raise NoisysegInputError(
                f"the bucket {bucket!r} does not exist: create it or fix --storage-path",
                path=self.url,
            )

    def exists(self) -> bool:
        """Whether anything is stored at (or under) the location."""
        with storage_errors(self.url, "reading the run storage"):
            info = self.filesystem.get_file_info(self.path)
            if info.type != pafs.FileType.NotFound:
                return True
            selector = pafs.FileSelector(self.path, allow_not_found=True)
            return bool(self.filesystem.get_file_info(selector))

    def subdirectories(self) -> list[str]:
        """Names of the directories directly under the location (empty when it is absent)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        with storage_errors(self.url, "listing the run storage"):
            infos = self.filesystem.get_file_info(selector)
        return [info.base_name for info in infos if info.type == pafs.FileType.Directory]

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of the file ``<self>/<name>``, or None when it is not there."""
        path = f"{self.path}/{name}"
        with storage_errors(self.url, f"reading {name}"):
            if self.filesystem.get_file_info(path).type != pafs.FileType.File:
                return None
            with self.filesystem.open_input_stream(path) as stream:
                return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the file ``<self>/<name>``, whole or not at all: locally a temporary file
        renamed over it; on an object store one PUT (a reader sees the old or the new object)."""
        path = f"{self.path}/{name}"
        with storage_errors(self.url, f"writing {name}"):
            if self.remote:
                with self.filesystem.open_output_stream(path) as stream:
                    stream.write(data)
                return
            self.filesystem.create_dir(path.rpartition("/")[0], recursive=True)
            with self.filesystem.open_output_stream(f"{path}.tmp") as stream:
                stream.write(data)
            self.filesystem.move(f"{path}.tmp", path)

    def upload(self, local_dir: str, name: str) -> RunLocation:
        """Copy the local directory ``local_dir`` to ``<self>/<name>``; the new location."""
        target = self.child(name)
        with storage_errors(self.url, f"uploading {name}"):
            pafs.copy_files(
                local_dir,
                target.path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.filesystem,
            )
        return target


def set_aside_remote(location: RunLocation) -> str:
    """Move a run stored remotely to ``<run>.old-<YYYYmmdd-HHMMSS>``: copy, then delete.

    Returns the URL it was moved to.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent, _, name = location.path.rpartition("/")
    base_url = location.url.rpartition("/")[0]
    target, suffix = f"{name}.old-{stamp}", 1
    while RunLocation(f"{base_url}/{target}", location.filesystem, f"{parent}/{target}").exists():
        target, suffix = f"{name}.old-{stamp}-{suffix}", suffix + 1
    with storage_errors(location.url, "setting the earlier run aside"):
        pafs.copy_files(
            location.path,
            f"{parent}/{target}",
            source_filesystem=location.filesystem,
            destination_filesystem=location.filesystem,
        )
        location.filesystem.delete_dir(location.path)
    return f"{base_url}/{target}"
