"""Sliding-window prediction of one image: the training normalisation, then MONAI's
:func:`~monai.inferers.sliding_window_inference` (Gaussian blending of logits, then a sigmoid).

:func:`predict_volume` maps one image ``(C, *S)`` to a lesion probability ``(*S)`` float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.models import AmpName, autocast
from noisyseg.storage.normalise import case_stats, subsample_stats

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

BlendName = Literal["gaussian", "constant"]


def normalization_stats(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of an image not in a store, by the patch loader's rule
    (:func:`noisyseg.storage.normalise.subsample_stats`, std below 1e-8 replaced by 1)."""
    mean, std = subsample_stats(image)
    return mean, np.where(std > 1e-8, std, 1.0).astype(np.float32)


def case_normalization_stats(store: Any, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of a stored case exactly as training normalises it
    (:func:`noisyseg.storage.normalise.case_stats`: recorded statistics, else a subsample)."""
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


__all__ = [
    "BlendName",
    "case_normalization_stats",
    "normalization_stats",
    "normalize_image",
    "predict_volume",
]
