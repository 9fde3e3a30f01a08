"""Joining or starting Ray for every ``noisyseg`` verb: one connection helper, one convention.

:func:`ensure_ray` joins ``RAY_ADDRESS`` when it is set (a cluster, or inside ``ray job submit``),
else starts a local instance bound to 127.0.0.1. It returns whether *this call* connected, i.e.
whether the caller owns the connection and should end it with ``ray.shutdown()`` (or use
:func:`ray_connection`, which does). When Ray was already initialised in this process (a Tune
trial, a benchmark driving several runs) it does nothing and returns ``False``.

:func:`cluster_cpus` and :func:`largest_node_cpus` read what the connected cluster offers
(``ray.cluster_resources()``, ``ray.nodes()``), for callers that size their work to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

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
