"""The per-worker training function Ray Train runs on every rank (and a plain-process twin).

:func:`train_loop_per_worker` is what ``TorchTrainer`` calls with ``train_loop_config`` (built by
:func:`noisyseg.distributed.trainer.loop_config`, parsed by :meth:`WorkerJob.parse`).
:func:`run_worker` reads top to bottom as named steps:

1. :func:`build_state` — the U-Net, restored from the newest complete checkpoint when there is
   one (:func:`find_restore`, then :func:`restore_state` and :func:`continue_schedule`), wrapped
   for DDP by the context (``ray.train.torch.prepare_model``: gloo on CPU, NCCL on GPU), its
   optimiser and LR schedule;
2. :func:`open_batches` — this rank's patch streams;
3. per step: :func:`train_step`, then :class:`StepLog` (losses averaged over ranks every
   ``log_interval`` steps, logged by rank 0 to MLflow and sent to the launcher's progress
   display), :func:`validate` (rank 0, every ``val_interval`` steps), :func:`save_checkpoint`
   (every ``checkpoint_interval`` steps: every rank calls ``ray.train.report``, rank 0 with
   ``checkpoint_<step:07d>/state.pt``).

Test hooks (:class:`LoopHooks`) live outside the loop. When the launcher's process dies, the next
log flush finds it gone on every rank at once: rank 0 saves a checkpoint, marks the MLflow run
KILLED with a ``noisyseg.end_reason`` tag, and all ranks return.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from noisyseg.distributed.checkpoints import (
    RunDir,
    checkpoint_dir_name,
    latest_checkpoint_state,
    model_payload,
    read_state,
    save_training_state,
)
from noisyseg.distributed.config import StoreInfo, TrainConfig
from noisyseg.distributed.contexts import LocalContext, RayContext, WorkerContext
from noisyseg.distributed.progress import ProgressRecord, ProgressSender
from noisyseg.distributed.resume import logged_high_water
from noisyseg.distributed.run_storage import RunLocation
from noisyseg.distributed.tracking import RankZeroLogger, finish_run, run_status
from noisyseg.distributed.training_step import (
    StepOutput,
    continue_schedule,
    lr_factor,
    make_optimizer,
    make_scheduler,
    make_step_loss,
    train_step,
)
from noisyseg.distributed.validation import validate
from noisyseg.models import UNetSpec, build_unet, init_output_bias
from noisyseg.storage.patches import make_train_loaders

__all__ = [
    "LocalContext",
    "RayContext",
    "WorkerContext",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "make_step_loss",
    "run_worker",
    "train_loop_per_worker",
    "train_step",
]


# ---------------------------------------------------------------------------------- the job
@dataclass
class LoopHooks:
    """Test hooks, kept out of the loop: each rank writes its pid to ``pid_dir/rank<r>.pid``
    at start; every step sleeps ``step_delay_s`` (slows a run down so a test can kill it)."""

    pid_dir: str | None = None
    step_delay_s: float = 0.0

    def on_start(self, rank: int) -> None:
        if self.pid_dir:
            Path(self.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))

    def after_step(self, step: int) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)


@dataclass
class WorkerJob:
    """What the launcher sends every rank (``train_loop_config``), as typed objects.

    Keys of the dict: ``config`` (TrainConfig dict), ``store_info`` (StoreInfo dict), ``mlflow``
    (``{"tracking_uri", "run_id"}`` or None: no MLflow), ``run_dir`` (local run directory or
    None), ``run_location`` (a :class:`RunLocation` on remote storage, or None),
    ``progress_inbox`` (a :class:`~noisyseg.distributed.progress.ProgressInbox` handle or
    None) and ``hooks`` (:class:`LoopHooks` fields).
    """

    config: TrainConfig
    info: StoreInfo
    tracking_uri: str | None = None
    run_id: str | None = None
    run_dir: Path | None = None
    run_location: RunLocation | None = None
    inbox: Any | None = None
    hooks: LoopHooks = field(default_factory=LoopHooks)

    @classmethod
    def parse(cls, loop_config: dict[str, Any]) -> WorkerJob:
        mlflow_info = loop_config.get("mlflow") or {}
        run_dir = loop_config.get("run_dir")
        return cls(
            config=TrainConfig.model_validate(loop_config["config"]),
            info=StoreInfo.model_validate(loop_config["store_info"]),
            tracking_uri=mlflow_info.get("tracking_uri"),
            run_id=mlflow_info.get("run_id"),
            run_dir=Path(run_dir) if run_dir else None,
            run_location=loop_config.get("run_location"),
            inbox=loop_config.get("progress_inbox"),
            hooks=LoopHooks(**(loop_config.get("hooks") or {})),
        )

    @property
    def run_name(self) -> str:
        return self.config.run_name or "run"


@dataclass
class TrainingState:
    """The model (DDP-wrapped when distributed) and everything that moves with it."""

    model: nn.Module
    spec: UNetSpec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    step: int = 0
    resumed_from: str | None = None
    resumed_metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- 1. build
def build_network(config: TrainConfig, info: StoreInfo) -> tuple[nn.Module, UNetSpec]:
    """The U-Net for the store's dimensionality and channels, seeded, output bias at the prior."""
    torch.manual_seed(config.seed)
    spec = config.unet_spec(info.spatial_dims, info.in_channels)
    model = build_unet(spec)
    if config.output_prior > 0:
        init_output_bias(model, config.output_prior, spec.out_channels)
    return model, spec


def find_restore(context: WorkerContext, run_dir: RunDir | None) -> tuple[dict, str] | None:
    """``(payload, where)`` of the newest checkpoint to resume from, or None for a fresh start.

    Ray's restored checkpoint (``get_checkpoint``) can lag the newest complete one on disk (the
    controller registers a report when it polls), so the run directory is scanned as well
    (:func:`~noisyseg.distributed.checkpoints.latest_checkpoint_state`, local or remote
    storage alike) and the higher step wins.
    """
    candidates: list[tuple[dict, str]] = []
    ray_dir = context.restore_dir()
    if ray_dir is not None:
        candidates.append((read_state(ray_dir), str(ray_dir)))
    on_disk = latest_checkpoint_state(run_dir) if run_dir is not None else None
    if on_disk is not None:
        candidates.append((on_disk[1], str(on_disk[0]).rpartition("/")[0]))
    if not candidates:
        return None
    return max(candidates, key=lambda item: int(item[0]["step"]))


def restore_state(state: TrainingState, payload: dict[str, Any], config: TrainConfig) -> None:
    """Load optimiser, schedule and RNG state of a checkpoint into ``state`` (model done)."""
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.step = int(payload["step"])
    state.resumed_metrics = dict(payload.get("metrics") or {})
    continue_schedule(state.optimizer, state.scheduler, config, state.step)
    torch.set_rng_state(payload["rng"]["torch"])


def build_state(job: WorkerJob, context: WorkerContext) -> TrainingState:
    """Step 1: network, restore (newest checkpoint), DDP wrap, optimiser, schedule, loss."""
    config = job.config
    model, spec = build_network(config, job.info)
    restore = find_restore(context, job.run_dir or job.run_location)
    if restore is not None:
        model.load_state_dict(restore[0]["model"])
    model = context.prepare_model(model)
    optimizer = make_optimizer(config, model.parameters())
    use_scaler = config.amp == "fp16" and context.device().type == "cuda"
    state = TrainingState(
        model=model,
        spec=spec,
        optimizer=optimizer,
        scheduler=make_scheduler(config, optimizer),
        scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
        loss_fn=make_step_loss(config),
    )
    if restore is not None:
        restore_state(state, restore[0], config)
        state.resumed_from = restore[1]
    return state


# ---------------------------------------------------------------------------------- 2. data
@dataclass
class Batches:
    """This rank's patch streams: noisy-label batches and, for meta reweighting, clean ones."""

    noisy: Iterator
    clean: Iterator | None

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """``(images, labels, clean)`` on ``device``; ``clean`` is ``(images, labels)`` or None."""
        images, labels = _to_device(next(self.noisy), device)
        clean = _to_device(next(self.clean), device) if self.clean is not None else None
        return images, labels, clean


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    non_blocking = device.type == "cuda"
    return (
        batch["image"].to(device, non_blocking=non_blocking),
        batch["label"].to(device, non_blocking=non_blocking),
    )


def open_batches(
    config: TrainConfig, info: StoreInfo, rank: int, world_size: int, start_step: int
) -> Batches:
    """Step 2: the rank's patch streams.

    The clean subset is drawn from the run's seed (the same cases for the whole run); the patch
    streams' seed moves with the step so a resumed run does not replay the patches it saw.
    """
    uses_clean_subset = config.reweight != "none" or config.train_subset == "clean"
    loaders = make_train_loaders(
        config.store,
        label_set=config.labels,
        patch_size=tuple(info.patch_shape),
        batch_size=config.batch_size,
        foreground_fraction=config.foreground_fraction,
        clean_fraction=config.clean_fraction if uses_clean_subset else None,
        clean_count=config.clean_count if uses_clean_subset else None,
        clean_min_cases=config.clean_min_cases,
        clean_selection=config.clean_selection,
        clean_foreground_fraction=config.clean_foreground_fraction,
        clean_foreground_sampling=config.clean_foreground_sampling,
        clean_batch_size=config.clean_batch_size,
        train_subset=config.train_subset,
        rank=rank,
        world_size=world_size,
        num_workers=config.num_dataloader_workers,
        seed=config.seed,
        stream_seed=config.seed + 7919 * start_step,
    )
    wants_clean = config.reweight != "none" and loaders.clean is not None
    return Batches(iter(loaders.noisy), iter(loaders.clean) if wants_clean else None)


# ---------------------------------------------------------------------------------- 3. log
class MetricLog:
    """Rank 0's MLflow logging, without re-logging steps a previous attempt already logged.

    MLflow appends metric values; after a restart the steps between the checkpoint and the crash
    run again. ``high_water`` (per key, the highest step logged before) filters them out, so the
    history holds each step once.
    """

    def __init__(self, logger: RankZeroLogger, high_water: dict[str, int]) -> None:
        self.logger = logger
        self.high_water = dict(high_water)

    def log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.high_water.get(k, -1)}
        if fresh:
            self.logger.log_metrics(fresh, step)

    def close(self, tracking_uri: str, run_id: str, status: str, reason: str) -> None:
        """End the run with ``status`` and the tag ``noisyseg.end_reason`` = ``reason``.

        A run the launcher already ended (Ctrl-C: KILLED, "interrupted") keeps its verdict when
        the workers stop because the launcher is gone: the launcher knew why.
        """
        if status == "KILLED":
            current = run_status(tracking_uri, run_id)
            if current != "RUNNING":
                self.logger.close(current)
                return
        self.logger.close(status)
        finish_run(tracking_uri, run_id, status, reason=reason)


def open_metric_log(job: WorkerJob, rank: int) -> MetricLog | None:
    """Rank 0 attaches to the launcher's MLflow run; other ranks (and runs without MLflow): None."""
    if rank != 0 or job.tracking_uri is None or job.run_id is None:
        return None
    high_water = logged_high_water(job.tracking_uri, job.run_id)
    return MetricLog(RankZeroLogger(job.tracking_uri, job.run_id), high_water)


def _reduce(values: list[float], stop: bool, world_size: int, device: torch.device):
    """Mean of per-step losses over ranks and whether any rank asked to stop (one all-reduce)."""
    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return values, stop
    tensor = torch.tensor([*values, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor[:-1] / world_size).tolist(), bool(tensor[-1].item() > 0)


class StepLog:
    """Losses of the steps since the last flush; every ``log_interval`` steps (and before a
    checkpoint) they are averaged over ranks, logged and sent to the launcher's display.

    The flush is also where every rank learns, from rank 0, whether the launcher still lives.
    """

    def __init__(
        self,
        job: WorkerJob,
        rank: int,
        world_size: int,
        device: torch.device,
        sender: ProgressSender,
        *,
        start_step: int = 0,
    ) -> None:
        self.job, self.rank, self.world_size, self.device = job, rank, world_size, device
        self.pending: list[tuple[int, float, float, dict[str, float]]] = []
        self.sender = sender
        self._last = (start_step, time.perf_counter())

    def add(self, step: int, out: StepOutput, lr: float) -> None:
        self.pending.append((step, out.loss, lr, out.extra))

    def flush(self, step: int, metric_log: MetricLog | None) -> tuple[dict[str, Any], bool]:
        """``(metrics for Ray's report, launcher_gone)``; call on every rank at the same step."""
        gone = self.rank == 0 and not self.sender.launcher_alive()
        losses, gone = _reduce([p[1] for p in self.pending], gone, self.world_size, self.device)
        lr = self.pending[-1][2] if self.pending else float("nan")
        if metric_log is not None:
            for (s, _, rate, extra), mean_loss in zip(self.pending, losses):
                metric_log.log({"train/loss": mean_loss, "lr": rate, **extra}, s)
        if self.rank == 0 and losses:
            self.sender.send(self._record(step, losses[-1], lr))
        self.pending = []
        loss = losses[-1] if losses else float("nan")
        return {"step": step, "train_loss": loss, "lr": lr}, gone

    def _record(self, step: int, loss: float, lr: float) -> ProgressRecord:
        now = time.perf_counter()
        last_step, last_time = self._last
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (step, now)
        total = self.job.config.steps
        return ProgressRecord(self.job.run_name, "step", step, total, loss, lr, rate)

    def note(self, step: int, text: str) -> None:
        """A one-line message from rank 0 (resume, validation, end)."""
        if self.rank == 0:
            total = self.job.config.steps
            self.sender.send(ProgressRecord(self.job.run_name, "note", step, total, text=text))


# ---------------------------------------------------------------------------------- validation
def validate_and_log(
    model: nn.Module,
    job: WorkerJob,
    device: torch.device,
    metric_log: MetricLog | None,
    step: int,
) -> dict[str, float]:
    """Rank 0's validation (:func:`~noisyseg.distributed.validation.validate`); metrics and
    figures logged to MLflow when there is a run."""
    metrics, figures = validate(
        model, job.config, job.info, device, step=step, figures=metric_log is not None
    )
    if metric_log is not None:
        metric_log.log(metrics, step)
        for figure, artifact in figures:
            metric_log.logger.log_figure(figure, artifact)
    return metrics


# ---------------------------------------------------------------------------------- checkpoints
def _write_state(
    directory: str | Path,
    state: TrainingState,
    job: WorkerJob,
    step: int,
    metrics: dict[str, Any] | None = None,
) -> None:
    save_training_state(
        directory,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        unet_spec=state.spec.to_dict(),
        config=job.config.model_dump(mode="json"),
        step=step,
        mlflow_run_id=job.run_id,
        tracking_uri=job.tracking_uri,
        metrics=metrics,
    )


def save_checkpoint(
    state: TrainingState,
    job: WorkerJob,
    context: WorkerContext,
    metrics: dict[str, Any],
    step: int,
) -> None:
    """Every rank reports ``metrics``; rank 0 with ``checkpoint_<step:07d>/state.pt``."""
    name = checkpoint_dir_name(step)
    if context.rank != 0:
        context.report(dict(metrics), None, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_state(tmp, state, job, step, metrics)
        context.report(dict(metrics), Path(tmp), name)


def save_checkpoint_directly(state: TrainingState, job: WorkerJob, step: int) -> Path | str | None:
    """Rank 0 writes ``<run_dir>/checkpoint_<step>`` itself (the launcher, and with it Ray's
    checkpoint bookkeeping, is gone): written beside, then renamed into place (remote storage:
    uploaded, ``state.pt`` one object)."""
    if job.run_dir is None and job.run_location is not None:
        with tempfile.TemporaryDirectory() as tmp:
            _write_state(tmp, state, job, step)
            return job.run_location.upload(tmp, checkpoint_dir_name(step)).url
    if job.run_dir is None:
        return None
    target = job.run_dir / checkpoint_dir_name(step)
    if target.exists():
        return target
    staging = job.run_dir / f".{target.name}.tmp-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    _write_state(staging, state, job, step)
    staging.rename(target)
    return target


def log_final_model(state: TrainingState, job: WorkerJob, metric_log: MetricLog, step: int):
    """``checkpoint/final.pt`` and the ``mlflow.pytorch`` model of the finished network."""
    payload = model_payload(
        state.model, state.spec.to_dict(), job.config.model_dump(mode="json"), step
    )
    copy = build_unet(state.spec)
    copy.load_state_dict(payload["model"])
    metric_log.logger.log_final_model(copy.eval(), payload)


class Throughput:
    """Steps per second over whole iterations (data, step, logging, validation, checkpoints),
    leaving out the first, which pays one-off costs (DDP buckets, allocator, caches)."""

    def __init__(self) -> None:
        self.steps, self.seconds = 0, 0.0
        self._began: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._began is not None:
            self.steps += 1
            self.seconds += now - self._began
        self._began = now

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------------- the loop
@dataclass
class Progress:
    """How far this rank got: last metrics, throughput, and how the run ends (MLflow status)."""

    metrics: dict[str, Any]
    clock: Throughput = field(default_factory=Throughput)
    status: str = "FAILED"
    reason: str = "failed in the training loop"


def _due(step: int, interval: int, last: int) -> bool:
    return (bool(interval) and step % interval == 0) or step == last


def stop_for_lost_launcher(state: TrainingState, job: WorkerJob, rank: int, step: int) -> str:
    """Rank 0 saves the state beside Ray's checkpoints; the reason the run ends."""
    saved = save_checkpoint_directly(state, job, step) if rank == 0 else None
    where = f", state saved in {saved}" if saved is not None else ""
    return f"the launcher (noisyseg train) ended; workers stopped at step {step}{where}"


def end_of_step(
    step: int,
    state: TrainingState,
    job: WorkerJob,
    context: WorkerContext,
    log: StepLog,
    metric_log: MetricLog | None,
    progress: Progress,
) -> bool:
    """Log, validate, save as due after ``step``; False when the workers must stop."""
    config, rank = job.config, context.rank
    checkpoint_due = _due(step, config.checkpoint_interval, config.steps)
    if _due(step, config.log_interval, config.steps) or checkpoint_due:
        flushed, launcher_gone = log.flush(step, metric_log)
        progress.metrics.update(flushed)
        if launcher_gone:
            progress.status = "KILLED"
            progress.reason = stop_for_lost_launcher(state, job, rank, step)
            return False
    if rank == 0 and config.val_cases > 0 and _due(step, config.val_interval, config.steps):
        val = validate_and_log(state.model, job, context.device(), metric_log, step)
        progress.metrics.update(val)
        log.note(step, f"step {step} validation { {k: round(v, 4) for k, v in val.items()} }")
    if step == config.steps and metric_log is not None:
        log_final_model(state, job, metric_log, step)
    if checkpoint_due:
        progress.metrics["steps_per_s"] = progress.clock.rate
        save_checkpoint(state, job, context, progress.metrics, step)
    progress.clock.tick()
    return True


def report_finished_run(state: TrainingState, context: WorkerContext, progress: Progress) -> None:
    """A run resumed at its last step reports that checkpoint's metrics once, without a new
    checkpoint: Ray Train's result, and a Tune trial's final result, then carry them (a trial
    restored after its training had finished would otherwise end without its metric)."""
    progress.metrics = {**state.resumed_metrics, "step": state.step}
    context.report(dict(progress.metrics), None, checkpoint_dir_name(state.step))


def run_worker(loop_config: dict[str, Any], context: WorkerContext) -> dict[str, Any]:
    """Train on one rank (see the module docstring); returns the last metrics (with steps/s)."""
    job = WorkerJob.parse(loop_config)
    config, device = job.config, context.device()
    job.hooks.on_start(context.rank)
    # Intra-op threads = the CPUs this worker reserved (more threads than cores makes every op
    # spin-wait when processes share the machine).
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    state = build_state(job, context)
    batches = open_batches(config, job.info, context.rank, context.world_size, state.step)
    metric_log = open_metric_log(job, context.rank)
    sender = context.progress_sender(job.inbox)
    log = StepLog(job, context.rank, context.world_size, device, sender, start_step=state.step)
    if state.resumed_from is not None:
        log.note(state.step, f"resumed from step {state.step} ({state.resumed_from})")
        if metric_log is not None:
            metric_log.log({"resumed_from_step": float(state.step)}, state.step)
    progress = Progress(metrics={"step": state.step})
    if state.step >= config.steps:  # resumed at the end: report the result again, train nothing
        report_finished_run(state, context, progress)
    state.model.train()
    try:
        for step in range(state.step + 1, config.steps + 1):
            images, labels, clean = batches.next(device)
            out = train_step(
                state.model, state.optimizer, state.loss_fn, images, labels,
                config=config, clean=clean, scaler=state.scaler,
            )  # fmt: skip
            log.add(step, out, state.optimizer.param_groups[0]["lr"])
            state.scheduler.step()
            job.hooks.after_step(step)
            if not end_of_step(step, state, job, context, log, metric_log, progress):
                break
        else:
            progress.status, progress.reason = "FINISHED", f"completed {config.steps} steps"
    finally:  # a killed group never gets here; the next attempt re-opens the run
        if metric_log is not None:
            metric_log.close(job.tracking_uri, job.run_id, progress.status, progress.reason)
    progress.metrics["steps_per_s"] = progress.clock.rate
    if state.step < config.steps and progress.status == "FINISHED":
        log.note(config.steps, f"done: {config.steps} steps, {progress.clock.rate:.2f} steps/s")
    return progress.metrics


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for ``ray.train.torch.TorchTrainer`` (one call per rank)."""
    run_worker(loop_config, RayContext())
