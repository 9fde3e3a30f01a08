"""Input validation rules shared by the volume store, ingest and the storage CLI verbs.

Every check raises :class:`~noisyseg.errors.NoisysegInputError` whose message is one line naming
the case, the file (when known) and the rule broken (DESIGN.md, "Bad input"). The functions are
pure NumPy: no Zarr, no file I/O. ``check_rate`` is the core's (:func:`noisyseg.noise.check_rate`),
re-exported here for the storage verbs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.noise.params import check_rate as check_rate

#: Case ids and label-set names: start with a letter or digit, then letters, digits, ``._-``.
#: No ``/`` (it would nest groups), no ``..`` (path traversal), no spaces or shell characters.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LEN = 128
SPLITS = ("train", "val", "test")
#: Split of cases without any annotation (e.g. nnU-Net ``imagesTs``): no ``truth`` label set.
UNLABELED = "unlabeled"
#: Relative tolerance when comparing voxel spacings of an image and its label (header zooms are
#: float32 in NIfTI, so exact equality is too strict).
SPACING_RTOL = 1e-4


def is_safe_name(name: object) -> bool:
    """True for a safe case id / label-set name (see :func:`check_case_id`)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME_LEN
        and SAFE_NAME_RE.match(name) is not None
        and ".." not in name
    )


def check_case_id(case_id: object, *, path: str | None = None) -> str:
    """Return ``case_id`` if it is safe to use as a group name, else raise.

    Safe: matches ``^[A-Za-z0-9][A-Za-z0-9._-]*$``, at most 128 characters, no ``..``.
    """
    if not is_safe_name(case_id):
        raise NoisysegInputError(
            f"unsafe case id {case_id!r} (allowed: letters, digits, '.', '_', '-', "
            f"starting with a letter or digit, no '..' or '/')",
            case=str(case_id),
            path=path,
        )
    return str(case_id)


def check_label_set_name(name: object) -> str:
    """Return ``name`` if it is a safe label-set name (same rule as case ids), else raise."""
    if not is_safe_name(name):
        raise NoisysegInputError(
            f"unsafe label set name {name!r} (allowed: letters, digits, '.', '_', '-', "
            f"starting with a letter or digit, no '..' or '/')"
        )
    return str(name)


def check_split(split: object, *, case: str | None = None) -> str:
    """Return ``split`` if it is one of ``train``, ``val``, ``test``, ``unlabeled``, else raise."""
    if split not in (*SPLITS, UNLABELED):
        raise NoisysegInputError(
            f"split must be one of {', '.join((*SPLITS, UNLABELED))}, got {split!r}", case=case
        )
    return str(split)


def check_spacing(
    spacing: Sequence[float], spatial_dims: int, *, case: str | None = None, path: str | None = None
) -> tuple[float, ...]:
    """Return the voxel spacing (mm, store axis order) as a tuple of floats, or raise.

    Rules: one value per spatial axis, each finite and > 0.
    """
    values = tuple(float(s) for s in spacing)
    if len(values) != spatial_dims:
        raise NoisysegInputError(
            f"spacing has {len(values)} values, expected {spatial_dims}", case=case, path=path
        )
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise NoisysegInputError(
            f"spacing must be finite and positive, got {values}", case=case, path=path
        )
    return values


def check_spacing_match(
    image_spacing: Sequence[float],
    label_spacing: Sequence[float],
    *,
    case: str | None = None,
    path: str | None = None,
) -> None:
    """Raise when the image and label voxel spacings differ (relative tolerance 1e-4)."""
    a = np.asarray(image_spacing, dtype=np.float64)
    b = np.asarray(label_spacing, dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=SPACING_RTOL, atol=0.0):
        raise NoisysegInputError(
            f"spacing mismatch: image {tuple(round(float(v), 6) for v in a)} mm vs "
            f"label {tuple(round(float(v), 6) for v in b)} mm",
            case=case,
            path=path,
        )


def check_image(
    image: np.ndarray,
    *,
    n_channels: int | None,
    spatial_dims: int,
    case: str | None = None,
    path: str | None = None,
) -> np.ndarray:
    """Validate an image ``(C, *S)`` and return it as float32.

    Rules: ``1 + spatial_dims`` dimensions, ``C == n_channels`` when given, no empty axis,
    real numeric dtype, every voxel finite (no NaN/Inf), values representable in float32.
    """
    arr = np.asarray(image)
    if arr.ndim != 1 + spatial_dims:
        raise NoisysegInputError(
            f"image must have shape (C, {', '.join('ZYX'[-spatial_dims:])}) "
            f"({1 + spatial_dims} dims), got shape {arr.shape}",
            case=case,
            path=path,
        )
    if arr.size == 0 or 0 in arr.shape:
        raise NoisysegInputError(f"image is empty (shape {arr.shape})", case=case, path=path)
    if n_channels is not None and arr.shape[0] != n_channels:
        raise NoisysegInputError(
            f"image has {arr.shape[0]} channels, the store has {n_channels}", case=case, path=path
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise NoisysegInputError(
            f"image dtype {arr.dtype} is not real numeric", case=case, path=path
        )
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum() - n_nan)
            raise NoisysegInputError(
                f"image has non-finite voxels (NaN: {n_nan}, Inf: {n_inf})", case=case, path=path
            )
    out = arr.astype(np.float32, copy=False)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(out).all():
        raise NoisysegInputError("image values overflow float32", case=case, path=path)
    return out


def _integer_voxels(
    label: np.ndarray,
    *,
    shape: Sequence[int] | None,
    case: str | None,
    path: str | None,
    name: str,
) -> np.ndarray:
    """The checks every label array passes: its shape, a numeric dtype, finite integer values.

    Returns the array (a boolean one as uint8, which passes any value check after it).
    """
    arr = np.asarray(label)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise NoisysegInputError(
            f"{name} shape {tuple(arr.shape)} does not match image shape {tuple(shape)}",
            case=case,
            path=path,
        )
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise NoisysegInputError(f"{name} dtype {arr.dtype} is not numeric", case=case, path=path)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise NoisysegInputError(f"{name} has NaN/Inf voxels", case=case, path=path)
        if not np.array_equal(arr, np.round(arr)):
            raise NoisysegInputError(
                f"{name} is not integer-valued (non-integer labels)", case=case, path=path
            )
    return arr


def check_label(
    label: np.ndarray,
    *,
    shape: Sequence[int] | None = None,
    case: str | None = None,
    path: str | None = None,
    name: str = "label",
) -> np.ndarray:
    """Validate a binary label ``(*S)`` and return it as uint8 with values in {0, 1}.

    Rules: shape equals the image's spatial shape (when given), values are integers (no
    fractional values, no NaN) and in {0, 1}.
    """
    arr = _integer_voxels(label, shape=shape, case=case, path=path, name=name)
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 1}:
        shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in values[:8])
        more = ", ..." if values.size > 8 else ""
        raise NoisysegInputError(
            f"{name} is not binary (values {shown}{more})", case=case, path=path
        )
    return arr.astype(np.uint8)


def check_label_map(
    label: np.ndarray,
    *,
    shape: Sequence[int] | None = None,
    case: str | None = None,
    path: str | None = None,
    name: str = "label map",
) -> np.ndarray:
    """Validate a multi-class label map ``(*S)`` and return it as uint8 (max < 256) or uint16.

    Rules: shape equals the image's spatial shape (when given), values are integers (no
    fractional values, no NaN) in ``[0, 65535]``.
    """
    arr = _integer_voxels(label, shape=shape, case=case, path=path, name=name)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > 65535:
        raise NoisysegInputError(
            f"{name} values must lie in [0, 65535], got [{lo:g}, {hi:g}]", case=case, path=path
        )
    return arr.astype(np.uint8 if hi < 256 else np.uint16)


def check_affine(affine: np.ndarray | None, *, case: str | None = None) -> np.ndarray | None:
    """Return the affine as a finite float64 ``(4, 4)`` array (or None), else raise."""
    if affine is None:
        return None
    arr = np.asarray(affine, dtype=np.float64)
    if arr.shape != (4, 4) or not np.isfinite(arr).all():
        raise NoisysegInputError(
            f"affine must be a finite 4x4 matrix, got shape {arr.shape}", case=case
        )
    return arr


def find_duplicates(case_ids: Iterable[str]) -> set[str]:
    """Return the ids that occur more than once."""
    seen: set[str] = set()
    dup: set[str] = set()
    for cid in case_ids:
        (dup if cid in seen else seen).add(cid)
    return dup
