"""The one way noisyseg commits anything it writes: build beside, then switch in one step.

* :func:`write_file_atomic` — a whole small file (JSON, Parquet): written under a temporary
  name, flushed, renamed over the final name (``os.replace``). On object stores a single PUT
  is atomic by itself, so the final key is written directly.
* :func:`publish_dir` — a directory built under a staging name (a case, a label group, a
  probability map) takes the place of the final one: the old one is renamed aside, the new one
  renamed in, the old one removed. Local file systems only (object stores have no rename; there
  the writers rely on a commit record written last instead: an index entry, a registry entry).
* :func:`replace_store` — a whole store built beside the old one (``<store>.new-<token>``) and
  swapped in at the end (``ingest --overwrite``): a kill at any moment leaves either the complete
  old store or the complete new one at the final path.

A kill between the two renames of :func:`publish_dir` leaves the final path empty and the old
copy under ``.old-*``: :func:`recover_dir` (called by the writers before they look at a final
path) moves it back.

What this gives :class:`~noisyseg.storage.store.VolumeStore` (the methods named are its own).

Visibility and atomicity: **a case exists once its index entry exists**; :meth:`write_case`
writes the arrays first (staged and renamed into place on local file systems) and the index entry
last. A label set written as an internal version (:meth:`new_label_version`, what
``corrupt --overwrite`` does) becomes the set only when :meth:`register_label_set` writes its
registry entry, one atomic write; the replaced version is removed after. A re-run therefore skips
exactly the cases in the index and rewrites the rest; a kill leaves the complete old or the
complete new set.

Concurrency: :meth:`write_case` and :meth:`write_label_set` of *different* cases may run in
parallel (Dask/Ray tasks, several processes): each touches only its own case directory and its
own journal file. Everything that rewrites shared index files — :meth:`compact`,
:meth:`register_label_set`, :meth:`set_split`, :meth:`set_clean` — is driver-side.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import fsspec

from noisyseg.storage.filesystems import open_filesystem

#: Prefix of a directory moved aside by :func:`publish_dir` until the new one is in place.
OLD_PREFIX = ".old-"
#: Prefix of temporary files and staged directories.
TMP_PREFIX = ".tmp-"


def token() -> str:
    """A short random token for staging names and internal versions (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local file system (rename is atomic there)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_file_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` as the whole file ``path``: readers see the old file or the new one.

    Local: temporary file in the same folder, fsync, ``os.replace``. Object stores: one PUT.
    """
    if not is_local(fs):
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def staging_path(final: str) -> str:
    """A fresh staging path beside ``final`` (same folder, hidden name)."""
    parent, base = os.path.split(final.rstrip("/"))
    return os.path.join(parent, f"{TMP_PREFIX}{base}-{token()}")


def recover_dir(final: str) -> None:
    """Undo a :func:`publish_dir` killed between its two renames: when ``final`` is missing
    and an ``.old-`` copy of it exists, move the copy back (local paths)."""
    if os.path.lexists(final):
        return
    parent, base = os.path.split(final.rstrip("/"))
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    olds = sorted(n for n in names if n.startswith(f"{OLD_PREFIX}{base}-"))
    if olds:
        os.rename(os.path.join(parent, olds[-1]), final)


def publish_dir(staged: str, final: str) -> None:
    """Move the directory ``staged`` to ``final`` (local paths), replacing what is there.

    The old directory is renamed aside first and removed last; between the two renames the
    final path is absent for an instant (:func:`recover_dir` repairs a kill there).
    """
    parent, base = os.path.split(final.rstrip("/"))
    old = None
    if os.path.lexists(final):
        old = os.path.join(parent, f"{OLD_PREFIX}{base}-{token()}")
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: str) -> Iterator[str]:
    """Context manager around :func:`publish_dir`: yields a staging path beside ``final``;
    on success the staged directory replaces ``final``, on error it is removed."""
    staged = staging_path(final)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish_dir(staged, final)


def replace_store(
    url: str,
    build: Callable[[str], object],
    *,
    storage_options: dict | None = None,
) -> object:
    """Build a new store beside the one at ``url`` and swap it in when ``build`` returns.

    ``build(staging_url)`` writes the complete new store at ``staging_url`` (a hidden sibling,
    ``<parent>/.tmp-<name>-<token>``) and returns anything (passed back). Then the old store is
    renamed aside, the new one renamed to ``url`` and the old one removed (:func:`publish_dir`).
    A kill during ``build`` leaves the old store untouched (the staging copy is an orphan that
    the next replacement removes first, :func:`remove_staging_leftovers`); a failure removes the
    staging copy.

    Local stores only: an object store has no rename of a prefix, so replacing one in a single
    step is impossible (``NotImplementedError``; write to a new URL instead).
    """
    fs, root = open_filesystem(str(url), storage_options)
    if not is_local(fs):
        raise NotImplementedError(
            "replacing a store atomically needs a local file system (object stores have no "
            "rename); write the new store under a new URL instead"
        )
    final = os.path.abspath(root.rstrip("/") or "/")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    recover_dir(final)
    remove_staging_leftovers(final)
    with staged_dir(final) as staged:
        result = build(staged)
    return result


def remove_staging_leftovers(final: str) -> int:
    """Remove staging copies of ``final`` left by killed builds (``.tmp-<name>-<token>``
    siblings) and, when ``final`` exists, replaced copies whose removal was killed
    (``.old-<name>-<token>``); local paths. Returns how many were removed."""
    parent, base = os.path.split(final.rstrip("/"))
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    prefixes = (f"{TMP_PREFIX}{base}-",) + (
        (f"{OLD_PREFIX}{base}-",) if os.path.lexists(final) else ()
    )
    stale = [n for n in names if n.startswith(prefixes)]
    for name in stale:
        path = os.path.join(parent, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return len(stale)
