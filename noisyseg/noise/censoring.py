"""Lesion censoring: whole lesions removed to simulate annotations with false negatives.

Selection by :func:`~noisyseg.lesions.censor_positions` (DESIGN.md "Label noise"):

* ``mode="random"``: ``n`` lesions uniformly at random without replacement.
* ``mode="size"``: the ``n`` lesions of smallest physical volume; equal volumes are ordered by a
  seeded random key.
* ``scope="dataset"``: ``K`` counts the lesions of all cases together and one generator
  ``np.random.default_rng(seed)`` draws over that pooled list (ordered by case, then label).
  ``scope="case"``: ``K`` and ``n`` are per case, drawn with ``np.random.default_rng([seed, i])``
  for case index ``i``, so a case's result does not depend on the other cases.

:func:`labelled_cases` and :func:`select_records` are shared with boundary noise, whose lesion
selection is that of random censoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

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
from noisyseg.noise.params import SCOPES, Scope, check_rate


def _check_masks(masks: Sequence[Any]) -> list[np.ndarray]:
    """The per-case masks, each checked binary; NoisysegInputError for anything but a list."""
    if isinstance(masks, np.ndarray) or not isinstance(masks, Sequence):
        raise NoisysegInputError("masks must be a list of per-case arrays")
    return [check_binary_mask(m, i) for i, m in enumerate(masks)]


def labelled_cases(
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


def select_records(
    records: list[LesionRecord], rate: float, mode: str, rng: np.random.Generator
) -> list[LesionRecord]:
    """The ``records`` a censoring ``rate`` removes (:func:`noisyseg.lesions.censor_positions`)."""
    volumes = np.array([r.volume_mm3 for r in records], dtype=np.float64)
    return [records[i] for i in censor_positions(volumes, rate, mode, rng)]


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
    arrays, _, labelled, tables = labelled_cases(masks, spacings, connectivity)

    if scope == "dataset":
        pooled = [r for table in tables for r in table]
        removed = select_records(pooled, rate, mode, np.random.default_rng(seed))
    else:
        removed = []
        for i, table in enumerate(tables):
            rng = np.random.default_rng([seed, i])
            removed.extend(select_records(table, rate, mode, rng))

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


__all__ = ["censor_lesions", "labelled_cases", "select_records"]
