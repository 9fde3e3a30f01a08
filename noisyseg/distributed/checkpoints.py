"""Checkpoint files: one ``state.pt`` per Ray checkpoint, ``checkpoint/final.pt`` in MLflow.

Both are ``torch.save`` of a dict of plain types and tensors that loads with
``torch.load(path, weights_only=True)`` (DESIGN.md, "Runtime conventions"):

* ``model``: ``state_dict`` of the unwrapped module (no ``module.`` prefix from DDP);
* ``unet_spec``: :meth:`noisyseg.models.UNetSpec.to_dict`;
* ``config``: ``TrainConfig.model_dump(mode="json")``;
* ``step``: optimiser steps done.

Ray checkpoints (``state.pt``) additionally hold ``optimizer``, ``scheduler`` (state dicts),
``mlflow_run_id`` (str or None) and ``rng`` (``{"torch": ByteTensor}``) so a run resumes
exactly where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisyseg.errors import NoisysegInputError

STATE_FILE = "state.pt"
FINAL_ARTIFACT = "checkpoint/final.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, or ``model.module`` for DistributedDataParallel."""
    return (
        model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    )


def model_payload(
    model: nn.Module, unet_spec: dict[str, Any], config: dict[str, Any], step: int
) -> dict[str, Any]:
    """The model-only payload (``final.pt``): weights on CPU, spec, config, step."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return {"model": state, "unet_spec": dict(unet_spec), "config": dict(config), "step": int(step)}


def save_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    unet_spec: dict[str, Any],
    config: dict[str, Any],
    step: int,
    mlflow_run_id: str | None,
) -> Path:
    """Write ``directory/state.pt`` (the Ray checkpoint payload); return its path."""
    payload = model_payload(model, unet_spec, config, step)
    payload.update(
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        mlflow_run_id=mlflow_run_id,
        rng={"torch": torch.get_rng_state()},
    )
    path = Path(directory) / STATE_FILE
    torch.save(payload, path)
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a one-line error for missing/corrupt files.

    ``path`` may be the file or a directory holding ``state.pt`` / ``final.pt``.
    """
    path = Path(path)
    if path.is_dir():
        for name in (STATE_FILE, "final.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise NoisysegInputError("checkpoint file not found", path=str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is bad input here
        raise NoisysegInputError(
            f"not a loadable checkpoint ({error.__class__.__name__})", path=str(path)
        ) from None
    missing = {"model", "unet_spec", "config", "step"} - set(payload)
    if missing:
        raise NoisysegInputError(f"checkpoint lacks {', '.join(sorted(missing))}", path=str(path))
    return payload


def load_model_state(path: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild the trained network from ``state.pt`` or ``final.pt``.

    Returns:
        ``(model, spec, config, step)``: the network in eval mode on ``device``, its
        :class:`~noisyseg.models.UNetSpec`, the config dict, the step count.
    """
    from noisyseg.models import UNetSpec, build_unet

    payload = read_state(path)
    spec_data = dict(payload["unet_spec"])
    spec_data["channels"] = tuple(spec_data["channels"])
    spec_data["strides"] = tuple(spec_data["strides"])
    spec = UNetSpec(**spec_data)
    model = build_unet(spec)
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return model, spec, payload["config"], int(payload["step"])


def latest_checkpoint_state(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The ``state.pt`` with the highest step under a Ray run directory, or None.

    Used by the launcher to learn, before starting Ray, whether a run name resumes and which
    MLflow run it continues (Ray itself restores from its own snapshot of the same directory).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[Path, dict[str, Any]] | None = None
    for path in run_dir.glob(f"checkpoint_*/{STATE_FILE}"):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001, S112 - a half-written checkpoint is skipped
            continue
        if best is None or int(payload.get("step", -1)) > int(best[1].get("step", -1)):
            best = (path, payload)
    return best
