"""Ingest a folder of scans into a :class:`~noisyseg.storage.store.VolumeStore`.

Two source layouts are recognised:

* **nnU-Net / Medical Segmentation Decathlon (3D NIfTI)**: ``dataset.json`` (optional),
  ``imagesTr/<case>_0000.nii.gz`` (+ ``_0001`` ... one file per channel, nnU-Net) or
  ``imagesTr/<case>.nii.gz`` (one 3D or 4D file, MSD), ``labelsTr/<case>.nii.gz``. ``imagesTs``
  is ingested as split ``test`` when ``labelsTs`` exists. Channel names come from
  ``dataset.json`` (``channel_names`` or ``modality``).
* **2D images with masks** (skin-lesion datasets): ``images/<case>.png|jpg|...`` with
  ``masks/`` (or ``labels/``) holding ``<case>.png``, ``<case>_segmentation.png`` (ISIC) or
  ``<case>_mask.png``; ISIC folder names (``*Input*`` / ``*GroundTruth*``) work too. RGB images
  become ``(3, H, W)``, grey ones ``(1, H, W)``; masks must already be binary, {0, 1} or
  {0, 255}. Pixel spacing is unknown in such images and recorded as 1.0.

Axis order: NIfTI arrays are indexed ``(i, j, k)`` = ``(x, y, z)`` in nibabel; the store keeps
``(z, y, x)``, so every volume is transposed (``data.transpose(2, 1, 0)``, channels first) and
the spacing is ``zooms[:3]`` reversed. The voxel order is kept (no reorientation); the NIfTI
affine is stored as is, so store voxel ``[z, y, x]`` maps to world ``affine @ [x, y, z, 1]``.
Image voxels are stored as float32 (exact for integer scans and float32 NIfTI).

Every case is validated on its own; a bad case gives one error line (case, file, rule) and the
other cases are still ingested. Cases already in the store are skipped, so a re-run after an
interruption finishes the job (see the atomicity notes in :mod:`noisyseg.storage.store`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V
from noisyseg.storage.store import TRUTH, VolumeStore

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES_2D = (".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")
MASK_STEM_SUFFIXES = ("_segmentation", "_Segmentation", "_mask", "_Mask", "_seg")
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
#: Compact the index every this many written cases (journal files -> Parquet).
COMPACT_EVERY = 500
#: Test hook: seconds to sleep after each written case, so a test can kill an ingest midway.
SLOW_ENV = "NOISYSEG_TEST_SLOW_INGEST"


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
    layout: str  # "nifti" or "2d"
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the store
    failed: list[CaseFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (
            f"ingested {len(self.written)} case(s), skipped {len(self.skipped)} already in store, "
            f"{len(self.failed)} failed -> {self.store_url}"
        )


@dataclass
class CaseSpec:
    """A case found in the source folder, before reading it."""

    case_id: str
    images: list[Path]  # one file per channel (nnU-Net), or one file (MSD / 2D)
    label: Path | None
    split: str = "train"
    problem: NoisysegInputError | None = None  # found while scanning (missing label, ...)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursive), hidden names (``.``, macOS ``._``) skipped."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                out.append(Path(root) / f)
    return out


def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    low = name.lower()
    for suf in suffixes:
        if low.endswith(suf):
            return name[: -len(suf)]
    return None


def _rel_id(path: Path, folder: Path, suffixes: tuple[str, ...]) -> str | None:
    """Case id of a file: its path relative to ``folder`` minus the suffix (a file in a
    sub-folder gives an id containing '/', which validation rejects)."""
    stem = _strip_suffix(path.name, suffixes)
    if stem is None:
        return None
    rel_parent = path.parent.relative_to(folder).as_posix()
    return stem if rel_parent == "." else f"{rel_parent}/{stem}"


def _flag_duplicates_and_ids(specs: list[CaseSpec]) -> list[CaseSpec]:
    """Mark unsafe ids (first: such an id is never used as a path) and duplicated ids (every
    copy refused: which one is right is unknowable)."""
    by_id: dict[str, list[CaseSpec]] = {}
    for s in specs:
        by_id.setdefault(s.case_id, []).append(s)
    out = []
    for cid, group in by_id.items():
        for s in group:
            try:
                V.check_case_id(cid, path=str(s.images[0]))
            except NoisysegInputError as e:
                s.problem = e
                continue
            if len(group) > 1:
                files = ", ".join(str(g.images[0]) for g in group)
                s.problem = NoisysegInputError(
                    f"duplicate case id ({len(group)} sources: {files})",
                    case=cid,
                    path=str(s.images[0]),
                )
        out.extend(group)
    return sorted(out, key=lambda s: (s.split != "train", s.case_id))


def _discover_nifti_split(
    src: Path, images_dir: str, labels_dir: str, split: str, n_channels: int | None
) -> list[CaseSpec]:
    img_root, lab_root = src / images_dir, src / labels_dir
    channel_files: dict[str, dict[int, Path]] = {}
    whole: list[tuple[str, Path]] = []
    for f in _visible_files(img_root):
        rid = _rel_id(f, img_root, NIFTI_SUFFIXES)
        if rid is None:
            continue
        m = CHANNEL_RE.match(rid)
        if m:
            channel_files.setdefault(m.group("case"), {})
            ch = int(m.group("ch"))
            if ch in channel_files[m.group("case")]:
                whole.append((m.group("case"), f))  # .nii and .nii.gz of the same channel
            else:
                channel_files[m.group("case")][ch] = f
        else:
            whole.append((rid, f))
    specs: list[CaseSpec] = []
    for cid, chans in channel_files.items():
        files = [chans[k] for k in sorted(chans)]
        spec = CaseSpec(cid, files, None, split)
        expected = n_channels if n_channels is not None else max(chans) + 1
        missing = [k for k in range(expected) if k not in chans]
        if missing:
            spec.problem = NoisysegInputError(
                f"missing channel file(s) {', '.join(f'_{k:04d}' for k in missing)}",
                case=cid,
                path=str(files[0]),
            )
        specs.append(spec)
    specs += [CaseSpec(cid, [f], None, split) for cid, f in whole]
    for spec in specs:
        candidates = [lab_root / f"{spec.case_id}{suf}" for suf in NIFTI_SUFFIXES]
        found = [c for c in candidates if c.exists()]
        if found:
            spec.label = found[0]
        elif spec.problem is None:
            spec.problem = NoisysegInputError(
                "missing label file", case=spec.case_id, path=str(candidates[0])
            )
    return specs


def _read_dataset_json(src: Path) -> dict:
    path = src / "dataset.json"
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NoisysegInputError(f"dataset.json is not valid JSON ({e})", path=str(path)) from None
    if not isinstance(doc, dict):
        raise NoisysegInputError("dataset.json is not a JSON object", path=str(path))
    return doc


def _channel_names_from(doc: dict) -> list[str] | None:
    names = doc.get("channel_names") or doc.get("modality")
    if isinstance(names, dict) and names:
        try:
            return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
        except (TypeError, ValueError):
            return None
    return None


def _find_2d_dirs(src: Path) -> tuple[Path, Path] | None:
    dirs = {d.name: d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")}
    img = next((dirs[n] for n in ("images", "imgs", "image") if n in dirs), None)
    msk = next((dirs[n] for n in ("masks", "labels", "mask", "segmentations") if n in dirs), None)
    if img is None:
        img = next((d for n, d in sorted(dirs.items()) if "input" in n.lower()), None)
    if msk is None:
        msk = next((d for n, d in sorted(dirs.items()) if "groundtruth" in n.lower()), None)
    if img is None:
        return None
    return img, (msk if msk is not None else src / "masks")


def _discover_2d(img_root: Path, msk_root: Path) -> list[CaseSpec]:
    exact: dict[str, Path] = {}
    stripped: dict[str, Path] = {}
    if msk_root.is_dir():
        for f in _visible_files(msk_root):
            rid = _rel_id(f, msk_root, MASK_SUFFIXES_2D)
            if rid is None:
                continue
            exact.setdefault(rid, f)
            for suf in MASK_STEM_SUFFIXES:
                if rid.endswith(suf):
                    stripped.setdefault(rid[: -len(suf)], f)
                    break
    # an exact name match wins over a suffix match (case "a_mask" with mask "a_mask.png")
    masks = {**stripped, **exact}
    specs = []
    for f in _visible_files(img_root):
        rid = _rel_id(f, img_root, IMAGE_SUFFIXES_2D)
        if rid is None:
            continue
        spec = CaseSpec(rid, [f], masks.get(rid))
        if spec.label is None:
            spec.problem = NoisysegInputError(
                "missing label file (mask)", case=rid, path=str(msk_root / f"{rid}.png")
            )
        specs.append(spec)
    return specs


def discover(src: str | os.PathLike) -> tuple[str, list[CaseSpec], list[str] | None, list[str]]:
    """Find the cases of a source folder.

    Returns:
        (layout "nifti" | "2d", case specs, channel names from dataset.json or None, notes).

    Raises:
        NoisysegInputError: the folder is missing or empty, or holds no recognisable case.
    """
    root = Path(src)
    if not root.is_dir():
        raise NoisysegInputError("source folder does not exist or is not a folder", path=str(root))
    if not _visible_files(root):
        raise NoisysegInputError("empty folder (no files to ingest)", path=str(root))
    notes: list[str] = []
    if (root / "imagesTr").is_dir() or (root / "dataset.json").exists():
        doc = _read_dataset_json(root)
        names = _channel_names_from(doc)
        n_ch = len(names) if names else None
        specs = _discover_nifti_split(root, "imagesTr", "labelsTr", "train", n_ch)
        if (root / "imagesTs").is_dir():
            if (root / "labelsTs").is_dir():
                specs += _discover_nifti_split(root, "imagesTs", "labelsTs", "test", n_ch)
            else:
                notes.append("imagesTs skipped: no labelsTs folder")
        layout = "nifti"
    else:
        dirs = _find_2d_dirs(root)
        if dirs is None:
            raise NoisysegInputError(
                "no recognisable dataset (expected imagesTr/ + labelsTr/ or images/ + masks/)",
                path=str(root),
            )
        specs = _discover_2d(*dirs)
        names = None
        layout = "2d"
    if not specs:
        raise NoisysegInputError("empty folder (no cases found)", path=str(root))
    return layout, _flag_duplicates_and_ids(specs), names, notes


# --------------------------------------------------------------------------------------------
# reading one case
# --------------------------------------------------------------------------------------------


def _check_file(path: Path, case: str) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        raise NoisysegInputError("file missing or unreadable", case=case, path=str(path)) from None
    if size == 0:
        raise NoisysegInputError("empty file (0 bytes)", case=case, path=str(path))


def _load_nifti(path: Path, case: str) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Read a NIfTI file fully. Returns (data in nibabel (x, y, z[, c]) order, zooms, affine)."""
    import nibabel as nib

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
    return data, zooms, affine


def _spatial(
    data: np.ndarray, zooms: tuple[float, ...], case: str, path: Path
) -> tuple[np.ndarray, tuple[float, ...]]:
    """(x, y, z) -> (z, y, x) volume and spacing; 4D with one trailing volume is squeezed."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = (*zooms[:2], 1.0)
    if data.ndim != 3:
        raise NoisysegInputError(
            f"expected a 3D volume, got shape {data.shape}", case=case, path=str(path)
        )
    return data.transpose(2, 1, 0), tuple(zooms[:3])[::-1]


def load_nifti_case(spec: CaseSpec) -> dict[str, Any]:
    """Read and validate one NIfTI case; returns write_case keyword arguments.

    Raises NoisysegInputError naming the case, the file and the rule.
    """
    cid = spec.case_id
    channels: list[np.ndarray] = []
    spacing: tuple[float, ...] | None = None
    affine = None
    for path in spec.images:
        data, zooms, aff = _load_nifti(path, cid)
        if data.ndim == 4 and data.shape[3] > 1 and len(spec.images) == 1:
            vols = [data[..., c] for c in range(data.shape[3])]  # MSD: (x, y, z, c)
            zooms = zooms[:3]
        else:
            vols = [data]
        for vol in vols:
            arr, sp = _spatial(vol, zooms, cid, path)
            if channels and arr.shape != channels[0].shape:
                raise NoisysegInputError(
                    f"channel shape {arr.shape} does not match channel 0 shape {channels[0].shape}",
                    case=cid,
                    path=str(path),
                )
            if spacing is not None:
                V.check_spacing_match(spacing, sp, case=cid, path=str(path))
            else:
                spacing, affine = sp, aff
            channels.append(arr)
    assert spacing is not None and spec.label is not None
    label_data, label_zooms, _ = _load_nifti(spec.label, cid)
    label, label_sp = _spatial(label_data, label_zooms, cid, spec.label)
    image = np.stack(channels)
    label = V.check_label(label, shape=image.shape[1:], case=cid, path=str(spec.label))
    V.check_spacing_match(spacing, label_sp, case=cid, path=str(spec.label))
    image = V.check_image(
        image, n_channels=None, spatial_dims=3, case=cid, path=str(spec.images[0])
    )
    V.check_spacing(spacing, 3, case=cid, path=str(spec.images[0]))
    return {
        "image": image,
        "labels": {TRUTH: label},
        "spacing": spacing,
        "affine": affine,
        "split": spec.split,
        "source": str(spec.images[0]),
    }


def _open_pil(path: Path, case: str):
    from PIL import Image

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


def load_2d_case(spec: CaseSpec) -> dict[str, Any]:
    """Read and validate one 2D image + mask; returns write_case keyword arguments."""
    cid = spec.case_id
    im = _open_pil(spec.images[0], cid)
    if im.mode in ("L", "I", "I;16", "I;16B", "F", "1"):
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
# the ingest loop
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


def ingest_folder(
    src: str | os.PathLike,
    store_url: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_error: Callable[[CaseFailure], None] | None = None,
) -> IngestReport:
    """Ingest every case of ``src`` into the store at ``store_url`` (created when missing).

    Args:
        src: source folder (nnU-Net/MSD NIfTI or 2D images + masks, see module docs).
        store_url: store location (path or fsspec URL). An existing store is resumed: cases
            already in it are skipped. ``overwrite`` replaces the whole store instead.
        progress: show a progress bar (stderr).
        on_error: called with each failure as it happens (the CLI prints its line).

    Returns:
        IngestReport with written, skipped and failed cases.

    Raises:
        NoisysegInputError: for problems of the whole command (missing/empty folder, a store of
            another dimensionality); per-case problems go into the report instead.
    """
    layout, specs, names, notes = discover(src)
    spatial_dims = 3 if layout == "nifti" else 2
    loader = load_nifti_case if layout == "nifti" else load_2d_case
    report = IngestReport(store_url=str(store_url), layout=layout, notes=list(notes))

    store: VolumeStore | None = None
    if not overwrite:
        try:
            store = VolumeStore.open(store_url, "r+", storage_options)
        except NoisysegInputError:
            store = None
    if store is not None:
        if store.spatial_dims != spatial_dims:
            raise NoisysegInputError(
                f"store holds {store.spatial_dims}D cases, source is {spatial_dims}D",
                path=str(store_url),
            )
        store.cleanup_staging()
    done = set(store.case_ids()) if store is not None else set()
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)

    def fail(failure: CaseFailure) -> None:
        report.failed.append(failure)
        if on_error is not None:
            on_error(failure)

    bar = progress_bar("ingest", enabled=progress)
    since_compact = 0
    with bar:
        task = bar.add_task(Path(src).name, total=len(specs))
        for spec in specs:
            try:
                if spec.problem is not None:
                    raise spec.problem
                if spec.case_id in done:
                    report.skipped.append(spec.case_id)
                    continue
                kwargs = loader(spec)
                if store is None:
                    n_ch = kwargs["image"].shape[0]
                    ch_names = (
                        names
                        if names and len(names) == n_ch
                        else _default_channel_names(layout, n_ch)
                    )
                    store = VolumeStore.create(
                        store_url,
                        spatial_dims=spatial_dims,
                        channel_names=ch_names,
                        overwrite=overwrite,
                        storage_options=storage_options,
                        truth_params={
                            "source": "ingest",
                            "src": str(Path(src).resolve()),
                            "layout": layout,
                        },
                    )
                store.write_case(spec.case_id, **kwargs)
                report.written.append(spec.case_id)
                done.add(spec.case_id)
                since_compact += 1
                if since_compact >= COMPACT_EVERY:
                    store.compact()
                    since_compact = 0
                if slow > 0:
                    time.sleep(slow)
            except NoisysegInputError as e:
                fail(CaseFailure(spec.case_id, e.path, e.rule))
            finally:
                bar.advance(task)
    if store is not None:
        store.compact()
        store.cleanup_staging()
    return report


def _default_channel_names(layout: str, n: int) -> list[str]:
    if layout == "2d":
        return ["R", "G", "B"] if n == 3 else (["gray"] if n == 1 else [f"ch{i}" for i in range(n)])
    return [f"ch{i}" for i in range(n)]
