"""Normalisation statistics recorded with each case (per-channel z-score)."""

from __future__ import annotations

import numpy as np


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
