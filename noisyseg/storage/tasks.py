"""Running a list of Dask delayed tasks (one per case) on a scheduler named by the user."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import dask
from dask.diagnostics import ProgressBar

from noisyseg.errors import NoisysegInputError

SCHEDULERS = ("threads", "processes", "synchronous", "ray")


class _RayShutdown(contextlib.AbstractContextManager):
    def __init__(self, ray: Any) -> None:
        self.ray = ray

    def __exit__(self, *exc: object) -> None:
        self.ray.shutdown()


def run_tasks(
    tasks: list, *, scheduler: str, progress: bool = False, num_workers: int | None = None
) -> list:
    """Compute Dask delayed ``tasks`` on a scheduler name (see :data:`SCHEDULERS`), in order.

    ``ray`` uses Ray's Dask scheduler on the cluster this process is connected to (call
    ``ray.init`` first, or run under ``ray job submit``).
    """
    kwargs: dict[str, Any] = {}
    bar: Any = contextlib.nullcontext()
    if scheduler == "ray":
        # optional and heavy: Ray is only needed for this scheduler
        import ray
        from ray.util.dask import ray_dask_get

        if not ray.is_initialized():
            if not os.environ.get("RAY_ADDRESS"):
                raise NoisysegInputError(
                    "scheduler 'ray' needs a Ray connection: call ray.init(...) first, set "
                    "RAY_ADDRESS, or run under `ray job submit`"
                )
            # Connect to the cluster RAY_ADDRESS names (set by `ray job submit`), and leave
            # it again afterwards: this call owns that connection.
            ray.init()
            bar = _RayShutdown(ray)
        kwargs["scheduler"] = ray_dask_get
    else:
        if scheduler not in SCHEDULERS:
            raise NoisysegInputError(f"unknown scheduler {scheduler!r}")
        kwargs["scheduler"] = scheduler
        if num_workers is not None and scheduler != "synchronous":
            kwargs["num_workers"] = num_workers
        if progress:
            bar = ProgressBar()
    with bar:
        return list(dask.compute(*tasks, **kwargs))
