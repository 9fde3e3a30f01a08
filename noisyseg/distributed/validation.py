"""Validation during training: sliding-window scores on a few validation cases, and figures.

Rank 0 calls :func:`validate` every ``val_interval`` steps; what it returns is logged by the loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from noisyseg.distributed.config import StoreInfo, TrainConfig
from noisyseg.distributed.evaluation import evaluate_cases
from noisyseg.distributed.figures import pr_curve_figure, validation_slice_figure
from noisyseg.distributed.tracking import scalar_metrics
from noisyseg.models import unwrap_model
from noisyseg.storage.store import VolumeStore


def validate(
    model: nn.Module,
    config: TrainConfig,
    info: StoreInfo,
    device: torch.device,
    *,
    step: int,
    figures: bool = True,
) -> tuple[dict[str, float], list[tuple[Any, str]]]:
    """Score ``info.val_case_ids`` against ``config.val_labels`` (the network left as it was).

    Returns:
        ``(metrics, figures)``: the finite scalar metrics as ``val/<name>``, and (with
        ``figures``) ``[(matplotlib figure, artifact path)]`` for the validation slice and the
        lesion PR curve.
    """
    store = VolumeStore.open(config.store)
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        result = evaluate_cases(
            net,
            store,
            info.val_case_ids,
            label_set=config.val_labels,
            roi_size=tuple(info.patch_shape),
            overlap=config.val_overlap,
            sw_batch_size=config.val_sw_batch_size,
            device=str(device),
            amp=config.amp,
            keep_probabilities=figures,
        )
    finally:
        net.train(was_training)
    metrics = scalar_metrics(result.metrics, "val/")
    return metrics, (validation_figures(store, config, result, step) if figures else [])


def validation_figures(
    store: Any, config: TrainConfig, result: Any, step: int
) -> list[tuple[Any, str]]:
    """The slice with most lesion of the most lesioned case, and the lesion PR curve."""
    out = []
    probabilities = result.probabilities or {}
    if probabilities:
        truths = {c: np.asarray(store.labels(c, config.val_labels)[...]) for c in probabilities}
        case = max(truths, key=lambda c: int(truths[c].sum()))
        noisy = None
        if config.labels != config.val_labels and config.labels in store.case_label_sets(case):
            noisy = np.asarray(store.labels(case, config.labels)[...])
        figure = validation_slice_figure(
            np.asarray(store.image(case)[...]),
            truths[case],
            probabilities[case],
            noisy=noisy,
            title=f"{case} step {step}",
        )
        out.append((figure, "figures/validation_slice.png"))
    figure = pr_curve_figure(result.metrics.get("pr_curve"), title=f"lesion PR, step {step}")
    out.append((figure, "figures/pr_curve.png"))
    return out
