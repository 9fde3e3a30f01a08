"""Cases in and probability maps out: case checks against a store and a network, maps written
into the store or as NIfTI, and a case's NIfTI affine.

Probability maps in the store follow the image's OME-Zarr conventions: a multiscale group
``<case>/predictions/<name>`` with one float32 array ``"0"`` of shape ``(*S)`` (values in ``[0, 1]``),
axes and ``scale`` (voxel spacing) as for the labels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.validate import check_case_id

if TYPE_CHECKING:  # pragma: no cover
    from noisyseg.models import UNetSpec


def check_cases(store: Any, case_ids: Sequence[str], *, store_path: str | None = None) -> list[str]:
    """Validate that every case id is in the store (no duplicates); returns them as a list."""
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


__all__ = [
    "case_affine",
    "check_cases",
    "check_channels",
    "read_prediction",
    "write_nifti",
    "write_prediction",
]
