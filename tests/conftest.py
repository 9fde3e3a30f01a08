"""Fixtures shared by the test modules: a tiny phantom store, a Ray head, an MLflow server.

Each service fixture is module-scoped (one per test module that asks for it: Ray and MLflow take
several seconds to start on this machine) and is stopped through the handle that started it
(see :mod:`cluster_utils`). A module sets ``RAY_HEAD_CPUS = n`` to size its Ray head (default 4
logical CPUs) and ``RAY_HEAD_ENV = {...}`` to give the head (and every worker it starts) extra
environment variables. Fixtures of the same name defined in a test module take precedence.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import boto3
import pytest
import s3fs
from cluster_utils import (
    S3_BUCKET,
    LocalMlflowServer,
    MotoS3Server,
    RayHead,
    make_ball_store,
    start_ray_head,
)

DEFAULT_RAY_HEAD_CPUS = 4


@pytest.fixture(scope="module")
def ball_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 16³ store of bright balls: 4 train and 1 val case, label sets ``truth`` and ``noisy``
    (one ball dropped per case); cases ``case000`` and ``case001`` flagged clean."""
    from noisyseg.storage.store import VolumeStore

    path = make_ball_store(tmp_path_factory.mktemp("balls") / "s.zarr", train=4, val=1, size=16)
    VolumeStore.open(path, mode="r+").set_clean(["case000", "case001"])
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMlflowServer]:
    """A real ``mlflow server`` (SQLite, proxied artifacts) on a free 127.0.0.1 port."""
    server = LocalMlflowServer.start(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_head(request: pytest.FixtureRequest) -> Iterator[RayHead]:
    """A real ``ray start --head`` (dashboard and job server on 127.0.0.1) with the module's
    ``RAY_HEAD_CPUS`` logical CPUs and ``RAY_HEAD_ENV``."""
    head = start_ray_head(
        num_cpus=getattr(request.module, "RAY_HEAD_CPUS", DEFAULT_RAY_HEAD_CPUS),
        env=getattr(request.module, "RAY_HEAD_ENV", None),
    )
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    """A real S3-compatible server (moto) with the bucket ``noisyseg-test``; while the module
    runs, the AWS_* variables of this process (and so of the processes it starts) point at it."""
    server = MotoS3Server.start(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in (*server.env(), "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(server.env())
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    # fsspec caches S3FileSystem instances by their arguments, not the environment: an instance
    # made for an earlier module's server would keep its (dead) endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_unconfigure(config: pytest.Config) -> None:
    """Kill any multiprocessing child a failed test left behind: the interpreter joins
    non-daemon children at exit, so one stuck child would hold the whole test run open."""
    for child in multiprocessing.active_children():
        child.kill()
