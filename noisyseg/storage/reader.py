"""Reading a store's cases: cached, checked array handles (:class:`CaseArrays`) and fast box
(patch) reads from the chunked arrays (:class:`RegionReader`), with their decoding thread pool."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V
from noisyseg.storage.chunk_source import ChunkCache, LocalChunks, RemoteChunks
from noisyseg.storage.files import StoreFiles
from noisyseg.storage.integrity import ArrayContext, VerifiedStore, open_verified_array
from noisyseg.storage.layout import CASES_DIR, VERSION_SEP, image_rel, label_rel, prediction_rel

#: Decoding threads of :class:`RegionReader` (environment ``NOISYSEG_READ_THREADS``).
READ_THREADS = int(os.environ.get("NOISYSEG_READ_THREADS", "0") or 0) or min(4, os.cpu_count() or 1)
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def read_pool(workers: int) -> ThreadPoolExecutor:
    """The process's decoding thread pool (re-created after a fork or for more workers)."""
    global _POOL
    pid = os.getpid()
    if _POOL is None or _POOL[0] != pid or _POOL[1] < workers:
        _POOL = (pid, workers, ThreadPoolExecutor(workers, thread_name_prefix="noisyseg-read"))
    return _POOL[2]


class _Plan:
    """What the fast path needs to read an array's chunk objects itself."""

    def __init__(
        self,
        chunks: tuple[int, ...],
        dtype: np.dtype,
        key_encoding: Any,
        compressed: bool,
        fill: Any,
        source: LocalChunks | RemoteChunks,
    ) -> None:
        self.chunks = chunks
        self.dtype = dtype
        self.key_encoding = key_encoding
        self.compressed = compressed
        self.fill = fill
        self.source = source


def _make_plan(array: Any, cache: ChunkCache | None = None) -> _Plan | None:
    """The fast-path plan of an unsharded array of a local or fsspec store with ``bytes``
    (+ Blosc) codecs, else None (zarr's own path). ``cache``: kept chunks of a remote array."""
    try:
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3:
            return None
        if not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        codecs = tuple(meta.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None  # sharding, transpose, ... : zarr's own path
        if len(codecs) == 1:
            compressed = False
        elif len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
            compressed = True
        else:
            return None
        source = _chunk_source(array, cache)
        if source is None:
            return None
        dtype = np.dtype(array.dtype)
        endian = getattr(codecs[0], "endian", None)
        if dtype.itemsize > 1 and endian is not None:
            dtype = dtype.newbyteorder(
                "<" if str(getattr(endian, "value", endian)) == "little" else ">"
            )
        chunks = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
        return _Plan(chunks, dtype, meta.chunk_key_encoding, compressed, meta.fill_value, source)
    except (AttributeError, TypeError, ValueError):  # unknown metadata: zarr path
        return None


def _chunk_source(array: Any, cache: ChunkCache | None) -> LocalChunks | RemoteChunks | None:
    """Where the array's chunk objects come from (local files or an fsspec filesystem), with
    its manifest when opened through the store; None for any other store."""
    store = array.store_path.store
    manifest = context = None
    if isinstance(store, VerifiedStore):
        manifest, context, store = store.manifest, store.context, store.inner
    rel = array.store_path.path
    if isinstance(store, zarr.storage.LocalStore):
        return LocalChunks(os.path.join(str(store.root), rel), manifest, context)
    if isinstance(store, zarr.storage.FsspecStore):
        base = f"{str(store.path).rstrip('/')}/{rel}" if rel else str(store.path)
        return RemoteChunks(store.fs, base, manifest, context, cache)
    return None


class RegionReader:
    """Array-like view of a Zarr array with a fast path for reading boxes (patches).

    ``reader[box]`` with ``box`` a tuple of unit-step slices equals ``array[box]``. For an
    unsharded array whose codecs are ``bytes`` (+ one Blosc compressor, or none) it gets the
    chunk objects that the box touches itself and decodes them with Blosc in the calling
    thread(s): zarr's asynchronous pipeline costs two thread hand-offs per chunk, which made it
    2-3x slower than the decoding itself (96³ float32 patches of 64³ chunks: 6.9 ms of CPU
    through ``array[box]``, 2.4 ms here). On a local store the chunk files are read one after
    the other; on an fsspec store (``s3://`` ...) all the box's objects are fetched at once and
    optionally kept in a :class:`~noisyseg.storage.chunk_source.ChunkCache`
    (:mod:`~noisyseg.storage.chunk_source`). Every other array (sharded, other codecs or stores)
    and every other selection (steps, integers) goes through ``array[...]`` unchanged.

    Integrity: when the array was opened through the store (a
    :class:`~noisyseg.storage.integrity.VerifiedStore`), every chunk object the fast path reads
    is checked against the array's manifest, and a missing or damaged chunk raises
    :class:`~noisyseg.storage.files.StoreDamageError` (never read as the fill value).

    The chunks of one box are decoded by a small per-process thread pool (Blosc and numpy's
    copies release the GIL): ``threads`` workers, default :data:`READ_THREADS` (environment
    ``NOISYSEG_READ_THREADS``, else ``min(4, CPU count)``); 1 decodes in the calling thread
    (what DataLoader worker processes and read-ahead threads use: there they are the
    parallelism).

    Args:
        array: a ``zarr.Array`` (anything with ``shape`` and ``__getitem__`` is passed through).
        threads: decoding threads for one box (see above).
        cache: verified chunk objects kept between reads of a remote array (None: none kept).
    """

    def __init__(
        self, array: Any, threads: int | None = None, cache: ChunkCache | None = None
    ) -> None:
        self.array = array
        self.threads = max(1, int(READ_THREADS if threads is None else threads))
        self.shape = tuple(int(s) for s in array.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype)
        self._plan = _make_plan(array, cache)

    def __getitem__(self, selection: Any) -> np.ndarray:
        box = self._box(selection)
        if box is None or self._plan is None:
            return np.asarray(self.array[selection])
        out = self._read_box(*box)
        return np.asarray(self.array[selection]) if out is None else out

    def _box(self, selection: Any) -> tuple[list[int], list[int]] | None:
        if not isinstance(selection, tuple):
            selection = (selection,)
        if len(selection) > self.ndim or not all(isinstance(s, slice) for s in selection):
            return None
        selection = selection + (slice(None),) * (self.ndim - len(selection))
        start, stop = [], []
        for s, n in zip(selection, self.shape):
            a, b, step = s.indices(n)
            if step != 1:
                return None
            start.append(a)
            stop.append(max(a, b))
        return start, stop

    def _read_box(self, start: list[int], stop: list[int]) -> np.ndarray | None:
        plan = self._plan
        out = np.empty([b - a for a, b in zip(start, stop)], dtype=self.dtype)
        if out.size == 0:
            return out
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, plan.chunks)]
        keys = list(itertools.product(*ranges))
        objects = None
        if isinstance(plan.source, RemoteChunks):  # every object of the box in one round trip
            objects = plan.source.fetch([plan.key_encoding.encode_chunk_key(i) for i in keys])
        if self.threads > 1 and len(keys) > 1:
            pool = read_pool(self.threads)
            n = min(self.threads, len(keys))
            parts = [keys[i::n] for i in range(n)]
            ok = list(
                pool.map(lambda part: self._read_chunks(part, start, stop, out, objects), parts)
            )
        else:
            ok = [self._read_chunks(keys, start, stop, out, objects)]
        return out if all(ok) else None

    def _read_chunks(
        self,
        keys: list[tuple[int, ...]],
        start: list[int],
        stop: list[int],
        out: np.ndarray,
        objects: dict[str, bytes | None] | None,
    ) -> bool:
        """Decode the chunks ``keys`` into their parts of ``out`` (their stored objects from
        ``objects``, else read here); False: not a plain chunk."""
        plan = self._plan
        chunks = plan.chunks
        buf = np.empty(chunks, dtype=plan.dtype)
        for idx in keys:
            lo = [i * c for i, c in zip(idx, chunks)]
            src = tuple(
                slice(max(a, l) - l, min(b, l + c) - l)
                for a, b, l, c in zip(start, stop, lo, chunks)
            )
            dst = tuple(
                slice(max(a, l) - a, min(b, l + c) - a)
                for a, b, l, c in zip(start, stop, lo, chunks)
            )
            key = plan.key_encoding.encode_chunk_key(idx)
            data = objects[key] if objects is not None else plan.source.fetch([key])[key]
            if data is None:  # never-written chunk (checked against the manifest): fill value
                out[dst] = plan.fill
                continue
            chunk = self._decode(data, buf)
            if chunk is None:
                return False
            out[dst] = chunk[src]
        return True

    def _decode(self, data: bytes, buf: np.ndarray) -> np.ndarray | None:
        """The chunk stored as ``data`` (decoded into ``buf`` when compressed); None: not a
        plain chunk of this shape (zarr's path decides)."""
        plan = self._plan
        if plan.compressed:
            # Blosc header: bytes 4-8 hold the uncompressed size (little-endian uint32)
            if len(data) < 16 or int.from_bytes(data[4:8], "little") != buf.nbytes:
                return None
            numcodecs.blosc.decompress(data, buf)
            return buf
        if len(data) != buf.nbytes:
            return None
        return np.frombuffer(data, dtype=plan.dtype).reshape(plan.chunks)


class CaseArrays:
    """One store's case attributes and array handles, cached per process.

    Arrays open lazily and read-only, their chunk reads checked against their integrity
    manifests (:func:`~noisyseg.storage.integrity.open_verified_array`); :meth:`forget` drops
    what a write made stale.
    """

    def __init__(self, files: StoreFiles, zstore: Any, url: str) -> None:
        self.files = files
        self.zstore = zstore
        self.url = url
        self._arrays: dict[tuple[str, str], Any] = {}
        self._attrs: dict[str, dict] = {}

    def forget(self, case_id: str | None = None) -> None:
        """Drop cached attributes and array handles (of one case, or all)."""
        if case_id is None:
            self._attrs.clear()
            self._arrays.clear()
            return
        self._attrs.pop(case_id, None)
        for key in [k for k in self._arrays if k[0] == case_id]:
            del self._arrays[key]

    def attrs(self, case_id: str) -> dict:
        """The case's stored ``noisyseg`` attributes (cached; not a copy)."""
        if case_id not in self._attrs:
            V.check_case_id(case_id)
            try:
                doc = self.files.read_json(f"{CASES_DIR}/{case_id}/zarr.json")
            except FileNotFoundError:
                raise NoisysegInputError("case not in store", case=case_id, path=self.url) from None
            self._attrs[case_id] = doc["attributes"]["noisyseg"]
        return self._attrs[case_id]

    def array(self, case_id: str, key: str, rel: str, what: str) -> Any:
        """The array at ``rel``, cached under ``(case_id, key)``, chunk reads checked (None when
        absent)."""
        ck = (case_id, key)
        if ck not in self._arrays:
            V.check_case_id(case_id)
            ctx = ArrayContext(case_id, what, rel, self.url)
            arr = open_verified_array(self.files, self.zstore, ctx)
            if arr is None:
                return None
            self._arrays[ck] = arr
        return self._arrays[ck]

    def image(self, case_id: str) -> zarr.Array:
        """The case's image ``(C, *S)`` float32, lazy."""
        arr = self.array(case_id, "\0image", image_rel(case_id), "image")
        if arr is None:
            raise NoisysegInputError("case not in store", case=case_id, path=self.url)
        return arr

    def labels(self, case_id: str, name: str, version: str | None) -> zarr.Array:
        """Label set ``name`` of the case at ``version``, ``(*S)`` uint8, lazy; says whether the
        case or the set is missing."""
        rel = label_rel(case_id, name, version)
        arr = self.array(case_id, f"{name}{VERSION_SEP}{version}", rel, f"label set {name}")
        if arr is None:
            if self.array(case_id, "\0image", image_rel(case_id), "image") is None:
                raise NoisysegInputError("case not in store", case=case_id, path=self.url)
            raise NoisysegInputError(f"label set {name!r} missing", case=case_id, path=self.url)
        return arr

    def prediction(self, case_id: str, name: str) -> zarr.Array:
        """Probability map ``name`` of the case, ``(*S)`` float32, lazy."""
        arr = self.array(
            case_id, f"\0pred:{name}", prediction_rel(case_id, name), f"prediction {name}"
        )
        if arr is None:
            raise NoisysegInputError(f"prediction {name!r} missing", case=case_id, path=self.url)
        return arr
