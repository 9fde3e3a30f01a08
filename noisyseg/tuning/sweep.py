"""Ray Tune sweeps: a ``Tuner`` whose trials each launch a ``TorchTrainer`` (Train V2 + Tune).

Layout of a sweep named ``S`` under the storage root ``R`` (``--storage-path``, default
``~/ray_results``)::

    R/S/                       the Tune experiment (experiment_state-*.json, one dir per trial)
    R/S/noisyseg_sweep.json    parent MLflow run id, tracking URI, settings, status
    R/S/train/S-<trial_id>/    each trial's Ray Train run (checkpoints; resumed by run name)
    R/S/mlflow/                the sweep's own MLflow server (only without MLFLOW_TRACKING_URI)
    R/S/summary/               trials.csv, trials.md, metric_vs_search.png
    R/S/best.yaml              the best trial's full config, ready for ``noisyseg train --config``

:func:`run_sweep` runs the steps in order: check everything (:func:`noisyseg.tuning.plan.prepare`:
no Ray, MLflow or file work before that); connect to Ray and bound the trials running at once by
what the cluster can place (:func:`noisyseg.tuning.plan.plan_concurrency`); start or join MLflow
tracking and open the parent run; run (or resume) the Tune experiment; summarise it.

How a trial runs (:func:`trial_function`, inside a Tune trial actor that reserves
``trial_cpus`` CPUs): it builds the trial's TrainConfig (base config + search point, run name
``S-<trial_id>``), finds or creates its MLflow child run and calls
:func:`noisyseg.distributed.trainer.run_training` with Tune's ``TuneReportCallback``, which
forwards rank 0's ``ray.train.report`` metrics (``step``, ``train_loss``, ``val/*``) to Tune.
The Train workers reserve their own resources through the trainer's placement group. A worker
group that cannot be placed fails the trial after Ray Train's start-up timeout (the trial's
``controller_failure_limit`` is :data:`PLACEMENT_RETRIES`); the failure is shown in the trial's
row instead of being retried in silence.

ASHA (``ray.tune.schedulers.ASHAScheduler``) uses ``time_attr="step"`` (optimiser steps, which
stay right across resumes), ``max_t = steps``, the grace period and ``reduction_factor``. With a
validation metric (``val/...``) every report must carry it, so the trial's
``checkpoint_interval`` is ``val_interval`` (each validation is one report).

Interrupting (Ctrl-C): Tune stops the trials and saves its state; the parent run and the
unfinished trials' runs are marked ``KILLED`` (tag ``noisyseg.end_reason``), the sweep's own
MLflow server is stopped and the command ends with one line (exit status 130). Re-running the same
command resumes: ``Tuner.restore(..., resume_unfinished=True, restart_errored=True)``; a restarted
trial keeps its trial id, so its run name points Ray Train at its checkpoints and its MLflow
child run is found by tag; nothing is logged twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.tune
import yaml
from mlflow import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from noisyseg.distributed import tracking
from noisyseg.distributed.config import make_config
from noisyseg.distributed.mlflow_server import LocalMlflowServer
from noisyseg.distributed.ray_utils import (
    cluster_cpus,
    cluster_gpus,
    ensure_ray,
    largest_node_cpus,
)
from noisyseg.distributed.trainer import run_training
from noisyseg.errors import NoisysegInputError
from noisyseg.tuning import summary
from noisyseg.tuning.plan import (
    SweepPlan,
    SweepSettings,
    TrialFootprint,
    plan_concurrency,
    prepare,
)

STATE_FILE = "noisyseg_sweep.json"
BEST_FILE = "best.yaml"
DEFAULT_ROOT = "~/ray_results"
#: Worker-group placement failures (Ray Train's start-up timeout) a trial retries before failing.
PLACEMENT_RETRIES = 1
INTERRUPTED = "interrupted (Ctrl-C); re-run the same command to resume the sweep"


@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep produced."""

    sweep_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_yaml: str | None = None
    interrupted: bool = False


# ---------------------------------------------------------------------------------- paths
def sweep_root(storage_path: str | None) -> Path:
    """The local directory sweeps live in (``--storage-path``, default ``~/ray_results``).

    Object storage is refused (one line, before any work): the sweep's state file, summary,
    ``best.yaml`` and its own MLflow server are files in this folder, read and written with
    ``pathlib``. Single training runs do resume on any filesystem (``noisyseg train``).
    """
    path = storage_path or DEFAULT_ROOT
    if "://" in path:
        raise NoisysegInputError(
            "sweeps on object storage are not supported yet: `noisyseg tune` keeps its state, "
            "summary and MLflow server in a folder, so give a local or shared-filesystem "
            "--storage-path (NFS, a mounted bucket); `noisyseg train --storage-path` does take "
            "s3:// and resumes there",
            path=path,
        )
    return Path(path).expanduser().resolve()


def find_sweep_dir(sweep: str, storage_path: str | None = None) -> Path:
    """``sweep`` as a directory holding ``noisyseg_sweep.json``, else ``<root>/<sweep>``."""
    as_path = Path(sweep).expanduser()
    if (as_path / STATE_FILE).is_file():
        return as_path.resolve()
    candidate = sweep_root(storage_path) / sweep
    if not (candidate / STATE_FILE).is_file():
        raise NoisysegInputError(
            f"no sweep named {sweep!r} (no {STATE_FILE}); give --storage-path where it ran or the "
            "sweep directory",
            path=str(candidate),
        )
    return candidate


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(path: Path, **update: Any) -> None:
    state = _read_state(path)
    state.update(update, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------- the trial
def trial_function(
    point: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep: str,
    train_root: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
) -> None:
    """One Tune trial: train the base config at ``point`` with a TorchTrainer, report to Tune."""
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{sweep}-{trial_id}"
    config = make_config({**base, **point, "run_name": run_name, "storage_path": train_root})
    child = tracking.find_or_create_child(
        tracking_uri,
        experiment_id,
        parent_run_id,
        sweep,
        trial_id,
        run_name,
        config.flat_params(),
        point,
    )
    run_training(
        config,
        tracking_uri=tracking_uri,
        callbacks=[TuneReportCallback()],
        mlflow_run_id=child,
        print_fn=lambda line: print(f"[{trial_id}] {line}", flush=True),
        worker_env={"RAY_TRAIN_V2_ENABLED": "1"},
        controller_failure_limit=PLACEMENT_RETRIES,
    )


# ---------------------------------------------------------------------------------- steps
def resolve_sweep_tracking(
    sweep_dir: str | Path, max_concurrent: int | None
) -> tuple[str, LocalMlflowServer | None]:
    """The tracking URI for a sweep, and the server started for it (``None``: not ours).

    ``MLFLOW_TRACKING_URI`` when set; a file store (``sqlite:``, ``file:``) only when one trial
    runs at a time (concurrent trials must log over HTTP to one server). Without it, a local
    ``mlflow server`` under ``<sweep dir>/mlflow`` (stopped by the caller).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        if tracking.is_local_file_store(uri) and max_concurrent != 1:
            raise NoisysegInputError(
                f"MLFLOW_TRACKING_URI={uri} is a local file store: concurrent trials must log to "
                "an MLflow server over HTTP (start `mlflow server --backend-store-uri "
                f"{uri if uri.startswith('sqlite:') else 'sqlite:///mlflow.db'}` and point "
                "MLFLOW_TRACKING_URI at it), unset MLFLOW_TRACKING_URI to let the sweep start "
                "one, or pass --max-concurrent 1"
            )
        return uri, None
    server = LocalMlflowServer.start(Path(sweep_dir) / "mlflow")
    return server.uri, server


def _concurrency(settings: SweepSettings, plan: SweepPlan, print_fn: Callable[[str], None]) -> int:
    """Trials at once: what the connected cluster can place, at most ``--max-concurrent``."""
    footprint = TrialFootprint.of(plan.sample, settings.trial_cpus)
    bound, note = plan_concurrency(
        footprint,
        settings.max_concurrent,
        cluster_cpus=cluster_cpus(),
        cluster_gpus=cluster_gpus(),
        largest_node_cpus=largest_node_cpus(),
    )
    if note:
        print_fn(f"[noisyseg tune] {note}")
    print_fn(f"[noisyseg tune] up to {bound} trial(s) at once; each holds {footprint.describe()}")
    return bound


def _parent_params(settings: SweepSettings, plan: SweepPlan, concurrent: int) -> dict[str, Any]:
    return {
        "sweep": settings.name,
        "metric": settings.metric,
        "mode": settings.mode,
        "num_samples": settings.num_samples,
        "max_concurrent": concurrent,
        "scheduler": settings.scheduler,
        "grace_period": plan.grace_period,
        "reduction_factor": settings.reduction_factor,
        "trial_cpus": settings.trial_cpus,
        **{f"space.{k}": v for k, v in settings.space.describe().items()},
        **{f"base.{k}": v for k, v in plan.sample.flat_params().items() if k not in settings.space},
    }


def _make_tuner(
    settings: SweepSettings,
    plan: SweepPlan,
    sweep_dir: Path,
    concurrent: int,
    parent: tracking.RunHandle,
    print_fn: Callable[[str], None],
) -> tune.Tuner:
    """A new Tuner for the sweep, or the saved one restored (unfinished and errored trials go on)."""
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_function,
            base=plan.base,
            sweep=settings.name,
            train_root=str(sweep_dir / "train"),
            tracking_uri=parent.tracking_uri,
            experiment_id=parent.experiment_id,
            parent_run_id=parent.run_id,
        ),
        {"CPU": settings.trial_cpus},
    )
    if tune.Tuner.can_restore(str(sweep_dir)):
        print_fn(
            f"[noisyseg tune] resuming sweep {settings.name!r} (unfinished and errored trials "
            "continue)"
        )
        return tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True, restart_errored=True
        )
    if settings.scheduler == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="step",
            max_t=plan.sample.steps,
            grace_period=plan.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=settings.space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=str(sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _remove_orphan_children(parent: tracking.RunHandle, rows: list[dict[str, Any]]) -> None:
    """Delete child runs whose trial Tune no longer knows (the driver died before Tune saved its
    first experiment state, so the sweep started afresh): they would be duplicates."""
    known = {r["trial_id"] for r in rows}
    client = MlflowClient(parent.tracking_uri)
    for run in tracking.children(parent.tracking_uri, parent.experiment_id, parent.run_id):
        if run.data.tags.get(tracking.TRIAL_TAG) not in known:
            client.delete_run(run.info.run_id)


def _summarise(
    settings: SweepSettings,
    plan: SweepPlan,
    sweep_dir: Path,
    parent: tracking.RunHandle,
    print_fn: Callable[[str], None],
) -> SweepOutcome:
    """Rows, best trial, summary files and MLflow tags of the sweep that just ran."""
    rows = summary.trial_rows(
        str(sweep_dir),
        metric=settings.metric,
        mode=settings.mode,
        search_fields=settings.space.names,
        steps=plan.sample.steps,
        tracking=(parent.tracking_uri, parent.experiment_id, parent.run_id),
    )
    outcome = SweepOutcome(
        str(sweep_dir), parent.tracking_uri, parent.experiment_id, parent.run_id, rows
    )
    expected = settings.space.grid_size() * settings.num_samples
    if any(r["status"] == "unfinished" for r in rows) or len(rows) < expected:
        done = sum(r["status"] in ("completed", "stopped early") for r in rows)
        summary.finish_sweep_runs(
            parent.tracking_uri,
            parent.run_id,
            rows,
            [],
            metric=settings.metric,
            sweep_status="KILLED",
            reason=INTERRUPTED,
        )
        _write_state(sweep_dir / STATE_FILE, status="interrupted")
        print_fn(
            f"[noisyseg tune] sweep {settings.name!r} interrupted with {done} of {expected} "
            "trials done; re-run the same command to resume it"
        )
        outcome.interrupted = True
        return outcome
    _remove_orphan_children(parent, rows)
    outcome.best = summary.pick_best(rows, settings.mode)
    files = summary.write_summary(
        rows,
        sweep_dir / "summary",
        metric=settings.metric,
        mode=settings.mode,
        search_fields=settings.space.names,
    )
    if outcome.best is not None:
        outcome.best["best"] = True
        outcome.best_yaml = summary.best_config_yaml(
            plan.base, outcome.best, sweep=settings.name, metric=settings.metric
        )
        (sweep_dir / BEST_FILE).write_text(outcome.best_yaml)
        files.append(sweep_dir / BEST_FILE)
    failed = any(r["status"] == "error" for r in rows)
    summary.finish_sweep_runs(
        parent.tracking_uri,
        parent.run_id,
        rows,
        files,
        metric=settings.metric,
        sweep_status="FAILED" if failed else "FINISHED",
        reason="a trial failed" if failed else None,
    )
    _write_state(
        sweep_dir / STATE_FILE,
        status="failed" if failed else "finished",
        best_trial_id=outcome.best["trial_id"] if outcome.best else None,
    )
    for row in rows:
        print_fn(_row_line(row, settings.metric))
    return outcome


def _row_line(row: dict[str, Any], metric: str) -> str:
    line = (
        f"[noisyseg tune] {row['trial_id']} {row['status']:<13} step {row['last_step']:>5} "
        f"{metric}={row['metric_last']} {row['point']}"
    )
    if row.get("error"):
        line += f"  error: {row['error']}"
    return line + ("  <- best" if row.get("best") else "")


# ---------------------------------------------------------------------------------- the sweep
def run_sweep(settings: SweepSettings, *, print_fn: Callable[[str], None] = print) -> SweepOutcome:
    """Check, connect, track, run (or resume) the Tune sweep, then summarise it in MLflow.

    Raises NoisysegInputError before any work for bad settings, and before any trial runs when a
    trial cannot be placed on the cluster. ``KeyboardInterrupt`` outside Tune's own handling
    marks the parent run ``KILLED``; any other failure marks it ``FAILED``. The sweep's own
    MLflow server and a Ray instance this call started are always stopped.
    """
    plan = prepare(settings)
    sweep_dir = sweep_root(plan.sample.storage_path) / settings.name
    footprint = TrialFootprint.of(plan.sample, settings.trial_cpus)
    owned_ray = ensure_ray(footprint.cpus * (settings.max_concurrent or 1))
    server = None
    try:
        concurrent = _concurrency(settings, plan, print_fn)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        uri, server = resolve_sweep_tracking(sweep_dir, concurrent)
        return _run_tracked(settings, plan, sweep_dir, uri, concurrent, print_fn)
    finally:
        if server is not None:
            server.stop()
        if owned_ray:
            ray.shutdown()


def _run_tracked(
    settings: SweepSettings,
    plan: SweepPlan,
    sweep_dir: Path,
    uri: str,
    concurrent: int,
    print_fn: Callable[[str], None],
) -> SweepOutcome:
    """Open (or re-open) the parent run, run the Tuner, summarise; end the parent on failure."""
    state_file = sweep_dir / STATE_FILE
    parent = tracking.open_parent_run(
        uri,
        plan.sample.experiment,
        settings.name,
        _parent_params(settings, plan, concurrent),
        run_id=_read_state(state_file).get("parent_run_id"),
    )
    _write_state(
        state_file,
        name=settings.name,
        parent_run_id=parent.run_id,
        experiment_id=parent.experiment_id,
        tracking_uri=uri,
        metric=settings.metric,
        mode=settings.mode,
        space=settings.space.describe(),
        base=plan.base,
        status="running",
    )
    print_fn(f"[noisyseg tune] sweep {settings.name!r} in {sweep_dir}")
    print_fn(
        f"[noisyseg tune] MLflow tracking URI: {uri}; parent run {parent.run_id}"
        + (" (resumed)" if parent.resumed else "")
    )
    try:
        _make_tuner(settings, plan, sweep_dir, concurrent, parent, print_fn).fit()
        return _summarise(settings, plan, sweep_dir, parent, print_fn)
    except KeyboardInterrupt:
        tracking.finish_run(uri, parent.run_id, "KILLED", reason=INTERRUPTED)
        _write_state(state_file, status="interrupted")
        raise
    except BaseException as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        tracking.finish_run(uri, parent.run_id, "FAILED", reason=reason)
        _write_state(state_file, status="failed")
        raise


def best_yaml_of(sweep: str, storage_path: str | None = None) -> str:
    """The finished sweep's best config YAML (checked with ``make_config``)."""
    sweep_dir = find_sweep_dir(sweep, storage_path)
    path = sweep_dir / BEST_FILE
    if not path.is_file():
        raise NoisysegInputError(
            f"sweep {sweep!r} has no best trial yet (unfinished?): re-run the same `noisyseg tune "
            "--name ...` command to resume it",
            path=str(sweep_dir),
        )
    text = path.read_text()
    make_config(yaml.safe_load(text), source=str(path))
    return text
