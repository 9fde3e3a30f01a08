"""Losses against independent computations: scalar math, torch's own BCE, analytic derivatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from noisyseg.losses import (
    DEFAULT_ENTROPY_WEIGHT,
    BCELoss,
    BootstrapLoss,
    DiceBCELoss,
    LopsidedBootstrapLoss,
    make_loss,
)

# The 3-voxel example used for hand-worked values: one labelled lesion voxel and two
# labelled-background voxels, one of which the network believes is lesion (p > 0.5).
LOGITS_3 = [2.0, -1.0, 0.5]
LABELS_3 = [1.0, 0.0, 0.0]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _bce(p: float, t: float) -> float:
    return -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))


def _entropy(p: float) -> float:
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def _as_volume(values: list[float], dims: int = 3, dtype=torch.float64) -> torch.Tensor:
    """(N=1, C=1, 1, 1, V) for 3D or (1, 1, 1, V) for 2D."""
    shape = (1, 1, 1, 1, len(values)) if dims == 3 else (1, 1, 1, len(values))
    return torch.tensor(values, dtype=dtype).reshape(shape)


def _hand_lopsided(z: float, y: float, weight: float, mode: str) -> float:
    p = _sigmoid(z)
    if y == 1.0:
        return _bce(p, 1.0)
    self_term = _entropy(p) if mode == "soft" else _bce(p, 1.0 if p > 0.5 else 0.0)
    return (1.0 - weight) * _bce(p, 0.0) + weight * self_term


def _hand_bootstrap(z: float, y: float, beta: float, mode: str) -> float:
    p = _sigmoid(z)
    self_term = _entropy(p) if mode == "soft" else _bce(p, 1.0 if p > 0.5 else 0.0)
    return beta * _bce(p, y) + (1.0 - beta) * self_term


ALL_LOSSES = [
    ("bce", {}),
    ("dicebce", {}),
    ("bootstrap", {"beta": 0.8, "mode": "soft"}),
    ("bootstrap", {"beta": 0.8, "mode": "hard"}),
    ("lopsided", {"entropy_weight": 0.3, "mode": "soft"}),
    ("lopsided", {"entropy_weight": 0.3, "mode": "hard"}),
]


def test_design_hand_check_reed_soft() -> None:
    """DESIGN.md: p = 0.8, beta = 0.95, soft: 0.2370064949 (y=1) and 1.5539861380 (y=0)."""
    logit = math.log(0.8 / 0.2)
    loss = BootstrapLoss(beta=0.95, mode="soft", reduction="none")
    values = loss(_as_volume([logit, logit]), _as_volume([1.0, 0.0])).flatten()
    assert values[0].item() == pytest.approx(0.2370064949, abs=1e-9)
    assert values[1].item() == pytest.approx(1.5539861380, abs=1e-9)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("weight", [0.0, 0.25, 0.7, 1.0])
def test_lopsided_three_voxel_hand_values(mode: str, weight: float) -> None:
    loss = LopsidedBootstrapLoss(entropy_weight=weight, mode=mode, reduction="none")
    got = loss(_as_volume(LOGITS_3), _as_volume(LABELS_3)).flatten().tolist()
    expected = [_hand_lopsided(z, y, weight, mode) for z, y in zip(LOGITS_3, LABELS_3)]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("beta", [0.0, 0.6, 0.95, 1.0])
def test_bootstrap_three_voxel_hand_values(mode: str, beta: float) -> None:
    loss = BootstrapLoss(beta=beta, mode=mode, reduction="none")
    got = loss(_as_volume(LOGITS_3), _as_volume(LABELS_3)).flatten().tolist()
    expected = [_hand_bootstrap(z, y, beta, mode) for z, y in zip(LOGITS_3, LABELS_3)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_bce_and_dicebce_three_voxel_hand_values() -> None:
    logits, labels = _as_volume(LOGITS_3), _as_volume(LABELS_3)
    probs = [_sigmoid(z) for z in LOGITS_3]
    bce = [_bce(p, y) for p, y in zip(probs, LABELS_3)]
    assert BCELoss(reduction="none")(logits, labels).flatten().tolist() == pytest.approx(bce)
    # MONAI soft Dice with smooth 1e-5: 1 - (2·Σpy + s) / (Σp + Σy + s), one sample.
    smooth = 1e-5
    intersection = sum(p * y for p, y in zip(probs, LABELS_3))
    dice_loss = 1.0 - (2.0 * intersection + smooth) / (sum(probs) + sum(LABELS_3) + smooth)
    expected_mean = sum(bce) / 3.0 + dice_loss
    assert DiceBCELoss()(logits, labels).item() == pytest.approx(expected_mean, abs=1e-9)
    assert DiceBCELoss(reduction="sum")(logits, labels).item() == pytest.approx(
        3.0 * expected_mean, abs=1e-9
    )


@pytest.mark.parametrize("dims", [2, 3])
def test_entropy_weight_zero_is_exactly_bce(dims: int) -> None:
    # float64: torch's own float32 BCE-with-logits computes log(1 + e^-|z|) without log1p and is
    # itself ~1e-6 off for large |z|; in float64 both are exact far below 1e-7.
    generator = torch.Generator().manual_seed(0)
    shape = (2, 1, 8, 8, 8) if dims == 3 else (3, 1, 16, 16)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 5
    labels = (torch.rand(shape, generator=generator) > 0.7).double()
    reference = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    for mode in ("soft", "hard"):
        got = LopsidedBootstrapLoss(0.0, mode=mode, reduction="none")(logits, labels)
        assert torch.max(torch.abs(got - reference)).item() <= 1e-7
        mean = LopsidedBootstrapLoss(0.0, mode=mode)(logits, labels)
        assert abs(mean.item() - reference.mean().item()) <= 1e-7


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_for_extreme_logits(name: str, params: dict, dtype: torch.dtype) -> None:
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0, 30.0], dtype=dtype).reshape(1, 1, 1, 6)
    labels = torch.tensor([1, 1, 0, 0, 1, 0], dtype=dtype).reshape(1, 1, 1, 6)
    logits.requires_grad_(True)
    loss = make_loss(name, **params)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_gradcheck_float64(name: str, params: dict) -> None:
    generator = torch.Generator().manual_seed(1)
    # Keep logits away from 0 so the hard pseudo-label is constant under gradcheck's perturbation.
    magnitude = torch.rand((2, 1, 3, 3, 3), generator=generator, dtype=torch.float64) * 3 + 0.2
    sign = torch.where(torch.rand((2, 1, 3, 3, 3), generator=generator) > 0.5, 1.0, -1.0)
    logits = (magnitude * sign.double()).requires_grad_(True)
    labels = (torch.rand((2, 1, 3, 3, 3), generator=generator) > 0.6).double()
    loss_fn = make_loss(name, **params)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, labels), (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight", [0.2, 0.5, 0.9])
def test_lopsided_soft_gradient_matches_analytic_derivative(weight: float) -> None:
    """dH(σ(z))/dz = -z·p(1-p), so on background d/dz = (1-λ)p - λ·z·p(1-p); on lesion p - 1.

    With the entropy detached the background gradient would be (1-λ)p: the test tells them apart.
    """
    z = torch.linspace(-6, 6, 25, dtype=torch.float64).reshape(1, 1, 5, 5).requires_grad_(True)
    y = torch.zeros_like(z)
    y[..., 0, :] = 1.0
    LopsidedBootstrapLoss(weight, mode="soft", reduction="sum")(z, y).backward()
    p = torch.sigmoid(z.detach())
    analytic = torch.where(y > 0.5, p - 1.0, (1 - weight) * p - weight * z.detach() * p * (1 - p))
    assert torch.allclose(z.grad, analytic, atol=1e-12)
    detached_version = torch.where(y > 0.5, p - 1.0, (1 - weight) * p)
    assert not torch.allclose(z.grad, detached_version, atol=1e-3)


def test_lopsided_hard_pseudo_label_is_detached() -> None:
    """Hard mode on background: d/dz = (1-λ)p + λ(p - 1[z>0]) — the target carries no gradient."""
    weight = 0.4
    z = torch.tensor([-2.0, -0.3, 0.3, 2.0], dtype=torch.float64).reshape(1, 1, 1, 4)
    z.requires_grad_(True)
    LopsidedBootstrapLoss(weight, mode="hard", reduction="sum")(z, torch.zeros_like(z)).backward()
    p = torch.sigmoid(z.detach())
    analytic = (1 - weight) * p + weight * (p - (z.detach() > 0).double())
    assert torch.allclose(z.grad, analytic, atol=1e-12)


def test_lopsided_trusts_lesion_labels_and_softens_background() -> None:
    """A confident prediction on labelled background (a possibly missed lesion) costs less."""
    z = torch.full((1, 1, 1, 1), 3.0)
    bce = LopsidedBootstrapLoss(0.0)(z, torch.zeros_like(z))
    lopsided = LopsidedBootstrapLoss(0.6)(z, torch.zeros_like(z))
    assert lopsided < bce
    # Lesion-labelled voxels are unaffected by the entropy weight.
    assert LopsidedBootstrapLoss(0.6)(z, torch.ones_like(z)) == LopsidedBootstrapLoss(0.0)(
        z, torch.ones_like(z)
    )


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_reductions_are_consistent(name: str, params: dict) -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn((2, 1, 4, 6), generator=generator)
    labels = (torch.rand((2, 1, 4, 6), generator=generator) > 0.5).float()
    per_voxel = make_loss(name, reduction="none", **params)(logits, labels)
    assert per_voxel.shape == logits.shape
    assert torch.allclose(make_loss(name, **params)(logits, labels), per_voxel.mean())
    assert torch.allclose(
        make_loss(name, reduction="sum", **params)(logits, labels), per_voxel.sum()
    )


def test_integer_labels_accepted() -> None:
    logits = torch.randn(1, 1, 4, 4)
    labels = torch.randint(0, 2, (1, 1, 4, 4), dtype=torch.uint8)
    assert torch.allclose(BCELoss()(logits, labels), BCELoss()(logits, labels.float()))


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="entropy_weight"):
        LopsidedBootstrapLoss(1.5)
    with pytest.raises(ValueError, match="beta"):
        BootstrapLoss(-0.1)
    with pytest.raises(ValueError, match="mode"):
        LopsidedBootstrapLoss(0.5, mode="medium")
    with pytest.raises(ValueError, match="reduction"):
        BCELoss(reduction="max")
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("focal")
    with pytest.raises(ValueError, match="shape"):
        BCELoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="one lesion channel"):
        BCELoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


def test_make_loss_defaults_to_the_config_entropy_weight() -> None:
    """make_loss and the config share one default λ (it was 0.5 against 0.95)."""
    assert DEFAULT_ENTROPY_WEIGHT == 0.95
    assert make_loss("lopsided").entropy_weight == DEFAULT_ENTROPY_WEIGHT
    z, y = torch.tensor([[[[0.5]]]]), torch.zeros(1, 1, 1, 1)
    p = _sigmoid(0.5)
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    expected = 0.05 * _bce(p, 0.0) + 0.95 * entropy
    assert float(make_loss("lopsided")(z, y)) == pytest.approx(expected, rel=1e-6)


def test_only_dice_is_not_voxel_separable() -> None:
    """Meta reweighting refuses losses whose per-voxel form spreads a per-sample term."""
    assert not DiceBCELoss.voxel_separable
    for name in ("bce", "bootstrap", "lopsided"):
        assert make_loss(name).voxel_separable, name
