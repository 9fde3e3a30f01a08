"""Lesion-wise detection metrics and voxel overlap (DESIGN.md, "Lesion metrics").

Pure NumPy/cc3d. Inputs are lists of per-case arrays, 2D ``(H, W)`` or 3D ``(D, H, W)``:
probabilities ``p ∈ [0, 1]`` (finite floats) and binary truth masks of the same shape. Torch
tensors can be passed through ``np.asarray`` (``.detach().cpu()``) by the caller.

Definitions
-----------
* **Truth lesions**: connected components of the truth mask (26-connectivity in 3D, 8 in 2D by
  default; ``connectivity`` applies to truth and prediction alike).
* **Candidates**: connected components of ``p ≥ candidate_threshold`` (default: ``threshold``,
  ``t = 0.5``); each is scored by its maximum probability.
* **Hit**: a candidate *hits* a truth lesion when they share at least one voxel and, if
  ``min_iou > 0``, their IoU (``|C∩G| / |C∪G|``) is ``≥ min_iou``. No one-to-one matching:
  a truth lesion is **detected** when some accepted candidate hits it, and an accepted candidate
  is a **true positive** when it hits some truth lesion, a **false positive** otherwise. So a
  lesion predicted in two fragments is detected once and neither fragment is a false positive;
  a candidate spanning two truth lesions detects both. With these rules recall only grows as
  more candidates are accepted, and each truth lesion has a *detection score* — the highest
  score among the candidates hitting it (``-inf`` if none): it is detected at operating score
  ``s`` exactly when its detection score is ``≥ s``.
* **Operating points**: accept the candidates with score ``≥ s`` for each distinct candidate
  score ``s``, highest first (tied candidates enter together). At each point:
  ``precision = TP / accepted``, ``recall = detected / n_lesions``,
  ``fp_per_case = FP / n_cases``.
* **AP**: step-wise sum ``Σ_k (R_k − R_{k−1}) · P_k`` over the operating points with ``R_0 = 0``
  (scikit-learn's ``average_precision_score`` definition; no interpolation). Lesions no
  candidate hits cap the recall below 1 and so lower AP.
* **sensitivity_at_80_precision**: the largest recall over operating points with precision
  ``≥ 0.8``; 0 when there is none.
* **max_sensitivity**: recall with every candidate accepted (the end of the PR curve). With the
  default ``candidate_threshold = threshold`` it equals ``sensitivity``; pass a lower
  ``candidate_threshold`` (e.g. 0.05) to extend the PR/FROC curves below ``t``.
* **sensitivity / precision / fp_per_case / sensitivity_by_size** are at threshold ``t``,
  computed from the components of ``p ≥ t`` (when ``candidate_threshold < t`` a low-threshold
  candidate may split at ``t``, so these are recomputed, not read off the curve).
* **FROC**: for each FP rate ``f`` in :data:`FROC_FP_RATES` the largest recall over operating
  points with ``fp_per_case ≤ f`` (0 when none; no interpolation); ``froc_mean`` is their mean
  (the CPM score).
* **Dice / Jaccard**: voxel overlap of ``p ≥ t`` with the truth, per case, then the mean over
  cases; a case with empty truth and empty prediction scores 1.0 for both.
* **Sensitivity by size**: truth lesions binned by physical volume (voxels × prod(spacing), mm³;
  ``spacings=None`` means 1 mm voxels, so volumes are voxel counts) into half-open bins
  ``[low, high)``. Default edges :data:`DEFAULT_SIZE_BINS_MM3` are the volumes of spheres of
  diameter 4, 8 and 20 mm.

Undefined ratios are NaN: recall-based numbers when there are no truth lesions at all
(``sensitivity``, ``max_sensitivity``, ``ap``, ``sensitivity_at_80_precision``, FROC
sensitivities, an empty size bin), and ``precision`` when nothing is predicted at ``t``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.noise import check_binary_mask, label_lesions, resolve_connectivity, resolve_spacings

#: Candidate threshold the reports use (``noisyseg evaluate``, the robustness benchmark): lesion
#: candidates down to p = 0.05 make up the PR/FROC curves, AP and maximum sensitivity, while
#: sensitivity, precision and FP/case stay at the operating threshold ``t`` = 0.5.
REPORT_CANDIDATE_THRESHOLD: float = 0.05

FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
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
        hits: ``(C,)`` bool, candidate hits at least one truth lesion.
        sizes: ``(C,)`` candidate voxel counts.
        truth_scores: ``(G,)`` detection score of each truth lesion (max score over the
            candidates hitting it; ``-inf`` when none does).
        truth_voxels: ``(G,)`` truth lesion voxel counts.
        truth_volumes: ``(G,)`` truth lesion volumes, mm³.
    """

    scores: np.ndarray
    hits: np.ndarray
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
    min_iou: float = 0.0,
) -> CaseCandidates:
    """Candidates of one (validated) case, with scores and hit flags.

    Args:
        probability: ``(H, W)`` or ``(D, H, W)`` probabilities.
        truth: binary mask of the same shape.
        threshold: candidates are components of ``probability ≥ threshold``.
        spacing: voxel spacing (mm), for truth volumes; ``None`` → 1 mm.
        connectivity: as in :func:`noisyseg.noise.label_lesions`.
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
    ci, gi = pairs // (n_truth + 1), pairs % (n_truth + 1)
    if min_iou > 0:
        iou = inter / (cand_sizes[ci] + truth_sizes[gi] - inter)
        keep = iou >= min_iou
        ci, gi = ci[keep], gi[keep]

    hits = np.zeros(n_cand + 1, dtype=bool)
    hits[ci] = True
    truth_scores = np.full(n_truth + 1, -np.inf)
    np.maximum.at(truth_scores, gi, scores[ci])
    return CaseCandidates(
        scores=scores[1:],
        hits=hits[1:],
        sizes=cand_sizes[1:],
        truth_scores=truth_scores[1:],
        truth_voxels=truth_sizes[1:],
        truth_volumes=truth_sizes[1:] * float(np.prod(spacing)),
    )


def precision_recall_curve(cases: Sequence[CaseCandidates]) -> dict[str, np.ndarray]:
    """Operating points over all cases, highest score first.

    Returns:
        dict of equal-length arrays: ``thresholds`` (distinct candidate scores, descending),
        ``precision``, ``recall`` (NaN when there are no truth lesions), ``fp_per_case``,
        ``tp`` and ``fp`` (accepted candidate counts).
    """
    n_cases = max(len(cases), 1)
    scores = np.concatenate([c.scores for c in cases]) if cases else np.zeros(0)
    hits = np.concatenate([c.hits for c in cases]) if cases else np.zeros(0, bool)
    truth_scores = np.concatenate([c.truth_scores for c in cases]) if cases else np.zeros(0)
    thresholds = np.unique(scores)[::-1]
    # counts of candidates / detected lesions with score >= each threshold
    order = np.sort(scores)
    accepted = scores.size - np.searchsorted(order, thresholds, side="left")
    tp_scores = np.sort(scores[hits])
    tp = tp_scores.size - np.searchsorted(tp_scores, thresholds, side="left")
    det_scores = np.sort(truth_scores)
    detected = det_scores.size - np.searchsorted(det_scores, thresholds, side="left")
    fp = accepted - tp
    n_lesions = truth_scores.size
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = detected / n_lesions if n_lesions else np.full(thresholds.shape, np.nan)
        precision = tp / accepted
    return {
        "thresholds": thresholds,
        "precision": precision.astype(float),
        "recall": np.asarray(recall, dtype=float),
        "fp_per_case": fp / n_cases,
        "tp": tp,
        "fp": fp,
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


def lesion_metrics(
    probabilities: Sequence[Any],
    truths: Sequence[Any],
    *,
    threshold: float = 0.5,
    candidate_threshold: float | None = None,
    spacings: Any = None,
    size_bins: Sequence[float] | None = None,
    connectivity: int | None = None,
    min_iou: float = 0.0,
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
        min_iou: minimum candidate/lesion IoU for a hit; 0 means any shared voxel.
        froc_fp_rates: FP-per-case rates for the FROC points.

    Returns:
        dict with ``n_cases``, ``n_lesions``, ``n_candidates``, ``threshold``,
        ``candidate_threshold``, ``sensitivity``, ``precision``, ``fp_per_case``, ``tp``, ``fp``
        (counts at ``t``), ``detected`` (lesions detected at ``t``), ``max_sensitivity``, ``ap``,
        ``sensitivity_at_80_precision``, ``froc`` (list of ``(fp_per_case, sensitivity)``),
        ``froc_mean``, ``dice``, ``jaccard`` (means), ``dice_per_case``, ``jaccard_per_case``,
        ``sensitivity_by_size`` (list of dicts ``bin``, ``low``, ``high``, ``count``,
        ``detected``, ``sensitivity``) and ``pr_curve`` (dict of arrays from
        :func:`precision_recall_curve`).

    Raises:
        NoisysegInputError: list lengths differ, a case's shapes differ (naming the case),
            non-binary truth, probabilities outside [0, 1] or non-finite, bad thresholds,
            spacing, bins or connectivity.
    """
    if isinstance(probabilities, np.ndarray) or isinstance(truths, np.ndarray):
        raise NoisysegInputError("probabilities and truths must be lists of per-case arrays")
    if len(probabilities) != len(truths):
        raise NoisysegInputError(
            f"got {len(probabilities)} probability arrays but {len(truths)} truth masks"
        )
    if len(truths) == 0:
        raise NoisysegInputError("no cases to evaluate")
    threshold = _check_threshold(threshold, "threshold")
    cand_t = (
        threshold
        if candidate_threshold is None
        else _check_threshold(candidate_threshold, "candidate_threshold")
    )
    if not (0.0 <= float(min_iou) <= 1.0):
        raise NoisysegInputError(f"min_iou must be in [0, 1], got {min_iou!r}")
    edges = np.asarray(DEFAULT_SIZE_BINS_MM3 if size_bins is None else size_bins, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.isnan(edges).any() or np.any(np.diff(edges) <= 0):
        raise NoisysegInputError(
            f"size_bins must be at least two increasing edges, got {size_bins!r}"
        )

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
    space = resolve_spacings(spacings, [m.shape for m in masks])

    kwargs = {"connectivity": connectivity, "min_iou": float(min_iou)}
    at_t = [
        case_candidates(p, y, threshold=threshold, spacing=s, **kwargs)
        for p, y, s in zip(probs, masks, space, strict=True)
    ]
    curve_cases = (
        at_t
        if cand_t == threshold
        else [
            case_candidates(p, y, threshold=cand_t, spacing=s, **kwargs)
            for p, y, s in zip(probs, masks, space, strict=True)
        ]
    )

    n_cases = len(masks)
    n_lesions = sum(c.n_lesions for c in at_t)
    tp = int(sum(int(c.hits.sum()) for c in at_t))
    n_pred = sum(c.n_candidates for c in at_t)
    fp = n_pred - tp
    truth_scores = np.concatenate([c.truth_scores for c in at_t])
    detected_mask = np.isfinite(truth_scores)  # at t every candidate is accepted
    volumes = np.concatenate([c.truth_volumes for c in at_t])

    curve = precision_recall_curve(curve_cases)
    has_lesions = n_lesions > 0
    nan = float("nan")
    if has_lesions:
        all_detected = int(np.isfinite(np.concatenate([c.truth_scores for c in curve_cases])).sum())
        max_sensitivity = all_detected / n_lesions
        ap = average_precision(curve["precision"], curve["recall"])
        ok = curve["precision"] >= 0.8
        sens80 = float(curve["recall"][ok].max()) if ok.any() else 0.0
        froc = []
        for rate in froc_fp_rates:
            within = curve["fp_per_case"] <= rate
            froc.append(
                (float(rate), float(curve["recall"][within].max()) if within.any() else 0.0)
            )
    else:
        max_sensitivity = ap = sens80 = nan
        froc = [(float(rate), nan) for rate in froc_fp_rates]

    by_size = []
    for low, high in itertools.pairwise(edges):
        inside = (volumes >= low) & (volumes < high)
        count = int(inside.sum())
        hit = int((inside & detected_mask).sum())
        by_size.append(
            {
                "bin": f"[{low:g}, {high:g})",
                "low": float(low),
                "high": float(high),
                "count": count,
                "detected": hit,
                "sensitivity": hit / count if count else nan,
            }
        )

    overlaps = [_overlap(p >= threshold, y) for p, y in zip(probs, masks, strict=True)]
    dice_per_case = [d for d, _ in overlaps]
    jaccard_per_case = [j for _, j in overlaps]
    return {
        "n_cases": n_cases,
        "n_lesions": n_lesions,
        "n_candidates": sum(c.n_candidates for c in curve_cases),
        "threshold": threshold,
        "candidate_threshold": cand_t,
        "sensitivity": int(detected_mask.sum()) / n_lesions if has_lesions else nan,
        "detected": int(detected_mask.sum()),
        "precision": tp / n_pred if n_pred else nan,
        "tp": tp,
        "fp": fp,
        "fp_per_case": fp / n_cases,
        "max_sensitivity": max_sensitivity,
        "ap": ap,
        "sensitivity_at_80_precision": sens80,
        "froc": froc,
        "froc_mean": float(np.mean([s for _, s in froc])) if has_lesions else nan,
        "dice": float(np.mean(dice_per_case)),
        "jaccard": float(np.mean(jaccard_per_case)),
        "dice_per_case": dice_per_case,
        "jaccard_per_case": jaccard_per_case,
        "sensitivity_by_size": by_size,
        "pr_curve": curve,
    }
