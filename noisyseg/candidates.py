"""Lesion candidates a model predicts where the labels have none: the audit's pure core.

``noisyseg audit`` turns a trained model into a review list of probable *missed* lesions of a
labelled set. This module holds the rules, on NumPy arrays only (no Ray, Zarr or MLflow):

* **Candidates**: connected components of ``p ≥ threshold`` (26-connectivity in 3D, 8 in 2D, as
  the lesion metrics), numbered ``1..n`` in raster order of their first voxel. The id
  ``<case>:<n>`` is stable: the same model, case, sliding-window settings and threshold give the
  same numbering (case ids never contain ``:``).
* **Suspected missed lesion**: a candidate that shares no voxel with a labelled lesion *and does
  not touch one* (no voxel of it is a neighbour, under the same connectivity, of a labelled voxel).
  A component that touches a labelled lesion is that lesion seen a little larger (a coarse or
  tight outline), not a lesion the annotator left out.
* **Score and ranking**: the score is the candidate's **maximum probability** — the rule by which
  :mod:`noisyseg.metrics` scores a predicted lesion, so the list is read top-down like the FROC
  curve. Ties are common (sigmoid saturates at 1.0 in float32 for confident detections) and are
  broken, in order, by

  1. **larger volume first** (mm³): among equally confident findings a larger one matters more to
     the patient and is less likely a speck of noise;
  2. **farther from the labelled lesions first** (mm): a candidate next to a labelled lesion is
     more often a satellite or a piece of that lesion's outline than a separate lesion the
     annotator missed; a case without labelled lesions counts as infinitely far;
  3. **case id, then candidate number** (ascending): a total, reproducible order.

* **World coordinates**: store arrays are ``(z, y, x)`` (or ``(y, x)``); the case's NIfTI-style
  affine maps voxel ``(i, j, k) = (x, y, z)`` to millimetres, so a centroid ``(z, y, x)`` is
  reversed before the affine (2D: ``k = 0``).
* **Distance to the labelled lesions**: the smallest Euclidean distance (mm, with the voxel
  spacing) from a voxel centre of the candidate to a labelled voxel centre.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from noisyseg.lesions import equivalent_diameter_mm, label_lesions, resolve_connectivity

#: Axis names of the store's spatial axes, by dimensionality.
_AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


@dataclass(frozen=True)
class Candidate:
    """One predicted lesion candidate of a case.

    Attributes:
        case_id: the case.
        number: component number ``1..n`` (raster order of the first voxel) among the case's
            components of ``p ≥ threshold``.
        voxels: voxel count.
        volume_mm3: ``voxels × prod(spacing)`` (mm³; mm² for 2D).
        centroid_voxel: centroid in voxel coordinates, store axis order ``(z, y, x)``/``(y, x)``.
        centroid_world: centroid in world millimetres ``(x, y, z)`` through the case's affine.
        max_probability: the score (highest probability inside the component).
        mean_probability: mean probability inside the component.
        distance_mm: distance to the nearest labelled voxel (``inf``: no labelled lesion).
        touches_label: shares a voxel with, or is adjacent to, a labelled lesion.
        bbox: ``((start, stop), ...)`` per axis, store order, stop exclusive.
        mask: boolean crop of the component inside ``bbox``.
    """

    case_id: str
    number: int
    voxels: int
    volume_mm3: float
    centroid_voxel: tuple[float, ...]
    centroid_world: tuple[float, float, float]
    max_probability: float
    mean_probability: float
    distance_mm: float
    touches_label: bool
    bbox: tuple[tuple[int, int], ...]
    mask: np.ndarray = field(repr=False, compare=False)

    @property
    def candidate_id(self) -> str:
        """``<case>:<number>``."""
        return f"{self.case_id}:{self.number}"

    @property
    def score(self) -> float:
        """The ranking score: :attr:`max_probability`."""
        return self.max_probability

    @property
    def suspected_missed(self) -> bool:
        """True when the candidate neither overlaps nor touches a labelled lesion."""
        return not self.touches_label

    @property
    def slices(self) -> tuple[slice, ...]:
        """The bounding box as slices (store axis order)."""
        return tuple(slice(a, b) for a, b in self.bbox)

    def full_mask(self, shape: Sequence[int]) -> np.ndarray:
        """The component as a boolean array of the case's ``shape``."""
        out = np.zeros(tuple(shape), dtype=bool)
        out[self.slices] = self.mask
        return out

    def record(self) -> dict[str, Any]:
        """One table row (no mask): ids, centroid (voxels and mm), volume, scores, distance."""
        axes = _AXES[len(self.centroid_voxel)]
        row: dict[str, Any] = {
            "case_id": self.case_id,
            "candidate_id": self.candidate_id,
            "number": self.number,
        }
        row.update({f"centroid_{a}": float(v) for a, v in zip(axes, self.centroid_voxel)})
        row.update(
            {f"world_{a}_mm": float(v) for a, v in zip(("x", "y", "z"), self.centroid_world)}
        )
        row.update(
            {
                "voxels": self.voxels,
                "volume_mm3": self.volume_mm3,
                "score": self.score,
                "max_probability": self.max_probability,
                "mean_probability": self.mean_probability,
                "distance_mm": self.distance_mm,
            }
        )
        return row


def parse_candidate_id(candidate_id: str) -> tuple[str, int]:
    """Split ``<case>:<number>`` into ``(case, number)``.

    Raises:
        ValueError: not of that form (number a positive integer).
    """
    case_id, sep, number = str(candidate_id).rpartition(":")
    if not sep or not case_id or not number.isdigit() or int(number) < 1:
        raise ValueError(f"candidate id {candidate_id!r} is not of the form <case>:<number>")
    return case_id, int(number)


# ------------------------------------------------------------------------------ geometry
def default_affine(spacing: Sequence[float]) -> np.ndarray:
    """``diag(spacing reversed to (x, y[, z]), 1)``: the affine of a case stored without one."""
    diagonal = [float(s) for s in spacing][::-1]
    diagonal += [1.0] * (3 - len(diagonal))
    return np.diag(diagonal + [1.0])


def voxel_to_world(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World millimetres of voxel coordinates given in store axis order.

    Args:
        affine: ``(4, 4)`` mapping voxel ``(i, j, k, 1) = (x, y, z, 1)`` to world mm.
        points: ``(N, D)`` voxel coordinates ``(z, y, x)`` (D = 3) or ``(y, x)`` (D = 2).

    Returns:
        ``(N, 3)`` world coordinates ``(x, y, z)`` in mm.
    """
    affine = np.asarray(affine, dtype=np.float64)
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if points.shape[1] not in (2, 3):
        raise ValueError(f"points must be (N, 2) or (N, 3), got {points.shape}")
    ijk = points[:, ::-1]
    if ijk.shape[1] == 2:
        ijk = np.concatenate([ijk, np.zeros((len(ijk), 1))], axis=1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _neighbourhood(ndim: int, connectivity: int) -> np.ndarray:
    """The structuring element of ``connectivity`` (6/18/26 in 3D, 4/8 in 2D)."""
    rank = {6: 1, 18: 2, 26: 3, 4: 1, 8: 2}[connectivity]
    return ndimage.generate_binary_structure(ndim, rank)


def touching_components(
    components: np.ndarray, n: int, labelled: np.ndarray, connectivity: int
) -> np.ndarray:
    """Which of components ``1..n`` overlap or touch ``labelled`` (``(n,)`` bool).

    Touch = a voxel of the component is a neighbour (under ``connectivity``) of a labelled voxel.
    """
    touched = np.zeros(n + 1, dtype=bool)
    if n and labelled.any():
        grown = ndimage.binary_dilation(
            labelled, structure=_neighbourhood(labelled.ndim, connectivity)
        )
        touched[np.unique(components[grown])] = True
    return touched[1:]


def distances_to_labels(
    components: np.ndarray, n: int, labelled: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Per component ``1..n``: smallest voxel-centre distance (mm) to a labelled voxel.

    ``inf`` for every component when nothing is labelled; 0 where a component overlaps a label.
    """
    if n == 0:
        return np.zeros(0)
    if not labelled.any():
        return np.full(n, math.inf)
    distance = ndimage.distance_transform_edt(~labelled, sampling=tuple(float(s) for s in spacing))
    return np.asarray(ndimage.minimum(distance, components, np.arange(1, n + 1)), dtype=float)


# ---------------------------------------------------------------------------- extraction
def _check_inputs(
    probability: np.ndarray, labels: np.ndarray, threshold: float, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    probability = np.asarray(probability)
    labels = np.asarray(labels)
    if probability.ndim not in (2, 3):
        raise ValueError(f"probability must be 2D or 3D, got shape {probability.shape}")
    if labels.shape != probability.shape:
        raise ValueError(f"labels {labels.shape} and probability {probability.shape} differ")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    spacing = tuple(1.0 for _ in probability.shape) if spacing is None else tuple(spacing)
    if len(spacing) != probability.ndim or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} does not fit a {probability.ndim}D array")
    return probability, labels != 0, tuple(float(s) for s in spacing)


def extract_candidates(
    probability: np.ndarray,
    labels: np.ndarray,
    *,
    case_id: str,
    threshold: float = 0.5,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    connectivity: int | None = None,
) -> list[Candidate]:
    """Every candidate of one case (suspected or not), in component-number order.

    Args:
        probability: ``(*S)`` lesion probabilities, S = ``(Z, Y, X)`` or ``(Y, X)``.
        labels: ``(*S)`` the label set under audit (non-zero = lesion).
        case_id: the case (first part of the candidate ids).
        threshold: candidates are the components of ``probability ≥ threshold``.
        spacing: voxel spacing in mm, store axis order (default 1 mm).
        affine: ``(4, 4)`` voxel ``(x, y, z)`` → world mm (default :func:`default_affine`).
        connectivity: 26/18/6 (3D), 8/4 (2D); default 26 / 8.

    Returns:
        one :class:`Candidate` per component, numbered ``1..n``.
    """
    probability, labelled, spacing = _check_inputs(probability, labels, threshold, spacing)
    connectivity = resolve_connectivity(probability.ndim, connectivity)
    components, n = label_lesions(probability >= threshold, connectivity)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    peak = np.asarray(ndimage.maximum(probability, components, index), dtype=float)
    mean = np.asarray(ndimage.mean(probability, components, index), dtype=float)
    centroids = np.asarray(ndimage.center_of_mass(np.ones(probability.shape), components, index))
    affine = default_affine(spacing) if affine is None else np.asarray(affine, dtype=float)
    world = voxel_to_world(affine, centroids.reshape(n, probability.ndim))
    touches = touching_components(components, n, labelled, connectivity)
    distance = distances_to_labels(components, n, labelled, spacing)
    voxel_volume = float(np.prod(spacing))
    candidates = []
    for number, box in enumerate(ndimage.find_objects(components, max_label=n), start=1):
        i = number - 1
        candidates.append(
            Candidate(
                case_id=str(case_id),
                number=number,
                voxels=int(counts[i]),
                volume_mm3=float(counts[i]) * voxel_volume,
                centroid_voxel=tuple(float(c) for c in centroids.reshape(n, -1)[i]),
                centroid_world=tuple(float(w) for w in world[i]),  # type: ignore[arg-type]
                max_probability=float(peak[i]),
                mean_probability=float(mean[i]),
                distance_mm=float(distance[i]),
                touches_label=bool(touches[i]),
                bbox=tuple((int(s.start), int(s.stop)) for s in box),
                mask=components[box] == number,
            )
        )
    return candidates


def suspected_missed(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates that neither overlap nor touch a labelled lesion."""
    return [c for c in candidates if c.suspected_missed]


def ranking_key(candidate: Candidate) -> tuple[float, float, float, str, int]:
    """Sort key of the review list: score, then volume, then distance (all descending), then
    case id and candidate number (ascending). See the module docstring for why."""
    return (
        -candidate.max_probability,
        -candidate.volume_mm3,
        -candidate.distance_mm,
        candidate.case_id,
        candidate.number,
    )


def rank_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates in review order (:func:`ranking_key`)."""
    return sorted(candidates, key=ranking_key)


def add_candidates(labels: np.ndarray, candidates: Iterable[Candidate]) -> np.ndarray:
    """``labels`` with the voxels of ``candidates`` set to 1 (uint8 copy; ``labels`` untouched)."""
    out = (np.asarray(labels) != 0).astype(np.uint8)
    for candidate in candidates:
        if any(stop > size for (_, stop), size in zip(candidate.bbox, out.shape)):
            raise ValueError(f"candidate {candidate.candidate_id} lies outside {out.shape}")
        out[candidate.slices][candidate.mask] = 1
    return out


# ------------------------------------------------------------------- known missed lesions
@dataclass(frozen=True)
class HiddenLesion:
    """A truth lesion that the audited label set leaves out (known on phantoms).

    Attributes:
        case_id: the case.
        number: component number of the lesion in the truth mask (raster order).
        voxels: voxel count.
        volume_mm3: physical volume (mm³; mm² in 2D).
        diameter_mm: diameter of the sphere (3D) or disc (2D) of that volume.
        hit_by: ids of the given candidates that hit it (see :func:`hidden_lesions`).
    """

    case_id: str
    number: int
    voxels: int
    volume_mm3: float
    diameter_mm: float
    hit_by: tuple[str, ...]


def hidden_lesions(
    truth: np.ndarray,
    labels: np.ndarray,
    candidates: Sequence[Candidate],
    *,
    case_id: str,
    spacing: Sequence[float] | None = None,
    connectivity: int | None = None,
    min_iou: float = 0.1,
    min_inside: float | None = 0.5,
) -> list[HiddenLesion]:
    """The truth lesions of one case that ``labels`` leaves out, with the candidates hitting them.

    A truth lesion (connected component of ``truth``) is *hidden* when it shares no voxel with
    ``labels``. A candidate hits it when they share a voxel and either their IoU is
    ``≥ min_iou`` (the detection rule of :mod:`noisyseg.metrics`) or at least ``min_inside`` of
    the candidate's voxels lie in the lesion. The second rule is the reviewer's view: a candidate
    lying mostly inside a lesion shows that lesion in its picture, even when it is a small
    fragment of a large lesion (IoU far below 0.1); a diffuse blob spread over several lesions
    still hits none of them. ``min_inside=None`` keeps the IoU rule alone.

    Args:
        truth, labels: ``(*S)`` masks (non-zero = lesion).
        candidates: this case's candidates (e.g. the suspected ones).
        case_id, spacing, connectivity: as in :func:`extract_candidates`.
        min_iou: minimum intersection over union for a hit.
        min_inside: minimum share of the candidate inside the lesion for a hit (or ``None``).
    """
    truth = np.asarray(truth) != 0
    labelled = np.asarray(labels) != 0
    if truth.shape != labelled.shape:
        raise ValueError(f"truth {truth.shape} and labels {labelled.shape} differ")
    spacing = tuple(1.0 for _ in truth.shape) if spacing is None else tuple(spacing)
    components, n = label_lesions(truth, resolve_connectivity(truth.ndim, connectivity))
    if n == 0:
        return []
    counts = np.bincount(components.ravel(), minlength=n + 1)
    kept = np.zeros(n + 1, dtype=bool)
    kept[np.unique(components[labelled])] = True
    voxel_volume = float(np.prod(spacing))
    hits: dict[int, list[str]] = {}
    for candidate in candidates:
        if candidate.case_id != case_id:
            raise ValueError(f"candidate {candidate.candidate_id} is not of case {case_id}")
        inside = components[candidate.slices][candidate.mask]
        numbers, overlap = np.unique(inside[inside > 0], return_counts=True)
        for number, inter in zip(numbers.tolist(), overlap.tolist(), strict=True):
            iou = inter / (candidate.voxels + counts[number] - inter)
            inside_share = inter / candidate.voxels
            if iou >= min_iou or (min_inside is not None and inside_share >= min_inside):
                hits.setdefault(number, []).append(candidate.candidate_id)
    return [
        HiddenLesion(
            case_id=str(case_id),
            number=number,
            voxels=int(counts[number]),
            volume_mm3=float(counts[number]) * voxel_volume,
            diameter_mm=equivalent_diameter_mm(float(counts[number]) * voxel_volume, truth.ndim),
            hit_by=tuple(hits.get(number, ())),
        )
        for number in range(1, n + 1)
        if not kept[number]
    ]


def found_ranks(lesions: Sequence[HiddenLesion], ranked_ids: Sequence[str]) -> np.ndarray:
    """Per lesion, the 1-based list position of the first candidate hitting it (``inf``: none).

    Args:
        lesions: hidden lesions with their hitting candidate ids.
        ranked_ids: the review list, best first.
    """
    position = {cid: i + 1 for i, cid in enumerate(ranked_ids)}
    ranks = np.full(len(lesions), np.inf)
    for i, lesion in enumerate(lesions):
        found = [position[c] for c in lesion.hit_by if c in position]
        if found:
            ranks[i] = min(found)
    return ranks


def found_within(ranks: np.ndarray, length: int) -> int:
    """How many lesions a reviewer finds reading the top ``length`` entries of the list."""
    return int(np.count_nonzero(np.asarray(ranks) <= length))
