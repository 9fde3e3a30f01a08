"""Integrity of stored arrays: a manifest of chunk keys and content hashes per array, checked on
every read noisyseg makes for training, evaluation and prediction.

Zarr reads a missing chunk as the array's fill value without an error, and zarr v3 does not write
chunks that hold only the fill value. So each array noisyseg writes gets a manifest
``<array>/manifest.json`` listing the chunk objects that were written and a hash of each stored
(compressed) object::

    {"format": 1, "hash": "crc32", "chunks": {"c/0/0/0": "1a2b3c4d", ...}}

and the array's own attributes say that it has one (``attributes["integrity"]``), so a deleted
manifest is damage too. On read:

* a chunk key in the manifest whose object is missing -> damage (never read as zeros);
* an object whose hash differs from the manifest's -> damage;
* an object that the manifest does not list -> damage (written by someone else);
* a key that is neither in the manifest nor stored -> a chunk that was all fill value: fine.

Damage raises :class:`~noisyseg.storage.files.StoreDamageError` (a ``NoisysegInputError``), one
line naming case, array and chunk. Arrays written before manifests existed (store format 1, or a
group made by hand) carry no ``integrity`` attribute and are read unchecked.

Reads through zarr (any store, sharded arrays) are checked by :class:`VerifiedStore`, a zarr
store wrapper; :class:`~noisyseg.storage.reader.RegionReader`'s fast path checks the objects it
reads itself (:meth:`Manifest.check`). Hashes are only compared for whole-object reads (a sharded
array's partial reads are checked for presence only).

Hash: CRC-32C of the stored bytes (``google_crc32c``, a dependency of zarr; hardware
accelerated, about 2.5x faster than zlib's CRC-32 here). The fast path hashes a chunk file the
first time a process reads it and remembers the file's (size, mtime, inode); later reads of the
same unchanged file only compare that stamp (one ``fstat``), so a training stream that reads each
chunk hundreds of times hashes it once. A file replaced or rewritten after that is hashed again;
a missing file is detected on every read. The cost per patch, with and without checking, is
measured by benchmarks/integrity_cost.py (benchmarks/RESULTS.md, "Integrity cost").
"""

from __future__ import annotations

import os
import posixpath
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import google_crc32c
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from noisyseg.storage.files import StoreDamageError, StoreFiles

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
#: Array attribute that says the array has a manifest.
INTEGRITY_ATTR = "integrity"
HASH_NAME = "crc32c"
#: Files of an array folder that are not chunk objects.
NOT_CHUNKS = frozenset({"zarr.json", MANIFEST_NAME})


#: Hash functions by manifest ``hash`` name (``crc32``: manifests written before crc32c).
HASHES = {
    "crc32c": lambda data: google_crc32c.value(bytes(data)),
    "crc32": lambda data: zlib.crc32(data) & 0xFFFFFFFF,
}


def chunk_hash(data: bytes | memoryview, name: str = HASH_NAME) -> str:
    """Hash of one stored chunk object as 8 hex digits (``name``: a key of :data:`HASHES`)."""
    return f"{HASHES[name](data):08x}"


def integrity_attrs() -> dict[str, Any]:
    """Attributes that mark a new array as having a manifest."""
    return {INTEGRITY_ATTR: {"manifest": MANIFEST_NAME, "hash": HASH_NAME}}


def manifest_rel(array_rel: str) -> str:
    """Path of an array's manifest inside the store."""
    return f"{array_rel}/{MANIFEST_NAME}"


@dataclass(frozen=True)
class ArrayContext:
    """Who an array is, for messages: ``case``, ``what`` ("image", "label set 'truth'", ...),
    ``rel`` (array path inside the store), ``url`` (the store)."""

    case: str
    what: str
    rel: str
    url: str

    def damage(self, key: str, problem: str, kind: str = "chunk") -> StoreDamageError:
        """``case c003: image chunk 0/c/0/1/0 is missing (store /x): the store is damaged; ...``

        ``key`` is relative to the array folder; the message names it relative to the case."""
        where = posixpath.relpath(f"{self.rel}/{key}", f"cases/{self.case}")
        return StoreDamageError(
            f"{self.what} {kind} {where} {problem} (store {self.url})", case=self.case
        )


@dataclass
class Manifest:
    """The chunk objects of one array and their hashes (keys relative to the array folder).

    ``stamps`` (not stored) remembers, per key, the (size, mtime, inode) of the file that was
    verified in this process; :meth:`check_file` skips the hash while the stamp is unchanged
    (``cache_verified=False`` hashes on every read).
    """

    chunks: dict[str, str] = field(default_factory=dict)
    hash: str = HASH_NAME
    cache_verified: bool = True
    stamps: dict[str, tuple[int, int, int]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "hash": self.hash, "chunks": dict(self.chunks)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        if doc.get("hash") not in HASHES or not isinstance(doc.get("chunks"), dict):
            raise ValueError(f"unknown manifest (hash {doc.get('hash')!r})")
        return cls(chunks={str(k): str(v) for k, v in doc["chunks"].items()}, hash=doc["hash"])

    def check(self, key: str, data: bytes | None, ctx: ArrayContext) -> None:
        """Raise when the object ``key`` (``data``; None: absent) disagrees with the manifest."""
        expected = self.chunks.get(key)
        if data is None:
            if expected is not None:
                raise ctx.damage(key, "is missing")
            return
        if expected is None:
            raise ctx.damage(key, "is not in the array's manifest")
        if chunk_hash(data, self.hash) != expected:
            raise ctx.damage(key, f"is damaged (content hash differs, {len(data)} bytes)")

    def check_file(
        self, key: str, data: bytes | None, stat: os.stat_result | None, ctx: ArrayContext
    ) -> None:
        """:meth:`check` for a local chunk file read with ``stat`` (its ``fstat``), hashing only
        when this process has not verified this very file yet (see the class docstring)."""
        if data is None or stat is None:
            self.check(key, data, ctx)
            return
        stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if self.cache_verified and self.stamps.get(key) == stamp:
            return
        self.check(key, data, ctx)
        self.stamps[key] = stamp


def scan_manifest(fs: fsspec.AbstractFileSystem, array_path: str) -> Manifest:
    """Hash every chunk object stored under ``array_path`` (after the array is written)."""
    chunks = {}
    prefix = array_path.rstrip("/") + "/"
    for path in sorted(fs.find(array_path)):
        key = str(path)[len(prefix) :] if str(path).startswith(prefix) else None
        if key is None or key in NOT_CHUNKS or posixpath.basename(key).startswith("."):
            continue
        chunks[key] = chunk_hash(fs.cat_file(path))
    return Manifest(chunks=chunks)


def write_manifest(
    files: StoreFiles, array_rel: str, recorded: Mapping[str, str] | None = None
) -> Manifest:
    """Record the manifest of the written array ``array_rel`` (atomic write).

    ``recorded``: hashes taken while the chunks were written (:class:`RecordingStore`); used
    when its keys are exactly the chunk objects stored (one listing, no re-read), else every
    stored object is read and hashed (:func:`scan_manifest`).
    """
    if recorded is not None and set(recorded) == stored_keys(files.fs, files.path(array_rel)):
        manifest = Manifest(chunks=dict(sorted(recorded.items())))
    else:
        manifest = scan_manifest(files.fs, files.path(array_rel))
    files.write_json(manifest_rel(array_rel), manifest.to_json())
    return manifest


def load_manifest(files: StoreFiles, array_rel: str, attrs: Mapping[str, Any], ctx: ArrayContext):
    """The array's manifest, or None when the array predates manifests (no ``integrity``
    attribute). A manifest the attributes promise but that is missing or unreadable raises."""
    if INTEGRITY_ATTR not in attrs:
        return None
    try:
        doc = files.read_json(manifest_rel(array_rel))
        return Manifest.from_json(doc)
    except FileNotFoundError:
        raise ctx.damage(MANIFEST_NAME, "is missing", kind="manifest") from None
    except (ValueError, AttributeError):
        raise ctx.damage(MANIFEST_NAME, "is unreadable", kind="manifest") from None


def stored_keys(fs: fsspec.AbstractFileSystem, array_path: str) -> set[str]:
    """Chunk objects present under an array folder (keys relative to it)."""
    prefix = array_path.rstrip("/") + "/"
    try:
        found = fs.find(array_path)
    except FileNotFoundError:
        return set()
    return {
        str(p)[len(prefix) :]
        for p in found
        if str(p).startswith(prefix)
        and str(p)[len(prefix) :] not in NOT_CHUNKS
        and not posixpath.basename(str(p)).startswith(".")
    }


def check_array(
    fs: fsspec.AbstractFileSystem, array_path: str, manifest: Manifest, ctx: ArrayContext
) -> list[str]:
    """Every problem of one array against its manifest (empty: intact): missing, damaged and
    unlisted chunk objects, one line each. Reads every stored object once."""
    problems = []
    present = stored_keys(fs, array_path)
    keys: Iterable[str] = sorted(set(manifest.chunks) | present)
    for key in keys:
        data = fs.cat_file(f"{array_path.rstrip('/')}/{key}") if key in present else None
        try:
            manifest.check(key, data, ctx)
        except StoreDamageError as exc:
            problems.append(exc.problem)
    return problems


def open_verified_array(files: StoreFiles, zstore: Any, ctx: ArrayContext) -> Any:
    """The array ``ctx.rel`` of ``zstore`` opened read-only, its chunk reads checked against its
    manifest when it has one (:class:`VerifiedStore`). None when the array is absent;
    StoreDamageError when its metadata or manifest is unreadable."""
    try:
        doc = files.read_json(f"{ctx.rel}/zarr.json")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except StoreDamageError:
        raise ctx.damage("zarr.json", "is not valid JSON (truncated?)", kind="metadata") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    manifest = load_manifest(files, ctx.rel, attrs or {}, ctx)
    store = zstore if manifest is None else VerifiedStore(zstore, ctx.rel, manifest, ctx)
    try:
        return zarr.open_array(store=store, path=ctx.rel, mode="r")
    except (KeyError, TypeError, ValueError) as exc:
        raise ctx.damage(
            "zarr.json", f"is invalid ({type(exc).__name__})", kind="metadata"
        ) from None


class RecordingStore(WrapperStore):
    """A zarr store wrapper that hashes every chunk object written under one array as it is
    written (``recorded``: key relative to the array -> hash), so the manifest needs no
    re-read of the data (what object stores would have to download again)."""

    def __init__(self, store: Any, array_rel: str) -> None:
        super().__init__(store)
        self._prefix = array_rel.rstrip("/") + "/"
        self.recorded: dict[str, str] = {}

    def _with_store(self, store: Any) -> RecordingStore:
        return type(self)(store, self._prefix.rstrip("/"))

    def _chunk_key(self, key: str) -> str | None:
        if not key.startswith(self._prefix):
            return None
        rest = key[len(self._prefix) :]
        return None if rest in NOT_CHUNKS else rest

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        chunk = self._chunk_key(key)
        if chunk is not None:
            self.recorded[chunk] = chunk_hash(value.to_bytes())

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        chunk = self._chunk_key(key)
        if chunk is not None:
            self.recorded.pop(chunk, None)


class VerifiedStore(WrapperStore):
    """A zarr store wrapper that checks every chunk read of one array against its manifest.

    Args:
        store: the store to read. array_rel: the array's path in it. manifest: its manifest.
        ctx: names for messages.
    """

    def __init__(self, store: Any, array_rel: str, manifest: Manifest, ctx: ArrayContext) -> None:
        super().__init__(store)
        self._prefix = array_rel.rstrip("/") + "/"
        self._manifest = manifest
        self._ctx = ctx

    @property
    def inner(self) -> Any:
        """The wrapped store."""
        return self._store

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def context(self) -> ArrayContext:
        return self._ctx

    def _with_store(self, store: Any) -> VerifiedStore:
        return type(self)(store, self._prefix.rstrip("/"), self._manifest, self._ctx)

    def __reduce__(self) -> tuple:
        return (type(self), (self._store, self._prefix.rstrip("/"), self._manifest, self._ctx))

    def _chunk_key(self, key: str) -> str | None:
        if not key.startswith(self._prefix):
            return None
        rest = key[len(self._prefix) :]
        return None if rest in NOT_CHUNKS else rest

    def _checked(self, key: str, buf: Buffer | None, byte_range: ByteRequest | None) -> None:
        chunk = self._chunk_key(key)
        if chunk is None:
            return
        if buf is None:
            self._manifest.check(chunk, None, self._ctx)
        elif byte_range is None:
            self._manifest.check(chunk, buf.to_bytes(), self._ctx)
        elif chunk not in self._manifest.chunks:
            raise self._ctx.damage(chunk, "is not in the array's manifest")

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        self._checked(key, buf, byte_range)
        return buf

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        for (key, byte_range), buf in zip(key_ranges, bufs, strict=True):
            self._checked(key, buf, byte_range)
        return bufs
