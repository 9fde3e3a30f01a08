"""The store root is an OME-Zarr 0.5 image collection (bioformats2raw layout with ``series``)
that real readers open: yaozarrs validates the whole hierarchy and lists every case with its
translation; ome-zarr-py opens each listed image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from noisyseg.storage.collection import OME_GROUP, read_series, root_ome_attrs
from noisyseg.storage.store import VolumeStore

yaozarrs = pytest.importorskip("yaozarrs")

SPACING = (3.0, 1.25, 0.5)  # z, y, x mm
ORIGINS = {"case_a": (-12.0, 7.5, 30.0), "case_b": (4.0, -2.5, -60.0)}  # NIfTI x, y, z


def _affine(origin_xyz) -> np.ndarray:
    aff = np.diag([*SPACING[::-1], 1.0])
    aff[:3, 3] = origin_xyz
    return aff


def _write(store: VolumeStore, cid: str, shape=(6, 8, 10)) -> None:
    rng = np.random.default_rng(len(cid))
    truth = np.zeros(shape, np.uint8)
    truth[2:4, 2:5, 3:6] = 1
    store.write_case(
        cid,
        rng.normal(size=(1, *shape)).astype(np.float32),
        {"truth": truth},
        spacing=SPACING,
        affine=_affine(ORIGINS[cid]),
    )


def _translations_by_yaozarrs(root: str) -> dict[str, list[float]]:
    """Open the root with yaozarrs, follow ``OME`` ``series``, read each image's translation."""
    group = yaozarrs.open_group(root)
    assert group.ome_metadata().bioformats2raw_layout == 3
    series = group[OME_GROUP].ome_metadata().series
    out = {}
    for path in series:
        image = group[path].ome_metadata()
        transforms = image.multiscales[0].datasets[0].coordinateTransformations
        (translation,) = [t for t in transforms if t.type == "translation"]
        out[path] = list(translation.translation)
    return out


def test_root_is_a_collection_listing_every_case_with_its_translation(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    root = str(tmp_path / "store.zarr")
    store = VolumeStore.create(root, spatial_dims=3, channel_names=["T1"])
    _write(store, "case_a")
    store.compact()
    assert read_series(store.files) == ["cases/case_a"]
    _write(store, "case_b", shape=(5, 9, 7))  # another shape: a collection, not a plate
    store.compact()
    # the whole hierarchy (root, OME series, every image and its labels) passes the validator
    yaozarrs.validate_zarr_store(root)
    found = _translations_by_yaozarrs(root)
    assert found == {
        f"cases/{cid}": [0.0, *(float(v) for v in xyz[::-1])] for cid, xyz in ORIGINS.items()
    }
    for path, translation in found.items():
        (node, *_) = list(Reader(parse_url(os.path.join(root, path)))())
        transforms = node.metadata["coordinateTransformations"][0]
        assert transforms[1] == {"type": "translation", "translation": translation}


def test_series_follows_the_index_and_old_stores_get_the_root_attributes(tmp_path):
    root = tmp_path / "store.zarr"
    store = VolumeStore.create(str(root), spatial_dims=3, channel_names=["T1"])
    assert read_series(store.files) == []
    _write(store, "case_b")
    # a case is listed at compaction, not while only its journal entry exists
    assert read_series(store.files) == []
    store.compact()
    # a store written before the collection metadata: no root "ome", no OME group
    doc = json.loads((root / "zarr.json").read_text())
    del doc["attributes"]["ome"]
    (root / "zarr.json").write_text(json.dumps(doc))
    (root / OME_GROUP / "zarr.json").unlink()
    _write(store, "case_a")
    store.compact()
    doc = json.loads((root / "zarr.json").read_text())
    assert doc["attributes"]["ome"] == root_ome_attrs()
    assert doc["attributes"]["noisyseg"]["format"] == "noisyseg-volume-store"
    assert read_series(store.files) == ["cases/case_a", "cases/case_b"]
    mtime = (root / OME_GROUP / "zarr.json").stat().st_mtime_ns
    store.compact()  # nothing changed: nothing rewritten
    assert (root / OME_GROUP / "zarr.json").stat().st_mtime_ns == mtime
    assert VolumeStore.open(str(root)).case_ids() == ["case_a", "case_b"]
    yaozarrs.validate_zarr_store(str(root))
