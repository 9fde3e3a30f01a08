"""Ray Tune sweeps: a ``Tuner`` whose trials each launch a ``TorchTrainer`` (Train V2 + Tune).

Layout of a sweep named ``S`` under the storage root ``R`` (``--storage-path``, default
``~/ray_results``)::

    R/S/                       the Tune experiment (experiment_state-*.json, one dir per trial)
    R/S/noisyseg_sweep.json    parent MLflow run id, tracking URI, settings
    R/S/train/S-<trial_id>/    each trial's Ray Train run (checkpoints; resumed by run name)
    R/S/mlflow/                the sweep's own MLflow server (only without MLFLOW_TRACKING_URI)
    R/S/summary/               trials.csv, trials.md, metric_vs_search.png
    R/S/best.yaml              the best trial's full config, ready for ``noisyseg train --config``

How a trial runs (:func:`trial_function`, inside a Tune trial actor that reserves
``trial_cpus`` CPUs): it builds the trial's TrainConfig (base config + search point, run name
``S-<trial_id>``), finds or creates its MLflow child run, and calls
:func:`noisyseg.distributed.trainer.run_training` with
``ray.tune.integration.ray_train.TuneReportCallback`` in the Train ``RunConfig`` callbacks, which
forwards rank 0's ``ray.train.report`` metrics (``step``, ``train_loss``, ``val/*``) to Tune.
The Train workers reserve their own resources (``workers`` x ``cpus_per_worker`` CPUs, one GPU
each with ``gpu``) through the trainer's own placement group, so ``max_concurrent`` bounds how
many trials' worker groups compete for the cluster.

ASHA (``ray.tune.schedulers.ASHAScheduler``) uses ``time_attr="step"`` (optimiser steps, which
stay right across resumes), ``max_t = steps``, ``grace_period`` and ``reduction_factor``. With a
validation metric (``val/...``) every report must carry it, so the trial's
``checkpoint_interval`` is set to ``val_interval`` (each validation is one report).

Resume: :meth:`ray.tune.Tuner.can_restore` on the sweep directory -> ``Tuner.restore(...,
resume_unfinished=True, restart_errored=True)``. A restarted trial keeps its trial id, so its run
name (``S-<trial_id>``) points Ray Train at its checkpoints and its MLflow child run is found by
tag; nothing is logged twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisyseg.errors import NoisysegInputError
from noisyseg.tuning.space import SearchSpace

STATE_FILE = "noisyseg_sweep.json"
BEST_FILE = "best.yaml"
DEFAULT_ROOT = "~/ray_results"
DEFAULT_METRIC = "val/ap"


@dataclass
class SweepSettings:
    """Everything ``noisyseg tune`` needs besides the search space.

    ``base``: TrainConfig fields shared by every trial (search fields excluded). ``grace_period``
    in optimiser steps (``None``: the first report). ``trial_cpus``: CPUs the Tune trial actor (the
    trial's driver) reserves; the Train workers reserve their own.
    """

    name: str
    base: dict[str, Any]
    space: SearchSpace
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    num_samples: int = 1
    max_concurrent: int | None = None
    scheduler: str = "asha"
    grace_period: int | None = None
    reduction_factor: float = 2.0
    trial_cpus: float = 1.0
    source: str | None = None


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

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
    """The local directory sweeps live in (``--storage-path``, default ``~/ray_results``)."""
    path = storage_path or DEFAULT_ROOT
    if "://" in path:
        raise NoisysegInputError(
            "sweeps need a local or shared-filesystem --storage-path (sweep state, trial "
            "checkpoints and the summary live there)",
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


# ---------------------------------------------------------------------------------- preparing
def prepare(settings: SweepSettings) -> tuple[dict[str, Any], Any]:
    """Check the settings and the space before any Ray work; return ``(base, sample config)``.

    The returned base has ``checkpoint_interval = val_interval`` when the metric is a
    validation metric (each validation becomes one Tune report).
    """
    from noisyseg.distributed.config import _RUN_NAME, make_config

    source = settings.source
    if not _RUN_NAME.match(settings.name) or len(settings.name) > 100:
        raise NoisysegInputError(
            f"sweep name {settings.name!r} must be 1-100 letters, digits, '.', '_', '-' and start "
            "with a letter or digit"
        )
    if settings.mode not in ("min", "max"):
        raise NoisysegInputError(f"--mode must be min or max, got {settings.mode!r}")
    if settings.scheduler not in ("asha", "fifo"):
        raise NoisysegInputError(f"--scheduler must be asha or fifo, got {settings.scheduler!r}")
    if settings.num_samples < 1:
        raise NoisysegInputError(f"--num-samples must be >= 1, got {settings.num_samples}")
    if settings.max_concurrent is not None and settings.max_concurrent < 1:
        raise NoisysegInputError(f"--max-concurrent must be >= 1, got {settings.max_concurrent}")
    if settings.reduction_factor <= 1:
        raise NoisysegInputError(f"--reduction-factor must be > 1, got {settings.reduction_factor}")
    if settings.trial_cpus < 0:
        raise NoisysegInputError(f"--trial-cpus must be >= 0, got {settings.trial_cpus}")
    if settings.base.get("run_name"):
        raise NoisysegInputError(
            "--run-name is set per trial by the sweep (<sweep>-<trial id>); use --name", path=source
        )
    base = {k: v for k, v in settings.base.items() if k not in settings.space}
    base.pop("run_name", None)
    probe = make_config({**base, **settings.space.probe_points()[0]}, source=source)
    if settings.metric.startswith("val/"):
        if probe.val_cases < 1 or probe.val_interval < 1:
            raise NoisysegInputError(
                f"metric {settings.metric} needs validation during training: set val_cases >= 1 "
                "and val_interval >= 1 (or choose --metric train_loss --mode min)",
                path=source,
            )
        base["checkpoint_interval"] = probe.val_interval
    configs = settings.space.validate(base, source=source)
    report_every = configs[0].checkpoint_interval
    if settings.scheduler == "asha":
        grace = settings.grace_period or report_every
        steps = min(c.steps for c in configs)
        if grace < 1 or grace >= steps:
            raise NoisysegInputError(
                f"--grace-period must be between 1 and steps - 1 = {steps - 1}, got {grace}",
                path=source,
            )
    return base, configs[0]


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
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from noisyseg.distributed.config import make_config
    from noisyseg.distributed.trainer import run_training
    from noisyseg.tuning.tracking import find_or_create_child

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{sweep}-{trial_id}"
    config = make_config({**base, **point, "run_name": run_name, "storage_path": train_root})
    child = find_or_create_child(
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
    )


# ---------------------------------------------------------------------------------- the sweep
def _write_state(path: Path, **update: Any) -> None:
    state = json.loads(path.read_text()) if path.is_file() else {}
    state.update(update)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(path)


def _rows_from_results(
    results: Any, settings: SweepSettings, steps: int, uri: str, experiment_id: str, parent: str
) -> list[dict[str, Any]]:
    import math

    from noisyseg.tuning.tracking import find_child

    rows = []
    trials = list(results._experiment_analysis.trials)  # same order as the results
    for trial, result in zip(trials, results, strict=True):
        metrics = dict(result.metrics or {})
        trial_id = trial.trial_id
        history: list[tuple[int, float]] = []
        frame = result.metrics_dataframe
        if frame is not None and settings.metric in frame and "step" in frame:
            for step, value in zip(frame["step"], frame[settings.metric]):
                if value is not None and math.isfinite(float(value)):
                    history.append((int(step), float(value)))
        last_step = int(metrics.get("step") or 0)
        if trial.status == "ERROR" or result.error is not None:
            status = "error"
        elif trial.status != "TERMINATED":
            status = "unfinished"  # the sweep was interrupted (Ctrl-C) before it ended
        elif last_step >= steps:
            status = "completed"
        else:
            status = "stopped early"  # terminated by the scheduler (ASHA) before max_t
        values = [v for _, v in history]
        best_value = (max if settings.mode == "max" else min)(values) if values else None
        rows.append(
            {
                "trial_id": str(trial_id),
                "run_id": find_child(uri, experiment_id, parent, str(trial_id)),
                "status": status,
                "last_step": last_step,
                "point": {k: result.config.get(k) for k in settings.space.names},
                "metric_last": values[-1] if values else None,
                "metric_best": best_value,
                "history": history,
                "best": False,
            }
        )
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _pick_best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """Best final metric among completed trials (trials ASHA stopped lost at a rung)."""
    pool = [r for r in rows if r["status"] == "completed" and r["metric_last"] is not None]
    pool = pool or [r for r in rows if r["metric_last"] is not None]
    if not pool:
        return None
    chooser = max if mode == "max" else min
    return chooser(pool, key=lambda r: r["metric_last"])


def best_config_yaml(base: dict[str, Any], best: dict[str, Any], *, sweep: str, metric: str) -> str:
    """The best trial's full TrainConfig as YAML (validated by loading it back)."""
    import yaml

    from noisyseg.distributed.config import make_config

    config = make_config({**base, **best["point"]})
    data = config.model_dump(mode="json", exclude={"run_name"})
    if data.get("storage_path") is None:
        data.pop("storage_path", None)
    text = (
        f"# best trial {best['trial_id']} of sweep {sweep}: {metric} = {best['metric_last']} "
        f"(MLflow run {best['run_id']})\n"
        "# use: noisyseg train --config best.yaml --run-name NAME\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    make_config(yaml.safe_load(text))  # round trip: what we print must load
    return text


def run_sweep(settings: SweepSettings, *, print_fn: Callable[[str], None] = print) -> SweepOutcome:
    """Validate, start tracking, run (or resume) the Tune sweep, then summarise it in MLflow."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    base, sample = prepare(settings)
    root = sweep_root(sample.storage_path)
    sweep_dir = root / settings.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state_file = sweep_dir / STATE_FILE
    train_root = str(sweep_dir / "train")

    from noisyseg.distributed.trainer import ensure_ray
    from noisyseg.tuning import tracking

    uri, server = tracking.resolve_sweep_tracking(sweep_dir, settings.max_concurrent)
    started_ray = False
    try:
        parent_params = {
            "sweep": settings.name,
            "metric": settings.metric,
            "mode": settings.mode,
            "num_samples": settings.num_samples,
            "max_concurrent": settings.max_concurrent,
            "scheduler": settings.scheduler,
            "grace_period": settings.grace_period,
            "reduction_factor": settings.reduction_factor,
            "trial_cpus": settings.trial_cpus,
            **{f"space.{k}": v for k, v in settings.space.describe().items()},
            **{f"base.{k}": v for k, v in sample.flat_params().items() if k not in settings.space},
        }
        experiment_id, parent, resumed = tracking.open_parent_run(
            uri, sample.experiment, settings.name, state_file, parent_params
        )
        _write_state(
            state_file,
            name=settings.name,
            tracking_uri=uri,
            metric=settings.metric,
            mode=settings.mode,
            space=settings.space.describe(),
            base=base,
            status="running",
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        print_fn(f"[noisyseg tune] sweep {settings.name!r} in {sweep_dir}")
        print_fn(
            f"[noisyseg tune] MLflow tracking URI: {uri}; parent run {parent}"
            + (" (resumed)" if resumed else "")
        )

        # A local instance (no RAY_ADDRESS) gets logical CPUs for max_concurrent trials: Tune
        # admits trials on the driver actor's CPUs alone, and a trial whose Train workers cannot
        # be placed waits (and retries) until another finishes.
        need = settings.trial_cpus + sample.workers * sample.cpus_per_worker
        started_ray = ensure_ray(need * (settings.max_concurrent or 1))
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        trainable = tune.with_resources(
            tune.with_parameters(
                trial_function,
                base=base,
                sweep=settings.name,
                train_root=train_root,
                tracking_uri=uri,
                experiment_id=experiment_id,
                parent_run_id=parent,
            ),
            {"CPU": settings.trial_cpus},
        )
        if tune.Tuner.can_restore(str(sweep_dir)):
            print_fn(
                f"[noisyseg tune] resuming sweep {settings.name!r} (unfinished and errored "
                "trials continue)"
            )
            tuner = tune.Tuner.restore(
                str(sweep_dir),
                trainable=trainable,
                resume_unfinished=True,
                restart_errored=True,
            )
        else:
            if settings.scheduler == "asha":
                scheduler: Any = ASHAScheduler(
                    time_attr="step",
                    max_t=sample.steps,
                    grace_period=settings.grace_period or sample.checkpoint_interval,
                    reduction_factor=settings.reduction_factor,
                )
            else:
                scheduler = FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                param_space=settings.space.to_tune(),
                tune_config=tune.TuneConfig(
                    metric=settings.metric,
                    mode=settings.mode,
                    scheduler=scheduler,
                    num_samples=settings.num_samples,
                    max_concurrent_trials=settings.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=settings.name,
                    storage_path=str(root),
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        results = tuner.fit()

        rows = _rows_from_results(results, settings, sample.steps, uri, experiment_id, parent)
        expected = settings.space.grid_size() * settings.num_samples
        if any(r["status"] == "unfinished" for r in rows) or len(rows) < expected:
            print_fn(
                f"[noisyseg tune] sweep {settings.name!r} interrupted with "
                f"{sum(r['status'] in ('completed', 'stopped early') for r in rows)} of "
                f"{expected} trials done; re-run the same command to resume it"
            )
            return SweepOutcome(
                sweep_dir=str(sweep_dir),
                tracking_uri=uri,
                experiment_id=experiment_id,
                parent_run_id=parent,
                rows=rows,
                interrupted=True,
            )
        known = {r["trial_id"] for r in rows}
        client = tracking._client(uri)
        for run in tracking.children(uri, experiment_id, parent):
            # A child whose trial Tune no longer knows (the driver died before Tune saved its
            # first experiment state, so the sweep started afresh): remove the duplicate.
            if run.data.tags.get(tracking.TRIAL_TAG) not in known:
                client.delete_run(run.info.run_id)
        best = _pick_best(rows, settings.mode)
        best_yaml = None
        if best is not None:
            best["best"] = True
            best_yaml = best_config_yaml(base, best, sweep=settings.name, metric=settings.metric)
            (sweep_dir / BEST_FILE).write_text(best_yaml)
        files = tracking.write_summary(
            rows,
            sweep_dir / "summary",
            metric=settings.metric,
            mode=settings.mode,
            search_fields=settings.space.names,
        )
        if best_yaml is not None:
            files.append(sweep_dir / BEST_FILE)
        failed = any(r["status"] == "error" for r in rows)
        tracking.finish_sweep_runs(
            uri,
            parent,
            rows,
            files,
            metric=settings.metric,
            sweep_status="FAILED" if failed else "FINISHED",
        )
        _write_state(
            state_file,
            status="failed" if failed else "finished",
            best_trial_id=best["trial_id"] if best else None,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        for row in rows:
            print_fn(
                f"[noisyseg tune] {row['trial_id']} {row['status']:<13} step {row['last_step']:>5} "
                f"{settings.metric}={row['metric_last']} {row['point']}"
                + ("  <- best" if row["best"] else "")
            )
        return SweepOutcome(
            sweep_dir=str(sweep_dir),
            tracking_uri=uri,
            experiment_id=experiment_id,
            parent_run_id=parent,
            rows=rows,
            best=best,
            best_yaml=best_yaml,
        )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        if server is not None:
            server.stop()


def best_yaml_of(sweep: str, storage_path: str | None = None) -> str:
    """The finished sweep's best config YAML (checked with ``make_config``)."""
    import yaml

    from noisyseg.distributed.config import make_config

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
