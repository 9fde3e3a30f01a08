"""Where the training loop runs: a Ray Train worker, or a plain process.

The loop (:func:`noisyseg.distributed.train_loop.run_worker`) asks its context for the rank, the
device, the checkpoint to resume from, the DDP wrapping and where reports go; nothing else in the
loop knows about Ray.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisyseg.distributed.progress import ProgressSender


class WorkerContext:
    """Where the loop runs: rank, device, checkpoint restore and reporting."""

    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device:
        raise NotImplementedError

    def restore_dir(self) -> Path | None:
        """Directory of the checkpoint the framework hands back on a restart, or None."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        raise NotImplementedError

    def progress_sender(self, inbox: Any | None) -> ProgressSender:
        """Where rank 0's progress goes: the launcher's inbox, else printed lines (rank 0)."""
        return ProgressSender(inbox, echo=inbox is None and self.rank == 0)


class RayContext(WorkerContext):
    """Inside a Ray Train worker (Train V2 API)."""

    def __init__(self) -> None:
        # Ray is imported here, not at the top: plain-process users of this module
        # (LocalContext, unit tests, benchmarks) do not pay for it.
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._restore_tmp: tempfile.TemporaryDirectory | None = None

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
    checkpoint directory; ``sender``: where progress goes (default: printed lines). Reported
    metrics are kept in :attr:`reports`.
    """

    def __init__(
        self,
        device: str = "cpu",
        checkpoint_root: str | Path | None = None,
        restore: str | Path | None = None,
        sender: ProgressSender | None = None,
    ) -> None:
        self._device = torch.device(device)
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self._restore = Path(restore) if restore else None
        self._sender = sender
        self.reports: list[dict[str, Any]] = []

    def progress_sender(self, inbox: Any | None) -> ProgressSender:
        return self._sender or super().progress_sender(inbox)

    def device(self) -> torch.device:
        return self._device

    def restore_dir(self) -> Path | None:
        return self._restore

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self._device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.checkpoint_root is not None:
            shutil.copytree(checkpoint_dir, self.checkpoint_root / name, dirs_exist_ok=True)
