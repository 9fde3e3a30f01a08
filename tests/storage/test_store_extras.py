"""VolumeStore follow-ups: probability maps, recorded z-score statistics, case_attrs,
normalise.case_stats, and the RegionReader fast path (checked against plain numpy slices)."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.normalise import case_stats
from noisyseg.storage.patches import PatchDataset
from noisyseg.storage.reader import RegionReader
from noisyseg.storage.store import VolumeStore

SPACING = (2.0, 1.5, 0.5)


def _image(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.stack([rng.normal(300.0, 40.0, shape), rng.normal(-2.0, 0.5, shape)]).astype(
        np.float32
    )


def _label(shape: tuple[int, ...]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 3:7, 4:9] = 1
    return lab


@pytest.fixture
def store(tmp_path: Path) -> tuple[VolumeStore, dict[str, np.ndarray]]:
    st = VolumeStore.create(str(tmp_path / "s.zarr"), spatial_dims=3, channel_names=["a", "b"])
    rng = np.random.default_rng(3)
    images = {}
    for cid, shape in (("c0", (12, 16, 20)), ("c1", (40, 70, 33))):
        images[cid] = _image(rng, shape)
        st.write_case(cid, images[cid], {"truth": _label(shape)}, spacing=SPACING)
    return st, images


# ---- predictions ------------------------------------------------------------------------------


def test_prediction_roundtrip_exact_and_layout(store) -> None:
    st, _ = store
    rng = np.random.default_rng(0)
    prob = rng.random((12, 16, 20)).astype(np.float32)
    path = st.write_prediction("c0", "model-a", prob)
    assert path == "cases/c0/predictions/model-a/0"
    arr = st.prediction("c0", "model-a")
    assert arr.dtype == np.float32 and arr.shape == (12, 16, 20)
    np.testing.assert_array_equal(arr[...], prob)  # bit-exact
    # chunked like the labels, OME multiscales with the spacing as scale
    assert arr.chunks == st.labels("c0").chunks
    doc = json.loads((Path(st.root) / "cases/c0/predictions/model-a/zarr.json").read_text())
    ms = doc["attributes"]["ome"]["multiscales"][0]
    assert ms["name"] == "model-a"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == list(SPACING)
    assert doc["attributes"]["noisyseg"] == {"kind": "probability", "case_id": "c0"}
    assert st.prediction_names("c0") == ["model-a"] and st.prediction_names("c1") == []
    # other dtypes are stored as float32; a fresh reader (pickled store) sees the map
    st.write_prediction("c1", "model-a", np.full((40, 70, 33), 0.25, np.float64))
    ro = VolumeStore.open(st.url)
    np.testing.assert_array_equal(ro.prediction("c1", "model-a")[...], np.float32(0.25))


def test_prediction_rewrite_replaces_without_leftovers(store) -> None:
    st, _ = store
    first = np.zeros((12, 16, 20), np.float32)
    second = np.linspace(0, 1, 12 * 16 * 20, dtype=np.float32).reshape(12, 16, 20)
    st.write_prediction("c0", "p", first)
    before = st.prediction("c0", "p")  # opened before the re-write
    with pytest.raises(NoisysegInputError, match="prediction 'p' already exists"):
        st.write_prediction("c0", "p", second)  # an existing name needs overwrite
    np.testing.assert_array_equal(st.prediction("c0", "p")[...], first)
    st.write_prediction("c0", "p", second, overwrite=True)
    np.testing.assert_array_equal(st.prediction("c0", "p")[...], second)
    assert before.shape == second.shape
    entries = sorted(os.listdir(Path(st.root) / "cases/c0/predictions"))
    assert entries == ["p", "zarr.json"]  # no staging or old copies left behind


def test_prediction_reads_maps_in_the_earlier_inference_layout(store) -> None:
    """Maps written by inference.py's own fallback (Zstd, group made by hand) stay readable."""
    st, _ = store
    prob = np.random.default_rng(1).random((12, 16, 20)).astype(np.float32)
    g = zarr.open_group(store=st.zstore, path="cases/c0/predictions", mode="a", zarr_format=3)
    sub = g.create_group("old", attributes={"noisyseg": {"kind": "probability"}})
    a = sub.create_array(
        "0",
        shape=prob.shape,
        dtype=np.float32,
        chunks=(12, 16, 20),
        fill_value=0.0,
        compressors=[zarr.codecs.ZstdCodec(level=3)],
    )
    a[...] = prob
    np.testing.assert_array_equal(st.prediction("c0", "old")[...], prob)
    np.testing.assert_array_equal(
        RegionReader(st.prediction("c0", "old"))[1:5, 2:9, 0:20], prob[1:5, 2:9, 0:20]
    )


@pytest.mark.parametrize(
    "case, name, array, rule",
    [
        ("c0", "../x", np.zeros((12, 16, 20)), "unsafe"),
        ("c0", "p", np.zeros((12, 16, 21)), "shape"),
        ("c0", "p", np.full((12, 16, 20), np.nan), "NaN"),
        ("nope", "p", np.zeros((12, 16, 20)), "not in store"),
    ],
)
def test_prediction_bad_input(store, case, name, array, rule) -> None:
    st, _ = store
    with pytest.raises(NoisysegInputError, match=rule):
        st.write_prediction(case, name, array)
    assert st.prediction_names("c0") == []


def test_prediction_missing_and_read_only(store) -> None:
    st, _ = store
    with pytest.raises(NoisysegInputError, match="case c0.*prediction 'p' missing"):
        st.prediction("c0", "p")
    ro = VolumeStore.open(st.url, "r")
    with pytest.raises(NoisysegInputError, match="read-only"):
        ro.write_prediction("c0", "p", np.zeros((12, 16, 20), np.float32))


# ---- recorded statistics ----------------------------------------------------------------------


def test_write_case_records_whole_image_stats(store) -> None:
    st, images = store
    for cid, img in images.items():
        attrs = st.case_attrs(cid)
        for c in range(2):
            ref = img[c].astype(np.float64)
            # independent reference: textbook formulas in float64
            mean = ref.sum() / ref.size
            std = math.sqrt(((ref - mean) ** 2).sum() / ref.size)
            assert attrs["channel_mean"][c] == pytest.approx(mean, rel=1e-12)
            assert attrs["channel_std"][c] == pytest.approx(std, rel=1e-12)
    # case_attrs is a copy
    st.case_attrs("c0")["channel_mean"] = None
    assert st.case_attrs("c0")["channel_mean"] is not None


def test_extra_stats_take_precedence(tmp_path: Path) -> None:
    st = VolumeStore.create(str(tmp_path / "s.zarr"), spatial_dims=3, channel_names=["a"])
    img = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    st.write_case(
        "c",
        img,
        {"truth": np.zeros((4, 5, 6), np.uint8)},
        spacing=(1, 1, 1),
        extra={"channel_mean": [1.0], "channel_std": [2.0]},
    )
    assert st.case_attrs("c")["channel_mean"] == [1.0]
    assert st.case_attrs("c")["channel_std"] == [2.0]


def test_patches_use_stored_stats(tmp_path: Path) -> None:
    """Stored statistics deliberately different from the image's: the patches must use them."""
    url = str(tmp_path / "s.zarr")
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["a", "b"])
    img = _image(np.random.default_rng(5), (10, 12, 14))
    st.write_case(
        "c",
        img,
        {"truth": _label((10, 12, 14))},
        spacing=(1, 1, 1),
        extra={"channel_mean": [10.0, -3.0], "channel_std": [2.0, 0.0]},
    )
    mean, std = case_stats(st, "c")
    np.testing.assert_array_equal(mean, np.float32([10.0, -3.0]))
    np.testing.assert_array_equal(std, np.float32([2.0, 1.0]))  # zero std floored to 1
    ds = PatchDataset(url, ["c"], patch_size=(4, 6, 8), foreground_fraction=0.0, seed=0)
    it = iter(ds)
    for _ in range(5):
        s = next(it)
        z, y, x = s["origin"]
        raw = img[:, z : z + 4, y : y + 6, x : x + 8]
        np.testing.assert_allclose(s["image"][0].numpy(), (raw[0] - 10.0) / 2.0, rtol=1e-6)
        np.testing.assert_allclose(s["image"][1].numpy(), raw[1] + 3.0, rtol=1e-6, atol=1e-6)


def test_case_stats_fallback_subsample_for_older_stores(store) -> None:
    """A case written before statistics were recorded: the strided-subsample rule."""
    st, images = store
    meta = Path(st.root) / "cases/c1/zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["noisyseg"]["channel_mean"], doc["attributes"]["noisyseg"]["channel_std"]
    meta.write_text(json.dumps(doc))
    fresh = VolumeStore.open(st.url)
    assert "channel_mean" not in fresh.case_attrs("c1")
    mean, std = case_stats(fresh, "c1")
    # shape (40, 70, 33): every 2nd, 3rd, 2nd voxel (about 32 points per axis)
    sub = images["c1"][:, ::2, ::3, ::2].reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(mean, sub.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std, sub.std(axis=1), rtol=1e-6)
    full_std = images["c1"].reshape(2, -1).std(axis=1)
    assert not np.allclose(std, full_std, rtol=1e-7)  # really the subsample, not the whole


# ---- RegionReader -----------------------------------------------------------------------------


def _boxes(rng: np.random.Generator, shape: tuple[int, ...], n: int):
    for _ in range(n):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, shape)]
        yield tuple(slice(a, b) for a, b in zip(lo, hi))


@pytest.mark.parametrize("layout", ["plain", "sharded", "memory"])
def test_region_reader_equals_numpy(tmp_path: Path, layout: str) -> None:
    shape = (3, 37, 41, 29)
    rng = np.random.default_rng(7)
    img = rng.normal(size=shape).astype(np.float32)
    img[:, :16, :16, :16] = 0.0  # whole chunks of zeros: never written, read as the fill value
    lab = (rng.random(shape[1:]) < 0.1).astype(np.uint8)
    url = f"memory://{uuid.uuid4().hex}/s.zarr" if layout == "memory" else str(tmp_path / "s")
    st = VolumeStore.create(
        url,
        spatial_dims=3,
        channel_names=["a", "b", "c"],
        chunk_bytes=16 * 16 * 16 * 4,
        shard_threshold_bytes=1024 if layout == "sharded" else 1 << 30,
    )
    st.write_case("c", img, {"truth": lab}, spacing=(1, 1, 1))
    image, labels = RegionReader(st.image("c")), RegionReader(st.labels("c"))
    # the direct path is taken exactly for unsharded arrays (local files or fsspec objects)
    assert (image._plan is not None) == (layout != "sharded")
    assert (labels._plan is not None) == (layout != "sharded")
    if layout == "plain":
        assert not (Path(st.root) / "cases/c/0/c/0/0/0/0").exists()  # a missing chunk
    for box in _boxes(rng, shape[1:], 25):
        np.testing.assert_array_equal(image[(slice(None),) + box], img[(slice(None),) + box])
        np.testing.assert_array_equal(labels[box], lab[box])
    # other selections go through zarr unchanged
    np.testing.assert_array_equal(image[:, ::3, 5:30:2], img[:, ::3, 5:30:2])
    np.testing.assert_array_equal(image[1], img[1])
    np.testing.assert_array_equal(image[...], img)
    assert image[:, 5:5].shape == (3, 0, 41, 29)
    assert image.shape == shape and image.ndim == 4 and image.dtype == np.float32
