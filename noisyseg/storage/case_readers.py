"""Reading one source case: NIfTI (multi-class label -> ``truth`` by the foreground rule,
reorientation to RAS, optional resampling) or a 2D image + mask, validated, as
:meth:`~noisyseg.storage.store.VolumeStore.write_case` keyword arguments.

Labels. A NIfTI label may be multi-class (MSD/nnU-Net ``labels``, BraTS 1/2/3(4)). The binary
``truth`` lesion mask is ``isin(label, foreground)``; ``foreground`` comes from ``--foreground``
(:func:`parse_foreground`: values ``1,2,3`` or names from dataset.json, nnU-Net region names
included) and defaults to every non-zero value except one named ``ignore``. The source map itself
is kept, voxel for voxel, as the label map :data:`SOURCE_LABELS` (uint8/uint16, class names in its
OME ``image-label`` properties). When the dataset lists its labels, a value it does not list is an
error of that case. 2D masks must already be binary, {0, 1} or {0, 255}.

Axis order: NIfTI arrays are ``(i, j, k)``; after reorientation to RAS the store keeps
``(z, y, x)`` = ``(k, j, i)`` (``transpose(2, 1, 0)``, channels first), the spacing reversed
likewise, and the affine of the stored grid (store voxel ``[z, y, x]`` is at world
``affine @ [x, y, z, 1]``); the case attributes also hold ``geometry`` (original and stored
grids, :class:`~noisyseg.storage.geometry.Geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import geometry as G
from noisyseg.storage import validate as V
from noisyseg.storage.layout import TRUTH
from noisyseg.storage.layouts import CaseSpec, DatasetInfo

#: Name of the label map that keeps the source's multi-class labels.
SOURCE_LABELS = "source-multiclass"


@dataclass(frozen=True)
class LabelRule:
    """How a case's source label becomes ``truth``: ``foreground`` values (None: every non-zero
    value except ``ignore``), the values the dataset lists (empty: any), and their names."""

    foreground: tuple[int, ...] | None
    names: dict[int, str]
    listed_in: str  # where ``names`` come from, for messages ("dataset.json", "BraTS")

    def truth(self, label: np.ndarray, *, case: str, path: Path) -> np.ndarray:
        """Binary ``(*S)`` uint8 lesion mask of an integer label map; checks listed values."""
        values = present_values(label)
        if self.names:
            unlisted = [int(v) for v in values if int(v) not in self.names]
            if unlisted:
                listed = ", ".join(f"{v} {n}" for v, n in sorted(self.names.items()))
                raise NoisysegInputError(
                    f"label values {', '.join(map(str, unlisted[:8]))} not listed in "
                    f"{self.listed_in} labels ({listed})",
                    case=case,
                    path=str(path),
                )
        if self.foreground is not None:
            return np.isin(label, self.foreground).astype(np.uint8)
        ignore = [v for v, n in self.names.items() if n.lower() == "ignore"]
        return ((label != 0) & ~np.isin(label, ignore)).astype(np.uint8)


@dataclass(frozen=True)
class NiftiOptions:
    """Per-case NIfTI reading options: the label rule, an optional target spacing (mm,
    x,y,z after reorientation to RAS) and the image interpolation used to resample to it
    (:data:`~noisyseg.storage.geometry.IMAGE_INTERPOLATIONS`; labels: nearest)."""

    rule: LabelRule
    target_spacing: tuple[float, float, float] | None = None
    image_interpolation: str = G.DEFAULT_IMAGE_INTERPOLATION


# --------------------------------------------------------------------------------------------
# --foreground
# --------------------------------------------------------------------------------------------


def parse_foreground(text: str | Sequence[Any] | None, info: DatasetInfo) -> tuple[int, ...] | None:
    """``--foreground`` -> sorted label values, or None (every non-zero label).

    Items are label values (``1,2,3``) or names the dataset gives (label names, nnU-Net region
    names; case-insensitive), comma separated.

    Raises:
        NoisysegInputError: an unknown name, a value the dataset does not list, background (0),
            or nothing at all.
    """
    if text is None:
        return None
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [i for i in items if str(i) != ""]
    by_name: dict[str, tuple[int, ...]] = {n.lower(): (v,) for v, n in info.labels.items()}
    by_name.update({n.lower(): vals for n, vals in info.regions.items()})
    where = info.path
    values: set[int] = set()
    for item in items:
        key = str(item).strip()
        if key.lstrip("-").isdigit():
            v = int(key)
            if info.labels and v not in info.labels:
                raise NoisysegInputError(
                    f"--foreground: label value {v} is not listed ({_listed(info)})", path=where
                )
            values.add(v)
        elif key.lower() in by_name:
            values.update(by_name[key.lower()])
        else:
            raise NoisysegInputError(
                f"--foreground: unknown label name {key!r} (known: {_listed(info)})", path=where
            )
    if not values or 0 in values:
        raise NoisysegInputError(
            f"--foreground must name at least one non-background label, got {text!r}", path=where
        )
    return tuple(sorted(values))


def _listed(info: DatasetInfo) -> str:
    names = [f"{v} {n!r}" for v, n in sorted(info.labels.items())]
    names += [f"{n!r} = {list(v)}" for n, v in info.regions.items()]
    return ", ".join(names) if names else "none listed; use label values"


# --------------------------------------------------------------------------------------------
# reading one NIfTI case
# --------------------------------------------------------------------------------------------


def _check_file(path: Path, case: str) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        raise NoisysegInputError("file missing or unreadable", case=case, path=str(path)) from None
    if size == 0:
        raise NoisysegInputError("empty file (0 bytes)", case=case, path=str(path))


def _load_nifti(path: Path, case: str) -> tuple[np.ndarray, G.Grid]:
    """Read a NIfTI file fully: data in nibabel ``(i, j, k[, c])`` order and its grid."""
    _check_file(path, case)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for a damaged file
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise NoisysegInputError(
            f"truncated or unreadable NIfTI ({type(e).__name__}: {msg})", case=case, path=str(path)
        ) from None
    if data.ndim == 2:
        data, zooms = data[:, :, None], (*zooms[:2], 1.0)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise NoisysegInputError(
            f"expected a 3D volume (or 4D channels), got shape {data.shape}",
            case=case,
            path=str(path),
        )
    return data, G.make_grid(data.shape[:3], affine, zooms[:3])


def _read_channels(spec: CaseSpec) -> tuple[list[np.ndarray], G.Grid]:
    """Every channel of the case in NIfTI order on one grid (shapes, spacings, affines equal)."""
    cid = spec.case_id
    channels: list[np.ndarray] = []
    ref: G.Grid | None = None
    for path in spec.images:
        data, grid = _load_nifti(path, cid)
        if data.ndim == 4 and len(spec.images) > 1:
            raise NoisysegInputError(
                f"expected a 3D channel file, got shape {data.shape}", case=cid, path=str(path)
            )
        vols = [data[..., c] for c in range(data.shape[3])] if data.ndim == 4 else [data]
        if ref is None:
            ref = grid
        else:
            what = f"channel {len(channels)}"
            G.check_same_grid(ref, grid, what=what, case=cid, path=str(path))
            V.check_spacing_match(ref.spacing, grid.spacing, case=cid, path=str(path))
        channels.extend(vols)
    assert ref is not None
    return channels, ref


def _read_label(spec: CaseSpec, ref: G.Grid) -> np.ndarray:
    """The case's label in NIfTI order, on the image grid; validated as a label map."""
    assert spec.label is not None
    cid, path = spec.case_id, spec.label
    data, grid = _load_nifti(path, cid)
    if data.ndim != 3:
        raise NoisysegInputError(
            f"label must be 3D, got shape {data.shape}", case=cid, path=str(path)
        )
    if grid.shape != ref.shape:
        raise NoisysegInputError(
            f"label shape {grid.shape} does not match image shape {ref.shape}",
            case=cid,
            path=str(path),
        )
    V.check_spacing_match(ref.spacing, grid.spacing, case=cid, path=str(path))
    G.check_same_grid(ref, grid, what="label", case=cid, path=str(path))
    return V.check_label_map(data, case=cid, path=str(path), name="label")


def load_nifti_case(spec: CaseSpec, options: NiftiOptions) -> dict[str, Any]:
    """Read, validate, reorient (and resample) one NIfTI case; returns write_case kwargs.

    Raises NoisysegInputError naming the case, the file and the rule.
    """
    cid = spec.case_id
    channels, original = _read_channels(spec)
    label = _read_label(spec, original) if spec.label is not None else None
    ornt = G.canonical_transform(original.affine)
    image = np.stack(channels, axis=-1)  # (i, j, k, c)
    image, stored = G.reorient(image, original, ornt)
    if label is not None:
        label, _ = G.reorient(label, original, ornt)
    interpolation = None
    if options.target_spacing is not None:
        target = G.resampled_grid(stored, options.target_spacing)
        interpolation = options.image_interpolation
        order = G.interpolation_order(interpolation)
        image = G.resample(image, stored, target, order=order, channels_last=True)
        if label is not None:
            label = G.resample(label, stored, target, order=0)
        stored = target
    image = V.check_image(
        image.transpose(3, 2, 1, 0),
        n_channels=None,
        spatial_dims=3,
        case=cid,
        path=str(spec.images[0]),
    )
    spacing = V.check_spacing(stored.spacing[::-1], 3, case=cid, path=str(spec.images[0]))
    geometry = G.Geometry(original, stored, interpolation)
    out: dict[str, Any] = {
        "image": image,
        "labels": {},
        "spacing": spacing,
        "affine": stored.affine,
        "split": spec.split,
        "source": str(spec.images[0]),
        "extra": {
            "geometry": geometry.to_json(),
            "source_files": [str(p) for p in spec.images],
            "source_label": str(spec.label) if spec.label is not None else None,
        },
    }
    if label is not None:
        zyx = label.transpose(2, 1, 0)
        truth = options.rule.truth(zyx, case=cid, path=spec.label)  # type: ignore[arg-type]
        out["labels"] = {TRUTH: truth}
        out["label_maps"] = {SOURCE_LABELS: (zyx, _class_names(zyx, options.rule))}
    return out


def present_values(label: np.ndarray) -> np.ndarray:
    """Sorted values present in a uint8/uint16 label map (a histogram: faster than a sort)."""
    return np.flatnonzero(np.bincount(label.ravel(), minlength=1))


def _class_names(label: np.ndarray, rule: LabelRule) -> dict[int, str]:
    return {int(v): rule.names.get(int(v), f"label {int(v)}") for v in present_values(label)}


# --------------------------------------------------------------------------------------------
# reading one 2D case
# --------------------------------------------------------------------------------------------


def _open_pil(path: Path, case: str):
    from PIL import Image  # Pillow is only needed for 2D datasets

    _check_file(path, case)
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a damaged file
        raise NoisysegInputError(
            f"truncated or unreadable image ({type(e).__name__}: {str(e)[:120]})",
            case=case,
            path=str(path),
        ) from None
    return im


GREY_MODES = ("L", "I", "I;16", "I;16B", "F", "1")


def is_grey_image(path: Path, case: str) -> bool:
    """True when the 2D image at ``path`` is single-channel (stored as 1 channel, else RGB)."""
    return _open_pil(path, case).mode in GREY_MODES


def load_2d_case(spec: CaseSpec, options: Any = None) -> dict[str, Any]:
    """Read and validate one 2D image + mask; returns write_case keyword arguments."""
    cid = spec.case_id
    im = _open_pil(spec.images[0], cid)
    if im.mode in GREY_MODES:
        image = np.asarray(im)[None].astype(np.float32)
    else:
        image = np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(np.float32)
    assert spec.label is not None
    mk = _open_pil(spec.label, cid)
    mask = np.asarray(mk)
    if mask.ndim == 3:
        if not all(
            np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, min(3, mask.shape[2]))
        ):
            raise NoisysegInputError(
                "mask is not single-channel (RGB channels differ)", case=cid, path=str(spec.label)
            )
        mask = mask[..., 0]
    values = set(np.unique(mask).tolist())
    if values <= {0, 255} or (mk.mode == "1" and values <= {False, True}):
        mask = (mask != 0).astype(np.uint8)
    elif not values <= {0, 1}:
        shown = ", ".join(str(v) for v in sorted(values)[:8])
        raise NoisysegInputError(
            f"mask is not binary (values {shown}{', ...' if len(values) > 8 else ''}; "
            f"expected {{0, 1}} or {{0, 255}})",
            case=cid,
            path=str(spec.label),
        )
    label = V.check_label(mask, shape=image.shape[1:], case=cid, path=str(spec.label), name="mask")
    image = V.check_image(
        image, n_channels=None, spatial_dims=2, case=cid, path=str(spec.images[0])
    )
    return {
        "image": image,
        "labels": {TRUTH: label},
        "spacing": (1.0, 1.0),
        "affine": None,
        "split": spec.split,
        "source": str(spec.images[0]),
    }
