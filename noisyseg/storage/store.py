"""The noisyseg volume store: one Zarr v3 store per dataset, OME-Zarr 0.5 conventions.

:class:`VolumeStore` is the front; the ideas behind it live in their own modules:

* :mod:`~noisyseg.storage.layout` — where things live, chunking, OME metadata;
* :mod:`~noisyseg.storage.index` — case index, journal, lesion tables, label-set registry;
* :mod:`~noisyseg.storage.writer` — writing cases, label sets and probability maps;
* :mod:`~noisyseg.storage.atomic` — the one build-beside-then-switch commit every writer uses;
* :mod:`~noisyseg.storage.integrity` — chunk manifests checked on every read;
* :mod:`~noisyseg.storage.reader` — cached, checked case arrays; fast patch reads;
* :mod:`~noisyseg.storage.normalise` — per-case z-score statistics.

Visibility, atomicity and concurrency of writes: see :mod:`~noisyseg.storage.atomic`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import zarr

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import lesion_table_rows
from noisyseg.storage import validate as V
from noisyseg.storage import writer as W
from noisyseg.storage.atomic import token
from noisyseg.storage.files import StoreFiles
from noisyseg.storage.filesystems import open_filesystem
from noisyseg.storage.index import CaseIndex
from noisyseg.storage.layout import (
    CASES_DIR,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SHARD_THRESHOLD_BYTES,
    PREDICTIONS_GROUP,
    TRUTH,
    axis_names,
    read_root_meta,
    root_metadata,
    zarr_store,
)
from noisyseg.storage.reader import CaseArrays

__all__ = ["VolumeStore"]


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
        meta = read_root_meta(self.files)
        if meta is None:
            raise NoisysegInputError("no noisyseg store here (missing store)", path=self.url)
        self._setup(meta)

    def _setup(self, meta: dict) -> None:
        self.meta = meta
        self.spatial_dims = int(meta["spatial_dims"])
        self.channel_names = list(meta["channel_names"])
        self.catalog = CaseIndex(self.files, self.spatial_dims)

    def _connect(self) -> None:
        self.fs, root = open_filesystem(self.url, self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.files = StoreFiles(self.fs, self.root, self.url)
        self.zstore = zarr_store(
            self.fs, self.root, self.url, self.storage_options, read_only=self.mode == "r"
        )
        self.arrays = CaseArrays(self.files, self.zstore, self.url)

    def __getstate__(self) -> dict:
        return {
            "url": self.url,
            "mode": self.mode,
            "storage_options": self.storage_options,
            "meta": self.meta,
        }

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self.mode = state["mode"]
        self.storage_options = state["storage_options"]
        self._connect()
        self._setup(state["meta"])

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
        deleted, even with ``overwrite``). To replace a store in one step, build the new one
        with :func:`noisyseg.storage.atomic.replace_store`.
        """
        axis_names(spatial_dims)
        names = [str(c) for c in channel_names]
        if not names:
            raise NoisysegInputError("a store needs at least one channel name", path=str(url))
        fs, root = open_filesystem(str(url), storage_options)
        root = root.rstrip("/") or "/"
        W.clear_for_create(
            fs, root, str(url), overwrite, lambda: cls(str(url), "r", storage_options)
        )
        meta = root_metadata(spatial_dims, names, chunk_bytes, shard_threshold_bytes, attrs)
        W.create_root(fs, root, str(url), meta, storage_options)
        store = cls(str(url), "r+", storage_options)
        store.catalog.write_registry_entry(
            TRUTH, {"name": TRUTH, "params": dict(truth_params or {"source": "annotation"})}
        )
        return store

    @classmethod
    def open(
        cls, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None
    ) -> VolumeStore:
        """Open an existing store (``mode`` ``"r"`` or ``"r+"``); a missing store raises."""
        return cls(str(url), mode, storage_options)

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise NoisysegInputError("store is opened read-only (mode 'r')", path=self.url)

    # ---- index (see noisyseg.storage.index) ---------------------------------------------------

    def index(self) -> pd.DataFrame:
        """The dataset index, one row per visible case (:meth:`CaseIndex.index`)."""
        return self.catalog.index()

    def case_ids(self, split: str | None = None, clean: bool | None = None) -> list[str]:
        """Sorted ids of visible cases, optionally filtered by split and clean flag."""
        return self.catalog.case_ids(split, clean)

    def has_case(self, case_id: str) -> bool:
        """True when the case is visible (in the index)."""
        return self.catalog.has_case(case_id)

    def label_sets(self) -> list[str]:
        """Registered label sets: ``"truth"`` first, then the others sorted."""
        return self.catalog.label_sets()

    def label_set_info(self, name: str) -> dict:
        """Registry entry of a set (``params``: mode, rate, seed, source, ...; ``version``)."""
        V.check_label_set_name(name)
        entry = self.catalog.registry_entry(name)
        if entry is None:
            raise NoisysegInputError(f"label set {name!r} not in store", path=self.url)
        return entry

    def lesion_table(self, label_set: str | None = None) -> pd.DataFrame:
        """Lesion table, one row per lesion (all label sets, or one); :meth:`CaseIndex.lesion_table`."""
        return self.catalog.lesion_table(label_set)

    def compact(self) -> int:
        """Fold journal entries into the Parquet index (driver-side); returns how many."""
        self._require_writable()
        return self.catalog.compact()

    commit = compact

    def set_split(self, case_ids: Iterable[str] | str, split: str) -> None:
        """Assign ``split`` (train/val/test) to the given cases (driver-side)."""
        self._require_writable()
        V.check_split(split)
        ids = self._existing(case_ids)
        self.catalog.set_field(ids, "split", split)

    def set_clean(self, case_ids: Iterable[str] | str, clean: bool = True) -> None:
        """Flag the given cases as clean (trusted annotation) or not (driver-side)."""
        self._require_writable()
        self.catalog.set_field(self._existing(case_ids), "clean", bool(clean))

    def _existing(self, case_ids: Iterable[str] | str) -> list[str]:
        ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        for cid in ids:
            self.catalog.require_case(cid)
        return ids

    # ---- writing cases ------------------------------------------------------------------------

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
        label_maps: Mapping[str, tuple[np.ndarray, Mapping[int, str]]] | None = None,
    ) -> None:
        """Validate and write one case atomically (visible only once complete).

        Args:
            case_id: safe id (``^[A-Za-z0-9][A-Za-z0-9._-]*$``, no ``..``).
            image: ``(C, *S)`` real array, stored as float32; C = len(channel_names).
            labels: label sets, must include ``"truth"`` (unless ``split`` is ``unlabeled``:
                a case without annotation); each ``(*S)`` binary (stored uint8).
            spacing: voxel spacing in mm, store axis order (z, y, x) or (y, x).
            affine: optional 4x4 NIfTI affine (voxel (i,j,k) = store (x,y,z) -> world mm).
            split: ``train``/``val``/``test``/``unlabeled``. clean: trusted annotation flag.
            source: provenance string (e.g. the source file). extra: JSON-able attrs to keep.
            overwrite: replace a case that is already in the store.
            label_maps: multi-class label maps kept beside the binary sets, name ->
                (``(*S)`` integer array, stored uint8/uint16, {value: class name}); written in the
                same atomic commit, listed in the OME ``labels``, not lesion-indexed.

        The case attributes also record ``channel_mean`` / ``channel_std`` (per channel, float64
        mean and population std over the whole image, :func:`channel_stats`) unless ``extra``
        gives them. Every array is written with its integrity manifest.

        Raises:
            NoisysegInputError naming the case and the rule broken; nothing is written then.
        """
        self._require_writable()
        cid, img, sp, aff, checked, maps = W.check_case_inputs(
            self, case_id, image, labels, spacing, affine, split, label_maps
        )
        if not overwrite and self.has_case(cid):
            raise NoisysegInputError(
                "case already in store (duplicate case id)", case=cid, path=self.url
            )
        lesions = {name: lesion_table_rows(lab, sp) for name, lab in checked.items()}
        attrs = W.case_attributes(self, cid, img, sp, aff, source, extra)
        rel = W.stage_case(self, cid)
        W.write_case_tree(self, rel, attrs, img, checked, maps, sp, aff)
        W.publish_case(self, rel, cid)
        self.forget(cid)
        # The index entry is written last: this is the commit point of the case.
        self.catalog.write_entry(W.case_entry(cid, img, sp, split, clean, source, lesions))

    def cleanup_staging(self) -> int:
        """Remove leftovers of interrupted case writes under ``.staging`` (driver-side, no
        writer running). Returns how many entries were removed."""
        self._require_writable()
        return W.remove_staging(self)

    # ---- label sets ---------------------------------------------------------------------------

    def new_label_version(self) -> str:
        """A fresh internal version for :meth:`write_label_set` / :meth:`register_label_set`."""
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + token()

    def write_label_set(
        self,
        case_id: str,
        name: str,
        array: np.ndarray,
        *,
        records: list[dict] | None = None,
        overwrite: bool = False,
        version: str | None = None,
    ) -> list[dict]:
        """Write label set ``name`` of one case, as ``version`` when given; returns its lesion
        rows for :meth:`register_label_set` (:func:`noisyseg.storage.writer.write_label_set`)."""
        self._require_writable()
        return W.write_label_set(
            self, case_id, name, array, records=records, overwrite=overwrite, version=version
        )

    def register_label_set(
        self,
        name: str,
        records_by_case: Mapping[str, Sequence[Mapping[str, Any]]],
        params: Mapping[str, Any] | None = None,
        *,
        version: str | None = None,
    ) -> None:
        """Index a derived label set, driver-side; with ``version`` switch to it in one atomic
        write (:func:`noisyseg.storage.writer.register_label_set`)."""
        self._require_writable()
        W.register_label_set(self, name, records_by_case, params, version)
        self.forget()

    def cleanup_label_versions(self, name: str) -> int:
        """Remove versions of set ``name`` other than the registered one, driver-side
        (:func:`noisyseg.storage.writer.cleanup_label_versions`)."""
        self._require_writable()
        removed = W.cleanup_label_versions(self, name)
        self.forget()
        return removed

    # ---- predictions --------------------------------------------------------------------------

    def write_prediction(
        self,
        case_id: str,
        name: str,
        array: np.ndarray,
        *,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Write probability map ``name`` of a case (refused when it exists, unless
        ``overwrite``; ``metadata`` such as run id, model, threshold is kept with it); returns
        its array path (:func:`noisyseg.storage.writer.write_prediction`)."""
        self._require_writable()
        path = W.write_prediction(
            self, case_id, name, array, overwrite=overwrite, metadata=metadata
        )
        self.forget(case_id)
        return path

    def prediction(self, case_id: str, name: str) -> zarr.Array:
        """A probability map written by :meth:`write_prediction`: lazy ``(*S)`` float32 array
        (chunk reads checked against its manifest)."""
        V.check_label_set_name(name)
        return self.arrays.prediction(V.check_case_id(case_id), name)

    def prediction_names(self, case_id: str) -> list[str]:
        """Names of the probability maps stored for a case (sorted; staging names left out)."""
        cid = V.check_case_id(case_id)
        names = self.files.list_names(f"{CASES_DIR}/{cid}/{PREDICTIONS_GROUP}")
        return [n for n in names if n != "zarr.json"]

    # ---- reading ------------------------------------------------------------------------------

    def forget(self, case_id: str | None = None) -> None:
        """Drop cached attributes and array handles (of one case, or all) after a write."""
        self.arrays.forget(case_id)

    def case_attrs(self, case_id: str) -> dict:
        """The case's stored attributes (a copy; one small JSON read, then cached).

        Keys: ``case_id``, ``spacing`` (mm, store axis order), ``shape`` (spatial),
        ``channel_names``, ``affine`` (4x4 nested list or None), ``source``, ``channel_mean`` /
        ``channel_std`` (per channel, over the whole image; absent in stores written before they
        were recorded), plus the ``extra`` given to :meth:`write_case`.
        """
        return dict(self.arrays.attrs(case_id))

    def image(self, case_id: str) -> zarr.Array:
        """The case's image as a lazy Zarr array ``(C, *S)`` float32 (nothing read yet)."""
        return self.arrays.image(case_id)

    def labels(self, case_id: str, name: str = TRUTH) -> zarr.Array:
        """A label set of the case (its registered version) as a lazy Zarr array ``(*S)``
        uint8 in {0, 1}."""
        V.check_label_set_name(name)
        return self.arrays.labels(case_id, name, self.catalog.version(name))

    def case_label_sets(self, case_id: str) -> list[str]:
        """Label sets (and label maps) present in the case, registered versions only."""
        try:
            doc = self.files.read_json(f"{CASES_DIR}/{case_id}/labels/zarr.json")
        except FileNotFoundError:
            raise NoisysegInputError("case not in store", case=case_id, path=self.url) from None
        return self.catalog.set_names(doc["attributes"]["ome"]["labels"])

    def spacing(self, case_id: str) -> tuple[float, ...]:
        """Voxel spacing in mm, store axis order (z, y, x) or (y, x)."""
        return tuple(float(s) for s in self.arrays.attrs(case_id)["spacing"])

    def case_info(self, case_id: str) -> dict:
        """Everything known about a case: split, clean, shape, spacing, affine (ndarray or None),
        channel names, source, label sets and lesion counts."""
        attrs = dict(self.arrays.attrs(case_id))
        info = self.catalog.case_row(case_id)
        attrs["affine"] = np.asarray(attrs["affine"]) if attrs.get("affine") is not None else None
        attrs["shape"] = tuple(attrs["shape"])
        attrs["spacing"] = tuple(attrs["spacing"])
        info.update(attrs)
        info["label_sets"] = self.case_label_sets(case_id)
        return info
