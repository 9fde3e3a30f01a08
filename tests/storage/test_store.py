"""VolumeStore: layout (OME-Zarr 0.5), index, lesion table, label sets, atomicity, validation."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import lesion_table_rows
from noisyseg.storage.layout import chunk_shape
from noisyseg.storage.store import VolumeStore

SPACING3 = (3.0, 1.25, 0.5)  # z, y, x (mm)


def _case3(seed: int = 0, shape=(16, 20, 24)):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    if min(shape) < 12:
        label[1, 1, 1] = 1
        return image, label
    label[2:5, 3:6, 4:7] = 1  # 27 voxels
    label[10, 10, 10] = 1  # 1 voxel
    label[11, 11, 11] = 1  # touches the previous one by a corner: same lesion under 26-conn.
    return image, label


@pytest.fixture
def store(tmp_path):
    return VolumeStore.create(
        str(tmp_path / "s.zarr"), spatial_dims=3, channel_names=["t1", "flair"]
    )


def test_chunk_shape_hand_values():
    assert chunk_shape((256, 256, 256), 4) == (64, 64, 64)  # 1 MiB float32
    assert chunk_shape((256, 256, 256), 1) == (64, 128, 128)  # 1 MiB uint8
    assert chunk_shape((600, 800), 4) == (512, 512)
    # thin axis clipped, the budget goes to the others, still <= 1 MiB
    c = chunk_shape((20, 300, 300), 4)
    assert c[0] == 20 and np.prod(c) * 4 <= 1 << 20 and np.prod(c) * 4 > (1 << 20) // 2


def test_open_missing_store_and_refuse_foreign_dir(tmp_path):
    with pytest.raises(NoisysegInputError, match="missing store"):
        VolumeStore.open(str(tmp_path / "nope.zarr"))
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(NoisysegInputError, match="not a noisyseg store"):
        VolumeStore.create(str(foreign), spatial_dims=3, channel_names=["a"], overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_create_twice_needs_overwrite(tmp_path):
    url = str(tmp_path / "s.zarr")
    s = VolumeStore.create(url, spatial_dims=3, channel_names=["a"])
    img, lab = _case3(shape=(4, 5, 6))
    s.write_case("c0", img[:1], {"truth": lab * 0}, spacing=(1, 1, 1))
    with pytest.raises(NoisysegInputError, match="already exists"):
        VolumeStore.create(url, spatial_dims=3, channel_names=["a"])
    s2 = VolumeStore.create(url, spatial_dims=3, channel_names=["a"], overwrite=True)
    assert s2.case_ids() == []


def test_roundtrip_lazy_arrays_and_metadata(store):
    image, label = _case3()
    affine = np.diag([0.5, 1.25, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.5]
    store.write_case(
        "case-1", image, {"truth": label}, spacing=SPACING3, affine=affine, source="x.nii.gz"
    )
    arr = store.image("case-1")
    assert isinstance(arr, zarr.Array) and arr.shape == (2, 16, 20, 24) and arr.dtype == np.float32
    assert arr.chunks == (1, 16, 20, 24)  # clipped ~1 MiB chunk
    np.testing.assert_array_equal(arr[:], image)
    np.testing.assert_array_equal(arr[1, 2:5, 3:9, 0:4], image[1, 2:5, 3:9, 0:4])
    lab = store.labels("case-1")
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab[:], label)
    assert store.spacing("case-1") == SPACING3
    info = store.case_info("case-1")
    np.testing.assert_array_equal(info["affine"], affine)
    assert info["shape"] == (16, 20, 24) and info["split"] == "train" and info["clean"] is False
    assert info["label_sets"] == ["truth"] and info["source"] == "x.nii.gz"
    # OME-Zarr 0.5 metadata as written on disk
    doc = json.loads(Path(store.root, "cases", "case-1", "zarr.json").read_text())
    ome = doc["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, *SPACING3]
    lab_doc = json.loads(Path(store.root, "cases", "case-1", "labels", "zarr.json").read_text())
    assert lab_doc["attributes"]["ome"]["labels"] == ["truth"]


def test_ome_zarr_reader_sees_axes_spacing_and_labels(store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image, label = _case3()
    store.write_case("c1", image, {"truth": label}, spacing=SPACING3)
    nodes = list(Reader(parse_url(os.path.join(store.root, "cases", "c1")))())
    img_node = nodes[0]
    assert [a["name"] for a in img_node.metadata["axes"]] == ["c", "z", "y", "x"]
    assert img_node.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, *SPACING3]
    np.testing.assert_array_equal(np.asarray(img_node.data[0]), image)
    label_nodes = [n for n in nodes if n.zarr.path.rstrip("/").endswith("labels/truth")]
    assert label_nodes, [str(n.zarr) for n in nodes]
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), label)


def test_lesion_table_hand_computed(store):
    image, label = _case3()
    store.write_case("c1", image, {"truth": label}, spacing=SPACING3)
    t = store.lesion_table("truth")
    # two lesions: the 3x3x3 cube and the corner-touching pair (26-connectivity)
    assert list(t["voxels"]) == [27, 2]
    voxel_mm3 = 3.0 * 1.25 * 0.5
    np.testing.assert_allclose(t["volume_mm3"], [27 * voxel_mm3, 2 * voxel_mm3])
    cube = t.iloc[0]
    assert (cube.centroid_z, cube.centroid_y, cube.centroid_x) == (3.0, 4.0, 5.0)
    assert (cube.bbox_min_z, cube.bbox_max_z, cube.bbox_min_x, cube.bbox_max_x) == (2, 5, 4, 7)
    pair = t.iloc[1]
    assert (pair.centroid_z, pair.centroid_y) == (10.5, 10.5)
    assert set(t["status"]) == {"present"} and set(t["case_id"]) == {"c1"}
    assert store.index().loc[0, "n_lesions_truth"] == 2
    # 6-connectivity splits the pair: 3 lesions
    assert len(lesion_table_rows(label, SPACING3, connectivity=6)) == 3


def test_lesion_records_2d_eight_connectivity():
    lab = np.zeros((6, 6), np.uint8)
    lab[0, 0] = lab[1, 1] = 1  # diagonal: one lesion in 8-connectivity
    lab[4:6, 4:6] = 1
    recs = lesion_table_rows(lab, (0.5, 0.5))
    assert [r["voxels"] for r in recs] == [2, 4]
    assert recs[1]["volume_mm3"] == pytest.approx(1.0)
    assert "centroid_z" not in recs[0]


@pytest.mark.parametrize(
    "bad, rule",
    [
        ("nan", "non-finite voxels"),
        ("nonbinary", "not binary"),
        ("shape", "does not match image shape"),
        ("channels", "channels"),
        ("notruth", "must include the 'truth'"),
        ("spacing", "spacing"),
        ("id", "unsafe case id"),
    ],
)
def test_write_case_validation_names_case_and_rule(store, bad, rule):
    image, label = _case3()
    store.write_case("good", image, {"truth": label}, spacing=SPACING3)
    kw = {
        "case_id": "bad-1",
        "image": image.copy(),
        "labels": {"truth": label.copy()},
        "spacing": SPACING3,
    }
    if bad == "nan":
        kw["image"][0, 1, 2, 3] = np.nan
    elif bad == "nonbinary":
        kw["labels"]["truth"][0, 0, 0] = 2
    elif bad == "shape":
        kw["labels"]["truth"] = label[:-1]
    elif bad == "channels":
        kw["image"] = image[:1]
    elif bad == "notruth":
        kw["labels"] = {"other": label}
    elif bad == "spacing":
        kw["spacing"] = (1.0, -1.0, 1.0)
    elif bad == "id":
        kw["case_id"] = "../evil"
    with pytest.raises(NoisysegInputError) as err:
        store.write_case(**kw)
    assert f"case {kw['case_id']}" in str(err.value) and rule in str(err.value)
    assert store.case_ids() == ["good"]
    np.testing.assert_array_equal(store.image("good")[:], image)
    assert not os.path.exists(os.path.join(store.root, "cases", "bad-1"))


def test_duplicate_case_id_refused_unless_overwrite(store):
    image, label = _case3()
    store.write_case("c1", image, {"truth": label}, spacing=SPACING3)
    with pytest.raises(NoisysegInputError, match="case c1: .*duplicate case id"):
        store.write_case("c1", image * 2, {"truth": label}, spacing=SPACING3)
    np.testing.assert_array_equal(store.image("c1")[:], image)
    store.write_case("c1", image * 2, {"truth": label}, spacing=SPACING3, overwrite=True)
    np.testing.assert_array_equal(store.image("c1")[:], image * 2)


def test_interrupted_write_is_invisible_and_rewritable(store):
    image, label = _case3()
    store.write_case("c1", image, {"truth": label}, spacing=SPACING3)
    store.compact()
    # Crash state 1: arrays in place but the index entry (commit point) never written.
    store.write_case("c2", image, {"truth": label}, spacing=SPACING3)
    os.remove(os.path.join(store.root, "index", "journal", "c2.json"))
    # Crash state 2: a half-written staging directory.
    staging = os.path.join(store.root, ".staging", f"c3-{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    Path(staging, "zarr.json").write_text("{")
    reopened = VolumeStore.open(store.url, "r+")
    assert reopened.case_ids() == ["c1"] and not reopened.has_case("c2")
    assert len(reopened.index()) == 1 and set(reopened.lesion_table()["case_id"]) == {"c1"}
    assert reopened.cleanup_staging() == 1
    reopened.write_case("c2", image + 1, {"truth": label}, spacing=SPACING3)  # not a duplicate
    assert reopened.case_ids() == ["c1", "c2"]
    np.testing.assert_array_equal(reopened.image("c2")[:], image + 1)


def test_label_sets_never_touch_truth(store):
    image, label = _case3()
    store.write_case("c1", image, {"truth": label}, spacing=SPACING3)
    store.write_case("c2", image, {"truth": label}, spacing=SPACING3)
    truth_chunk = Path(os.path.join(store.root, "cases/c1/labels/truth/0/c/0/0/0")).read_bytes()
    with pytest.raises(NoisysegInputError, match="truth"):
        store.write_label_set("c1", "truth", label * 0)
    with pytest.raises(NoisysegInputError, match="unsafe label set name"):
        store.write_label_set("c1", "../x", label * 0)
    censored = label.copy()
    censored[10:12, 10:12, 10:12] = 0  # remove the small lesion
    records = [
        {"lesion_id": 1, "voxels": 27, "volume_mm3": 50.625, "status": "present"},
        {"lesion_id": 2, "voxels": 2, "volume_mm3": 3.75, "status": "removed"},
    ]
    out = store.write_label_set("c1", "censor-random-0.50-s0", censored, records=records)
    assert [r["case_id"] for r in out] == ["c1", "c1"]
    with pytest.raises(
        NoisysegInputError, match="case c1: label set 'censor-random-0.50-s0' already exists"
    ):
        store.write_label_set("c1", "censor-random-0.50-s0", label)
    out2 = store.write_label_set("c2", "censor-random-0.50-s0", label)  # records computed
    assert [r["voxels"] for r in out2] == [27, 2]
    store.register_label_set(
        "censor-random-0.50-s0",
        {"c1": out, "c2": out2},
        {"mode": "random", "rate": 0.5, "seed": 0, "source": "truth"},
    )
    assert store.label_sets() == ["truth", "censor-random-0.50-s0"]
    assert store.label_set_info("censor-random-0.50-s0")["params"]["rate"] == 0.5
    idx = store.index().set_index("case_id")
    assert idx.loc["c1", "n_lesions_censor-random-0.50-s0"] == 1  # removed one not counted
    assert idx.loc["c2", "n_lesions_censor-random-0.50-s0"] == 2
    assert idx.loc["c1", "n_lesions_truth"] == 2
    t = store.lesion_table("censor-random-0.50-s0")
    assert list(t["status"]) == ["present", "removed", "present", "present"]
    assert len(store.lesion_table()) == 8
    np.testing.assert_array_equal(store.labels("c1", "censor-random-0.50-s0")[:], censored)
    np.testing.assert_array_equal(store.labels("c1")[:], label)
    assert (
        Path(os.path.join(store.root, "cases/c1/labels/truth/0/c/0/0/0")).read_bytes()
        == truth_chunk
    )
    with pytest.raises(NoisysegInputError, match="case c1: .*label set 'nope' missing"):
        store.labels("c1", "nope")
    assert store.case_info("c1")["label_sets"] == ["truth", "censor-random-0.50-s0"]
    assert not [
        n for n in os.listdir(os.path.join(store.root, "cases/c1/labels")) if n.startswith(".tmp")
    ]


def test_splits_clean_flags_and_compaction(store):
    image, label = _case3(shape=(4, 5, 6))
    for i in range(5):
        store.write_case(
            f"c{i}", image, {"truth": label}, spacing=(1, 1, 1), split="test" if i == 4 else "train"
        )
    before = store.index()
    assert store.compact() == 5
    assert os.listdir(os.path.join(store.root, "index", "journal")) == []
    after = store.index()
    assert before.equals(after)
    store.set_split(["c3"], "val")
    store.set_clean(["c0", "c1"])
    assert store.case_ids(split="train") == ["c0", "c1", "c2"]
    assert store.case_ids(split="val") == ["c3"] and store.case_ids(split="test") == ["c4"]
    assert store.case_ids(clean=True) == ["c0", "c1"]
    assert store.case_ids(split="train", clean=False) == ["c2"]
    with pytest.raises(NoisysegInputError, match="split must be one of"):
        store.set_split(["c0"], "holdout")
    with pytest.raises(NoisysegInputError, match="case nope: .*not in store"):
        store.set_clean(["nope"])


def test_read_only_and_pickle(store):
    image, label = _case3()
    store.write_case("c1", image, {"truth": label}, spacing=SPACING3)
    ro = VolumeStore.open(store.url, "r")
    with pytest.raises(NoisysegInputError, match="read-only"):
        ro.write_case("c2", image, {"truth": label}, spacing=SPACING3)
    clone = pickle.loads(pickle.dumps(ro))
    assert clone.case_ids() == ["c1"] and clone.mode == "r"
    np.testing.assert_array_equal(clone.labels("c1")[:], label)


def test_generic_fsspec_path_memory_and_file_url(tmp_path):
    """The non-local (object-store) code path through fsspec's memory filesystem, and file://."""
    img = np.arange(3 * 10 * 12, dtype=np.float32).reshape(3, 10, 12)
    lab = np.zeros((10, 12), np.uint8)
    lab[2:4, 2:4] = 1
    for url in (f"memory://{uuid.uuid4().hex}/s.zarr", f"file://{tmp_path}/s.zarr"):
        s = VolumeStore.create(url, spatial_dims=2, channel_names=["R", "G", "B"])
        s.write_case("a", img, {"truth": lab}, spacing=(0.5, 0.25))
        recs = s.write_label_set("a", "dilate-1", lab)
        s.register_label_set("dilate-1", {"a": recs}, {"mode": "dilate"})
        s2 = VolumeStore.open(url)
        assert s2.case_ids() == ["a"] and s2.label_sets() == ["truth", "dilate-1"]
        np.testing.assert_array_equal(s2.image("a")[:], img)
        np.testing.assert_array_equal(s2.labels("a", "dilate-1")[:], lab)
        assert s2.spacing("a") == (0.5, 0.25)
        assert s2.lesion_table("truth")["volume_mm3"].tolist() == [4 * 0.125]
