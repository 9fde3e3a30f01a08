"""Launch a training run on Ray Train (``TorchTrainer``, Train V2 API), tracked in MLflow.

:func:`run_training` is what ``noisyseg train``, the benchmark and the Tune trials call. It reads
as its steps; the config arrives validated (:func:`~noisyseg.distributed.config.make_config`,
:func:`~noisyseg.distributed.config.check_against_store`) and is trusted from there on:

1. :func:`plan_launch` — the run name and Ray storage path; whether ``<storage>/<run_name>``
   holds a checkpoint to resume (the newest complete one), and whether it may: same network,
   data and objective (:mod:`.resume`), its MLflow run on this tracking server. ``force_new``
   sets an earlier run directory aside instead. Refusals happen here, before any work;
2. :func:`check_memory` — the per-worker memory estimate (printed), refused when too large;
3. :func:`open_tracking` — the MLflow run: created, or the checkpoint's run re-opened;
4. :func:`fit` — connect to Ray (``RAY_ADDRESS``, else a local instance on 127.0.0.1), start the
   progress display, ``TorchTrainer(...).fit()`` (:func:`make_trainer`); Ctrl-C or a failure
   marks the MLflow run KILLED / FAILED with the reason, and stops what this call started.

Quiet by default: Ray's and MLflow's own log records go to ``<run dir>/noisyseg.log`` (path
printed once) and worker output stays in Ray's session logs; the terminal shows one progress
line per run (:mod:`.progress`) and the results. ``verbose=True`` brings Ray's output back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from noisyseg.distributed.checkpoints import latest_checkpoint_state
from noisyseg.distributed.config import StoreInfo, TrainConfig, check_against_store
from noisyseg.distributed.memory import (
    MemoryEstimate,
    available_per_worker,
    check_worker_memory,
    estimate_worker_memory,
)
from noisyseg.distributed.progress import ProgressDisplay, ProgressReceiver
from noisyseg.distributed.ray_utils import ray_connection
from noisyseg.distributed.resume import check_identity, check_tracking_run, set_aside
from noisyseg.distributed.run_guard import RunGuard
from noisyseg.distributed.run_storage import RunLocation, set_aside_remote
from noisyseg.distributed.tracking import (
    RunHandle,
    finish_run,
    open_run,
    resolve_tracking_uri,
    run_status,
)
from noisyseg.distributed.train_loop import train_loop_per_worker

DEFAULT_STORAGE_PATH = "~/ray_results"
LOG_FILE = "noisyseg.log"
PID_DIR_ENV = "NOISYSEG_TEST_PID_DIR"  # test hook: ranks write their pid there
STEP_DELAY_ENV = "NOISYSEG_TEST_STEP_DELAY_S"  # test hook: sleep per step (slow a run down)
#: Loggers whose records go to the run's log file unless ``verbose``.
QUIET_LOGGERS = ("ray", "mlflow", "alembic", "py.warnings", "urllib3", "filelock")
PREFIX = "[noisyseg train]"


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


# ---------------------------------------------------------------------------------- 1. plan
@dataclass
class LaunchPlan:
    """What a launch will do: the config (with its run name), where the run lives, and the
    checkpoint it resumes (``prior``: ``(state.pt path or URL, payload)`` or None)."""

    config: TrainConfig
    info: StoreInfo
    root: str
    run_dir: str
    prior: tuple[Path | str, dict[str, Any]] | None = None
    set_aside_to: Path | str | None = None

    @property
    def local(self) -> bool:
        return "://" not in self.root

    @property
    def storage(self) -> RunLocation:
        """The storage root as a location (filesystem and path, credentials from the env)."""
        return RunLocation.resolve(self.root)

    @property
    def location(self) -> RunLocation:
        """The run directory as a location (travels to the workers)."""
        return self.storage.child(self.config.run_name or "")

    @property
    def resume_step(self) -> int:
        return int(self.prior[1]["step"]) if self.prior is not None else 0

    @property
    def resume_run_id(self) -> str | None:
        return (self.prior[1].get("mlflow_run_id") or None) if self.prior is not None else None

    @property
    def log_file(self) -> Path:
        """``<run dir>/noisyseg.log``; beside the working directory for remote storage."""
        if self.local:
            return Path(self.run_dir) / LOG_FILE
        return Path.cwd() / f"{self.config.run_name}.{LOG_FILE}"


def plan_launch(
    config: TrainConfig, info: StoreInfo, tracking_uri: str, *, force_new: bool = False
) -> LaunchPlan:
    """Name the run, find what it resumes, refuse what it may not resume (one line each).

    Local and remote storage alike: the newest complete checkpoint under ``<storage>/<run>`` is
    read through the storage's filesystem; ``force_new`` renames a local run directory, and
    copies a remote one to ``<run>.old-<time>`` before deleting it.
    """
    if config.run_name is None:
        config = config.model_copy(update={"run_name": default_run_name(config)})
    run_name = config.run_name
    root = storage_path(config)
    plan = LaunchPlan(config, info, root, f"{root.rstrip('/')}/{run_name}")
    location = plan.location if not plan.local else None
    if location is not None:
        location.check_reachable()
    plan.prior = latest_checkpoint_state(location or plan.run_dir)
    if force_new and location is not None and location.exists():
        plan.set_aside_to, plan.prior = set_aside_remote(location), None
    elif force_new and plan.local and Path(plan.run_dir).exists():
        plan.set_aside_to, plan.prior = set_aside(plan.run_dir), None
    if plan.prior is not None:
        spec = config.unet_spec(info.spatial_dims, info.in_channels).to_dict()
        check_identity(run_name, plan.prior[1], config, spec)
        check_tracking_run(run_name, plan.prior[1], tracking_uri, config.experiment)
    return plan


# ---------------------------------------------------------------------------------- 2. memory
def check_memory(config: TrainConfig, info: StoreInfo) -> MemoryEstimate:
    """The per-worker memory estimate; refused when a worker cannot have that much."""
    estimate = estimate_worker_memory(
        config.unet_spec(info.spatial_dims, info.in_channels),
        batch_size=config.batch_size,
        patch=tuple(info.patch_shape),
        optimizer=config.optimizer,
        reweight=config.reweight,
        dataloader_workers=config.num_dataloader_workers,
    )
    budget, what = available_per_worker(config.workers, config.gpu)
    check_worker_memory(estimate, budget, what)
    return estimate


# ---------------------------------------------------------------------------------- 3. MLflow
def open_tracking(plan: LaunchPlan, tracking_uri: str, mlflow_run_id: str | None) -> RunHandle:
    """Re-open the run the checkpoint names, else ``mlflow_run_id`` (a Tune trial's child run),
    else create one."""
    return open_run(
        tracking_uri,
        plan.config.experiment,
        plan.config.run_name or "",
        plan.config.flat_params(),
        resume_run_id=plan.resume_run_id or mlflow_run_id,
    )


def announce(
    plan: LaunchPlan, handle: RunHandle, print_fn: Callable[[str], None], *, verbose: bool
) -> None:
    """The lines that say where everything is (printed once)."""
    if plan.set_aside_to is not None:
        print_fn(f"{PREFIX} --force-new: the earlier run was moved to {plan.set_aside_to}")
    verb = f"resuming from step {plan.resume_step}" if plan.prior is not None else "starting"
    print_fn(f"{PREFIX} run {plan.config.run_name!r} {verb}; checkpoints in {plan.run_dir}")
    print_fn(f"{PREFIX} MLflow tracking URI: {handle.tracking_uri}")
    print_fn(f"{PREFIX} MLflow run id: {handle.run_id} (experiment {handle.experiment_id})")
    print_fn(f"{PREFIX} MLflow UI: {handle.url}")
    if not verbose:
        print_fn(f"{PREFIX} Ray and MLflow logs: {plan.log_file} (--verbose shows them)")


# ---------------------------------------------------------------------------------- 4. fit
def loop_config(plan: LaunchPlan, handle: RunHandle, inbox: Any | None) -> dict[str, Any]:
    """``train_loop_config`` for the workers (see ``train_loop.WorkerJob``)."""
    hooks: dict[str, Any] = {}
    if os.environ.get(PID_DIR_ENV):
        hooks["pid_dir"] = os.environ[PID_DIR_ENV]
    if os.environ.get(STEP_DELAY_ENV):
        hooks["step_delay_s"] = float(os.environ[STEP_DELAY_ENV])
    return {
        "config": plan.config.model_dump(mode="json"),
        "store_info": plan.info.model_dump(mode="json"),
        "mlflow": {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id},
        "run_dir": plan.run_dir if plan.local else None,
        "run_location": None if plan.local else plan.location,
        "progress_inbox": inbox,
        "hooks": hooks,
    }


def make_trainer(
    plan: LaunchPlan,
    config_for_loop: dict[str, Any],
    *,
    worker_env: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    controller_failure_limit: int = -1,
) -> TorchTrainer:
    """The ``TorchTrainer``: workers × (CPUs[, 1 GPU]), checkpoints kept, failures allowed.

    ``controller_failure_limit``: Ray Train controller failures (a worker group that could not be
    placed within Ray Train's start-up timeout) retried before the run fails; -1 (Ray's default)
    retries forever.
    """
    config = plan.config
    storage: dict[str, Any] = {"storage_path": plan.root}
    if not plan.local:  # prefix-stripped path + explicit filesystem (run_storage docstring)
        remote = plan.storage
        storage = {"storage_path": remote.path, "storage_filesystem": remote.filesystem}
    resources: dict[str, float] = {"CPU": config.cpus_per_worker}
    if config.gpu:
        resources["GPU"] = 1.0
    # Train V2 patches print() in workers to go through its logger *and*, once MLflow has
    # wrapped sys.stdout, to the original print as well; without the patch it goes once.
    env = {
        "MLFLOW_TRACKING_URI": config_for_loop["mlflow"]["tracking_uri"],
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        **(worker_env or {}),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config_for_loop,
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run_name,
            **storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_checkpoints_to_keep),
            failure_config=FailureConfig(
                max_failures=config.max_failures,
                controller_failure_limit=controller_failure_limit,
            ),
            worker_runtime_env={"env_vars": env},
            callbacks=list(callbacks or []),
        ),
    )


_quiet_lock = threading.Lock()
_quiet_depth = 0


@contextmanager
def quiet_logs(path: Path, *, verbose: bool) -> Iterator[Callable[[], None]]:
    """Send the records of :data:`QUIET_LOGGERS` to ``path`` (unless ``verbose``); restore after.

    Yields a function that re-applies the redirection (``ray.init`` re-configures Ray's logger).
    Logging is process-wide: when runs overlap (the benchmark trains in parallel threads) the
    first run's file takes the records of all until it ends.
    """
    global _quiet_depth
    with _quiet_lock:
        outermost = _quiet_depth == 0 and not verbose
        _quiet_depth += 1 if outermost else 0
    if not outermost:
        yield lambda: None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    before = [(lg.handlers[:], lg.propagate) for lg in loggers]

    def redirect() -> None:
        for logger in loggers:
            logger.handlers = [handler]
            logger.propagate = False

    redirect()
    logging.captureWarnings(True)
    try:
        yield redirect
    finally:
        logging.captureWarnings(False)
        for logger, (handlers, propagate) in zip(loggers, before):
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()
        with _quiet_lock:
            _quiet_depth -= 1


INTERRUPTED = "interrupted (Ctrl-C)"


def fit(trainer: TorchTrainer, handle: RunHandle, steps: int) -> Any:
    """``trainer.fit()``; Ctrl-C marks the MLflow run KILLED, a failure FAILED (with why).

    In the main thread Ray Train V2 installs its own SIGINT handler for the length of ``fit``: the
    first Ctrl-C aborts the controller (worker group stopped) and ``fit`` then *returns* a result
    without an error, before the last step; a third one, or an abort that finds the controller
    gone, calls ``sys.exit(0)``. Both are turned back into :class:`KeyboardInterrupt` here, so the
    command ends with its one line and status 130 and the run says it was interrupted.
    """
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        finish_run(handle.tracking_uri, handle.run_id, "KILLED", reason=INTERRUPTED)
        raise KeyboardInterrupt from None
    except BaseException as error:
        first = (str(error).strip().splitlines() or [""])[0]
        reason = f"failed: {error.__class__.__name__}: {first}"
        finish_run(handle.tracking_uri, handle.run_id, "FAILED", reason=reason)
        raise
    reached = int((result.metrics or {}).get("step", 0))
    if reached < steps and run_status(handle.tracking_uri, handle.run_id) == "RUNNING":
        finish_run(handle.tracking_uri, handle.run_id, "KILLED", reason=INTERRUPTED)
        raise KeyboardInterrupt  # aborted by Train's SIGINT handler at step ``reached``
    return result


def run_training(
    config: TrainConfig,
    *,
    store_info: StoreInfo | None = None,
    tracking_uri: str | None = None,
    print_fn: Callable[[str], None] = print,
    worker_env: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    mlflow_run_id: str | None = None,
    force_new: bool = False,
    verbose: bool = False,
    display: ProgressDisplay | None = None,
    controller_failure_limit: int = -1,
) -> TrainingOutcome:
    """Plan, check, track and train on Ray; returns where the run lives (module docstring).

    ``callbacks``: Ray Train ``UserCallback`` objects added to the ``RunConfig`` (a Tune trial
    passes ``TuneReportCallback()``). ``mlflow_run_id``: an existing MLflow run to log into when
    no checkpoint names one (a Tune trial's child run). ``force_new``: set an earlier run of the
    same name aside and start afresh. ``display``: a shared progress display (runs in parallel
    threads); default one printing through ``print_fn``. ``controller_failure_limit``: see
    :func:`make_trainer` (a Tune trial fails instead of waiting forever for its workers).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    info = store_info or check_against_store(config)
    tracking_uri = tracking_uri or resolve_tracking_uri()
    plan = plan_launch(config, info, tracking_uri, force_new=force_new)
    print_fn(f"{PREFIX} {check_memory(plan.config, info).line()}")
    own_display = display is None
    display = display or ProgressDisplay(print_fn)
    cpus = plan.config.workers * plan.config.cpus_per_worker
    with quiet_logs(plan.log_file, verbose=verbose) as requiet:
        handle = open_tracking(plan, tracking_uri, mlflow_run_id)
        announce(plan, handle, print_fn, verbose=verbose)
        with ray_connection(cpus, log_to_driver=verbose):
            requiet()
            receiver = ProgressReceiver(display)
            trainer = make_trainer(
                plan,
                loop_config(plan, handle, receiver.inbox),
                worker_env=worker_env,
                callbacks=callbacks,
                controller_failure_limit=controller_failure_limit,
            )
            guard = RunGuard.start(tracking_uri, handle.run_id, plan.run_dir)
            try:
                result = fit(trainer, handle, plan.config.steps)
            finally:
                guard.release()  # the run is ended here (or by the workers): not the guard's
                receiver.close()
                if own_display:
                    display.close()
    metrics = dict(result.metrics or {})
    print_fn(
        f"{PREFIX} finished {plan.config.run_name!r} at step {metrics.get('step')}; "
        f"MLflow run {handle.run_id} at {handle.url}"
    )
    return TrainingOutcome(
        run_name=plan.config.run_name or "",
        run_dir=plan.run_dir,
        tracking_uri=tracking_uri,
        experiment_id=handle.experiment_id,
        run_id=handle.run_id,
        url=handle.url,
        resumed_from_step=plan.resume_step,
        metrics=metrics,
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
    )
