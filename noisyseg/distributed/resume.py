"""What a re-used run name may resume, and how a resumed run keeps its MLflow history clean.

A run name re-used with ``noisyseg train --run-name NAME`` resumes the newest complete checkpoint
under ``<storage>/NAME`` (:func:`noisyseg.distributed.checkpoints.latest_checkpoint_state`) —
but only when that checkpoint belongs to the same experiment:

* :func:`identity_differences`: the fields that fix the network, the data and the objective
  (:data:`IDENTITY_FIELDS`) must be equal; ``steps``, intervals, workers and the like may change
  (raising ``steps`` continues a finished run);
* :func:`check_tracking_run`: the MLflow run the checkpoint logs into must exist on the current
  tracking server, alive, in the configured experiment.

Anything else is refused before any work with one line naming what differs; ``--force-new``
sets the old run directory aside (:func:`set_aside`) and starts afresh under the same name.

After a restart (a worker group restarted by Ray, or a re-launch) the steps between the
checkpoint and the crash run again. MLflow appends metric values, so :func:`logged_high_water`
reads, per metric, the highest step already logged; rank 0 logs only later steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from noisyseg.distributed.config import TrainConfig
from noisyseg.errors import NoisysegInputError

#: Config fields a resumed run must share with its checkpoint, by what they fix.
IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "network": ("channels", "strides", "num_res_units", "norm", "dropout"),
    "data": (
        "store",
        "labels",
        "train_subset",
        "clean_fraction",
        "clean_count",
        "seed",
        "patch_size",
    ),
    "objective": ("loss", "entropy_weight", "beta", "mode", "reweight", "inner_lr", "optimizer"),
}
#: UNetSpec entries that come from the store (its dimensionality and channels).
_STORE_SPEC_FIELDS = ("spatial_dims", "in_channels")


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def identity_differences(
    saved_config: dict[str, Any],
    saved_spec: dict[str, Any],
    config: TrainConfig,
    spec: dict[str, Any],
) -> list[str]:
    """``"field: saved -> current"`` for every identity field that differs (empty: resumable).

    Args:
        saved_config: the checkpoint's ``config`` (``TrainConfig.model_dump(mode="json")``).
        saved_spec: the checkpoint's ``unet_spec``.
        config: the configuration of the re-launch.
        spec: ``UNetSpec.to_dict()`` of the re-launch (its store's dimensionality and channels).
    """
    current = config.model_dump(mode="json")
    out = []
    for fields in IDENTITY_FIELDS.values():
        for name in fields:
            before, after = _comparable(saved_config.get(name)), _comparable(current.get(name))
            if before != after:
                out.append(f"{name}: {before} -> {after}")
    for name in _STORE_SPEC_FIELDS:
        if saved_spec.get(name) != spec.get(name):
            out.append(f"store {name}: {saved_spec.get(name)} -> {spec.get(name)}")
    return out


def check_identity(
    run_name: str,
    payload: dict[str, Any],
    config: TrainConfig,
    spec: dict[str, Any],
) -> None:
    """Refuse (one line) when the checkpoint ``payload`` belongs to a different experiment."""
    differences = identity_differences(payload["config"], payload["unet_spec"], config, spec)
    if differences:
        raise NoisysegInputError(
            f"run {run_name!r} exists (checkpoint at step {int(payload['step'])}) with a different "
            f"network or data: {'; '.join(differences)}. Use a new --run-name, or --force-new to "
            "start afresh under this name"
        )


def check_tracking_run(
    run_name: str,
    payload: dict[str, Any],
    tracking_uri: str,
    experiment: str,
) -> None:
    """Refuse when the MLflow run the checkpoint logs into is missing, deleted, or elsewhere.

    Checks that ``tracking_uri`` has the run ``payload["mlflow_run_id"]`` (not deleted) in the
    experiment named ``experiment``. A checkpoint without a run id passes.
    """
    run_id = payload.get("mlflow_run_id")
    if not run_id:
        return
    saved_uri = payload.get("tracking_uri") or "an unrecorded tracking server"
    advice = "Use a new --run-name, or --force-new to start afresh under this name"
    try:
        client = MlflowClient(tracking_uri)
        run = client.get_run(run_id)
    except MlflowException:
        raise NoisysegInputError(
            f"run {run_name!r}: its checkpoint logs to MLflow run {run_id} (on {saved_uri}), "
            f"which the tracking server {tracking_uri} does not have. Set MLFLOW_TRACKING_URI "
            f"to that server, or: {advice}"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise NoisysegInputError(
            f"run {run_name!r}: its MLflow run {run_id} is deleted on {tracking_uri}. {advice}"
        )
    found = client.get_experiment(run.info.experiment_id)
    if found is not None and found.name != experiment:
        raise NoisysegInputError(
            f"run {run_name!r}: its MLflow run {run_id} is in experiment {found.name!r}, not "
            f"{experiment!r}. Pass --experiment {found.name}, or: {advice}"
        )


def set_aside(run_dir: str | Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.old-<YYYYmmdd-HHMMSS>`` (nothing deleted); new path."""
    run_dir = Path(run_dir)
    target = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    run_dir.rename(target)
    return target


def logged_high_water(tracking_uri: str, run_id: str) -> dict[str, int]:
    """Per metric key of the run (system metrics left out), the highest step logged so far."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    out: dict[str, int] = {}
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        history = client.get_metric_history(run_id, key)
        if history:
            out[key] = max(int(m.step) for m in history)
    return out
