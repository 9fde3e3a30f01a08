"""The MNI152 2009a anatomy that ships inside nilearn's wheel (no download), resampled to a
phantom grid: T1 template, grey- and white-matter probabilities, brain mask."""

from __future__ import annotations

import importlib.resources
from functools import lru_cache

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------------------------------------
# Template
# ---------------------------------------------------------------------------------------------

# Template T1 intensities of WM / GM (0..255 scale of the MNI file), used to scale the residual
# (deep grey nuclei, etc.) that tissue classes alone do not explain.
_TPL_WM, _TPL_GM = 220.0, 167.0


def _template_path(kind: str) -> str:
    name = f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    return str(importlib.resources.files("nilearn.datasets") / "data" / name)


@lru_cache(maxsize=1)
def _mni_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 2009a templates at 1 mm, array order (x, y, z).

    Returns:
        t1 (0..255), gm and wm probabilities (0..1), brain mask (float 0/1), all float32
        ``(197, 233, 189)``; and the 4x4 voxel->RAS affine.
    """
    # nibabel is only needed for the template, once per process (keeps generators light)
    import nibabel as nib

    t1_img = nib.load(_template_path("t1"))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(_template_path("gm")).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(_template_path("wm")).dataobj, dtype=np.float32) / 255.0
    brain = (t1 > 0).astype(np.float32)
    return t1, gm, wm, brain, np.asarray(t1_img.affine, dtype=np.float64)


@lru_cache(maxsize=4)
def template_on_grid(shape: tuple[int, int, int], spacing_mm: float) -> dict[str, np.ndarray]:
    """MNI anatomy resampled to a ``shape`` grid (z, y, x) of isotropic ``spacing_mm``.

    The grid is centred on the brain's bounding box. Returns float32 ``(Z, Y, X)`` arrays ``t1``
    (template T1 / WM level, so WM ~ 1), ``gm``, ``wm``, ``brain`` and the 4x4 ``affine`` mapping
    (z, y, x) indices to RAS mm. Cached: the first call per (shape, spacing) costs ~1-3 s.
    """
    t1, gm, wm, brain, tpl_affine = _mni_1mm()
    nz, ny, nx = shape
    # Brain bounding-box centre in template voxels (x, y, z) -> world.
    idx = [np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    centre_vox = np.array([(i.min() + i.max()) / 2.0 for i in idx])
    centre_world = tpl_affine[:3, :3] @ centre_vox + tpl_affine[:3, 3]
    # The template already cuts the brainstem at its lower edge: centre the grid 5 mm higher so
    # the vertex keeps a margin for the per-case warp.
    centre_world[2] += 5.0
    # Phantom grid (z, y, x) -> world: column k of the rotation part scales array axis k.
    affine = np.zeros((4, 4))
    affine[2, 0] = affine[1, 1] = affine[0, 2] = spacing_mm  # z->S, y->A, x->R
    half = (np.array([nz, ny, nx], dtype=np.float64) - 1) / 2.0
    affine[:3, 3] = centre_world - affine[:3, :3] @ half
    affine[3, 3] = 1.0
    # Phantom voxel -> template voxel (x, y, z).
    to_tpl = np.linalg.inv(tpl_affine) @ affine
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    coords = np.einsum("ij,jzyx->izyx", to_tpl[:3, :3].astype(np.float32), grid)
    coords += to_tpl[:3, 3].astype(np.float32)[:, None, None, None]
    tpl_spacing = float(np.abs(tpl_affine[0, 0]))
    sigma = 0.4 * spacing_mm / tpl_spacing if spacing_mm > tpl_spacing else 0.0  # anti-aliasing
    out: dict[str, np.ndarray] = {"affine": affine}
    for name, vol in (("t1", t1 / _TPL_WM), ("gm", gm), ("wm", wm), ("brain", brain)):
        if sigma > 0:
            vol = ndimage.gaussian_filter(vol, sigma, mode="constant")
        out[name] = ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)
        out[name] = out[name].astype(np.float32)
    for arr in out.values():
        arr.setflags(write=False)  # shared by every case of this grid
    return out
