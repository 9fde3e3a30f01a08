"""Joining or starting Ray for the ``noisyseg`` verbs (one copy of the start-up convention)."""

from __future__ import annotations

import os
from typing import Literal


def connect_or_start_ray(
    *, num_cpus: int | None, include_dashboard: bool, log_to_driver: bool
) -> Literal["already", "joined", "started"]:
    """Join ``RAY_ADDRESS`` when set, else start a local Ray bound to 127.0.0.1.

    ``RAY_AUTH_MODE`` must be the same for every process of a cluster; it is set to ``disabled``
    unless the caller set it. The dashboard, when included, listens on 127.0.0.1 only.

    Args:
        num_cpus: logical CPUs of a local instance (``None``: Ray's default); ignored when
            joining.
        include_dashboard: start the dashboard (and job server) with a local instance.
        log_to_driver: forward worker stdout/stderr to this process.

    Returns:
        ``"already"`` when Ray was initialised before (nothing done), ``"joined"`` after
        connecting to ``RAY_ADDRESS``, ``"started"`` after starting a local instance.
    """
    import ray

    if ray.is_initialized():
        return "already"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return "joined"
    dashboard = {"dashboard_host": "127.0.0.1"} if include_dashboard else {}
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=include_dashboard,
        num_cpus=num_cpus,
        log_to_driver=log_to_driver,
        **dashboard,
    )
    return "started"
