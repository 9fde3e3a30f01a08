"""Label-noise simulation: lesion censoring (missed lesions) and boundary noise (coarse outlines).

Pure NumPy/SciPy/scikit-image/cc3d; deterministic given ``seed``; inputs are never modified.

Masks are lists of per-case binary arrays shaped ``(H, W)`` (2D) or ``(D, H, W)`` (3D) with values
in ``{0, 1}`` (bool, integer, or float arrays holding only 0 and 1; torch tensors may be passed
through ``np.asarray`` by the caller). Outputs keep each input's shape and dtype. ``spacings`` is
``None`` (1 mm isotropic), one per-axis spacing tuple in mm used for every case, or a list with
one tuple per case; physical lesion volume = voxel count × prod(spacing), in mm³.

**Lesions**, their records, the mask/spacing checks and the censor selection are those of
:mod:`noisyseg.lesions`: connected components (26-connectivity in 3D, 8 in 2D by default;
``connectivity`` may be 6/18/26 in 3D, 4/8 in 2D). A lesion's ``label`` is the component id that
:func:`~noisyseg.lesions.label_lesions` (raster order, from 1) gives it in the *input* mask of
its case.

**How many.** A rate ``r`` over ``K`` lesions selects ``n = floor(r·K + 1/2)`` of them: round half
*up* (:func:`~noisyseg.lesions.count_to_select`; ``r = 0.5`` of 3 lesions selects 2, of 5 selects
3). ``r = 0`` selects none, ``r = 1`` selects all.

Censoring (:func:`censor_lesions`, selection by :func:`~noisyseg.lesions.censor_positions`),
DESIGN.md "Label noise":

* ``mode="random"``: ``n`` lesions uniformly at random without replacement.
* ``mode="size"``: the ``n`` lesions of smallest physical volume; equal volumes are ordered by a
  seeded random key.
* ``scope="dataset"``: ``K`` counts the lesions of all cases together and one generator
  ``np.random.default_rng(seed)`` draws over that pooled list (ordered by case, then label).
  ``scope="case"``: ``K`` and ``n`` are per case, drawn with ``np.random.default_rng([seed, i])``
  for case index ``i``, so a case's result does not depend on the other cases.

Boundary noise (:func:`corrupt_boundaries`) changes the outline of a fraction ``rate`` (default 1,
every lesion; selected exactly like random censoring, dataset scope) of the lesions, one lesion at
a time; the noisy mask is the union of all (changed and unchanged) lesions, so a grown lesion may
merge with a neighbour. Per-lesion random parameters come from
``np.random.default_rng([seed, 1, case, label])``: they do not depend on which other lesions exist.

================  ==========================================================================
mode              what happens to one lesion
================  ==========================================================================
``polygon``       2D: its outer contour (``skimage.measure.find_contours`` at 0.5) is reduced to
                  ``n_vertices`` contour points at equal arc-length spacing from a seeded random
                  start, and the polygon is filled (``skimage.draw.polygon``); holes are filled.
                  3D: the same, slice by slice along axis 0 (each 8-connected piece of each
                  slice), as an annotator drawing polygons on axial slices would. Pieces whose
                  polygon would be empty (one-voxel-wide lines) keep their outline.
``hull``          its convex hull (``skimage.morphology.convex_hull_image``: the voxels whose
                  centres lie in the hull of the lesion's voxel-face midpoints; an L of two
                  5-pixel arms becomes the 15-pixel triangle). Flat lesions are hulled in
                  their plane.
``ellipsoid``     its bounding ellipsoid: centred on the centroid, axes along the principal axes
                  of the voxel-centre covariance (physical units, plus ``spacing²/12`` per axis
                  so one-voxel-thick lesions are not degenerate), scaled so every voxel centre of
                  the lesion lies inside; the voxels whose centres lie inside are set.
``dilate``        binary dilation by a ball of radius ``k`` voxels (offsets with
                  ``Σ offset² ≤ k²``).
``erode``         binary erosion by the same ball (outside the image counts as lesion, so the
                  field-of-view edge is not eroded). A lesion is never erased: if nothing
                  survives, its deepest voxel (largest Euclidean distance to the background) is
                  kept.
``dilate_erode``  per lesion, dilate or erode by ``k`` with probability 1/2 each.
``jitter``        an affine map about the lesion's centroid, in physical space: rotation by an
                  angle uniform in ``±max_rotation_deg`` (2D; 3D: about each axis in turn),
                  isotropic scale uniform in ``[1 - max_scale, 1 + max_scale]``, then a shift
                  uniform in ``±max_shift_vox`` voxels per axis; nearest-neighbour resampling
                  (``scipy.ndimage.affine_transform``, ``order=0``). A lesion that would vanish
                  keeps its outline.
================  ==========================================================================

Named levels (:data:`BOUNDARY_LEVELS`), concrete parameters:

=================  ================  ===================  ================
mode               ``mild``          ``moderate``         ``severe``
=================  ================  ===================  ================
``polygon``        n_vertices = 16   n_vertices = 8       n_vertices = 5
``dilate``         k = 1             k = 2                k = 3
``erode``          k = 1             k = 2                k = 3
``dilate_erode``   k = 1             k = 2                k = 3
``jitter``         shift 1 vox,      shift 2 vox,         shift 3 vox,
                   rot 5°, scale 5%  rot 10°, scale 10%   rot 20°, scale 20%
``hull``           (no parameters)
``ellipsoid``      (no parameters)
=================  ================  ===================  ================

:func:`apply_noise` is the single entry point for ``noisyseg corrupt --mode M --rate R``: modes
``random``/``size`` censor, the rest corrupt boundaries.

Every call returns what it changed: :class:`LesionRecord` per removed lesion, or
:class:`BoundaryChange` per changed lesion (voxels added/removed, Dice of noisy vs original).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cc3d
import numpy as np
from scipy import ndimage

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import (
    CENSOR_MODES,
    CensorMode,
    LesionRecord,
    censor_positions,
    check_binary_mask,
    label_lesions,
    lesion_records,
    resolve_connectivity,
    resolve_spacings,
)

Scope = Literal["dataset", "case"]
BOUNDARY_MODES: tuple[str, ...] = (
    "polygon",
    "hull",
    "ellipsoid",
    "dilate",
    "erode",
    "dilate_erode",
    "jitter",
)
NOISE_MODES: tuple[str, ...] = CENSOR_MODES + BOUNDARY_MODES
SCOPES: tuple[str, ...] = ("dataset", "case")

_RING = {"mild": 1, "moderate": 2, "severe": 3}
#: Named boundary-noise levels → concrete parameters (see the module docstring table).
BOUNDARY_LEVELS: dict[str, dict[str, dict[str, Any]]] = {
    "polygon": {
        "mild": {"n_vertices": 16},
        "moderate": {"n_vertices": 8},
        "severe": {"n_vertices": 5},
    },
    "hull": {"mild": {}, "moderate": {}, "severe": {}},
    "ellipsoid": {"mild": {}, "moderate": {}, "severe": {}},
    "dilate": {name: {"k": k} for name, k in _RING.items()},
    "erode": {name: {"k": k} for name, k in _RING.items()},
    "dilate_erode": {name: {"k": k} for name, k in _RING.items()},
    "jitter": {
        "mild": {"max_shift_vox": 1.0, "max_rotation_deg": 5.0, "max_scale": 0.05},
        "moderate": {"max_shift_vox": 2.0, "max_rotation_deg": 10.0, "max_scale": 0.10},
        "severe": {"max_shift_vox": 3.0, "max_rotation_deg": 20.0, "max_scale": 0.20},
    },
}
_PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "polygon": ("n_vertices",),
    "hull": (),
    "ellipsoid": (),
    "dilate": ("k",),
    "erode": ("k",),
    "dilate_erode": ("k",),
    "jitter": ("max_shift_vox", "max_rotation_deg", "max_scale"),
}


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class BoundaryChange:
    """What boundary noise did to one lesion.

    Attributes:
        case, label, voxels, volume_mm3, centroid, bbox, equivalent_diameter_mm: the original
            lesion (:class:`~noisyseg.lesions.LesionRecord`).
        mode: the boundary mode applied (``dilate_erode`` records the drawn op in ``params``).
        voxels_after: voxel count of the noisy lesion.
        voxels_added: voxels in the noisy lesion but not in the original lesion.
        voxels_removed: voxels of the original lesion not in the noisy lesion.
        dice: ``2|A∩B| / (|A| + |B|)`` of noisy (A) vs original (B) lesion.
        params: the concrete parameters used (level parameters plus per-lesion draws, e.g.
            ``op``, ``shift_vox``, ``rotation_deg``, ``scale``, ``n_vertices_in/out``,
            ``fallback`` when the lesion kept its outline).
    """

    case: int
    label: int
    voxels: int
    volume_mm3: float
    centroid: tuple[float, ...]
    bbox: tuple[tuple[int, int], ...]
    equivalent_diameter_mm: float
    mode: str
    voxels_after: int
    voxels_added: int
    voxels_removed: int
    dice: float
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-friendly dict (tuples become lists, ``params`` stays a dict)."""
        out = asdict(self)
        out["centroid"] = list(self.centroid)
        out["bbox"] = [list(b) for b in self.bbox]
        return out


# ----------------------------------------------------------------------------- validation helpers
def check_rate(rate: float, name: str = "rate") -> float:
    """Return ``rate`` as a float; NoisysegInputError unless it is a finite number in [0, 1]."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise NoisysegInputError(f"{name} must be a number in [0, 1], got {rate!r}") from None
    if not (0.0 <= value <= 1.0):  # NaN fails this too
        raise NoisysegInputError(f"{name} must be in [0, 1], got {rate!r}")
    return value


def _check_masks(masks: Sequence[Any]) -> list[np.ndarray]:
    if isinstance(masks, np.ndarray) or not isinstance(masks, Sequence):
        raise NoisysegInputError("masks must be a list of per-case arrays")
    return [check_binary_mask(m, i) for i, m in enumerate(masks)]


# ----------------------------------------------------------------------------- lesions
def _labelled_cases(
    masks: Sequence[Any], spacings: Any, connectivity: int | None
) -> tuple[
    list[np.ndarray],
    list[tuple[float, ...]],
    list[tuple[np.ndarray, int]],
    list[list[LesionRecord]],
]:
    """Check the per-case masks, spacings and connectivity, then label every case's lesions.

    Returns:
        ``(arrays, spacings, labelled, tables)``, one entry per case: the checked binary masks,
        the resolved spacings (mm), ``(labels, n)`` from :func:`label_lesions` and the
        :func:`lesion_records` of each case.
    """
    arrays = _check_masks(masks)
    space = resolve_spacings(spacings, [a.shape for a in arrays])
    for i, a in enumerate(arrays):
        resolve_connectivity(a.ndim, connectivity, case=i)

    labelled = [label_lesions(a, connectivity) for a in arrays]
    tables = [
        lesion_records(lab, n, case=i, spacing=space[i]) for i, (lab, n) in enumerate(labelled)
    ]
    return arrays, space, labelled, tables


def _select(
    records: list[LesionRecord], rate: float, mode: str, rng: np.random.Generator
) -> list[LesionRecord]:
    """The ``records`` a censoring ``rate`` removes (:func:`noisyseg.lesions.censor_positions`)."""
    volumes = np.array([r.volume_mm3 for r in records], dtype=np.float64)
    return [records[i] for i in censor_positions(volumes, rate, mode, rng)]


# ----------------------------------------------------------------------------- censoring
def censor_lesions(
    masks: Sequence[Any],
    rate: float,
    *,
    mode: CensorMode | str = "random",
    seed: int = 0,
    scope: Scope | str = "dataset",
    spacings: Any = None,
    connectivity: int | None = None,
) -> tuple[list[np.ndarray], list[LesionRecord]]:
    """Remove whole lesions to simulate annotations with false negatives.

    Args:
        masks: per-case binary arrays ``(H, W)`` or ``(D, H, W)``.
        rate: fraction ``r ∈ [0, 1]``; exactly ``floor(r·K + 1/2)`` lesions are removed.
        mode: ``"random"`` (uniform) or ``"size"`` (smallest physical volume first).
        seed: generator seed; same inputs and seed → same output.
        scope: ``"dataset"`` (``K`` pooled over all cases) or ``"case"`` (per case).
        spacings: ``None``, one spacing tuple (mm) for all cases, or one per case.
        connectivity: 4/8 (2D), 6/18/26 (3D); ``None`` → 8 / 26.

    Returns:
        ``(censored, removed)``: new arrays (same shapes and dtypes as the inputs) and one
        :class:`LesionRecord` per removed lesion, ordered by case then label.

    Raises:
        NoisysegInputError: non-binary mask (naming the case), rate outside [0, 1], unknown mode
            or scope, bad spacing or connectivity.
    """
    rate = check_rate(rate)
    if mode not in CENSOR_MODES:
        raise NoisysegInputError(f"censoring mode must be one of {CENSOR_MODES}, got {mode!r}")
    if scope not in SCOPES:
        raise NoisysegInputError(f"scope must be one of {SCOPES}, got {scope!r}")
    arrays, _, labelled, tables = _labelled_cases(masks, spacings, connectivity)

    if scope == "dataset":
        pooled = [r for table in tables for r in table]
        removed = _select(pooled, rate, mode, np.random.default_rng(seed))
    else:
        removed = []
        for i, table in enumerate(tables):
            rng = np.random.default_rng([seed, i])
            removed.extend(_select(table, rate, mode, rng))

    by_case: dict[int, list[int]] = {}
    for r in removed:
        by_case.setdefault(r.case, []).append(r.label)
    censored = []
    for i, a in enumerate(arrays):
        out = a.copy()
        if i in by_case:
            out[np.isin(labelled[i][0], by_case[i])] = 0
        censored.append(out)
    return censored, removed


# ----------------------------------------------------------------------------- boundary transforms
def ball(radius: int, ndim: int) -> np.ndarray:
    """Boolean ball ``(2r+1,)*ndim`` of the integer offsets with ``Σ offset² ≤ radius²``."""
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius * radius


def _padded_box(
    bbox: tuple[tuple[int, int], ...], pad: int, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    return tuple(
        slice(max(a - pad, 0), min(b + pad, n)) for (a, b), n in zip(bbox, shape, strict=True)
    )


def _polygon_2d(
    piece: np.ndarray, n_vertices: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """Fill an ``n_vertices`` polygon through the outer contour of one 2D piece.

    ``piece`` is a boolean crop with at least one background pixel of margin on every side.
    Returns ``(filled, contour vertices, polygon vertices)``; ``filled`` is empty when the polygon
    covers no pixel centre.
    """
    from skimage.draw import polygon as draw_polygon
    from skimage.measure import find_contours

    contours = find_contours(piece.astype(np.float32), 0.5)
    if not contours:
        return np.zeros_like(piece), 0, 0

    def area(c: np.ndarray) -> float:
        return 0.5 * abs(float(np.dot(c[:-1, 0], c[1:, 1]) - np.dot(c[1:, 0], c[:-1, 1])))

    contour = max(contours, key=area)  # outer boundary encloses the most area
    closed = contour if np.allclose(contour[0], contour[-1]) else np.vstack([contour, contour[:1]])
    ring = closed[:-1]
    n_in = len(ring)
    if n_in <= n_vertices:
        vertices = ring
    else:
        steps = np.linalg.norm(np.diff(closed, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(steps)])[:-1]  # arc position of each ring vertex
        total = float(steps.sum())
        targets = (
            rng.uniform(0.0, total / n_vertices) + np.arange(n_vertices) * total / n_vertices
        ) % total
        idx = np.unique(np.searchsorted(arc, targets, side="left") % n_in)
        vertices = ring[idx]
    rr, cc = draw_polygon(vertices[:, 0], vertices[:, 1], shape=piece.shape)
    filled = np.zeros_like(piece)
    filled[rr, cc] = True
    return filled, n_in, len(vertices)


def _lesion_polygon(
    lesion: np.ndarray, params: dict, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    n_vertices = int(params["n_vertices"])
    planes = [lesion] if lesion.ndim == 2 else list(lesion)
    out_planes = []
    n_in = n_out = fallbacks = 0
    for plane in planes:
        out = np.zeros_like(plane)
        pieces, n = cc3d.connected_components(
            np.ascontiguousarray(plane), connectivity=8, return_N=True
        )
        for lab in range(1, int(n) + 1):
            piece = np.pad(pieces == lab, 1)
            filled, a, b = _polygon_2d(piece, n_vertices, rng)
            if not filled.any():
                filled, fallbacks = piece, fallbacks + 1
            n_in, n_out = n_in + a, n_out + b
            out |= filled[1:-1, 1:-1]
        out_planes.append(out)
    result = out_planes[0] if lesion.ndim == 2 else np.stack(out_planes)
    return result, {"n_vertices_in": n_in, "n_vertices_out": n_out, "fallback": fallbacks}


def _lesion_hull(lesion: np.ndarray) -> tuple[np.ndarray, dict]:
    from scipy.spatial import QhullError
    from skimage.morphology import convex_hull_image

    keep = tuple(i for i, n in enumerate(lesion.shape) if n > 1)
    if len(keep) < 2:  # a line along one axis is its own hull
        return lesion.copy(), {"fallback": 0}
    squeezed = lesion.reshape([lesion.shape[i] for i in keep])
    try:
        hull = convex_hull_image(squeezed)
    except (QhullError, ValueError):  # coplanar points not aligned with an axis
        return lesion.copy(), {"fallback": 1}
    return (hull | squeezed).reshape(lesion.shape), {"fallback": 0}


def _ellipsoid_region(
    coords: np.ndarray, spacing: tuple[float, ...], shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], np.ndarray, dict]:
    """Enclosing ellipsoid of voxel centres ``coords`` ``(N, ndim)`` rasterised over its box."""
    sp = np.asarray(spacing)
    pts = coords * sp
    centre = pts.mean(axis=0)
    cov = np.cov(pts, rowvar=False, bias=True).reshape(len(sp), len(sp)) + np.diag(sp**2 / 12.0)
    inv = np.linalg.inv(cov)
    d = pts - centre
    scale2 = float(np.max(np.einsum("ni,ij,nj->n", d, inv, d)))
    half = np.sqrt(scale2 * np.diag(cov)) / sp  # extent per axis in voxels
    lo = np.maximum(np.floor(centre / sp - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre / sp + half).astype(int) + 1, shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in region], indexing="ij"), -1)
    g = grid * sp - centre
    inside = np.einsum("...i,ij,...j->...", g, inv, g) <= scale2 * (1 + 1e-9)
    radii = np.sqrt(scale2 * np.linalg.eigvalsh(cov))
    return region, inside, {"radii_mm": [float(r) for r in radii]}


def _dilate_erode(lesion: np.ndarray, k: int, op: str) -> np.ndarray:
    structure = ball(k, lesion.ndim)
    if op == "dilate":
        return ndimage.binary_dilation(lesion, structure=structure)
    eroded = ndimage.binary_erosion(lesion, structure=structure, border_value=1)
    if not eroded.any():
        depth = ndimage.distance_transform_edt(np.pad(lesion, 1))[(slice(1, -1),) * lesion.ndim]
        eroded = np.zeros_like(lesion)
        eroded[np.unravel_index(int(np.argmax(depth)), lesion.shape)] = True
    return eroded


def _rotation(ndim: int, angles_deg: np.ndarray) -> np.ndarray:
    if ndim == 2:
        a = math.radians(float(angles_deg[0]))
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rot = np.eye(3)
    for axis, angle in enumerate(angles_deg):
        a = math.radians(float(angle))
        i, j = [x for x in range(3) if x != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        rot = r @ rot
    return rot


def _jitter_region(
    labels: np.ndarray,
    lab: int,
    record: LesionRecord,
    params: dict,
    rng: np.random.Generator,
    spacing: tuple[float, ...],
) -> tuple[tuple[slice, ...], np.ndarray, dict]:
    ndim = labels.ndim
    sp = np.asarray(spacing)
    n_angles = 1 if ndim == 2 else 3
    angles = rng.uniform(-params["max_rotation_deg"], params["max_rotation_deg"], size=n_angles)
    scale = float(rng.uniform(1 - params["max_scale"], 1 + params["max_scale"]))
    shift = rng.uniform(-params["max_shift_vox"], params["max_shift_vox"], size=ndim)
    # Forward map in voxel coordinates x -> A (x - c) + c + t with A = S^-1 (s R) S (physical).
    a_vox = np.diag(1 / sp) @ (scale * _rotation(ndim, angles)) @ np.diag(sp)
    c = np.asarray(record.centroid)
    corners = (
        np.array(np.meshgrid(*[[a, b - 1] for a, b in record.bbox], indexing="ij"))
        .reshape(ndim, -1)
        .T
    )
    moved = (corners - c) @ a_vox.T + c + shift
    lo = np.minimum(np.floor(moved.min(0)) - 1, [a for a, _ in record.bbox]).astype(int)
    hi = np.maximum(np.ceil(moved.max(0)) + 2, [b for _, b in record.bbox]).astype(int)
    region = tuple(
        slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, labels.shape, strict=True)
    )
    origin = np.array([s.start for s in region], dtype=float)
    lesion = labels[region] == lab
    inv = np.linalg.inv(a_vox)
    # affine_transform maps output index o to input index inv @ o + offset (crop coordinates).
    cc = c - origin
    offset = cc - inv @ (cc + shift)
    moved_mask = ndimage.affine_transform(
        lesion.astype(np.uint8), inv, offset=offset, order=0, mode="constant", cval=0
    ).astype(bool)
    drawn = {
        "rotation_deg": [float(x) for x in angles],
        "scale": scale,
        "shift_vox": [float(x) for x in shift],
    }
    return region, moved_mask, drawn


def resolve_boundary_params(
    mode: str, level: str | None, params: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Concrete parameters of boundary ``mode``: the named ``level``'s (default ``moderate``)
    or the explicit ``params``, checked (NoisysegInputError naming the rule broken)."""
    if mode not in BOUNDARY_MODES:
        raise NoisysegInputError(f"boundary mode must be one of {BOUNDARY_MODES}, got {mode!r}")
    if params is None:
        level = "moderate" if level is None else level
        if level not in BOUNDARY_LEVELS[mode]:
            raise NoisysegInputError(
                f"level must be one of {tuple(BOUNDARY_LEVELS[mode])}, got {level!r}"
            )
        resolved = dict(BOUNDARY_LEVELS[mode][level])
    else:
        resolved = dict(params)
        missing = [p for p in _PARAM_NAMES[mode] if p not in resolved]
        if missing:
            raise NoisysegInputError(f"mode {mode!r} needs parameters {missing}")
    if "k" in resolved:
        k = resolved["k"]
        if int(k) != k or k < 0:
            raise NoisysegInputError(f"k must be a non-negative integer, got {k!r}")
        resolved["k"] = int(k)
    if "n_vertices" in resolved:
        n = resolved["n_vertices"]
        if int(n) != n or n < 3:
            raise NoisysegInputError(f"n_vertices must be an integer >= 3, got {n!r}")
        resolved["n_vertices"] = int(n)
    for name in ("max_shift_vox", "max_rotation_deg"):
        if name in resolved and not (math.isfinite(resolved[name]) and resolved[name] >= 0):
            raise NoisysegInputError(f"{name} must be finite and >= 0, got {resolved[name]!r}")
    if "max_scale" in resolved and not (0 <= resolved["max_scale"] < 1):
        raise NoisysegInputError(f"max_scale must be in [0, 1), got {resolved['max_scale']!r}")
    return resolved


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
    """Coarsen lesion outlines (see the module docstring for each mode and level).

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
    arrays, space, labelled, tables = _labelled_cases(masks, spacings, connectivity)
    pooled = [r for t in tables for r in t]
    chosen = {
        (r.case, r.label) for r in _select(pooled, rate, "random", np.random.default_rng(seed))
    }

    noisy: list[np.ndarray] = []
    changes: list[BoundaryChange] = []
    for i, array in enumerate(arrays):
        labels, _ = labelled[i]
        out = np.zeros(array.shape, dtype=bool)
        for record in tables[i]:
            lab = record.label
            if (i, lab) not in chosen:
                box = _padded_box(record.bbox, 0, array.shape)
                out[box] |= labels[box] == lab
                continue
            rng = np.random.default_rng([seed, 1, i, lab])
            drawn: dict[str, Any] = {}
            if mode == "ellipsoid":
                coords = np.argwhere(labels[_padded_box(record.bbox, 0, array.shape)] == lab)
                coords = coords + np.array([a for a, _ in record.bbox])
                region, new, drawn = _ellipsoid_region(coords, space[i], array.shape)
            elif mode == "jitter":
                region, new, drawn = _jitter_region(labels, lab, record, resolved, rng, space[i])
            else:
                # erosion needs the margin too: border_value=1 makes the crop edge count as lesion
                pad = resolved.get("k", 0)
                region = _padded_box(record.bbox, pad, array.shape)
                lesion = labels[region] == lab
                if mode == "polygon":
                    new, drawn = _lesion_polygon(lesion, resolved, rng)
                elif mode == "hull":
                    new, drawn = _lesion_hull(lesion)
                else:
                    op = (
                        mode
                        if mode != "dilate_erode"
                        else ("dilate" if rng.random() < 0.5 else "erode")
                    )
                    new = _dilate_erode(lesion, resolved["k"], op)
                    drawn = {"op": op}
            original = labels[region] == lab
            if not new.any():  # never let boundary noise censor a lesion
                new, drawn = original.copy(), {**drawn, "fallback": 1}
            out[region] |= new
            both = int(np.count_nonzero(new & original))
            n_new = int(np.count_nonzero(new))
            changes.append(
                BoundaryChange(
                    **asdict(record),
                    mode=mode,
                    voxels_after=n_new,
                    voxels_added=n_new - both,
                    voxels_removed=record.voxels - both,
                    dice=2.0 * both / (n_new + record.voxels),
                    params={**resolved, **drawn},
                )
            )
        noisy.append(out.astype(array.dtype))
    return noisy, changes


# ----------------------------------------------------------------------------- single-mask helpers
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


# ----------------------------------------------------------------------------- one entry point
@dataclass(frozen=True)
class NoiseSpec:
    """A label-noise recipe, as ``noisyseg corrupt --mode M --rate R [--level L]`` gives it.

    Attributes:
        mode: ``"random" | "size"`` (censoring) or a :data:`BOUNDARY_MODES` name.
        rate: censoring rate, or fraction of lesions whose boundary changes.
        level: boundary level name (ignored by censoring and when ``params`` is set).
        scope: censoring scope (boundary selection is always dataset-wide).
        params: explicit boundary parameters instead of ``level``.
    """

    mode: str
    rate: float = 1.0
    level: str = "moderate"
    scope: str = "dataset"
    params: Mapping[str, Any] | None = None

    def label_set_name(self, seed: int) -> str:
        """Stable label-set name, e.g. ``censor-random-0.50-s0`` or ``jitter-mild-1.00-s3``."""
        if self.mode in CENSOR_MODES:
            scope = "" if self.scope == "dataset" else "-case"
            return f"censor-{self.mode}{scope}-{self.rate:.2f}-s{seed}"
        level = "custom" if self.params is not None else self.level
        return f"{self.mode}-{level}-{self.rate:.2f}-s{seed}"


def apply_noise(
    masks: Sequence[Any],
    spec: NoiseSpec | Mapping[str, Any],
    seed: int = 0,
    *,
    spacings: Any = None,
    connectivity: int | None = None,
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Apply one noise recipe; the storage layer's single call.

    Args:
        masks: per-case binary arrays.
        spec: a :class:`NoiseSpec` or a mapping with its fields (``mode`` required). ``mode`` is
            ``random``/``size`` (censor ``rate`` of the lesions, ``scope``) or one of
            ``polygon``/``hull``/``ellipsoid``/``dilate``/``erode``/``dilate_erode``/``jitter``
            (change the outline of ``rate`` of the lesions at ``level``).
        seed: seed.

    Returns:
        ``(masks, records)``: new arrays and one flat dict per removed (``change="removed"``)
        or changed (``change=<mode>``) lesion, ready for a lesion table.
    """
    if not isinstance(spec, NoiseSpec):
        if "mode" not in spec:
            raise NoisysegInputError("noise spec needs a 'mode'")
        unknown = set(spec) - {"mode", "rate", "level", "scope", "params"}
        if unknown:
            raise NoisysegInputError(f"unknown noise spec fields {sorted(unknown)}")
        spec = NoiseSpec(**spec)
    if spec.mode not in NOISE_MODES:
        raise NoisysegInputError(f"noise mode must be one of {NOISE_MODES}, got {spec.mode!r}")
    if spec.mode in CENSOR_MODES:
        out, removed = censor_lesions(
            masks,
            spec.rate,
            mode=spec.mode,
            seed=seed,
            scope=spec.scope,
            spacings=spacings,
            connectivity=connectivity,
        )
        return out, [{**r.as_dict(), "change": "removed"} for r in removed]
    out, changes = corrupt_boundaries(
        masks,
        spec.mode,
        level=spec.level,
        params=spec.params,
        rate=spec.rate,
        seed=seed,
        spacings=spacings,
        connectivity=connectivity,
    )
    return out, [{**c.as_dict(), "change": c.mode} for c in changes]


__all__ = [
    "BOUNDARY_LEVELS",
    "BOUNDARY_MODES",
    "CENSOR_MODES",
    "NOISE_MODES",
    "SCOPES",
    "BoundaryChange",
    "NoiseSpec",
    "affine_jitter",
    "apply_noise",
    "ball",
    "bounding_ellipsoid",
    "censor_lesions",
    "check_rate",
    "coarsen_polygon",
    "convex_hull",
    "corrupt_boundaries",
    "dilate_erode",
    "resolve_boundary_params",
]
