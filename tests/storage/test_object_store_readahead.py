"""Read-ahead and the chunk cache of the patch loader, against a real S3-compatible server.

The server is conftest's ``s3_server`` (moto's standalone server, a separate process speaking
S3 over HTTP); requests are counted from its own request log, not from inside the client.
Nothing is mocked: the stores are written by ``VolumeStore`` and copied into the bucket byte for
byte.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from cluster_utils import S3_BUCKET, MotoS3Server

from noisyseg.storage.chunk_source import ChunkCache
from noisyseg.storage.files import StoreDamageError
from noisyseg.storage.patches import PatchDataset
from noisyseg.storage.readahead import read_ahead
from noisyseg.storage.store import VolumeStore

CASES = ["c0", "c1", "c2"]
PATCH = (16, 16, 16)
#: Small chunks (8 KB: 8x16x16 float32), so one patch touches several chunk objects.
CHUNK_BYTES = 8192
PLAIN = {"read_ahead": 0, "chunk_cache_mb": 0}
PREFETCH = {"read_ahead": 3, "chunk_cache_mb": 64}


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two channels of noise over 32³ with three bright balls, and the balls as the label."""
    rng = np.random.default_rng(seed)
    grid = np.indices((32, 32, 32))
    label = np.zeros((32, 32, 32), np.uint8)
    for _ in range(3):
        centre = rng.integers(6, 26, size=3)
        label |= (((grid - centre[:, None, None, None]) ** 2).sum(0) <= 9).astype(np.uint8)
    image = rng.normal(0.0, 1.0, (2, 32, 32, 32)).astype(np.float32) + 3.0 * label
    return image, label


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ra") / "s.zarr")
    store = VolumeStore.create(
        path, spatial_dims=3, channel_names=["a", "b"], chunk_bytes=CHUNK_BYTES
    )
    for i, cid in enumerate(CASES):
        image, label = _case(i)
        store.write_case(cid, image, {"truth": label}, spacing=(1.0, 1.0, 1.0))
    store.compact()
    return path


def _upload(local: str) -> str:
    """A fresh copy of the store in the test bucket; its ``s3://`` URL."""
    prefix = f"ra-{uuid.uuid4().hex[:8]}.zarr"
    fsspec.filesystem("s3", skip_instance_cache=True).put(
        local.rstrip("/") + "/", f"{S3_BUCKET}/{prefix}/", recursive=True
    )
    return f"s3://{S3_BUCKET}/{prefix}"


def _patches(url: str, n: int, **kwargs) -> list[dict]:
    ds = PatchDataset(
        url,
        CASES,
        patch_size=PATCH,
        foreground_fraction=0.5,
        seed=7,
        augment=True,
        **kwargs,
    )
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _log_size(server: MotoS3Server) -> int:
    return server.log_path.stat().st_size


def _requests(server: MotoS3Server, offset: int, prefix: str) -> dict[str, int]:
    """Requests per HTTP method the server logged for keys under ``prefix`` after ``offset``;
    ``"<METHOD> chunk"`` counts those of chunk objects (``.../c/...``) alone."""
    time.sleep(0.5)  # the server writes its log line after answering
    with open(server.log_path, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    counts: dict[str, int] = {}
    for method, key in re.findall(rf'"([A-Z]+) /{S3_BUCKET}/{re.escape(prefix)}/(\S*)', text):
        counts[method] = counts.get(method, 0) + 1
        if "/c/" in key:
            counts[f"{method} chunk"] = counts.get(f"{method} chunk", 0) + 1
    return counts


def test_prefetching_stream_is_bitwise_the_plain_one(
    s3_server: MotoS3Server, local_store: str
) -> None:
    url = _upload(local_store)
    plain = _patches(url, 24, **PLAIN)
    prefetched = _patches(url, 24, **PREFETCH)
    local = _patches(local_store, 24, **PLAIN)
    for a, b, c in zip(plain, prefetched, local, strict=True):
        assert a["case_id"] == b["case_id"] == c["case_id"]
        assert a["origin"] == b["origin"] == c["origin"]
        for key in ("image", "label"):
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes() == c[key].numpy().tobytes()
    assert any(float(p["label"].sum()) > 0 for p in plain)  # the stream does reach lesions


def test_cache_cuts_requests_per_patch(s3_server: MotoS3Server, local_store: str) -> None:
    url = _upload(local_store)
    prefix = url.split(f"{S3_BUCKET}/", 1)[1]
    n = 40
    offset = _log_size(s3_server)
    _patches(url, n, **PLAIN)
    plain = _requests(s3_server, offset, prefix)
    offset = _log_size(s3_server)
    _patches(url, n, **PREFETCH)
    cached = _requests(s3_server, offset, prefix)
    # one GET per chunk object, no HEAD before it (s3fs's size probe is switched off)
    assert plain.get("HEAD chunk", 0) == 0 and cached.get("HEAD chunk", 0) == 0
    assert plain["GET chunk"] / n > 4  # a 16³ patch touches several 8 KB chunks per channel
    # with the cache each chunk object is fetched about once: 3 cases x (2 x 32 + 1) objects
    objects = sum(
        1 for p in fsspec.filesystem("s3").find(f"{S3_BUCKET}/{prefix}/cases") if "/c/" in p
    )
    assert cached["GET chunk"] <= objects
    assert cached["GET"] + cached.get("HEAD", 0) < (plain["GET"] + plain.get("HEAD", 0)) / 2


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_damaged_chunks_are_detected_with_prefetch(
    s3_server: MotoS3Server, local_store: str, damage: str
) -> None:
    url = _upload(local_store)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    folder = f"{url.removeprefix('s3://')}/cases/c1/0/c"
    for key in fs.find(folder):
        if damage == "deleted":
            fs.rm(key)
        else:
            data = bytearray(fs.cat_file(key))
            data[-1] ^= 0xFF
            fs.pipe_file(key, bytes(data))
    ds = PatchDataset(url, ["c1"], patch_size=PATCH, seed=0, **PREFETCH)
    problem = "is missing" if damage == "deleted" else "is damaged"
    with pytest.raises(StoreDamageError, match=rf"case c1: image chunk 0/c/.* {problem}"):
        next(iter(ds))


def test_read_ahead_keeps_order_and_raises_in_turn() -> None:
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, size=20)

    def read(i: int) -> int:
        time.sleep(delays[i])
        if i == 13:
            raise ValueError("bad request 13")
        return i * i

    got = []
    with pytest.raises(ValueError, match="bad request 13"):
        for value in read_ahead(iter(range(20)), read, depth=4):
            got.append(value)
    assert got == [i * i for i in range(13)]
    assert list(read_ahead(iter(range(5)), lambda i: -i, depth=0)) == [0, -1, -2, -3, -4]


def test_chunk_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = ChunkCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # "a" now most recent
    cache.put("c", b"90ab")  # 12 bytes > 10: evicts "b", the least recently used
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"90ab"
    assert cache.nbytes == 8 and len(cache) == 2
    cache.put("absent", None)  # an all-fill chunk the manifest allows: kept as b""
    assert cache.get("absent") == b""
    cache.put("huge", b"x" * 11)  # larger than the budget: never kept
    assert cache.get("huge") is None and cache.nbytes <= 10
    assert ChunkCache(0).get("a") is None


def test_remote_defaults_turn_prefetch_on(tmp_path: Path) -> None:
    remote = PatchDataset("s3://bucket/x.zarr", ["c0"], patch_size=PATCH)
    local = PatchDataset(str(tmp_path / "x.zarr"), ["c0"], patch_size=PATCH)
    assert remote.resolved_read_ahead() > 0 and remote.resolved_chunk_cache_mb() > 0
    assert local.resolved_read_ahead() == 0 and local.resolved_chunk_cache_mb() == 0
    off = PatchDataset("s3://bucket/x.zarr", ["c0"], patch_size=PATCH, **PLAIN)
    assert off.resolved_read_ahead() == 0 and off.resolved_chunk_cache_mb() == 0
