"""Ingest a folder of scans into a :class:`~noisyseg.storage.store.VolumeStore`.

Layouts (nnU-Net v2 / MSD, BraTS, 2D images + masks) are found by :mod:`.layouts`; geometry
(reorientation to RAS, optional resampling) is :mod:`.geometry`; splits and clean lists are
:mod:`.splits`. This module reads one case (:func:`load_nifti_case`, :func:`load_2d_case`) and
runs the cases in parallel (:func:`ingest_folder`).

Labels. A NIfTI label may be multi-class (MSD/nnU-Net ``labels``, BraTS 1/2/3(4)). The binary
``truth`` lesion mask is ``isin(label, foreground)``; ``foreground`` comes from ``--foreground``
(values ``1,2,3`` or names from dataset.json, nnU-Net region names included) and defaults to
every non-zero value except one named ``ignore``. The source map itself is kept, voxel for
voxel, as the label map :data:`SOURCE_LABELS` (uint8/uint16, class names in its OME
``image-label`` properties). When the dataset lists its labels, a value it does not list is an
error of that case. 2D masks must already be binary, {0, 1} or {0, 255}.

Axis order: NIfTI arrays are ``(i, j, k)``; after reorientation to RAS the store keeps
``(z, y, x)`` = ``(k, j, i)`` (``transpose(2, 1, 0)``, channels first), spacing reversed likewise,
and the affine of the stored grid: store voxel ``[z, y, x]`` is at world ``affine @ [x, y, z, 1]``.
The case attributes also hold ``geometry`` (original and stored grids, see
:class:`~noisyseg.storage.geometry.Geometry`) so predictions can go back to the input space.

Every case is validated on its own; a bad case gives one error line (case, file, rule) and the
other cases are still ingested. Cases already in the store are skipped, so a re-run after an
interruption finishes the job (see the atomicity notes in :mod:`noisyseg.storage.store`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import nibabel as nib
import numpy as np
from dask.callbacks import Callback

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import geometry as G
from noisyseg.storage import splits as S
from noisyseg.storage import validate as V
from noisyseg.storage.corrupt import SCHEDULERS, run_tasks
from noisyseg.storage.layouts import (
    LAYOUT_2D,
    CaseSpec,
    DatasetInfo,
    Layout,
    discover,
)
from noisyseg.storage.store import TRUTH, VolumeStore

__all__ = [
    "CaseFailure",
    "CaseSpec",
    "IngestReport",
    "discover",
    "ingest_folder",
    "load_2d_case",
    "load_nifti_case",
    "parse_foreground",
    "progress_bar",
]

#: Name of the label map that keeps the source's multi-class labels.
SOURCE_LABELS = "source-multiclass"
#: Compact the index every this many written cases (journal files -> Parquet).
COMPACT_EVERY = 500
#: Test hook: seconds to sleep after each written case, so a test can kill an ingest midway.
SLOW_ENV = "NOISYSEG_TEST_SLOW_INGEST"
#: Default share of labelled cases held out for validation.
DEFAULT_VAL_FRACTION = 0.2
#: Default share held out for test when the source has no labelled test set of its own.
DEFAULT_TEST_FRACTION = 0.1


@dataclass
class CaseFailure:
    """One bad case: its id, the offending file (when known) and the rule broken."""

    case_id: str
    path: str | None
    rule: str

    def line(self) -> str:
        return str(NoisysegInputError(self.rule, case=self.case_id, path=self.path))


@dataclass
class IngestReport:
    """Outcome of :func:`ingest_folder`."""

    store_url: str
    layout: str  # "nnunet", "brats" or "2d"
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the store
    failed: list[CaseFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)  # split planned per case
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (
            f"ingested {len(self.written)} case(s), skipped {len(self.skipped)} already in store, "
            f"{len(self.failed)} failed -> {self.store_url}"
        )


@dataclass(frozen=True)
class LabelRule:
    """How a case's source label becomes ``truth``: ``foreground`` values (None: every non-zero
    value except ``ignore``), the values the dataset lists (empty: any), and their names."""

    foreground: tuple[int, ...] | None
    names: dict[int, str]
    listed_in: str  # where ``names`` come from, for messages ("dataset.json", "BraTS")

    def truth(self, label: np.ndarray, *, case: str, path: Path) -> np.ndarray:
        """Binary ``(*S)`` uint8 lesion mask of an integer label map; checks listed values."""
        values = np.unique(label)
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
    """Per-case NIfTI reading options: the label rule and an optional target spacing (mm,
    x,y,z after reorientation to RAS)."""

    rule: LabelRule
    target_spacing: tuple[float, float, float] | None = None


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
    if options.target_spacing is not None:
        target = G.resampled_grid(stored, options.target_spacing)
        image = G.resample(image, stored, target, order=1, channels_last=True)
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
    geometry = G.Geometry(original, stored)
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


def _class_names(label: np.ndarray, rule: LabelRule) -> dict[int, str]:
    return {int(v): rule.names.get(int(v), f"label {int(v)}") for v in np.unique(label)}


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


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


def progress_bar(verb: str, *, enabled: bool) -> Any:
    """A ``rich`` progress bar on stderr: ``<verb> <task description>``, bar, done/total, ETA.

    ``enabled=False`` gives a bar that prints nothing (``--no-progress``).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{verb}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


class _CaseDone(Callback):
    """Dask callback (local schedulers): calls ``fn(result)`` as each case task finishes."""

    def __init__(self, fn: Callable[[Any], None]) -> None:
        super().__init__()
        self.fn = fn

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith("ingest-case-"):
            self.fn(result)


# --------------------------------------------------------------------------------------------
# the ingest
# --------------------------------------------------------------------------------------------


def ingest_one(store: VolumeStore, spec: CaseSpec, options: Any, clean: bool) -> Any:
    """Task body: read one case and write it. Returns the case id, or a CaseFailure."""
    loader = load_2d_case if store.spatial_dims == 2 else load_nifti_case
    try:
        kwargs = loader(spec, options)
        store.write_case(spec.case_id, clean=clean, **kwargs)
    except NoisysegInputError as e:
        return CaseFailure(spec.case_id, e.path, e.rule)
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)
    if slow > 0:
        time.sleep(slow)
    return spec.case_id


def _channel_names(layout: Layout) -> list[str]:
    """Channel names of the store to create: dataset.json / BraTS names, else counted from the
    first readable case (headers only)."""
    if layout.info.channel_names:
        return list(layout.info.channel_names)
    for spec in layout.specs:
        if spec.problem is not None or not spec.images:
            continue
        try:
            if layout.kind == LAYOUT_2D:
                n = 1 if _open_pil(spec.images[0], spec.case_id).mode in GREY_MODES else 3
                return ["gray"] if n == 1 else ["R", "G", "B"]
            if len(spec.images) > 1:
                return [f"ch{i}" for i in range(len(spec.images))]
            shape = nib.load(str(spec.images[0])).shape
            n = shape[3] if len(shape) == 4 else 1
            return [f"ch{i}" for i in range(n)]
        except Exception:  # noqa: BLE001 - an unreadable file is that case's error, reported later
            continue
    return ["ch0"]


def _label_rule(layout: Layout, foreground: str | Sequence[Any] | None) -> LabelRule:
    fg = parse_foreground(foreground, layout.info)
    where = "dataset.json" if layout.info.path else "BraTS"
    return LabelRule(fg, dict(layout.info.labels), where)


def _truth_params(src: str, layout: Layout, rule: LabelRule, target: Any) -> dict[str, Any]:
    return {
        "source": "ingest",
        "src": str(Path(src).resolve()),
        "layout": layout.kind,
        "foreground": list(rule.foreground) if rule.foreground is not None else "nonzero",
        "label_names": {str(v): n for v, n in sorted(rule.names.items())},
        "label_map": SOURCE_LABELS if layout.kind != LAYOUT_2D else None,
        "target_spacing": list(target) if target is not None else None,
    }


def _open_or_create(
    store_url: str,
    layout: Layout,
    params: dict[str, Any],
    *,
    overwrite: bool,
    storage_options: dict[str, Any] | None,
) -> VolumeStore:
    """Resume the store at ``store_url`` (same geometry and label parameters) or create it."""
    if not overwrite:
        try:
            store = VolumeStore.open(store_url, "r+", storage_options)
        except NoisysegInputError:
            store = None
        if store is not None:
            if store.spatial_dims != layout.spatial_dims:
                raise NoisysegInputError(
                    f"store holds {store.spatial_dims}D cases, source is {layout.spatial_dims}D",
                    path=str(store_url),
                )
            old = store.label_set_info(TRUTH).get("params", {})
            for key in ("foreground", "target_spacing"):
                if key in old and old[key] != params[key]:
                    raise NoisysegInputError(
                        f"store was ingested with {key} {old[key]}, now {params[key]} "
                        "(pass --overwrite to rebuild it)",
                        path=str(store_url),
                    )
            store.cleanup_staging()
            return store
    return VolumeStore.create(
        store_url,
        spatial_dims=layout.spatial_dims,
        channel_names=_channel_names(layout),
        overwrite=overwrite,
        storage_options=storage_options,
        truth_params=params,
    )


def _plan(
    layout: Layout,
    *,
    seed: int,
    val_fraction: float | None,
    test_fraction: float | None,
    splits_file: str | None,
    fold: int,
) -> dict[str, str]:
    """Split of every case: labelled train candidates by :func:`splits.plan_splits`; cases the
    layout placed in ``test`` (labelsTs) or ``unlabeled`` keep that."""
    labelled = [s.case_id for s in layout.specs if s.split == "train"]
    has_test = any(s.split == "test" for s in layout.specs)
    if test_fraction is None:
        test_fraction = 0.0 if has_test else DEFAULT_TEST_FRACTION
    plan = S.plan_splits(
        labelled,
        seed=seed,
        val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
        test_fraction=test_fraction,
        splits_file=splits_file,
        fold=fold,
    )
    return {s.case_id: plan.get(s.case_id, s.split) for s in layout.specs}


def ingest_folder(
    src: str | os.PathLike,
    store_url: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_error: Callable[[CaseFailure], None] | None = None,
    foreground: str | Sequence[Any] | None = None,
    target_spacing: Sequence[float] | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    splits_file: str | None = None,
    fold: int = 0,
    clean_cases: str | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
) -> IngestReport:
    """Ingest every case of ``src`` into the store at ``store_url`` (created when missing).

    Args:
        src: source folder (nnU-Net v2/MSD, BraTS, or 2D images + masks; :mod:`.layouts`).
        store_url: store location (path or fsspec URL). An existing store is resumed: cases
            already in it are skipped. ``overwrite`` replaces the whole store instead.
        foreground: label values/names forming the lesion mask (None: every non-zero label).
        target_spacing: resample to this spacing (mm, x,y,z after RAS reorientation).
        val_fraction, test_fraction, seed: split rule of :mod:`.splits` over the labelled
            training cases (defaults 0.2 and 0.1, test 0 when the source has labelsTs).
        splits_file, fold: take the splits from a file instead (nnU-Net splits_final.json).
        clean_cases: file listing the cases with clean (trusted) annotation.
        scheduler, num_workers: Dask scheduler (``threads``, ``processes``, ``synchronous``,
            ``ray``) and its worker count.
        progress: show a progress bar (stderr). on_error: called with each failure.

    Returns:
        IngestReport with written, skipped and failed cases.

    Raises:
        NoisysegInputError: problems of the whole command (missing/empty folder, unknown
            ``--foreground`` name, bad split or clean file, a store of another kind); per-case
            problems go into the report instead.
    """
    t0 = time.perf_counter()
    if scheduler not in SCHEDULERS:
        raise NoisysegInputError(
            f"unknown scheduler {scheduler!r} (choose from {', '.join(SCHEDULERS)})"
        )
    layout = discover(src)
    rule = _label_rule(layout, foreground)
    target = tuple(float(t) for t in target_spacing) if target_spacing is not None else None
    if target is not None:
        if layout.kind == LAYOUT_2D:
            raise NoisysegInputError("--target-spacing applies to 3D NIfTI datasets only")
        G.resampled_grid(G.make_grid((1, 1, 1), np.eye(4), (1, 1, 1)), target)  # validates
    plan = _plan(
        layout,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        splits_file=splits_file,
        fold=fold,
    )
    clean_ids: set[str] = set()
    if clean_cases is not None:
        clean_ids = set(S.read_case_list(clean_cases))
        S.check_known(clean_ids, plan, what="clean-case list", path=str(clean_cases))
    report = IngestReport(str(store_url), layout.kind, notes=list(layout.notes), splits=plan)

    def fail(failure: CaseFailure) -> None:
        report.failed.append(failure)
        if on_error is not None:
            on_error(failure)

    good = []
    for spec in layout.specs:
        if spec.problem is not None:
            fail(CaseFailure(spec.case_id, spec.problem.path, spec.problem.rule))
        else:
            spec.split = plan[spec.case_id]
            good.append(spec)
    if not good:
        report.seconds = time.perf_counter() - t0
        return report
    params = _truth_params(str(src), layout, rule, target)
    store = _open_or_create(
        store_url, layout, params, overwrite=overwrite, storage_options=storage_options
    )
    done = set(store.case_ids())
    pending = [s for s in good if s.case_id not in done]
    report.skipped = [s.case_id for s in good if s.case_id in done]
    options = NiftiOptions(rule, target) if layout.kind != LAYOUT_2D else None
    _run(store, pending, options, clean_ids, report, fail, scheduler, num_workers, progress, src)
    store.compact()
    present = set(store.case_ids())
    if clean_ids & present:
        store.set_clean(sorted(clean_ids & present), True)
    store.cleanup_staging()
    report.seconds = time.perf_counter() - t0
    return report


def _run(
    store: VolumeStore,
    pending: list[CaseSpec],
    options: Any,
    clean_ids: set[str],
    report: IngestReport,
    fail: Callable[[CaseFailure], None],
    scheduler: str,
    num_workers: int | None,
    progress: bool,
    src: Any,
) -> None:
    """Ingest ``pending`` cases as Dask tasks, :data:`COMPACT_EVERY` at a time (the index is
    compacted after each batch), reporting each result as its task finishes."""
    bar = progress_bar("ingest", enabled=progress)
    with bar:
        task = bar.add_task(Path(src).name, total=len(pending))

        def on_result(result: Any) -> None:
            if isinstance(result, CaseFailure):
                fail(result)
            else:
                report.written.append(result)
            bar.advance(task)

        for start in range(0, len(pending), COMPACT_EVERY):
            batch = pending[start : start + COMPACT_EVERY]
            tasks = [
                dask.delayed(ingest_one, pure=False)(
                    store,
                    s,
                    options,
                    s.case_id in clean_ids,
                    dask_key_name=f"ingest-case-{s.case_id}",
                )
                for s in batch
            ]
            local = scheduler != "ray"
            with _CaseDone(on_result) if local else contextlib.nullcontext():
                results = run_tasks(tasks, scheduler=scheduler, num_workers=num_workers)
            if not local:
                for r in results:
                    on_result(r)
            store.compact()
