"""Prediction over many cases, in-process or in parallel over cases on Ray (one model load per
worker), writing the maps into the store (``predictions/<name>``) or as NIfTI files.

The other layers of inference live in their own modules (re-exported here, their old path):

- :mod:`~noisyseg.distributed.sliding_window` — :func:`predict_volume`, one image ``(C, *S)`` →
  lesion probability ``(*S)`` float32, and the training normalisation;
- :mod:`~noisyseg.distributed.evaluation` — :func:`evaluate_cases`, predict and score a case list;
- :mod:`~noisyseg.distributed.model_loading` — :func:`load_trained_model` and the window size;
- :mod:`~noisyseg.distributed.prediction_io` — case checks, map writing (store / NIfTI).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from noisyseg.distributed.checkpoints import model_from_checkpoint
from noisyseg.distributed.evaluation import EvaluationResult, evaluate_cases
from noisyseg.distributed.model_loading import (
    FINAL_CHECKPOINT_ARTIFACT,
    check_roi,
    download_run_checkpoint,
    load_checkpoint,
    load_trained_model,
    roi_from_config,
)
from noisyseg.distributed.prediction_io import (
    case_affine,
    check_cases,
    check_channels,
    read_prediction,
    write_nifti,
    write_prediction,
)
from noisyseg.distributed.sliding_window import (
    BlendName,
    case_normalization_stats,
    normalization_stats,
    normalize_image,
    predict_volume,
)
from noisyseg.models import AmpName
from noisyseg.storage.store import VolumeStore


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings shared by every case of a prediction job."""

    roi_size: tuple[int, ...]
    overlap: float = 0.25
    sw_batch_size: int = 4
    mode: BlendName = "gaussian"
    device: str = "cpu"
    amp: AmpName = "none"

    def kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of :func:`predict_volume`."""
        return {
            "roi_size": self.roi_size,
            "overlap": self.overlap,
            "sw_batch_size": self.sw_batch_size,
            "mode": self.mode,
            "device": self.device,
            "amp": self.amp,
        }


def _open_store(url: str, mode: str = "r") -> VolumeStore:
    """The store at ``url``, opened in ``mode``."""
    return VolumeStore.open(url, mode=mode)


class CasePredictor:
    """Holds one model and one open store; predicts and writes cases one at a time.

    Used directly in-process and, wrapped with ``ray.remote``, as one actor per Ray worker so the
    model is built once per worker (the checkpoint arrives through the object store).
    """

    def __init__(
        self,
        checkpoint: dict[str, Any],
        store_url: str,
        settings: InferenceSettings,
        *,
        name: str = "prediction",
        nifti_dir: str | None = None,
        num_threads: int | None = None,
        write: bool = True,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.spec = model_from_checkpoint(checkpoint)
        self.model.to(settings.device)
        self.settings = settings
        self.name = name
        self.nifti_dir = nifti_dir
        self.overwrite = overwrite
        self.metadata = metadata
        self.store = _open_store(store_url, mode="r+" if write and not nifti_dir else "r")

    def probability(self, case_id: str) -> tuple[str, np.ndarray]:
        """``(case_id, (*S) float32 probability)`` without writing anything."""
        return case_id, predict_volume(
            self.model,
            self.store.image(case_id),
            **self.settings.kwargs(),
            stats=case_normalization_stats(self.store, case_id),
        )

    def predict(self, case_id: str) -> dict[str, Any]:
        """Predict ``case_id`` and write it; returns ``case_id``, ``shape``, ``output``, ``seconds``."""
        start = time.perf_counter()
        _, probability = self.probability(case_id)
        if self.nifti_dir:
            output = str(
                write_nifti(
                    Path(self.nifti_dir) / f"{case_id}_{self.name}.nii.gz",
                    probability,
                    case_affine(self.store, case_id),
                )
            )
        else:
            output = write_prediction(
                self.store,
                case_id,
                self.name,
                probability,
                overwrite=self.overwrite,
                metadata=self.metadata,
            )
        return {
            "case_id": case_id,
            "shape": list(probability.shape),
            "output": output,
            "seconds": time.perf_counter() - start,
        }


#: Per Ray worker process: the last CasePredictor built, keyed by checkpoint ref and settings,
#: so a worker builds the model once and reuses it for every case (and later calls) it runs.
_WORKER_PREDICTOR: dict[tuple, CasePredictor] = {}


def _remote_case(
    checkpoint_box: list[Any],
    store_url: str,
    settings: InferenceSettings,
    method: str,
    predictor_kwargs: dict[str, Any],
    num_threads: int,
    case_id: str,
) -> Any:
    """Body of the Ray task: one case on this worker's cached predictor.

    ``checkpoint_box`` is ``[ObjectRef]`` — wrapped in a list so Ray does not resolve it; the
    checkpoint is fetched from the object store only when this worker has no predictor yet.
    """
    import ray

    key = (
        checkpoint_box[0].hex(),
        store_url,
        settings,
        repr(sorted(predictor_kwargs.items())),
        num_threads,
    )
    predictor = _WORKER_PREDICTOR.get(key)
    if predictor is None:
        _WORKER_PREDICTOR.clear()
        predictor = CasePredictor(
            ray.get(checkpoint_box[0]),
            store_url,
            settings,
            num_threads=num_threads,
            **predictor_kwargs,
        )
        _WORKER_PREDICTOR[key] = predictor
    return getattr(predictor, method)(case_id)


def map_cases(
    checkpoint: dict[str, Any],
    store_url: str,
    case_ids: Sequence[str],
    settings: InferenceSettings,
    *,
    method: Literal["predict", "probability"],
    workers: int = 1,
    use_ray: bool | None = None,
    **predictor_kwargs: Any,
) -> Iterator[Any]:
    """Run ``CasePredictor.<method>(case_id)`` for every case; yields results as they finish.

    In-process (one model) or on Ray: at most ``workers`` tasks in flight (one CPU each); the
    checkpoint is put once into the object store and each worker process builds the model once
    and keeps it for the following cases. ``use_ray`` defaults to ``workers > 1`` or
    ``RAY_ADDRESS`` set. Ray is started (and shut down at the end) only when it is not
    initialised already.
    """
    case_ids = list(case_ids)
    if use_ray is None:
        use_ray = workers > 1 or bool(os.environ.get("RAY_ADDRESS"))
    if not use_ray:
        predictor = CasePredictor(checkpoint, store_url, settings, **predictor_kwargs)
        for case_id in case_ids:
            yield getattr(predictor, method)(case_id)
        return

    import ray

    from noisyseg.distributed.ray_utils import ensure_ray

    workers = max(1, min(workers, len(case_ids)))
    started = ensure_ray(workers, dashboard=False, log_to_driver=False)
    pending: list[Any] = []
    try:
        threads = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
        task = ray.remote(num_cpus=1, max_retries=1)(_remote_case)
        box = [ray.put(checkpoint)]
        queue = list(reversed(case_ids))
        while queue or pending:
            while queue and len(pending) < workers:
                pending.append(
                    task.remote(
                        box, store_url, settings, method, predictor_kwargs, threads, queue.pop()
                    )
                )
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def predict_cases(
    checkpoint: dict[str, Any],
    store_url: str,
    case_ids: Sequence[str],
    settings: InferenceSettings,
    *,
    name: str = "prediction",
    nifti_dir: str | None = None,
    workers: int = 1,
    use_ray: bool | None = None,
    progress: Callable[[dict[str, Any], int, int], None] | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Predict ``case_ids`` and write their probability maps (store or NIfTI).

    Args:
        checkpoint: checkpoint dict (see :func:`load_checkpoint`).
        store_url: the store path/URL (each worker opens it itself).
        case_ids: cases to predict (validated by the caller).
        settings: sliding-window settings.
        name: prediction name (``<case>/predictions/<name>`` or ``<case>_<name>.nii.gz``).
        nifti_dir: write NIfTI files there instead of into the store.
        workers: parallel workers (Ray actors, one model each).
        use_ray: force Ray on/off; default: Ray when ``workers > 1`` or ``RAY_ADDRESS`` is set.
        progress: called as ``progress(record, done, total)`` after each case.
        overwrite: replace maps of that name already in the store (else refused).
        metadata: kept with each map in the store (model, run id, threshold).

    Returns:
        One record per case (``case_id``, ``shape``, ``output``, ``seconds``), in input order.
    """
    case_ids = list(case_ids)
    records: dict[str, dict[str, Any]] = {}
    results = map_cases(
        checkpoint,
        store_url,
        case_ids,
        settings,
        method="predict",
        workers=workers,
        use_ray=use_ray,
        name=name,
        nifti_dir=nifti_dir,
        overwrite=overwrite,
        metadata=metadata,
    )
    for index, record in enumerate(results):
        records[record["case_id"]] = record
        if progress is not None:
            progress(record, index + 1, len(case_ids))
    return [records[c] for c in case_ids]


__all__ = [
    "FINAL_CHECKPOINT_ARTIFACT",
    "BlendName",
    "CasePredictor",
    "EvaluationResult",
    "InferenceSettings",
    "case_affine",
    "case_normalization_stats",
    "check_cases",
    "check_channels",
    "check_roi",
    "download_run_checkpoint",
    "evaluate_cases",
    "load_checkpoint",
    "load_trained_model",
    "map_cases",
    "normalization_stats",
    "normalize_image",
    "predict_cases",
    "predict_volume",
    "read_prediction",
    "roi_from_config",
    "write_nifti",
    "write_prediction",
]
