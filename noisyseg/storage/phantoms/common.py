"""Shared parts of the phantom generators: the case record, random smooth fields and rotations,
and sub-voxel sampling helpers (pure NumPy/SciPy, deterministic given the generator passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        image: float32, ``(C, Z, Y, X)`` for brain (channels :data:`BRAIN_CHANNELS`, arbitrary
            MR units, 0 outside the brain) or ``(3, H, W)`` for skin (RGB in [0, 1]).
        label: uint8 {0, 1}, ``(Z, Y, X)`` / ``(H, W)``: the lesion mask (brain: enhancing lesion
            including its necrotic core, oedema excluded; skin: the pigmented lesion).
        spacing: voxel size in mm, axis order of ``label`` (``(z, y, x)`` / ``(y, x)``).
        channel_names: names of the image channels, in order.
        affine: 4x4 float64 mapping array indices ``(z, y, x, 1)`` to RAS world mm (the MNI frame
            before the per-case warp), or ``None`` for 2D.
        lesions: one dict per lesion, as generated (JSON-serialisable values): ``id`` (1-based),
            ``center`` (voxel/pixel coordinates, label axis order), ``voxels`` (label voxels), and
            for brain ``center_mm`` (RAS), ``radius_mm``, ``diameter_vox`` (nominal diameter =
            2 x radius / spacing), ``ring`` (necrotic core), ``oedema_mm``, ``enhancement``,
            ``tissue`` (class at the centre); for skin ``area_fraction``.
        tissue: uint8 hard tissue classes (:data:`TISSUE_CLASSES`) for brain, ``None`` for skin.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    channel_names: list[str]
    affine: np.ndarray | None
    lesions: list[dict] = field(default_factory=list)
    tissue: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Random smooth fields
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _interp_matrix(n: int, n_ctrl: int) -> np.ndarray:
    """(n, n_ctrl) Gaussian-kernel weights, each row of unit L2 norm (so unit-variance output)."""
    step = n / n_ctrl
    centres = (np.arange(n_ctrl) + 0.5) * step - 0.5
    w = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / (0.7 * step)) ** 2)
    return (w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32)


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int | tuple[int, ...], std: float
) -> np.ndarray:
    """A smooth random field: Gaussian control points on a coarse grid, kernel-interpolated.

    Separable (one small matrix product per axis), so it costs O(voxels x control points per
    axis). Returns float32 of ``shape`` with zero mean and standard deviation ``std`` per voxel.
    """
    ctrl_shape = (n_ctrl,) * len(shape) if isinstance(n_ctrl, int) else tuple(n_ctrl)
    out = rng.standard_normal(ctrl_shape).astype(np.float32) * np.float32(std)
    for axis, (n, c) in enumerate(zip(shape, ctrl_shape, strict=True)):
        out = np.moveaxis(np.tensordot(_interp_matrix(n, c), out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """3x3 rotation with each Euler angle uniform in [-max_deg, max_deg] degrees."""
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """A 3x3 rotation drawn uniformly (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def warp_coords(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing_mm: float,
    rotate_deg: float,
    scale_range: float,
    shift_mm: float,
    elastic_mm: float,
) -> np.ndarray:
    """Sampling coordinates (3, Z, Y, X) float32 into the template grid: affine + elastic warp."""
    rot = random_rotation(rng, rotate_deg)
    scale = np.exp(rng.uniform(-scale_range, scale_range, size=3))
    mat = (rot * scale[None, :]).astype(np.float32)  # anisotropic brain size, then rotation
    shift = rng.uniform(-shift_mm, shift_mm, size=3) / spacing_mm
    centre = (np.array(shape, dtype=np.float32) - 1) / 2.0
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    rel = grid - centre[:, None, None, None]
    coords = np.einsum("ij,jzyx->izyx", mat, rel)
    coords += (centre + shift).astype(np.float32)[:, None, None, None]
    # Control points every ~32 mm: smooth, anatomically plausible shape variation.
    n_ctrl = tuple(max(3, round(n * spacing_mm / 32.0)) for n in shape)
    for axis in range(3):
        coords[axis] += smooth_field(rng, shape, n_ctrl, elastic_mm / spacing_mm)
    return coords


def box_points(
    lo: np.ndarray, hi: np.ndarray, spacing_mm: float, ss: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sub-voxel sample points (N*ss^3, 3) in mm for voxel box [lo, hi), with box shape."""
    box = tuple(int(h - l) for l, h in zip(lo, hi, strict=True))
    off = (np.arange(ss) + 0.5) / ss - 0.5
    axes = [
        ((np.arange(l, h)[:, None] + off[None, :]).reshape(-1)) * spacing_mm
        for l, h in zip(lo, hi, strict=True)
    ]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return pts, box


def partial_volume(values: np.ndarray, box: tuple[int, ...], ss: int) -> np.ndarray:
    """Average a super-sampled (box*ss) field back to voxels (box)."""
    v = values.reshape(box[0], ss, box[1], ss, box[2], ss)
    return v.mean(axis=(1, 3, 5))
