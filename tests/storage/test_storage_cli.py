"""CLI verbs synth / ingest / corrupt / info, and synth_store with a tiny generator of our own."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from noisyseg.cli import main
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.phantoms import SEED_STRIDE, assign_splits, synth_store
from noisyseg.storage.store import VolumeStore

SHAPE = (12, 14, 16)
SPACING = (2.0, 1.0, 0.5)


@dataclass
class TinyCase:
    image: np.ndarray
    label: np.ndarray
    spacing: tuple
    channel_names: list
    affine: np.ndarray | None
    edges: list  # cube edge of each lesion, in placement order


def tiny_case(seed: int) -> TinyCase:
    """2-channel 3D phantom with 2-4 separated cubes of edge 1-3 (known lesion sizes)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    k = int(rng.integers(2, 5))
    slots = [(1, 1, 1), (1, 8, 9), (7, 1, 9), (7, 8, 1)]  # corners 6 voxels apart: never touch
    edges = []
    for z, y, x in slots[:k]:
        e = int(rng.integers(1, 4))
        label[z : z + e, y : y + e, x : x + e] = 1
        image[1, z : z + e, y : y + e, x : x + e] += 3.0
        edges.append(e)
    affine = np.diag([*SPACING, 1.0])  # maps (z, y, x, 1) like the phantom generators
    return TinyCase(image, label, SPACING, ["T1c", "FLAIR"], affine, edges)


def truth_digest(store: VolumeStore) -> str:
    h = hashlib.sha256()
    root = Path(store.root) / "cases"
    for path in sorted(root.glob("*/labels/truth/**/*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_assign_splits_counts():
    splits, clean = assign_splits(10, 3, test_fraction=0.2, val_fraction=0.1, clean_fraction=0.05)
    assert splits.count("test") == 2 and splits.count("val") == 1 and splits.count("train") == 7
    assert sum(clean) == 1 and all(splits[i] == "train" for i in range(10) if clean[i])
    assert assign_splits(10, 3, test_fraction=0.2, val_fraction=0.1, clean_fraction=0.05) == (
        splits,
        clean,
    )
    _, clean40 = assign_splits(20, 0, test_fraction=0.0, val_fraction=0.0, clean_fraction=0.4)
    assert sum(clean40) == 8
    with pytest.raises(NoisysegInputError, match="leave no training case"):
        assign_splits(4, 0, test_fraction=0.5, val_fraction=0.5, clean_fraction=0.0)
    with pytest.raises(NoisysegInputError, match=r"clean fraction must be in \[0, 1\]"):
        assign_splits(4, 0, test_fraction=0.0, val_fraction=0.0, clean_fraction=1.5)


def test_synth_store_deterministic_with_lesion_table(tmp_path):
    kw = {
        "kind": "brain-mets",
        "cases": 6,
        "seed": 7,
        "test_fraction": 0.2,
        "val_fraction": 0.0,
        "generator": tiny_case,
        "progress": False,
    }
    assert len(synth_store(str(tmp_path / "a.zarr"), **kw)) == 6
    synth_store(str(tmp_path / "b.zarr"), **kw)
    a = VolumeStore.open(str(tmp_path / "a.zarr"))
    b = VolumeStore.open(str(tmp_path / "b.zarr"))
    assert a.case_ids() == [f"brain-mets-{i:05d}" for i in range(6)]
    assert a.index().equals(b.index())
    idx = a.index().set_index("case_id")
    assert (idx["split"] == "test").sum() == 1 and idx["clean"].sum() == 1
    for i, cid in enumerate(a.case_ids()):
        ref = tiny_case(7 * SEED_STRIDE + i)  # case i uses seed S*100003+i
        np.testing.assert_array_equal(a.image(cid)[:], ref.image)
        np.testing.assert_array_equal(b.image(cid)[:], ref.image)
        assert idx.loc[cid, "n_lesions_truth"] == len(ref.edges)
        vox = a.lesion_table("truth").query("case_id == @cid")["voxels"]
        assert sorted(vox) == sorted(e**3 for e in ref.edges)
        # the phantom affine maps (z, y, x, 1); the store keeps it NIfTI-style, mapping (x, y, z, 1)
        stored = a.case_info(cid)["affine"]
        np.testing.assert_array_equal(stored @ [5, 4, 3, 1], ref.affine @ [3, 4, 5, 1])
        np.testing.assert_array_equal(stored @ [0, 0, 1, 1], [2.0, 0.0, 0.0, 1.0])
    other = tmp_path / "c.zarr"
    synth_store(str(other), **{**kw, "seed": 8})
    assert not np.array_equal(
        VolumeStore.open(str(other)).image("brain-mets-00000")[:], a.image("brain-mets-00000")[:]
    )


def test_synth_resume_and_parameter_mismatch(tmp_path):
    url = str(tmp_path / "s.zarr")
    kw = {
        "kind": "skin",
        "cases": 3,
        "seed": 1,
        "test_fraction": 0.0,
        "val_fraction": 0.0,
        "generator": tiny_case,
        "progress": False,
    }
    assert len(synth_store(url, **kw)) == 3
    assert synth_store(url, **kw) == []  # resumed: nothing left to do
    with pytest.raises(NoisysegInputError, match="other contents or synth parameters"):
        synth_store(url, **{**kw, "seed": 2})
    assert len(synth_store(url, **{**kw, "seed": 2, "overwrite": True})) == 3


def test_cli_synth_with_phantoms(tmp_path):
    phantoms = pytest.importorskip("noisyseg.storage.phantoms")
    if not hasattr(phantoms, "skin_case"):
        pytest.skip("phantoms.skin_case not available yet")
    url = str(tmp_path / "skin.zarr")
    rc = main(
        [
            "synth",
            url,
            "--kind",
            "skin",
            "--cases",
            "3",
            "--seed",
            "0",
            "--test-fraction",
            "0.34",
            "--no-progress",
        ]
    )
    assert rc == 0
    store = VolumeStore.open(url)
    assert (
        store.spatial_dims == 2
        and len(store.case_ids()) == 3
        and len(store.case_ids(split="test")) == 1
    )
    ref = phantoms.skin_case(0 * SEED_STRIDE + 1)
    np.testing.assert_array_equal(store.image("skin-00001")[:], ref.image)
    np.testing.assert_array_equal(store.labels("skin-00001")[:], ref.label)
    assert store.index()["n_lesions_truth"].tolist() == [1, 1, 1]


def _nifti_folder(root: Path, bad: bool) -> None:
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    # labels 0 and 1 listed: bad_case's 3 is a value the dataset does not list (multi-class
    # labels that dataset.json lists are ingested, issue 14)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    rng = np.random.default_rng(0)
    for cid in ("ok_1", "ok_2", "bad_case") if bad else ("ok_1", "ok_2"):
        nib.save(
            nib.Nifti1Image(rng.normal(size=(8, 9, 10)).astype(np.float32), np.eye(4)),
            str(root / "imagesTr" / f"{cid}_0000.nii.gz"),
        )
        lab = np.zeros((8, 9, 10), np.uint8)
        lab[2:4, 2:4, 2:4] = 3 if cid == "bad_case" else 1
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / f"{cid}.nii.gz"))


@pytest.mark.fault_case(12)
def test_cli_ingest_exit_codes_and_error_lines(tmp_path, capsys):
    _nifti_folder(tmp_path / "good", bad=False)
    assert main(["ingest", str(tmp_path / "good"), str(tmp_path / "g.zarr"), "--no-progress"]) == 0
    assert "ingested 2 case(s)" in capsys.readouterr().out
    _nifti_folder(tmp_path / "mixed", bad=True)
    # a failed case is bad input: exit status 2 (issue 13 item 12), the good cases ingested
    assert main(["ingest", str(tmp_path / "mixed"), str(tmp_path / "m.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (
        err[0].startswith("noisyseg ingest: error: case bad_case: ")
        and "labelsTr/bad_case.nii.gz" in err[0]
    )
    assert "label values 3 not listed in dataset.json labels (0 background, 1 lesion)" in err[0]
    assert VolumeStore.open(str(tmp_path / "m.zarr")).case_ids() == ["ok_1", "ok_2"]
    (tmp_path / "empty").mkdir()
    assert main(["ingest", str(tmp_path / "empty"), str(tmp_path / "e.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty folder" in err[0]


@pytest.fixture
def synth_url(tmp_path):
    url = str(tmp_path / "s.zarr")
    synth_store(
        url,
        kind="brain-mets",
        cases=8,
        seed=0,
        test_fraction=0.25,
        val_fraction=0.0,
        generator=tiny_case,
        progress=False,
    )
    return url


def test_cli_info_tables_and_statistics(synth_url, capsys):
    store = VolumeStore.open(synth_url, "r+")
    cid = store.case_ids()[0]
    recs = store.write_label_set(cid, "manual-1", store.labels(cid)[:])
    store.register_label_set("manual-1", {cid: recs}, {"mode": "copy", "seed": 3})
    assert main(["info", synth_url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases"] == 8 and summary["splits"] == {"train": 6, "val": 0, "test": 2}
    sizes = sorted(e**3 for i in range(8) for e in tiny_case(i).edges)  # seed 0: case seed = i
    truth = summary["label_sets"][0]
    assert truth["name"] == "truth" and truth["lesions"] == len(sizes) and truth["cases"] == 8
    np.testing.assert_allclose(
        truth["voxels_quantiles"], np.quantile(sizes, [0, 0.25, 0.5, 0.75, 1])
    )
    voxel_mm3 = math.prod(SPACING)
    np.testing.assert_allclose(truth["volume_mm3_quantiles"][-1], max(sizes) * voxel_mm3)
    manual = summary["label_sets"][1]
    assert (
        manual["name"] == "manual-1"
        and manual["params"] == {"mode": "copy", "seed": 3}
        and manual["cases"] == 1
    )
    assert main(["info", synth_url, "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert cid in out and "manual-1" in out and "5 more case(s)" in out and "mode=copy" in out


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--mode", "random", "--rate", "1.5"], "rate must be in [0, 1]"),
        (["--mode", "random", "--rate", "0.5", "--from", "nope"], "label set 'nope' missing"),
        (["--mode", "random", "--rate", "0.5", "--name", "truth"], "never overwritten"),
        (["--mode", "random", "--rate", "0.5", "--name", "../x"], "unsafe label set name"),
    ],
)
def test_cli_corrupt_rejects_bad_input_before_work(synth_url, capsys, argv, expect):
    digest = truth_digest(VolumeStore.open(synth_url))
    assert main(["corrupt", synth_url, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    store = VolumeStore.open(synth_url)
    assert store.label_sets() == ["truth"] and truth_digest(store) == digest


def test_cli_corrupt_missing_store(tmp_path, capsys):
    assert main(["corrupt", str(tmp_path / "nope.zarr"), "--mode", "random", "--rate", "0.5"]) == 2
    assert "missing store" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.zarr: no noisyseg store here (missing store)" in err[0]


@pytest.mark.parametrize("mode", ["random", "size"])
def test_cli_corrupt_censoring_counts_and_truth_untouched(synth_url, capsys, mode):
    corrupt = pytest.importorskip("noisyseg.storage.corrupt")
    if not hasattr(corrupt, "corrupt_store"):
        pytest.skip("corrupt_store not available yet")
    store = VolumeStore.open(synth_url)
    digest = truth_digest(store)
    train = store.case_ids(split="train")
    truth = store.lesion_table("truth").query("case_id in @train")
    k = len(truth)
    rc = main(
        [
            "corrupt",
            synth_url,
            "--from",
            "truth",
            "--name",
            f"c-{mode}",
            "--mode",
            mode,
            "--rate",
            "0.5",
            "--seed",
            "0",
            "--scheduler",
            "synchronous",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    store = VolumeStore.open(synth_url)
    assert store.label_sets() == ["truth", f"c-{mode}"] and truth_digest(store) == digest
    t = store.lesion_table(f"c-{mode}")
    removed = t[t["status"] == "removed"]
    assert len(removed) == math.floor(0.5 * k + 0.5)  # round(0.5 K), half up
    kept = t[t["status"] != "removed"]
    if mode == "size":
        assert removed["volume_mm3"].max() <= kept["volume_mm3"].min()
    # the written arrays agree with the table: voxels left = kept lesion voxels
    total = sum(int(store.labels(c, f"c-{mode}")[:].sum()) for c in train)
    assert total == int(kept["voxels"].sum())
    info = store.label_set_info(f"c-{mode}")["params"]
    assert info["mode"] == mode and info["rate"] == 0.5 and info["seed"] == 0
