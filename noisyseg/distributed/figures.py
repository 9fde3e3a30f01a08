"""Figures logged to MLflow: a validation slice with contours, a lesion PR curve.

Both return a :class:`matplotlib.figure.Figure` built without pyplot (no global backend or figure
registry involved: nothing to close, safe in worker threads); the caller logs it
(``RankZeroLogger.log_figure``, ``mlflow.log_figure``) or saves it (``fig.savefig``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def _largest_lesion_slice(truth: np.ndarray) -> int:
    """Index along axis 0 with the most lesion voxels (3D); 0 for 2D."""
    if truth.ndim == 2:
        return 0
    counts = truth.reshape(truth.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts))


def validation_slice_figure(
    image: np.ndarray,
    truth: np.ndarray,
    probabilities: np.ndarray,
    *,
    noisy: np.ndarray | None = None,
    threshold: float = 0.5,
    title: str = "",
) -> Figure:
    """Matplotlib figure: the slice with most lesion, truth/noisy/prediction contours on the image.

    Args:
        image: ``(C, *S)`` (first channel shown).
        truth, probabilities, noisy: ``(*S)``; 3D volumes are cut along the first spatial axis.
    """
    truth = np.asarray(truth) > 0
    index = _largest_lesion_slice(truth)

    def cut(volume: np.ndarray) -> np.ndarray:
        return volume[index] if volume.ndim == 3 else volume

    background = cut(np.asarray(image)[0]).astype(np.float32)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    ax.imshow(background, cmap="gray")
    handles = []
    layers = [(cut(truth).astype(float), "lime", "truth")]
    if noisy is not None:
        layers.append((cut(np.asarray(noisy) > 0).astype(float), "orange", "noisy label"))
    layers.append((cut(np.asarray(probabilities) >= threshold).astype(float), "red", "prediction"))
    for mask, colour, name in layers:
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.2)
        handles.append(Line2D([0], [0], color=colour, label=name))
    ax.legend(handles=handles, loc="lower right", fontsize=7)
    ax.set_title(title or f"slice {index}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def pr_curve_figure(pr_curve: dict[str, Any] | None, *, title: str = "lesion PR curve") -> Figure:
    """Matplotlib figure of a lesion-wise precision–recall curve (``{"precision", "recall"}``)."""
    fig = Figure(figsize=(4.5, 4), dpi=100)
    ax = fig.subplots()
    if pr_curve:
        precision = np.asarray(pr_curve.get("precision", []), dtype=float)
        recall = np.asarray(pr_curve.get("recall", []), dtype=float)
        if precision.size and recall.size:
            ax.plot(recall, precision, marker=".", color="tab:blue")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("lesion recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
