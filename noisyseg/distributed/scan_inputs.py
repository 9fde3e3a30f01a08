"""New scans in, model grid out and back: what ``noisyseg predict`` and the registered model do
to a raw scan before and after the network.

A trained model carries its :class:`Preprocessing` (channels, canonical orientation, target
spacing, z-score rule, sliding window). A scan goes through the steps ingest and the training
loader applied to the training cases, with ingest's own functions
(:mod:`noisyseg.storage.geometry`):

1. read the channel files of the case (one file per channel — nnU-Net ``<case>_0000.nii.gz`` or
   a BraTS case folder — or one 4D file, MSD) and check them: every channel present, one voxel
   grid (shape and affine), as many channels as the model takes (:func:`load_scan`);
2. reorient to the closest canonical RAS grid (a pure flip/permutation) when the model was
   trained on reoriented cases, and resample to the model's target spacing when it has one
   (images linear; :func:`predict_raw_volume`);
3. z-score each channel over the whole (resampled) image, exactly as ingest records
   ``channel_mean`` / ``channel_std`` and the patch loader applies them (:func:`zscore`);
4. the probability map goes back the same way (resampled linearly, then the inverse flip /
   permutation: :func:`noisyseg.storage.geometry.to_original`), so it has exactly the input
   file's shape and is saved with its affine.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import geometry as G
from noisyseg.storage.layouts import discover_brats, discover_nnunet, is_brats_folder
from noisyseg.storage.normalise import channel_stats

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_FILE_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
#: Canonical voxel orientation of cases ingested from NIfTI (:mod:`noisyseg.storage.geometry`).
CANONICAL = "RAS"


# ----------------------------------------------------------------------------------------------
# What the model expects


@dataclass(frozen=True)
class Preprocessing:
    """How raw scans become network input, recorded with a trained model.

    Attributes:
        in_channels: image channels the network takes (C).
        spatial_dims: 3 (volumes ``(C, Z, Y, X)``) or 2 (``(C, Y, X)``).
        channel_names: channel order of the training store (``None``: unknown).
        orientation: ``"RAS"`` when ingest reoriented every training case to the closest RAS
            voxel grid, ``None`` when cases kept their own voxel order.
        target_spacing: voxel size in mm, NIfTI axis order ``(x, y, z)`` (after reorientation),
            that ingest resampled every case to (``--target-spacing``); ``None``: native.
        roi_size: sliding-window size (the training patch), store axis order ``(z, y, x)``.
        overlap: sliding-window overlap in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        threshold: default probability threshold of the lesion mask.
        normalization: ``"zscore"``: per case and channel, ``(x - mean) / std`` over every voxel
            of the (resampled) image, population std, std below 1e-8 replaced by 1.
        extra: anything else recorded (kept on a round trip).
    """

    in_channels: int
    spatial_dims: int = 3
    channel_names: list[str] | None = None
    orientation: str | None = None
    target_spacing: tuple[float, ...] | None = None
    roi_size: tuple[int, ...] = (64, 64, 64)
    overlap: float = 0.25
    sw_batch_size: int = 4
    threshold: float = 0.5
    normalization: str = "zscore"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists for tuples)."""
        data = asdict(self)
        if data["target_spacing"] is not None:
            data["target_spacing"] = [float(v) for v in data["target_spacing"]]
        data["roi_size"] = [int(v) for v in data["roi_size"]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict` (unknown keys are kept in ``extra``)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = dict(data.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in known and k != "extra"})
        if values.get("target_spacing") is not None:
            values["target_spacing"] = tuple(float(v) for v in values["target_spacing"])
        values["roi_size"] = tuple(int(v) for v in values.get("roi_size", cls.roi_size))
        return cls(**values, extra=extra)


# ----------------------------------------------------------------------------------------------
# Finding the cases of a folder


@dataclass
class ScanCase:
    """One case to predict: its id and its channel files (in the model's channel order), or a
    case of a store (``store_url``; ``files`` empty). ``problem`` (+ ``problem_path``): what
    scanning found wrong (a missing channel file, ...), reported as the case's one line."""

    case_id: str
    files: list[str]
    problem: str | None = None
    problem_path: str | None = None
    store_url: str | None = None

    def error(self) -> NoisysegInputError:
        return NoisysegInputError(
            self.problem or "unknown problem", case=self.case_id, path=self.problem_path
        )


def _nifti_stem(name: str) -> str | None:
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _flat_cases(folder: Path, in_channels: int) -> list[ScanCase]:
    """A folder of files: nnU-Net channel files ``<case>_XXXX`` grouped per case (a missing
    channel index is the case's problem); any other file (3D, or 4D MSD) is one case."""
    grouped: dict[str, dict[int, Path]] = {}
    cases: list[ScanCase] = []
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path.name)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        match = CHANNEL_FILE_RE.match(stem)
        if match:
            grouped.setdefault(match.group("case"), {})[int(match.group("ch"))] = path
        else:
            cases.append(ScanCase(stem, [str(path)]))
    for case_id, channels in grouped.items():
        case = ScanCase(case_id, [str(channels[k]) for k in sorted(channels)])
        missing = [k for k in range(max(in_channels, max(channels) + 1)) if k not in channels]
        if missing:
            case.problem = "missing channel file(s) " + ", ".join(f"_{k:04d}" for k in missing)
            case.problem_path = str(folder / f"{case_id}_{missing[0]:04d}.nii.gz")
        cases.append(case)
    return cases


def _from_specs(specs: list[Any]) -> list[ScanCase]:
    """Ingest's case specs (:mod:`noisyseg.storage.layouts`) as cases to predict; labels and
    problems about labels are ignored (prediction needs none)."""
    cases = []
    for spec in specs:
        if not spec.images:
            continue  # a label file without an image
        case = ScanCase(spec.case_id, [str(p) for p in spec.images])
        problem = spec.problem
        if problem is not None and "label" not in problem.rule:
            case.problem, case.problem_path = problem.rule, problem.path
        cases.append(case)
    return cases


def discover_scans(folder: str | os.PathLike, *, in_channels: int) -> list[ScanCase]:
    """The cases of a folder of NIfTI scans, sorted by id.

    Layouts (those of ingest): a BraTS folder (one sub-folder per case; channels T1, T1c, T2,
    FLAIR), an nnU-Net / MSD dataset root (its ``imagesTs`` cases when it has them, else every
    case), or a folder of nnU-Net channel files ``<case>_0000.nii.gz`` ... / one 3D or 4D file per
    case (e.g. ``imagesTs`` itself). Cases with a problem are returned with ``problem`` set, so
    the others still run.

    Raises:
        NoisysegInputError: the folder does not exist or holds no NIfTI scan.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NoisysegInputError("input folder does not exist or is not a folder", path=str(root))
    if is_brats_folder(root):
        cases = _from_specs(discover_brats(root).specs)
    elif (root / "imagesTr").is_dir() or (root / "dataset.json").is_file():
        specs = discover_nnunet(root).specs
        new = [s for s in specs if s.split in ("unlabeled", "test")]
        cases = _from_specs(new or specs)
    else:
        cases = _flat_cases(root, in_channels)
    if not cases:
        raise NoisysegInputError("no NIfTI scans (.nii, .nii.gz) found", path=str(root))
    return sorted(cases, key=lambda c: c.case_id)


# ----------------------------------------------------------------------------------------------
# Reading one case


@dataclass
class LoadedScan:
    """A case read from its files.

    Attributes:
        image: ``(I, J, K, C)`` float32, the files' own voxel order (channels last).
        grid: the files' voxel grid (:class:`noisyseg.storage.geometry.Grid`).
        header: the first channel file's NIfTI header (copied into the outputs).
    """

    image: np.ndarray
    grid: G.Grid
    header: Any


def _read_nifti(path: str, case_id: str) -> tuple[np.ndarray, G.Grid, Any]:
    """``(data float32 (I, J, K[, C]), grid, header)`` of one file; one line when unreadable."""
    file = Path(path)
    if not file.is_file():
        raise NoisysegInputError("file missing", case=case_id, path=path)
    if file.stat().st_size == 0:
        raise NoisysegInputError("empty file (0 bytes)", case=case_id, path=path)
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
    except Exception as error:  # noqa: BLE001 - nibabel/gzip raise many types for a bad file
        first = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise NoisysegInputError(
            f"truncated or unreadable NIfTI ({type(error).__name__}: {first})",
            case=case_id,
            path=path,
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise NoisysegInputError(
            f"expected a 3D volume (or 4D channels), got shape {data.shape}",
            case=case_id,
            path=path,
        )
    return data, G.make_grid(data.shape[:3], image.affine, zooms), image.header


def load_scan(case: ScanCase, *, in_channels: int) -> LoadedScan:
    """Read and check the channel files of one case.

    Raises:
        NoisysegInputError naming the case and the file: a problem found while scanning, an
        unreadable file, channels of different shapes or affines, a channel count that is not
        the model's, a non-finite voxel.
    """
    if case.problem is not None:
        raise case.error()
    channels: list[np.ndarray] = []
    grid = header = None
    for path in case.files:
        data, file_grid, file_header = _read_nifti(path, case.case_id)
        if grid is None:
            grid, header = file_grid, file_header
        else:
            what = f"channel {len(channels)}"
            G.check_same_grid(grid, file_grid, what=what, case=case.case_id, path=path)
        channels.extend([data[..., c] for c in range(data.shape[3])] if data.ndim == 4 else [data])
    if len(channels) != in_channels:
        raise NoisysegInputError(
            f"model expects {in_channels} image channels, the case has {len(channels)}",
            case=case.case_id,
            path=case.files[0],
        )
    image = np.stack(channels, axis=-1)
    if not np.isfinite(image).all():
        raise NoisysegInputError("image has NaN/Inf voxels", case=case.case_id, path=case.files[0])
    assert grid is not None
    return LoadedScan(image, grid, header)


# ----------------------------------------------------------------------------------------------
# Model grid


def to_canonical(scan: LoadedScan, orientation: str | None) -> tuple[np.ndarray, G.Grid]:
    """The scan on the model's voxel grid before resampling: reoriented to RAS when the model
    was trained on reoriented cases. Returns ``(image (I', J', K', C), grid)``."""
    if orientation is None:
        return scan.image, scan.grid
    if orientation != CANONICAL:
        raise ValueError(f"unknown canonical orientation {orientation!r}")
    return G.reorient(scan.image, scan.grid)


def spacing_grid(shape_ijk: tuple[int, ...], spacing_ijk: tuple[float, ...]) -> G.Grid:
    """An axis-aligned grid (affine ``diag(spacing)``) for a volume given without an affine."""
    spacing = [float(s) for s in spacing_ijk]
    return G.make_grid(shape_ijk, np.diag([*spacing, 1.0]), spacing)


def zscore(volume: np.ndarray) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` over every voxel, with ingest's statistics
    (:func:`noisyseg.storage.normalise.channel_stats`: float64, population std) cast to float32
    and a std below 1e-8 replaced by 1, subtracted and divided in float32 — what the patch
    loader applies to a stored case (:func:`noisyseg.storage.normalise.case_stats`).

    ``(C, *S)`` -> ``(C, *S)`` float32.
    """
    data = np.asarray(volume, dtype=np.float32)
    stats = channel_stats(data)
    mean = np.asarray(stats["channel_mean"], dtype=np.float32)
    std = np.asarray(stats["channel_std"], dtype=np.float32)
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    shape = (data.shape[0],) + (1,) * (data.ndim - 1)
    return (data - mean.reshape(shape)) / std.reshape(shape)
