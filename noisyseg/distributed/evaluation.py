"""Evaluation over a store split: predict every case (or take precomputed maps) and score lesion
detection with :func:`noisyseg.metrics.lesion_metrics` against a label set of the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from noisyseg.distributed.prediction_io import check_cases
from noisyseg.distributed.sliding_window import (
    BlendName,
    case_normalization_stats,
    predict_volume,
)
from noisyseg.errors import NoisysegInputError
from noisyseg.metrics import lesion_metrics
from noisyseg.models import AmpName

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class EvaluationResult:
    """Output of :func:`evaluate_cases`.

    Attributes:
        metrics: :func:`noisyseg.metrics.lesion_metrics` over all cases (plus ``num_cases``).
        per_case: one dict per case: ``case_id``, ``dice``, ``sensitivity``, ``max_sensitivity``,
            ``false_positives``, ``seconds``.
        probabilities: ``case_id -> (*S)`` float32 maps when kept, else ``None``.
    """

    metrics: dict[str, Any]
    per_case: list[dict[str, Any]] = field(default_factory=list)
    probabilities: dict[str, np.ndarray] | None = None


def _scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def evaluate_cases(
    model: nn.Module,
    store: Any,
    case_ids: Sequence[str],
    *,
    label_set: str = "truth",
    roi_size: Sequence[int],
    threshold: float = 0.5,
    candidate_threshold: float | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: BlendName = "gaussian",
    device: str = "cpu",
    amp: AmpName = "none",
    size_bins: Sequence[float] | None = None,
    keep_probabilities: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    probabilities: Mapping[str, np.ndarray] | None = None,
) -> EvaluationResult:
    """Predict every case and score lesion detection against ``label_set``.

    Args:
        model: the trained U-Net.
        store: an open :class:`noisyseg.storage.store.VolumeStore`.
        case_ids: cases to evaluate (validated first: present, label set present).
        label_set: reference labels (``"truth"`` normally).
        roi_size, overlap, sw_batch_size, mode, device, amp: see :func:`predict_volume`.
        threshold: probability threshold for predicted lesions.
        candidate_threshold: lowest candidate probability for the PR/FROC curves, AP and maximum
            sensitivity (``None``: ``threshold``; see :mod:`noisyseg.metrics`).
        size_bins: lesion-size bin edges (physical volume, spacing units cubed) for the breakdown.
        keep_probabilities: return the maps in the result.
        progress: called as ``progress(case_id, index, total)`` after each case.
        probabilities: precomputed maps ``case_id -> (*S)`` (e.g. from Ray workers via
            :func:`map_cases`); ``model`` is then not used (may be ``None``).
    """
    if not 0.0 <= threshold <= 1.0:
        raise NoisysegInputError(f"threshold must be in [0, 1], got {threshold}")
    case_ids = check_cases(store, case_ids)
    if not case_ids:
        raise NoisysegInputError("no cases to evaluate")
    truths_arrays = _label_arrays(store, case_ids, label_set)
    _check_precomputed(probabilities, case_ids)
    window = {
        "roi_size": roi_size,
        "overlap": overlap,
        "sw_batch_size": sw_batch_size,
        "mode": mode,
        "device": device,
        "amp": amp,
    }
    metric_kwargs: dict[str, Any] = {
        "threshold": threshold,
        "candidate_threshold": candidate_threshold,
    }
    if size_bins is not None:
        metric_kwargs["size_bins"] = list(size_bins)
    maps: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    spacings: list[tuple[float, ...]] = []
    per_case: list[dict[str, Any]] = []
    for index, (case_id, truth_array) in enumerate(zip(case_ids, truths_arrays, strict=True)):
        start = time.perf_counter()
        probability = _case_probability(model, store, case_id, probabilities, window)
        truth = np.asarray(truth_array[...]).astype(np.uint8, copy=False)
        spacing = tuple(float(s) for s in store.spacing(case_id))
        seconds = time.perf_counter() - start
        per_case.append(_case_row(case_id, probability, truth, spacing, seconds, metric_kwargs))
        maps.append(probability)
        truths.append(truth)
        spacings.append(spacing)
        if progress is not None:
            progress(case_id, index + 1, len(case_ids))
    metrics = dict(lesion_metrics(maps, truths, spacings=spacings, **metric_kwargs))
    metrics["num_cases"] = len(case_ids)
    kept = dict(zip(case_ids, maps, strict=True)) if keep_probabilities else None
    return EvaluationResult(metrics=metrics, per_case=per_case, probabilities=kept)


def _label_arrays(store: Any, case_ids: Sequence[str], label_set: str) -> list[Any]:
    """The lazy ``(*S)`` label arrays of ``label_set`` for every case; NoisysegInputError naming
    the first case that lacks the set."""
    arrays = []
    for case_id in case_ids:
        try:
            arrays.append(store.labels(case_id, name=label_set))
        except (KeyError, FileNotFoundError, LookupError):
            raise NoisysegInputError(f"label set {label_set!r} is missing", case=case_id) from None
    return arrays


def _check_precomputed(
    precomputed: Mapping[str, np.ndarray] | None, case_ids: Sequence[str]
) -> None:
    """ValueError when precomputed maps are given but some of ``case_ids`` have none."""
    if precomputed is not None:
        missing = [c for c in case_ids if c not in precomputed]
        if missing:
            raise ValueError(f"no precomputed probabilities for cases {missing}")


def _case_probability(
    model: nn.Module | None,
    store: Any,
    case_id: str,
    precomputed: Mapping[str, np.ndarray] | None,
    window: Mapping[str, Any],
) -> np.ndarray:
    """The case's ``(*S)`` float32 probability: the precomputed map when given, else
    :func:`predict_volume` with the sliding-window settings ``window`` and the case's stored
    normalisation statistics."""
    if precomputed is not None:
        return np.asarray(precomputed[case_id], dtype=np.float32)
    return predict_volume(
        model,
        store.image(case_id),
        **window,
        stats=case_normalization_stats(store, case_id),
    )


def _case_row(
    case_id: str,
    probability: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, ...],
    seconds: float,
    metric_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """One case's row of :attr:`EvaluationResult.per_case` (``probability`` and ``truth``
    ``(*S)``, ``spacing`` in mm, ``seconds`` of prediction and reading)."""
    case_metrics = lesion_metrics([probability], [truth], spacings=[spacing], **metric_kwargs)
    return {
        "case_id": case_id,
        "dice": _scalar(case_metrics.get("dice")),
        "sensitivity": _scalar(case_metrics.get("sensitivity")),
        "max_sensitivity": _scalar(case_metrics.get("max_sensitivity")),
        "false_positives": _scalar(case_metrics.get("fp_per_case")),
        "seconds": seconds,
    }


__all__ = ["EvaluationResult", "evaluate_cases"]
