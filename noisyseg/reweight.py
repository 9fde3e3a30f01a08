"""Meta-learned pixel reweighting (Ren et al. 2018 per example; Mirikharaji et al. 2019 per pixel).

Per training step there is a noisy batch ``(x, y)`` with per-pixel losses ``l_j(θ)`` (the training
loss: BCE, Reed bootstrap or the lopsided bootstrap — any voxel-separable loss) and a small clean
batch with objective ``L_c(θ)``; ``α`` is the inner (virtual) learning rate.

**The clean objective is always mean BCE on the clean labels**
(:func:`~noisyseg.losses.clean_loss`), whatever the training loss, as in Ren et al. and
Mirikharaji et al.: the clean set says what "correct" means, the training loss only shapes the
noisy voxels' gradients. So ``--loss lopsided --reweight meta``
is the lopsided loss on the noisy voxels, weighted by clean-BCE meta weights. A loss that is not
voxel-separable (Dice+BCE: its per-voxel form spreads a per-sample Dice over the voxels) is
refused (``ValueError``). ``class_balanced_clean=True`` (a deviation from both papers, off by
default) averages the clean BCE per class instead (:func:`noisyseg.losses.clean_loss`).

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
``model.module`` (nothing accumulated in ``.grad``: they use ``torch.autograd.grad``). With
``sync`` (default: on when the model is DDP-wrapped and a process group is initialised) the
clean gradient is averaged over ranks (all-reduce) and ``Σ w̃`` is the global sum (all-reduce),
and the real loss is multiplied by the world size so DDP's gradient *average* is the gradient of
the global ``Σ_j w_j l_j``: with equal per-rank batches, N ranks give exactly the weights and the
update of one process on the concatenated noisy and clean batches (tests/test_meta_ddp.py). The
real forward goes through the DDP wrapper itself (``torch.func.functional_call`` on the wrapper
with the dual parameters as views of the real ones), so DDP prepares its reducer and the real
backward all-reduces the gradients as in any DDP step. The ``reference`` method is single-process
(the test oracle) and refuses ``sync`` over more than one rank.

Shapes: images ``(N, C, *spatial)``, labels and logits ``(N, 1, *spatial)``, 2D or 3D; the clean
batch may have a different ``N`` and spatial size.

Errors: arguments here come from validated configs, so a wrong shape, method or loss is a
programming error (``ValueError`` / ``TypeError``), not a user-input error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from noisyseg.losses import bce_with_logits, clean_loss
from noisyseg.models import unwrap_model

Method = Literal["fast", "reference", "head"]
METHODS: tuple[str, ...] = ("fast", "reference", "head")
#: Default head: the parameters of the last 3 parameter-owning modules. On the default MONAI
#: U-Net these are the instance norm and PReLU after the final transposed conv and the output
#: conv. Including the transposed conv itself (4) correlates slightly better with the exact
#: weights but its weight gradient at full resolution costs more than the rest of the head.
DEFAULT_HEAD_MODULES = 3

PixelLoss = Callable[[Tensor, Tensor], Tensor]
CleanObjective = Callable[[Tensor, Tensor], Tensor]
HeadSpec = int | Callable[[str], bool]


# ------------------------------------------------------------------------------ clean objective
def _clean_objective(class_balanced: bool) -> CleanObjective:
    def objective(logits: Tensor, labels: Tensor) -> Tensor:
        return clean_loss(logits, labels, class_balanced=class_balanced)

    return objective


def _sync_world(model: nn.Module, sync: bool | None) -> int:
    """Number of ranks the weights are computed over: the world size when syncing, else 1.

    ``sync=None``: sync when ``model`` is DistributedDataParallel and a process group is up.
    """
    ready = dist.is_available() and dist.is_initialized()
    if sync is None:
        sync = ready and isinstance(model, nn.parallel.DistributedDataParallel)
    if not sync:
        return 1
    if not ready:
        raise ValueError("sync=True needs an initialised torch.distributed process group")
    return dist.get_world_size()


# ----------------------------------------------------------------------------------- plumbing
def _pixel_loss(loss: object | None) -> PixelLoss:
    """Per-pixel loss ``(logits, labels) -> (N, 1, *spatial)`` for ``loss`` (None means BCE).

    Losses of :mod:`noisyseg.losses` are used through their ``per_voxel`` form whatever their
    ``reduction``; any other callable must itself return a per-pixel tensor shaped like logits.
    A loss whose ``voxel_separable`` attribute is False (Dice+BCE) is refused: a per-voxel weight
    cannot weight its per-sample Dice term voxel by voxel.
    """
    if getattr(loss, "voxel_separable", True) is False:
        raise ValueError(
            f"meta reweighting needs a voxel-separable training loss; {type(loss).__name__} "
            "spreads a per-sample term over the voxels (use bce, bootstrap or lopsided)"
        )
    if loss is None:
        base: PixelLoss = bce_with_logits
    elif hasattr(loss, "per_voxel"):
        base = loss.per_voxel  # type: ignore[union-attr]
    elif callable(loss):
        base = loss  # type: ignore[assignment]
    else:
        raise TypeError(f"loss must be None, a noisyseg loss or a callable, got {loss!r}")

    def per_pixel(logits: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != logits.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} differs from logits shape "
                f"{tuple(logits.shape)}"
            )
        out = base(logits, labels.to(device=logits.device, dtype=logits.dtype))
        if out.shape != logits.shape:
            raise ValueError(
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
            raise ValueError(f"head must count at least 1 module, got {head}")
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
        raise ValueError("head selects no trainable parameter")
    return names


def _selected(model: nn.Module, method: str, head: HeadSpec) -> dict[str, Tensor]:
    """Trainable parameters the weights differentiate: all of them, or the head's."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inner = unwrap_model(model)
    params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    if method == "head":
        return {n: params[n] for n in head_parameter_names(inner, head)}
    if not params:
        raise ValueError("the model has no trainable parameter")
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
        raise ValueError(
            f"noisy labels {tuple(noisy_labels.shape)} do not match noisy images "
            f"{tuple(noisy_images.shape)}"
        )
    if (
        clean_labels.shape[0] != clean_images.shape[0]
        or clean_labels.shape[2:] != clean_images.shape[2:]
    ):
        raise ValueError(
            f"clean labels {tuple(clean_labels.shape)} do not match clean images "
            f"{tuple(clean_images.shape)}"
        )
    if not inner_lr > 0:
        raise ValueError(f"inner_lr must be > 0, got {inner_lr}")


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


def _normalise(scores: Tensor, world: int = 1) -> Tensor:
    """``w̃ = max(scores, 0)``, divided by its sum when the sum is positive (else all zero).

    ``world > 1``: the sum is the global one, all-reduced over the ranks.
    """
    clipped = scores.clamp(min=0)
    total = clipped.sum()
    if world > 1:
        dist.all_reduce(total)
    return clipped / total if total > 0 else clipped


# ------------------------------------------------------------------------------------- passes
def _clean_gradient(
    inner: nn.Module,
    selected: dict[str, Tensor],
    clean_images: Tensor,
    clean_labels: Tensor,
    objective: CleanObjective,
    world: int,
) -> tuple[dict[str, Tensor], float]:
    """``v = ∇ L_c`` over the selected parameters (detached), and this rank's ``L_c``; buffers
    untouched. ``world > 1``: ``v`` is averaged over the ranks (one all-reduce)."""
    with preserved_buffers(inner):
        all_params = dict(inner.named_parameters())
        if len(selected) == sum(p.requires_grad for p in all_params.values()):
            logits = inner(clean_images)
        else:  # head: no graph through the body, so its backward is never built
            params = {
                n: (selected[n] if n in selected else p.detach()) for n, p in all_params.items()
            }
            logits = functional_call(inner, params, (clean_images,))
        value = objective(logits, clean_labels)
        grads = torch.autograd.grad(value, list(selected.values()), allow_unused=True)
    tangents = {
        n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(selected.items(), grads)
    }
    if world > 1:
        flat = torch.cat([t.reshape(-1) for t in tangents.values()])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for n, t in tangents.items():
            tangents[n] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
    return tangents, float(value.detach())


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
    objective: CleanObjective,
    inner_lr: float,
) -> tuple[Tensor, float]:
    """``-g_j`` by Ren et al.'s virtual step with the graph kept and a double backward, and
    ``L_c(θ)`` (the clean objective at ``ε = 0``, where ``θ' = θ``)."""
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
        clean = objective(functional_call(inner, virtual, (clean_images,)), clean_labels)
        (g_eps,) = torch.autograd.grad(clean, eps, allow_unused=True)
    if g_eps is None:
        return torch.zeros_like(noisy).detach(), float(clean.detach())
    return -g_eps.detach(), float(clean.detach())


# ---------------------------------------------------------------------------------- public API
def _scores(
    inner: nn.Module,
    selected: dict[str, Tensor],
    batches: tuple[Tensor, Tensor, Tensor, Tensor],
    per_pixel: PixelLoss,
    objective: CleanObjective,
    inner_lr: float,
    method: str,
    world: int,
) -> tuple[Tensor, float]:
    """``-g_j`` for every noisy pixel (shaped like the noisy labels, detached) and ``L_c``."""
    noisy_images, noisy_labels, clean_images, clean_labels = batches
    if method == "reference":
        if world > 1:
            raise ValueError("the reference method is single-process; use fast or head with sync")
        return _reference_scores(
            inner,
            selected,
            noisy_images,
            noisy_labels,
            clean_images,
            clean_labels,
            per_pixel,
            objective,
            inner_lr,
        )
    tangents, clean_value = _clean_gradient(
        inner, selected, clean_images, clean_labels, objective, world
    )
    tangent = _graph_free_tangent(inner, selected, tangents, noisy_images, noisy_labels, per_pixel)
    return inner_lr * tangent, clean_value  # -g_j = α ⟨∇L_c, ∇l_j⟩


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
    class_balanced_clean: bool = False,
    sync: bool | None = None,
) -> Tensor:
    """Meta-learned per-pixel weights of the noisy batch (no parameter or buffer is changed).

    Args:
        model: network mapping images ``(N, C, *spatial)`` to logits ``(N, 1, *spatial)``;
            used in its current train/eval mode; DDP wrapper accepted.
        noisy_images, noisy_labels: ``(N, C, *S)`` and ``(N, 1, *S)`` (labels in ``{0, 1}``).
        clean_images, clean_labels: ``(M, C, *S')`` and ``(M, 1, *S')``.
        loss: the training loss on the noisy batch: ``None`` (BCE with logits), a voxel-separable
            :mod:`noisyseg.losses` loss (its per-voxel form), or a callable returning per-pixel
            loss. The clean batch is always measured with mean BCE
            (:func:`~noisyseg.losses.clean_loss`).
        inner_lr: ``α > 0`` of the virtual step (a positive scale; the normalised weights do not
            depend on it).
        method: ``"fast"`` (exact, forward mode), ``"reference"`` (virtual step + double
            backward) or ``"head"`` (``fast`` restricted to :func:`head_parameter_names`).
        head: which parameters ``"head"`` differentiates (count of last modules or predicate).
        class_balanced_clean: class-balanced clean objective (a deviation, off by default; see
            :func:`~noisyseg.losses.clean_loss`).
        sync: all-reduce the clean gradient and ``Σ w̃`` over the ranks of the process group;
            ``None`` → when ``model`` is DDP-wrapped and a process group is initialised.

    Returns:
        Detached weights shaped like ``noisy_labels`` in the logits' dtype, ``>= 0``, summing to 1
        over the whole (global, with ``sync``) batch, or all zero when no pixel's gradient agrees
        with the clean one.
    """
    per_pixel, inner, selected = _prepare(
        model, noisy_images, noisy_labels, clean_images, clean_labels, loss, inner_lr, method, head
    )
    world = _sync_world(model, sync)
    scores, _ = _scores(
        inner,
        selected,
        (noisy_images, noisy_labels, clean_images, clean_labels),
        per_pixel,
        _clean_objective(class_balanced_clean),
        inner_lr,
        method,
        world,
    )
    return _normalise(scores, world).detach()


@dataclass
class MetaStepResult:
    """Outcome of one :func:`meta_reweighted_step`.

    Scalars are over the global batch (all ranks) when the step syncs, else over this rank's.

    Attributes:
        loss: the weighted loss ``Σ_j w_j l_j`` that was minimised (nats; weights sum to 1).
        weights: detached pixel weights of this rank's noisy batch, shaped like its labels.
        unweighted_loss: mean per-pixel training loss of the noisy batch (nats), for logging.
        clean_loss: the clean objective (:func:`~noisyseg.losses.clean_loss`) before the update
            (nats; the mean over ranks of each rank's value when syncing).
        positive_fraction: fraction of noisy pixels with a non-zero weight.
        lesion_weight_share: share of the total weight on voxels labelled lesion in the noisy
            batch, ``Σ_{y=1} w_j / Σ w_j`` (NaN when every weight is 0). Uniform weights give
            ``noisy_lesion_fraction``; far below it, the weights are switching lesions off.
        noisy_lesion_fraction: fraction of the noisy batch's voxels labelled lesion.
        clean_lesion_fraction: fraction of the clean batch's voxels labelled lesion.
    """

    loss: float
    weights: Tensor
    unweighted_loss: float
    clean_loss: float
    positive_fraction: float
    lesion_weight_share: float
    noisy_lesion_fraction: float
    clean_lesion_fraction: float

    def log_metrics(self, prefix: str = "train/") -> dict[str, float]:
        """The scalar fields as a metrics dict (``<prefix><field>``), e.g. for MLflow."""
        names = (
            "unweighted_loss",
            "clean_loss",
            "positive_fraction",
            "lesion_weight_share",
            "noisy_lesion_fraction",
            "clean_lesion_fraction",
        )
        return {f"{prefix}{name}": float(getattr(self, name)) for name in names}


def _step_statistics(
    weights: Tensor,
    per: Tensor,
    noisy_labels: Tensor,
    clean_labels: Tensor,
    clean_value: float,
    world: int,
) -> dict[str, float]:
    """The logged scalars of a step, summed over the ranks with one all-reduce when syncing."""
    lesion = (noisy_labels > 0.5).to(weights.dtype)
    per = per.detach()
    sums = torch.stack(
        [
            (weights * per).sum(),
            per.sum(),
            torch.tensor(float(per.numel()), dtype=weights.dtype, device=weights.device),
            (weights > 0).sum().to(weights.dtype),
            weights.sum(),
            (weights * lesion).sum(),
            lesion.sum(),
            (clean_labels > 0.5).sum().to(weights.dtype).to(weights.device),
            torch.tensor(float(clean_labels.numel()), dtype=weights.dtype, device=weights.device),
            torch.tensor(clean_value, dtype=weights.dtype, device=weights.device),
        ]
    )
    if world > 1:
        dist.all_reduce(sums)
    s = [float(v) for v in sums]
    return {
        "loss": s[0],
        "unweighted_loss": s[1] / s[2],
        "positive_fraction": s[3] / s[2],
        "lesion_weight_share": s[5] / s[4] if s[4] > 0 else float("nan"),
        "noisy_lesion_fraction": s[6] / s[2],
        "clean_lesion_fraction": s[7] / s[8],
        "clean_loss": s[9] / world,
    }


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
    class_balanced_clean: bool = False,
    sync: bool | None = None,
    share_forward: bool | None = None,
    clip_grad_norm: float | None = None,
) -> MetaStepResult:
    """One training step with meta pixel reweighting: weights, then the real weighted update.

    ``fast``/``head``: clean forward + backward of the clean objective (``v = ∇L_c`` by
    ``torch.autograd.grad``, so no ``.grad`` is touched and DDP does not all-reduce it; with
    ``sync`` it is averaged over ranks explicitly), then the noisy batch:

    * ``share_forward=True`` (default for ``head``): one noisy forward through ``model`` (the DDP
      wrapper when there is one) whose parameters are dual tensors — differentiable views of the
      real parameters — gives the tangents (hence the weights) *and* the autograd graph of the
      real loss; then the weighted backward.
    * ``share_forward=False`` (default for ``fast``): a gradient-free dual forward for the
      tangents, then an ordinary forward/backward through ``model``. Measured faster on CPU
      for full-network tangents: with the graph on, autograd also records every tangent
      operation (the primal inputs of the JVP formulas require grad), which costs more than the
      plain forward it saves (benchmarks/RESULTS.md).

    Then ``optimizer.zero_grad()``, ``(world · Σ_{j on this rank} w_j l_j).backward()`` (world = 1
    without sync; DDP averages the gradients over ranks, so the update is that of the global
    ``Σ_j w_j l_j``), the gradient's global norm clipped at ``clip_grad_norm`` when given (after
    DDP's all-reduce, so every rank clips alike), ``optimizer.step()``. The weighted gradient is
    that of the few voxels the weights select, typically 30-300x the norm of the mean loss's: the
    trainer clips it (``TrainConfig.grad_clip_norm``). ``reference``: :func:`meta_pixel_weights` then an
    ordinary weighted forward/backward/step. Arguments as in :func:`meta_pixel_weights`. The
    model's running stats (BatchNorm) are updated once, by the real noisy forward.
    """
    per_pixel, inner, selected = _prepare(
        model, noisy_images, noisy_labels, clean_images, clean_labels, loss, inner_lr, method, head
    )
    world = _sync_world(model, sync)
    objective = _clean_objective(class_balanced_clean)
    if share_forward is None:
        share_forward = method == "head"
    if method == "reference" or not share_forward:
        batches = (noisy_images, noisy_labels, clean_images, clean_labels)
        scores, clean_value = _scores(
            inner, selected, batches, per_pixel, objective, inner_lr, method, world
        )
        per = per_pixel(model(noisy_images), noisy_labels)
    else:
        tangents, clean_value = _clean_gradient(
            inner, selected, clean_images, clean_labels, objective, world
        )
        prefix = "module." if inner is not model else ""
        per, tangent = _dual_forward(
            model, prefix, selected, tangents, noisy_images, noisy_labels, per_pixel, attach=True
        )
        scores = inner_lr * tangent
    weights = _normalise(scores, world).detach()
    weighted = (weights * per).sum()
    optimizer.zero_grad(set_to_none=True)
    (weighted * world if world > 1 else weighted).backward()
    if clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    stats = _step_statistics(weights, per, noisy_labels, clean_labels, clean_value, world)
    return MetaStepResult(weights=weights, **stats)


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
