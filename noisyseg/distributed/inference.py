"""Prediction over many cases, in-process or in parallel over cases on a Ray Data actor pool (one
model load per actor, one GPU per actor on GPUs), writing the maps into the store
(``predictions/<name>``) or as NIfTI files.

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
from dataclasses import dataclass, replace
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

    Used directly in-process and, inside :class:`CaseBatchPredictor`, once per Ray Data actor so
    the model is built once per actor.
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
            path = Path(self.nifti_dir) / f"{case_id}_{self.name}.nii.gz"
            write_nifti(path, probability, case_affine(self.store, case_id))  # returns nothing
            output = str(path)
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


def wants_gpu(settings: InferenceSettings, gpu: bool | None = None) -> bool:
    """Whether each Ray actor reserves a GPU: ``gpu`` when given, else whether the settings'
    device is CUDA (``--device cuda``, or ``predict --gpu`` on Ray, which resolves to it)."""
    if gpu is not None:
        return bool(gpu)
    return str(settings.device).startswith("cuda")


def actor_settings(settings: InferenceSettings, gpu: bool) -> InferenceSettings:
    """The settings as an actor runs them: ``cuda`` (its one reserved GPU, which Ray makes the
    only visible one) when it holds a GPU; the CPU instead of a CUDA device it does not hold."""
    if gpu:
        return replace(settings, device="cuda")
    if str(settings.device).startswith("cuda"):
        return replace(settings, device="cpu")
    return settings


def _column(values: list[Any]) -> np.ndarray:
    """One output column of a batch: stacked arrays (tensor column), or a plain array."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        if len({v.shape for v in values}) == 1:
            return np.stack(values)
        return np.array(values, dtype=object)  # variable-shaped tensors
    return np.asarray(values)


class CaseBatchPredictor:
    """Ray Data UDF (callable class) of :func:`map_cases`: one :class:`CasePredictor` per actor,
    built once in the constructor; each batch (one case) runs ``CasePredictor.<method>``.

    Output columns: ``predict`` — ``case_id``, ``shape``, ``output``, ``seconds``;
    ``probability`` — ``case_id`` and ``probability`` (the ``(*S)`` float32 map, a tensor
    column), turned back into what ``CasePredictor`` returns by :func:`_result_from_row`.
    """

    def __init__(
        self,
        checkpoint: dict[str, Any],
        store_url: str,
        settings: InferenceSettings,
        method: Literal["predict", "probability"],
        predictor_kwargs: dict[str, Any],
        num_threads: int | None = None,
    ) -> None:
        self.method = method
        self.predictor = CasePredictor(
            checkpoint, store_url, settings, num_threads=num_threads, **predictor_kwargs
        )

    def row(self, case_id: str) -> dict[str, Any]:
        """One case's output row."""
        if self.method == "probability":
            _, probability = self.predictor.probability(case_id)
            return {"case_id": case_id, "probability": probability}
        record = self.predictor.predict(case_id)
        return {**record, "shape": np.asarray(record["shape"], dtype=np.int64)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.row(str(case_id)) for case_id in batch["case_id"]]
        return {key: _column([r[key] for r in rows]) for key in rows[0]}


def _result_from_row(method: str, row: dict[str, Any]) -> Any:
    """A Ray Data output row as ``CasePredictor.<method>`` returns it."""
    if method == "probability":
        probability = np.asarray(row["probability"], dtype=np.float32)
        if not probability.flags.writeable:  # a zero-copy view of the block
            probability = probability.copy()
        return str(row["case_id"]), probability
    return {
        "case_id": str(row["case_id"]),
        "shape": [int(n) for n in row["shape"]],
        "output": str(row["output"]),
        "seconds": float(row["seconds"]),
    }


def map_cases(
    checkpoint: dict[str, Any],
    store_url: str,
    case_ids: Sequence[str],
    settings: InferenceSettings,
    *,
    method: Literal["predict", "probability"],
    workers: int = 1,
    use_ray: bool | None = None,
    gpu: bool | None = None,
    **predictor_kwargs: Any,
) -> Iterator[Any]:
    """Run ``CasePredictor.<method>(case_id)`` for every case; yields results as they finish.

    In-process (one model, ``settings.device``) or on Ray Data:
    ``ray.data.from_items(cases).map_batches(CaseBatchPredictor, batch_size=1, num_gpus=1 if
    gpu else 0)`` on an actor pool of up to ``workers`` actors, each building the model once
    (:func:`noisyseg.distributed.ray_utils.stream_actor_pool`). ``gpu`` (default: whether
    ``settings.device`` is CUDA, :func:`wants_gpu`) makes each actor reserve one GPU and run on
    it; without it the actors run on CPU. ``probability`` maps travel back through the Ray
    object store as a tensor column, one case at a time. ``use_ray`` defaults to
    ``workers > 1`` or ``RAY_ADDRESS`` set. Ray is started (and shut down at the end) only
    when it is not initialised already.
    """
    case_ids = list(case_ids)
    if use_ray is None:
        use_ray = workers > 1 or bool(os.environ.get("RAY_ADDRESS"))
    if not use_ray:
        predictor = CasePredictor(checkpoint, store_url, settings, **predictor_kwargs)
        for case_id in case_ids:
            yield getattr(predictor, method)(case_id)
        return

    from noisyseg.distributed.ray_utils import stream_actor_pool

    on_gpu = wants_gpu(settings, gpu)
    rows = stream_actor_pool(
        [{"case_id": case_id} for case_id in case_ids],
        CaseBatchPredictor,
        {
            "checkpoint": checkpoint,
            "store_url": store_url,
            "settings": actor_settings(settings, on_gpu),
            "method": method,
            "predictor_kwargs": predictor_kwargs,
        },
        workers=workers,
        gpu=on_gpu,
    )
    for row in rows:
        yield _result_from_row(method, row)


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
    gpu: bool | None = None,
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
        workers: parallel workers (Ray Data actors, one model each).
        use_ray: force Ray on/off; default: Ray when ``workers > 1`` or ``RAY_ADDRESS`` is set.
        gpu: on Ray, one GPU per actor; default: when ``settings.device`` is CUDA.
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
        gpu=gpu,
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
    "CaseBatchPredictor",
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
    "wants_gpu",
    "write_prediction",
]
