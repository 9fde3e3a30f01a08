"""MLflow tracking, one module for training runs and sweeps.

* Tracking URI (:func:`resolve_tracking_uri`): ``MLFLOW_TRACKING_URI`` when set (an ``mlflow
  server`` over HTTP — the only safe choice for several processes or nodes), else an embedded
  SQLite file ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlartifacts``.
  :mod:`noisyseg.distributed.mlflow_server` starts a local server when one is needed.
* Experiments (:func:`experiment_id_for`): created on first use, safe when several launchers
  create the same one at once.
* Runs: the launcher creates a training run (:func:`open_run`) or re-opens the one a resumed
  checkpoint names, tags it with the run name and logs every config field as a param
  (:func:`log_params`, once per key; a changed value on resume becomes the tag
  ``resume.<key>``); :func:`finish_run` sets the terminal status (and an end reason).
* Sweeps: one parent run per sweep (:func:`open_parent_run`, tags ``noisyseg.sweep``,
  ``noisyseg.role=sweep``), one child run per Tune trial (:func:`find_or_create_child`, found by
  the tags ``mlflow.parentRunId`` + ``noisyseg.trial_id`` before one is created, so a restarted
  trial re-uses its run).
* Rank 0 (:class:`RankZeroLogger`) re-attaches to the launcher's run with
  ``mlflow.start_run(run_id=..., log_system_metrics=True)`` and logs losses, learning rate,
  validation metrics, figures and the final model (``mlflow.pytorch.log_model`` as ``model``
  plus ``checkpoint/final.pt``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException

# Figures live in their own module; re-exported here for callers that log them.
from noisyseg.distributed.figures import pr_curve_figure, validation_slice_figure

__all__ = [
    "BEST_TAG",
    "EARLY_TAG",
    "END_REASON_TAG",
    "PARENT_TAG",
    "ROLE_TAG",
    "RUN_NAME_TAG",
    "SWEEP_TAG",
    "TRIAL_TAG",
    "RankZeroLogger",
    "RunHandle",
    "children",
    "experiment_id_for",
    "find_child",
    "find_or_create_child",
    "finish_run",
    "log_params",
    "open_parent_run",
    "open_run",
    "pr_curve_figure",
    "resolve_tracking_uri",
    "run_exists",
    "run_url",
    "safe_metric_name",
    "scalar_metric_names",
    "scalar_metrics",
    "validation_slice_figure",
]

RUN_NAME_TAG = "noisyseg.run_name"
SWEEP_TAG = "noisyseg.sweep"
TRIAL_TAG = "noisyseg.trial_id"
ROLE_TAG = "noisyseg.role"
BEST_TAG = "noisyseg.best"
EARLY_TAG = "noisyseg.early_stopped"
END_REASON_TAG = "noisyseg.end_reason"
PARENT_TAG = "mlflow.parentRunId"
SYSTEM_METRICS_INTERVAL_S = 5.0
_PARAM_BATCH = 100  # MLflow's log_batch limit on params per call
_PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value


# ---------------------------------------------------------------------------------- where
def resolve_tracking_uri(cwd: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs cwd>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    base = Path(cwd or os.getcwd()).resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def is_local_file_store(uri: str) -> bool:
    """Whether ``uri`` is a file-backed store (``sqlite:``, ``file:`` or a bare path): safe for
    one writer process at a time, not for concurrent trials on several processes or nodes."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _embedded_artifact_root(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").as_uri()
    return None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person looks at the run: the UI address (HTTP) or the ``mlflow ui`` to start."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return (
        f"mlflow ui --backend-store-uri {tracking_uri} then "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    )


@dataclass
class RunHandle:
    """An MLflow run created (or re-opened) by a launcher."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool

    @property
    def url(self) -> str:
        return run_url(self.tracking_uri, self.experiment_id, self.run_id)


# ---------------------------------------------------------------------------------- runs
def experiment_id_for(uri: str, name: str) -> str:
    """Id of experiment ``name``, created when missing (embedded stores keep artifacts beside
    the database). Safe when several launchers create it at once: the loser re-reads it."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_embedded_artifact_root(uri))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def run_exists(uri: str, run_id: str) -> bool:
    """Whether the tracking server at ``uri`` holds an active (not deleted) run ``run_id``."""
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log each param the run does not have yet (MLflow params are immutable).

    A key the run already holds with a different value is recorded as the tag ``resume.<key>``
    (e.g. ``steps`` raised to continue a run). Values are stringified and cut to MLflow's 6000
    characters. Returns the changed keys with their new values.
    """
    client = MlflowClient(uri)
    existing = client.get_run(run_id).data.params
    values = {str(k): str(v)[:_PARAM_MAX_CHARS] for k, v in params.items()}
    changed = {k: v for k, v in values.items() if k in existing and existing[k] != v}
    for key, value in changed.items():
        client.set_tag(run_id, f"resume.{key}", value)
    items = [Param(k, v) for k, v in values.items() if k not in existing]
    for start in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])
    return changed


def open_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    *,
    resume_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunHandle:
    """Create the MLflow run for ``run_name`` (or re-open ``resume_run_id``) and log params.

    A re-opened run keeps its first param values; changed ones become ``resume.<key>`` tags
    (:func:`log_params`). ``tags`` are added to a new run (``noisyseg.run_name`` always is).
    Raises ``MlflowException`` when ``resume_run_id`` is not on this tracking server (see
    :func:`run_exists` to check first).
    """
    client = MlflowClient(tracking_uri)
    if resume_run_id is not None:
        run = client.get_run(resume_run_id)
        log_params(tracking_uri, resume_run_id, params)
        return RunHandle(tracking_uri, run.info.experiment_id, resume_run_id, True)
    experiment_id = experiment_id_for(tracking_uri, experiment)
    all_tags = {**(tags or {}), RUN_NAME_TAG: run_name}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    log_params(tracking_uri, run.info.run_id, params)
    return RunHandle(tracking_uri, experiment_id, run.info.run_id, False)


def finish_run(
    tracking_uri: str, run_id: str, status: str = "FINISHED", *, reason: str | None = None
) -> None:
    """Mark the run terminated (``FINISHED``, ``FAILED`` or ``KILLED``); ``reason`` (one line,
    e.g. ``"interrupted (Ctrl-C)"``) is kept as the tag ``noisyseg.end_reason``."""
    client = MlflowClient(tracking_uri)
    if reason:
        client.set_tag(run_id, END_REASON_TAG, reason[:_PARAM_MAX_CHARS])
    client.set_terminated(run_id, status=status)


def run_status(tracking_uri: str, run_id: str) -> str:
    """The run's status (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``, ``SCHEDULED``)."""
    return MlflowClient(tracking_uri).get_run(run_id).info.status


# ---------------------------------------------------------------------------------- sweeps
def open_parent_run(
    uri: str,
    experiment: str,
    sweep: str,
    params: Mapping[str, Any],
    *,
    run_id: str | None = None,
) -> RunHandle:
    """The sweep's parent run: ``run_id`` re-opened (status back to ``RUNNING``) when it is an
    active run on this server, else a new run tagged ``noisyseg.sweep`` / ``noisyseg.role=sweep``.
    """
    client = MlflowClient(uri)
    if run_id and run_exists(uri, run_id):
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        log_params(uri, run_id, params)
        return RunHandle(uri, run.info.experiment_id, run_id, True)
    experiment_id = experiment_id_for(uri, experiment)
    run = client.create_run(
        experiment_id, run_name=sweep, tags={SWEEP_TAG: sweep, ROLE_TAG: "sweep"}
    )
    log_params(uri, run.info.run_id, params)
    return RunHandle(uri, experiment_id, run.info.run_id, False)


def find_child(uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run of ``trial_id`` under the parent, if one exists (oldest first)."""
    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return runs[0].info.run_id if runs else None


def find_or_create_child(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    sweep: str,
    trial_id: str,
    run_name: str,
    params: Mapping[str, Any],
    point: Mapping[str, Any],
) -> str:
    """The trial's child run: re-used when it exists, else created with tags and params."""
    run_id = find_child(uri, experiment_id, parent_run_id, trial_id)
    if run_id is None:
        tags = {
            PARENT_TAG: parent_run_id,
            SWEEP_TAG: sweep,
            TRIAL_TAG: trial_id,
            ROLE_TAG: "trial",
            RUN_NAME_TAG: run_name,
            "noisyseg.search_point": json.dumps(dict(point), sort_keys=True),
        }
        run = MlflowClient(uri).create_run(experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
    log_params(uri, run_id, params)
    return run_id


def children(uri: str, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every active child run of the parent."""
    return MlflowClient(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
    )


# ---------------------------------------------------------------------------------- rank 0
def _numeric_entries(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Every int/float entry of a metrics dict (nested dicts flattened with ``.``), NaN kept."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numeric_entries(value, name + "."))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, bool
        ):
            out[safe_metric_name(name)] = float(value)
    return out


def scalar_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite scalar entries of a metrics dict (nested dicts flattened with ``.``), keyed by
    ``prefix + key`` made safe for MLflow: what rank 0 logs and reports."""
    return {k: v for k, v in _numeric_entries(metrics, prefix).items() if np.isfinite(v)}


def scalar_metric_names(metrics: Mapping[str, Any], prefix: str) -> list[str]:
    """The names :func:`scalar_metrics` gives the entries of ``metrics`` when they are finite."""
    return list(_numeric_entries(metrics, prefix))


def safe_metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric key replaced by ``_``."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")
    return "".join(c if c in allowed else "_" for c in name)


class RankZeroLogger:
    """Logs a training run from rank 0 into the run the launcher created."""

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool = True) -> None:
        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a Matplotlib figure (e.g. from :mod:`noisyseg.distributed.figures`)."""
        self._mlflow.log_figure(figure, artifact_file)

    def log_final_model(self, model: Any, payload: dict[str, Any]) -> None:
        """``checkpoint/final.pt`` (weights_only-loadable) and ``mlflow.pytorch`` model ``model``."""
        # torch, monai and mlflow.pytorch load only in the rank that logs the final model.
        import mlflow.pytorch
        import monai
        import torch

        from noisyseg.distributed.checkpoints import FINAL_ARTIFACT_DIR, save_final_model

        with tempfile.TemporaryDirectory() as tmp:
            path = save_final_model(tmp, payload)
            self._mlflow.log_artifact(str(path), artifact_path=FINAL_ARTIFACT_DIR)
        # "pickle" needs no input example (the "pt2" default traces the graph); explicit
        # requirements skip MLflow's slow import-capturing subprocess.
        mlflow.pytorch.log_model(
            model.cpu().eval(),
            name="model",
            serialization_format="pickle",
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"monai=={monai.__version__}",
            ],
        )

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)
