"""Meta-learned pixel reweighting (Ren et al. 2018 per example; Mirikharaji et al. 2019 per pixel).

Per training step there is a noisy batch ``(x, y)`` with per-pixel losses ``l_j(θ)`` and a small
clean batch with mean loss ``L_c(θ)``; ``α`` is the inner (virtual) learning rate.

* **reference** (Ren et al.): ``θ'(ε) = θ - α ∇θ Σ_j ε_j l_j(θ)`` with the graph kept, then
  ``g_j = ∂ L_c(θ'(ε)) / ∂ε_j`` at ``ε = 0`` by a double backward.
* **fast** (exact, same numbers): at ``ε = 0``, ``θ' = θ``, so
  ``g_j = -α ⟨∇θ L_c(θ), ∇θ l_j(θ)⟩``. One clean forward/backward gives ``v = ∇θ L_c``; one
  forward of the noisy batch whose parameters are forward-mode dual tensors with tangent ``v``
  gives every ``⟨∇θ l_j, v⟩`` at once (the tangent of the per-pixel loss).
* **head** (approximate): as ``fast`` but only the last layers' parameters are differentiated
  (:func:`head_parameter_names`); :func:`head_weight_correlation` reports how well it agrees.

Weights: ``w̃ = max(-g, 0)``, ``w = w̃ / Σ w̃`` over every pixel of the batch; when ``Σ w̃ = 0``
(no pixel's gradient helps the clean loss) the all-zero ``w̃`` is returned as is.

:func:`meta_reweighted_step` is the training step: it computes the weights and makes the real
update ``Σ_j w_j l_j(θ)`` (``w`` constant). With ``share_forward`` the dual forward also builds
the ordinary autograd graph, so the real update needs only one more backward (per step: one clean
forward + backward, one noisy forward carrying tangents, one noisy backward); without it the real
update does its own plain forward (see the function for which is faster when).

BatchNorm: the clean and virtual passes run in the model's current mode but every buffer (running
mean/var, ``num_batches_tracked``) is restored afterwards, so :func:`meta_pixel_weights` has no
side effects; in :func:`meta_reweighted_step` only the real noisy forward updates running stats,
exactly once, as a standard step would.

DistributedDataParallel: pass the DDP-wrapped model. The clean gradient and the virtual passes use
``model.module`` (no gradient all-reduce, nothing accumulated in ``.grad``: they use
``torch.autograd.grad``), each rank weighting its own noisy batch against its own clean batch
(optionally against the all-reduced clean gradient, ``sync_clean_gradient=True``). The real
forward goes through the DDP wrapper itself (``torch.func.functional_call`` on the wrapper with
the dual parameters as views of the real ones), so DDP prepares its reducer and the real backward
all-reduces the gradients as in any DDP step.

Shapes: images ``(N, C, *spatial)``, labels and logits ``(N, 1, *spatial)``, 2D or 3D; the clean
batch may have a different ``N``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

from noisyseg.errors import NoisysegInputError
from noisyseg.losses import bce_with_logits
from noisyseg.models import unwrap_model

Method = Literal["fast", "reference", "head"]
METHODS: tuple[str, ...] = ("fast", "reference", "head")
#: Default head: the parameters of the last 3 parameter-owning modules. On the default MONAI
#: U-Net these are the instance norm and PReLU after the final transposed conv and the output
#: conv. Including the transposed conv itself (4) correlates slightly better with the exact
#: weights but its weight gradient at full resolution costs more than the rest of the head.
DEFAULT_HEAD_MODULES = 3

PixelLoss = Callable[[Tensor, Tensor], Tensor]
HeadSpec = int | Callable[[str], bool]


# ----------------------------------------------------------------------------------- plumbing
def _pixel_loss(loss: object | None) -> PixelLoss:
    """Per-pixel loss ``(logits, labels) -> (N, 1, *spatial)`` for ``loss`` (None means BCE).

    Losses of :mod:`noisyseg.losses` are used through their ``per_voxel`` form whatever their
    ``reduction``; any other callable must itself return a per-pixel tensor shaped like logits.
    """
    if loss is None:
        base: PixelLoss = bce_with_logits
    elif hasattr(loss, "per_voxel"):
        base = loss.per_voxel  # type: ignore[union-attr]
    elif callable(loss):
        base = loss  # type: ignore[assignment]
    else:
        raise NoisysegInputError(f"loss must be None, a noisyseg loss or a callable, got {loss!r}")

    def per_pixel(logits: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != logits.shape:
            raise NoisysegInputError(
                f"labels shape {tuple(labels.shape)} differs from logits shape "
                f"{tuple(logits.shape)}"
            )
        out = base(logits, labels.to(device=logits.device, dtype=logits.dtype))
        if out.shape != logits.shape:
            raise NoisysegInputError(
                f"the reweighted loss must give one value per pixel (shape {tuple(logits.shape)}), "
                f"got shape {tuple(out.shape)}; pass a noisyseg loss or reduction='none'"
            )
        return out

    return per_pixel


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running stats, counters) of ``module`` on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def head_parameter_names(model: nn.Module, head: HeadSpec = DEFAULT_HEAD_MODULES) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the trainable "head" parameters.

    Args:
        model: the network (DDP wrapper accepted; names are those of the unwrapped module).
        head: an ``int k`` — the parameters of the last ``k`` modules (in registration order)
            that directly own trainable parameters; or a predicate on parameter names.
    """
    inner = unwrap_model(model)
    if callable(head):
        names = [n for n, p in inner.named_parameters() if p.requires_grad and head(n)]
    else:
        if int(head) < 1:
            raise NoisysegInputError(f"head must count at least 1 module, got {head}")
        owners = [
            name
            for name, module in inner.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        ]
        chosen = owners[-int(head) :]
        names = []
        for owner in chosen:
            module = inner.get_submodule(owner)
            prefix = f"{owner}." if owner else ""
            names += [
                prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad
            ]
    if not names:
        raise NoisysegInputError("head selects no trainable parameter")
    return names


def _selected(model: nn.Module, method: str, head: HeadSpec) -> dict[str, Tensor]:
    """Trainable parameters the weights differentiate: all of them, or the head's."""
    if method not in METHODS:
        raise NoisysegInputError(f"method must be one of {METHODS}, got {method!r}")
    inner = unwrap_model(model)
    params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    if method == "head":
        return {n: params[n] for n in head_parameter_names(inner, head)}
    if not params:
        raise NoisysegInputError("the model has no trainable parameter")
    return params


def _check_batches(
    noisy_images: Tensor,
    noisy_labels: Tensor,
    clean_images: Tensor,
    clean_labels: Tensor,
    inner_lr: float,
) -> None:
    if (
        noisy_labels.shape[0] != noisy_images.shape[0]
        or noisy_labels.shape[2:] != noisy_images.shape[2:]
    ):
        raise NoisysegInputError(
            f"noisy labels {tuple(noisy_labels.shape)} do not match noisy images "
            f"{tuple(noisy_images.shape)}"
        )
    if (
        clean_labels.shape[0] != clean_images.shape[0]
        or clean_labels.shape[2:] != clean_images.shape[2:]
    ):
        raise NoisysegInputError(
            f"clean labels {tuple(clean_labels.shape)} do not match clean images "
            f"{tuple(clean_images.shape)}"
        )
    if not inner_lr > 0:
        raise NoisysegInputError(f"inner_lr must be > 0, got {inner_lr}")


def _prepare(
    model: nn.Module,
    noisy_images: Tensor,
    noisy_labels: Tensor,
    clean_images: Tensor,
    clean_labels: Tensor,
    loss: object | None,
    inner_lr: float,
    method: str,
    head: HeadSpec,
) -> tuple[PixelLoss, nn.Module, dict[str, Tensor]]:
    """Check the public functions' arguments; ``(per-pixel loss, unwrapped model, selected
    parameters)``."""
    _check_batches(noisy_images, noisy_labels, clean_images, clean_labels, inner_lr)
    per_pixel = _pixel_loss(loss)
    inner = unwrap_model(model)
    return per_pixel, inner, _selected(inner, method, head)


def _normalise(scores: Tensor) -> Tensor:
    """``w̃ = max(scores, 0)``, divided by its sum when the sum is positive (else all zero)."""
    clipped = scores.clamp(min=0)
    total = clipped.sum()
    return clipped / total if total > 0 else clipped


# ------------------------------------------------------------------------------------- passes
def _clean_gradient(
    inner: nn.Module,
    selected: dict[str, Tensor],
    clean_images: Tensor,
    clean_labels: Tensor,
    per_pixel: PixelLoss,
    sync: bool,
) -> tuple[dict[str, Tensor], float]:
    """``v = ∇ L_c`` over the selected parameters (detached), and ``L_c``; buffers untouched."""
    with preserved_buffers(inner):
        all_params = dict(inner.named_parameters())
        if len(selected) == sum(p.requires_grad for p in all_params.values()):
            logits = inner(clean_images)
        else:  # head: no graph through the body, so its backward is never built
            params = {
                n: (selected[n] if n in selected else p.detach()) for n, p in all_params.items()
            }
            logits = functional_call(inner, params, (clean_images,))
        clean_loss = per_pixel(logits, clean_labels).mean()
        grads = torch.autograd.grad(clean_loss, list(selected.values()), allow_unused=True)
    tangents = {
        n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(selected.items(), grads)
    }
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        flat = torch.cat([t.reshape(-1) for t in tangents.values()])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for n, t in tangents.items():
            tangents[n] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
    return tangents, float(clean_loss.detach())


def _dual_forward(
    forward_module: nn.Module,
    prefix: str,
    selected: dict[str, Tensor],
    tangents: dict[str, Tensor],
    noisy_images: Tensor,
    noisy_labels: Tensor,
    per_pixel: PixelLoss,
    attach: bool,
) -> tuple[Tensor, Tensor]:
    """One noisy forward with dual parameters: ``(per-pixel loss, its tangent ⟨∇l_j, v⟩)``.

    With ``attach`` the dual parameters are differentiable views of the real ones, so the
    returned per-pixel loss carries the ordinary autograd graph to the real parameters.
    """
    grad_mode = contextlib.nullcontext() if attach else torch.no_grad()
    with grad_mode, fwAD.dual_level():
        duals = {
            prefix + n: fwAD.make_dual(p if attach else p.detach(), tangents[n])
            for n, p in selected.items()
        }
        logits = functional_call(forward_module, duals, (noisy_images,), strict=False)
        dual_loss = per_pixel(logits, noisy_labels)
        primal, tangent = fwAD.unpack_dual(dual_loss)
        if tangent is None:  # the loss does not depend on the selected parameters
            tangent = torch.zeros_like(primal)
        tangent = tangent.detach()
    # Outside the level the dual tensor is an ordinary tensor holding the primal value.
    return dual_loss, tangent


def _graph_free_tangent(
    inner: nn.Module,
    selected: dict[str, Tensor],
    tangents: dict[str, Tensor],
    noisy_images: Tensor,
    noisy_labels: Tensor,
    per_pixel: PixelLoss,
) -> Tensor:
    """``⟨∇l_j, v⟩`` per noisy pixel (shaped like ``noisy_labels``, detached) from a
    gradient-free dual forward of the unwrapped model; running stats (BatchNorm) kept."""
    with preserved_buffers(inner):
        _, tangent = _dual_forward(
            inner, "", selected, tangents, noisy_images, noisy_labels, per_pixel, attach=False
        )
    return tangent


def _reference_scores(
    inner: nn.Module,
    selected: dict[str, Tensor],
    noisy_images: Tensor,
    noisy_labels: Tensor,
    clean_images: Tensor,
    clean_labels: Tensor,
    per_pixel: PixelLoss,
    inner_lr: float,
) -> Tensor:
    """``-g_j`` by Ren et al.'s virtual step with the graph kept and a double backward."""
    with preserved_buffers(inner):
        all_params = dict(inner.named_parameters())
        base = {n: (selected[n] if n in selected else p.detach()) for n, p in all_params.items()}
        noisy = per_pixel(functional_call(inner, base, (noisy_images,)), noisy_labels)
        eps = torch.zeros_like(noisy, requires_grad=True)
        grads = torch.autograd.grad(
            (eps * noisy).sum(), list(selected.values()), create_graph=True, allow_unused=True
        )
        virtual = dict(base)
        for (n, p), g in zip(selected.items(), grads):
            if g is not None:
                virtual[n] = p - inner_lr * g
        clean = per_pixel(functional_call(inner, virtual, (clean_images,)), clean_labels).mean()
        (g_eps,) = torch.autograd.grad(clean, eps, allow_unused=True)
    if g_eps is None:
        return torch.zeros_like(noisy).detach()
    return -g_eps.detach()


# ---------------------------------------------------------------------------------- public API
def meta_pixel_weights(
    model: nn.Module,
    noisy_images: Tensor,
    noisy_labels: Tensor,
    clean_images: Tensor,
    clean_labels: Tensor,
    *,
    loss: object | None = None,
    inner_lr: float = 1.0,
    method: Method = "fast",
    head: HeadSpec = DEFAULT_HEAD_MODULES,
    sync_clean_gradient: bool = False,
) -> Tensor:
    """Meta-learned per-pixel weights of the noisy batch (no parameter or buffer is changed).

    Args:
        model: network mapping images ``(N, C, *spatial)`` to logits ``(N, 1, *spatial)``;
            used in its current train/eval mode; DDP wrapper accepted.
        noisy_images, noisy_labels: ``(N, C, *S)`` and ``(N, 1, *S)`` (labels in ``{0, 1}``).
        clean_images, clean_labels: ``(M, C, *S')`` and ``(M, 1, *S')``.
        loss: ``None`` (BCE with logits) or a :mod:`noisyseg.losses` loss (its per-voxel form on
            the noisy batch, its mean on the clean batch), or a callable returning per-pixel loss.
        inner_lr: ``α > 0`` of the virtual step (a positive scale; the normalised weights do not
            depend on it).
        method: ``"fast"`` (exact, forward mode), ``"reference"`` (virtual step + double
            backward) or ``"head"`` (``fast`` restricted to :func:`head_parameter_names`).
        head: which parameters ``"head"`` differentiates (count of last modules or predicate).
        sync_clean_gradient: under ``torch.distributed``, average ``∇L_c`` over ranks first.

    Returns:
        Detached weights shaped like ``noisy_labels`` in the logits' dtype, ``>= 0``, summing to 1
        over the whole batch, or all zero when no pixel's gradient agrees with the clean one.
    """
    per_pixel, inner, selected = _prepare(
        model, noisy_images, noisy_labels, clean_images, clean_labels, loss, inner_lr, method, head
    )
    if method == "reference":
        scores = _reference_scores(
            inner,
            selected,
            noisy_images,
            noisy_labels,
            clean_images,
            clean_labels,
            per_pixel,
            inner_lr,
        )
    else:
        tangents, _ = _clean_gradient(
            inner, selected, clean_images, clean_labels, per_pixel, sync_clean_gradient
        )
        tangent = _graph_free_tangent(
            inner, selected, tangents, noisy_images, noisy_labels, per_pixel
        )
        scores = inner_lr * tangent  # -g_j = α ⟨∇L_c, ∇l_j⟩
    return _normalise(scores).detach()


@dataclass
class MetaStepResult:
    """Outcome of one :func:`meta_reweighted_step`.

    Attributes:
        loss: the weighted loss ``Σ_j w_j l_j`` that was minimised (nats; weights sum to 1).
        weights: detached pixel weights shaped like the noisy labels.
        unweighted_loss: mean per-pixel loss of the noisy batch (nats), for logging.
        clean_loss: mean loss of the clean batch before the update (nats; NaN for "reference",
            which does not compute it separately).
        positive_fraction: fraction of noisy pixels with a non-zero weight.
    """

    loss: float
    weights: Tensor
    unweighted_loss: float
    clean_loss: float
    positive_fraction: float


def meta_reweighted_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    noisy_images: Tensor,
    noisy_labels: Tensor,
    clean_images: Tensor,
    clean_labels: Tensor,
    *,
    loss: object | None = None,
    inner_lr: float = 1.0,
    method: Method = "fast",
    head: HeadSpec = DEFAULT_HEAD_MODULES,
    sync_clean_gradient: bool = False,
    share_forward: bool | None = None,
) -> MetaStepResult:
    """One training step with meta pixel reweighting: weights, then the real weighted update.

    ``fast``/``head``: clean forward + backward (``v = ∇L_c`` by ``torch.autograd.grad``, so no
    ``.grad`` is touched and DDP does not all-reduce it), then the noisy batch:

    * ``share_forward=True`` (default for ``head``): one noisy forward through ``model`` (the DDP
      wrapper when there is one) whose parameters are dual tensors — differentiable views of the
      real parameters — gives the tangents (hence the weights) *and* the autograd graph of the
      real loss; then the weighted backward.
    * ``share_forward=False`` (default for ``fast``): a gradient-free dual forward for the
      tangents, then an ordinary forward/backward through ``model``. Measured faster on CPU
      for full-network tangents: with the graph on, autograd also records every tangent
      operation (the primal inputs of the JVP formulas require grad), which costs more than the
      plain forward it saves (benchmarks/RESULTS.md).

    Then ``optimizer.zero_grad()``, ``(Σ w_j l_j).backward()``, ``optimizer.step()``.
    ``reference``: :func:`meta_pixel_weights` then an ordinary weighted forward/backward/step.
    Arguments as in :func:`meta_pixel_weights`. The model's running stats (BatchNorm) are
    updated once, by the real noisy forward.
    """
    per_pixel, inner, selected = _prepare(
        model, noisy_images, noisy_labels, clean_images, clean_labels, loss, inner_lr, method, head
    )
    clean_loss = float("nan")
    if share_forward is None:
        share_forward = method == "head"
    if method == "reference":
        weights = meta_pixel_weights(
            model,
            noisy_images,
            noisy_labels,
            clean_images,
            clean_labels,
            loss=loss,
            inner_lr=inner_lr,
            method="reference",
        )
        per = per_pixel(model(noisy_images), noisy_labels)
    else:
        tangents, clean_loss = _clean_gradient(
            inner, selected, clean_images, clean_labels, per_pixel, sync_clean_gradient
        )
        if share_forward:
            prefix = "module." if inner is not model else ""
            per, tangent = _dual_forward(
                model,
                prefix,
                selected,
                tangents,
                noisy_images,
                noisy_labels,
                per_pixel,
                attach=True,
            )
        else:
            tangent = _graph_free_tangent(
                inner, selected, tangents, noisy_images, noisy_labels, per_pixel
            )
            per = per_pixel(model(noisy_images), noisy_labels)
        weights = _normalise(inner_lr * tangent)
    weighted = (weights * per).sum()
    optimizer.zero_grad(set_to_none=True)
    weighted.backward()
    optimizer.step()
    return MetaStepResult(
        loss=float(weighted.detach()),
        weights=weights,
        unweighted_loss=float(per.detach().mean()),
        clean_loss=clean_loss,
        positive_fraction=float((weights > 0).float().mean()),
    )


def head_weight_correlation(
    model: nn.Module,
    noisy_images: Tensor,
    noisy_labels: Tensor,
    clean_images: Tensor,
    clean_labels: Tensor,
    *,
    loss: object | None = None,
    inner_lr: float = 1.0,
    head: HeadSpec = DEFAULT_HEAD_MODULES,
) -> float:
    """Pearson correlation between ``head`` weights and exact (``fast``) weights on one batch.

    Returns a value in ``[-1, 1]``; NaN when either weight map is constant (e.g. all zero).
    """
    kwargs = {"loss": loss, "inner_lr": inner_lr}
    exact = meta_pixel_weights(
        model, noisy_images, noisy_labels, clean_images, clean_labels, method="fast", **kwargs
    )
    approx = meta_pixel_weights(
        model,
        noisy_images,
        noisy_labels,
        clean_images,
        clean_labels,
        method="head",
        head=head,
        **kwargs,
    )
    a = exact.reshape(-1).double()
    b = approx.reshape(-1).double()
    a = a - a.mean()
    b = b - b.mean()
    denom = a.norm() * b.norm()
    if denom == 0:
        return float("nan")
    return float((a @ b) / denom)


__all__ = [
    "DEFAULT_HEAD_MODULES",
    "METHODS",
    "MetaStepResult",
    "head_parameter_names",
    "head_weight_correlation",
    "meta_pixel_weights",
    "meta_reweighted_step",
    "preserved_buffers",
]
