"""One lesion's new outline, per boundary-noise mode (the shape transforms of boundary noise).

Each function takes one lesion (a boolean crop, or its voxel coordinates) and returns the new
lesion plus the per-lesion values it drew; :func:`noisyseg.noise.boundaries.corrupt_boundaries`
applies them lesion by lesion.

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
"""

from __future__ import annotations

import math

import cc3d
import numpy as np
from scipy import ndimage

from noisyseg.lesions import LesionRecord


def ball(radius: int, ndim: int) -> np.ndarray:
    """Boolean ball ``(2r+1,)*ndim`` of the integer offsets with ``Σ offset² ≤ radius²``."""
    grid = np.indices((2 * radius + 1,) * ndim) - radius
    return (grid**2).sum(axis=0) <= radius * radius


def padded_box(
    bbox: tuple[tuple[int, int], ...], pad: int, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """``bbox`` (per axis ``(start, stop)``) grown by ``pad`` voxels, clipped to ``shape``."""
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


def lesion_polygon(
    lesion: np.ndarray, params: dict, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Polygon outline of a boolean lesion crop ``(H, W)`` or ``(D, H, W)`` (slice-wise along
    axis 0), each 8-connected piece reduced to ``params["n_vertices"]`` contour points; returns
    the new crop and the vertex counts drawn (pieces with an empty polygon keep their outline)."""
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


def lesion_hull(lesion: np.ndarray) -> tuple[np.ndarray, dict]:
    """Convex hull of a boolean lesion crop (flat lesions hulled in their plane)."""
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


def ellipsoid_region(
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


def dilate_erode_lesion(lesion: np.ndarray, k: int, op: str) -> np.ndarray:
    """``op`` ``"dilate"`` or ``"erode"`` of a boolean crop by a ball of radius ``k`` voxels; an
    erosion that leaves nothing keeps the deepest voxel instead."""
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
    """Rotation matrix ``(ndim, ndim)``: one angle in 2D, about each axis in turn in 3D (deg)."""
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


def jitter_region(
    labels: np.ndarray,
    lab: int,
    record: LesionRecord,
    params: dict,
    rng: np.random.Generator,
    spacing: tuple[float, ...],
) -> tuple[tuple[slice, ...], np.ndarray, dict]:
    """Affine jitter of lesion ``lab`` of the component map ``labels`` about its centroid
    (physical space, ``spacing`` in mm); returns the region it may cover, the moved lesion over
    that region and the drawn rotation (deg), scale and shift (voxels)."""
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


__all__ = [
    "ball",
    "dilate_erode_lesion",
    "ellipsoid_region",
    "jitter_region",
    "lesion_hull",
    "lesion_polygon",
    "padded_box",
]
