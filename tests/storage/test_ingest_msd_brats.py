"""Ingest of MSD-Task01-shaped and BraTS-style folders: multi-class labels, --foreground,
geometry (RAS reorientation, world affine, resampling, the way back), splits, clean lists, bad
input. Expected values are computed independently with nibabel (``as_closest_canonical``) and
the source affines, never with noisyseg's own geometry code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from noisyseg.cli import main as cli_main
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.geometry import Geometry, to_original
from noisyseg.storage.ingest import SOURCE_LABELS, ingest_folder
from noisyseg.storage.splits import assign_splits
from noisyseg.storage.store import VolumeStore

MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def affine_for(kind: str, zooms, origin=(-20.0, 15.0, 7.5)) -> np.ndarray:
    """A 4x4 affine of voxel sizes ``zooms`` (i, j, k) in one of several orientations."""
    sx, sy, sz = zooms
    if kind == "RAS":
        m = np.diag([sx, sy, sz])
    elif kind == "LPS":  # DICOM-style: i runs right->left, j anterior->posterior
        m = np.diag([-sx, -sy, sz])
    elif kind == "PSR":  # sagittal: i -> -y (posterior), j -> +z, k -> +x
        m = np.array([[0, 0, sz], [-sx, 0, 0], [0, sy, 0]], dtype=float)
    elif kind == "LIA":
        m = np.array([[-sx, 0, 0], [0, 0, sz], [0, -sy, 0]], dtype=float)
    else:
        raise ValueError(kind)
    a = np.eye(4)
    a[:3, :3] = m
    a[:3, 3] = origin
    return a


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def blob_label(shape, rng, values=(1, 2, 3)) -> np.ndarray:
    """Nested boxes: edema around non-enhancing around enhancing (values 1, 2, 3)."""
    lab = np.zeros(shape, np.uint8)
    c = [int(rng.integers(4, s - 4)) for s in shape]
    for r, v in zip((4, 2, 1), values, strict=True):
        lab[tuple(slice(max(0, ci - r), ci + r) for ci in c)] = v
    return lab


MSD_CASES = {
    # case id: (shape i,j,k, zooms, orientation)
    "BRATS_001": ((20, 18, 14), (1.0, 1.0, 1.0), "RAS"),
    "BRATS_002": ((16, 22, 12), (0.9, 1.1, 2.0), "LPS"),
    "BRATS_003": ((18, 16, 20), (1.2, 0.8, 1.5), "PSR"),
    "BRATS_004": ((14, 20, 16), (1.0, 2.0, 0.5), "LIA"),
    "BRATS_005": ((20, 20, 10), (0.7, 0.7, 3.0), "RAS"),
    "BRATS_006": ((12, 14, 16), (1.0, 1.0, 1.0), "LPS"),
}
MSD_TEST = {"BRATS_101": ((16, 16, 12), (1.0, 1.5, 2.0), "LIA")}


def make_msd_task01(root: Path, seed: int = 0) -> dict[str, tuple[Path, Path | None]]:
    """MSD Task01 layout: 4D 4-channel images, labels 0-3, imagesTs without labels."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "BRATS",
                "modality": MSD_MODALITY,
                "labels": MSD_LABELS,
                "training": [],
                "test": [],
            }
        )
    )
    files = {}
    for split, cases in (("Tr", MSD_CASES), ("Ts", MSD_TEST)):
        for cid, (shape, zooms, kind) in cases.items():
            aff = affine_for(kind, zooms)
            n = int(np.prod(shape))
            # channel 0 holds a unique value per voxel (identifies the voxel after any flip)
            chans = [np.arange(n, dtype=np.float32).reshape(shape)]
            chans += [rng.normal(100 * c, 10, size=shape).astype(np.float32) for c in (1, 2, 3)]
            img_path = root / f"images{split}" / f"{cid}.nii.gz"
            save(img_path, np.stack(chans, axis=-1), aff)
            lab_path = None
            if split == "Tr":
                lab_path = root / "labelsTr" / f"{cid}.nii.gz"
                save(lab_path, blob_label(shape, rng), aff)
            files[cid] = (img_path, lab_path)
    return files


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Independent expectation: nibabel's closest-canonical data and affine."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


def canonical_of(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd") / "Task01_BrainTumour"
    files = make_msd_task01(root)
    url = str(root.parent / "msd.zarr")
    report = ingest_folder(root, url, progress=False, val_fraction=0.2, test_fraction=0.2, seed=3)
    return root, files, url, report


def test_msd_multiclass_kept_voxel_for_voxel_in_canonical_space(msd):
    root, files, url, report = msd
    assert report.ok, [f.line() for f in report.failed]
    assert report.layout == "nnunet"
    store = VolumeStore.open(url)
    assert store.channel_names == ["FLAIR", "T1w", "t1gd", "T2w"]
    for cid, (img_path, lab_path) in files.items():
        want_img, want_aff = canonical(img_path)
        got = store.image(cid)[:]
        assert got.shape == (4, *want_img.shape[:3][::-1])
        for c in range(4):
            np.testing.assert_array_equal(got[c], want_img[..., c].transpose(2, 1, 0))
        np.testing.assert_allclose(store.case_info(cid)["affine"], want_aff, atol=1e-6)
        if lab_path is None:
            continue
        want_lab, _ = canonical(lab_path)
        src_map = store.labels(cid, SOURCE_LABELS)[:]
        assert src_map.dtype == np.uint8
        np.testing.assert_array_equal(src_map, want_lab.transpose(2, 1, 0))
        # default foreground: every non-zero label
        np.testing.assert_array_equal(store.labels(cid)[:], (want_lab != 0).transpose(2, 1, 0))


def test_msd_world_affine_maps_each_voxel_to_its_source_world_point(msd):
    root, files, url, _ = msd
    store = VolumeStore.open(url)
    rng = np.random.default_rng(0)
    for cid, (img_path, _) in files.items():
        src_aff = nib.load(str(img_path)).affine
        shape = MSD_CASES.get(cid, MSD_TEST.get(cid))[0]
        ch0 = store.image(cid)[0]  # unique value per source voxel
        aff = store.case_info(cid)["affine"]
        for _ in range(5):
            ijk = [int(rng.integers(0, s)) for s in shape]
            value = np.ravel_multi_index(ijk, shape)
            z, y, x = (int(v[0]) for v in np.nonzero(ch0 == value))
            np.testing.assert_allclose(
                aff @ [x, y, z, 1.0], src_aff @ [*ijk, 1.0], atol=1e-5, err_msg=cid
            )


def test_msd_geometry_recorded_and_labels_go_back_exactly(msd):
    root, files, url, _ = msd
    store = VolumeStore.open(url)
    for cid, (img_path, lab_path) in files.items():
        src = nib.load(str(img_path))
        geo = Geometry.from_json(store.case_attrs(cid)["geometry"])
        np.testing.assert_allclose(geo.original.affine, src.affine, atol=1e-6)
        assert geo.original.shape == src.shape[:3]
        assert geo.original.orientation == "".join(nib.aff2axcodes(src.affine))
        assert geo.stored.orientation == "RAS"
        if lab_path is not None:
            back = to_original(store.labels(cid, SOURCE_LABELS)[:], geo)
            np.testing.assert_array_equal(back, np.asarray(nib.load(str(lab_path)).dataobj))


def test_msd_splits_unlabeled_and_ome_translation(msd):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    root, files, url, _ = msd
    store = VolumeStore.open(url)
    idx = store.index().set_index("case_id")
    assert store.case_ids(split="unlabeled") == ["BRATS_101"]
    assert store.case_label_sets("BRATS_101") == []
    assert pd_isna(idx.loc["BRATS_101", "n_lesions_truth"])
    labelled = sorted(MSD_CASES)
    # the documented rule, recomputed here: sorted ids permuted with default_rng([seed, 7919])
    order = np.random.default_rng([3, 7919]).permutation(len(labelled))
    want = {cid: "train" for cid in labelled}
    want[labelled[order[0]]] = "test"
    want[labelled[order[1]]] = "val"
    assert {c: idx.loc[c, "split"] for c in labelled} == want
    assert assign_splits(labelled, seed=3, val_fraction=0.2, test_fraction=0.2) == want
    info = store.label_set_info("truth")["params"]
    assert info["foreground"] == "nonzero" and info["label_map"] == SOURCE_LABELS
    assert info["label_names"]["3"] == "enhancing tumour"
    cid = "BRATS_004"
    md = next(iter(Reader(parse_url(os.path.join(store.root, "cases", cid)))())).metadata
    transforms = md["coordinateTransformations"][0]
    origin = nib.as_closest_canonical(nib.load(str(files[cid][0]))).affine[:3, 3]
    assert transforms[1]["type"] == "translation"
    np.testing.assert_allclose(transforms[1]["translation"], [0.0, *origin[::-1]], atol=1e-6)
    lab_attrs = json.loads(
        (Path(store.root) / "cases" / cid / "labels" / SOURCE_LABELS / "zarr.json").read_text()
    )["attributes"]["ome"]["image-label"]
    assert {p["label-value"]: p["class"] for p in lab_attrs["properties"]} == {
        1: "edema",
        2: "non-enhancing tumor",
        3: "enhancing tumour",
    }


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_msd_foreground_by_name_and_target_spacing(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    files = make_msd_task01(root, seed=1)
    url = str(tmp_path / "fg.zarr")
    report = ingest_folder(
        root,
        url,
        progress=False,
        foreground="enhancing tumour, non-enhancing tumor",
        target_spacing=None,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    assert report.ok
    store = VolumeStore.open(url)
    for cid, (_, lab) in files.items():
        if lab is not None:
            want, _ = canonical(lab)
            np.testing.assert_array_equal(
                store.labels(cid)[:], np.isin(want, [2, 3]).transpose(2, 1, 0)
            )
    assert store.label_set_info("truth")["params"]["foreground"] == [2, 3]
    # resampling at ingest: a target spacing of exactly twice BRATS_001's 1 mm puts every stored
    # voxel centre on a source voxel centre, so labels (nearest) and images (linear) are exact
    url2 = str(tmp_path / "rs.zarr")
    report = ingest_folder(
        root,
        url2,
        progress=False,
        target_spacing=(2.0, 2.0, 2.0),
        val_fraction=0.0,
        test_fraction=0.0,
        foreground="3",
    )
    assert report.ok, [f.line() for f in report.failed]
    store = VolumeStore.open(url2)
    cid = "BRATS_001"
    img_path, lab_path = files[cid]
    want_img, want_aff = canonical(img_path)
    want_lab, _ = canonical(lab_path)
    sub = (slice(None, None, 2),) * 3
    assert store.spacing(cid) == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(
        store.labels(cid, SOURCE_LABELS)[:], want_lab[sub].transpose(2, 1, 0)
    )
    np.testing.assert_array_equal(store.labels(cid)[:], (want_lab[sub] == 3).transpose(2, 1, 0))
    np.testing.assert_allclose(
        store.image(cid)[1], want_img[..., 1][sub].transpose(2, 1, 0), rtol=1e-6
    )
    aff = store.case_info(cid)["affine"]
    np.testing.assert_allclose(aff[:3, 3], want_aff[:3, 3])  # voxel 0 stays at its world point
    np.testing.assert_allclose(aff[:3, :3], want_aff[:3, :3] * 2.0)
    # every case: stored spacing is the target, the stored grid covers the source's extent
    for cid2, (shape, _, _) in MSD_CASES.items():
        geo = Geometry.from_json(store.case_attrs(cid2)["geometry"])
        assert geo.stored.spacing == (2.0, 2.0, 2.0)
        canon = nib.as_closest_canonical(nib.load(str(files[cid2][0])))
        ext_src = np.asarray(canon.shape[:3]) * np.asarray(canon.header.get_zooms()[:3])
        ext_dst = np.asarray(geo.stored.shape) * 2.0
        assert np.all(np.abs(ext_src - ext_dst) <= 1.0 + 1e-6), cid2
        assert store.image(cid2).shape[1:] == geo.stored.shape[::-1]
        # the way back lands on the source grid; where a stored voxel centre sits on a source
        # voxel centre (every 2nd canonical voxel of the 1 mm cases) the values are the source's
        back = to_original(store.labels(cid2, SOURCE_LABELS)[:], geo)
        assert back.shape == shape
        if MSD_CASES[cid2][1] == (1.0, 1.0, 1.0):
            src_aff = nib.load(str(files[cid2][1])).affine
            back_canon, _ = canonical_of(back, src_aff)
            want_lab, _ = canonical(files[cid2][1])
            np.testing.assert_array_equal(back_canon[sub], want_lab[sub])
            prob = to_original(store.image(cid2)[1], geo, order=1)
            prob_canon, _ = canonical_of(prob, src_aff)
            want_img, _ = canonical(files[cid2][0])
            np.testing.assert_allclose(prob_canon[sub], want_img[..., 1][sub], rtol=1e-5)
    # a resumed ingest with another foreground is refused (the truth would mix two rules)
    with pytest.raises(NoisysegInputError, match="ingested with foreground"):
        ingest_folder(root, url2, progress=False, target_spacing=(2.0, 2.0, 2.0), foreground="2")


# ---- BraTS ---------------------------------------------------------------------------------

LEGACY_TAGS = ("t1", "t1ce", "t2", "flair")
NEW_TAGS = ("t1n", "t1c", "t2w", "t2f")


def make_brats(root: Path, ids, *, legacy: bool, seed: int = 0, unlabeled=()) -> dict:
    rng = np.random.default_rng(seed)
    sep, tags = ("_", LEGACY_TAGS) if legacy else ("-", NEW_TAGS)
    values = (2, 1, 4) if legacy else (2, 1, 3)  # edema, core, enhancing
    out = {}
    for n, cid in enumerate(ids):
        d = root / cid
        d.mkdir(parents=True)
        shape = (16, 14, 12)
        aff = affine_for("LPS" if n % 2 else "RAS", (1.0, 1.0, 1.5))
        chans = {}
        # files written in a shuffled order: the stored order must come from the names
        for t in rng.permutation(tags):
            vol = rng.normal(50, 5, size=shape).astype(np.float32) + 1000 * tags.index(t)
            save(d / f"{cid}{sep}{t}.nii.gz", vol, aff)
            chans[t] = vol
        lab = None
        if cid not in unlabeled:
            lab = blob_label(shape, rng, values)
            save(d / f"{cid}{sep}seg.nii.gz", lab, aff)
        out[cid] = ([chans[t] for t in tags], lab, aff)
    return out


@pytest.mark.parametrize("legacy", [True, False])
def test_brats_folders_channels_labels_foreground(tmp_path, legacy):
    src = tmp_path / "brats"
    ids = (
        ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"]
        if legacy
        else ["BraTS-MET-00001-000", "BraTS-MET-00002-000", "BraTS-MET-00003-000"]
    )
    cases = make_brats(src, ids, legacy=legacy, unlabeled=(ids[2],))
    url = str(tmp_path / "b.zarr")
    fg = "enhancing tumor" if legacy else "ET"
    report = ingest_folder(
        src, url, progress=False, foreground=fg, val_fraction=0.0, test_fraction=0.0
    )
    assert report.ok, [f.line() for f in report.failed]
    assert report.layout == "brats"
    store = VolumeStore.open(url)
    assert store.channel_names == ["T1", "T1c", "T2", "FLAIR"]
    assert store.case_ids(split="unlabeled") == [ids[2]]
    enhancing = 4 if legacy else 3
    for cid, (chans, lab, aff) in cases.items():
        canon = nib.as_closest_canonical(nib.Nifti1Image(np.stack(chans, -1), aff))
        np.testing.assert_array_equal(
            store.image(cid)[:], np.asarray(canon.dataobj).transpose(3, 2, 1, 0)
        )
        if lab is not None:
            want = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(lab, aff)).dataobj)
            np.testing.assert_array_equal(
                store.labels(cid, SOURCE_LABELS)[:], want.transpose(2, 1, 0)
            )
            np.testing.assert_array_equal(
                store.labels(cid)[:], (want == enhancing).transpose(2, 1, 0)
            )


# ---- bad input -----------------------------------------------------------------------------


def make_nnunet(root: Path, ids, *, n_channels: int = 3, seed: int = 0) -> None:
    """nnU-Net v2 layout (one file per channel), labels {background: 0, edema: 1, tumor: 2}."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {str(c): f"mod{c}" for c in range(n_channels)},
                "labels": {"background": 0, "edema": 1, "tumor": 2, "whole": [1, 2]},
                "file_ending": ".nii.gz",
            }
        )
    )
    for cid in ids:
        aff = affine_for("RAS", (1.0, 1.0, 2.0))
        for c in range(n_channels):
            save(
                root / "imagesTr" / f"{cid}_{c:04d}.nii.gz",
                rng.normal(size=(12, 14, 10)).astype(np.float32),
                aff,
            )
        save(root / "labelsTr" / f"{cid}.nii.gz", blob_label((12, 14, 10), rng, (1, 2, 2)), aff)


def test_nnunet_region_name_foreground(tmp_path):
    src = tmp_path / "Dataset002"
    make_nnunet(src, ["a", "b"])
    url = str(tmp_path / "s.zarr")
    report = ingest_folder(src, url, progress=False, foreground="whole", val_fraction=0.0)
    assert report.ok
    store = VolumeStore.open(url)
    assert store.label_set_info("truth")["params"]["foreground"] == [1, 2]
    for cid in ("a", "b"):
        lab = np.asarray(nib.load(str(src / "labelsTr" / f"{cid}.nii.gz")).dataobj)
        np.testing.assert_array_equal(store.labels(cid)[:], (lab > 0).transpose(2, 1, 0))


BAD = {
    "unlisted_value": "label values 7 not listed in dataset.json labels",
    "missing_channel": "missing channel file(s) _0002",
    "channel_shape": "channel 1 shape (12, 14, 11) does not match channel 0 shape (12, 14, 10)",
    "channel_affine": "channel 2 affine differs from channel 0's",
    "label_without_image": "label file without an image",
}


def _break_nnunet(src: Path, rule: str) -> tuple[str, Path]:
    cid = "bad_case"
    make_nnunet(src, [cid], seed=9)
    img = src / "imagesTr"
    if rule == "unlisted_value":
        path = src / "labelsTr" / f"{cid}.nii.gz"
        im = nib.load(str(path))
        lab = np.asarray(im.dataobj).copy()
        lab[0, 0, 0] = 7
        save(path, lab, im.affine)
    elif rule == "missing_channel":
        path = img / f"{cid}_0002.nii.gz"
        path.unlink()
    elif rule == "channel_shape":
        path = img / f"{cid}_0001.nii.gz"
        save(path, np.zeros((12, 14, 11), np.float32), affine_for("RAS", (1.0, 1.0, 2.0)))
    elif rule == "channel_affine":
        path = img / f"{cid}_0002.nii.gz"
        save(
            path, np.zeros((12, 14, 10), np.float32), affine_for("RAS", (1.0, 1.0, 2.0), (0, 0, 5))
        )
    elif rule == "label_without_image":
        for c in range(3):
            (img / f"{cid}_{c:04d}.nii.gz").unlink()
        path = src / "labelsTr" / f"{cid}.nii.gz"
    return cid, path


@pytest.mark.fault_case(12)
@pytest.mark.parametrize("rule", sorted(BAD))
def test_bad_input_one_line_naming_case_and_file_good_cases_proceed(tmp_path, rule):
    src = tmp_path / "Dataset003"
    make_nnunet(src, ["good_1", "good_2"])
    cid, path = _break_nnunet(src, rule)
    url = str(tmp_path / "s.zarr")
    report = ingest_folder(src, url, progress=False, val_fraction=0.0)
    lines = [f.line() for f in report.failed]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"case {cid}: {path}: ") and BAD[rule] in lines[0], lines
    assert "\n" not in lines[0]
    assert VolumeStore.open(url).case_ids() == ["good_1", "good_2"]


def test_brats_missing_channel_and_unknown_foreground(tmp_path, capsys):
    src = tmp_path / "brats"
    make_brats(src, ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"], legacy=False)
    (src / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t2f.nii.gz").unlink()
    url = str(tmp_path / "b.zarr")
    report = ingest_folder(src, url, progress=False, val_fraction=0.0, test_fraction=0.0)
    assert [f.line() for f in report.failed] == [
        f"case BraTS-GLI-00002-000: {src / 'BraTS-GLI-00002-000'}: missing channel file(s) "
        "FLAIR (*_flair.nii.gz / *-t2f.nii.gz)"
    ]
    assert VolumeStore.open(url).case_ids() == ["BraTS-GLI-00001-000"]
    with pytest.raises(NoisysegInputError, match=r"unknown label name 'necrosis' \(known: 0 "):
        ingest_folder(src, str(tmp_path / "c.zarr"), progress=False, foreground="ET,necrosis")
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.fault_case(12)
def test_cli_exit_2_with_one_line_per_bad_case(tmp_path, capsys):
    src = tmp_path / "Dataset004"
    make_nnunet(src, ["good_1", "good_2", "good_3"])
    _break_nnunet(src, "unlisted_value")
    url = str(tmp_path / "s.zarr")
    rc = cli_main(["ingest", str(src), url, "--no-progress", "--val-fraction", "0.34"])
    out = capsys.readouterr()
    assert rc == 2
    err = [ln for ln in out.err.splitlines() if ln]
    assert len(err) == 1 and err[0].startswith("noisyseg ingest: error: case bad_case: ")
    assert "ingested 3 case(s)" in out.out
    store = VolumeStore.open(url)
    # the split plan covers every labelled case found, the bad one too (stable when it is fixed)
    plan = assign_splits(
        ["bad_case", "good_1", "good_2", "good_3"], seed=0, val_fraction=0.34, test_fraction=0.1
    )
    index = store.index()
    assert dict(zip(index["case_id"], index["split"], strict=True)) == {
        c: plan[c] for c in ("good_1", "good_2", "good_3")
    }
    # an unknown --foreground name: one line, status 2, no store touched
    rc = cli_main(["ingest", str(src), str(tmp_path / "t.zarr"), "--foreground", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown label name 'nope'" in err[0]


# ---- splits, clean cases, re-split ---------------------------------------------------------


def test_splits_file_clean_cases_and_resplit(tmp_path, capsys):
    src = tmp_path / "Dataset005"
    ids = [f"c{i}" for i in range(6)]
    make_nnunet(src, ids)
    splits = tmp_path / "splits_final.json"
    splits.write_text(
        json.dumps(
            [
                {"train": ["c0", "c1", "c2", "c3"], "val": ["c4", "c5"]},
                {"train": ["c2", "c3", "c4", "c5"], "val": ["c0", "c1"]},
            ]
        )
    )
    clean = tmp_path / "clean.txt"
    clean.write_text("# trusted\nc1\nc3\n")
    url = str(tmp_path / "s.zarr")
    report = ingest_folder(
        src,
        url,
        progress=False,
        splits_file=str(splits),
        fold=1,
        clean_cases=str(clean),
        scheduler="processes",
        num_workers=2,
    )
    assert report.ok, [f.line() for f in report.failed]
    store = VolumeStore.open(url)
    assert store.case_ids(split="val") == ["c0", "c1"]
    assert store.case_ids(clean=True) == ["c1", "c3"]
    # re-split later by the seeded rule, and re-assign the clean flag
    clean.write_text("c5\n")
    rc = cli_main(
        ["split", url, "--val-fraction", "0.34", "--seed", "4", "--clean-cases", str(clean)]
    )
    assert rc == 0, capsys.readouterr().err
    store = VolumeStore.open(url)
    want = assign_splits(ids, seed=4, val_fraction=0.34, test_fraction=0.0)
    assert dict(zip(store.index()["case_id"], store.index()["split"], strict=True)) == want
    assert store.case_ids(clean=True) == ["c5"]
    # unknown ids in a split file or clean list: one line, nothing changed
    clean.write_text("c5\nzz9\n")
    rc = cli_main(["split", url, "--clean-cases", str(clean)])
    err = capsys.readouterr().err
    assert rc == 2 and "clean-case list: case 'zz9' not among the dataset's cases" in err
    assert VolumeStore.open(url).case_ids(clean=True) == ["c5"]


@pytest.mark.fault_case(3)
def test_overwrite_rebuilds_beside_the_old_store_and_refuses_a_foreign_folder(tmp_path):
    src = tmp_path / "Dataset006"
    make_nnunet(src, ["a", "b"])
    url = tmp_path / "s.zarr"
    assert ingest_folder(src, str(url), progress=False, val_fraction=0.0).ok
    with pytest.raises(NoisysegInputError, match="ingested with foreground nonzero, now"):
        ingest_folder(src, str(url), progress=False, val_fraction=0.0, foreground="tumor")
    report = ingest_folder(
        src, str(url), progress=False, val_fraction=0.0, foreground="tumor", overwrite=True
    )
    assert report.ok and sorted(report.written) == ["a", "b"] and report.skipped == []
    store = VolumeStore.open(str(url))
    assert store.label_set_info("truth")["params"]["foreground"] == [2]
    lab = np.asarray(nib.load(str(src / "labelsTr" / "a.nii.gz")).dataobj)
    np.testing.assert_array_equal(store.labels("a")[:], (lab == 2).transpose(2, 1, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset006", "s.zarr"]  # no leftovers
    foreign = tmp_path / "notastore"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(NoisysegInputError, match="is not a noisyseg store"):
        ingest_folder(src, str(foreign), progress=False, overwrite=True, val_fraction=0.0)
    assert (foreign / "keep.txt").read_text() == "mine"


RAY_HEAD_CPUS = 2


@pytest.mark.integration
def test_ray_scheduler_writes_the_same_store(tmp_path, monkeypatch, request):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src = tmp_path / "Dataset007"
    make_nnunet(src, ["a", "b", "c"])
    _break_nnunet(src, "unlisted_value")
    ref = ingest_folder(src, str(tmp_path / "t.zarr"), progress=False, val_fraction=0.0)
    with pytest.raises(NoisysegInputError, match="needs a Ray connection"):
        ingest_folder(src, str(tmp_path / "r.zarr"), progress=False, scheduler="ray")
    assert not (tmp_path / "r.zarr").exists()  # refused before any work
    # a real `ray start --head` (conftest); ingest connects through RAY_ADDRESS, as under
    # `ray job submit`, and disconnects at the end
    head = request.getfixturevalue("ray_head")
    monkeypatch.setenv("RAY_ADDRESS", head.address)
    got = ingest_folder(
        src, str(tmp_path / "r.zarr"), progress=False, val_fraction=0.0, scheduler="ray"
    )
    assert [f.line() for f in got.failed] == [f.line() for f in ref.failed] and len(got.failed) == 1
    a, b = VolumeStore.open(str(tmp_path / "t.zarr")), VolumeStore.open(str(tmp_path / "r.zarr"))
    assert a.case_ids() == b.case_ids() == ["a", "b", "c"]
    for cid in a.case_ids():
        np.testing.assert_array_equal(a.image(cid)[:], b.image(cid)[:])
        np.testing.assert_array_equal(
            a.labels(cid, SOURCE_LABELS)[:], b.labels(cid, SOURCE_LABELS)[:]
        )


def test_nnunet_dataset_json_listing_files_instead_of_imagesTr(tmp_path):
    """nnU-Net v2's "dataset" key (its BraTS 2024 conversion links the files in place)."""
    brats = tmp_path / "raw"
    cases = make_brats(brats, ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"], legacy=False)
    src = tmp_path / "Dataset226_BraTS2024"
    src.mkdir()
    listing = {
        cid: {
            "images": [str(brats / cid / f"{cid}-{t}.nii.gz") for t in NEW_TAGS],
            "label": str(brats / cid / f"{cid}-seg.nii.gz"),
        }
        for cid in cases
    }
    listing["BraTS-GLI-00003-000"] = {"images": ["../raw/nothing-t1n.nii.gz"], "label": "x.nii"}
    (src / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "T1C", "2": "T2W", "3": "T2F"},
                "labels": {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4},
                "file_ending": ".nii.gz",
                "dataset": listing,
            }
        )
    )
    url = str(tmp_path / "s.zarr")
    report = ingest_folder(src, url, progress=False, foreground="ET", val_fraction=0.0)
    assert [f.line() for f in report.failed] == [
        f"case BraTS-GLI-00003-000: {src / 'x.nii'}: missing label file"
    ]
    store = VolumeStore.open(url)
    assert store.channel_names == ["T1", "T1C", "T2W", "T2F"]
    for cid, (chans, lab, aff) in cases.items():
        canon = nib.as_closest_canonical(nib.Nifti1Image(np.stack(chans, -1), aff))
        np.testing.assert_array_equal(
            store.image(cid)[:], np.asarray(canon.dataobj).transpose(3, 2, 1, 0)
        )
        want = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(lab, aff)).dataobj)
        np.testing.assert_array_equal(store.labels(cid)[:], (want == 3).transpose(2, 1, 0))
