"""Atomic replacement (issue 13): label sets switched by one registry write, interrupted
overwrites invisible and cleaned up, publish/recover of directories, whole-store replacement,
predictions refused without overwrite and recorded with their provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.atomic import publish_dir, recover_dir, replace_store
from noisyseg.storage.corrupt import corrupt_store
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.verify import verify_store

SHAPE = (16, 20, 24)
SPACING = (1.0, 1.0, 2.0)


def _truth(seed: int) -> np.ndarray:
    """Four separated boxes of distinct sizes (26-connected components: exactly 4)."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[6:9, 2:5, 3:7] = 1
    lab[1:5, 12:17, 2:4] = 1
    lab[10:14, 10:12, 14 + seed % 3 : 20] = 1
    return lab


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = str(tmp_path / "a.zarr")
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
        st.write_case(f"c{i}", image, {"truth": _truth(i)}, spacing=SPACING)
    st.compact()
    return url


def consistent(url: str, name: str) -> None:
    """The registered set's masks, lesion table and index counts describe the same lesions."""
    st = VolumeStore.open(url)
    table = st.lesion_table(name)
    index = st.index().set_index("case_id")
    entry = st.label_set_info(name)
    for cid in entry.get("counts", {}):
        mask = np.asarray(st.labels(cid, name)[...])
        comp, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
        sizes = sorted(np.bincount(comp.ravel())[1:].tolist())
        rows = table[(table["case_id"] == cid) & (table["status"] != "removed")]
        assert sorted(rows["voxels"].astype(int).tolist()) == sizes, cid
        assert entry["counts"][cid] == n == index.loc[cid, f"n_lesions_{name}"], cid


def _groups(url: str, cid: str) -> list[str]:
    return sorted(os.listdir(Path(url, "cases", cid, "labels")))


@pytest.mark.fault_case(2)
def test_overwrite_switches_versions_and_removes_the_old(store_url: str) -> None:
    first = corrupt_store(store_url, mode="random", rate=0.5, seed=1, name="n", progress=False)
    st = VolumeStore.open(store_url)
    v1 = st.label_set_info("n")["version"]
    assert _groups(store_url, "c0") == ["n~" + v1, "truth", "zarr.json"]
    consistent(store_url, "n")
    with pytest.raises(NoisysegInputError, match="already exists"):
        corrupt_store(store_url, mode="random", rate=0.5, seed=2, name="n", progress=False)
    second = corrupt_store(
        store_url, mode="random", rate=0.75, seed=2, name="n", overwrite=True, progress=False
    )
    v2 = VolumeStore.open(store_url).label_set_info("n")["version"]
    assert v2 != v1
    assert _groups(store_url, "c0") == ["n~" + v2, "truth", "zarr.json"]
    assert sorted(os.listdir(Path(store_url, "index/lesions"))) == [
        "n~" + v2 + ".parquet",
        "truth.parquet",
    ]
    labels_doc = json.loads(Path(store_url, "cases/c0/labels/zarr.json").read_text())
    assert labels_doc["attributes"]["ome"]["labels"] == ["truth", "n~" + v2]
    consistent(store_url, "n")
    assert first.lesions_removed == 8 and second.lesions_removed == 12  # 16 lesions in 4 cases
    assert VolumeStore.open(store_url).label_set_info("n")["params"]["rate"] == 0.75
    assert VolumeStore.open(store_url).case_label_sets("c0") == ["truth", "n"]
    assert verify_store(store_url).ok


@pytest.mark.fault_case(2)
def test_interrupted_overwrite_is_invisible_and_cleaned(store_url: str) -> None:
    """A kill after some cases of the new version were written (and after its lesion table was
    written, before the registry switch): readers still see the complete old set."""
    corrupt_store(store_url, mode="random", rate=0.5, seed=1, name="n", progress=False)
    st = VolumeStore.open(store_url, "r+")
    old_masks = {cid: np.asarray(st.labels(cid, "n")[...]) for cid in st.case_ids()}
    old_table = st.lesion_table("n")
    # the new version's tasks ran for two cases, then the process died
    orphan = st.new_label_version()
    for cid in ("c0", "c1"):
        st.write_label_set(cid, "n", np.zeros(SHAPE, np.uint8), version=orphan)
    Path(store_url, f"index/lesions/n~{orphan}.parquet").write_bytes(b"partial")
    Path(store_url, "cases/c2/labels/.tmp-n~" + orphan + "-0123456789ab").mkdir()
    ro = VolumeStore.open(store_url)
    for cid, mask in old_masks.items():
        np.testing.assert_array_equal(ro.labels(cid, "n")[...], mask)
    assert ro.lesion_table("n").equals(old_table)
    consistent(store_url, "n")
    assert verify_store(store_url).ok  # orphans are complete arrays, not damage
    # the next run (or an explicit cleanup) removes every leftover
    assert st.cleanup_label_versions("n") == 3
    v1 = st.label_set_info("n")["version"]
    for cid in old_masks:
        assert _groups(store_url, cid) == ["n~" + v1, "truth", "zarr.json"]
    assert not Path(store_url, f"index/lesions/n~{orphan}.parquet").exists()
    consistent(store_url, "n")


def test_unregistered_set_never_appears(store_url: str) -> None:
    st = VolumeStore.open(store_url, "r+")
    version = st.new_label_version()
    st.write_label_set("c0", "fresh", _truth(0), version=version)
    assert "fresh" not in st.label_sets()
    with pytest.raises(NoisysegInputError, match="label set 'fresh' missing"):
        st.labels("c0", "fresh")
    assert st.case_label_sets("c0") == ["truth"]
    assert "n_lesions_fresh" not in st.index().columns


@pytest.mark.fault_case(3)
def test_publish_dir_and_recover_after_a_kill_between_renames(tmp_path: Path) -> None:
    final, staged = tmp_path / "g", tmp_path / "staged"
    final.mkdir()
    (final / "x").write_text("old")
    staged.mkdir()
    (staged / "x").write_text("new")
    publish_dir(str(staged), str(final))
    assert (final / "x").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["g"]
    # killed after the old one was moved aside, before the new one was renamed in
    os.rename(final, tmp_path / ".old-g-0123456789ab")
    recover_dir(str(final))
    assert (final / "x").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["g"]


@pytest.mark.fault_case(3)
def test_replace_store_swaps_at_the_end_or_leaves_the_old(store_url: str, tmp_path: Path) -> None:
    def build_new(url: str, fail_after: int | None = None) -> str:
        st = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
        for i in range(3):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("disk gone")
            image = np.full((1, *SHAPE), float(i), np.float32)
            st.write_case(f"new{i}", image, {"truth": _truth(i)}, spacing=SPACING)
        st.compact()
        return url

    with pytest.raises(RuntimeError, match="disk gone"):
        replace_store(store_url, lambda staged: build_new(staged, fail_after=2))
    assert VolumeStore.open(store_url).case_ids() == ["c0", "c1", "c2", "c3"]
    assert sorted(os.listdir(tmp_path)) == ["a.zarr"]  # staging copy removed
    # a killed build leaves a staging copy: the next replacement removes it first
    leftover = tmp_path / ".tmp-a.zarr-0123456789ab"
    leftover.mkdir()
    staged_url = replace_store(store_url, build_new)
    assert Path(staged_url).name.startswith(".tmp-a.zarr-") and not Path(staged_url).exists()
    st = VolumeStore.open(store_url)
    assert st.case_ids() == ["new0", "new1", "new2"]
    np.testing.assert_array_equal(st.image("new2")[...], np.full((1, *SHAPE), 2.0, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["a.zarr"]
    assert verify_store(store_url).ok


def test_replace_store_refuses_object_stores() -> None:
    with pytest.raises(NotImplementedError, match="object stores have no rename"):
        replace_store("memory://bucket/x.zarr", lambda staged: None)


def test_synth_overwrite_rebuilds_beside(tmp_path: Path) -> None:
    from noisyseg.storage.phantoms import synth_store

    def tiny(case_seed: int):
        class Case:
            image = np.full((3, 8, 8), case_seed % 7, np.float32)
            label = np.eye(8, dtype=np.uint8)
            spacing = (1.0, 1.0)
            channel_names = ["r", "g", "b"]
            affine = None

        return Case()

    url = str(tmp_path / "syn.zarr")
    kw = {"kind": "skin", "test_fraction": 0.0, "val_fraction": 0.0, "clean_fraction": 0.0}
    assert len(synth_store(url, cases=3, seed=0, generator=tiny, progress=False, **kw)) == 3
    with pytest.raises(NoisysegInputError, match="other contents or synth parameters"):
        synth_store(url, cases=2, seed=5, generator=tiny, progress=False, **kw)
    written = synth_store(
        url, cases=2, seed=5, generator=tiny, overwrite=True, progress=False, **kw
    )
    st = VolumeStore.open(url)
    assert written == st.case_ids() == ["skin-00000", "skin-00001"]
    assert float(st.image("skin-00001")[0, 0, 0]) == float((5 * 100003 + 1) % 7)
    assert sorted(os.listdir(tmp_path)) == ["syn.zarr"]


@pytest.mark.fault_case(4)
def test_prediction_refused_without_overwrite_and_provenance_kept(store_url: str) -> None:
    st = VolumeStore.open(store_url, "r+")
    prob = np.linspace(0, 1, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    meta = {"run_id": "abc123", "model": "runs:/abc123/model", "threshold": 0.35}
    st.write_prediction("c0", "p", prob, metadata=meta)
    doc = json.loads(Path(store_url, "cases/c0/predictions/p/zarr.json").read_text())
    assert doc["attributes"]["noisyseg"] == {"kind": "probability", "case_id": "c0", **meta}
    with pytest.raises(NoisysegInputError, match=r"prediction 'p' already exists .*--overwrite"):
        st.write_prediction("c0", "p", prob * 0, metadata={"run_id": "other"})
    np.testing.assert_array_equal(st.prediction("c0", "p")[...], prob)
    st.write_prediction("c0", "p", prob * 0, overwrite=True, metadata={"run_id": "other"})
    doc = json.loads(Path(store_url, "cases/c0/predictions/p/zarr.json").read_text())
    assert doc["attributes"]["noisyseg"]["run_id"] == "other"
    assert float(np.asarray(st.prediction("c0", "p")[...]).max()) == 0.0
    assert sorted(os.listdir(Path(store_url, "cases/c0/predictions"))) == ["p", "zarr.json"]
