"""One optimiser step and what drives it: optimiser, LR schedule, loss.

nnU-Net's defaults (SGD with Nesterov momentum 0.99, weight decay 3e-5, poly schedule with
exponent 0.9); :func:`train_step` is one step of a standard loss or of meta pixel reweighting
(:func:`noisyseg.reweight.meta_reweighted_step`). No Ray, no MLflow: the DDP wrapper, when there
is one, averages the gradients itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from noisyseg.distributed.config import TrainConfig
from noisyseg.losses import make_loss
from noisyseg.models import autocast
from noisyseg.reweight import meta_reweighted_step


def make_optimizer(config: TrainConfig, parameters: Any) -> torch.optim.Optimizer:
    """nnU-Net's SGD (Nesterov, momentum 0.99, wd 3e-5) or AdamW, at ``config.lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the initial LR after ``step`` completed steps.

    poly: ``(1 - step/steps) ** poly_exponent`` (nnU-Net); cosine: ``(1 + cos(pi step/steps))/2``;
    constant: 1.
    """
    fraction = min(max(step / config.steps, 0.0), 1.0)
    if config.lr_schedule == "poly":
        return (1.0 - fraction) ** config.poly_exponent
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * fraction))
    return 1.0


def make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))


def continue_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: TrainConfig,
    step: int,
) -> None:
    """Make the restored LR schedule follow the *current* config from ``step`` on.

    ``steps`` may have been raised to continue a run: the saved optimiser LR belongs to the old
    schedule, so the base LR and the current LR are set from ``config`` (``lr * lr_factor``).
    """
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * lr_factor(config, step)


def make_step_loss(config: TrainConfig) -> nn.Module:
    """The configured loss with ``reduction="mean"`` (per-voxel form used by reweighting)."""
    return make_loss(
        config.loss,
        entropy_weight=config.entropy_weight,
        beta=config.beta,
        mode=config.mode,
        reduction="mean",
    )


@dataclass
class StepOutput:
    """What one optimiser step reports. Losses in nats per voxel."""

    loss: float
    extra: dict[str, float]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: TrainConfig,
    clean: tuple[torch.Tensor, torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepOutput:
    """One optimiser step on a batch (``images (B, C, *P)``, ``labels (B, 1, *P)``).

    Standard losses: mean loss over every voxel of this rank's batch, backward (DDP averages the
    gradients over ranks, so the update equals one step on the concatenated batch), gradient
    norm clipped at :meth:`TrainConfig.effective_grad_clip_norm`, step.
    ``reweight=meta|meta-head``: :func:`noisyseg.reweight.meta_reweighted_step` with the clean
    batch ``clean = (images, labels)``.
    """
    if config.reweight != "none":
        if clean is None:
            raise ValueError("meta reweighting needs a clean batch")
        result = meta_reweighted_step(
            model,
            optimizer,
            images,
            labels,
            clean[0],
            clean[1],
            loss=loss_fn,
            inner_lr=config.inner_lr,
            method="head" if config.reweight == "meta-head" else "fast",
            class_balanced_clean=config.class_balanced_clean,
            clip_grad_norm=config.effective_grad_clip_norm(),
        )
        # Logged every step: the lesion share of both batches and of the weight, so a
        # collapse (lesion voxels switched off) is visible while it happens.
        extra = result.log_metrics()
        extra["train/positive_weight_fraction"] = extra.pop("train/positive_fraction")
        return StepOutput(result.loss, extra)
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, config.amp):
        logits = model(images)
    loss = loss_fn(logits.float(), labels)
    clip = config.effective_grad_clip_norm()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return StepOutput(float(loss.detach()), {})
