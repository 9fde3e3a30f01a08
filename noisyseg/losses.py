"""Segmentation losses for binary lesion masks under noisy annotations.

All losses take **logits** ``z`` shaped ``(N, 1, *spatial)`` (2D: ``(N, 1, H, W)``, 3D:
``(N, 1, D, H, W)``) and labels ``y`` of the same shape with values in ``{0, 1}`` (any dtype),
and return

* ``reduction="none"``: a per-pixel loss tensor shaped like ``z`` (nats per voxel);
* ``reduction="mean"``: the mean over every voxel of the batch (a scalar);
* ``reduction="sum"``: the sum over every voxel of the batch (a scalar).

With ``p = sigmoid(z)``, ``BCE(p, t) = -(t log p + (1 - t) log(1 - p))`` and the binary entropy
``H(p) = -(p log p + (1 - p) log(1 - p))`` (DESIGN.md, "Algorithms"). Every term is written in
log-sigmoid form (``log p = logsigmoid(z)``, ``log(1 - p) = logsigmoid(-z)``), so losses and
gradients are finite for any finite logit, ``±1e4`` included.

Losses:

* :class:`BCELoss` — plain binary cross-entropy.
* :class:`DiceBCELoss` — MONAI's soft Dice plus BCE (nnU-Net's default pairing).
* :class:`BootstrapLoss` — Reed et al. (2015) bootstrapping, symmetric over all pixels.
* :class:`LopsidedBootstrapLoss` — Yi et al. (MIDL 2020): labelled lesion pixels are trusted,
  labelled background may hide missed lesions and is softened by an entropy term.

:func:`make_loss` builds any of them by name (the names the config, CLI and MLflow use).
:func:`clean_loss` is meta reweighting's clean objective (mean BCE, optionally class-balanced).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Reduction = Literal["mean", "sum", "none"]
BootstrapMode = Literal["soft", "hard"]

LOSS_NAMES: tuple[str, ...] = ("bce", "dicebce", "bootstrap", "lopsided")
_REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
_MODES: tuple[str, ...] = ("soft", "hard")


# ----------------------------------------------------------------------------- elementwise terms
def bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel ``BCE(sigmoid(logits), target)``; ``target`` may be soft (in ``[0, 1]``).

    ``-(t·logsigmoid(z) + (1 - t)·logsigmoid(-z))``: finite for any finite ``z``.
    """
    return -(target * F.logsigmoid(logits) + (1.0 - target) * F.logsigmoid(-logits))


def binary_entropy_with_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel binary entropy ``H(sigmoid(logits))`` in nats, differentiable (not detached).

    Equals ``BCE(p, p)``. At ``|z| → ∞`` one factor is exactly 0 and the other finite, so no NaN.
    """
    probability = torch.sigmoid(logits)
    return -(probability * F.logsigmoid(logits) + (1.0 - probability) * F.logsigmoid(-logits))


def hard_pseudo_label(logits: torch.Tensor) -> torch.Tensor:
    """``1[p > 0.5]`` = ``1[z > 0]`` as a detached float tensor (the hard bootstrap target)."""
    return (logits.detach() > 0).to(logits.dtype)


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return labels as a float tensor of the logits' dtype and device."""
    if logits.dim() not in (4, 5) or logits.shape[1] != 1:
        raise ValueError(
            f"logits must be (N, 1, H, W) or (N, 1, D, H, W) (one lesion channel); "
            f"got shape {tuple(logits.shape)}"
        )
    if labels.shape != logits.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} differs from logits shape {tuple(logits.shape)}"
        )
    return labels.to(device=logits.device, dtype=logits.dtype)


def _reduce(per_voxel: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_voxel
    if reduction == "sum":
        return per_voxel.sum()
    return per_voxel.mean()


class _VoxelwiseLoss(nn.Module):
    """Base: subclasses implement :meth:`per_voxel` ``(N,1,*S) -> (N,1,*S)``; reduction is shared.

    ``voxel_separable``: each voxel's loss depends on that voxel's logit and label only, so a
    per-voxel weighting (meta reweighting) weights each voxel's own term. False for a loss whose
    per-voxel form spreads a per-sample quantity (Dice) over the voxels.
    """

    voxel_separable: bool = True

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def per_voxel(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: logits ``(N, 1, *spatial)``, labels same shape in ``{0, 1}``. Returns see module."""
        labels = _check_inputs(logits, labels)
        return _reduce(self.per_voxel(logits, labels), self.reduction)


# ------------------------------------------------------------------------ clean objective (meta)
def clean_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, class_balanced: bool = False
) -> torch.Tensor:
    """The clean objective ``L_c``: mean BCE over every voxel of the clean batch (nats).

    The objective of meta pixel reweighting (:mod:`noisyseg.reweight`) on its clean batch. Ren et
    al. (2018) and Mirikharaji et al. (2019) measure the clean set with plain cross-entropy on its
    clean labels, whatever loss trains the model; so does reweighting, for every training loss.

    Args:
        logits: ``(M, 1, *S)`` clean-batch logits.
        labels: ``(M, 1, *S)`` clean labels in ``{0, 1}``.
        class_balanced: deviation from both papers, off by default: ``½·mean BCE over lesion
            voxels + ½·mean BCE over background voxels`` (the mean over the present class alone
            when the batch holds one class), so a lesion-poor clean batch still asks for lesions.

    Returns:
        A scalar tensor (differentiable).
    """
    if labels.shape != logits.shape:
        raise ValueError(
            f"clean labels shape {tuple(labels.shape)} differs from logits shape "
            f"{tuple(logits.shape)}"
        )
    labels = labels.to(device=logits.device, dtype=logits.dtype)
    per_voxel = bce_with_logits(logits, labels)
    if not class_balanced:
        return per_voxel.mean()
    lesion = labels > 0.5
    terms = [per_voxel[part].mean() for part in (lesion, ~lesion) if part.any()]
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------- the losses
class BCELoss(_VoxelwiseLoss):
    """Binary cross-entropy with logits, ``BCE(sigmoid(z), y)`` per voxel."""

    def per_voxel(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bce_with_logits(logits, labels)


class DiceBCELoss(_VoxelwiseLoss):
    """MONAI soft Dice (per sample, sigmoid activation) plus BCE.

    ``mean`` = ``dice_weight · mean_n Dice_n + bce_weight · mean_voxels BCE``. Dice is a
    per-sample quantity: for ``reduction="none"`` the per-voxel tensor
    ``bce_weight·BCE_j + dice_weight·Dice_n(j)`` is returned (``n(j)`` the sample of voxel ``j``),
    whose mean over all voxels equals the ``mean`` reduction. Its Dice part is not local to a
    voxel (``voxel_separable = False``): meta reweighting refuses it.

    Args:
        dice_weight, bce_weight: weights of the two terms (default 1 and 1).
        smooth: MONAI's ``smooth_nr``/``smooth_dr`` (default 1e-5).
    """

    voxel_separable = False

    def __init__(
        self,
        reduction: Reduction = "mean",
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__(reduction)
        # MONAI's Dice, not a re-implementation; imported here because MONAI is heavy and
        # this module is imported by the CLI (config defaults), which must start fast.
        from monai.losses import DiceLoss

        self.dice = DiceLoss(
            sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth, batch=False
        )
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)

    def per_voxel(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dice_per_sample = self.dice(logits, labels)  # (N, 1, 1, ..., 1)
        return (
            self.bce_weight * bce_with_logits(logits, labels) + self.dice_weight * dice_per_sample
        )


class BootstrapLoss(_VoxelwiseLoss):
    """Reed et al. bootstrapping, applied to every voxel alike.

    soft: ``beta·BCE(p, y) + (1 - beta)·H(p)`` (entropy not detached);
    hard: ``beta·BCE(p, y) + (1 - beta)·BCE(p, 1[p > 0.5])`` (pseudo-label detached).

    Hand check (DESIGN.md): ``p = 0.8, beta = 0.95``, soft → 0.2370064949 for ``y = 1`` and
    1.5539861380 for ``y = 0``.

    Args:
        beta: weight of the given label, in ``[0, 1]``; ``beta = 1`` is BCE.
        mode: ``"soft"`` or ``"hard"``.
    """

    def __init__(self, beta: float, mode: BootstrapMode = "soft", reduction: Reduction = "mean"):
        super().__init__(reduction)
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.beta = float(beta)
        self.mode = mode

    def per_voxel(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mode == "soft":
            self_term = binary_entropy_with_logits(logits)
        else:
            self_term = bce_with_logits(logits, hard_pseudo_label(logits))
        return self.beta * bce_with_logits(logits, labels) + (1.0 - self.beta) * self_term


#: Default ``entropy_weight`` λ of the lopsided loss. In the soft form the background gradient
#: with respect to the logit ``z`` is ``p·((1-λ) - λ·z·(1-p))``; ``z·(1-p)`` never exceeds 0.278,
#: so for ``λ < 0.782`` the sign never changes and the loss is only a down-weighted BCE on
#: background: it cannot hold a confident prediction on an unlabelled lesion. At 0.95 a background
#: voxel above ``p ≈ 0.53`` is pulled *up* (to ``p ≈ 0.99``) and one below it down — the
#: self-training the method relies on. benchmarks/RESULTS.md compares 0.5, 0.8, 0.9 and 0.95.
DEFAULT_ENTROPY_WEIGHT = 0.95


class LopsidedBootstrapLoss(_VoxelwiseLoss):
    """Lopsided bootstrap loss (Yi et al., MIDL 2020), robust to missed lesions (false negatives).

    Per voxel, with ``λ = entropy_weight``::

        y = 1:  BCE(p, 1)
        y = 0:  soft  (1 - λ)·BCE(p, 0) + λ·H(p)
                hard  (1 - λ)·BCE(p, 0) + λ·BCE(p, 1[p > 0.5])   (pseudo-label detached)

    ``λ = 0`` is exactly BCE. The soft entropy term is deliberately *not* detached: detached, its
    gradient would vanish and the loss would be a rescaled BCE on background.

    Args:
        entropy_weight: ``λ`` in ``[0, 1]``.
        mode: ``"soft"`` or ``"hard"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
    """

    def __init__(
        self, entropy_weight: float, mode: BootstrapMode = "soft", reduction: Reduction = "mean"
    ) -> None:
        super().__init__(reduction)
        if not 0.0 <= float(entropy_weight) <= 1.0:
            raise ValueError(f"entropy_weight must lie in [0, 1], got {entropy_weight}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.entropy_weight = float(entropy_weight)
        self.mode = mode

    def per_voxel(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.entropy_weight
        positive = F.softplus(-logits)  # BCE(p, 1) = -logsigmoid(z)
        negative = F.softplus(logits)  # BCE(p, 0) = -logsigmoid(-z)
        if self.mode == "soft":
            self_term = binary_entropy_with_logits(logits)
        else:
            self_term = bce_with_logits(logits, hard_pseudo_label(logits))
        background = (1.0 - weight) * negative + weight * self_term
        return torch.where(labels > 0.5, positive, background)


def make_loss(
    name: str,
    *,
    entropy_weight: float = DEFAULT_ENTROPY_WEIGHT,
    beta: float = 0.95,
    mode: BootstrapMode = "soft",
    reduction: Reduction = "mean",
) -> _VoxelwiseLoss:
    """Build a loss by its config name: ``bce | dicebce | bootstrap | lopsided``.

    Only the parameters the named loss uses are read (``beta`` for ``bootstrap``,
    ``entropy_weight`` and ``mode`` for ``lopsided``, ``mode`` for ``bootstrap``).
    ``entropy_weight`` defaults to :data:`DEFAULT_ENTROPY_WEIGHT`, as the config does.
    """
    if name == "bce":
        return BCELoss(reduction=reduction)
    if name == "dicebce":
        return DiceBCELoss(reduction=reduction)
    if name == "bootstrap":
        return BootstrapLoss(beta=beta, mode=mode, reduction=reduction)
    if name == "lopsided":
        return LopsidedBootstrapLoss(entropy_weight=entropy_weight, mode=mode, reduction=reduction)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSS_NAMES}")
