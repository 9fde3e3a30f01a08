"""Ray Tune sweeps: a ``Tuner`` whose trials each launch a ``TorchTrainer`` (Train V2 + Tune).

Layout of a sweep named ``S`` under the storage root ``R`` (``--storage-path``, default
``~/ray_results``; a local or shared path, or any filesystem :mod:`~noisyseg.distributed.run_storage`
resolves: ``s3://``, ``gs://``, ...)::

    R/S/                       the Tune experiment (experiment_state-*.json, one dir per trial)
    R/S/noisyseg_sweep.json    parent MLflow run id, tracking URI, settings, status
    R/S/train/S-<trial_id>/    each trial's Ray Train run (checkpoints; resumed by run name)
    R/S/mlflow/                the sweep's own MLflow server (only without MLFLOW_TRACKING_URI)
    R/S/summary/               trials.csv, trials.md, metric_vs_search.png
    R/S/best.yaml              the best trial's full config, ready for ``noisyseg train --config``

Object storage (``R`` a URL): Tune gets ``RunConfig(storage_path=<path>,
storage_filesystem=<pyarrow filesystem>)`` and resumes with ``Tuner.can_restore`` /
``Tuner.restore(..., storage_filesystem=...)``; Tune's experiment state is uploaded every
:data:`REMOTE_SYNC_PERIOD_S` seconds (Ray's default is 300). The state file and ``best.yaml`` are
written with one PUT each, the summary is written in a local temporary folder and uploaded. A
sweep there needs ``MLFLOW_TRACKING_URI`` (it starts no MLflow server of its own: a server whose
database sits on the launching machine would be lost to a re-launch from another pod), refused in
one line before any work. Trial actors get the launcher's ``AWS_*`` storage variables
(:func:`storage_env`, through Ray's object store, not the dashboard-visible runtime env), so the
sweep's storage works on nodes that lack them.

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
import tempfile
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
from noisyseg.distributed.run_storage import RunLocation, storage_errors
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
#: Seconds between uploads of Tune's experiment state to object storage (Ray's default, 300 s,
#: would lose up to five minutes of trial progress to a killed driver).
REMOTE_SYNC_PERIOD_S = 10
#: The environment variables :func:`noisyseg.distributed.run_storage.s3_filesystem` reads.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


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
def sweep_root(storage_path: str | None) -> RunLocation:
    """Where sweeps live (``--storage-path``, default ``~/ray_results``): a local or shared
    folder, or a URL on any filesystem :class:`RunLocation` resolves (``s3://`` from the AWS_*
    environment). Nothing is read or written here."""
    path = storage_path or DEFAULT_ROOT
    with storage_errors(path, "resolving --storage-path"):
        return RunLocation.resolve(path)


def check_sweep_tracking(location: RunLocation) -> None:
    """Refuse (one line) a sweep on object storage without ``MLFLOW_TRACKING_URI``: its own
    MLflow server would keep the runs on the launching machine, out of reach of a re-launch."""
    if location.remote and not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        raise NoisysegInputError(
            "a sweep on object storage needs MLFLOW_TRACKING_URI (an MLflow server every node "
            "and every re-launch reaches); the sweep starts its own server only beside a local "
            "--storage-path",
            path=location.url,
        )


def _ray_storage(location: RunLocation) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem`` when remote) as Ray takes them."""
    if location.remote:
        return {"storage_path": location.path, "storage_filesystem": location.filesystem}
    return {"storage_path": location.path}


def storage_env(location: RunLocation) -> dict[str, str]:
    """The launcher's AWS_* variables for a sweep on object storage (trial actors resolve the
    trials' ``s3://`` storage with them); empty for a local sweep."""
    if not location.remote:
        return {}
    return {name: os.environ[name] for name in STORAGE_ENV if os.environ.get(name, "").strip()}


def find_sweep_dir(sweep: str, storage_path: str | None = None) -> RunLocation:
    """``sweep`` as a folder or URL holding ``noisyseg_sweep.json``, else ``<root>/<sweep>``."""
    if "://" in sweep:
        candidate = sweep_root(sweep)
    else:
        as_path = Path(sweep).expanduser()
        if (as_path / STATE_FILE).is_file():
            return RunLocation.resolve(str(as_path))
        candidate = sweep_root(storage_path).child(sweep)
    if candidate.read_bytes(STATE_FILE) is None:
        raise NoisysegInputError(
            f"no sweep named {sweep!r} (no {STATE_FILE}); give --storage-path where it ran or the "
            "sweep directory",
            path=candidate.url,
        )
    return candidate


def read_state(location: RunLocation) -> dict[str, Any]:
    """The sweep's state file (empty when there is none yet)."""
    data = location.read_bytes(STATE_FILE)
    return json.loads(data) if data is not None else {}


def _write_state(location: RunLocation, **update: Any) -> None:
    state = read_state(location)
    state.update(update, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    location.write_bytes(STATE_FILE, json.dumps(state, indent=2, default=str).encode())


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
    env: dict[str, str] | None = None,
) -> None:
    """One Tune trial: train the base config at ``point`` with a TorchTrainer, report to Tune.

    ``env``: variables set in the trial actor first (:func:`storage_env`).
    """
    os.environ.update(env or {})
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
    sweep_dir: str | Path | RunLocation, max_concurrent: int | None
) -> tuple[str, LocalMlflowServer | None]:
    """The tracking URI for a sweep, and the server started for it (``None``: not ours).

    ``MLFLOW_TRACKING_URI`` when set; a file store (``sqlite:``, ``file:``) only when one trial
    runs at a time (concurrent trials must log over HTTP to one server). Without it, a local
    ``mlflow server`` under ``<sweep dir>/mlflow`` (stopped by the caller); a sweep on object
    storage is refused instead (:func:`check_sweep_tracking`).
    """
    if isinstance(sweep_dir, RunLocation):
        check_sweep_tracking(sweep_dir)
        sweep_dir = sweep_dir.path
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
        "trial_max_failures": settings.trial_max_failures,
        **{f"space.{k}": v for k, v in settings.space.describe().items()},
        **{f"base.{k}": v for k, v in plan.sample.flat_params().items() if k not in settings.space},
    }


def _make_tuner(
    settings: SweepSettings,
    plan: SweepPlan,
    sweep_dir: RunLocation,
    concurrent: int,
    parent: tracking.RunHandle,
    print_fn: Callable[[str], None],
) -> tune.Tuner:
    """A new Tuner for the sweep, or the saved one restored (unfinished and errored trials go on).

    The same calls for a local folder and for object storage: the experiment is found, written
    and restored through ``sweep_dir``'s pyarrow filesystem (``storage_filesystem``).
    """
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_function,
            base=plan.base,
            sweep=settings.name,
            train_root=sweep_dir.child("train").url,
            tracking_uri=parent.tracking_uri,
            experiment_id=parent.experiment_id,
            parent_run_id=parent.run_id,
            env=storage_env(sweep_dir),
        ),
        {"CPU": settings.trial_cpus},
    )
    filesystem = _ray_storage(sweep_dir).get("storage_filesystem")
    if tune.Tuner.can_restore(sweep_dir.path, storage_filesystem=filesystem):
        print_fn(
            f"[noisyseg tune] resuming sweep {settings.name!r} (unfinished and errored trials "
            "continue)"
        )
        return tune.Tuner.restore(
            sweep_dir.path,
            trainable=trainable,
            resume_unfinished=True,
            restart_errored=True,
            storage_filesystem=filesystem,
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
        run_config=run_config(settings, sweep_dir),
    )


def run_config(settings: SweepSettings, sweep_dir: RunLocation) -> tune.RunConfig:
    """The new sweep's ``RunConfig``: its name and storage, Tune's experiment-state sync period
    on object storage, and ``FailureConfig(max_failures=trial_max_failures)`` (a trial whose actor
    died, e.g. with its node, is restarted that many times and resumes from its Train
    checkpoint). A restored sweep keeps the one it started with."""
    return tune.RunConfig(
        name=settings.name,
        failure_config=tune.FailureConfig(max_failures=settings.trial_max_failures),
        sync_config=(
            tune.SyncConfig(sync_period=REMOTE_SYNC_PERIOD_S) if sweep_dir.remote else None
        ),
        **_ray_storage(_parent_of(sweep_dir)),
    )


def _parent_of(location: RunLocation) -> RunLocation:
    """The folder holding ``location`` (Tune takes the storage root and the experiment name)."""
    path, url = location.path.rpartition("/")[0], location.url.rpartition("/")[0]
    return RunLocation(url, location.filesystem, path)


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
    sweep_dir: RunLocation,
    parent: tracking.RunHandle,
    print_fn: Callable[[str], None],
) -> SweepOutcome:
    """Rows, best trial, summary files and MLflow tags of the sweep that just ran."""
    rows = summary.trial_rows(
        sweep_dir.path,
        metric=settings.metric,
        mode=settings.mode,
        search_fields=settings.space.names,
        steps=plan.sample.steps,
        tracking=(parent.tracking_uri, parent.experiment_id, parent.run_id),
        storage_filesystem=_ray_storage(sweep_dir).get("storage_filesystem"),
    )
    outcome = SweepOutcome(
        sweep_dir.url, parent.tracking_uri, parent.experiment_id, parent.run_id, rows
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
        _write_state(sweep_dir, status="interrupted")
        print_fn(
            f"[noisyseg tune] sweep {settings.name!r} interrupted with {done} of {expected} "
            "trials done; re-run the same command to resume it"
        )
        outcome.interrupted = True
        return outcome
    _remove_orphan_children(parent, rows)
    outcome.best = summary.pick_best(rows, settings.mode)
    if outcome.best is not None:
        outcome.best["best"] = True
        outcome.best_yaml = summary.best_config_yaml(
            plan.base, outcome.best, sweep=settings.name, metric=settings.metric
        )
    failed = any(r["status"] == "error" for r in rows)
    with tempfile.TemporaryDirectory(prefix="noisyseg-sweep-") as staging:
        files = _write_sweep_files(settings, rows, outcome.best_yaml, sweep_dir, Path(staging))
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
        sweep_dir,
        status="failed" if failed else "finished",
        best_trial_id=outcome.best["trial_id"] if outcome.best else None,
    )
    for row in rows:
        print_fn(_row_line(row, settings.metric))
    return outcome


def _write_sweep_files(
    settings: SweepSettings,
    rows: list[dict[str, Any]],
    best_yaml: str | None,
    sweep_dir: RunLocation,
    staging: Path,
) -> list[Path]:
    """``summary/`` and ``best.yaml`` in the sweep folder; the local copies (for MLflow).

    A local sweep writes them in place; one on object storage writes them in ``staging`` (a
    local temporary folder) and uploads them.
    """
    local = Path(sweep_dir.path) if not sweep_dir.remote else staging
    files = summary.write_summary(
        rows,
        local / "summary",
        metric=settings.metric,
        mode=settings.mode,
        search_fields=settings.space.names,
    )
    if sweep_dir.remote:
        sweep_dir.upload(str(local / "summary"), "summary")
    if best_yaml is not None:
        sweep_dir.write_bytes(BEST_FILE, best_yaml.encode())
        if sweep_dir.remote:
            (local / BEST_FILE).write_text(best_yaml)
        files.append(local / BEST_FILE)
    return files


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
    sweep_dir = sweep_root(plan.sample.storage_path).child(settings.name)
    check_sweep_tracking(sweep_dir)
    if sweep_dir.remote:
        sweep_dir.check_reachable()
    footprint = TrialFootprint.of(plan.sample, settings.trial_cpus)
    owned_ray = ensure_ray(footprint.cpus * (settings.max_concurrent or 1))
    server = None
    try:
        concurrent = _concurrency(settings, plan, print_fn)
        if not sweep_dir.remote:
            Path(sweep_dir.path).mkdir(parents=True, exist_ok=True)
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
    sweep_dir: RunLocation,
    uri: str,
    concurrent: int,
    print_fn: Callable[[str], None],
) -> SweepOutcome:
    """Open (or re-open) the parent run, run the Tuner, summarise; end the parent on failure."""
    parent = tracking.open_parent_run(
        uri,
        plan.sample.experiment,
        settings.name,
        _parent_params(settings, plan, concurrent),
        run_id=read_state(sweep_dir).get("parent_run_id"),
    )
    _write_state(
        sweep_dir,
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
    print_fn(f"[noisyseg tune] sweep {settings.name!r} in {sweep_dir.url}")
    print_fn(
        f"[noisyseg tune] MLflow tracking URI: {uri}; parent run {parent.run_id}"
        + (" (resumed)" if parent.resumed else "")
    )
    try:
        _make_tuner(settings, plan, sweep_dir, concurrent, parent, print_fn).fit()
        return _summarise(settings, plan, sweep_dir, parent, print_fn)
    except KeyboardInterrupt:
        tracking.finish_run(uri, parent.run_id, "KILLED", reason=INTERRUPTED)
        _write_state(sweep_dir, status="interrupted")
        raise
    except BaseException as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        tracking.finish_run(uri, parent.run_id, "FAILED", reason=reason)
        _write_state(sweep_dir, status="failed")
        raise


def best_yaml_of(sweep: str, storage_path: str | None = None) -> str:
    """The finished sweep's best config YAML (checked with ``make_config``)."""
    sweep_dir = find_sweep_dir(sweep, storage_path)
    data = sweep_dir.read_bytes(BEST_FILE)
    if data is None:
        raise NoisysegInputError(
            f"sweep {sweep!r} has no best trial yet (unfinished?): re-run the same `noisyseg tune "
            "--name ...` command to resume it",
            path=sweep_dir.url,
        )
    text = data.decode()
    make_config(yaml.safe_load(text), source=f"{sweep_dir.url}/{BEST_FILE}")
    return text
