"""Source-folder layouts that ``noisyseg ingest`` recognises, and their discovery.

* **nnU-Net v2 / Medical Segmentation Decathlon** (3D NIfTI): ``dataset.json`` read whole
  (:class:`DatasetInfo`), ``imagesTr/<case>_0000<file_ending>`` (+ ``_0001`` ... one file per
  channel, nnU-Net v2) or ``imagesTr/<case>.nii.gz`` (one 3D or 4D file, MSD),
  ``labelsTr/<case><file_ending>``. ``imagesTs`` becomes split ``test`` when ``labelsTs`` exists,
  else split ``unlabeled`` (no truth label set).
* **BraTS** (3D NIfTI, one folder per case): ``<case>/<case>_t1.nii.gz``, ``_t1ce``/``_t1c``,
  ``_t2``, ``_flair``/``_t2f``, ``_seg.nii.gz`` (BraTS 2012-2021 naming) or ``-t1n``, ``-t1c``,
  ``-t2w``, ``-t2f``, ``-seg`` (BraTS 2023+, incl. BraTS-METS). Channels are stored in the order
  T1, T1c, T2, FLAIR. A case folder without a segmentation is ``unlabeled`` (BraTS validation
  sets ship without one).
* **2D images with masks** (skin-lesion datasets): ``images/<case>.png|jpg|...`` with ``masks/``
  (or ``labels/``) holding ``<case>.png``, ``<case>_segmentation.png`` (ISIC) or
  ``<case>_mask.png``; ISIC folder names (``*Input*`` / ``*GroundTruth*``) work too.

A problem found while scanning (a missing channel or label, a label without an image, an unsafe
or duplicated id) is attached to its :class:`CaseSpec` and reported as that case's one line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES_2D = (".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")
MASK_STEM_SUFFIXES = ("_segmentation", "_Segmentation", "_mask", "_Mask", "_seg")
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
#: BraTS channels in stored order, each with the file-name modality tags that mean it.
BRATS_CHANNELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("T1", ("t1", "t1n")),
    ("T1c", ("t1ce", "t1gd", "t1c")),
    ("T2", ("t2", "t2w")),
    ("FLAIR", ("flair", "t2f")),
)
BRATS_SEG_TAGS = ("seg",)
BRATS_FILE_RE = re.compile(r"^(?P<case>.+?)[_-](?P<tag>[A-Za-z0-9]+)\.nii(\.gz)?$")
#: Label names of the two BraTS conventions (used when there is no dataset.json).
BRATS_LABELS_LEGACY = {0: "background", 1: "necrotic tumor core", 2: "edema", 4: "enhancing tumor"}
BRATS_LABELS_2023 = {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}

LAYOUT_NNUNET = "nnunet"
LAYOUT_BRATS = "brats"
LAYOUT_2D = "2d"


@dataclass
class DatasetInfo:
    """What a dataset says about itself (nnU-Net v2 / MSD ``dataset.json``, or BraTS defaults).

    Attributes:
        channel_names: channel names in file order (``channel_names`` v2, ``modality`` MSD).
        labels: label value -> name (v2 ``{"name": value}`` and MSD ``{"value": "name"}`` both
            end here); empty when unknown (then any non-negative integer value is accepted).
        regions: name -> values of nnU-Net v2 region labels (``"whole tumor": [1, 2, 3]``).
        file_ending: image file suffix (``.nii.gz`` unless dataset.json says otherwise).
        path: the dataset.json read, if any.
    """

    channel_names: list[str] | None = None
    labels: dict[int, str] = field(default_factory=dict)
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    file_ending: str = ".nii.gz"
    path: str | None = None
    files: dict[str, Any] | None = None  # nnU-Net v2 "dataset": case -> {images, label}


@dataclass
class CaseSpec:
    """A case found in the source folder, before reading it.

    ``images`` holds one file per channel (nnU-Net, BraTS) or one file (MSD 3D/4D, 2D);
    ``label`` is None for unlabeled cases (split ``unlabeled``).
    """

    case_id: str
    images: list[Path]
    label: Path | None
    split: str = "train"
    problem: NoisysegInputError | None = None  # found while scanning (missing label, ...)


@dataclass
class Layout:
    """Result of :func:`discover`: layout kind, cases, dataset description, notes."""

    kind: str  # LAYOUT_NNUNET | LAYOUT_BRATS | LAYOUT_2D
    specs: list[CaseSpec]
    info: DatasetInfo
    notes: list[str] = field(default_factory=list)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.kind == LAYOUT_2D else 3


# --------------------------------------------------------------------------------------------
# file helpers
# --------------------------------------------------------------------------------------------


def visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursive, sorted), hidden names (``.``, macOS ``._``) skipped."""
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
        if low.endswith(suf.lower()):
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
    copy refused: which one is right is unknowable). Sorted: train first, then by id."""
    by_id: dict[str, list[CaseSpec]] = {}
    for s in specs:
        by_id.setdefault(s.case_id, []).append(s)
    out = []
    for cid, group in by_id.items():
        for s in group:
            where = str(s.images[0] if s.images else s.label)
            try:
                V.check_case_id(cid, path=where)
            except NoisysegInputError as e:
                s.problem = e
                continue
            if len(group) > 1:
                files = ", ".join(str(g.images[0] if g.images else g.label) for g in group)
                s.problem = NoisysegInputError(
                    f"duplicate case id ({len(group)} sources: {files})", case=cid, path=where
                )
        out.extend(group)
    return sorted(out, key=lambda s: (s.split != "train", s.case_id))


# --------------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------------


def _int_or_none(value: object) -> int | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


def _parse_labels(raw: object, path: str) -> tuple[dict[int, str], dict[str, tuple[int, ...]]]:
    """``labels`` of dataset.json: MSD ``{"0": "background", ...}`` or nnU-Net v2
    ``{"background": 0, "tumor": 1, "whole tumor": [1, 2]}`` (regions) -> (value -> name,
    region name -> values)."""
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise NoisysegInputError("dataset.json 'labels' must be an object", path=path)
    values: dict[int, str] = {}
    regions: dict[str, tuple[int, ...]] = {}
    msd = all(_int_or_none(k) is not None for k in raw)
    for key, val in raw.items():
        if msd:
            values[int(_int_or_none(key))] = str(val)  # type: ignore[arg-type]
        elif _int_or_none(val) is not None:
            values[int(_int_or_none(val))] = str(key)  # type: ignore[arg-type]
        elif isinstance(val, list | tuple) and all(_int_or_none(v) is not None for v in val):
            regions[str(key)] = tuple(sorted(int(_int_or_none(v)) for v in val))  # type: ignore[arg-type]
        else:
            raise NoisysegInputError(
                f"dataset.json label {key!r} has value {val!r} (expected an integer or a list "
                "of integers)",
                path=path,
            )
    for name, vals in regions.items():
        for v in vals:
            values.setdefault(v, name if len(vals) == 1 else f"label {v}")
    return values, regions


def read_dataset_json(root: Path) -> DatasetInfo:
    """Read ``root/dataset.json`` (nnU-Net v2 or MSD); defaults when there is none.

    Raises:
        NoisysegInputError: not JSON, not an object, or malformed ``labels``.
    """
    path = root / "dataset.json"
    if not path.exists():
        return DatasetInfo()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NoisysegInputError(f"dataset.json is not valid JSON ({e})", path=str(path)) from None
    if not isinstance(doc, dict):
        raise NoisysegInputError("dataset.json is not a JSON object", path=str(path))
    names = doc.get("channel_names") or doc.get("modality")
    channel_names = None
    if isinstance(names, dict) and names:
        try:
            channel_names = [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
        except (TypeError, ValueError):
            channel_names = None
    labels, regions = _parse_labels(doc.get("labels"), str(path))
    ending = doc.get("file_ending")
    return DatasetInfo(
        channel_names=channel_names,
        labels=labels,
        regions=regions,
        file_ending=ending if isinstance(ending, str) and ending else ".nii.gz",
        path=str(path),
        files=doc["dataset"] if isinstance(doc.get("dataset"), dict) else None,
    )


# --------------------------------------------------------------------------------------------
# nnU-Net v2 / MSD
# --------------------------------------------------------------------------------------------


def _nifti_suffixes(info: DatasetInfo) -> tuple[str, ...]:
    return tuple(dict.fromkeys((info.file_ending, *NIFTI_SUFFIXES)))


def _image_specs(img_root: Path, split: str, info: DatasetInfo) -> list[CaseSpec]:
    """Cases of one images folder: per-channel files ``<case>_XXXX`` grouped, whole files kept."""
    suffixes = _nifti_suffixes(info)
    n_channels = len(info.channel_names) if info.channel_names else None
    channel_files: dict[str, dict[int, Path]] = {}
    whole: list[tuple[str, Path]] = []
    for f in visible_files(img_root):
        rid = _rel_id(f, img_root, suffixes)
        if rid is None:
            continue
        m = CHANNEL_RE.match(rid)
        if m:
            chans = channel_files.setdefault(m.group("case"), {})
            ch = int(m.group("ch"))
            if ch in chans:
                whole.append((m.group("case"), f))  # .nii and .nii.gz of the same channel
            else:
                chans[ch] = f
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
                path=str(img_root / f"{cid}_{missing[0]:04d}{info.file_ending}"),
            )
        specs.append(spec)
    specs += [CaseSpec(cid, [f], None, split) for cid, f in whole]
    return specs


def _nnunet_split(
    root: Path, images_dir: str, labels_dir: str | None, split: str, info: DatasetInfo
) -> list[CaseSpec]:
    """Cases of ``images_dir`` paired with ``labels_dir`` (None: unlabeled); a label file
    without an image becomes a case whose problem says so."""
    specs = _image_specs(root / images_dir, split, info)
    if labels_dir is None:
        return specs
    lab_root = root / labels_dir
    suffixes = _nifti_suffixes(info)
    labels: dict[str, Path] = {}
    for f in visible_files(lab_root) if lab_root.is_dir() else []:
        rid = _rel_id(f, lab_root, suffixes)
        if rid is not None:
            labels.setdefault(rid, f)
    for spec in specs:
        spec.label = labels.pop(spec.case_id, None)
        if spec.label is None and spec.problem is None:
            spec.problem = NoisysegInputError(
                "missing label file",
                case=spec.case_id,
                path=str(lab_root / f"{spec.case_id}{info.file_ending}"),
            )
    for cid, f in labels.items():
        specs.append(
            CaseSpec(
                cid,
                [],
                f,
                split,
                NoisysegInputError(
                    f"label file without an image (no {images_dir}/{cid}_0000{info.file_ending} "
                    f"or {images_dir}/{cid}{info.file_ending})",
                    case=cid,
                    path=str(f),
                ),
            )
        )
    return specs


def _listed_cases(root: Path, info: DatasetInfo) -> list[CaseSpec]:
    """Training cases that nnU-Net v2's ``dataset.json`` lists under ``"dataset"``
    (``{case: {"images": [one file per channel], "label": file}}``; relative paths from the
    dataset folder), instead of ``imagesTr``/``labelsTr``."""
    specs = []
    for cid, entry in (info.files or {}).items():
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not images or not isinstance(label, str):
            specs.append(
                CaseSpec(
                    str(cid),
                    [],
                    None,
                    problem=NoisysegInputError(
                        'dataset.json "dataset" entry needs "images" (a list) and "label"',
                        case=str(cid),
                        path=info.path,
                    ),
                )
            )
            continue
        spec = CaseSpec(str(cid), [root / str(p) for p in images], root / label)
        if not spec.label.exists():  # type: ignore[union-attr]
            spec.problem = NoisysegInputError(
                "missing label file", case=spec.case_id, path=str(spec.label)
            )
        specs.append(spec)
    return specs


def discover_nnunet(root: Path) -> Layout:
    """nnU-Net v2 / MSD folder: ``imagesTr``+``labelsTr`` (or dataset.json's ``"dataset"``
    list) as train, ``imagesTs`` (+``labelsTs``: test, else unlabeled)."""
    info = read_dataset_json(root)
    notes: list[str] = []
    if info.files is not None:
        specs = _listed_cases(root, info)
        notes.append(f'{len(specs)} training case(s) from dataset.json "dataset"')
    else:
        specs = _nnunet_split(root, "imagesTr", "labelsTr", "train", info)
    if (root / "imagesTs").is_dir():
        has_labels = (root / "labelsTs").is_dir()
        test = _nnunet_split(root, "imagesTs", "labelsTs" if has_labels else None, "test", info)
        if not has_labels:
            for s in test:
                s.split = V.UNLABELED
            notes.append(f"imagesTs: {len(test)} case(s) without labels -> split 'unlabeled'")
        specs += test
    return Layout(LAYOUT_NNUNET, _flag_duplicates_and_ids(specs), info, notes)


# --------------------------------------------------------------------------------------------
# BraTS
# --------------------------------------------------------------------------------------------


def _brats_files(folder: Path) -> dict[str, list[Path]]:
    """tag (lower case) -> files of one BraTS case folder."""
    out: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        m = BRATS_FILE_RE.match(f.name)
        if m:
            out.setdefault(m.group("tag").lower(), []).append(f)
    return out


def is_brats_folder(root: Path) -> bool:
    """True when some sub-folder holds BraTS-named files (a modality tag and/or ``seg``)."""
    tags = {t for _, ts in BRATS_CHANNELS for t in ts} | set(BRATS_SEG_TAGS)
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and tags & set(_brats_files(d)):
            return True
    return False


def _brats_case(folder: Path) -> CaseSpec:
    cid = folder.name
    files = _brats_files(folder)
    images: list[Path] = []
    missing: list[str] = []
    for name, tags in BRATS_CHANNELS:
        found = [f for t in tags for f in files.get(t, [])]
        if len(found) > 1:
            return CaseSpec(
                cid,
                found,
                None,
                problem=NoisysegInputError(
                    f"channel {name} given by {len(found)} files "
                    f"({', '.join(f.name for f in found)})",
                    case=cid,
                    path=str(found[0]),
                ),
            )
        if found:
            images.append(found[0])
        else:
            missing.append(f"{name} (*_{tags[0]}.nii.gz / *-{tags[-1]}.nii.gz)")
    segs = [f for t in BRATS_SEG_TAGS for f in files.get(t, [])]
    spec = CaseSpec(cid, images, segs[0] if segs else None, "train" if segs else V.UNLABELED)
    if missing:
        spec.problem = NoisysegInputError(
            f"missing channel file(s) {', '.join(missing)}", case=cid, path=str(folder)
        )
    elif not images and segs:
        spec.problem = NoisysegInputError(
            "label file without an image", case=cid, path=str(segs[0])
        )
    return spec


def discover_brats(root: Path) -> Layout:
    """BraTS folder: one sub-folder per case (see module docs)."""
    info = read_dataset_json(root)
    specs = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and _brats_files(d):
            specs.append(_brats_case(d))
    legacy = any(
        f.name.lower().endswith(("_t1ce.nii.gz", "_flair.nii.gz", "_t1ce.nii", "_flair.nii"))
        for s in specs
        for f in s.images
    )
    if not info.labels:
        info.labels = dict(BRATS_LABELS_LEGACY if legacy else BRATS_LABELS_2023)
    info.channel_names = info.channel_names or [name for name, _ in BRATS_CHANNELS]
    notes = []
    n_unlabeled = sum(s.split == V.UNLABELED and s.problem is None for s in specs)
    if n_unlabeled:
        notes.append(f"{n_unlabeled} case folder(s) without *_seg -> split 'unlabeled'")
    return Layout(LAYOUT_BRATS, _flag_duplicates_and_ids(specs), info, notes)


# --------------------------------------------------------------------------------------------
# 2D
# --------------------------------------------------------------------------------------------


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


def discover_2d(img_root: Path, msk_root: Path) -> list[CaseSpec]:
    """2D image + mask pairs (an exact mask name wins over a ``_segmentation`` match)."""
    exact: dict[str, Path] = {}
    stripped: dict[str, Path] = {}
    if msk_root.is_dir():
        for f in visible_files(msk_root):
            rid = _rel_id(f, msk_root, MASK_SUFFIXES_2D)
            if rid is None:
                continue
            exact.setdefault(rid, f)
            for suf in MASK_STEM_SUFFIXES:
                if rid.endswith(suf):
                    stripped.setdefault(rid[: -len(suf)], f)
                    break
    masks = {**stripped, **exact}
    specs = []
    for f in visible_files(img_root):
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


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def discover(src: str | os.PathLike) -> Layout:
    """Find the layout and the cases of a source folder.

    Raises:
        NoisysegInputError: the folder is missing or empty, or holds no recognisable case.
    """
    root = Path(src)
    if not root.is_dir():
        raise NoisysegInputError("source folder does not exist or is not a folder", path=str(root))
    if not visible_files(root):
        raise NoisysegInputError("empty folder (no files to ingest)", path=str(root))
    nnunet = (root / "imagesTr").is_dir()
    if nnunet or ((root / "dataset.json").exists() and not is_brats_folder(root)):
        layout = discover_nnunet(root)
    elif is_brats_folder(root):
        layout = discover_brats(root)
    else:
        dirs = _find_2d_dirs(root)
        if dirs is None:
            raise NoisysegInputError(
                "no recognisable dataset (expected imagesTr/ + labelsTr/, BraTS case folders, "
                "or images/ + masks/)",
                path=str(root),
            )
        layout = Layout(LAYOUT_2D, _flag_duplicates_and_ids(discover_2d(*dirs)), DatasetInfo())
    if not layout.specs:
        raise NoisysegInputError("empty folder (no cases found)", path=str(root))
    return layout
