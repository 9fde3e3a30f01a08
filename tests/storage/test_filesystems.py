"""Filesystem failures become one line naming the URL, what went wrong and what to do."""

from __future__ import annotations

import errno
import importlib.util

import pytest

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.filesystems import (
    describe_failure,
    filesystem_errors,
    is_remote,
    open_filesystem,
    protocol_of,
)


def test_protocol_of_plain_paths_and_urls() -> None:
    assert protocol_of("/data/brain.zarr") == "file"
    assert protocol_of("brain.zarr") == "file"
    assert protocol_of("S3://bucket/brain.zarr") == "s3"
    assert protocol_of("gs://bucket/x") == "gs"
    assert not is_remote("/data/x.zarr")
    assert is_remote("s3://bucket/x.zarr")


def test_local_path_opens(tmp_path) -> None:
    fs, root = open_filesystem(str(tmp_path / "x.zarr"))
    assert root == str(tmp_path / "x.zarr")
    assert "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@pytest.mark.fault_case(10)
def test_unknown_protocol_is_one_line() -> None:
    with pytest.raises(NoisysegInputError) as caught:
        open_filesystem("foo://bucket/brain.zarr")
    message = str(caught.value)
    assert message.startswith("foo://bucket/brain.zarr: unknown storage protocol 'foo'")
    assert "\n" not in message


@pytest.mark.fault_case(10)
@pytest.mark.skipif(
    importlib.util.find_spec("gcsfs") is not None, reason="checks the message when gcsfs is absent"
)
def test_missing_optional_package_names_it() -> None:
    with pytest.raises(NoisysegInputError, match=r"gs:// needs the optional package gcsfs"):
        open_filesystem("gs://bucket/brain.zarr")


@pytest.mark.fault_case(10)
@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "disk full"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only"),
    ],
)
def test_os_errors_are_translated(code: int, words: str) -> None:
    with pytest.raises(NoisysegInputError) as caught:
        with filesystem_errors("/data/brain.zarr", "writing case c001"):
            raise OSError(code, "boom")
    assert str(caught.value).startswith("/data/brain.zarr: writing case c001: ")
    assert words in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.fault_case(10)
def test_boto_errors_are_translated() -> None:
    botocore_exceptions = pytest.importorskip("botocore.exceptions")
    missing = botocore_exceptions.NoCredentialsError()
    assert "AWS_ACCESS_KEY_ID" in describe_failure(missing)
    unreachable = botocore_exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert "does not answer" in describe_failure(unreachable)
    denied = botocore_exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject"
    )
    assert "refused access (AccessDenied)" in describe_failure(denied)
    no_bucket = botocore_exceptions.ClientError(
        {"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "ListObjectsV2"
    )
    assert "bucket does not exist" in describe_failure(no_bucket)


def test_other_errors_pass_through_unchanged() -> None:
    with pytest.raises(KeyError):
        with filesystem_errors("/data/brain.zarr", "reading"):
            raise KeyError("a bug, not a filesystem failure")
    assert describe_failure(OSError(errno.ENOENT, "missing")) is None
