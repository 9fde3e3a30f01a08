"""Joining or starting Ray for every ``noisyseg`` verb: one connection helper, one convention.

:func:`ensure_ray` joins ``RAY_ADDRESS`` when it is set (a cluster, or inside ``ray job submit``),
else starts a local instance bound to 127.0.0.1. It returns whether *this call* connected, i.e.
whether the caller owns the connection and should end it with ``ray.shutdown()`` (or use
:func:`ray_connection`, which does). When Ray was already initialised in this process (a Tune
trial, a benchmark driving several runs) it does nothing and returns ``False``.

:func:`cluster_cpus` and :func:`largest_node_cpus` read what the connected cluster offers
(``ray.cluster_resources()``, ``ray.nodes()``), for callers that size their work to it.

:func:`stream_actor_pool` runs a callable class over many items on a Ray Data actor pool
(``map_batches``, one item per batch, one model per actor, ``num_gpus=1`` per actor on GPUs) and
yields the rows as they finish; :func:`actor_pool_map_kwargs` is the ``map_batches`` arguments it
uses. Prediction over NIfTI folders (:mod:`~noisyseg.distributed.scan_prediction`) and over
store cases (:func:`noisyseg.distributed.inference.map_cases`) both go through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import ray


def local_cpus(cpus_needed: float = 0.0) -> int:
    """Logical CPUs for a local instance: the machine's cores, or ``cpus_needed`` rounded up when
    larger (Ray then over-subscribes the cores rather than leave work unplaceable)."""
    return max(os.cpu_count() or 1, math.ceil(cpus_needed - 1e-9))


def ensure_ray(
    cpus_needed: float = 0.0, *, dashboard: bool = True, log_to_driver: bool = True
) -> bool:
    """Connect this process to Ray; return ``True`` when this call connected (caller shuts down).

    ``RAY_AUTH_MODE`` must be the same for every process of a cluster; it is set to ``disabled``
    unless the caller set it. A local instance listens on 127.0.0.1 only (``address="local"``:
    never a stale cluster recorded under Ray's temp dir).

    Args:
        cpus_needed: CPUs the caller's work needs at once; a local instance gets
            :func:`local_cpus` of it. Ignored when joining a cluster.
        dashboard: start the dashboard (and job server) with a local instance, on 127.0.0.1.
        log_to_driver: forward worker stdout/stderr to this process.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    extra = {"dashboard_host": "127.0.0.1"} if dashboard else {}
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        num_cpus=local_cpus(cpus_needed),
        log_to_driver=log_to_driver,
        **extra,
    )
    return True


@contextmanager
def ray_connection(
    cpus_needed: float = 0.0, *, dashboard: bool = True, log_to_driver: bool = True
) -> Iterator[bool]:
    """:func:`ensure_ray` for a ``with`` block: shuts Ray down at the end when it connected.

    Yields what :func:`ensure_ray` returned.
    """
    owned = ensure_ray(cpus_needed, dashboard=dashboard, log_to_driver=log_to_driver)
    try:
        yield owned
    finally:
        if owned:
            ray.shutdown()


def cluster_cpus() -> float:
    """Logical CPUs of the whole connected cluster (``ray.cluster_resources()["CPU"]``)."""
    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    """GPUs of the whole connected cluster."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def largest_node_cpus() -> float:
    """Logical CPUs of the largest alive node: the most one worker bundle can ask for."""
    sizes = [
        float(node.get("Resources", {}).get("CPU", 0.0))
        for node in ray.nodes()
        if node.get("Alive", node.get("alive", False))
    ]
    return max(sizes, default=0.0)


def actor_pool_map_kwargs(
    workers: int, *, gpu: bool, constructor_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Keyword arguments of ``Dataset.map_batches`` for a callable-class UDF on an actor pool.

    One case per batch (``batch_size=1``), one CPU per actor, and one GPU per actor when
    ``gpu`` (Ray then sets each actor's ``CUDA_VISIBLE_DEVICES`` to its own GPU, so ``cuda``
    there is that GPU). The pool has ``workers`` actors on CPUs; on GPUs it starts with one and
    grows to ``workers`` as the cluster's free GPUs allow, so fewer free GPUs than ``workers``
    slows the run down instead of stalling it. The UDF class is built once per actor with
    ``constructor_kwargs`` (the model is loaded there, once).
    """
    from ray.data import ActorPoolStrategy  # heavy: only when a dataset is built

    workers = max(1, int(workers))
    pool = (
        ActorPoolStrategy(min_size=1, max_size=workers) if gpu else ActorPoolStrategy(size=workers)
    )
    return {
        "fn_constructor_kwargs": dict(constructor_kwargs),
        "compute": pool,
        "batch_size": 1,
        "num_cpus": 1,
        "num_gpus": 1 if gpu else 0,
    }


def _plain(value: Any) -> Any:
    """A Ray Data row value as the driver wants it: numpy scalars become Python scalars."""
    return value.item() if isinstance(value, np.generic) else value


def stream_actor_pool(
    items: Sequence[dict[str, Any]],
    udf: type,
    constructor_kwargs: dict[str, Any],
    *,
    workers: int,
    gpu: bool = False,
) -> Iterator[dict[str, Any]]:
    """Rows of ``ray.data.from_items(items).map_batches(udf, ...)`` yielded as they finish.

    ``udf`` is a callable class, built once per actor with ``constructor_kwargs`` plus
    ``num_threads`` (the cluster's CPUs shared among the actors); see
    :func:`actor_pool_map_kwargs` for the pool. Results come back in completion order, not
    input order. Ray is joined or started by :func:`ray_connection` (and shut down at the end
    when this call started it).
    """
    items = list(items)
    if not items:
        return
    workers = max(1, min(int(workers), len(items)))
    with ray_connection(workers, dashboard=False, log_to_driver=False):
        threads = max(1, int(cluster_cpus()) // workers)
        dataset = ray.data.from_items(items).map_batches(
            udf,
            **actor_pool_map_kwargs(
                workers, gpu=gpu, constructor_kwargs={**constructor_kwargs, "num_threads": threads}
            ),
        )
        for row in dataset.iter_rows():
            yield {key: _plain(value) for key, value in row.items()}
