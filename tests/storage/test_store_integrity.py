"""Store integrity (issue 13): chunk manifests written with every array, damage detected on every
read path (zarr arrays, RegionReader's fast path, sharded arrays, the patch stream), damaged
metadata and index files reported in one line, ``noisyseg verify`` with ``--repair-from``."""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from noisyseg.cli import main
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.files import StoreDamageError
from noisyseg.storage.patches import PatchDataset
from noisyseg.storage.reader import RegionReader
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.verify import verify_store

SHAPE = (32, 32, 32)
#: 16 KiB chunks: float32 images get 16³ chunks (2×2×2 per volume), labels 16×32×32.
CHUNK_BYTES = 16 * 1024


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), independent of the
    library the store uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, (1, *SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 3:7, 4:8] = 1  # only the first label chunk holds lesion voxels
    return image, label


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = str(tmp_path / "s.zarr")
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"], chunk_bytes=CHUNK_BYTES)
    for i, cid in enumerate(("c0", "c1")):
        image, label = _case(i)
        st.write_case(cid, image, {"truth": label}, spacing=(1.0, 1.0, 1.0))
    st.compact()
    return url


def _files(root: str, rel: str) -> list[str]:
    return sorted(
        os.path.relpath(p, os.path.join(root, rel))
        for p in glob.glob(os.path.join(root, rel, "c", "**"), recursive=True)
        if os.path.isfile(p)
    )


def test_manifest_lists_every_written_chunk_with_its_crc32c(store_url: str) -> None:
    for rel in ("cases/c0/0", "cases/c0/labels/truth/0"):
        doc = json.loads(Path(store_url, rel, "manifest.json").read_text())
        assert doc["hash"] == "crc32c"
        assert sorted(doc["chunks"]) == _files(store_url, rel)
        for key, value in doc["chunks"].items():
            data = Path(store_url, rel, key).read_bytes()
            assert int(value, 16) == crc32c_reference(data), key
        attrs = json.loads(Path(store_url, rel, "zarr.json").read_text())["attributes"]
        assert attrs["integrity"]["manifest"] == "manifest.json"
    # the image has 8 chunks of 16³; the label's empty chunks are not written and not listed
    assert len(_files(store_url, "cases/c0/0")) == 8
    assert _files(store_url, "cases/c0/labels/truth/0") == ["c/0/0/0"]


def test_crc32c_reference_check_value() -> None:
    assert crc32c_reference(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def _expect_line(fn, pattern: str) -> None:
    with pytest.raises(StoreDamageError, match=pattern) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and message.endswith("the store is damaged; run noisyseg verify")


@pytest.mark.fault_case(1)
def test_deleted_image_chunk_fails_every_read_path(store_url: str) -> None:
    image, _ = _case(0)
    os.remove(Path(store_url, "cases/c0/0/c/0/1/0/1"))
    st = VolumeStore.open(store_url)
    line = r"^case c0: image chunk 0/c/0/1/0/1 is missing \(store .*s\.zarr\)"
    _expect_line(lambda: st.image("c0")[...], line)  # zarr path
    _expect_line(lambda: RegionReader(st.image("c0"), 1)[:, 10:20, 0:20, 10:20], line)
    _expect_line(lambda: RegionReader(st.image("c0"), 2)[:, 10:20, 0:20, 10:20], line)
    # a box that does not touch the lost chunk still reads, exactly
    np.testing.assert_array_equal(
        RegionReader(st.image("c0"))[:, 0:16, 0:16, 0:16], image[:, 0:16, 0:16, 0:16]
    )
    # the other case is intact
    np.testing.assert_array_equal(st.image("c1")[...], _case(1)[0])


@pytest.mark.fault_case(1)
def test_deleted_truth_chunk_fails_instead_of_reading_no_lesion(store_url: str) -> None:
    os.remove(Path(store_url, "cases/c1/labels/truth/0/c/0/0/0"))
    st = VolumeStore.open(store_url)
    assert st.index().set_index("case_id").loc["c1", "n_lesions_truth"] == 1
    line = r"^case c1: label set truth chunk labels/truth/0/c/0/0/0 is missing"
    _expect_line(lambda: st.labels("c1")[...], line)
    _expect_line(lambda: RegionReader(st.labels("c1"))[0:8, 0:8, 0:8], line)


def test_never_written_chunks_read_as_fill(store_url: str) -> None:
    """Empty label chunks are not stored (zarr) and not listed: they read as zeros, correctly."""
    st = VolumeStore.open(store_url)
    assert int(np.asarray(st.labels("c0")[16:32, :, :]).sum()) == 0
    assert int(RegionReader(st.labels("c0"))[16:32, 0:32, 0:32].sum()) == 0
    assert int(np.asarray(st.labels("c0")[...]).sum()) == 4 * 4 * 4


def test_damaged_and_foreign_chunks_fail(store_url: str) -> None:
    path = Path(store_url, "cases/c0/0/c/0/0/0/0")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the compressed payload
    path.write_bytes(bytes(data))
    st = VolumeStore.open(store_url)
    pattern = r"image chunk 0/c/0/0/0/0 is damaged \(content hash differs"
    _expect_line(lambda: RegionReader(st.image("c0"), 1)[:, 0:4, 0:4, 0:4], pattern)
    _expect_line(lambda: st.image("c0")[:, 0:4, 0:4, 0:4], pattern)
    # a chunk object nobody listed (written by someone else) is damage too
    shutil.copy(Path(store_url, "cases/c1/labels/truth/0/c/0/0/0"), Path(store_url, "x"))
    Path(store_url, "cases/c0/labels/truth/0/c/1/0").mkdir(parents=True)
    shutil.copy(Path(store_url, "x"), Path(store_url, "cases/c0/labels/truth/0/c/1/0/0"))
    _expect_line(
        lambda: VolumeStore.open(store_url).labels("c0")[...], "is not in the array's manifest"
    )


def test_chunk_rewritten_after_a_verified_read_is_checked_again(store_url: str) -> None:
    """The fast path hashes a file once per process; a file rewritten later is hashed again."""
    st = VolumeStore.open(store_url)
    reader = RegionReader(st.image("c0"), 1)
    first = reader[:, 0:8, 0:8, 0:8]
    np.testing.assert_array_equal(first, _case(0)[0][:, 0:8, 0:8, 0:8])
    path = Path(store_url, "cases/c0/0/c/0/0/0/0")
    other = Path(store_url, "cases/c1/0/c/0/0/0/0").read_bytes()  # valid Blosc, wrong content
    time.sleep(0.01)
    path.write_bytes(other)
    _expect_line(lambda: reader[:, 0:8, 0:8, 0:8], "image chunk 0/c/0/0/0/0 is damaged")


@pytest.mark.fault_case(1)
def test_sharded_arrays_are_checked_through_zarr(tmp_path: Path) -> None:
    url = str(tmp_path / "sharded.zarr")
    st = VolumeStore.create(
        url,
        spatial_dims=3,
        channel_names=["t1"],
        chunk_bytes=4 * 1024,
        shard_threshold_bytes=1024,
    )
    image, label = _case(3)
    st.write_case("s0", image, {"truth": label}, spacing=(1.0, 1.0, 1.0))
    meta = json.loads(Path(url, "cases/s0/0/zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    np.testing.assert_array_equal(st.image("s0")[...], image)
    shard = sorted(json.loads(Path(url, "cases/s0/0/manifest.json").read_text())["chunks"])[-1]
    os.remove(Path(url, "cases/s0/0", shard))
    _expect_line(
        lambda: VolumeStore.open(url).image("s0")[...], f"image chunk 0/{shard} is missing"
    )


@pytest.mark.fault_case(1)
def test_patch_stream_fails_on_a_damaged_store(store_url: str) -> None:
    os.remove(Path(store_url, "cases/c0/0/c/0/0/0/0"))
    os.remove(Path(store_url, "cases/c1/0/c/0/0/0/0"))
    ds = PatchDataset(store_url, ["c0", "c1"], patch_size=(24, 24, 24), seed=0)
    with pytest.raises(StoreDamageError, match=r"image chunk 0/c/0/0/0/0 is missing"):
        for _ in range(20):
            next(iter(ds))


@pytest.mark.fault_case(10)
def test_deleted_manifest_and_truncated_metadata_are_one_line(store_url: str) -> None:
    os.remove(Path(store_url, "cases/c0/0/manifest.json"))
    _expect_line(
        lambda: VolumeStore.open(store_url).image("c0"),
        r"image manifest 0/manifest.json is missing",
    )
    meta = Path(store_url, "cases/c1/labels/truth/0/zarr.json")
    meta.write_text(meta.read_text()[:40])
    _expect_line(
        lambda: VolumeStore.open(store_url).labels("c1"),
        r"^case c1: label set truth metadata labels/truth/0/zarr.json is not valid JSON",
    )


@pytest.mark.fault_case(10)
def test_truncated_index_and_root_metadata_are_one_line(store_url: str) -> None:
    parquet = Path(store_url, "index/cases.parquet")
    parquet.write_bytes(parquet.read_bytes()[:100])
    _expect_line(
        lambda: VolumeStore.open(store_url).case_ids(),
        r"index/cases.parquet is not a readable Parquet file \(100 bytes",
    )
    root = Path(store_url, "zarr.json")
    root.write_text(root.read_text()[:30])
    with pytest.raises(StoreDamageError, match=r"zarr.json is not valid JSON") as info:
        VolumeStore.open(store_url)
    assert "no noisyseg store here" not in str(info.value)
    # a folder without any store still says so
    with pytest.raises(NoisysegInputError, match="no noisyseg store here"):
        VolumeStore.open(str(Path(store_url).parent / "nothing.zarr"))


@pytest.mark.fault_case(1)
def test_verify_cli_ok_damaged_and_repair(store_url: str, tmp_path: Path, capsys) -> None:
    backup = str(tmp_path / "backup.zarr")
    shutil.copytree(store_url, backup)
    assert main(["verify", store_url]) == 0
    assert "verify: 2 case(s), 2 ok, 0 damaged; ok" in capsys.readouterr().out

    os.remove(Path(store_url, "cases/c0/0/c/0/1/1/0"))
    lab = Path(store_url, "cases/c1/labels/truth/0/c/0/0/0")
    data = bytearray(lab.read_bytes())
    data[-1] ^= 0xFF
    lab.write_bytes(bytes(data))
    assert main(["verify", store_url]) == 2
    out = capsys.readouterr().out
    assert "c0: DAMAGED (1)" in out and "image chunk 0/c/0/1/1/0 is missing" in out
    assert (
        "c1: DAMAGED (1)" in out
        and "label set truth chunk labels/truth/0/c/0/0/0 is damaged" in out
    )
    assert "2 damaged; DAMAGED: 2 problem(s)" in out

    # a "copy" whose chunk differs is never used for repair
    wrong = str(tmp_path / "wrong.zarr")
    shutil.copytree(backup, wrong)
    shutil.copy(Path(wrong, "cases/c1/0/c/0/1/1/0"), Path(wrong, "cases/c0/0/c/0/1/1/0"))
    report = verify_store(store_url, repair_from=wrong, case_ids=["c0"])
    assert not report.ok and report.cases[0].repaired == []

    assert main(["verify", store_url, "--repair-from", backup]) == 0
    assert "repaired 2 chunk object(s)" in capsys.readouterr().out
    st = VolumeStore.open(store_url)
    np.testing.assert_array_equal(st.image("c0")[...], _case(0)[0])
    np.testing.assert_array_equal(st.labels("c1")[...], _case(1)[1])
    assert main(["verify", store_url]) == 0


def test_verify_reports_index_damage_and_missing_case_group(store_url: str, capsys) -> None:
    shutil.rmtree(Path(store_url, "cases/c1"))
    report = verify_store(store_url, scheduler="synchronous")
    assert not report.ok
    assert report.problems == ["case c1: indexed but its group cases/c1 is missing"]
    assert [c.case_id for c in report.cases] == ["c0"] and report.cases[0].ok
    assert main(["verify", store_url]) == 2
    assert "store: case c1: indexed but its group cases/c1 is missing" in capsys.readouterr().out


def test_object_store_code_path_on_fsspec_memory() -> None:
    """No rename on object stores: writes in place, versions switched by the registry entry;
    manifests, damage detection and verify work the same (fsspec's in-memory file system)."""
    import uuid

    from noisyseg.storage.corrupt import corrupt_store

    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/m.zarr"
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"], chunk_bytes=CHUNK_BYTES)
    assert not st.files.local
    for i in range(3):
        image, label = _case(i)
        st.write_case(f"c{i}", image, {"truth": label}, spacing=(1.0, 1.0, 1.0))
    st.compact()
    kw = {"mode": "random", "rate": 0.5, "split": None, "scheduler": "synchronous"}
    corrupt_store(url, seed=0, name="n", progress=False, **kw)
    corrupt_store(url, seed=1, name="n", overwrite=True, progress=False, **kw)
    st = VolumeStore.open(url)
    version = st.label_set_info("n")["version"]
    groups = sorted(
        p.rsplit("/", 1)[-1] for p in st.fs.ls(st.files.path("cases/c0/labels"), detail=False)
    )
    assert groups == [f"n~{version}", "truth", "zarr.json"]
    assert verify_store(url).ok
    key = sorted(json.loads(st.fs.cat_file(st.files.path("cases/c1/0/manifest.json")))["chunks"])[0]
    st.fs.rm(st.files.path(f"cases/c1/0/{key}"))
    line = f"^case c1: image chunk 0/{key} is missing \\(store memory://"
    _expect_line(lambda: VolumeStore.open(url).image("c1")[...], line)
    _expect_line(lambda: RegionReader(VolumeStore.open(url).image("c1"))[:, 0:16, 0:16, 0:16], line)
    report = verify_store(url)
    assert [c.case_id for c in report.cases if not c.ok] == ["c1"]
