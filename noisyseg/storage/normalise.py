"""Per-channel z-score statistics: recorded with each case, and read back as training uses them.

Normalisation is per case, per channel (nnU-Net's MRI scheme), ``(x - mean_c) / std_c``. The
statistics come from the case attributes when they record them (:func:`channel_stats`, written
by ``VolumeStore.write_case``), else from a strided subsample of the image
(:func:`subsample_stats`); :func:`case_stats` is the one rule training and inference share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Points per axis used for the z-score statistics when the store has none recorded.
STATS_POINTS_PER_AXIS = 32
STATS_KEYS = (("channel_mean", "channel_std"), ("mean", "std"), ("intensity_mean", "intensity_std"))


def channel_stats(image: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and (population) standard deviation over every voxel of an image.

    Args:
        image: ``(C, *S)`` real array.

    Returns:
        ``{"channel_mean": [C floats], "channel_std": [C floats]}``, accumulated in float64
        (the keys :meth:`VolumeStore.write_case` records in the case attributes).
    """
    means, stds = [], []
    for c in range(image.shape[0]):
        x = np.asarray(image[c])
        means.append(float(np.mean(x, dtype=np.float64)))
        stds.append(float(np.std(x, dtype=np.float64)))
    return {"channel_mean": means, "channel_std": stds}


def _case_attrs(store: Any, case_id: str) -> dict:
    """The case's stored attributes (one small JSON read; ``case_info`` also reads the index)."""
    attrs = getattr(store, "case_attrs", None)
    return dict(attrs(case_id)) if attrs is not None else dict(store.case_info(case_id))


def subsample_stats(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of a strided subsample of an image (the fallback rule).

    Every ``ceil(S_i / STATS_POINTS_PER_AXIS)``-th voxel along each spatial axis (about 32 points
    per axis), accumulated in float64. ``image``: ``(C, *S)`` numpy or zarr array (only the
    subsample is read). Returns float32 arrays of shape ``(C,)``, std not yet floored.
    """
    steps = tuple(max(1, math.ceil(s / STATS_POINTS_PER_AXIS)) for s in image.shape[1:])
    sub = np.asarray(image[(slice(None),) + tuple(slice(None, None, k) for k in steps)])
    sub = sub.reshape(sub.shape[0], -1).astype(np.float64)
    return sub.mean(axis=1).astype(np.float32), sub.std(axis=1).astype(np.float32)


def case_stats(store: Any, case_id: str, image: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel z-score statistics ``(mean, std)`` of a stored case, as training uses them.

    The rule (inference must apply the same one): the case attributes' recorded statistics
    (the first pair of :data:`STATS_KEYS` present; :meth:`VolumeStore.write_case` records
    ``channel_mean`` / ``channel_std`` over the whole image), else :func:`subsample_stats` of the
    stored image. A std below 1e-8 (constant channel) becomes 1.

    Args:
        store: an open :class:`~noisyseg.storage.store.VolumeStore`.
        case_id: the case.
        image: the case's image array when the caller has it open already (else read from store).

    Returns:
        ``(mean, std)``, float32 arrays of shape ``(C,)``.
    """
    info = _case_attrs(store, case_id)
    stats = None
    for mean_key, std_key in STATS_KEYS:
        if info.get(mean_key) is not None and info.get(std_key) is not None:
            stats = (
                np.asarray(info[mean_key], dtype=np.float32),
                np.asarray(info[std_key], dtype=np.float32),
            )
            break
    if stats is None:
        stats = subsample_stats(store.image(case_id) if image is None else image)
    mean, std = stats
    return mean, np.where(std > 1e-8, std, 1.0).astype(np.float32)
