"""The per-worker training function Ray Train runs on every rank (and a plain-process twin).

:func:`train_loop_per_worker` is what ``TorchTrainer`` calls with ``train_loop_config``:

``{"config": TrainConfig dict, "store_info": StoreInfo dict, "mlflow": {"tracking_uri",
"run_id"} | None, ...}``

Each rank builds the U-Net, restores ``ray.train.get_checkpoint()`` when there is one, wraps the
model with ``ray.train.torch.prepare_model`` (DDP; gloo on CPU, NCCL on GPU), reads its own
stream of patches (``make_train_loaders(rank=, world_size=)``) and runs ``steps`` optimiser steps
of the configured loss (standard, or meta pixel reweighting through
:func:`noisyseg.reweight.meta_reweighted_step`). Every ``checkpoint_interval`` steps (and at the
end) every rank calls ``ray.train.report`` — rank 0 with the checkpoint directory
``checkpoint_<step:07d>`` holding ``state.pt`` (see :mod:`.checkpoints`), the others without.
Rank 0 alone logs to MLflow, validates every ``val_interval`` steps and prints progress.

:func:`run_worker` is the loop itself, parameterised by a :class:`WorkerContext`; the plain
process version (:class:`LocalContext`) runs it without Ray (benchmarks, unit tests).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noisyseg.distributed.checkpoints import model_payload, read_state, save_training_state, unwrap
from noisyseg.distributed.config import StoreInfo, TrainConfig


# ---------------------------------------------------------------------------------- building blocks
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


def make_step_loss(config: TrainConfig) -> nn.Module:
    """The configured loss with ``reduction="mean"`` (per-voxel form used by reweighting)."""
    from noisyseg.losses import make_loss

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


def _autocast(device: torch.device, amp: str):
    if amp == "none" or device.type != "cuda":
        return torch.autocast(device_type="cpu", enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


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
    gradients over ranks, so the update equals one step on the concatenated batch), step.
    ``reweight=meta|meta-head``: :func:`noisyseg.reweight.meta_reweighted_step` with the clean
    batch ``clean = (images, labels)``.
    """
    if config.reweight != "none":
        from noisyseg.reweight import meta_reweighted_step

        assert clean is not None, "meta reweighting needs a clean batch"
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
        )
        return StepOutput(
            result.loss,
            {
                "train/unweighted_loss": result.unweighted_loss,
                "train/clean_loss": result.clean_loss,
                "train/positive_weight_fraction": result.positive_fraction,
            },
        )
    optimizer.zero_grad(set_to_none=True)
    with _autocast(images.device, config.amp):
        logits = model(images)
    loss = loss_fn(logits.float(), labels)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return StepOutput(float(loss.detach()), {})


# ---------------------------------------------------------------------------------- contexts
class WorkerContext:
    """Where the loop runs: rank, device, checkpoint restore and reporting."""

    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device:
        raise NotImplementedError

    def restore_dir(self) -> Path | None:
        """Directory of the checkpoint to resume from, or None."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        raise NotImplementedError


class RayContext(WorkerContext):
    """Inside a Ray Train worker (Train V2 API)."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def restore_dir(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # Local filesystem storage: the directory is read in place; otherwise a local copy.
        self._restore_tmp = tempfile.TemporaryDirectory()
        return Path(checkpoint.to_directory(self._restore_tmp.name))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        import ray.train
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class LocalContext(WorkerContext):
    """A plain process: one rank, no Ray (benchmarks and unit tests).

    ``checkpoint_root``: where checkpoints go (``None``: not written); ``restore`` resumes from a
    checkpoint directory. Reported metrics are kept in :attr:`reports`.
    """

    def __init__(
        self,
        device: str = "cpu",
        checkpoint_root: str | Path | None = None,
        restore: str | Path | None = None,
    ) -> None:
        self._device = torch.device(device)
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self._restore = Path(restore) if restore else None
        self.reports: list[dict[str, Any]] = []

    def device(self) -> torch.device:
        return self._device

    def restore_dir(self) -> Path | None:
        return self._restore

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self._device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root is not None:
            import shutil

            target = self.checkpoint_root / name
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------- helpers
def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    non_blocking = device.type == "cuda"
    return (
        batch["image"].to(device, non_blocking=non_blocking),
        batch["label"].to(device, non_blocking=non_blocking),
    )


def _mean_over_ranks(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Average a list of per-step losses over ranks (one all-reduce); local values without DDP."""
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_available() or not dist.is_initialized() or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / world_size).tolist()


class _Progress:
    """Rank-0 terminal progress: one line every ``interval`` steps."""

    def __init__(self, total: int, start: int) -> None:
        self.total = total
        self.last_step = start
        self.last_time = time.perf_counter()

    def line(self, step: int, loss: float, lr: float) -> str:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        width = len(str(self.total))
        return (
            f"[noisyseg train] step {step:>{width}}/{self.total}  loss {loss:.4f}  "
            f"lr {lr:.3e}  {rate:.2f} steps/s"
        )


def _validate(
    model: nn.Module,
    config: TrainConfig,
    info: StoreInfo,
    device: torch.device,
    logger: Any,
    step: int,
) -> dict[str, float]:
    """Sliding-window validation on a few cases (rank 0); logs metrics and the two figures."""
    from noisyseg.distributed.inference import evaluate_cases
    from noisyseg.distributed.tracking import (
        pr_curve_figure,
        scalar_metrics,
        validation_slice_figure,
    )
    from noisyseg.storage.store import VolumeStore

    store = VolumeStore.open(config.store)
    net = unwrap(model)
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
            keep_probabilities=logger is not None,
        )
    finally:
        net.train(was_training)
    metrics = scalar_metrics(result.metrics, "val/")
    if logger is not None:
        logger.log_metrics(metrics, step)
        probabilities = result.probabilities or {}
        if probabilities:
            # The case whose truth has the most lesion voxels makes the most telling picture.
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
            logger.log_figure(figure, "figures/validation_slice.png")
        figure = pr_curve_figure(result.metrics.get("pr_curve"), title=f"lesion PR, step {step}")
        logger.log_figure(figure, "figures/pr_curve.png")
    return metrics


# ---------------------------------------------------------------------------------- the loop
def run_worker(loop_config: dict[str, Any], context: WorkerContext) -> dict[str, Any]:
    """Train on one rank. Returns the last metrics dict (steps/s included).

    ``loop_config`` keys: ``config`` (TrainConfig dict), ``store_info`` (StoreInfo dict),
    ``mlflow`` (``{"tracking_uri", "run_id"}`` or None: no MLflow), and test hooks
    ``_pid_dir`` (rank r writes ``rank<r>.pid``) and ``_step_delay_s`` (sleep per step).
    """
    from noisyseg.models import build_unet, init_output_bias
    from noisyseg.storage.patches import make_train_loaders

    config = TrainConfig.model_validate(loop_config["config"])
    info = StoreInfo.model_validate(loop_config["store_info"])
    mlflow_info = loop_config.get("mlflow") or None
    rank, world = context.rank, context.world_size
    device = context.device()
    if loop_config.get("_pid_dir"):
        Path(loop_config["_pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
    step_delay = float(loop_config.get("_step_delay_s") or 0.0)

    # Intra-op threads = the CPUs this worker reserved (Ray also sets OMP_NUM_THREADS so); more
    # threads than cores makes every op spin-wait when processes share the machine.
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    torch.manual_seed(config.seed)
    spec = config.unet_spec(info.spatial_dims, info.in_channels)
    model = build_unet(spec)
    if config.output_prior > 0:
        init_output_bias(model, config.output_prior, spec.out_channels)
    start_step = 0
    payload: dict[str, Any] | None = None
    restore = context.restore_dir()
    if restore is not None:
        payload = read_state(restore)
        model.load_state_dict(payload["model"])
        start_step = int(payload["step"])
        if mlflow_info is not None and payload.get("mlflow_run_id"):
            mlflow_info = {**mlflow_info, "run_id": payload["mlflow_run_id"]}
    model = context.prepare_model(model)
    optimizer = make_optimizer(config, model.parameters())
    scheduler = make_scheduler(config, optimizer)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        # The schedule follows the *current* config (steps may have been raised to continue a
        # run): the saved optimizer LR belongs to the old schedule.
        scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = config.lr
            group["lr"] = config.lr * lr_factor(config, start_step)
        torch.set_rng_state(payload["rng"]["torch"])
    scaler = (
        torch.amp.GradScaler("cuda") if config.amp == "fp16" and device.type == "cuda" else None
    )
    loss_fn = make_step_loss(config)

    logger = None
    if rank == 0 and mlflow_info is not None:
        from noisyseg.distributed.tracking import RankZeroLogger

        logger = RankZeroLogger(mlflow_info["tracking_uri"], mlflow_info["run_id"])
        if start_step > 0:
            logger.log_metrics({"resumed_from_step": float(start_step)}, start_step)
    run_id = mlflow_info["run_id"] if mlflow_info else None
    config_json = config.model_dump(mode="json")

    # The clean subset is drawn from the run's seed (the same cases for the whole run); the
    # patch streams' seed moves with the step so a resumed run does not replay seen patches.
    uses_clean_subset = config.reweight != "none" or config.train_subset == "clean"
    loaders = make_train_loaders(
        config.store,
        label_set=config.labels,
        patch_size=tuple(info.patch_shape),
        batch_size=config.batch_size,
        foreground_fraction=config.foreground_fraction,
        clean_fraction=config.clean_fraction if uses_clean_subset else None,
        clean_count=config.clean_count if uses_clean_subset else None,
        train_subset=config.train_subset,
        rank=rank,
        world_size=world,
        num_workers=config.num_dataloader_workers,
        seed=config.seed,
        stream_seed=config.seed + 7919 * start_step,
    )
    noisy_batches: Iterator = iter(loaders.noisy)
    clean_batches: Iterator | None = (
        iter(loaders.clean) if config.reweight != "none" and loaders.clean is not None else None
    )

    model.train()
    progress = _Progress(config.steps, start_step)
    pending: list[tuple[int, float, float, dict[str, float]]] = []
    last_metrics: dict[str, Any] = {"step": start_step}
    timed_steps, timed_seconds = 0, 0.0
    status = "FAILED"
    try:
        iteration_began = time.perf_counter()
        for step in range(start_step + 1, config.steps + 1):
            images, labels = _to_device(next(noisy_batches), device)
            clean = _to_device(next(clean_batches), device) if clean_batches is not None else None
            out = train_step(
                model,
                optimizer,
                loss_fn,
                images,
                labels,
                config=config,
                clean=clean,
                scaler=scaler,
            )
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if step_delay:
                time.sleep(step_delay)
            pending.append((step, out.loss, lr, out.extra))

            flush = step % config.log_interval == 0 or step == config.steps
            checkpoint_due = step % config.checkpoint_interval == 0 or step == config.steps
            if flush or checkpoint_due:
                losses = _mean_over_ranks([p[1] for p in pending], world, device)
                if rank == 0:
                    if logger is not None:
                        for (s, _, rate, extra), mean_loss in zip(pending, losses):
                            logger.log_metrics({"train/loss": mean_loss, "lr": rate, **extra}, s)
                    print(progress.line(step, losses[-1], lr), flush=True)
                last_metrics = {"step": step, "train_loss": losses[-1], "lr": lr}
                pending = []

            val_due = config.val_cases > 0 and (
                (config.val_interval and step % config.val_interval == 0) or step == config.steps
            )
            if val_due and rank == 0:
                val = _validate(model, config, info, device, logger, step)
                last_metrics.update(val)
                shown = {k: round(v, 4) for k, v in val.items() if k.count("/") == 1}
                print(f"[noisyseg train] step {step} validation {shown}", flush=True)

            if step == config.steps and rank == 0 and logger is not None:
                final = model_payload(model, spec.to_dict(), config_json, step)
                logger.log_final_model(_cpu_copy(unwrap(model), spec), final)

            if checkpoint_due:
                last_metrics["steps_per_s"] = timed_steps / timed_seconds if timed_seconds else 0.0
                name = f"checkpoint_{step:07d}"
                if rank == 0:
                    with tempfile.TemporaryDirectory() as tmp:
                        save_training_state(
                            tmp,
                            model=model,
                            optimizer=optimizer,
                            scheduler=scheduler,
                            unet_spec=spec.to_dict(),
                            config=config_json,
                            step=step,
                            mlflow_run_id=run_id,
                        )
                        context.report(dict(last_metrics), Path(tmp), name)
                else:
                    context.report(dict(last_metrics), None, name)
            # Throughput counts whole iterations (data, step, logging, validation, checkpoints)
            # after the first, which pays one-off costs (DDP buckets, allocator, caches).
            now = time.perf_counter()
            if step > start_step + 1:
                timed_steps += 1
                timed_seconds += now - iteration_began
            iteration_began = now
        status = "FINISHED"
    finally:
        if logger is not None:
            # A killed group never gets here; the next attempt re-opens the same run.
            logger.close(status)
    last_metrics["steps_per_s"] = timed_steps / timed_seconds if timed_seconds else 0.0
    if rank == 0 and start_step < config.steps:
        print(
            f"[noisyseg train] done: {config.steps} steps, "
            f"{last_metrics['steps_per_s']:.2f} steps/s (rank 0)",
            flush=True,
        )
    return last_metrics


def _cpu_copy(model: nn.Module, spec: Any) -> nn.Module:
    """A CPU copy of the network for ``mlflow.pytorch.log_model`` (the training copy stays put)."""
    from noisyseg.models import build_unet

    copy = build_unet(spec)
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for ``ray.train.torch.TorchTrainer`` (one call per rank)."""
    run_worker(loop_config, RayContext())
