"""Launch a training run on Ray Train (``TorchTrainer``, Train V2 API), tracked in MLflow.

:func:`run_training` is what ``noisyseg train`` and the Tune trials call:

1. validate the config against the store (no Ray work before that);
2. resolve the stable run name and the Ray storage path; when ``<storage>/<run_name>`` already
   holds checkpoints the run resumes — Ray Train V2 restores its checkpoint manager from that
   directory and hands the latest checkpoint to ``ray.train.get_checkpoint()`` — and the MLflow
   run id stored in that checkpoint is re-opened instead of creating a new run;
3. connect to Ray: ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else a local instance
   on 127.0.0.1 (``RAY_AUTH_MODE`` defaults to ``disabled`` for it);
4. ``TorchTrainer(train_loop_per_worker, ...).fit()`` with ``ScalingConfig(num_workers, use_gpu,
   resources_per_worker)``, ``RunConfig(name, storage_path, CheckpointConfig(num_to_keep),
   FailureConfig(max_failures))``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisyseg.distributed.config import StoreInfo, TrainConfig, check_against_store

DEFAULT_STORAGE_PATH = "~/ray_results"
PID_DIR_ENV = "NOISYSEG_TEST_PID_DIR"  # test hook: ranks write their pid there
STEP_DELAY_ENV = "NOISYSEG_TEST_STEP_DELAY_S"  # test hook: sleep per step (slow a run down)


@dataclass
class TrainingOutcome:
    """Where a finished run lives."""

    run_name: str
    run_dir: str
    tracking_uri: str
    experiment_id: str
    run_id: str
    url: str
    resumed_from_step: int
    metrics: dict[str, Any]
    checkpoint_path: str | None


def default_run_name(config: TrainConfig) -> str:
    """``<loss>[-<reweight>]-<YYYYmmdd-HHMMSS>`` when no run name is given."""
    parts = [config.loss]
    if config.reweight != "none":
        parts.append(config.reweight)
    parts.append(time.strftime("%Y%m%d-%H%M%S"))
    return "-".join(parts)


def storage_path(config: TrainConfig) -> str:
    """Absolute Ray Train storage path (local path or URI)."""
    path = config.storage_path or DEFAULT_STORAGE_PATH
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def ensure_ray(num_cpus_hint: float = 1.0) -> bool:
    """Connect to Ray; return True when this call started a local instance (caller shuts it down).

    ``RAY_ADDRESS`` set (a cluster, or inside ``ray job submit``): join it. Otherwise start a
    local instance bound to 127.0.0.1 with the dashboard on 127.0.0.1. ``RAY_AUTH_MODE`` must be
    the same for every process of a cluster; for the local instance it is set to ``disabled``
    unless the caller set it.
    """
    from noisyseg.distributed.ray_utils import connect_or_start_ray

    num_cpus = max(os.cpu_count() or 1, int(num_cpus_hint + 0.999))
    outcome = connect_or_start_ray(num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
    return outcome == "started"


def run_training(
    config: TrainConfig,
    *,
    store_info: StoreInfo | None = None,
    tracking_uri: str | None = None,
    print_fn: Callable[[str], None] = print,
    worker_env: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    mlflow_run_id: str | None = None,
) -> TrainingOutcome:
    """Validate, then train on Ray; returns where the run lives. See the module docstring.

    ``callbacks``: Ray Train ``UserCallback`` objects added to the ``RunConfig`` (a Tune trial
    passes ``TuneReportCallback()``). ``mlflow_run_id``: an existing MLflow run to log into when
    no checkpoint names one (a Tune trial's child run); ``None`` creates a run.
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from noisyseg.distributed.checkpoints import latest_checkpoint_state
    from noisyseg.distributed.tracking import finish_run, open_run, resolve_tracking_uri

    info = store_info or check_against_store(config)
    if config.run_name is None:
        config = config.model_copy(update={"run_name": default_run_name(config)})
    run_name = config.run_name
    assert run_name is not None
    root = storage_path(config)
    run_dir = f"{root.rstrip('/')}/{run_name}"

    resume_step, resume_run_id = 0, None
    prior = latest_checkpoint_state(run_dir) if "://" not in root else None
    if prior is not None:
        resume_step = int(prior[1]["step"])
        resume_run_id = prior[1].get("mlflow_run_id") or None
    if resume_run_id is None:
        resume_run_id = mlflow_run_id

    tracking_uri = tracking_uri or resolve_tracking_uri()
    handle = open_run(
        tracking_uri, config.experiment, run_name, config.flat_params(), resume_run_id=resume_run_id
    )
    verb = f"resuming from step {resume_step}" if prior is not None else "starting"
    print_fn(f"[noisyseg train] run {run_name!r} {verb}; checkpoints in {run_dir}")
    print_fn(f"[noisyseg train] MLflow tracking URI: {tracking_uri}")
    print_fn(f"[noisyseg train] MLflow run id: {handle.run_id} (experiment {handle.experiment_id})")
    print_fn(f"[noisyseg train] MLflow UI: {handle.url}")

    started_ray = ensure_ray(config.workers * config.cpus_per_worker)
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from noisyseg.distributed.train_loop import train_loop_per_worker

    loop_config: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "store_info": info.model_dump(mode="json"),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": handle.run_id},
    }
    if os.environ.get(PID_DIR_ENV):
        loop_config["_pid_dir"] = os.environ[PID_DIR_ENV]
    if os.environ.get(STEP_DELAY_ENV):
        loop_config["_step_delay_s"] = float(os.environ[STEP_DELAY_ENV])

    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.gpu:
        resources["GPU"] = 1.0
    # Train V2 patches print() in workers to go through its logger *and*, once MLflow has
    # wrapped sys.stdout, to the original print as well: every progress line reached the driver
    # twice. Without the patch the line goes to the worker's stdout once (Ray still streams it).
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **(worker_env or {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=root,
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=list(callbacks or []),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        finish_run(tracking_uri, handle.run_id, "FAILED")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    metrics = dict(result.metrics or {})
    checkpoint_path = result.checkpoint.path if result.checkpoint is not None else None
    print_fn(
        f"[noisyseg train] finished {run_name!r} at step {metrics.get('step')}; "
        f"MLflow run {handle.run_id} at {handle.url}"
    )
    return TrainingOutcome(
        run_name=run_name,
        run_dir=run_dir,
        tracking_uri=tracking_uri,
        experiment_id=handle.experiment_id,
        run_id=handle.run_id,
        url=handle.url,
        resumed_from_step=resume_step,
        metrics=metrics,
        checkpoint_path=checkpoint_path,
    )
