"""Opening a store's filesystem, and turning filesystem failures into one line for the user.

A store lives at any fsspec URL: a plain path, ``file://``, ``s3://``, ``gs://``. What can go
wrong there is the user's to fix — a protocol fsspec does not know, an optional package that is
not installed (``gs://`` needs ``gcsfs``), missing credentials, an endpoint that does not answer,
a bucket that does not exist, a full disk, a destination that cannot be created — so each becomes
a :class:`~noisyseg.errors.NoisysegInputError` naming the URL, what went wrong and what to do,
instead of a traceback from deep inside s3fs or zarr.

:func:`open_filesystem` resolves a URL; :func:`filesystem_errors` is a context manager that
translates failures raised inside it (wrap every read or write of user storage in it).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec

from noisyseg.errors import NoisysegInputError

#: Optional filesystem packages, by protocol, and how to get them.
OPTIONAL_PACKAGES = {
    "gs": ("gcsfs", "pip install 'noisyseg[cloud]' (or gcsfs)"),
    "gcs": ("gcsfs", "pip install 'noisyseg[cloud]' (or gcsfs)"),
    "s3": ("s3fs", "pip install s3fs"),
    "s3a": ("s3fs", "pip install s3fs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
}

_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device (disk full): free space or choose another place",
    errno.EDQUOT: "disk quota exceeded: free space or choose another place",
    errno.EACCES: "permission denied: choose a place you can write to",
    errno.EPERM: "operation not permitted: choose a place you can write to",
    errno.EROFS: "the filesystem is read-only: choose a writable place",
    errno.ENOTDIR: "a parent of this path is a file, not a folder",
}


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (``"file"`` for plain paths)."""
    head, sep, _ = str(url).partition("://")
    return head.lower() if sep else "file"


def is_remote(url: str) -> bool:
    """Whether ``url`` names object storage (anything but the local filesystem)."""
    return protocol_of(url) not in ("file", "local")


def open_filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, root path)`` of ``url``; one clear line when it cannot be opened.

    Raises:
        NoisysegInputError: unknown protocol, missing optional package, bad options.
    """
    protocol = protocol_of(url)
    try:
        fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    except ImportError:
        package, how = OPTIONAL_PACKAGES.get(protocol, ("a filesystem package", "install it"))
        raise NoisysegInputError(
            f"{protocol}:// needs the optional package {package}, which is not installed: {how}",
            path=str(url),
        ) from None
    except ValueError as error:
        if "protocol" in str(error).lower():
            known = ", ".join(sorted({"file", "s3", "gs", "az", "memory"}))
            raise NoisysegInputError(
                f"unknown storage protocol {protocol!r} (use a path or one of {known}://)",
                path=str(url),
            ) from None
        raise
    return fs, root.rstrip("/") or "/"


def describe_failure(error: BaseException) -> str | None:
    """The user-facing rule for a filesystem failure, or None when ``error`` is not one."""
    module = type(error).__module__ or ""
    name = type(error).__name__
    if module.startswith(("botocore", "aiobotocore")):
        return _describe_boto(name, error)
    if name in ("DefaultCredentialsError", "RefreshError"):  # google-auth
        return "no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS or run gcloud auth"
    if isinstance(error, OSError) and error.errno in _OS_ERRORS:
        return _OS_ERRORS[error.errno]
    if isinstance(error, PermissionError):
        return "access denied: check the credentials and the bucket or folder permissions"
    return None


def _describe_boto(name: str, error: BaseException) -> str:
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            "no object-store credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for an S3-compatible server)"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return (
            "the object-store endpoint does not answer: check AWS_ENDPOINT_URL "
            "(or FSSPEC_S3_ENDPOINT_URL) and the network"
        )
    if name == "ClientError":
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            return "the bucket does not exist: create it or fix the URL"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"the object store refused access ({code}): check the credentials"
        return f"the object store answered {code or 'an error'}"
    return f"object-store failure ({name})"


@contextmanager
def filesystem_errors(url: str, action: str) -> Iterator[None]:
    """Translate filesystem failures raised inside the block into one line.

    Args:
        url: the store or file the block works on, named in the message.
        action: what the block does, in words (``"writing case c001"``).
    """
    try:
        yield
    except NoisysegInputError:
        raise
    except Exception as error:
        rule = describe_failure(error)
        if rule is None:
            raise
        raise NoisysegInputError(f"{action}: {rule}", path=str(url)) from error
