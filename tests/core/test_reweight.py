"""Meta pixel reweighting: exactness (fast = reference = finite differences), normalisation,
noise detection, BatchNorm side effects, the training step and DistributedDataParallel."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from noisyseg.errors import NoisysegInputError
from noisyseg.losses import (
    BCELoss,
    BootstrapLoss,
    DiceBCELoss,
    LopsidedBootstrapLoss,
    bce_with_logits,
    clean_loss,
)
from noisyseg.models import build_unet
from noisyseg.reweight import (
    head_parameter_names,
    head_weight_correlation,
    meta_pixel_weights,
    meta_reweighted_step,
)

SHAPE = (2, 1, 8, 8, 8)


def small_unet(norm: str = "instance", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_unet(channels=(4, 8), num_res_units=1, norm=norm).double()


def mixed_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``SHAPE`` float64 and labels with both classes (about 30% lesion)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    labels = (torch.rand(SHAPE, generator=generator) < 0.3).double()
    return images, labels


# --------------------------------------------------------------------- fast == reference (U-Net)
@pytest.mark.parametrize(
    "loss",
    [None, LopsidedBootstrapLoss(0.4, "soft"), LopsidedBootstrapLoss(0.4, "hard"), BCELoss()],
    ids=["bce-default", "lopsided-soft", "lopsided-hard", "bce-object"],
)
def test_fast_equals_reference_on_unet(loss) -> None:
    model = small_unet()
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)
    fast = meta_pixel_weights(model, x, y, xc, yc, loss=loss, inner_lr=0.5, method="fast")
    reference = meta_pixel_weights(model, x, y, xc, yc, loss=loss, inner_lr=0.5, method="reference")
    assert fast.shape == y.shape and fast.dtype == torch.float64
    assert not fast.requires_grad
    positive = int((reference > 0).sum())
    assert 0 < positive < reference.numel()  # a non-trivial split, not all or none
    assert (fast - reference).abs().max() <= 1e-6 * reference.max()
    for weights in (fast, reference):
        assert (weights >= 0).all()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------- independent finite-difference check (by hand)
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _bce(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    return -(t * np.log(_sigmoid(z)) + (1 - t) * np.log(1 - _sigmoid(z)))


def test_reference_and_fast_match_finite_differences_of_virtual_step() -> None:
    """Per-pixel logistic regression ``z = w·x + b`` (a 1x1x1 conv, 2 input channels).

    By hand in NumPy: ``∇_w l_j = (σ(z_j) - y_j) x_j``, ``∇_b l_j = σ(z_j) - y_j``; the virtual
    step ``θ'(ε) = θ - α Σ_j ε_j ∇l_j``; ``g_j`` by central differences of ``L_c(θ'(ε))``.
    """
    rng = np.random.default_rng(3)
    model = nn.Conv3d(2, 1, kernel_size=1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.7, -0.4], dtype=torch.float64).view(1, 2, 1, 1, 1))
        model.bias.fill_(0.1)
    x = rng.normal(size=(2, 2, 3, 3, 3))
    y = (rng.random((2, 1, 3, 3, 3)) < 0.5).astype(np.float64)
    xc = rng.normal(size=(1, 2, 3, 3, 3)) + 0.5
    yc = (xc[:, :1] > 0.5).astype(np.float64)
    alpha = 0.3
    w0, b0 = np.array([0.7, -0.4]), 0.1

    def logits(w: np.ndarray, b: float, images: np.ndarray) -> np.ndarray:
        return np.einsum("c,ncdhw->ndhw", w, images)[:, None] + b

    z = logits(w0, b0, x)
    residual = (_sigmoid(z) - y).reshape(-1)  # ∂l_j/∂z_j, pixel order of y.reshape(-1)
    features = np.moveaxis(x, 1, -1).reshape(-1, 2)  # x_j per pixel, same order

    def clean_loss_after_virtual_step(eps: np.ndarray) -> float:
        w = w0 - alpha * (eps * residual) @ features
        b = b0 - alpha * np.sum(eps * residual)
        return float(_bce(logits(w, b, xc), yc).mean())

    h = 1e-5
    g = np.empty(residual.size)
    for j in range(residual.size):
        e = np.zeros(residual.size)
        e[j] = h
        g[j] = (clean_loss_after_virtual_step(e) - clean_loss_after_virtual_step(-e)) / (2 * h)
    expected = np.maximum(-g, 0)
    assert expected.sum() > 0 and (expected == 0).any()
    expected /= expected.sum()

    args = (
        model,
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(xc),
        torch.from_numpy(yc),
    )
    for method in ("reference", "fast"):
        weights = meta_pixel_weights(*args, inner_lr=alpha, method=method).numpy().reshape(-1)
        np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-9 * expected.max())


# --------------------------------------------------------------------- normalisation, all zero
def _constant_logistic_model() -> nn.Module:
    model = nn.Conv3d(1, 1, kernel_size=1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


@pytest.mark.parametrize("method", ["fast", "reference", "head"])
def test_all_zero_when_clean_gradient_opposes_every_pixel(method: str) -> None:
    """``z = 0`` everywhere; noisy pixels ``x = 1, y = 1`` have ``∇l_j = (-0.5, -0.5)``, the clean
    batch ``x = 1, y = 0`` has ``∇L_c = (0.5, 0.5)``: every inner product is -0.5 < 0."""
    model = _constant_logistic_model()
    ones = torch.ones(2, 1, 2, 3, 4, dtype=torch.float64)
    weights = meta_pixel_weights(
        model,
        ones,
        ones,
        ones[:1],
        torch.zeros_like(ones[:1]),
        method=method,
        head=lambda name: True,
    )
    assert weights.shape == ones.shape
    assert torch.equal(weights, torch.zeros_like(ones))


def test_uniform_weights_when_every_pixel_helps_equally() -> None:
    """Same model, clean batch now ``y = 1`` too: every pixel's gradient equals the clean one,
    so all get the same weight ``1 / n``."""
    model = _constant_logistic_model()
    ones = torch.ones(2, 1, 2, 3, 4, dtype=torch.float64)
    weights = meta_pixel_weights(model, ones, ones, ones[:1], ones[:1])
    torch.testing.assert_close(weights, torch.full_like(ones, 1 / ones.numel()))


# ------------------------------------------------------------------------ noise is down-weighted
def test_flipped_pixels_get_less_weight_than_correct_ones() -> None:
    """Lesion = voxel brighter than 0.5. A small CNN trained 28 steps on clean data (clean loss
    about 0.3, still learning, so the clean gradient is informative); then noisy batches with
    half of the pixels' labels flipped. (Once the net is nearly perfect the clean gradient is
    small and noisy while flipped pixels have the largest gradients, and this no longer holds.)
    """
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 1, 1))

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(n, 1, 8, 8, 8)
        return images, (images > 0.5).float()

    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(28):
        xc, yc = batch(2)
        optimizer.zero_grad()
        bce_with_logits(model(xc), yc).mean().backward()
        optimizer.step()
    for _ in range(3):
        x, truth = batch(2)
        flipped = torch.rand_like(truth) < 0.5
        noisy = torch.where(flipped, 1 - truth, truth)
        xc, yc = batch(4)
        for method in ("fast", "reference", "head"):
            weights = meta_pixel_weights(model, x, noisy, xc, yc, method=method, head=1)
            on_flipped = weights[flipped].sum().item()
            on_correct = weights[~flipped].sum().item()
            assert on_flipped < 0.5 * on_correct, (method, on_flipped, on_correct)


# ---------------------------------------------------------------------------- BatchNorm buffers
@pytest.mark.parametrize("method", ["fast", "reference", "head"])
def test_batchnorm_buffers_unchanged_by_weights(method: str) -> None:
    model = small_unet(norm="batch").train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert any("running_mean" in n for n in before)
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)
    meta_pixel_weights(model, x, y, xc, yc, method=method)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize(
    ("method", "share"), [("fast", False), ("fast", True), ("head", True), ("reference", None)]
)
def test_step_updates_batchnorm_stats_once_like_a_plain_forward(method: str, share) -> None:
    model = small_unet(norm="batch").train()
    twin = copy.deepcopy(model)
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta_reweighted_step(model, optimizer, x, y, xc, yc, method=method, share_forward=share)
    twin(x)  # one plain forward of the noisy batch only
    for (name, buffer), (_, expected) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(buffer, expected, rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------ the training step
def _expected_sgd_update(model, x, y, xc, yc, loss, method: str) -> dict[str, torch.Tensor]:
    """Independent: weights from meta_pixel_weights, then a plain weighted loss and SGD(lr=1)."""
    twin = copy.deepcopy(model)
    weights = meta_pixel_weights(twin, x, y, xc, yc, loss=loss, method=method)
    per_pixel = (loss or BCELoss()).per_voxel(twin(x), y)
    grads = torch.autograd.grad((weights * per_pixel).sum(), list(twin.parameters()))
    return {n: p.detach() - g for (n, p), g in zip(twin.named_parameters(), grads)}


@pytest.mark.parametrize(
    ("method", "share"),
    [("fast", False), ("fast", True), ("head", True), ("head", False), ("reference", None)],
)
def test_step_applies_the_weighted_gradient(method: str, share) -> None:
    model = small_unet()
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)
    loss = LopsidedBootstrapLoss(0.3)
    expected = _expected_sgd_update(model, x, y, xc, yc, loss, method)
    before = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = meta_reweighted_step(
        model, optimizer, x, y, xc, yc, loss=loss, method=method, share_forward=share
    )
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=1e-9, atol=1e-12)
    per_pixel = loss.per_voxel(before(x), y)
    assert result.weights.shape == y.shape
    assert result.weights.sum().item() == pytest.approx(1.0)
    assert 0 < result.positive_fraction < 1
    assert result.unweighted_loss == pytest.approx(float(per_pixel.mean()), rel=1e-12)
    assert result.loss == pytest.approx(float((result.weights * per_pixel).sum()), rel=1e-12)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_step_clips_the_weighted_gradient_to_the_given_norm(method: str) -> None:
    """Independent: the unclipped SGD(lr=1) update g, rescaled by hand to norm c = |g| / 4."""
    model = small_unet()
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unclipped = _expected_sgd_update(model, x, y, xc, yc, None, method)
    steps = {n: before[n] - unclipped[n] for n in before}  # g per parameter
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in steps.values())))
    clip = norm / 4
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    meta_reweighted_step(model, optimizer, x, y, xc, yc, method=method, clip_grad_norm=clip)
    for name, parameter in model.named_parameters():
        # torch's documented rule: g * max_norm / (|g| + 1e-6)
        expected = before[name] - steps[name] * (clip / (norm + 1e-6))
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-9, atol=1e-12)
    applied = torch.sqrt(
        sum(((before[n] - p.detach()).double() ** 2).sum() for n, p in model.named_parameters())
    )
    assert float(applied) == pytest.approx(clip, rel=1e-5)


# ------------------------------------------------------------------------------------------ DDP
@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("method", "share"), [("fast", True), ("fast", False), ("head", True)])
def test_step_through_ddp_all_reduces_and_matches_plain_model(gloo_group, method, share) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    plain = small_unet()
    wrapped = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    buckets_reduced: list[int] = []

    def counting_allreduce(state, bucket):
        buckets_reduced.append(bucket.index())
        return allreduce_hook(state, bucket)

    wrapped.register_comm_hook(None, counting_allreduce)
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)
    for model in (plain, wrapped):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        meta_reweighted_step(model, optimizer, x, y, xc, yc, method=method, share_forward=share)
    assert buckets_reduced, "the real backward did not go through DDP's reducer"
    for (name, p), q in zip(plain.named_parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------ head
def test_head_parameter_names_counts_last_modules_and_accepts_predicates() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU(), nn.Conv3d(2, 2, 1), nn.Conv3d(2, 1, 1))
    assert head_parameter_names(model, 1) == ["3.weight", "3.bias"]
    assert head_parameter_names(model, 2) == ["2.weight", "2.bias", "3.weight", "3.bias"]
    assert head_parameter_names(model, lambda n: n.endswith("bias")) == [
        "0.bias",
        "2.bias",
        "3.bias",
    ]


def test_head_with_every_parameter_is_the_exact_method() -> None:
    model = small_unet()
    x, y = mixed_batch(1)
    xc, yc = mixed_batch(2)

    def everything(name: str) -> bool:
        return True

    exact = meta_pixel_weights(model, x, y, xc, yc, method="fast")
    head = meta_pixel_weights(model, x, y, xc, yc, method="head", head=everything)
    torch.testing.assert_close(head, exact, rtol=1e-10, atol=1e-14)
    assert head_weight_correlation(model, x, y, xc, yc, head=everything) == pytest.approx(1.0)
    partial = head_weight_correlation(model, x, y, xc, yc)  # default: last layers only
    assert -1.0 <= partial < 1.0 - 1e-9


# ----------------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_programming_errors() -> None:
    """The core gets validated configs: a wrong argument is a ValueError/TypeError, never the
    user-input error type (which the CLI would print without a traceback)."""
    model = small_unet()
    x, y = mixed_batch(1)
    cases = [
        (ValueError, "method", {"method": "exactish"}, (x, y, x, y)),
        (ValueError, "inner_lr", {"inner_lr": 0.0}, (x, y, x, y)),
        (ValueError, "noisy labels", {}, (x, y[:1], x, y)),
        (ValueError, "clean labels", {}, (x, y, x, y[:1])),
        (
            ValueError,
            "one value per pixel",
            {"loss": lambda z, t: bce_with_logits(z, t).mean()},
            (x, y, x, y),
        ),
        (TypeError, "loss must be", {"loss": 3}, (x, y, x, y)),
        (ValueError, "sync=True needs", {"sync": True}, (x, y, x, y)),
    ]
    for kind, message, kwargs, batches in cases:
        with pytest.raises(kind, match=message) as raised:
            meta_pixel_weights(model, *batches, **kwargs)
        assert not isinstance(raised.value, NoisysegInputError), message


# ------------------------------------------------------- the clean objective is BCE (by hand)
def _dl_dz(z: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """∂l/∂z per pixel, by hand: BCE ``σ - y``; ``dH/dz = -z σ (1 - σ)``;
    lopsided (λ = 0.6): ``σ - 1`` on lesion, ``(1-λ) σ + λ dH/dz`` on background;
    bootstrap (β = 0.7): ``β (σ - y) + (1-β) dH/dz``."""
    p = _sigmoid(z)
    d_entropy = -z * p * (1 - p)
    if loss == "bce":
        return p - y
    if loss == "lopsided":
        return np.where(y > 0.5, p - 1, 0.4 * p + 0.6 * d_entropy)
    return 0.7 * (p - y) + 0.3 * d_entropy


TRAINING_LOSSES = {
    "bce": None,
    "lopsided": LopsidedBootstrapLoss(0.6, "soft"),
    "bootstrap": BootstrapLoss(0.7, "soft"),
}


def _logistic_problem():
    """A 1x1x1 conv ``z = w·x + b`` (2 input channels) and noisy/clean batches (NumPy)."""
    rng = np.random.default_rng(7)
    model = nn.Conv3d(2, 1, kernel_size=1).double()
    w0, b0 = np.array([0.9, -0.5]), -0.2
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w0).view(1, 2, 1, 1, 1))
        model.bias.fill_(b0)
    x = rng.normal(size=(2, 2, 3, 3, 3))
    y = (rng.random((2, 1, 3, 3, 3)) < 0.4).astype(np.float64)
    xc = rng.normal(size=(3, 2, 3, 3, 3))
    yc = (xc[:, :1] + 0.3 * xc[:, 1:] > 0.6).astype(np.float64)
    return model, (w0, b0), x, y, xc, yc


def _hand_weights(w0, b0, x, y, xc, yc, loss: str, clean: str, balanced: bool = False):
    """Weights of Ren et al. at ε = 0 from hand gradients: ``max(⟨∇L_c, ∇l_j⟩, 0)``, normalised;
    ``L_c`` is mean BCE (``clean="bce"``) or, for the counter-example, the training loss."""
    zc = np.einsum("c,ncdhw->ndhw", w0, xc)[:, None] + b0
    dc = _dl_dz(zc, yc, clean).reshape(-1)
    fc = np.concatenate([np.moveaxis(xc, 1, -1).reshape(-1, 2), np.ones((dc.size, 1))], axis=1)
    if balanced:
        lesion = yc.reshape(-1) > 0.5
        grad_c = 0.5 * (dc[lesion] @ fc[lesion]) / lesion.sum()
        grad_c += 0.5 * (dc[~lesion] @ fc[~lesion]) / (~lesion).sum()
    else:
        grad_c = dc @ fc / dc.size
    z = np.einsum("c,ncdhw->ndhw", w0, x)[:, None] + b0
    dn = _dl_dz(z, y, loss).reshape(-1)
    fn = np.concatenate([np.moveaxis(x, 1, -1).reshape(-1, 2), np.ones((dn.size, 1))], axis=1)
    scores = np.maximum(dn * (fn @ grad_c), 0)
    return (scores / scores.sum()).reshape(y.shape), float(_bce(zc, yc).mean())


@pytest.mark.parametrize("loss_name", sorted(TRAINING_LOSSES))
def test_clean_objective_is_bce_whatever_the_training_loss(loss_name: str) -> None:
    model, (w0, b0), x, y, xc, yc = _logistic_problem()
    want, want_clean = _hand_weights(w0, b0, x, y, xc, yc, loss_name, "bce")
    tensors = [torch.from_numpy(a) for a in (x, y, xc, yc)]
    loss = TRAINING_LOSSES[loss_name]
    for method in ("fast", "reference"):
        got = meta_pixel_weights(model, *tensors, loss=loss, inner_lr=0.3, method=method)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    if loss_name != "bce":  # measuring the clean batch with the training loss would differ
        wrong, _ = _hand_weights(w0, b0, x, y, xc, yc, loss_name, loss_name)
        assert np.abs(wrong - want).max() > 0.05 * want.max()
    for method, share in (("fast", False), ("fast", True), ("reference", None)):
        twin = copy.deepcopy(model)
        optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
        result = meta_reweighted_step(
            twin, optimizer, *tensors, loss=loss, method=method, share_forward=share
        )
        np.testing.assert_allclose(result.weights.numpy(), want, rtol=1e-9, atol=1e-12)
        assert result.clean_loss == pytest.approx(want_clean, rel=1e-12)


def test_class_balanced_clean_objective_by_hand() -> None:
    model, (w0, b0), x, y, xc, yc = _logistic_problem()
    assert 0 < yc.mean() < 0.5  # both classes, unbalanced
    want, _ = _hand_weights(w0, b0, x, y, xc, yc, "lopsided", "bce", balanced=True)
    plain, _ = _hand_weights(w0, b0, x, y, xc, yc, "lopsided", "bce")
    assert np.abs(want - plain).max() > 0.05 * want.max()  # the flag changes the weights
    tensors = [torch.from_numpy(a) for a in (x, y, xc, yc)]
    loss = TRAINING_LOSSES["lopsided"]
    for method in ("fast", "reference"):
        got = meta_pixel_weights(
            model, *tensors, loss=loss, method=method, class_balanced_clean=True
        )
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    # the objective itself: half the mean BCE on lesion voxels plus half on background
    z = torch.tensor([[[[2.0, -1.0, 0.5, 0.0]]]])
    t = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    per = bce_with_logits(z, t)[0, 0, 0]
    expected = 0.5 * per[0] + 0.5 * per[1:].mean()
    assert float(clean_loss(z, t, class_balanced=True)) == pytest.approx(float(expected))
    assert float(clean_loss(z, t)) == pytest.approx(float(per.mean()))
    assert float(clean_loss(z, torch.zeros_like(t), class_balanced=True)) == pytest.approx(
        float(bce_with_logits(z, torch.zeros_like(t)).mean())
    )


def test_non_separable_loss_is_refused() -> None:
    model, _, x, y, xc, yc = _logistic_problem()
    tensors = [torch.from_numpy(a) for a in (x, y, xc, yc)]
    with pytest.raises(ValueError, match="voxel-separable"):
        meta_pixel_weights(model, *tensors, loss=DiceBCELoss())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="DiceBCELoss"):
        meta_reweighted_step(model, optimizer, *tensors, loss=DiceBCELoss())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_step_reports_lesion_shares() -> None:
    model, (w0, b0), x, y, xc, yc = _logistic_problem()
    want, _ = _hand_weights(w0, b0, x, y, xc, yc, "lopsided", "bce")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tensors = [torch.from_numpy(a) for a in (x, y, xc, yc)]
    result = meta_reweighted_step(model, optimizer, *tensors, loss=TRAINING_LOSSES["lopsided"])
    assert result.lesion_weight_share == pytest.approx(want[y > 0.5].sum() / want.sum())
    assert 0 < result.lesion_weight_share < 1
    assert result.noisy_lesion_fraction == pytest.approx(y.mean())
    assert result.clean_lesion_fraction == pytest.approx(yc.mean())
    assert result.positive_fraction == pytest.approx((want > 0).mean())
    logged = result.log_metrics()
    assert logged["train/lesion_weight_share"] == result.lesion_weight_share
    assert set(logged) == {
        "train/unweighted_loss",
        "train/clean_loss",
        "train/positive_fraction",
        "train/lesion_weight_share",
        "train/noisy_lesion_fraction",
        "train/clean_lesion_fraction",
    }
