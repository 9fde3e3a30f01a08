"""Fixtures shared by the test modules: a tiny phantom store, a Ray head, an MLflow server.

Each service fixture is module-scoped (one per test module that asks for it: Ray and MLflow take
several seconds to start on this machine) and is stopped through the handle that started it
(see :mod:`cluster_utils`). A module sets ``RAY_HEAD_CPUS = n`` to size its Ray head (default 4
logical CPUs) and ``RAY_HEAD_ENV = {...}`` to give the head (and every worker it starts) extra
environment variables. Fixtures of the same name defined in a test module take precedence.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_utils import LocalMlflowServer, RayHead, make_ball_store, start_ray_head

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
