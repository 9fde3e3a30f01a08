"""MLflow tracking for training runs: the launcher creates the run, rank 0 logs into it.

* Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a ``mlflow server`` over HTTP — the only safe
  choice for several processes or nodes), else an embedded SQLite file
  ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlartifacts`` (single local runs).
* The launcher (:func:`open_run`) creates the run (or re-opens the one a resumed checkpoint names),
  tags it with the Ray run name and logs every config field as a param.
* Rank 0 (:class:`RankZeroLogger`) re-attaches with ``mlflow.start_run(run_id=...,
  log_system_metrics=True)`` and logs losses, learning rate, validation metrics, figures and the
  final model (``mlflow.pytorch.log_model`` as ``model`` plus ``checkpoint/final.pt``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RUN_NAME_TAG = "noisyseg.run_name"
SYSTEM_METRICS_INTERVAL_S = 5.0


def resolve_tracking_uri(cwd: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs cwd>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    base = Path(cwd or os.getcwd()).resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


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
    """An MLflow run created (or re-opened) for a training run."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool

    @property
    def url(self) -> str:
        return run_url(self.tracking_uri, self.experiment_id, self.run_id)


def experiment_id_for(uri: str, name: str) -> str:
    """Id of experiment ``name``, created when missing (embedded stores keep artifacts beside
    the database). Safe when several launchers create it at once: the loser re-reads it."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_embedded_artifact_root(uri))
    except Exception:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def open_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    *,
    resume_run_id: str | None = None,
) -> RunHandle:
    """Create the MLflow run for ``run_name`` (or re-open ``resume_run_id``) and log params.

    On resume, params already logged keep their first value (MLflow params are immutable); a
    changed value (e.g. ``steps`` raised to continue training) is recorded as the tag
    ``resume.<field>``.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if resume_run_id is not None:
        run = client.get_run(resume_run_id)
        existing = run.data.params
        new = {k: v for k, v in params.items() if k not in existing}
        for key, value in params.items():
            if key in existing and existing[key] != value:
                client.set_tag(resume_run_id, f"resume.{key}", value)
        _log_params(client, resume_run_id, new)
        return RunHandle(tracking_uri, run.info.experiment_id, resume_run_id, True)
    experiment_id = experiment_id_for(tracking_uri, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    _log_params(client, run.info.run_id, params)
    return RunHandle(tracking_uri, experiment_id, run.info.run_id, False)


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run terminated (the launcher does this after ``fit`` returns or fails)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------- figures
def _largest_lesion_slice(truth: np.ndarray) -> int:
    """Index along axis 0 with the most lesion voxels (3D); 0 for 2D."""
    if truth.ndim == 2:
        return 0
    counts = truth.reshape(truth.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts))


def validation_slice_figure(
    image: np.ndarray,
    truth: np.ndarray,
    probabilities: np.ndarray,
    *,
    noisy: np.ndarray | None = None,
    threshold: float = 0.5,
    title: str = "",
):
    """Matplotlib figure: the slice with most lesion, truth/noisy/prediction contours on the image.

    Args:
        image: ``(C, *S)`` (first channel shown).
        truth, probabilities, noisy: ``(*S)``; 3D volumes are cut along the first spatial axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.asarray(truth) > 0
    index = _largest_lesion_slice(truth)

    def cut(volume: np.ndarray) -> np.ndarray:
        return volume[index] if volume.ndim == 3 else volume

    background = cut(np.asarray(image)[0]).astype(np.float32)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(background, cmap="gray")
    handles = []
    from matplotlib.lines import Line2D

    layers = [(cut(truth).astype(float), "lime", "truth")]
    if noisy is not None:
        layers.append((cut(np.asarray(noisy) > 0).astype(float), "orange", "noisy label"))
    layers.append((cut(np.asarray(probabilities) >= threshold).astype(float), "red", "prediction"))
    for mask, colour, name in layers:
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.2)
        handles.append(Line2D([0], [0], color=colour, label=name))
    ax.legend(handles=handles, loc="lower right", fontsize=7)
    ax.set_title(title or f"slice {index}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def pr_curve_figure(pr_curve: dict[str, Any] | None, *, title: str = "lesion PR curve"):
    """Matplotlib figure of a lesion-wise precision–recall curve (``{"precision", "recall"}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    if pr_curve:
        precision = np.asarray(pr_curve.get("precision", []), dtype=float)
        recall = np.asarray(pr_curve.get("recall", []), dtype=float)
        if precision.size and recall.size:
            ax.plot(recall, precision, marker=".", color="tab:blue")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("lesion recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------- rank 0
def scalar_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite scalar entries of a metrics dict (nested dicts flattened with ``.``)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_metrics(value, name + "."))
        elif (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool)
            and np.isfinite(float(value))
        ):
            out[_safe_metric_name(name)] = float(value)
    return out


def _safe_metric_name(name: str) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")
    return "".join(c if c in allowed else "_" for c in name)


class RankZeroLogger:
    """Logs a training run from rank 0 into the run the launcher created."""

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool = True) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        if system_metrics:
            try:  # MLflow's system-metrics monitor needs psutil (GPU metrics also pynvml)
                import psutil  # noqa: F401
            except ImportError:
                system_metrics = False
        if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self._mlflow.log_figure(figure, artifact_file)
        plt.close(figure)

    def log_final_model(self, model: Any, payload: dict[str, Any]) -> None:
        """``checkpoint/final.pt`` (weights_only-loadable) and ``mlflow.pytorch`` model ``model``."""
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "final.pt"
            torch.save(payload, path)
            self._mlflow.log_artifact(str(path), artifact_path="checkpoint")
        import mlflow.pytorch
        import monai

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
