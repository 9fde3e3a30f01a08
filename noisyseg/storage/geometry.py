"""Voxel geometry at ingest: reorientation to RAS, optional resampling, and the way back.

Conventions. A NIfTI array is indexed ``(i, j, k)`` and its 4x4 ``affine`` maps voxel
``(i, j, k, 1)`` to world millimetres (RAS+, as nibabel reports it). Ingest first reorients every
volume to the closest canonical (RAS) voxel order — the same flips and axis permutation as
:func:`nibabel.as_closest_canonical` — so voxel axis ``i`` runs left->right, ``j``
posterior->anterior, ``k`` inferior->superior; the affine is updated so every voxel keeps its
world position. With a target spacing, it then resamples on a grid whose voxel 0 has the same
centre as before and whose axes keep their directions (images linear or cubic B-spline,
``--image-interpolation``; labels nearest neighbour), as nnU-Net does. The store keeps ``(z, y, x)`` = ``(k, j, i)`` and the affine of the
stored grid, so store voxel ``[z, y, x]`` is at world ``affine @ [x, y, z, 1]``.

:class:`Geometry` records both grids (original: the source file's; stored: the store's) so a
prediction can be taken back to the input file's space with :func:`to_original`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
from nibabel import orientations as ornt_mod

from noisyseg.errors import NoisysegInputError

#: Affines of channels / label of one case must agree to this (mm, absolute).
AFFINE_ATOL_MM = 1e-3
#: Image interpolations of ``--image-interpolation`` -> spline order of
#: :func:`scipy.ndimage.affine_transform`: trilinear, or cubic B-spline (nnU-Net's default for
#: images, order 3). Labels are always resampled nearest neighbour (order 0).
IMAGE_INTERPOLATIONS = {"linear": 1, "bspline": 3}
DEFAULT_IMAGE_INTERPOLATION = "linear"


def interpolation_order(name: str) -> int:
    """Spline order of image interpolation ``name`` (:data:`IMAGE_INTERPOLATIONS`)."""
    if name not in IMAGE_INTERPOLATIONS:
        raise NoisysegInputError(
            f"--image-interpolation must be one of {', '.join(IMAGE_INTERPOLATIONS)}, got {name!r}"
        )
    return IMAGE_INTERPOLATIONS[name]


@dataclass(frozen=True)
class Grid:
    """One voxel grid: NIfTI-order ``shape`` (i, j, k), 4x4 ``affine``, ``spacing`` (mm, i, j, k),
    ``orientation`` (nibabel axis codes, e.g. ``"RAS"``, ``"LPS"``)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    orientation: str

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": [int(s) for s in self.shape],
            "affine": np.asarray(self.affine, dtype=np.float64).tolist(),
            "spacing": [float(s) for s in self.spacing],
            "orientation": self.orientation,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Grid:
        return cls(
            tuple(int(s) for s in doc["shape"]),  # type: ignore[arg-type]
            np.asarray(doc["affine"], dtype=np.float64),
            tuple(float(s) for s in doc["spacing"]),  # type: ignore[arg-type]
            str(doc["orientation"]),
        )


@dataclass(frozen=True)
class Geometry:
    """Source grid and stored grid of one case (kept in the case attributes as ``geometry``);
    ``image_interpolation`` names how the image was resampled between them
    (:data:`IMAGE_INTERPOLATIONS`; None: not resampled)."""

    original: Grid
    stored: Grid
    image_interpolation: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"original": self.original.to_json(), "stored": self.stored.to_json()}
        if self.image_interpolation is not None:
            doc["image_interpolation"] = self.image_interpolation
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Geometry:
        return cls(
            Grid.from_json(doc["original"]),
            Grid.from_json(doc["stored"]),
            doc.get("image_interpolation"),
        )


def orientation_code(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. ``"RAS"`` or ``"LPS"`` (nibabel ``aff2axcodes``)."""
    return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine)))


def make_grid(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> Grid:
    return Grid(
        tuple(int(s) for s in shape[:3]),  # type: ignore[arg-type]
        np.asarray(affine, dtype=np.float64),
        tuple(float(s) for s in spacing[:3]),  # type: ignore[arg-type]
        orientation_code(affine),
    )


def check_same_grid(
    ref: Grid, other: Grid, *, what: str, case: str | None = None, path: str | None = None
) -> None:
    """Raise when ``other`` (a channel or the label) is not on ``ref``'s grid: shape, then
    affine (within :data:`AFFINE_ATOL_MM`)."""
    if other.shape != ref.shape:
        raise NoisysegInputError(
            f"{what} shape {other.shape} does not match channel 0 shape {ref.shape}",
            case=case,
            path=path,
        )
    if not np.allclose(other.affine, ref.affine, rtol=0.0, atol=AFFINE_ATOL_MM):
        worst = float(np.abs(other.affine - ref.affine).max())
        raise NoisysegInputError(
            f"{what} affine differs from channel 0's by up to {worst:.4g} mm (orientation "
            f"{other.orientation} vs {ref.orientation}): not on the same voxel grid",
            case=case,
            path=path,
        )


# --------------------------------------------------------------------------------------------
# reorientation
# --------------------------------------------------------------------------------------------


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation array taking the voxel axes of ``affine`` to RAS (``io_orientation``)."""
    return ornt_mod.io_orientation(np.asarray(affine, dtype=np.float64))


def reorient(
    data: np.ndarray, grid: Grid, ornt: np.ndarray | None = None
) -> tuple[np.ndarray, Grid]:
    """Reorient ``data`` (first three axes spatial, NIfTI order; extra trailing axes kept) from
    ``grid`` to the closest canonical RAS grid; returns (data, new grid).

    Every voxel keeps its world position: new affine = ``affine @ inv_ornt_aff(ornt, shape)``,
    exactly as :func:`nibabel.as_closest_canonical`.
    """
    ornt = canonical_transform(grid.affine) if ornt is None else ornt
    if np.array_equal(ornt, ornt_mod.axcodes2ornt("RAS")):
        return data, grid
    out = ornt_mod.apply_orientation(data, ornt)
    affine = grid.affine @ ornt_mod.inv_ornt_aff(ornt, grid.shape)
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _) in enumerate(ornt):
        spacing[int(dst_axis)] = grid.spacing[src_axis]
    return np.ascontiguousarray(out), make_grid(out.shape[:3], affine, spacing)


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------


def resampled_grid(grid: Grid, target_spacing: Sequence[float]) -> Grid:
    """The grid with ``target_spacing`` (mm, i, j, k) covering ``grid``'s extent: shape
    ``round(shape * spacing / target)`` (at least 1), voxel 0 at the same world point, axis
    directions kept (columns of the affine rescaled)."""
    target = np.asarray([float(t) for t in target_spacing], dtype=np.float64)
    if target.shape != (3,) or not (np.isfinite(target).all() and (target > 0).all()):
        raise NoisysegInputError(
            f"--target-spacing must be three positive numbers (mm, x,y,z), got {target_spacing}"
        )
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    shape = np.maximum(1, np.round(np.asarray(grid.shape) * spacing / target)).astype(int)
    affine = grid.affine.copy()
    affine[:3, :3] = affine[:3, :3] * (target / spacing)[None, :]
    return make_grid(tuple(shape), affine, tuple(target))


def resample(
    data: np.ndarray, src: Grid, dst: Grid, *, order: int, channels_last: bool = False
) -> np.ndarray:
    """Resample ``data`` (NIfTI order, on grid ``src``) onto grid ``dst`` (same axis directions,
    e.g. from :func:`resampled_grid`). ``order`` 1: trilinear, 3: cubic B-spline (images;
    scipy's spline prefilter makes it interpolating), 0: nearest (labels). Voxels outside the
    source are filled from the nearest edge voxel."""
    # dst voxel o sits at world dst.affine @ o; in src voxels that is inv(src.affine) @ dst.affine
    m = np.linalg.solve(src.affine, dst.affine)
    matrix, offset = m[:3, :3], m[:3, 3]
    if not np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-6):
        raise ValueError("resample expects grids with the same axis directions")
    if channels_last:
        vols = [data[..., c] for c in range(data.shape[-1])]
        return np.stack([resample(v, src, dst, order=order) for v in vols], axis=-1)
    out_dtype = data.dtype if order == 0 else np.float32
    work = data if order == 0 else data.astype(np.float32, copy=False)
    return ndi.affine_transform(
        work,
        np.diag(matrix),
        offset=offset,
        output_shape=dst.shape,
        order=order,
        mode="nearest",
        output=out_dtype,
    )


# --------------------------------------------------------------------------------------------
# back to the input space
# --------------------------------------------------------------------------------------------


def to_original(volume_zyx: np.ndarray, geometry: Geometry, *, order: int = 0) -> np.ndarray:
    """Take a stored-grid volume ``(Z, Y, X)`` (store order) back to the source file's grid:
    NIfTI order ``(i, j, k)`` of the original shape, to be saved with the original affine.

    ``order`` 0 (labels, masks; nearest) or 1 (probabilities; linear) for the undoing of a
    resampling; the reorientation itself is an exact permutation/flip.
    """
    data = np.asarray(volume_zyx).transpose(2, 1, 0)
    stored = geometry.stored
    if tuple(data.shape) != stored.shape:
        raise ValueError(f"volume shape {data.shape[::-1]} is not the stored shape")
    ornt = canonical_transform(geometry.original.affine)
    src_axis = [int(np.flatnonzero(ornt[:, 0] == a)[0]) for a in range(3)]
    canon_shape = tuple(int(geometry.original.shape[i]) for i in src_axis)
    canon_spacing = tuple(float(geometry.original.spacing[i]) for i in src_axis)
    canon_affine = geometry.original.affine @ ornt_mod.inv_ornt_aff(ornt, geometry.original.shape)
    canon = make_grid(canon_shape, canon_affine, canon_spacing)
    if canon.shape != stored.shape or not np.allclose(canon.affine, stored.affine, atol=1e-6):
        data = resample(data, stored, canon, order=order)
    back = ornt_mod.apply_orientation(
        data, ornt_mod.ornt_transform(ornt_mod.axcodes2ornt("RAS"), ornt)
    )
    return np.ascontiguousarray(back)
