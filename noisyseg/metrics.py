"""Lesion-wise detection metrics and voxel overlap (DESIGN.md, "Lesion metrics").

Pure NumPy/cc3d. Inputs are lists of per-case arrays, 2D ``(H, W)`` or 3D ``(D, H, W)``:
probabilities ``p ∈ [0, 1]`` (finite floats) and binary truth masks of the same shape. Torch
tensors can be passed through ``np.asarray`` (``.detach().cpu()``) by the caller.

Definitions
-----------
* **Truth lesions**: connected components of the truth mask (:mod:`noisyseg.lesions`;
  26-connectivity in 3D, 8 in 2D by default; ``connectivity`` applies to truth and prediction
  alike).
* **Candidates**: connected components of ``p ≥ candidate_threshold`` (default: ``threshold``,
  ``t = 0.5``); each is scored by its maximum probability.
* **Hit**: a candidate *hits* a truth lesion when their IoU ``|C∩G| / |C∪G|`` is ``≥ min_iou``
  (default :data:`DEFAULT_MIN_IOU` = 0.1; ``min_iou = 0`` means any shared voxel).
* **Operating points**: accept the candidates with score ``≥ s`` for each distinct candidate
  score ``s``, highest first (tied candidates enter together). At each point:

  - a truth lesion is **detected** when an accepted candidate hits it; its *detection score* is
    the highest score among the candidates hitting it (``-inf`` if none), so it is detected at
    ``s`` exactly when that score is ``≥ s``;
  - **TP** = number of detected lesions (one per lesion, however many candidates hit it);
  - an accepted candidate is a **false positive** when it overlaps (shares a voxel with) no
    detected lesion; any other accepted candidate that detects nothing — a further fragment of a
    detected lesion, whatever its IoU — is neither TP nor FP;
  - ``precision = TP / (TP + FP)``, ``recall = TP / n_lesions``, ``fp_per_case = FP / n_cases``.

  So two fragments of one lesion give one TP and no FP, and a diffuse blob touching three lesions
  (IoU < 0.1 with each) detects none and is one FP. FP may *fall* as ``s`` falls: a fragment
  counted FP becomes neither once the lesion's main candidate is accepted.
* **Why IoU ≥ 0.1** and not BraTS-METS' lesion-wise rule: BraTS 2023 (Saluja et al.,
  BraTS-2023-Metrics) dilates the truth lesions by 1 voxel (METS) and counts a truth lesion as
  found when *any* predicted component overlaps it, then scores lesion-wise Dice (0 for FN and FP
  lesions). Its detection counts therefore reward exactly what this rule must refuse: a diffuse
  low-probability blob over several lesions "finds" all of them (their Dice is low but the
  sensitivity is full). Here sensitivity and FROC are the reported numbers, so the overlap must
  be enforced in the detection itself. IoU ≥ 0.1 (Dice ≥ 0.18) still accepts a small lesion
  predicted two to three times too large or shifted by about half its diameter, the imprecision
  of outlines on 1–2 mm grids, while a blob ten times a lesion's volume detects nothing.
* **AP**: step-wise sum ``Σ_k (R_k − R_{k−1}) · P_k`` over the operating points with ``R_0 = 0``
  (scikit-learn's ``average_precision_score`` definition; no interpolation). Lesions no
  candidate hits cap the recall below 1 and so lower AP.
* **sensitivity_at_80_precision**: the largest recall over operating points with precision
  ``≥ 0.8``; 0 when there is none.
* **max_sensitivity**: recall with every candidate accepted (the end of the PR curve), reported
  with ``fp_per_case_at_max_sensitivity`` and ``precision_at_max_sensitivity`` at that same
  point. With the default ``candidate_threshold = threshold`` it equals ``sensitivity``; pass a
  lower ``candidate_threshold`` (e.g. 0.05) to extend the PR/FROC curves below ``t``.
* **sensitivity / precision / tp / fp / fp_per_case / sensitivity_by_size** are at threshold
  ``t``, computed from the components of ``p ≥ t`` (when ``candidate_threshold < t`` a
  low-threshold candidate may split at ``t``, so these are recomputed, not read off the curve).
* **FROC**: for each FP rate ``f`` in :data:`FROC_FP_RATES` (1, 2, 4, 8 per case) the largest
  recall over operating points with ``fp_per_case ≤ f`` (0 when none; no interpolation);
  ``froc_mean`` is their mean.
* **operating_points**: every reported point by name — ``threshold``, ``max_sensitivity``,
  ``precision_80``, ``froc_<f>fp`` — each with its ``rule``, the candidate ``score`` it accepts
  down to (NaN when no point qualifies), ``sensitivity``, ``precision`` and ``fp_per_case``.
* **Dice / Jaccard**: voxel overlap of ``p ≥ t`` with the truth, per case, then the mean over
  cases; a case with empty truth and empty prediction scores 1.0 for both.
* **Sensitivity by size**: truth lesions binned by physical volume (voxels × prod(spacing), mm³;
  ``spacings=None`` means 1 mm voxels, so volumes are voxel counts) into half-open bins
  ``[low, high)``. Default edges :data:`DEFAULT_SIZE_BINS_MM3` are the volumes of spheres of
  diameter 4, 8 and 20 mm.

Undefined ratios are NaN: recall-based numbers when there are no truth lesions at all
(``sensitivity``, ``max_sensitivity``, ``ap``, ``sensitivity_at_80_precision``, FROC
sensitivities, an empty size bin), and ``precision`` when nothing is predicted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import (
    check_binary_mask,
    label_lesions,
    resolve_connectivity,
    resolve_spacings,
)

#: Candidate threshold the reports use (``noisyseg evaluate``, the robustness benchmark): lesion
#: candidates down to p = 0.05 make up the PR/FROC curves, AP and maximum sensitivity, while
#: sensitivity, precision and FP/case stay at the operating threshold ``t`` = 0.5.
REPORT_CANDIDATE_THRESHOLD: float = 0.05
#: Minimum candidate/lesion IoU for a detection (see the module docstring for why 0.1).
DEFAULT_MIN_IOU: float = 0.1
#: FP-per-case rates of the FROC points; ``froc_mean`` is the mean sensitivity over them.
FROC_FP_RATES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
#: Sphere volumes (mm³) for diameters 4, 8 and 20 mm: ``π/6 · d³``.
DEFAULT_SIZE_BINS_MM3: tuple[float, ...] = (
    0.0,
    math.pi / 6 * 4**3,
    math.pi / 6 * 8**3,
    math.pi / 6 * 20**3,
    math.inf,
)


@dataclass(frozen=True)
class CaseCandidates:
    """Detection bookkeeping for one case.

    Attributes:
        scores: ``(C,)`` max probability of each candidate component.
        hits: ``(C,)`` bool, candidate hits (IoU ``≥ min_iou``) at least one truth lesion.
        covers: ``(C,)`` highest detection score among the truth lesions the candidate shares a
            voxel with (``-inf`` when none): at operating score ``s`` an accepted candidate is a
            false positive exactly when ``covers < s``.
        sizes: ``(C,)`` candidate voxel counts.
        truth_scores: ``(G,)`` detection score of each truth lesion (max score over the
            candidates hitting it; ``-inf`` when none does).
        truth_voxels: ``(G,)`` truth lesion voxel counts.
        truth_volumes: ``(G,)`` truth lesion volumes, mm³.
    """

    scores: np.ndarray
    hits: np.ndarray
    covers: np.ndarray
    sizes: np.ndarray
    truth_scores: np.ndarray
    truth_voxels: np.ndarray
    truth_volumes: np.ndarray

    @property
    def n_candidates(self) -> int:
        return int(self.scores.size)

    @property
    def n_lesions(self) -> int:
        return int(self.truth_scores.size)


def _check_probability(p: Any, case: int) -> np.ndarray:
    array = np.asarray(p)
    if array.ndim not in (2, 3):
        raise NoisysegInputError(
            f"probabilities must be 2D or 3D, got shape {array.shape}", case=str(case)
        )
    if not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
        or array.dtype == bool
    ):
        raise NoisysegInputError(
            f"probabilities must be numeric, got dtype {array.dtype}", case=str(case)
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise NoisysegInputError("probabilities have NaN or Inf voxels", case=str(case))
    if array.size and (array.min() < 0 or array.max() > 1):
        raise NoisysegInputError(
            f"probabilities must lie in [0, 1] (found {float(array.min()):g}..{float(array.max()):g})",
            case=str(case),
        )
    return array


def _check_threshold(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise NoisysegInputError(f"{name} must be in (0, 1], got {value!r}")
    return value


def case_candidates(
    probability: np.ndarray,
    truth: np.ndarray,
    *,
    threshold: float = 0.5,
    spacing: Sequence[float] | None = None,
    connectivity: int | None = None,
    min_iou: float = DEFAULT_MIN_IOU,
) -> CaseCandidates:
    """Candidates of one (validated) case, with scores, hit flags and cover scores.

    Args:
        probability: ``(H, W)`` or ``(D, H, W)`` probabilities.
        truth: binary mask of the same shape.
        threshold: candidates are components of ``probability ≥ threshold``.
        spacing: voxel spacing (mm), for truth volumes; ``None`` → 1 mm.
        connectivity: as in :func:`noisyseg.lesions.label_lesions`.
        min_iou: minimum IoU for a hit (0: any shared voxel).
    """
    probability = np.asarray(probability)
    truth = np.asarray(truth) != 0
    cand_labels, n_cand = label_lesions(probability >= threshold, connectivity)
    truth_labels, n_truth = label_lesions(truth, connectivity)
    spacing = tuple(1.0 for _ in truth.shape) if spacing is None else tuple(spacing)

    flat_c = cand_labels.ravel()
    scores = np.zeros(n_cand + 1)
    np.maximum.at(scores, flat_c, probability.ravel().astype(float))
    cand_sizes = np.bincount(flat_c, minlength=n_cand + 1)
    truth_sizes = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)

    both = (cand_labels > 0) & (truth_labels > 0)
    # one int64 key per (candidate, truth) pair: a 1-D unique is much faster than axis=1
    keys = cand_labels[both].astype(np.int64) * (n_truth + 1) + truth_labels[both].astype(np.int64)
    pairs, inter = np.unique(keys, return_counts=True)
    ci, gi = pairs // (n_truth + 1), pairs % (n_truth + 1)  # every overlapping pair
    iou = inter / (cand_sizes[ci] + truth_sizes[gi] - inter)
    hit = iou >= min_iou

    hits = np.zeros(n_cand + 1, dtype=bool)
    hits[ci[hit]] = True
    truth_scores = np.full(n_truth + 1, -np.inf)
    np.maximum.at(truth_scores, gi[hit], scores[ci[hit]])
    covers = np.full(n_cand + 1, -np.inf)
    np.maximum.at(covers, ci, truth_scores[gi])
    return CaseCandidates(
        scores=scores[1:],
        hits=hits[1:],
        covers=covers[1:],
        sizes=cand_sizes[1:],
        truth_scores=truth_scores[1:],
        truth_voxels=truth_sizes[1:],
        truth_volumes=truth_sizes[1:] * float(np.prod(spacing)),
    )


def _count_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many ``values`` are ``≥`` it."""
    ordered = np.sort(values)
    return ordered.size - np.searchsorted(ordered, thresholds, side="left")


def precision_recall_curve(cases: Sequence[CaseCandidates]) -> dict[str, np.ndarray]:
    """Operating points over all cases, highest score first.

    Returns:
        dict of equal-length arrays: ``thresholds`` (distinct candidate scores, descending),
        ``precision``, ``recall`` (NaN when there are no truth lesions), ``fp_per_case``,
        ``tp`` (detected lesions), ``fp`` (false-positive candidates) and ``accepted``
        (candidates with score ``≥`` the threshold, fragments included).
    """
    n_cases = max(len(cases), 1)
    scores = np.concatenate([c.scores for c in cases]) if cases else np.zeros(0)
    covers = np.concatenate([c.covers for c in cases]) if cases else np.zeros(0)
    truth_scores = np.concatenate([c.truth_scores for c in cases]) if cases else np.zeros(0)
    thresholds = np.unique(scores)[::-1]
    accepted = _count_at_or_above(scores, thresholds)
    # accepted and not a false positive: score >= s and covers >= s, i.e. min(...) >= s
    not_fp = _count_at_or_above(np.minimum(scores, covers), thresholds)
    tp = _count_at_or_above(truth_scores, thresholds)
    fp = accepted - not_fp
    n_lesions = truth_scores.size
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / n_lesions if n_lesions else np.full(thresholds.shape, np.nan)
        precision = tp / (tp + fp)
    return {
        "thresholds": thresholds,
        "precision": precision.astype(float),
        "recall": np.asarray(recall, dtype=float),
        "fp_per_case": fp / n_cases,
        "tp": tp,
        "fp": fp,
        "accepted": accepted,
    }


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """``Σ_k (R_k − R_{k−1}) P_k`` with ``R_0 = 0``, points ordered by decreasing score."""
    if recall.size == 0:
        return 0.0
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * precision))


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = int(np.count_nonzero(pred & truth))
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if n_pred + n_truth == 0:
        return 1.0, 1.0
    return 2.0 * inter / (n_pred + n_truth), inter / (n_pred + n_truth - inter)


def _point(curve: dict[str, np.ndarray], index: int | None, rule: str) -> dict[str, Any]:
    """One named operating point of ``curve`` (``index`` None: no point qualifies)."""
    if index is None:
        nan = float("nan")
        return {
            "rule": rule,
            "score": nan,
            "sensitivity": 0.0,
            "precision": nan,
            "fp_per_case": 0.0,
        }
    return {
        "rule": rule,
        "score": float(curve["thresholds"][index]),
        "sensitivity": float(curve["recall"][index]),
        "precision": float(curve["precision"][index]),
        "fp_per_case": float(curve["fp_per_case"][index]),
    }


def _best_recall(curve: dict[str, np.ndarray], allowed: np.ndarray) -> int | None:
    """Index of the highest-score point reaching the largest recall among ``allowed`` points."""
    if not allowed.any():
        return None
    recall = np.where(allowed, curve["recall"], -np.inf)
    return int(np.argmax(recall))  # first (highest score) of the maxima


def _curve_summary(
    curve: dict[str, np.ndarray], froc_fp_rates: Sequence[float], candidate_threshold: float
) -> dict[str, Any]:
    """AP, sensitivity at 80 % precision, max sensitivity, FROC and their named points."""
    n_points = curve["thresholds"].size
    last = n_points - 1 if n_points else None
    points = {
        "max_sensitivity": _point(
            curve, last, f"every candidate accepted (p >= {candidate_threshold:g})"
        ),
        "precision_80": _point(
            curve,
            _best_recall(curve, curve["precision"] >= 0.8),
            "largest sensitivity with precision >= 0.8",
        ),
    }
    froc = []
    for rate in froc_fp_rates:
        index = _best_recall(curve, curve["fp_per_case"] <= rate)
        point = _point(curve, index, f"largest sensitivity with FP/case <= {rate:g}")
        points[f"froc_{rate:g}fp"] = point
        froc.append((float(rate), point["sensitivity"]))
    return {
        "max_sensitivity": points["max_sensitivity"]["sensitivity"],
        "fp_per_case_at_max_sensitivity": points["max_sensitivity"]["fp_per_case"],
        "precision_at_max_sensitivity": points["max_sensitivity"]["precision"],
        "ap": average_precision(curve["precision"], curve["recall"]),
        "sensitivity_at_80_precision": points["precision_80"]["sensitivity"],
        "froc": froc,
        "froc_mean": float(np.mean([s for _, s in froc])) if froc else float("nan"),
        "points": points,
    }


def _no_lesion_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Recall-based numbers are undefined without truth lesions: NaN them."""
    nan = float("nan")
    for key in ("max_sensitivity", "ap", "sensitivity_at_80_precision", "froc_mean"):
        summary[key] = nan
    summary["froc"] = [(rate, nan) for rate, _ in summary["froc"]]
    for point in summary["points"].values():
        point["sensitivity"] = nan
    return summary


def _size_breakdown(
    edges: np.ndarray, volumes: np.ndarray, detected: np.ndarray
) -> list[dict[str, Any]]:
    """Sensitivity per ``[low, high)`` volume bin (mm³) of the truth lesions."""
    rows = []
    for low, high in itertools.pairwise(edges):
        inside = (volumes >= low) & (volumes < high)
        count = int(inside.sum())
        hit = int((inside & detected).sum())
        rows.append(
            {
                "bin": f"[{low:g}, {high:g})",
                "low": float(low),
                "high": float(high),
                "count": count,
                "detected": hit,
                "sensitivity": hit / count if count else float("nan"),
            }
        )
    return rows


def _validated_cases(
    probabilities: Sequence[Any], truths: Sequence[Any], connectivity: int | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-case probability arrays and boolean truth masks, checked (NoisysegInputError)."""
    if isinstance(probabilities, np.ndarray) or isinstance(truths, np.ndarray):
        raise NoisysegInputError("probabilities and truths must be lists of per-case arrays")
    if len(probabilities) != len(truths):
        raise NoisysegInputError(
            f"got {len(probabilities)} probability arrays but {len(truths)} truth masks"
        )
    if len(truths) == 0:
        raise NoisysegInputError("no cases to evaluate")
    probs, masks = [], []
    for i, (p, y) in enumerate(zip(probabilities, truths, strict=True)):
        p = _check_probability(p, i)
        y = check_binary_mask(y, i, what="truth")
        if p.shape != y.shape:
            raise NoisysegInputError(
                f"probability shape {p.shape} differs from truth shape {y.shape}", case=str(i)
            )
        resolve_connectivity(p.ndim, connectivity, case=i)
        probs.append(p)
        masks.append(y != 0)
    return probs, masks


def _check_edges(size_bins: Sequence[float] | None) -> np.ndarray:
    edges = np.asarray(DEFAULT_SIZE_BINS_MM3 if size_bins is None else size_bins, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.isnan(edges).any() or np.any(np.diff(edges) <= 0):
        raise NoisysegInputError(
            f"size_bins must be at least two increasing edges, got {size_bins!r}"
        )
    return edges


def lesion_metrics(
    probabilities: Sequence[Any],
    truths: Sequence[Any],
    *,
    threshold: float = 0.5,
    candidate_threshold: float | None = None,
    spacings: Any = None,
    size_bins: Sequence[float] | None = None,
    connectivity: int | None = None,
    min_iou: float = DEFAULT_MIN_IOU,
    froc_fp_rates: Sequence[float] = FROC_FP_RATES,
) -> dict[str, Any]:
    """Lesion detection metrics and voxel overlap over a set of cases (see module docstring).

    Args:
        probabilities: per-case probability arrays ``(H, W)`` or ``(D, H, W)``, values in [0, 1].
        truths: per-case binary truth masks, same shapes.
        threshold: operating threshold ``t`` for sensitivity, precision, FP/case, Dice, Jaccard
            and size-binned sensitivity.
        candidate_threshold: threshold defining the candidates of the PR/FROC curves, AP,
            sensitivity at 80% precision and maximum sensitivity; ``None`` → ``threshold``.
        spacings: ``None`` (1 mm), one spacing tuple (mm) for all cases, or one per case.
        size_bins: increasing bin edges in mm³ (``[low, high)`` bins); default
            :data:`DEFAULT_SIZE_BINS_MM3`.
        connectivity: 4/8 (2D), 6/18/26 (3D); ``None`` → 8 / 26.
        min_iou: minimum candidate/lesion IoU for a hit (default 0.1); 0 means any shared voxel.
        froc_fp_rates: FP-per-case rates for the FROC points (default 1, 2, 4, 8).

    Returns:
        dict with ``n_cases``, ``n_lesions``, ``n_candidates``, ``threshold``,
        ``candidate_threshold``, ``min_iou``, ``sensitivity``, ``precision``, ``fp_per_case``,
        ``tp``, ``fp`` (counts at ``t``), ``detected`` (lesions detected at ``t``),
        ``max_sensitivity``, ``fp_per_case_at_max_sensitivity``,
        ``precision_at_max_sensitivity``, ``ap``, ``sensitivity_at_80_precision``, ``froc``
        (list of ``(fp_per_case, sensitivity)``), ``froc_mean``, ``operating_points`` (dict of
        named points, see the module docstring), ``dice``, ``jaccard`` (means),
        ``dice_per_case``, ``jaccard_per_case``, ``sensitivity_by_size`` (list of dicts ``bin``,
        ``low``, ``high``, ``count``, ``detected``, ``sensitivity``) and ``pr_curve`` (dict of
        arrays from :func:`precision_recall_curve`).

    Raises:
        NoisysegInputError: list lengths differ, a case's shapes differ (naming the case),
            non-binary truth, probabilities outside [0, 1] or non-finite, bad thresholds,
            spacing, bins or connectivity.
    """
    threshold = _check_threshold(threshold, "threshold")
    cand_t = (
        threshold
        if candidate_threshold is None
        else _check_threshold(candidate_threshold, "candidate_threshold")
    )
    if not (0.0 <= float(min_iou) <= 1.0):
        raise NoisysegInputError(f"min_iou must be in [0, 1], got {min_iou!r}")
    edges = _check_edges(size_bins)
    probs, masks = _validated_cases(probabilities, truths, connectivity)
    space = resolve_spacings(spacings, [m.shape for m in masks])

    def candidates_at(t: float) -> list[CaseCandidates]:
        return [
            case_candidates(
                p, y, threshold=t, spacing=s, connectivity=connectivity, min_iou=float(min_iou)
            )
            for p, y, s in zip(probs, masks, space, strict=True)
        ]

    at_t = candidates_at(threshold)
    curve_cases = at_t if cand_t == threshold else candidates_at(cand_t)
    n_cases = len(masks)
    n_lesions = sum(c.n_lesions for c in at_t)
    # at t every candidate is accepted: the last point of the curve of the t candidates
    at_t_curve = precision_recall_curve(at_t)
    tp = int(at_t_curve["tp"][-1]) if at_t_curve["tp"].size else 0
    fp = int(at_t_curve["fp"][-1]) if at_t_curve["fp"].size else 0
    detected_mask = np.isfinite(np.concatenate([c.truth_scores for c in at_t]))

    curve = precision_recall_curve(curve_cases)
    summary = _curve_summary(curve, froc_fp_rates, cand_t)
    if n_lesions == 0:
        summary = _no_lesion_summary(summary)
    nan = float("nan")
    sensitivity = tp / n_lesions if n_lesions else nan
    precision = tp / (tp + fp) if tp + fp else nan
    points = {
        "threshold": {
            "rule": f"candidates with p >= t = {threshold:g}",
            "score": threshold,
            "sensitivity": sensitivity,
            "precision": precision,
            "fp_per_case": fp / n_cases,
        },
        **summary.pop("points"),
    }
    overlaps = [_overlap(p >= threshold, y) for p, y in zip(probs, masks, strict=True)]
    return {
        "n_cases": n_cases,
        "n_lesions": n_lesions,
        "n_candidates": sum(c.n_candidates for c in curve_cases),
        "threshold": threshold,
        "candidate_threshold": cand_t,
        "min_iou": float(min_iou),
        "sensitivity": sensitivity,
        "detected": tp,
        "precision": precision,
        "tp": tp,
        "fp": fp,
        "fp_per_case": fp / n_cases,
        **summary,
        "operating_points": points,
        "dice": float(np.mean([d for d, _ in overlaps])),
        "jaccard": float(np.mean([j for _, j in overlaps])),
        "dice_per_case": [d for d, _ in overlaps],
        "jaccard_per_case": [j for _, j in overlaps],
        "sensitivity_by_size": _size_breakdown(
            edges, np.concatenate([c.truth_volumes for c in at_t]), detected_mask
        ),
        "pr_curve": curve,
    }
