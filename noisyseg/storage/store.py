"""The noisyseg volume store: one Zarr v3 store per dataset, OME-Zarr 0.5 conventions.

Layout (``<root>`` is any fsspec URL: a plain path, ``file://``, ``s3://``, ``gs://``)::

    <root>/zarr.json                     root group; attributes["noisyseg"] = store metadata
    <root>/cases/<case_id>/              one OME-Zarr 0.5 image per case
        zarr.json                        attributes["ome"] = {"version": "0.5", "multiscales": ...,
                                         "omero": ...}; attributes["noisyseg"] = spacing, affine,
                                         shape, channel names, source
        0/                               image array (C, Z, Y, X) or (C, Y, X), float32
        labels/zarr.json                 attributes["ome"]["labels"] = ["truth", <name>, ...]
        labels/<name>/                   OME label image ("image-label" + its own "multiscales")
            0/                           (Z, Y, X) or (Y, X) uint8 in {0, 1}
    <root>/index/cases.parquet           compacted dataset index, one row per case
    <root>/index/journal/<case_id>.json  index entries of cases written since the last compaction
    <root>/index/lesions/<set>.parquet   lesion table of one label set
    <root>/index/labelsets/<set>.json    label set metadata (params: mode, rate, seed, source, ...)
    <root>/.staging/                     hidden; cases being written (local stores)

Axis order is ``c, z, y, x`` (3D) or ``c, y, x`` (2D); spacing is in millimetres in the same
order and is the OME ``scale`` (``[1, *spacing]``). The NIfTI affine, when known, is kept in
``attributes["noisyseg"]["affine"]`` and maps NIfTI voxel ``(i, j, k)`` = store ``(x, y, z)``
to world coordinates (see :mod:`noisyseg.storage.ingest`).

Visibility and atomicity: **a case exists once its index entry exists** (a row in
``cases.parquet`` or a file in ``index/journal/``); :meth:`VolumeStore.case_ids`,
:meth:`VolumeStore.has_case` and the index only ever look there. :meth:`write_case` writes the
arrays first and the index entry last, as one small object written under a temporary name and
renamed (an atomic PUT on object stores). On local file systems the arrays are additionally
written under ``.staging/<case_id>-<uuid>`` and renamed into ``cases/<case_id>`` in one
``os.rename``, so no half-written case directory is ever at its final path; on object stores
(no atomic rename) they are written in place and an interrupted write leaves an unindexed,
invisible directory that the next write of that case replaces. A re-run therefore skips exactly
the cases in the index and rewrites the rest.

Concurrency: :meth:`write_case` and :meth:`write_label_set` of *different* cases may run in
parallel (Dask/Ray tasks, several processes): each touches only its own case directory and its
own journal file. Everything that rewrites shared index files — :meth:`compact`,
:meth:`register_label_set`, :meth:`set_split`, :meth:`set_clean` — is driver-side: one process,
while no writer runs. The index and the lesion tables are Parquet (columnar, 10⁴ cases and
10⁶ lesions read in well under a second), never one big JSON attribute.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V

STORE_FORMAT = "noisyseg-volume-store"
STORE_FORMAT_VERSION = 1
OME_VERSION = "0.5"
TRUTH = "truth"
#: Group, inside a case's group, that holds probability maps (``predictions/<name>/0``).
PREDICTIONS_GROUP = "predictions"
CASES_DIR = "cases"
STAGING_DIR = ".staging"
INDEX_DIR = "index"
CASES_PARQUET = f"{INDEX_DIR}/cases.parquet"
JOURNAL_DIR = f"{INDEX_DIR}/journal"
LESIONS_DIR = f"{INDEX_DIR}/lesions"
LABELSETS_DIR = f"{INDEX_DIR}/labelsets"
#: Target uncompressed chunk size (DESIGN.md: "chunks about 1 MB").
DEFAULT_CHUNK_BYTES = 1 << 20
#: Arrays larger than this are written with shards (``SHARD_FACTOR`` chunks per spatial axis).
DEFAULT_SHARD_THRESHOLD_BYTES = 256 << 20
SHARD_FACTOR = 4
SPATIAL_AXES = ("z", "y", "x")
#: Test hook: seconds :meth:`VolumeStore.write_case` sleeps between writing the arrays and
#: committing the case, so a test can kill a writer in the middle of a case.
PAUSE_ENV = "NOISYSEG_TEST_PAUSE_BEFORE_COMMIT"
LESION_STATUSES = ("present", "removed", "changed")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def axis_names(spatial_dims: int) -> tuple[str, ...]:
    """Spatial axis names in store order: ``("z", "y", "x")`` or ``("y", "x")``."""
    if spatial_dims not in (2, 3):
        raise NoisysegInputError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return SPATIAL_AXES[-spatial_dims:]


def chunk_shape(
    shape: Sequence[int], itemsize: int, target_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """Power-of-two chunk shape of about ``target_bytes`` (never more), clipped to ``shape``.

    Doubles axes round-robin from the last (fastest) one, so float32 3D gives ``64³`` (1 MiB),
    uint8 3D ``64×128×128`` (1 MiB), float32 2D ``512²``. An axis that reaches the array's extent
    stops growing and the budget goes to the others (thin anisotropic volumes still get ~1 MB).
    """
    chunk = [1] * len(shape)
    budget = max(1, target_bytes // max(1, itemsize))
    grew = True
    while grew:
        grew = False
        for ax in reversed(range(len(shape))):
            if chunk[ax] >= shape[ax]:
                continue
            new = min(chunk[ax] * 2, shape[ax])
            if math.prod(chunk) // chunk[ax] * new > budget:
                continue
            chunk[ax] = new
            grew = True
    return tuple(int(c) for c in chunk)


#: Blosc settings of the image arrays (float32): LZ4 with byte shuffle. Measured on 256³ float32
#: MRI-like volumes (benchmarks/RESULTS.md, "Patch loading"): decoding the chunks of a 96³ patch
#: costs 2.4 ms of CPU with LZ4 against 6.3 ms with Zstd level 1 (Zstd level 3: no faster), for
#: 10 % more bytes on disk (compression ratio 3.6 against 4.0). Patch reading is the hot path of
#: training, storage is cheap: LZ4. (DESIGN.md said Zstd; this is the measured trade-off.)
IMAGE_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
#: Blosc settings of the label arrays (uint8 in {0, 1}): LZ4, no shuffle. Bit-shuffle + Zstd
#: compressed sparse labels 4x better (ratio 175 against 45) but cost 3.0 ms of CPU per 96³ patch
#: to decode against 0.5 ms; labels are a small share of the store either way.
LABEL_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"}


def _codec(itemsize: int) -> BloscCodec:
    """The Blosc codec of new arrays: :data:`LABEL_BLOSC` for 1-byte items, else
    :data:`IMAGE_BLOSC`. Existing stores keep whatever codec their arrays were written with."""
    return BloscCodec(typesize=itemsize, **(LABEL_BLOSC if itemsize == 1 else IMAGE_BLOSC))


class RegionReader:
    """Array-like view of a Zarr array with a fast path for reading boxes (patches).

    ``reader[box]`` with ``box`` a tuple of unit-step slices equals ``array[box]``. For an
    unsharded array of a local store whose codecs are ``bytes`` (+ one Blosc compressor, or
    none) it reads the chunk files that the box touches directly and decodes them with Blosc in
    the calling thread: zarr's asynchronous pipeline costs two thread hand-offs per chunk, which
    made it 2-3x slower than the decoding itself (96³ float32 patches of 64³ chunks: 6.9 ms of
    CPU through ``array[box]``, 2.4 ms here). Every other array (sharded, remote stores, other
    codecs) and every other selection (steps, integers) goes through ``array[...]`` unchanged,
    where zarr fetches the chunks concurrently (what object stores need).

    The chunks of one box are decoded by a small per-process thread pool (Blosc and numpy's
    copies release the GIL): ``threads`` workers, default :data:`READ_THREADS` (environment
    ``NOISYSEG_READ_THREADS``, else ``min(4, CPU count)``); 1 decodes in the calling thread
    (what DataLoader worker processes use: there the processes are the parallelism).

    Args:
        array: a ``zarr.Array`` (anything with ``shape`` and ``__getitem__`` is passed through).
        threads: decoding threads for one box (see above).
    """

    def __init__(self, array: Any, threads: int | None = None) -> None:
        self.array = array
        self.threads = max(1, int(READ_THREADS if threads is None else threads))
        self.shape = tuple(int(s) for s in array.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype)
        self._plan = self._make_plan(array)

    @staticmethod
    def _make_plan(array: Any) -> tuple | None:
        try:
            from zarr.codecs import BytesCodec
            from zarr.core.chunk_grids import RegularChunkGrid

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
            store = array.store_path.store
            if not isinstance(store, zarr.storage.LocalStore):
                return None
            base = os.path.join(str(store.root), array.store_path.path)
            dtype = np.dtype(array.dtype)
            endian = getattr(codecs[0], "endian", None)
            if dtype.itemsize > 1 and endian is not None:
                dtype = dtype.newbyteorder(
                    "<" if str(getattr(endian, "value", endian)) == "little" else ">"
                )
            chunks = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
            fill = meta.fill_value
            return (base, chunks, dtype, meta.chunk_key_encoding, compressed, fill)
        except (AttributeError, ImportError, TypeError, ValueError):  # unknown metadata: zarr path
            return None

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
        import itertools

        chunks = self._plan[1]
        out = np.empty([b - a for a, b in zip(start, stop)], dtype=self.dtype)
        if out.size == 0:
            return out
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks)]
        keys = list(itertools.product(*ranges))
        if self.threads > 1 and len(keys) > 1:
            pool = _read_pool(self.threads)
            n = min(self.threads, len(keys))
            parts = [keys[i::n] for i in range(n)]
            ok = list(pool.map(lambda part: self._read_chunks(part, start, stop, out), parts))
        else:
            ok = [self._read_chunks(keys, start, stop, out)]
        return out if all(ok) else None

    def _read_chunks(
        self, keys: list[tuple[int, ...]], start: list[int], stop: list[int], out: np.ndarray
    ) -> bool:
        """Decode the chunks ``keys`` into their parts of ``out``; False: not a plain chunk."""
        import numcodecs.blosc

        base, chunks, disk_dtype, key_encoding, compressed, fill = self._plan
        buf = np.empty(chunks, dtype=disk_dtype)
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
            path = os.path.join(base, key_encoding.encode_chunk_key(idx))
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:  # never-written chunk: the fill value
                out[dst] = fill
                continue
            if compressed:
                # Blosc header: bytes 4-8 hold the uncompressed size (little-endian uint32)
                if len(data) < 16 or int.from_bytes(data[4:8], "little") != buf.nbytes:
                    return False  # not a plain chunk of this shape: let zarr decide
                numcodecs.blosc.decompress(data, buf)
                chunk = buf
            else:
                if len(data) != buf.nbytes:
                    return False
                chunk = np.frombuffer(data, dtype=disk_dtype).reshape(chunks)
            out[dst] = chunk[src]
        return True


#: Decoding threads of :class:`RegionReader` (environment ``NOISYSEG_READ_THREADS``).
READ_THREADS = int(os.environ.get("NOISYSEG_READ_THREADS", "0") or 0) or min(4, os.cpu_count() or 1)
_POOL: tuple[int, int, Any] | None = None  # (pid, workers, executor)


def _read_pool(workers: int) -> Any:
    """The process's decoding thread pool (re-created after a fork or for more workers)."""
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    pid = os.getpid()
    if _POOL is None or _POOL[0] != pid or _POOL[1] < workers:
        _POOL = (pid, workers, ThreadPoolExecutor(workers, thread_name_prefix="noisyseg-read"))
    return _POOL[2]


def channel_stats(image: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and (population) standard deviation over every voxel of an image.

    Args:
        image: ``(C, *S)`` real array.

    Returns:
        ``{"channel_mean": [C floats], "channel_std": [C floats]}``, accumulated in float64
        (the keys :meth:`VolumeStore.write_case` records in the case attributes).
    """
    means, stds = [], []
    for c in range(image.shape[0]):
        x = np.asarray(image[c])
        means.append(float(np.mean(x, dtype=np.float64)))
        stds.append(float(np.std(x, dtype=np.float64)))
    return {"channel_mean": means, "channel_std": stds}


def lesion_records(
    label: np.ndarray,
    spacing: Sequence[float],
    *,
    connectivity: int | None = None,
    status: str = "present",
) -> list[dict[str, Any]]:
    """Lesions of a binary label as records (one dict per connected component).

    Args:
        label: ``(*S)`` binary array, S = (Z, Y, X) or (Y, X).
        spacing: voxel spacing in mm, same axis order.
        connectivity: 26 (3D) / 8 (2D) by default; 6/18 or 4 allowed.
        status: value of the ``status`` column.

    Returns:
        records with ``lesion_id`` (1..K, raster order of first voxel), ``voxels``,
        ``volume_mm3`` (voxels × voxel volume; area in mm² for 2D), ``centroid_<axis>`` (voxel
        coordinates), ``bbox_min_<axis>`` / ``bbox_max_<axis>`` (voxel index, max exclusive)
        and ``status``.
    """
    import cc3d

    arr = np.asarray(label)
    nd = arr.ndim
    axes = axis_names(nd)
    if connectivity is None:
        connectivity = 26 if nd == 3 else 8
    cc, n = cc3d.connected_components(
        np.ascontiguousarray(arr != 0, dtype=np.uint8), connectivity=connectivity, return_N=True
    )
    if n == 0:
        return []
    stats = cc3d.statistics(cc)
    voxel_volume = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    records = []
    for lid in range(1, n + 1):
        count = int(stats["voxel_counts"][lid])
        rec: dict[str, Any] = {
            "lesion_id": lid,
            "voxels": count,
            "volume_mm3": count * voxel_volume,
        }
        centroid = stats["centroids"][lid]
        bbox = stats["bounding_boxes"][lid]
        for i, ax in enumerate(axes):
            rec[f"centroid_{ax}"] = float(centroid[i])
        for i, ax in enumerate(axes):
            rec[f"bbox_min_{ax}"] = int(bbox[i].start)
        for i, ax in enumerate(axes):
            rec[f"bbox_max_{ax}"] = int(bbox[i].stop)
        rec["status"] = status
        records.append(rec)
    return records


def lesion_columns(spatial_dims: int) -> list[str]:
    """Fixed leading columns of the lesion table."""
    axes = axis_names(spatial_dims)
    return (
        ["case_id", "label_set", "lesion_id", "voxels", "volume_mm3"]
        + [f"centroid_{a}" for a in axes]
        + [f"bbox_min_{a}" for a in axes]
        + [f"bbox_max_{a}" for a in axes]
        + ["status"]
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


class VolumeStore:
    """A dataset of cases (image + label sets) in one Zarr v3 / OME-Zarr 0.5 store.

    Create with :meth:`create`, open with :meth:`open`. Instances pickle as (url, mode,
    storage_options) and reopen lazily in the receiving process (Dask/Ray workers, DataLoader
    workers).
    """

    url: str
    mode: str
    spatial_dims: int
    channel_names: list[str]

    # ---- construction -----------------------------------------------------------------------

    def __init__(
        self, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None
    ) -> None:
        """Prefer :meth:`open` / :meth:`create`. Reads the root metadata, raises if absent."""
        if mode not in ("r", "r+"):
            raise NoisysegInputError(f"store mode must be 'r' or 'r+', got {mode!r}", path=str(url))
        self.url = str(url)
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        self._connect()
        meta = self._read_root_meta()
        if meta is None:
            raise NoisysegInputError("no noisyseg store here (missing store)", path=self.url)
        self._meta = meta
        self.spatial_dims = int(meta["spatial_dims"])
        self.channel_names = list(meta["channel_names"])

    def _connect(self) -> None:
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        self._local = _is_local(self.fs)
        read_only = self.mode == "r"
        if self._local:
            self.zstore = zarr.storage.LocalStore(self.root, read_only=read_only)
        else:
            self.zstore = zarr.storage.FsspecStore.from_url(
                self.url, storage_options=self.storage_options or None, read_only=read_only
            )
        self._array_cache: dict[tuple[str, str], Any] = {}
        self._attr_cache: dict[str, dict] = {}
        self._ids_cache: tuple[Any, frozenset[str]] | None = None

    def _read_root_meta(self) -> dict | None:
        try:
            if not self.fs.exists(self._p("zarr.json")):
                return None
            with self.fs.open(self._p("zarr.json"), "rb") as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            return None
        meta = (doc.get("attributes") or {}).get("noisyseg")
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            return None
        return meta

    def __getstate__(self) -> dict:
        return {
            "url": self.url,
            "mode": self.mode,
            "storage_options": self.storage_options,
            "meta": self._meta,
        }

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self.mode = state["mode"]
        self.storage_options = state["storage_options"]
        self._meta = state["meta"]
        self.spatial_dims = int(self._meta["spatial_dims"])
        self.channel_names = list(self._meta["channel_names"])
        self._connect()

    def __repr__(self) -> str:
        return f"VolumeStore({self.url!r}, mode={self.mode!r}, spatial_dims={self.spatial_dims})"

    @classmethod
    def create(
        cls,
        url: str,
        *,
        spatial_dims: int,
        channel_names: Sequence[str],
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        shard_threshold_bytes: int = DEFAULT_SHARD_THRESHOLD_BYTES,
        attrs: Mapping[str, Any] | None = None,
        truth_params: Mapping[str, Any] | None = None,
    ) -> VolumeStore:
        """Create an empty store at ``url`` and return it opened ``"r+"``.

        ``truth_params`` describe where the truth labels come from (label set metadata).
        Raises NoisysegInputError when a store already exists there (unless ``overwrite``) or
        when ``url`` is an existing non-empty location that is not a noisyseg store (never
        deleted, even with ``overwrite``).
        """
        axis_names(spatial_dims)
        names = [str(c) for c in channel_names]
        if not names:
            raise NoisysegInputError("a store needs at least one channel name", path=str(url))
        fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
        root = root.rstrip("/") or "/"
        if fs.exists(root):
            existing = fs.ls(root, detail=False) if fs.isdir(root) else [root]
            if existing:
                try:
                    cls(str(url), "r", storage_options)
                    is_store = True
                except NoisysegInputError:
                    is_store = False
                if not is_store:
                    raise NoisysegInputError(
                        "path exists and is not a noisyseg store (refusing to overwrite)",
                        path=str(url),
                    )
                if not overwrite:
                    raise NoisysegInputError(
                        "store already exists (pass overwrite to replace it)", path=str(url)
                    )
                fs.rm(root, recursive=True)
        meta = {
            "format": STORE_FORMAT,
            "format_version": STORE_FORMAT_VERSION,
            "spatial_dims": int(spatial_dims),
            "channel_names": names,
            "axes": ["c", *axis_names(spatial_dims)],
            "chunk_bytes": int(chunk_bytes),
            "shard_threshold_bytes": int(shard_threshold_bytes),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(attrs or {}),
        }
        if _is_local(fs):
            fs.makedirs(root, exist_ok=True)
            zstore = zarr.storage.LocalStore(root)
        else:
            zstore = zarr.storage.FsspecStore.from_url(
                str(url), storage_options=dict(storage_options or {}) or None
            )
        group = zarr.open_group(
            store=zstore, mode="w", zarr_format=3, attributes={"noisyseg": meta}
        )
        group.create_group(CASES_DIR)
        store = cls(str(url), "r+", storage_options)
        store._write_json(
            f"{LABELSETS_DIR}/{TRUTH}.json",
            {"name": TRUTH, "params": dict(truth_params or {"source": "annotation"})},
        )
        return store

    @classmethod
    def open(
        cls, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None
    ) -> VolumeStore:
        """Open an existing store (``mode`` ``"r"`` or ``"r+"``); a missing store raises."""
        return cls(str(url), mode, storage_options)

    # ---- low-level file helpers -------------------------------------------------------------

    def _p(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise NoisysegInputError("store is opened read-only (mode 'r')", path=self.url)

    def _write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write a whole file under a temporary name, then rename it into place."""
        final = self._p(rel)
        parent = posixpath.dirname(final)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(final)}")
        if self._local:
            os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        else:
            # An object PUT is atomic by itself; writing the final key directly is the safe path.
            with self.fs.open(final, "wb") as fh:
                fh.write(data)

    def _write_json(self, rel: str, doc: Any) -> None:
        self._write_bytes_atomic(rel, json.dumps(doc, default=_json_default).encode())

    def _read_json(self, rel: str) -> Any:
        with self.fs.open(self._p(rel), "rb") as fh:
            return json.load(fh)

    def _write_parquet(self, rel: str, df: pd.DataFrame) -> None:
        if rel.startswith(LESIONS_DIR + "/") and len(df):
            df = df.sort_values(["case_id", "lesion_id"], kind="stable")
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, engine="pyarrow")
        self._write_bytes_atomic(rel, buf.getvalue())

    def _read_parquet(self, rel: str) -> pd.DataFrame | None:
        path = self._p(rel)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            return pd.read_parquet(io.BytesIO(fh.read()), engine="pyarrow")

    def _list(self, rel: str, suffix: str) -> list[str]:
        path = self._p(rel)
        try:
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            base = posixpath.basename(str(name).rstrip("/"))
            if base.endswith(suffix) and not base.startswith("."):
                out.append(base[: -len(suffix)])
        return sorted(out)

    # ---- index --------------------------------------------------------------------------------

    def _journal(self) -> dict[str, dict]:
        return {
            cid: self._read_json(f"{JOURNAL_DIR}/{cid}.json")
            for cid in self._list(JOURNAL_DIR, ".json")
        }

    @staticmethod
    def _entry_row(entry: dict) -> dict:
        case = dict(entry["case"])
        counts = case.pop("n_lesions", {}) or {}
        for name, n in counts.items():
            case[f"n_lesions_{name}"] = n
        return case

    def _base_cases(self) -> pd.DataFrame:
        df = self._read_parquet(CASES_PARQUET)
        if df is None:
            df = pd.DataFrame(
                columns=["case_id", "split", "clean", "n_channels", "shape", "spacing", "source"]
            )
        return df

    @staticmethod
    def _normalise_index(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        for col in ("shape", "spacing"):
            if col in df.columns:
                df[col] = [tuple(v.tolist() if hasattr(v, "tolist") else v) for v in df[col]]
        df["shape"] = [tuple(int(x) for x in v) for v in df["shape"]]
        df["spacing"] = [tuple(float(x) for x in v) for v in df["spacing"]]
        df["clean"] = df["clean"].astype(bool)
        for col in [c for c in df.columns if c.startswith("n_lesions_")]:
            df[col] = df[col].astype("Int64")
        lead = ["case_id", "split", "clean", "n_channels", "shape", "spacing", "source"]
        counts = sorted(c for c in df.columns if c.startswith("n_lesions_"))
        counts = [c for c in counts if c == f"n_lesions_{TRUTH}"] + [
            c for c in counts if c != f"n_lesions_{TRUTH}"
        ]
        rest = [c for c in df.columns if c not in lead and c not in counts]
        return df[lead + counts + rest].sort_values("case_id").reset_index(drop=True)

    def index(self) -> pd.DataFrame:
        """The dataset index: one row per visible case, sorted by ``case_id``.

        Columns: ``case_id``, ``split``, ``clean`` (bool), ``n_channels``, ``shape`` (spatial,
        tuple), ``spacing`` (mm, tuple), ``source``, ``n_lesions_<set>`` (Int64, lesions
        present in that label set; missing when the case has no such set), then extras.
        """
        base = self._base_cases()
        journal = self._journal()
        if journal:
            rows = pd.DataFrame([self._entry_row(e) for e in journal.values()])
            base = base[~base["case_id"].isin(list(journal))]
            base = rows if base.empty else pd.concat([base, rows], ignore_index=True)
        if base.empty:
            return self._normalise_index(base.astype(object))
        return self._normalise_index(base)

    def case_ids(self, split: str | None = None, clean: bool | None = None) -> list[str]:
        """Sorted ids of visible cases, optionally filtered by split and clean flag."""
        df = self.index()
        if split is not None:
            V.check_split(split)
            df = df[df["split"] == split]
        if clean is not None:
            df = df[df["clean"] == bool(clean)]
        return df["case_id"].tolist()

    def has_case(self, case_id: str) -> bool:
        """True when the case is visible (in the index)."""
        if not isinstance(case_id, str) or not V._is_safe_name(case_id):
            return False
        if self.fs.exists(self._p(f"{JOURNAL_DIR}/{case_id}.json")):
            return True
        return case_id in self._compacted_ids()

    def _compacted_ids(self) -> frozenset[str]:
        path = self._p(CASES_PARQUET)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return frozenset()
        key = tuple(info.get(k) for k in ("mtime", "size", "ino", "ETag", "LastModified"))
        if self._ids_cache is None or self._ids_cache[0] != key:
            df = self._read_parquet(CASES_PARQUET)
            ids = frozenset(df["case_id"].tolist()) if df is not None else frozenset()
            self._ids_cache = (key, ids)
        return self._ids_cache[1]

    def _require_case(self, case_id: str) -> None:
        if not self.has_case(case_id):
            raise NoisysegInputError("case not in store", case=str(case_id), path=self.url)

    def label_sets(self) -> list[str]:
        """Registered label sets: ``"truth"`` first, then the others sorted."""
        names = self._list(LABELSETS_DIR, ".json")
        return [TRUTH] + sorted(n for n in names if n != TRUTH)

    def label_set_info(self, name: str) -> dict:
        """Metadata of a registered label set (``params``: mode, rate, seed, source, ...)."""
        V.check_label_set_name(name)
        try:
            return self._read_json(f"{LABELSETS_DIR}/{name}.json")
        except FileNotFoundError:
            raise NoisysegInputError(f"label set {name!r} not in store", path=self.url) from None

    def lesion_table(self, label_set: str | None = None) -> pd.DataFrame:
        """Lesion table, one row per lesion (all label sets, or one).

        Columns: see :func:`lesion_columns` (``case_id``, ``label_set``, ``lesion_id``,
        ``voxels``, ``volume_mm3``, ``centroid_*``, ``bbox_min_*``, ``bbox_max_*``, ``status``)
        plus any extra keys the writer recorded. Sorted by label set, case, lesion id.
        """
        if label_set is not None:
            V.check_label_set_name(label_set)
            names = [label_set]
        else:
            names = sorted(set(self._list(LESIONS_DIR, ".parquet")) | set(self.label_sets()))
        journal = self._journal()
        frames = []
        for name in names:
            df = self._read_parquet(f"{LESIONS_DIR}/{name}.parquet")
            if df is not None and journal:
                df = df[~df["case_id"].isin(list(journal))]
            if df is not None and not df.empty:
                frames.append(df)
            recs = [
                {"case_id": cid, "label_set": name, **r}
                for cid, e in journal.items()
                for r in (e.get("lesions", {}).get(name) or [])
            ]
            if recs:
                frames.append(pd.DataFrame(recs))
        cols = lesion_columns(self.spatial_dims)
        if not frames:
            return pd.DataFrame(
                {
                    c: pd.Series(dtype=object if c in ("case_id", "label_set", "status") else float)
                    for c in cols
                }
            )
        # Stored tables are written sorted; only a merge of several pieces needs a sort.
        df = (
            frames[0].reset_index(drop=True)
            if len(frames) == 1
            else pd.concat(frames, ignore_index=True)
        )
        for c in cols:
            if c not in df.columns:
                df[c] = np.nan
        df = df[cols + [c for c in df.columns if c not in cols]]
        if len(frames) > 1:
            df = df.sort_values(["label_set", "case_id", "lesion_id"], kind="stable").reset_index(
                drop=True
            )
        return df

    def compact(self) -> int:
        """Fold journal entries into ``cases.parquet`` and the lesion tables (driver-side).

        Idempotent and crash-safe: files are replaced atomically and journal entries are deleted
        only after; a journal entry always overrides the compacted row of the same case.
        Returns the number of journal entries folded.
        """
        self._require_writable()
        journal = self._journal()
        if not journal:
            return 0
        ids = list(journal)
        base = self._base_cases()
        base = base[~base["case_id"].isin(ids)]
        rows = pd.DataFrame([self._entry_row(e) for e in journal.values()])
        cases = rows if base.empty else pd.concat([base, rows], ignore_index=True)
        set_names = set(self._list(LESIONS_DIR, ".parquet"))
        for e in journal.values():
            set_names |= set((e.get("lesions") or {}).keys())
        for name in sorted(set_names):
            old = self._read_parquet(f"{LESIONS_DIR}/{name}.parquet")
            recs = [
                {"case_id": cid, "label_set": name, **r}
                for cid, e in journal.items()
                for r in ((e.get("lesions") or {}).get(name) or [])
            ]
            touched = old is not None and old["case_id"].isin(ids).any()
            if not recs and not touched:
                continue
            parts = []
            if old is not None:
                parts.append(old[~old["case_id"].isin(ids)])
            if recs:
                parts.append(pd.DataFrame(recs))
            df = (
                pd.concat([p for p in parts if not p.empty], ignore_index=True)
                if any(not p.empty for p in parts)
                else pd.DataFrame(columns=lesion_columns(self.spatial_dims))
            )
            self._write_parquet(f"{LESIONS_DIR}/{name}.parquet", df)
        self._write_parquet(CASES_PARQUET, self._normalise_index(cases))
        for cid in ids:
            try:
                self.fs.rm(self._p(f"{JOURNAL_DIR}/{cid}.json"))
            except FileNotFoundError:
                pass
        return len(ids)

    commit = compact

    def _rewrite_cases(self, fn) -> None:
        self.compact()
        df = self.index()
        df = fn(df)
        self._write_parquet(CASES_PARQUET, self._normalise_index(df))

    def set_split(self, case_ids: Iterable[str] | str, split: str) -> None:
        """Assign ``split`` (train/val/test) to the given cases (driver-side)."""
        self._require_writable()
        V.check_split(split)
        ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        for cid in ids:
            self._require_case(cid)

        def fn(df: pd.DataFrame) -> pd.DataFrame:
            df.loc[df["case_id"].isin(ids), "split"] = split
            return df

        self._rewrite_cases(fn)

    def set_clean(self, case_ids: Iterable[str] | str, clean: bool = True) -> None:
        """Flag the given cases as clean (trusted annotation) or not (driver-side)."""
        self._require_writable()
        ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        for cid in ids:
            self._require_case(cid)

        def fn(df: pd.DataFrame) -> pd.DataFrame:
            df.loc[df["case_id"].isin(ids), "clean"] = bool(clean)
            return df

        self._rewrite_cases(fn)

    # ---- writing cases ------------------------------------------------------------------------

    def _array_layout(
        self, shape: Sequence[int], itemsize: int, channel_axis: bool
    ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        spatial = tuple(shape[1:]) if channel_axis else tuple(shape)
        chunks = chunk_shape(
            spatial, itemsize, int(self._meta.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
        )
        shards = None
        nbytes = math.prod(shape) * itemsize
        if nbytes > int(self._meta.get("shard_threshold_bytes", DEFAULT_SHARD_THRESHOLD_BYTES)):
            shards = tuple(min(s, c * SHARD_FACTOR) for s, c in zip(spatial, chunks))
            # shard extents must be multiples of the chunk extents
            shards = tuple(max(c, (s // c) * c) for s, c in zip(shards, chunks))
        if channel_axis:
            chunks = (1, *chunks)
            shards = (1, *shards) if shards else None
        return chunks, shards

    def _create_array(
        self,
        group: zarr.Group,
        shape: Sequence[int],
        dtype: type[np.generic],
        *,
        channel_axis: bool,
        layout_itemsize: int | None = None,
    ) -> zarr.Array:
        """Array ``"0"`` of an OME group: zero-filled, Blosc-compressed, chunked by
        :meth:`_array_layout` for ``layout_itemsize`` bytes a voxel (default: ``dtype``'s size).

        Args:
            shape: ``(C, *spatial)`` when ``channel_axis`` else ``spatial``.
        """
        dt = np.dtype(dtype)
        chunks, shards = self._array_layout(
            shape, layout_itemsize or dt.itemsize, channel_axis=channel_axis
        )
        spatial_names = list(axis_names(self.spatial_dims))
        return group.create_array(
            "0",
            shape=tuple(shape),
            dtype=dt,
            chunks=chunks,
            shards=shards,
            compressors=[_codec(dt.itemsize)],
            fill_value=0.0 if dt.kind == "f" else 0,
            dimension_names=["c", *spatial_names] if channel_axis else spatial_names,
        )

    def _multiscales(self, name: str, spacing: Sequence[float], channel_axis: bool) -> list[dict]:
        axes = [{"name": "c", "type": "channel"}] if channel_axis else []
        axes += [
            {"name": a, "type": "space", "unit": "millimeter"}
            for a in axis_names(self.spatial_dims)
        ]
        scale = ([1.0] if channel_axis else []) + [float(s) for s in spacing]
        return [
            {
                "name": name,
                "axes": axes,
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                ],
            }
        ]

    def _write_label_group(
        self, labels_group: zarr.Group, name: str, label: np.ndarray, spacing: Sequence[float]
    ) -> None:
        attrs = {
            "ome": {
                "version": OME_VERSION,
                "image-label": {
                    "colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]}],
                    "properties": [{"label-value": 1, "class": "lesion"}],
                    "source": {"image": "../../"},
                },
                "multiscales": self._multiscales(name, spacing, channel_axis=False),
            }
        }
        g = labels_group.create_group(name, attributes=attrs, overwrite=True)
        arr = self._create_array(g, label.shape, np.uint8, channel_axis=False)
        arr[...] = label

    def write_case(
        self,
        case_id: str,
        image: np.ndarray,
        labels: Mapping[str, np.ndarray],
        *,
        spacing: Sequence[float],
        affine: np.ndarray | None = None,
        split: str = "train",
        clean: bool = False,
        source: str | None = None,
        overwrite: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Validate and write one case atomically (visible only once complete).

        Args:
            case_id: safe id (``^[A-Za-z0-9][A-Za-z0-9._-]*$``, no ``..``).
            image: ``(C, *S)`` real array, stored as float32; C = len(channel_names).
            labels: label sets, must include ``"truth"``; each ``(*S)`` binary (stored uint8).
            spacing: voxel spacing in mm, store axis order (z, y, x) or (y, x).
            affine: optional 4x4 NIfTI affine (voxel (i,j,k) = store (x,y,z) -> world mm).
            split: ``train``/``val``/``test``. clean: trusted annotation flag.
            source: provenance string (e.g. the source file). extra: JSON-able attrs to keep.

        The case attributes also record ``channel_mean`` / ``channel_std`` (per channel, float64
        mean and population std over the whole image, :func:`channel_stats`) unless ``extra``
        gives them.
            overwrite: replace a case that is already in the store.

        Raises:
            NoisysegInputError naming the case and the rule broken; nothing is written then.
        """
        self._require_writable()
        cid = V.check_case_id(case_id)
        V.check_split(split, case=cid)
        img = V.check_image(
            image, n_channels=len(self.channel_names), spatial_dims=self.spatial_dims, case=cid
        )
        sp = V.check_spacing(spacing, self.spatial_dims, case=cid)
        aff = V.check_affine(affine, case=cid)
        if TRUTH not in labels:
            raise NoisysegInputError("labels must include the 'truth' label set", case=cid)
        checked: dict[str, np.ndarray] = {}
        for name, lab in labels.items():
            V.check_label_set_name(name)
            checked[name] = V.check_label(
                lab, shape=img.shape[1:], case=cid, name=f"label set {name!r}"
            )
        if not overwrite and self.has_case(cid):
            raise NoisysegInputError(
                "case already in store (duplicate case id)", case=cid, path=self.url
            )

        lesions = {name: lesion_records(lab, sp) for name, lab in checked.items()}
        spatial_shape = [int(s) for s in img.shape[1:]]
        noisyseg_attrs = {
            "case_id": cid,
            "spacing": list(sp),
            "shape": spatial_shape,
            "channel_names": list(self.channel_names),
            "affine": aff.tolist() if aff is not None else None,
            "source": source or "",
            # z-score statistics over the whole image (the patch loader and inference use them);
            # statistics the caller passes in ``extra`` (e.g. dataset-wide ones) take precedence
            **channel_stats(img),
            **dict(extra or {}),
        }
        omero = {
            "channels": [
                {
                    "label": name,
                    "active": True,
                    "color": "FFFFFF",
                    "window": {
                        "min": float(img[c].min()),
                        "max": float(img[c].max()),
                        "start": float(img[c].min()),
                        "end": float(img[c].max()),
                    },
                }
                for c, name in enumerate(self.channel_names)
            ]
        }
        attrs = {
            "ome": {
                "version": OME_VERSION,
                "multiscales": self._multiscales(cid, sp, True),
                "omero": omero,
            },
            "noisyseg": noisyseg_attrs,
        }
        final_rel = f"{CASES_DIR}/{cid}"
        write_rel = f"{STAGING_DIR}/{cid}-{uuid.uuid4().hex[:12]}" if self._local else final_rel
        group = zarr.open_group(
            store=self.zstore, path=write_rel, mode="w", zarr_format=3, attributes=attrs
        )
        arr = self._create_array(group, img.shape, np.float32, channel_axis=True)
        arr[...] = img
        labels_group = group.create_group(
            "labels", attributes={"ome": {"version": OME_VERSION, "labels": list(checked)}}
        )
        for name, lab in checked.items():
            self._write_label_group(labels_group, name, lab, sp)
        pause = os.environ.get(PAUSE_ENV)
        if pause:  # test hook: lets a test kill the writer with the arrays written, uncommitted
            time.sleep(float(pause))
        if self._local:
            src, dst = self._p(write_rel), self._p(final_rel)
            if os.path.lexists(dst):
                # an unindexed leftover of an interrupted run, or the case being overwritten
                shutil.rmtree(dst)
            os.rename(src, dst)
        self._forget(cid)
        entry = {
            "case": {
                "case_id": cid,
                "split": split,
                "clean": bool(clean),
                "n_channels": int(img.shape[0]),
                "shape": spatial_shape,
                "spacing": list(sp),
                "source": source or "",
                "n_lesions": {name: len(recs) for name, recs in lesions.items()},
            },
            "lesions": lesions,
        }
        # The index entry is written last: this is the commit point of the case.
        self._write_json(f"{JOURNAL_DIR}/{cid}.json", entry)

    def cleanup_staging(self) -> int:
        """Remove leftovers of interrupted writes under ``.staging`` (driver-side, no writer
        running). Returns how many entries were removed."""
        self._require_writable()
        path = self._p(STAGING_DIR)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return 0
        n = 0
        for e in entries:
            if posixpath.basename(str(e).rstrip("/")) == "zarr.json":
                continue
            self.fs.rm(e, recursive=True)
            n += 1
        return n

    # ---- label sets ---------------------------------------------------------------------------

    def write_label_set(
        self,
        case_id: str,
        name: str,
        array: np.ndarray,
        *,
        records: list[dict] | None = None,
        overwrite: bool = False,
    ) -> list[dict]:
        """Write a derived label set of one case next to its truth (safe in parallel tasks of
        different cases). Never writes ``truth``; never replaces an existing set unless
        ``overwrite``.

        Args:
            array: ``(*S)`` binary label. records: lesion records (see :func:`lesion_records`;
                may include ``status`` "removed"/"changed" rows); computed from ``array`` when None.

        Returns:
            the records, each with ``case_id`` and ``label_set`` filled in. Pass them (grouped by
            case) to :meth:`register_label_set` on the driver to index the set.
        """
        self._require_writable()
        V.check_label_set_name(name)
        cid = V.check_case_id(case_id)
        if name == TRUTH:
            raise NoisysegInputError("the 'truth' label set is never overwritten", case=cid)
        self._require_case(cid)
        info = self._case_attrs(cid)
        lab = V.check_label(array, shape=info["shape"], case=cid, name=f"label set {name!r}")
        labels_rel = f"{CASES_DIR}/{cid}/labels"
        final = self._p(f"{labels_rel}/{name}")
        if self.fs.exists(final) and not overwrite:
            raise NoisysegInputError(
                f"label set {name!r} already exists (never overwritten)", case=cid
            )
        labels_group = zarr.open_group(store=self.zstore, path=labels_rel, mode="r+")
        if self._local:
            tmp_name = f".tmp-{name}-{uuid.uuid4().hex[:12]}"
            self._write_label_group(labels_group, tmp_name, lab, info["spacing"])
            # fix the multiscales name of the staged group before the rename
            g = zarr.open_group(store=self.zstore, path=f"{labels_rel}/{tmp_name}", mode="r+")
            ome = dict(g.attrs["ome"])
            ome["multiscales"] = self._multiscales(name, info["spacing"], channel_axis=False)
            g.attrs["ome"] = ome
            if os.path.lexists(final):
                shutil.rmtree(final)
            os.rename(self._p(f"{labels_rel}/{tmp_name}"), final)
        else:
            self._write_label_group(labels_group, name, lab, info["spacing"])
        ome = dict(labels_group.attrs.get("ome", {"version": OME_VERSION}))
        names = list(ome.get("labels", []))
        if name not in names:
            names.append(name)
        ome["labels"] = names
        labels_group.attrs["ome"] = ome
        self._array_cache.pop((cid, name), None)
        if records is None:
            records = lesion_records(lab, info["spacing"])
        return [{**r, "case_id": cid, "label_set": name} for r in records]

    def register_label_set(
        self,
        name: str,
        records_by_case: Mapping[str, Sequence[Mapping[str, Any]]],
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Index a derived label set (driver-side, after all :meth:`write_label_set` calls).

        Writes the set's lesion table (``index/lesions/<name>.parquet``; rows of the given cases
        replaced), its ``n_lesions_<name>`` index column (records whose status is not
        "removed") and its metadata ``index/labelsets/<name>.json`` with ``params``
        (mode, rate, seed, source, ...).
        """
        self._require_writable()
        V.check_label_set_name(name)
        if name == TRUTH:
            raise NoisysegInputError("the 'truth' label set is never overwritten")
        for cid in records_by_case:
            self._require_case(cid)
        self.compact()
        recs = [
            {**dict(r), "case_id": cid, "label_set": name}
            for cid, rs in records_by_case.items()
            for r in rs
        ]
        old = self._read_parquet(f"{LESIONS_DIR}/{name}.parquet")
        parts = []
        if old is not None:
            parts.append(old[~old["case_id"].isin(list(records_by_case))])
        if recs:
            parts.append(pd.DataFrame(recs))
        parts = [p for p in parts if not p.empty]
        df = (
            pd.concat(parts, ignore_index=True)
            if parts
            else pd.DataFrame(columns=lesion_columns(self.spatial_dims))
        )
        self._write_parquet(f"{LESIONS_DIR}/{name}.parquet", df)
        counts = {
            cid: sum(1 for r in rs if r.get("status", "present") != "removed")
            for cid, rs in records_by_case.items()
        }
        col = f"n_lesions_{name}"

        def fn(cases: pd.DataFrame) -> pd.DataFrame:
            if col not in cases.columns:
                cases[col] = pd.array([pd.NA] * len(cases), dtype="Int64")
            mask = cases["case_id"].isin(list(counts))
            cases.loc[mask, col] = cases.loc[mask, "case_id"].map(counts).astype("Int64")
            return cases

        self._rewrite_cases(fn)
        self._write_json(
            f"{LABELSETS_DIR}/{name}.json",
            {
                "name": name,
                "params": dict(params or {}),
                "n_cases": len(records_by_case),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    # ---- reading ------------------------------------------------------------------------------

    def _forget(self, case_id: str) -> None:
        self._attr_cache.pop(case_id, None)
        for key in [k for k in self._array_cache if k[0] == case_id]:
            del self._array_cache[key]

    def _case_attrs(self, case_id: str) -> dict:
        if case_id not in self._attr_cache:
            V.check_case_id(case_id)
            try:
                doc = self._read_json(f"{CASES_DIR}/{case_id}/zarr.json")
            except FileNotFoundError:
                raise NoisysegInputError("case not in store", case=case_id, path=self.url) from None
            self._attr_cache[case_id] = doc["attributes"]["noisyseg"]
        return self._attr_cache[case_id]

    def case_attrs(self, case_id: str) -> dict:
        """The case's stored attributes (a copy; one small JSON read, then cached).

        Keys: ``case_id``, ``spacing`` (mm, store axis order), ``shape`` (spatial),
        ``channel_names``, ``affine`` (4x4 nested list or None), ``source``, ``channel_mean`` /
        ``channel_std`` (per channel, over the whole image; absent in stores written before they
        were recorded), plus the ``extra`` given to :meth:`write_case`. Unlike :meth:`case_info`
        it does not read the index.
        """
        return dict(self._case_attrs(case_id))

    def _open_array(self, case_id: str, key: str, rel: str) -> Any:
        ck = (case_id, key)
        if ck not in self._array_cache:
            V.check_case_id(case_id)
            try:
                self._array_cache[ck] = zarr.open_array(store=self.zstore, path=rel, mode="r")
            except FileNotFoundError:  # zarr's ArrayNotFoundError subclasses it
                return None
        return self._array_cache[ck]

    def image(self, case_id: str) -> zarr.Array:
        """The case's image as a lazy Zarr array ``(C, *S)`` float32 (nothing read yet)."""
        arr = self._open_array(case_id, "\0image", f"{CASES_DIR}/{case_id}/0")
        if arr is None:
            raise NoisysegInputError("case not in store", case=case_id, path=self.url)
        return arr

    def labels(self, case_id: str, name: str = TRUTH) -> zarr.Array:
        """A label set of the case as a lazy Zarr array ``(*S)`` uint8 in {0, 1}."""
        V.check_label_set_name(name)
        arr = self._open_array(case_id, name, f"{CASES_DIR}/{case_id}/labels/{name}/0")
        if arr is None:
            if self._open_array(case_id, "\0image", f"{CASES_DIR}/{case_id}/0") is None:
                raise NoisysegInputError("case not in store", case=case_id, path=self.url)
            raise NoisysegInputError(f"label set {name!r} missing", case=case_id, path=self.url)
        return arr

    def case_label_sets(self, case_id: str) -> list[str]:
        """Label sets present in the case's ``labels`` group."""
        try:
            doc = self._read_json(f"{CASES_DIR}/{case_id}/labels/zarr.json")
        except FileNotFoundError:
            raise NoisysegInputError("case not in store", case=case_id, path=self.url) from None
        return list(doc["attributes"]["ome"]["labels"])

    def spacing(self, case_id: str) -> tuple[float, ...]:
        """Voxel spacing in mm, store axis order (z, y, x) or (y, x)."""
        return tuple(float(s) for s in self._case_attrs(case_id)["spacing"])

    def case_info(self, case_id: str) -> dict:
        """Everything known about a case: split, clean, shape, spacing, affine (ndarray or None),
        channel names, source, label sets and lesion counts."""
        attrs = dict(self._case_attrs(case_id))
        df = self.index()
        row = df[df["case_id"] == case_id]
        if row.empty:
            raise NoisysegInputError("case not in store", case=case_id, path=self.url)
        info = {
            k: v
            for k, v in row.iloc[0].to_dict().items()
            if not (k.startswith("n_lesions_") and pd.isna(v))
        }
        attrs["affine"] = np.asarray(attrs["affine"]) if attrs.get("affine") is not None else None
        attrs["shape"] = tuple(attrs["shape"])
        attrs["spacing"] = tuple(attrs["spacing"])
        info.update(attrs)
        info["label_sets"] = self.case_label_sets(case_id)
        return info

    # ---- predictions --------------------------------------------------------------------------

    def write_prediction(self, case_id: str, name: str, array: np.ndarray) -> str:
        """Write a probability map of a case to ``cases/<id>/predictions/<name>/0``.

        Layout (the one :func:`noisyseg.distributed.inference.write_prediction` wrote, so earlier
        maps stay readable): group ``predictions/<name>`` with ``attributes["ome"]`` =
        ``{"version": "0.5", "multiscales": ...}`` (axes ``z, y, x`` / ``y, x``, ``scale`` = the
        case's spacing in mm) and ``attributes["noisyseg"]`` = ``{"kind": "probability",
        "case_id": ...}``; one float32 array ``"0"`` of shape ``(*S)``, chunked like the labels.
        A re-run replaces the map. On local stores the new map is written under a hidden name
        and renamed into place, so a reader never sees a half-written map.

        Args:
            case_id: a case of the store. name: safe name (as for label sets).
            array: ``(*S)`` probabilities (any real dtype, stored as float32), the case's
                spatial shape, finite.

        Returns:
            the array's path inside the store, ``cases/<id>/predictions/<name>/0``.

        Raises:
            NoisysegInputError: read-only store, unsafe name, unknown case, wrong shape,
                non-finite values.
        """
        self._require_writable()
        V.check_label_set_name(name)
        cid = V.check_case_id(case_id)
        self._require_case(cid)
        info = self._case_attrs(cid)
        shape = tuple(int(s) for s in info["shape"])
        data = np.asarray(array)
        if data.shape != shape:
            raise NoisysegInputError(
                f"prediction {name!r} has shape {data.shape}, the case's image {shape}", case=cid
            )
        if not np.issubdtype(data.dtype, np.number) or np.issubdtype(
            data.dtype, np.complexfloating
        ):
            raise NoisysegInputError(
                f"prediction {name!r} is not real-valued ({data.dtype})", case=cid
            )
        data = data.astype(np.float32, copy=False)
        if not np.isfinite(data).all():
            raise NoisysegInputError(f"prediction {name!r} has NaN/Inf values", case=cid)
        spacing = [float(x) for x in info["spacing"]]
        rel = f"{CASES_DIR}/{cid}/{PREDICTIONS_GROUP}"
        group = zarr.open_group(store=self.zstore, path=rel, mode="a", zarr_format=3)
        write_name = f".tmp-{name}-{uuid.uuid4().hex[:12]}" if self._local else name
        attrs = {
            "ome": {
                "version": OME_VERSION,
                "multiscales": self._multiscales(name, spacing, channel_axis=False),
            },
            "noisyseg": {"kind": "probability", "case_id": cid},
        }
        target = group.create_group(write_name, attributes=attrs, overwrite=True)
        # chunked and sharded like the labels (layout_itemsize=1), so the two align
        out = self._create_array(target, shape, np.float32, channel_axis=False, layout_itemsize=1)
        out[...] = data
        if self._local:
            final = self._p(f"{rel}/{name}")
            old = None
            if os.path.lexists(final):
                # move the old map aside first: the final path is empty only between two renames
                old = self._p(f"{rel}/.old-{name}-{uuid.uuid4().hex[:12]}")
                os.rename(final, old)
            os.rename(self._p(f"{rel}/{write_name}"), final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return f"{rel}/{name}/0"

    def prediction(self, case_id: str, name: str) -> zarr.Array:
        """A probability map written by :meth:`write_prediction`: lazy ``(*S)`` float32 array.

        Raises:
            NoisysegInputError: unsafe name, or the case has no prediction of that name.
        """
        V.check_label_set_name(name)
        cid = V.check_case_id(case_id)
        try:
            return zarr.open_array(
                store=self.zstore, path=f"{CASES_DIR}/{cid}/{PREDICTIONS_GROUP}/{name}/0", mode="r"
            )
        except FileNotFoundError:  # zarr's ArrayNotFoundError / NodeNotFoundError subclass it
            raise NoisysegInputError(
                f"prediction {name!r} missing", case=cid, path=self.url
            ) from None

    def prediction_names(self, case_id: str) -> list[str]:
        """Names of the probability maps stored for a case (sorted; hidden staging names left out)."""
        cid = V.check_case_id(case_id)
        names = []
        try:
            entries = self.fs.ls(self._p(f"{CASES_DIR}/{cid}/{PREDICTIONS_GROUP}"), detail=False)
        except FileNotFoundError:
            return []
        for e in entries:
            base = posixpath.basename(str(e).rstrip("/"))
            if not base.startswith(".") and base != "zarr.json":
                names.append(base)
        return sorted(names)
