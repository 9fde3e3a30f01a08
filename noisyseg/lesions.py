"""Lesions: connected components of a binary mask, one record format, one censor selection.

Pure NumPy/cc3d. The one place that decides what a lesion is, used by :mod:`noisyseg.noise`
(censoring, boundary noise), :mod:`noisyseg.metrics` (detection) and the store's lesion table.

* **Masks** are binary arrays ``(H, W)`` (2D) or ``(D, H, W)`` (3D), values in ``{0, 1}`` (bool,
  integer, or float arrays holding only 0 and 1): :func:`check_binary_mask`.
* **Lesions** are connected components (:func:`label_lesions`, ``cc3d.connected_components``):
  26-connectivity in 3D and 8 in 2D by default, 6/18 (3D) or 4 (2D) on request. Component ids run
  ``1..n`` in raster order of each component's first voxel.
* **Spacing** is the voxel size in mm per array axis (:func:`check_spacing`,
  :func:`resolve_spacings`); volume = voxel count × prod(spacing), in mm³ (an area in mm² for 2D).
* **Records**: one :class:`LesionRecord` per component (:func:`lesion_records`) — id, voxel
  count, volume, equivalent diameter, centroid, bounding box. :meth:`LesionRecord.table_row` is
  the store's lesion-table row (``lesion_id``, ``voxels``, ``volume_mm3``, ``centroid_<axis>``,
  ``bbox_min_<axis>``, ``bbox_max_<axis>``, ``status``); :func:`lesion_table_rows` does it for a
  whole mask.
* **Censor selection** (:func:`censor_positions`): which ``n = count_to_select(r, K)`` of ``K``
  lesions a censoring rate ``r`` removes — uniformly at random, or the smallest physical volumes
  with a seeded tie-break. :func:`noisyseg.noise.censor_lesions` (on masks) and the store's
  table-only censoring both call it, so the two agree by construction.

User input (masks, spacings, connectivity a user typed) fails with
:class:`~noisyseg.errors.NoisysegInputError`; :func:`censor_positions` is called with validated
values and raises ``ValueError`` for a programming error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import cc3d
import numpy as np

from noisyseg.errors import NoisysegInputError

CensorMode = Literal["random", "size"]
CENSOR_MODES: tuple[str, ...] = ("random", "size")
DEFAULT_CONNECTIVITY: dict[int, int] = {2: 8, 3: 26}
ALLOWED_CONNECTIVITY: dict[int, tuple[int, ...]] = {2: (4, 8), 3: (6, 18, 26)}
#: Axis names of the store's lesion-table columns, per number of spatial axes.
AXES: dict[int, tuple[str, ...]] = {2: ("y", "x"), 3: ("z", "y", "x")}


# ----------------------------------------------------------------------------------- checks
def check_binary_mask(mask: Any, case: int | str, what: str = "mask") -> np.ndarray:
    """``mask`` as an ndarray after checking it is 2D/3D, numeric, finite and only 0/1.

    Raises:
        NoisysegInputError: naming ``case`` and the rule broken.
    """
    array = np.asarray(mask)
    if array.ndim not in (2, 3):
        raise NoisysegInputError(
            f"{what} must be 2D or 3D, got shape {array.shape}", case=str(case)
        )
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise NoisysegInputError(f"{what} must be numeric, got dtype {array.dtype}", case=str(case))
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise NoisysegInputError(f"{what} has NaN or Inf voxels", case=str(case))
    bad = (array != 0) & (array != 1)
    if bad.any():
        values = np.unique(array[bad])[:5]
        shown = ", ".join(f"{v:g}" for v in values)
        raise NoisysegInputError(
            f"{what} is not binary: values must be 0 or 1 (found {shown})", case=str(case)
        )
    return array


def resolve_connectivity(ndim: int, connectivity: int | None, case: int | str | None = None) -> int:
    """Default 8 (2D) / 26 (3D); NoisysegInputError if ``connectivity`` is not allowed in
    ``ndim`` dimensions (4/8 in 2D, 6/18/26 in 3D)."""
    if ndim not in DEFAULT_CONNECTIVITY:
        raise NoisysegInputError(
            f"lesions are defined in 2D or 3D, got {ndim}D",
            case=None if case is None else str(case),
        )
    if connectivity is None:
        return DEFAULT_CONNECTIVITY[ndim]
    if connectivity not in ALLOWED_CONNECTIVITY[ndim]:
        raise NoisysegInputError(
            f"connectivity {connectivity} is not valid in {ndim}D "
            f"(use one of {ALLOWED_CONNECTIVITY[ndim]})",
            case=None if case is None else str(case),
        )
    return int(connectivity)


def check_spacing(spacing: Any, ndim: int, case: int | str | None = None) -> tuple[float, ...]:
    """``spacing`` (mm per axis) as a tuple of ``ndim`` finite positive floats.

    Raises:
        NoisysegInputError: wrong number of axes, or a value not finite and > 0.
    """
    where = None if case is None else str(case)
    try:
        values = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    except (TypeError, ValueError):
        raise NoisysegInputError(f"spacing must be numbers, got {spacing!r}", case=where) from None
    if len(values) != ndim:
        raise NoisysegInputError(
            f"spacing {values} has {len(values)} axes but the array is {ndim}D", case=where
        )
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise NoisysegInputError(f"spacing must be finite and > 0, got {values}", case=where)
    return values


def resolve_spacings(spacings: Any, shapes: Sequence[tuple[int, ...]]) -> list[tuple[float, ...]]:
    """Per-case spacing tuples (mm): ``None`` → ones; one tuple → every case; or one per case."""
    if spacings is None:
        return [tuple(1.0 for _ in shape) for shape in shapes]
    seq = list(spacings)
    if seq and all(np.isscalar(s) for s in seq):  # one spacing for every case
        seq = [tuple(seq)] * len(shapes)
    if len(seq) != len(shapes):
        raise NoisysegInputError(f"got {len(seq)} spacings for {len(shapes)} cases")
    return [
        check_spacing(spacing, len(shape), case=i)
        for i, (spacing, shape) in enumerate(zip(seq, shapes, strict=True))
    ]


# ---------------------------------------------------------------------------------- components
def label_lesions(mask: Any, connectivity: int | None = None) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask.

    Args:
        mask: binary array ``(H, W)`` or ``(D, H, W)`` (any non-zero voxel is lesion).
        connectivity: 4/8 (2D) or 6/18/26 (3D); ``None`` → 8 / 26.

    Returns:
        ``(labels, n)``: integer array shaped like ``mask`` (0 background, lesions ``1..n`` in
        raster order of their first voxel) and the number of lesions.
    """
    mask = np.asarray(mask)
    conn = resolve_connectivity(mask.ndim, connectivity)
    # uint8, not bool: cc3d mislabels boolean input with a size-1 axis (seen with cc3d 4.1).
    labels, n = cc3d.connected_components(
        np.ascontiguousarray(mask != 0, dtype=np.uint8), connectivity=conn, return_N=True
    )
    return labels, int(n)


def equivalent_diameter_mm(volume_mm3: float, ndim: int) -> float:
    """Diameter (mm) of the sphere (3D) or disc (2D) with the lesion's volume (area in 2D).

    3D: ``(6 V / π)^(1/3)``; 2D: ``(4 A / π)^(1/2)``.
    """
    if ndim == 3:
        return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)
    return math.sqrt(4.0 * volume_mm3 / math.pi)


@dataclass(frozen=True)
class LesionRecord:
    """One lesion (a connected component) of one case.

    Attributes:
        case: index of the case in the caller's list (0 for a single mask).
        label: component id in the labelled mask (:func:`label_lesions`, from 1); the store's
            ``lesion_id``.
        voxels: voxel count.
        volume_mm3: voxels × prod(spacing), mm³ (mm² in 2D).
        centroid: mean voxel index per axis (array order, voxel units).
        bbox: per axis ``(start, stop)`` voxel indices, stop exclusive.
        equivalent_diameter_mm: :func:`equivalent_diameter_mm` of ``volume_mm3``.
    """

    case: int
    label: int
    voxels: int
    volume_mm3: float
    centroid: tuple[float, ...]
    bbox: tuple[tuple[int, int], ...]
    equivalent_diameter_mm: float

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-friendly dict (tuples become lists)."""
        out = asdict(self)
        out["centroid"] = list(self.centroid)
        out["bbox"] = [list(b) for b in self.bbox]
        return out

    def table_row(self, status: str = "present") -> dict[str, Any]:
        """The store's lesion-table row: ``lesion_id``, ``voxels``, ``volume_mm3``,
        ``centroid_<axis>``, ``bbox_min_<axis>``, ``bbox_max_<axis>`` (max exclusive),
        ``status`` — axes ``z, y, x`` (3D) or ``y, x`` (2D)."""
        axes = AXES[len(self.bbox)]
        row: dict[str, Any] = {
            "lesion_id": self.label,
            "voxels": self.voxels,
            "volume_mm3": self.volume_mm3,
        }
        row.update({f"centroid_{a}": c for a, c in zip(axes, self.centroid, strict=True)})
        row.update({f"bbox_min_{a}": b[0] for a, b in zip(axes, self.bbox, strict=True)})
        row.update({f"bbox_max_{a}": b[1] for a, b in zip(axes, self.bbox, strict=True)})
        row["status"] = status
        return row


def lesion_records(
    labels: np.ndarray, n: int, *, case: int = 0, spacing: Sequence[float] | None = None
) -> list[LesionRecord]:
    """One :class:`LesionRecord` per label ``1..n`` of a labelled array (``cc3d.statistics``).

    Args:
        labels: ``(H, W)`` or ``(D, H, W)`` integer array from :func:`label_lesions`.
        n: number of lesions in ``labels``.
        case: case index stored in each record.
        spacing: voxel spacing (mm), validated by the caller; ``None`` → 1 mm.
    """
    if n == 0:
        return []
    spacing = tuple(1.0 for _ in labels.shape) if spacing is None else tuple(spacing)
    voxel_volume = float(np.prod(spacing))
    stats = cc3d.statistics(np.ascontiguousarray(labels))
    records = []
    for lab in range(1, n + 1):
        count = int(stats["voxel_counts"][lab])
        volume = count * voxel_volume
        records.append(
            LesionRecord(
                case=case,
                label=lab,
                voxels=count,
                volume_mm3=volume,
                centroid=tuple(float(c) for c in stats["centroids"][lab]),
                bbox=tuple((int(s.start), int(s.stop)) for s in stats["bounding_boxes"][lab]),
                equivalent_diameter_mm=equivalent_diameter_mm(volume, labels.ndim),
            )
        )
    return records


def lesion_table_rows(
    mask: Any,
    spacing: Sequence[float],
    *,
    connectivity: int | None = None,
    status: str = "present",
) -> list[dict[str, Any]]:
    """Lesion-table rows of a binary mask: :meth:`LesionRecord.table_row` per component.

    Args:
        mask: ``(*S)`` binary array, S = (Z, Y, X) or (Y, X).
        spacing: voxel spacing in mm, same axis order.
        connectivity: 26 (3D) / 8 (2D) by default; 6/18 or 4 allowed.
        status: value of the ``status`` column.
    """
    labels, n = label_lesions(mask, connectivity)
    return [r.table_row(status) for r in lesion_records(labels, n, spacing=spacing)]


# ---------------------------------------------------------------------------------- censoring
def count_to_select(rate: float, n_lesions: int) -> int:
    """``floor(rate·n_lesions + 1/2)`` (round half up, with 1e-9 slack), clipped to ``[0, n]``.

    Round half *up*: ``r = 0.5`` of 3 lesions selects 2, of 5 selects 3 (Python's banker's
    ``round()`` would select 2 of both). The slack absorbs binary error (``0.15·10`` → 2).
    """
    n = math.floor(rate * n_lesions + 0.5 + 1e-9)
    return int(min(max(n, 0), n_lesions))


def censor_positions(
    volumes: np.ndarray, rate: float, mode: str, rng: np.random.Generator
) -> np.ndarray:
    """Positions (sorted, int64) of the lesions a censoring rate removes among ``K`` lesions.

    ``n = count_to_select(rate, K)``; ``mode="random"``: ``rng.choice(K, n, replace=False)``;
    ``mode="size"``: the ``n`` smallest ``volumes`` (mm³), equal volumes ordered by a key
    ``rng.random(K)``. No generator call when ``n = 0``. Vectorised: 10⁶ lesions take well
    under a second.

    Args:
        volumes: ``(K,)`` physical lesion volumes in the caller's lesion order.
        rate: censoring rate in ``[0, 1]`` (validated by the caller).
        mode: ``"random"`` or ``"size"``.
        rng: the generator, consumed as described.
    """
    if mode not in CENSOR_MODES:
        raise ValueError(f"censoring mode must be one of {CENSOR_MODES}, got {mode!r}")
    volumes = np.asarray(volumes, dtype=np.float64)
    n = count_to_select(rate, volumes.size)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if mode == "random":
        chosen = rng.choice(volumes.size, size=n, replace=False)
    else:
        tiebreak = rng.random(volumes.size)
        chosen = np.lexsort((tiebreak, volumes))[:n]
    return np.sort(np.asarray(chosen, dtype=np.int64))


__all__ = [
    "ALLOWED_CONNECTIVITY",
    "AXES",
    "CENSOR_MODES",
    "DEFAULT_CONNECTIVITY",
    "LesionRecord",
    "censor_positions",
    "check_binary_mask",
    "check_spacing",
    "count_to_select",
    "equivalent_diameter_mm",
    "label_lesions",
    "lesion_records",
    "lesion_table_rows",
    "resolve_connectivity",
    "resolve_spacings",
]
