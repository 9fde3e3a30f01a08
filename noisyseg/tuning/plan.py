"""Everything about a sweep that is decided before a trial runs: checks, derived defaults, sizing.

* :class:`SweepSettings`: the ``noisyseg tune`` options besides the search space.
* :func:`prepare` checks the settings, the search space (a TrainConfig for every probe point,
  checked against the store) and the metric (:func:`reported_metric_names`: the names a trial
  reports to Tune), and derives defaults from other flags (:func:`grace_period_for`: ASHA's grace
  period from ``--steps`` and the report interval). Every failure is one
  :class:`~noisyseg.errors.NoisysegInputError` line, before Ray, MLflow or any sweep file exists.
* :func:`plan_concurrency` bounds the trials running at once by what the connected cluster can
  place: each trial holds its driver actor (``trial_cpus``) *and* its Ray Train worker group
  (``workers`` x ``cpus_per_worker``, one GPU per worker with ``gpu``). Admitting more trials
  than that lets the drivers hold every CPU while their worker groups wait forever.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from noisyseg.distributed.config import TrainConfig, check_against_store, make_config
from noisyseg.distributed.evaluation import evaluate_cases
from noisyseg.distributed.tracking import scalar_metric_names
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.store import VolumeStore
from noisyseg.tuning.space import SearchSpace

DEFAULT_METRIC = "val/ap"
#: A sweep name names its directory, its Tune experiment and (with a suffix) its trials' runs.
_SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

#: What every report of the training loop carries (``ray.train.report`` in the worker loop),
#: besides the validation metrics ``val/*`` of a report that follows a validation.
TRAIN_REPORT_KEYS = ("step", "train_loss", "lr", "steps_per_s")


@dataclass
class SweepSettings:
    """Everything ``noisyseg tune`` needs besides the search space.

    ``base``: TrainConfig fields shared by every trial (search fields excluded). ``grace_period``
    in optimiser steps (``None``: derived, see :func:`grace_period_for`). ``max_concurrent``
    (``None``: as many as the cluster can place). ``trial_cpus``: CPUs the Tune trial actor (the
    trial's driver) reserves; the Train workers reserve their own. ``trial_max_failures``: times
    Tune restarts a trial whose actor died (a lost node; Tune's ``FailureConfig.max_failures``,
    -1: without limit); the restarted trial resumes from its newest Train checkpoint.
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
    trial_max_failures: int = 0
    source: str | None = None


@dataclass
class SweepPlan:
    """The checked sweep: ``base`` (with the report interval set), the representative
    TrainConfig ``sample``, the resolved ASHA ``grace_period`` and the metric names trials
    report."""

    base: dict[str, Any]
    sample: TrainConfig
    grace_period: int
    metric_names: list[str]


# ---------------------------------------------------------------------------------- metrics
def _validation_metric_names(config: TrainConfig) -> list[str]:
    """``val/*`` names of one validation of ``config``, from the code that computes them.

    The worker loop scores its validation cases with
    :func:`noisyseg.distributed.evaluation.evaluate_cases` and reports the numeric entries of the
    result (nested dicts flattened with ``.``; :func:`noisyseg.distributed.tracking.scalar_metrics`).
    Here the same call scores the first validation case with its truth as the prediction (no
    model: every metric has a value), and the names are taken without the finiteness filter.
    """
    info = check_against_store(config)
    store = VolumeStore.open(config.store)
    case = info.val_case_ids[0]
    truth = np.asarray(store.labels(case, config.val_labels)[...], dtype=np.float32)
    result = evaluate_cases(
        None,
        store,
        [case],
        label_set=config.val_labels,
        roi_size=tuple(info.patch_shape),
        probabilities={case: truth},
    )
    return scalar_metric_names(result.metrics, "val/")


def reported_metric_names(config: TrainConfig) -> list[str]:
    """Every metric name a trial of ``config`` reports to Tune (validation ones only when it
    validates; those read one validation case of the store)."""
    names = list(TRAIN_REPORT_KEYS)
    if config.val_cases > 0:
        names += _validation_metric_names(config)
    return names


def check_metric(metric: str, names: list[str], *, source: str | None = None) -> None:
    """Refuse a ``--metric`` the trials do not report, listing the valid names in one line."""
    if metric in names:
        return
    folded = {n.lower(): n for n in names}
    close = [folded[metric.lower()]] if metric.lower() in folded else []
    close = close or difflib.get_close_matches(metric, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise NoisysegInputError(
        f"--metric {metric} is not reported by the trials{hint}; valid: {', '.join(names)}; "
        "--metric-mode min|max says which way is better",
        path=source,
    )


# ---------------------------------------------------------------------------------- ASHA
def grace_period_for(
    explicit: int | None, report_every: int, steps: int, *, source: str | None = None
) -> int:
    """ASHA's grace period in steps.

    An explicit value must lie in ``[1, steps - 1]`` (else one line). Without one, the first
    report (``report_every`` steps), capped at ``steps - 1`` so a short run (``--steps 12`` with
    the default report interval of 100) still gets a rung; 1 for a one-step run.
    """
    if explicit is not None:
        if not 1 <= explicit <= steps - 1:
            raise NoisysegInputError(
                f"--grace-period must be between 1 and steps - 1 = {steps - 1}, got {explicit}",
                path=source,
            )
        return explicit
    return max(1, min(report_every, steps - 1))


def _check_options(settings: SweepSettings) -> None:
    if not _SWEEP_NAME.match(settings.name):
        raise NoisysegInputError(
            f"sweep name {settings.name!r} must be 1-100 letters, digits, '.', '_', '-' and start "
            "with a letter or digit"
        )
    checks = [
        (
            settings.mode in ("min", "max"),
            f"--metric-mode must be min or max, got {settings.mode!r}",
        ),
        (
            settings.scheduler in ("asha", "fifo"),
            f"--scheduler must be asha or fifo, got {settings.scheduler!r}",
        ),
        (settings.num_samples >= 1, f"--num-samples must be >= 1, got {settings.num_samples}"),
        (
            settings.max_concurrent is None or settings.max_concurrent >= 1,
            f"--max-concurrent must be >= 1, got {settings.max_concurrent}",
        ),
        (
            settings.reduction_factor > 1,
            f"--reduction-factor must be > 1, got {settings.reduction_factor}",
        ),
        (settings.trial_cpus >= 0, f"--trial-cpus must be >= 0, got {settings.trial_cpus}"),
        (
            settings.trial_max_failures >= -1,
            f"--trial-max-failures must be >= -1 (-1: without limit), got "
            f"{settings.trial_max_failures}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise NoisysegInputError(message)
    if settings.base.get("run_name"):
        raise NoisysegInputError(
            "--run-name is set per trial by the sweep (<sweep>-<trial id>); use --name",
            path=settings.source,
        )


def prepare(settings: SweepSettings) -> SweepPlan:
    """Check the settings, the space and the metric before any Ray or MLflow work.

    The returned base has ``checkpoint_interval = val_interval`` when the metric is a
    validation metric (each validation becomes one Tune report, so every report carries it).
    """
    _check_options(settings)
    source = settings.source
    base = {k: v for k, v in settings.base.items() if k not in settings.space}
    base.pop("run_name", None)
    probe = make_config({**base, **settings.space.probe_points()[0]}, source=source)
    validates = settings.metric.lower().startswith("val/")
    if validates and (probe.val_cases < 1 or probe.val_interval < 1):
        raise NoisysegInputError(
            f"metric {settings.metric} needs validation during training: set val_cases >= 1 "
            "and val_interval >= 1 (or choose --metric train_loss --metric-mode min)",
            path=source,
        )
    if validates:
        base["checkpoint_interval"] = probe.val_interval
    configs = settings.space.validate(base, source=source)
    sample = configs[0]
    names = reported_metric_names(sample)
    check_metric(settings.metric, names, source=source)
    steps = min(c.steps for c in configs)
    grace = grace_period_for(
        settings.grace_period if settings.scheduler == "asha" else None,
        sample.checkpoint_interval,
        steps,
        source=source,
    )
    return SweepPlan(base, sample, grace, names)


# ---------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class TrialFootprint:
    """Resources one trial holds while it trains: its driver actor and its worker group."""

    driver_cpus: float
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @classmethod
    def of(cls, config: TrainConfig, trial_cpus: float) -> TrialFootprint:
        return cls(trial_cpus, config.workers, config.cpus_per_worker, 1.0 if config.gpu else 0.0)

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def describe(self) -> str:
        text = (
            f"{self.cpus:g} CPUs (driver {self.driver_cpus:g} + {self.workers} workers x "
            f"{self.cpus_per_worker:g})"
        )
        return text + (f" and {self.gpus:g} GPUs" if self.gpus else "")


def plan_concurrency(
    footprint: TrialFootprint,
    requested: int | None,
    *,
    cluster_cpus: float,
    cluster_gpus: float,
    largest_node_cpus: float,
) -> tuple[int, str | None]:
    """How many trials may run at once, and a note when ``requested`` had to be lowered.

    Raises NoisysegInputError when not even one trial can be placed: its CPUs (or GPUs) exceed
    the cluster's, or one worker asks for more CPUs than the largest node has.
    """
    fixes = "lower --workers, --cpus-per-worker or --trial-cpus, or use a larger cluster"
    if footprint.cpus > cluster_cpus + 1e-9 or footprint.gpus > cluster_gpus + 1e-9:
        raise NoisysegInputError(
            f"one trial needs {footprint.describe()} but the Ray cluster has "
            f"{cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs: {fixes}"
        )
    if footprint.cpus_per_worker > largest_node_cpus + 1e-9:
        raise NoisysegInputError(
            f"each worker asks for {footprint.cpus_per_worker:g} CPUs but the largest Ray node "
            f"has {largest_node_cpus:g}: {fixes}"
        )
    fits = math.floor(cluster_cpus / footprint.cpus + 1e-9) if footprint.cpus > 0 else 10**6
    if footprint.gpus > 0:
        fits = min(fits, math.floor(cluster_gpus / footprint.gpus + 1e-9))
    if requested is None:
        return fits, None
    if requested > fits:
        return fits, (
            f"--max-concurrent {requested} lowered to {fits}: each trial holds "
            f"{footprint.describe()} and the cluster has {cluster_cpus:g} CPUs"
        )
    return requested, None
