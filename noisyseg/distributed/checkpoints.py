"""Checkpoint files: their names, how they are written, and the one loader.

Two kinds, both ``torch.save`` of a dict of plain types and tensors that loads with
``torch.load(path, weights_only=True)`` (DESIGN.md, "Runtime conventions"):

* the **training state** ``<run dir>/checkpoint_<step:07d>/state.pt`` (a Ray Train checkpoint),
  written every ``checkpoint_interval`` steps so a run resumes exactly where it stopped;
* the **final model** ``final.pt``, logged to MLflow as the artifact ``checkpoint/final.pt``.

Both hold:

* ``model``: ``state_dict`` of the unwrapped module (no ``module.`` prefix from DDP);
* ``unet_spec``: :meth:`noisyseg.models.UNetSpec.to_dict`;
* ``config``: ``TrainConfig.model_dump(mode="json")``;
* ``step``: optimiser steps done.

The training state additionally holds ``optimizer``, ``scheduler`` (state dicts), ``rng``
(``{"torch": ByteTensor}``), ``mlflow_run_id`` and ``tracking_uri`` (str or None: the MLflow run
the training logs into, and where).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisyseg.distributed.run_storage import RunLocation
from noisyseg.errors import NoisysegInputError
from noisyseg.models import UNetSpec, build_unet, unwrap_model

#: File of a Ray checkpoint directory holding the training state.
STATE_FILE = "state.pt"
#: File name of the final model.
FINAL_FILE = "final.pt"
#: MLflow artifact directory of the final model, and its full artifact path.
FINAL_ARTIFACT_DIR = "checkpoint"
FINAL_ARTIFACT = f"{FINAL_ARTIFACT_DIR}/{FINAL_FILE}"
#: Keys every checkpoint holds.
REQUIRED_KEYS = frozenset({"model", "unet_spec", "config", "step"})

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_<step:07d>``: the Ray checkpoint directory of ``step`` (sorts by step)."""
    return f"checkpoint_{int(step):07d}"


# ---------------------------------------------------------------------------------- writing
def model_payload(
    model: nn.Module, unet_spec: dict[str, Any], config: dict[str, Any], step: int
) -> dict[str, Any]:
    """The model-only payload (``final.pt``): weights on CPU, spec, config, step."""
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
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
    tracking_uri: str | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write ``directory/state.pt`` (the Ray checkpoint payload); return its path.

    ``metrics``: what the run reported at ``step`` (numbers only), so that a run resumed at its
    last step can report its result again without training.
    """
    payload = model_payload(model, unet_spec, config, step)
    payload.update(
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri,
        rng={"torch": torch.get_rng_state()},
        metrics={k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)},
    )
    path = Path(directory) / STATE_FILE
    torch.save(payload, path)
    return path


def save_final_model(directory: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``directory/final.pt`` from :func:`model_payload`; return its path."""
    path = Path(directory) / FINAL_FILE
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------------- reading
def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in (STATE_FILE, FINAL_FILE):
            if (path / name).is_file():
                return path / name
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, by ``torch.load(path, weights_only=True)``.

    ``path`` may be the file or a directory holding ``state.pt`` / ``final.pt``.

    Raises:
        NoisysegInputError: missing, unloadable (truncated, not a checkpoint, unsafe pickle)
            or lacking one of :data:`REQUIRED_KEYS`.
    """
    path = _checkpoint_file(Path(path))
    if not path.is_file():
        raise NoisysegInputError("checkpoint file not found", path=str(path))
    return _load_checked(path, str(path))


def state_from_bytes(data: bytes, where: str) -> dict[str, Any]:
    """:func:`read_state` of a file's bytes (read from any filesystem); ``where`` names it."""
    return _load_checked(io.BytesIO(data), where)


def _load_checked(source: Path | io.BytesIO, where: str) -> dict[str, Any]:
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is bad input here
        raise NoisysegInputError(
            f"not a loadable checkpoint ({error.__class__.__name__})", path=where
        ) from None
    if not isinstance(payload, dict):
        raise NoisysegInputError("not a checkpoint (no dict inside)", path=where)
    missing = REQUIRED_KEYS - set(payload)
    if missing:
        raise NoisysegInputError(f"checkpoint lacks {', '.join(sorted(missing))}", path=where)
    return payload


def _strip_ddp_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Keys without DDP's ``module.`` prefix (files written before :func:`model_payload`)."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return state


def spec_from_payload(payload: dict[str, Any]) -> UNetSpec:
    """The :class:`UNetSpec` a checkpoint describes (lists turned back into tuples)."""
    spec_data = dict(payload["unet_spec"])
    for key in ("channels", "strides"):
        if key in spec_data:
            spec_data[key] = tuple(spec_data[key])
    return UNetSpec(**spec_data)


def model_from_checkpoint(
    checkpoint: dict[str, Any], *, source: str = "checkpoint"
) -> tuple[nn.Module, UNetSpec]:
    """Build the U-Net ``checkpoint["unet_spec"]`` describes and load ``checkpoint["model"]``.

    Returns:
        ``(model, spec)``, the model in eval mode on CPU.

    Raises:
        NoisysegInputError: the weights do not fit the spec (one line naming ``source``).
    """
    try:
        spec = spec_from_payload(checkpoint)
        model = build_unet(spec)
        model.load_state_dict(_strip_ddp_prefix(dict(checkpoint["model"])))
    except (TypeError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise NoisysegInputError(
            f"checkpoint does not match its U-Net spec ({first})", path=source
        ) from error
    return model.eval(), spec


def load_model_state(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, UNetSpec, dict[str, Any], int]:
    """Rebuild the trained network from ``state.pt`` or ``final.pt`` (file or directory).

    Returns:
        ``(model, spec, config, step)``: the network in eval mode on ``device``, its
        :class:`~noisyseg.models.UNetSpec`, the config dict, the step count.
    """
    payload = read_state(path)
    model, spec = model_from_checkpoint(payload, source=str(path))
    return model.to(device), spec, dict(payload["config"]), int(payload["step"])


#: A run directory: a local path, a URL (``s3://bucket/results/run``) or a resolved location.
RunDir = str | Path | RunLocation


def _location(run_dir: RunDir) -> RunLocation | None:
    """The remote location of ``run_dir``; None for a local directory (read with ``pathlib``)."""
    if isinstance(run_dir, RunLocation):
        return run_dir if run_dir.remote else None
    return RunLocation.resolve(str(run_dir)) if "://" in str(run_dir) else None


def checkpoint_dirs(run_dir: RunDir) -> list[tuple[int, Path | str]]:
    """``(step, directory)`` of every ``checkpoint_<step>`` directory under a run, newest first.

    Local runs give ``Path`` objects; runs on remote storage their URLs
    (``s3://bucket/results/run/checkpoint_0000004``).
    """
    location = _location(run_dir)
    found: list[tuple[int, Path | str]] = []
    if location is not None:
        for name in location.subdirectories():
            match = _CHECKPOINT_DIR.match(name)
            if match:
                found.append((int(match.group(1)), location.child(name).url))
        return sorted(found, key=lambda item: item[0], reverse=True)
    local = Path(run_dir.path if isinstance(run_dir, RunLocation) else run_dir)
    if not local.is_dir():
        return []
    for entry in local.iterdir():
        match = _CHECKPOINT_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _read_remote_state(location: RunLocation, name: str) -> dict[str, Any]:
    data = location.read_bytes(f"{name}/{STATE_FILE}")
    where = f"{location.url}/{name}/{STATE_FILE}"
    if data is None:
        raise NoisysegInputError("checkpoint file not found", path=where)
    return state_from_bytes(data, where)


def latest_checkpoint_state(run_dir: RunDir) -> tuple[Path | str, dict[str, Any]] | None:
    """The newest *complete* training state under a Ray run directory, or None.

    ``run_dir``: a local directory, or a run on any filesystem (``s3://...`` URL or
    :class:`~noisyseg.distributed.run_storage.RunLocation`); the answer's first item is the
    ``state.pt`` path (a URL for remote storage).

    Directories are tried newest step first; the first whose ``state.pt`` loads (with every
    required key, and the step its name says) wins. A checkpoint still being copied (Ray uploads
    the directory after ``report``) is a truncated zip file, or on an object store has no
    ``state.pt`` object yet, and does not load, so it is skipped.
    Ray's own checkpoint manager may lag the newest complete one on disk (it registers a
    checkpoint when the controller polls the report), so the workers resume from this one.
    """
    location = _location(run_dir)
    for step, directory in checkpoint_dirs(location or run_dir):
        try:
            if location is not None:
                name = str(directory).rpartition("/")[2]
                payload, where = _read_remote_state(location, name), f"{directory}/{STATE_FILE}"
            else:
                where = Path(directory) / STATE_FILE
                payload = read_state(where)
        except NoisysegInputError:
            continue
        if int(payload["step"]) == step:
            return where, payload
    return None
