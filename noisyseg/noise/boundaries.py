"""Boundary noise: coarse outlines of a fraction of the lesions, one lesion at a time.

:func:`corrupt_boundaries` changes the outline of a fraction ``rate`` (default 1, every lesion;
selected exactly like random censoring, dataset scope) of the lesions; the noisy mask is the union
of all (changed and unchanged) lesions, so a grown lesion may merge with a neighbour. Per-lesion
random parameters come from ``np.random.default_rng([seed, 1, case, label])``: they do not depend
on which other lesions exist. The modes are described in :mod:`noisyseg.noise.outlines`, their
named levels in :mod:`noisyseg.noise.params`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import LesionRecord
from noisyseg.noise.censoring import labelled_cases, select_records
from noisyseg.noise.outlines import (
    dilate_erode_lesion,
    ellipsoid_region,
    jitter_region,
    lesion_hull,
    lesion_polygon,
    padded_box,
)
from noisyseg.noise.params import check_rate, resolve_boundary_params


@dataclass(frozen=True)
class BoundaryChange(LesionRecord):
    """What boundary noise did to one lesion: the original lesion's record plus the change.

    Attributes:
        case, label, voxels, volume_mm3, centroid, bbox, equivalent_diameter_mm: the original
            lesion (inherited from :class:`~noisyseg.lesions.LesionRecord`).
        mode: the boundary mode applied (``dilate_erode`` records the drawn op in ``params``).
        voxels_after: voxel count of the noisy lesion.
        voxels_added: voxels in the noisy lesion but not in the original lesion.
        voxels_removed: voxels of the original lesion not in the noisy lesion.
        dice: ``2|A∩B| / (|A| + |B|)`` of noisy (A) vs original (B) lesion.
        params: the concrete parameters used (level parameters plus per-lesion draws, e.g.
            ``op``, ``shift_vox``, ``rotation_deg``, ``scale``, ``n_vertices_in/out``,
            ``fallback`` when the lesion kept its outline).
    """

    mode: str
    voxels_after: int
    voxels_added: int
    voxels_removed: int
    dice: float
    params: dict[str, Any] = field(default_factory=dict)


def corrupt_boundaries(
    masks: Sequence[Any],
    mode: str,
    *,
    level: str | None = "moderate",
    params: Mapping[str, Any] | None = None,
    rate: float = 1.0,
    seed: int = 0,
    spacings: Any = None,
    connectivity: int | None = None,
) -> tuple[list[np.ndarray], list[BoundaryChange]]:
    """Coarsen lesion outlines (see :mod:`noisyseg.noise.outlines` for each mode,
    :mod:`noisyseg.noise.params` for the levels).

    Args:
        masks: per-case binary arrays ``(H, W)`` or ``(D, H, W)``.
        mode: one of :data:`BOUNDARY_MODES`.
        level: ``"mild" | "moderate" | "severe"`` (:data:`BOUNDARY_LEVELS`); ignored when
            ``params`` is given.
        params: explicit parameters (``n_vertices``; ``k``; ``max_shift_vox``,
            ``max_rotation_deg``, ``max_scale``) instead of a level.
        rate: fraction of lesions changed, ``floor(rate·K + 1/2)`` chosen uniformly at random
            over all cases (``np.random.default_rng(seed)``); default all.
        seed: seed; same inputs and seed → same output.
        spacings: ``None``, one spacing tuple (mm) for all cases, or one per case (used for
            volumes, the ellipsoid metric and jitter rotations).
        connectivity: lesion connectivity, as in :func:`censor_lesions`.

    Returns:
        ``(noisy, changes)``: new arrays (same shapes and dtypes) and one
        :class:`BoundaryChange` per selected lesion, ordered by case then label.
    """
    rate = check_rate(rate)
    resolved = resolve_boundary_params(mode, level, params)
    arrays, space, labelled, tables = labelled_cases(masks, spacings, connectivity)
    pooled = [r for t in tables for r in t]
    chosen = {
        (r.case, r.label)
        for r in select_records(pooled, rate, "random", np.random.default_rng(seed))
    }

    noisy: list[np.ndarray] = []
    changes: list[BoundaryChange] = []
    for i, array in enumerate(arrays):
        out, case_changes = _corrupt_case(
            array, labelled[i][0], tables[i], i, chosen, mode, resolved, seed, space[i]
        )
        noisy.append(out)
        changes.extend(case_changes)
    return noisy, changes


def _corrupt_case(
    array: np.ndarray,
    labels: np.ndarray,
    records: list[LesionRecord],
    case: int,
    chosen: set[tuple[int, int]],
    mode: str,
    resolved: dict[str, Any],
    seed: int,
    spacing: tuple[float, ...],
) -> tuple[np.ndarray, list[BoundaryChange]]:
    """One case's noisy mask (``array``'s shape and dtype) and the changes of its lesions.

    ``labels`` is the case's component map, ``records`` its lesions; the lesions whose
    ``(case, label)`` is in ``chosen`` get a new outline, the others are copied unchanged.
    """
    out = np.zeros(array.shape, dtype=bool)
    changes: list[BoundaryChange] = []
    for record in records:
        lab = record.label
        if (case, lab) not in chosen:
            box = padded_box(record.bbox, 0, array.shape)
            out[box] |= labels[box] == lab
            continue
        rng = np.random.default_rng([seed, 1, case, lab])
        region, new, drawn = _new_outline(labels, record, mode, resolved, rng, spacing)
        original = labels[region] == lab
        if not new.any():  # never let boundary noise censor a lesion
            new, drawn = original.copy(), {**drawn, "fallback": 1}
        out[region] |= new
        changes.append(_change(record, mode, new, original, {**resolved, **drawn}))
    return out.astype(array.dtype), changes


def _new_outline(
    labels: np.ndarray,
    record: LesionRecord,
    mode: str,
    resolved: dict[str, Any],
    rng: np.random.Generator,
    spacing: tuple[float, ...],
) -> tuple[tuple[slice, ...], np.ndarray, dict[str, Any]]:
    """The new outline of lesion ``record`` by ``mode``: ``(region, new lesion over the region
    (bool), values drawn)``; ``spacing`` in mm."""
    lab = record.label
    if mode == "ellipsoid":
        coords = np.argwhere(labels[padded_box(record.bbox, 0, labels.shape)] == lab)
        coords = coords + np.array([a for a, _ in record.bbox])
        return ellipsoid_region(coords, spacing, labels.shape)
    if mode == "jitter":
        return jitter_region(labels, lab, record, resolved, rng, spacing)
    # erosion needs the margin too: border_value=1 makes the crop edge count as lesion
    region = padded_box(record.bbox, resolved.get("k", 0), labels.shape)
    lesion = labels[region] == lab
    if mode == "polygon":
        new, drawn = lesion_polygon(lesion, resolved, rng)
    elif mode == "hull":
        new, drawn = lesion_hull(lesion)
    else:
        op = mode if mode != "dilate_erode" else ("dilate" if rng.random() < 0.5 else "erode")
        new, drawn = dilate_erode_lesion(lesion, resolved["k"], op), {"op": op}
    return region, new, drawn


def _change(
    record: LesionRecord,
    mode: str,
    new: np.ndarray,
    original: np.ndarray,
    params: dict[str, Any],
) -> BoundaryChange:
    """What the new outline ``new`` did to lesion ``record`` (``original``, same region)."""
    both = int(np.count_nonzero(new & original))
    n_new = int(np.count_nonzero(new))
    return BoundaryChange(
        **asdict(record),
        mode=mode,
        voxels_after=n_new,
        voxels_added=n_new - both,
        voxels_removed=record.voxels - both,
        dice=2.0 * both / (n_new + record.voxels),
        params=params,
    )


def coarsen_polygon(
    mask: Any, n_vertices: int, seed: int = 0, **kwargs: Any
) -> tuple[np.ndarray, list[BoundaryChange]]:
    """Polygon coarsening of every lesion of one mask (2D; 3D slice-wise along axis 0)."""
    out, changes = corrupt_boundaries(
        [mask], "polygon", params={"n_vertices": n_vertices}, seed=seed, **kwargs
    )
    return out[0], changes


def convex_hull(mask: Any, seed: int = 0, **kwargs: Any) -> tuple[np.ndarray, list[BoundaryChange]]:
    """Replace every lesion of one mask by its convex hull."""
    out, changes = corrupt_boundaries([mask], "hull", params={}, seed=seed, **kwargs)
    return out[0], changes


def bounding_ellipsoid(
    mask: Any, seed: int = 0, **kwargs: Any
) -> tuple[np.ndarray, list[BoundaryChange]]:
    """Replace every lesion of one mask by its enclosing principal-axis ellipsoid."""
    out, changes = corrupt_boundaries([mask], "ellipsoid", params={}, seed=seed, **kwargs)
    return out[0], changes


def dilate_erode(
    mask: Any,
    k: int,
    mode: Literal["dilate", "erode", "random"] = "random",
    seed: int = 0,
    **kwargs: Any,
) -> tuple[np.ndarray, list[BoundaryChange]]:
    """Dilate, erode, or (``"random"``) per lesion either, by a ball of radius ``k`` voxels."""
    name = {"dilate": "dilate", "erode": "erode", "random": "dilate_erode"}.get(mode)
    if name is None:
        raise NoisysegInputError(f"mode must be 'dilate', 'erode' or 'random', got {mode!r}")
    out, changes = corrupt_boundaries([mask], name, params={"k": k}, seed=seed, **kwargs)
    return out[0], changes


def affine_jitter(
    mask: Any,
    max_shift_vox: float,
    max_rotation_deg: float,
    max_scale: float,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[np.ndarray, list[BoundaryChange]]:
    """Random per-lesion affine jitter about each lesion's centroid (order-0 resampling)."""
    params = {
        "max_shift_vox": max_shift_vox,
        "max_rotation_deg": max_rotation_deg,
        "max_scale": max_scale,
    }
    out, changes = corrupt_boundaries([mask], "jitter", params=params, seed=seed, **kwargs)
    return out[0], changes


__all__ = [
    "BoundaryChange",
    "affine_jitter",
    "bounding_ellipsoid",
    "coarsen_polygon",
    "convex_hull",
    "corrupt_boundaries",
    "dilate_erode",
]
