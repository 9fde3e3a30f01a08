"""Ingest of nnU-Net/MSD NIfTI folders and 2D image+mask folders; bad input; kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.ingest import ingest_folder
from noisyseg.storage.store import VolumeStore

ZOOMS = (0.5, 1.25, 3.0)  # NIfTI x, y, z (mm)
SHAPE_XYZ = (24, 20, 16)
REPO = Path(__file__).resolve().parents[2]
NOISYSEG = REPO / ".venv" / "bin" / "noisyseg"


def write_nifti(
    path: Path, data: np.ndarray, zooms=ZOOMS, affine: np.ndarray | None = None
) -> None:
    if affine is None:
        affine = np.diag([*zooms[:3], 1.0])
        affine[:3, 3] = [-12.0, 7.5, 30.0]
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(zooms))
    nib.save(img, str(path))


def make_case(rng: np.random.Generator, n_channels: int = 2):
    """Image channels (x, y, z) float32 and a binary label (x, y, z) uint8."""
    chans = [
        rng.normal(100.0 * (c + 1), 20.0, size=SHAPE_XYZ).astype(np.float32)
        for c in range(n_channels)
    ]
    label = np.zeros(SHAPE_XYZ, np.uint8)
    x, y, z = rng.integers(2, 10, size=3)
    label[x : x + 4, y : y + 3, z : z + 2] = 1
    return chans, label


def make_msd(root: Path, case_ids, seed: int = 0, test_ids=()) -> dict:
    """nnU-Net-style folder; returns {case_id: (channels, label)} in NIfTI (x, y, z) order."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1c", "1": "FLAIR"},
                "labels": {"background": 0, "lesion": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    cases = {}
    for split_dir, lab_dir, ids in (
        ("imagesTr", "labelsTr", case_ids),
        ("imagesTs", "labelsTs", test_ids),
    ):
        if ids:
            (root / split_dir).mkdir(exist_ok=True)
            (root / lab_dir).mkdir(exist_ok=True)
        for cid in ids:
            chans, label = make_case(rng)
            for c, vol in enumerate(chans):
                write_nifti(root / split_dir / f"{cid}_{c:04d}.nii.gz", vol)
            write_nifti(root / lab_dir / f"{cid}.nii.gz", label)
            cases[cid] = (chans, label)
    return cases


def assert_case_exact(store: VolumeStore, cid: str, chans, label) -> None:
    img = store.image(cid)[:]
    assert img.shape == (len(chans), *SHAPE_XYZ[::-1])
    for c, vol in enumerate(chans):
        # store (z, y, x) voxel [k, j, i] is NIfTI voxel (i, j, k)
        np.testing.assert_array_equal(img[c], vol.transpose(2, 1, 0))
        assert img[c, 3, 5, 7] == vol[7, 5, 3]
    np.testing.assert_array_equal(store.labels(cid)[:], label.transpose(2, 1, 0))


def test_ingest_msd_roundtrip_and_ome_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    src = tmp_path / "Dataset001"
    cases = make_msd(src, ["brain_001", "brain_002", "brain_003"], test_ids=["brain_101"])
    url = str(tmp_path / "store.zarr")
    # val_fraction=0: every labelsTr case stays train (labelsTs gives the test split)
    report = ingest_folder(src, url, progress=False, val_fraction=0.0)
    assert report.ok and report.layout == "nnunet"
    assert sorted(report.written) == ["brain_001", "brain_002", "brain_003", "brain_101"]
    store = VolumeStore.open(url)
    assert store.channel_names == ["T1c", "FLAIR"] and store.spatial_dims == 3
    assert store.case_ids(split="test") == ["brain_101"]
    assert store.case_ids(split="train") == ["brain_001", "brain_002", "brain_003"]
    for cid, (chans, label) in cases.items():
        assert_case_exact(store, cid, chans, label)
        assert store.spacing(cid) == (3.0, 1.25, 0.5)
    aff = store.case_info("brain_002")["affine"]
    np.testing.assert_array_equal(
        aff, nib.load(str(src / "imagesTr" / "brain_002_0000.nii.gz")).affine
    )
    assert store.index()["n_lesions_truth"].tolist() == [1, 1, 1, 1]
    assert set(store.lesion_table("truth")["voxels"]) == {24}
    nodes = list(Reader(parse_url(os.path.join(store.root, "cases", "brain_001")))())
    md = nodes[0].metadata
    assert [(a["name"], a["type"]) for a in md["axes"]] == [
        ("c", "channel"),
        ("z", "space"),
        ("y", "space"),
        ("x", "space"),
    ]
    assert md["coordinateTransformations"][0][0]["scale"] == [1.0, 3.0, 1.25, 0.5]
    # a second run has nothing to do
    again = ingest_folder(src, url, progress=False, val_fraction=0.0)
    assert again.written == [] and len(again.skipped) == 4 and again.ok


def test_ingest_msd_single_4d_file(tmp_path):
    src = tmp_path / "Task01"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    (src / "dataset.json").write_text(
        json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd"}})
    )
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 1000, size=(*SHAPE_XYZ, 3)).astype(np.int16)
    write_nifti(src / "imagesTr" / "BRATS_001.nii.gz", vol, zooms=(*ZOOMS, 1.0))
    _, label = make_case(rng)
    write_nifti(src / "labelsTr" / "BRATS_001.nii.gz", label)
    report = ingest_folder(src, str(tmp_path / "s.zarr"), progress=False)
    assert report.ok, [f.line() for f in report.failed]
    store = VolumeStore.open(str(tmp_path / "s.zarr"))
    assert store.channel_names == ["FLAIR", "T1w", "T1gd"]
    np.testing.assert_array_equal(
        store.image("BRATS_001")[:], vol.transpose(3, 2, 1, 0).astype(np.float32)
    )


def make_2d(root: Path, ids, seed: int = 0, isic: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    out = {}
    for cid in ids:
        rgb = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        mask = np.zeros((30, 40), np.uint8)
        mask[5:15, 10:25] = 255
        Image.fromarray(rgb).save(root / "images" / f"{cid}.png")
        name = f"{cid}_segmentation.png" if isic else f"{cid}.png"
        Image.fromarray(mask).save(root / "masks" / name)
        out[cid] = (rgb, mask)
    return out


def test_ingest_2d_png_roundtrip_and_ome_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    src = tmp_path / "isic"
    cases = make_2d(src, ["ISIC_0000000", "ISIC_0000001"])
    url = str(tmp_path / "skin.zarr")
    report = ingest_folder(src, url, progress=False)
    assert report.ok and report.layout == "2d"
    store = VolumeStore.open(url)
    assert store.spatial_dims == 2 and store.channel_names == ["R", "G", "B"]
    for cid, (rgb, mask) in cases.items():
        img = store.image(cid)[:]
        assert img.shape == (3, 30, 40)
        np.testing.assert_array_equal(img, rgb.transpose(2, 0, 1).astype(np.float32))
        np.testing.assert_array_equal(store.labels(cid)[:], (mask == 255).astype(np.uint8))
    assert store.lesion_table("truth")["voxels"].tolist() == [150, 150]
    md = next(iter(Reader(parse_url(os.path.join(store.root, "cases", "ISIC_0000001")))())).metadata
    assert [a["name"] for a in md["axes"]] == ["c", "y", "x"]
    assert md["coordinateTransformations"][0][0]["scale"] == [1.0, 1.0, 1.0]


# ---- bad input: one failing case, the others intact -------------------------------------------

GOOD = ["good_a", "good_b"]


def _break(src: Path, rule: str) -> str:
    """Add one bad case to an MSD folder; returns its case id."""
    rng = np.random.default_rng(99)
    chans, label = make_case(rng)
    img_dir, lab_dir = src / "imagesTr", src / "labelsTr"
    cid = "bad_case"

    def write_all(chans=chans, label=label, cid=cid, label_zooms=ZOOMS):
        for c, vol in enumerate(chans):
            write_nifti(img_dir / f"{cid}_{c:04d}.nii.gz", vol)
        if label is not None:
            write_nifti(lab_dir / f"{cid}.nii.gz", label, zooms=label_zooms)

    if rule == "shape":
        write_all(label=label[:, :, :-1])
    elif rule == "spacing":
        write_all(label_zooms=(0.5, 1.25, 2.0))
    elif rule == "nonbinary":
        label = label.copy()
        label[0, 0, 0] = 2
        write_all(label=label)
    elif rule == "nan":
        chans = [chans[0].copy(), chans[1]]
        chans[0][3, 4, 5] = np.nan
        write_all(chans=chans)
    elif rule == "inf":
        chans = [chans[0], chans[1].copy()]
        chans[1][3, 4, 5] = np.inf
        write_all(chans=chans)
    elif rule == "truncated":
        write_all()
        path = img_dir / f"{cid}_0001.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif rule == "empty":
        write_all()
        (lab_dir / f"{cid}.nii.gz").write_bytes(b"")
    elif rule == "missing_label":
        write_all(label=None)
    elif rule == "duplicate":
        cid = "good_a"  # a second source for an existing id: .nii next to .nii.gz
        write_nifti(img_dir / "good_a_0000.nii", chans[0])
    elif rule == "dotdot":
        cid = "bad..case"
        write_all(cid=cid)
    elif rule == "slash":
        (img_dir / "sub").mkdir()
        cid = "sub/case9"
        for c, vol in enumerate(chans):
            write_nifti(img_dir / "sub" / f"case9_{c:04d}.nii.gz", vol)
    return cid


@pytest.mark.parametrize(
    "rule, expect",
    [
        ("shape", "does not match image shape"),
        ("spacing", "spacing mismatch"),
        # dataset.json lists labels 0 and 1: a 2 is a value it does not list
        ("nonbinary", "label values 2 not listed in dataset.json labels (0 background, 1 lesion)"),
        ("nan", "non-finite voxels (NaN: 1"),
        ("inf", "non-finite voxels (NaN: 0, Inf: 1)"),
        ("truncated", "truncated or unreadable NIfTI"),
        ("empty", "empty file"),
        ("missing_label", "missing label file"),
        ("duplicate", "duplicate case id"),
        ("dotdot", "unsafe case id"),
        ("slash", "unsafe case id"),
    ],
)
def test_bad_case_reported_others_intact(tmp_path, rule, expect):
    src = tmp_path / "src"
    good = make_msd(src, GOOD)
    bad = _break(src, rule)
    url = str(tmp_path / "s.zarr")
    report = ingest_folder(src, url, progress=False)
    assert not report.ok
    lines = [f.line() for f in report.failed]
    bad_lines = [ln for ln in lines if ln.startswith(f"case {bad}: ")]
    assert bad_lines and all(expect in ln for ln in bad_lines), lines
    assert "\n" not in bad_lines[0]
    store = VolumeStore.open(url)
    intact = [g for g in GOOD if g != bad]  # a duplicated id is refused in all its copies
    assert store.case_ids() == intact
    for cid in intact:
        assert_case_exact(store, cid, *good[cid])
    if rule not in ("duplicate", "slash", "missing_label"):
        assert any(str(src) in (f.path or "") for f in report.failed)


def test_bad_2d_mask_and_duplicate(tmp_path):
    src = tmp_path / "isic"
    cases = make_2d(src, ["ok_1", "ok_2"], isic=False)
    mask = np.zeros((30, 40), np.uint8)
    mask[2:4, 2:4] = 128
    mask[5:6, 5:6] = 255
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(src / "images" / "grey_mask.png")
    Image.fromarray(mask).save(src / "masks" / "grey_mask.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(
        src / "images" / "ok_2.jpg"
    )  # duplicate id
    report = ingest_folder(src, str(tmp_path / "s.zarr"), progress=False)
    lines = sorted(f.line() for f in report.failed)
    assert any(
        ln.startswith("case grey_mask: ") and "mask is not binary (values 0, 128, 255" in ln
        for ln in lines
    )
    assert sum(ln.startswith("case ok_2: ") and "duplicate case id" in ln for ln in lines) == 2
    store = VolumeStore.open(str(tmp_path / "s.zarr"))
    assert store.case_ids() == ["ok_1"]
    np.testing.assert_array_equal(store.image("ok_1")[:], cases["ok_1"][0].transpose(2, 0, 1))


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoisysegInputError, match="empty folder") as err:
        ingest_folder(tmp_path / "empty", str(tmp_path / "s.zarr"), progress=False)
    assert str(tmp_path / "empty") in str(err.value)
    (tmp_path / "empty" / "imagesTr").mkdir()
    (tmp_path / "empty" / "dataset.json").write_text("{}")
    with pytest.raises(NoisysegInputError, match="empty folder"):
        ingest_folder(tmp_path / "empty", str(tmp_path / "s.zarr"), progress=False)
    with pytest.raises(NoisysegInputError, match="does not exist"):
        ingest_folder(tmp_path / "nope", str(tmp_path / "s.zarr"), progress=False)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.integration
def test_sigkill_midway_then_rerun_completes(tmp_path):
    ids = [f"case_{i:02d}" for i in range(6)]
    src = tmp_path / "src"
    cases = make_msd(src, ids, seed=5)
    url = str(tmp_path / "s.zarr")
    # slow down each case, and pause each one between its arrays and its commit
    env = {
        **os.environ,
        "NOISYSEG_TEST_SLOW_INGEST": "0.2",
        "NOISYSEG_TEST_PAUSE_BEFORE_COMMIT": "0.5",
    }
    proc = subprocess.Popen(
        [str(NOISYSEG), "ingest", str(src), url, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    journal = Path(url) / "index" / "journal"
    staging = Path(url) / ".staging"

    def n_committed() -> int:
        return len([p for p in journal.iterdir() if p.suffix == ".json"]) if journal.is_dir() else 0

    def staged() -> list[str]:
        return (
            [p.name for p in staging.iterdir() if p.name != "zarr.json"] if staging.is_dir() else []
        )

    deadline = time.monotonic() + 90
    try:
        # kill once 2 cases are committed and the 3rd is written but not committed
        while time.monotonic() < deadline:
            if n_committed() >= 2 and staged():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        else:
            pytest.fail("ingest made no progress")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert staged(), "the kill should land with a case half-written in staging"
    store = VolumeStore.open(url)
    partial = store.case_ids()
    assert 2 <= len(partial) < len(ids)
    for cid in partial:  # whatever is visible is complete and exact
        assert_case_exact(store, cid, *cases[cid])
    rerun = subprocess.run(
        [str(NOISYSEG), "ingest", str(src), url, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {len(partial)} already in store" in rerun.stdout
    store = VolumeStore.open(url)
    assert store.case_ids() == ids
    for cid in ids:
        assert_case_exact(store, cid, *cases[cid])
    assert store.index()["n_lesions_truth"].tolist() == [1] * len(ids)
    assert len(store.lesion_table("truth")) == len(ids)
    assert staged() == []
    assert sorted(p.name for p in (Path(url) / "cases").iterdir() if p.is_dir()) == ids
