"""The review picture of one suspected missed lesion: orthogonal slices through its centroid.

Image (one channel, grey, 1st–99th percentile window: the contrast-enhanced T1 when the store
has one, since metastases enhance there, else the first channel), the candidate outlined in red, the
labelled lesions of the audited set in green, and a yellow ring at the centroid so that a
candidate of a few voxels is found at a glance. 3D cases show the axial (``z``), coronal (``y``)
and sagittal (``x``) slices with the voxel spacing as aspect ratio; 2D cases show the image.
Rendered with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the Agg backend)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

CANDIDATE_COLOUR = "red"
LABEL_COLOUR = "lime"
MARKER_COLOUR = "yellow"
#: Channel names shown by preference (lower case): contrast-enhanced T1.
PREFERRED_CHANNELS: tuple[str, ...] = ("t1c", "t1ce", "t1gd", "t1-gd", "t1_gd")


def display_channel(channel_names: Sequence[str]) -> int:
    """Index of the channel to show: the first of :data:`PREFERRED_CHANNELS` present, else 0."""
    lowered = [str(name).lower() for name in channel_names]
    for name in PREFERRED_CHANNELS:
        if name in lowered:
            return lowered.index(name)
    return 0


def _views(shape: Sequence[int], centre: Sequence[int], spacing: Sequence[float]) -> list[dict]:
    """Per panel: name, the index tuple that cuts the volume, the in-plane axes and the aspect."""
    if len(shape) == 2:
        return [
            {
                "name": "image",
                "cut": (slice(None), slice(None)),
                "aspect": spacing[0] / spacing[1],
                "origin": "upper",
            }
        ]
    z, y, x = centre
    sz, sy, sx = spacing
    return [
        {
            "name": f"axial z={z}",
            "cut": (z, slice(None), slice(None)),
            "aspect": sy / sx,
            "origin": "upper",
        },
        {
            "name": f"coronal y={y}",
            "cut": (slice(None), y, slice(None)),
            "aspect": sz / sx,
            "origin": "lower",
        },
        {
            "name": f"sagittal x={x}",
            "cut": (slice(None), slice(None), x),
            "aspect": sz / sy,
            "origin": "lower",
        },
    ]


def _window(plane: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(plane, [1.0, 99.0])
    return float(low), float(high if high > low else low + 1.0)


def _outline(axis: Any, mask: np.ndarray, colour: str) -> None:
    """Contour of ``mask`` in the data coordinates of the ``imshow`` below it (pixel centres)."""
    if mask.any() and not mask.all():
        axis.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)


def candidate_figure(
    image: np.ndarray,
    labels: np.ndarray,
    candidate: np.ndarray,
    centroid: Sequence[float],
    spacing: Sequence[float],
    *,
    title: str = "",
    channel: int = 0,
):
    """A matplotlib figure of one candidate.

    Args:
        image: ``(C, *S)`` the case's image (channel ``channel`` is shown).
        labels: ``(*S)`` the audited label set (non-zero = labelled lesion).
        candidate: ``(*S)`` bool, the candidate's voxels.
        centroid: the candidate's centroid, voxel coordinates in store order.
        spacing: voxel spacing in mm, store order.
        title: figure title (e.g. rank, id, score, volume).
        channel: the image channel shown (see :func:`display_channel`).

    Returns:
        the figure (close it with ``plt.close`` after saving).
    """
    volume = np.asarray(image)[channel].astype(np.float32, copy=False)
    labels = np.asarray(labels) != 0
    candidate = np.asarray(candidate, dtype=bool)
    centre = [int(np.clip(round(c), 0, n - 1)) for c, n in zip(centroid, volume.shape)]
    views = _views(volume.shape, centre, spacing)
    figure, axes = plt.subplots(1, len(views), figsize=(4.2 * len(views), 4.4), dpi=100)
    axes = np.atleast_1d(axes)
    for axis, view in zip(axes, views):
        plane = volume[view["cut"]]
        low, high = _window(plane)
        origin = view["origin"]
        axis.imshow(plane, cmap="gray", vmin=low, vmax=high, aspect=view["aspect"], origin=origin)
        _outline(axis, labels[view["cut"]], LABEL_COLOUR)
        _outline(axis, candidate[view["cut"]], CANDIDATE_COLOUR)
        in_plane = [c for c, part in zip(centroid, view["cut"]) if isinstance(part, slice)]
        axis.plot(
            in_plane[1],
            in_plane[0],
            "o",
            markersize=22,
            markerfacecolor="none",
            markeredgecolor=MARKER_COLOUR,
            markeredgewidth=1.0,
        )
        axis.set_title(view["name"], fontsize=9)
        axis.axis("off")
    handles = [
        Line2D([0], [0], color=CANDIDATE_COLOUR, label="candidate"),
        Line2D([0], [0], color=LABEL_COLOUR, label="labelled lesions"),
    ]
    axes[-1].legend(handles=handles, loc="lower right", fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def save_candidate_figure(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """:func:`candidate_figure` written to ``path`` as PNG (the figure is closed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = candidate_figure(*args, **kwargs)
    try:
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path
