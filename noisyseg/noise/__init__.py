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

One idea per module:

* :mod:`~noisyseg.noise.params` — rates, scopes, boundary modes and their named levels;
* :mod:`~noisyseg.noise.censoring` — :func:`censor_lesions` (``mode="random"`` / ``"size"``,
  ``scope="dataset"`` / ``"case"``);
* :mod:`~noisyseg.noise.outlines` — one lesion's new outline per boundary mode;
* :mod:`~noisyseg.noise.boundaries` — :func:`corrupt_boundaries` and its single-mask helpers.

:func:`apply_noise` is the single entry point for ``noisyseg corrupt --mode M --rate R``: modes
``random``/``size`` censor, the rest corrupt boundaries.

Every call returns what it changed: :class:`LesionRecord` per removed lesion, or
:class:`BoundaryChange` per changed lesion (voxels added/removed, Dice of noisy vs original).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import CENSOR_MODES
from noisyseg.noise.boundaries import (
    BoundaryChange,
    affine_jitter,
    bounding_ellipsoid,
    coarsen_polygon,
    convex_hull,
    corrupt_boundaries,
    dilate_erode,
)
from noisyseg.noise.censoring import censor_lesions
from noisyseg.noise.outlines import ball
from noisyseg.noise.params import (
    BOUNDARY_LEVELS,
    BOUNDARY_MODES,
    SCOPES,
    check_rate,
    resolve_boundary_params,
)

NOISE_MODES: tuple[str, ...] = CENSOR_MODES + BOUNDARY_MODES


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
