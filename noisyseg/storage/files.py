"""Small files of a store (JSON, Parquet) on any fsspec file system, written atomically.

:class:`StoreFiles` addresses files by their path relative to the store root. Every write goes
through :func:`noisyseg.storage.atomic.write_file_atomic`. A file that exists but cannot be
parsed (truncated, overwritten with garbage) raises :class:`NoisysegInputError` naming it and
telling the user to run ``noisyseg verify``, never a parser traceback.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.atomic import is_local, write_file_atomic

#: The hint every "damaged store" line ends with.
VERIFY_HINT = "the store is damaged; run noisyseg verify"


class StoreDamageError(NoisysegInputError):
    """A store file or chunk that noisyseg wrote is missing, truncated or altered.

    The message is one line and ends with :data:`VERIFY_HINT`.
    """

    def __init__(self, rule: str, *, case: str | None = None, path: str | None = None) -> None:
        super().__init__(f"{rule}: {VERIFY_HINT}", case=case, path=path)
        self.problem = rule


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


class StoreFiles:
    """JSON and Parquet files under one store root.

    Args:
        fs: the fsspec file system. root: the store root on it (no trailing slash).
        url: the store's URL as the user gave it (for messages).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root
        self.url = url
        self.local = is_local(fs)

    def path(self, rel: str) -> str:
        """Absolute path (on ``fs``) of ``rel``."""
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def damaged(self, rel: str, why: str) -> StoreDamageError:
        """The one-line error for a damaged store file ``rel``."""
        return StoreDamageError(f"{rel} is {why} (store {self.url})")

    # ---- bytes ----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace the whole file ``rel`` atomically."""
        write_file_atomic(self.fs, self.path(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        """Contents of ``rel``; FileNotFoundError when absent."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    # ---- JSON -----------------------------------------------------------------------------

    def write_json(self, rel: str, doc: Any) -> None:
        self.write_bytes(rel, json.dumps(doc, default=json_default).encode())

    def read_json(self, rel: str) -> Any:
        """Parsed JSON of ``rel``; FileNotFoundError when absent, NoisysegInputError when it
        does not parse (damaged)."""
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except ValueError:
            raise self.damaged(rel, f"not valid JSON ({len(data)} bytes, truncated?)") from None

    # ---- Parquet --------------------------------------------------------------------------

    def write_parquet(self, rel: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, engine="pyarrow")
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame | None:
        """The table in ``rel``, None when absent, NoisysegInputError when unreadable."""
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        try:
            return pd.read_parquet(io.BytesIO(data), engine="pyarrow")
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants for bad files
            raise self.damaged(
                rel, f"not a readable Parquet file ({len(data)} bytes: {type(exc).__name__})"
            ) from None

    # ---- listing --------------------------------------------------------------------------

    def list_names(self, rel: str, suffix: str = "") -> list[str]:
        """Sorted names directly under ``rel`` ending in ``suffix`` (suffix stripped), hidden
        names (``.*``) left out; empty when the folder is absent."""
        try:
            names = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            base = posixpath.basename(str(name).rstrip("/"))
            if base.endswith(suffix) and not base.startswith("."):
                out.append(base[: len(base) - len(suffix)] if suffix else base)
        return sorted(out)

    def remove(self, rel: str) -> None:
        """Remove the file or folder ``rel`` if present."""
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass
