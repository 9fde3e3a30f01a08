"""Trained models for inference: from an MLflow run, a ``.pt`` file or a Ray checkpoint
directory (always ``weights_only=True``), and the sliding-window size their config implies.

Models come from :func:`load_trained_model`: an MLflow run id (artifact ``checkpoint/final.pt``), a
``.pt`` file or a Ray checkpoint directory holding ``state.pt``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noisyseg.distributed.checkpoints import FINAL_ARTIFACT, model_from_checkpoint, read_state
from noisyseg.errors import NoisysegInputError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from noisyseg.models import UNetSpec

#: Artifact path of the final model inside a training run (see distributed/checkpoints.py).
FINAL_CHECKPOINT_ARTIFACT = FINAL_ARTIFACT


def _looks_like_run_id(source: str) -> bool:
    """True when ``source`` looks like an MLflow run id (8+ hex digits)."""
    return len(source) >= 8 and all(ch in "0123456789abcdef" for ch in source.lower())


def download_run_checkpoint(run_id: str, dst_dir: str | os.PathLike) -> Path:
    """Download ``checkpoint/final.pt`` of an MLflow run into ``dst_dir``; returns the file path.

    Tracking URI as for training: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Raises:
        NoisysegInputError: the run does not exist or has no final checkpoint.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from noisyseg.distributed.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri()
    try:
        mlflow.MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise NoisysegInputError(f"no MLflow run {run_id!r}", path=uri) from None
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=FINAL_CHECKPOINT_ARTIFACT,
            dst_path=str(dst_dir),
            tracking_uri=uri,
        )
    except (MlflowException, OSError):
        raise NoisysegInputError(
            f"MLflow run {run_id} has no artifact {FINAL_CHECKPOINT_ARTIFACT}", path=uri
        ) from None
    return Path(local)


def load_checkpoint(source: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict named by ``source`` (see :func:`load_trained_model`)."""
    path = Path(source)
    if path.exists() or str(source).endswith(".pt") or not _looks_like_run_id(str(source)):
        return read_state(path)
    with tempfile.TemporaryDirectory(prefix="noisyseg-ckpt-") as tmp:
        return read_state(download_run_checkpoint(str(source), tmp))


def load_trained_model(source: str | os.PathLike) -> tuple[nn.Module, UNetSpec, dict]:
    """Load a trained U-Net (in eval mode, on CPU).

    Args:
        source: an MLflow run id (downloads ``checkpoint/final.pt``), a ``.pt`` checkpoint file,
            or a Ray checkpoint directory containing ``state.pt``.

    Returns:
        ``(model, spec, config)`` — ``config`` is the training config dict (``{}`` when absent).

    Raises:
        NoisysegInputError: missing file/run, unreadable or mismatching checkpoint.
    """
    checkpoint = load_checkpoint(source)
    model, spec = model_from_checkpoint(checkpoint, source=str(source))
    return model, spec, dict(checkpoint.get("config") or {})


def roi_from_config(config: dict, spatial_dims: int, default: int | None = None) -> tuple[int, ...]:
    """Sliding-window size from a training config's ``patch_size`` (int or list).

    Raises:
        NoisysegInputError: neither the config nor ``default`` gives a size.
    """
    size = config.get("patch_size", default)
    if size is None:
        raise NoisysegInputError("no patch size in the training config; pass --roi-size")
    if isinstance(size, int):
        return (int(size),) * spatial_dims
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size * spatial_dims
    if len(size) != spatial_dims:
        raise NoisysegInputError(f"patch size {size} does not have {spatial_dims} dims")
    return size


def check_roi(roi_size: Sequence[int], spec: UNetSpec) -> tuple[int, ...]:
    """Validate a window against the network: right number of dims, multiples of its divisor."""
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != spec.spatial_dims:
        raise NoisysegInputError(f"roi size {roi} is not {spec.spatial_dims}D like the network")
    if any(r <= 0 or r % spec.divisor for r in roi):
        raise NoisysegInputError(f"roi size {roi} must be positive multiples of {spec.divisor}")
    return roi


__all__ = [
    "FINAL_CHECKPOINT_ARTIFACT",
    "check_roi",
    "download_run_checkpoint",
    "load_checkpoint",
    "load_trained_model",
    "roi_from_config",
]
