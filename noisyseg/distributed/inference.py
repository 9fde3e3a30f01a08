"""Sliding-window inference, evaluation over a store split, and probability-map writing.

Three layers:

- :func:`predict_volume` — one image ``(C, *S)`` → lesion probability ``(*S)`` float32, with MONAI's
  :func:`~monai.inferers.sliding_window_inference` (Gaussian blending of logits, then a sigmoid).
- :func:`evaluate_cases` — predict every case of a list and score them with
  :func:`noisyseg.metrics.lesion_metrics` against a label set of the store.
- :func:`predict_cases` — predict cases and write the maps into the store (``predictions/<name>``)
  or as NIfTI files, in-process or in parallel over cases on Ray (one model load per worker).

Models come from :func:`load_trained_model`: an MLflow run id (artifact ``checkpoint/final.pt``), a
``.pt`` file or a Ray checkpoint directory holding ``state.pt``; always ``weights_only=True``.

Probability maps in the store follow the image's OME-Zarr conventions: a multiscale group
``<case>/predictions/<name>`` with one float32 array ``"0"`` of shape ``(*S)`` (values in ``[0, 1]``),
axes and ``scale`` (voxel spacing) as for the labels.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from noisyseg.distributed.checkpoints import (
    FINAL_ARTIFACT,
    model_from_checkpoint,
    read_state,
)
from noisyseg.errors import NoisysegInputError
from noisyseg.models import AmpName, autocast

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from noisyseg.models import UNetSpec

BlendName = Literal["gaussian", "constant"]

#: Artifact path of the final model inside a training run (see distributed/checkpoints.py).
FINAL_CHECKPOINT_ARTIFACT = FINAL_ARTIFACT


# ----------------------------------------------------------------------------------------------
# Normalisation


def normalization_stats(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of an image not in a store, by the patch loader's rule
    (:func:`noisyseg.storage.patches.subsample_stats`, std below 1e-8 replaced by 1)."""
    from noisyseg.storage.patches import subsample_stats

    mean, std = subsample_stats(image)
    return mean, np.where(std > 1e-8, std, 1.0).astype(np.float32)


def case_normalization_stats(store: Any, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of a stored case exactly as training normalises it
    (:func:`noisyseg.storage.patches.case_stats`: recorded statistics, else a subsample)."""
    from noisyseg.storage.patches import case_stats

    return case_stats(store, case_id)


def normalize_image(image: Any, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per-case, per-channel z-score ``(x - mean_c) / std_c`` (the training normalisation).

    Args:
        image: ``(C, *S)`` any real dtype.
        stats: ``(mean, std)`` each ``(C,)``; default :func:`normalization_stats` of ``image``.

    Returns:
        ``(C, *S)`` float32.
    """
    data = np.asarray(image[...] if not isinstance(image, np.ndarray) else image, dtype=np.float32)
    mean, std = normalization_stats(data) if stats is None else stats
    shape = (data.shape[0],) + (1,) * (data.ndim - 1)
    mean = np.asarray(mean, dtype=np.float32).reshape(shape)
    std = np.asarray(std, dtype=np.float32).reshape(shape)
    return (data - mean) / std


# ----------------------------------------------------------------------------------------------
# Sliding-window prediction


def predict_volume(
    model: nn.Module,
    image: Any,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: BlendName = "gaussian",
    device: str = "cpu",
    amp: AmpName = "none",
    normalize: bool = True,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Lesion probability of one image by sliding-window inference.

    Windows of ``roi_size`` overlap by ``overlap`` (fraction of the window); their **logits** are
    blended (Gaussian or constant weights), then ``sigmoid`` gives the probability. Images smaller
    than the window are zero-padded (after normalisation) and cropped back.

    Args:
        model: network mapping ``(N, C, *roi_size)`` to one logit channel ``(N, 1, *roi_size)``.
        image: ``(C, *S)`` numpy array or zarr array (read whole).
        roi_size: window size, one entry per spatial dim; each a multiple of the U-Net's divisor.
        overlap: window overlap in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        device: torch device string for the forward passes.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast for the forward passes.
        normalize: apply :func:`normalize_image` (the training normalisation) first.
        stats: per-channel ``(mean, std)`` for the normalisation (e.g.
            :func:`case_normalization_stats`); default: computed from ``image``.

    Returns:
        ``(*S)`` float32 probabilities in ``[0, 1]``.
    """
    import torch
    from monai.inferers import sliding_window_inference

    data = np.asarray(image[...] if not isinstance(image, np.ndarray) else image)
    if data.ndim < 2:
        raise NoisysegInputError(f"image must be (C, *spatial), got shape {data.shape}")
    spatial = data.shape[1:]
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial):
        raise NoisysegInputError(
            f"roi_size {roi} has {len(roi)} dims but the image has {len(spatial)} spatial dims"
        )
    if not 0.0 <= overlap < 1.0:
        raise NoisysegInputError(f"overlap must be in [0, 1), got {overlap}")
    if amp not in ("none", "bf16", "fp16"):
        raise NoisysegInputError(f"amp must be none, bf16 or fp16, got {amp!r}")
    data = normalize_image(data, stats) if normalize else data.astype(np.float32, copy=False)

    torch_device = torch.device(device)
    was_training = model.training
    model.eval()

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        with autocast(torch_device, amp):
            return model(batch).float()

    try:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(data))[None].to(torch_device)
            logits = sliding_window_inference(
                inputs,
                roi_size=roi,
                sw_batch_size=sw_batch_size,
                predictor=predictor,
                overlap=overlap,
                mode=mode,
                padding_mode="constant",
                cval=0.0,
            )
            probabilities = torch.sigmoid(logits.float())[0, 0]
    finally:
        model.train(was_training)
    return probabilities.cpu().numpy().astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Loading trained models


def _looks_like_run_id(source: str) -> bool:
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


# ----------------------------------------------------------------------------------------------
# Store helpers


def check_cases(store: Any, case_ids: Sequence[str], *, store_path: str | None = None) -> list[str]:
    """Validate that every case id is in the store (no duplicates); returns them as a list."""
    from noisyseg.storage.validate import check_case_id

    seen: set[str] = set()
    for case_id in case_ids:
        check_case_id(case_id, path=store_path)
        if case_id in seen:
            raise NoisysegInputError("case id given twice", case=case_id, path=store_path)
        seen.add(case_id)
        if not store.has_case(case_id):
            raise NoisysegInputError("case is not in the store", case=case_id, path=store_path)
    return list(case_ids)


def check_channels(store: Any, spec: UNetSpec, *, store_path: str | None = None) -> None:
    """The network's input channels and dimensionality must match the store's images."""
    channels = len(store.channel_names)
    if channels != spec.in_channels:
        raise NoisysegInputError(
            f"model expects {spec.in_channels} image channels, store has {channels}",
            path=store_path,
        )
    if int(store.spatial_dims) != spec.spatial_dims:
        raise NoisysegInputError(
            f"model is {spec.spatial_dims}D, store images are {store.spatial_dims}D",
            path=store_path,
        )


def write_prediction(
    store: Any,
    case_id: str,
    name: str,
    probabilities: np.ndarray,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write a ``(*S)`` probability map into an ``"r+"`` store
    (:meth:`~noisyseg.storage.store.VolumeStore.write_prediction`: ``cases/<id>/predictions/
    <name>``, OME-Zarr 0.5 multiscales, atomic on local stores; an existing name is refused
    unless ``overwrite``; ``metadata`` — model, run id, threshold — is kept with the map).
    Returns the array's path."""
    if getattr(store, "mode", "r+") != "r+":
        raise NoisysegInputError("store is opened read-only (mode 'r')", path=store.url)
    return store.write_prediction(
        case_id,
        name,
        np.asarray(probabilities, dtype=np.float32),
        overwrite=overwrite,
        metadata=metadata,
    )


def read_prediction(store: Any, case_id: str, name: str) -> np.ndarray:
    """Read back a probability map written by :func:`write_prediction`; ``(*S)`` float32."""
    return np.asarray(store.prediction(case_id, name)[...], dtype=np.float32)


def case_affine(store: Any, case_id: str) -> np.ndarray:
    """The case's NIfTI affine (4x4, voxel ``(i, j, k)`` = store ``(x, y, z)``) from the store,
    else ``diag(spacing reversed to x, y, z; 1)``."""
    affine = store.case_info(case_id).get("affine")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64).reshape(4, 4)
    spacing = [float(s) for s in store.spacing(case_id)][::-1]  # (x, y[, z])
    diagonal = spacing + [1.0] * (3 - len(spacing))
    return np.diag(diagonal + [1.0])


def write_nifti(path: str | os.PathLike, probabilities: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``(*S)`` probabilities as float32 NIfTI.

    The store's axes are ``(z, y, x)``; NIfTI voxel axes are ``(i, j, k)`` = ``(x, y, z)``, so the
    array is transposed on the way out (2D images get a singleton third axis).
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(probabilities, dtype=np.float32)
    data = data.T if data.ndim == 3 else data.T[:, :, None]
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvaluationResult:
    """Output of :func:`evaluate_cases`.

    Attributes:
        metrics: :func:`noisyseg.metrics.lesion_metrics` over all cases (plus ``num_cases``).
        per_case: one dict per case: ``case_id``, ``dice``, ``sensitivity``, ``max_sensitivity``,
            ``false_positives``, ``seconds``.
        probabilities: ``case_id -> (*S)`` float32 maps when kept, else ``None``.
    """

    metrics: dict[str, Any]
    per_case: list[dict[str, Any]] = field(default_factory=list)
    probabilities: dict[str, np.ndarray] | None = None


def _scalar(value: Any) -> float | None:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def evaluate_cases(
    model: nn.Module,
    store: Any,
    case_ids: Sequence[str],
    *,
    label_set: str = "truth",
    roi_size: Sequence[int],
    threshold: float = 0.5,
    candidate_threshold: float | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: BlendName = "gaussian",
    device: str = "cpu",
    amp: AmpName = "none",
    size_bins: Sequence[float] | None = None,
    keep_probabilities: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    probabilities: Mapping[str, np.ndarray] | None = None,
) -> EvaluationResult:
    """Predict every case and score lesion detection against ``label_set``.

    Args:
        model: the trained U-Net.
        store: an open :class:`noisyseg.storage.store.VolumeStore`.
        case_ids: cases to evaluate (validated first: present, label set present).
        label_set: reference labels (``"truth"`` normally).
        roi_size, overlap, sw_batch_size, mode, device, amp: see :func:`predict_volume`.
        threshold: probability threshold for predicted lesions.
        candidate_threshold: lowest candidate probability for the PR/FROC curves, AP and maximum
            sensitivity (``None``: ``threshold``; see :mod:`noisyseg.metrics`).
        size_bins: lesion-size bin edges (physical volume, spacing units cubed) for the breakdown.
        keep_probabilities: return the maps in the result.
        progress: called as ``progress(case_id, index, total)`` after each case.
        probabilities: precomputed maps ``case_id -> (*S)`` (e.g. from Ray workers via
            :func:`map_cases`); ``model`` is then not used (may be ``None``).
    """
    from noisyseg.metrics import lesion_metrics

    if not 0.0 <= threshold <= 1.0:
        raise NoisysegInputError(f"threshold must be in [0, 1], got {threshold}")
    case_ids = check_cases(store, case_ids)
    if not case_ids:
        raise NoisysegInputError("no cases to evaluate")
    truths_arrays = []
    for case_id in case_ids:
        try:
            truths_arrays.append(store.labels(case_id, name=label_set))
        except (KeyError, FileNotFoundError, LookupError):
            raise NoisysegInputError(f"label set {label_set!r} is missing", case=case_id) from None

    precomputed = probabilities
    if precomputed is not None:
        missing = [c for c in case_ids if c not in precomputed]
        if missing:
            raise ValueError(f"no precomputed probabilities for cases {missing}")
    probabilities: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    spacings: list[tuple[float, ...]] = []
    per_case: list[dict[str, Any]] = []
    metric_kwargs: dict[str, Any] = {
        "threshold": threshold,
        "candidate_threshold": candidate_threshold,
    }
    if size_bins is not None:
        metric_kwargs["size_bins"] = list(size_bins)
    for index, (case_id, truth_array) in enumerate(zip(case_ids, truths_arrays, strict=True)):
        start = time.perf_counter()
        if precomputed is not None:
            probability = np.asarray(precomputed[case_id], dtype=np.float32)
        else:
            probability = predict_volume(
                model,
                store.image(case_id),
                roi_size=roi_size,
                overlap=overlap,
                sw_batch_size=sw_batch_size,
                mode=mode,
                device=device,
                amp=amp,
                stats=case_normalization_stats(store, case_id),
            )
        truth = np.asarray(truth_array[...]).astype(np.uint8, copy=False)
        spacing = tuple(float(s) for s in store.spacing(case_id))
        seconds = time.perf_counter() - start
        case_metrics = lesion_metrics([probability], [truth], spacings=[spacing], **metric_kwargs)
        per_case.append(
            {
                "case_id": case_id,
                "dice": _scalar(case_metrics.get("dice")),
                "sensitivity": _scalar(case_metrics.get("sensitivity")),
                "max_sensitivity": _scalar(case_metrics.get("max_sensitivity")),
                "false_positives": _scalar(case_metrics.get("fp_per_case")),
                "seconds": seconds,
            }
        )
        probabilities.append(probability)
        truths.append(truth)
        spacings.append(spacing)
        if progress is not None:
            progress(case_id, index + 1, len(case_ids))
    metrics = dict(lesion_metrics(probabilities, truths, spacings=spacings, **metric_kwargs))
    metrics["num_cases"] = len(case_ids)
    kept = dict(zip(case_ids, probabilities, strict=True)) if keep_probabilities else None
    return EvaluationResult(metrics=metrics, per_case=per_case, probabilities=kept)


# ----------------------------------------------------------------------------------------------
# Prediction over many cases (in-process or Ray)


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
        return {
            "roi_size": self.roi_size,
            "overlap": self.overlap,
            "sw_batch_size": self.sw_batch_size,
            "mode": self.mode,
            "device": self.device,
            "amp": self.amp,
        }


def _open_store(url: str, mode: str = "r"):
    from noisyseg.storage.store import VolumeStore

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
