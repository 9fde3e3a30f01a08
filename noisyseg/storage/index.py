"""The case index of a store: which cases exist, their split and lesion counts, lesion tables,
and the registry of label sets.

Visibility: **a case exists once its index entry exists** — a row in ``index/cases.parquet``
or a file ``index/journal/<case_id>.json`` (written last by a case writer, atomically: the
commit point of the case). A journal entry always overrides the compacted row of its case.
:meth:`CaseIndex.compact` folds the journal into the Parquet files (driver-side, no writer
running).

Label sets: ``index/labelsets/<name>.json`` is the registry entry of a set. A set registered
with an internal ``version`` (atomic overwrite, :meth:`CaseIndex.register_label_set`) keeps its
lesion table in ``index/lesions/<name>~<version>.parquet`` and its per-case lesion counts in the
entry itself, so the one atomic write of the entry switches masks, lesion table and counts
together. Sets registered without a version use ``index/lesions/<name>.parquet`` and the
``n_lesions_<name>`` column of ``cases.parquet`` (the original layout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V
from noisyseg.storage.collection import update_collection
from noisyseg.storage.files import StoreFiles
from noisyseg.storage.layout import (
    CASES_PARQUET,
    JOURNAL_DIR,
    LABELSETS_DIR,
    LESIONS_DIR,
    TRUTH,
    VERSION_SEP,
    axis_names,
    lesions_rel,
)

INDEX_LEAD = ["case_id", "split", "clean", "n_channels", "shape", "spacing", "source"]


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


def present_count(records: Iterable[Mapping[str, Any]]) -> int:
    """Lesions of a case's records that are in the mask (status not ``removed``)."""
    return sum(1 for r in records if r.get("status", "present") != "removed")


def _entry_row(entry: dict) -> dict:
    case = dict(entry["case"])
    counts = case.pop("n_lesions", {}) or {}
    for name, n in counts.items():
        case[f"n_lesions_{name}"] = n
    return case


def normalise_index(df: pd.DataFrame) -> pd.DataFrame:
    """Index rows with canonical types and column order, sorted by ``case_id``."""
    df = df.copy()
    for col in ("shape", "spacing"):
        if col in df.columns:
            df[col] = [tuple(v.tolist() if hasattr(v, "tolist") else v) for v in df[col]]
    df["shape"] = [tuple(int(x) for x in v) for v in df["shape"]]
    df["spacing"] = [tuple(float(x) for x in v) for v in df["spacing"]]
    df["clean"] = df["clean"].astype(bool)
    for col in [c for c in df.columns if c.startswith("n_lesions_")]:
        df[col] = df[col].astype("Int64")
    counts = sorted(c for c in df.columns if c.startswith("n_lesions_"))
    counts = [c for c in counts if c == f"n_lesions_{TRUTH}"] + [
        c for c in counts if c != f"n_lesions_{TRUTH}"
    ]
    rest = [c for c in df.columns if c not in INDEX_LEAD and c not in counts]
    return df[INDEX_LEAD + counts + rest].sort_values("case_id").reset_index(drop=True)


def _sorted_lesions(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["case_id", "lesion_id"], kind="stable") if len(df) else df


class CaseIndex:
    """Index, journal, lesion tables and label-set registry of one store.

    Args:
        files: the store's small-file access. spatial_dims: 2 or 3 (lesion table columns).
    """

    def __init__(self, files: StoreFiles, spatial_dims: int) -> None:
        self.files = files
        self.spatial_dims = spatial_dims
        self._ids_cache: tuple[Any, frozenset[str]] | None = None

    # ---- journal and cases ----------------------------------------------------------------

    def write_entry(self, entry: dict) -> None:
        """Commit a case: write its journal entry (``{"case": {...}, "lesions": {...}}``)."""
        self.files.write_json(f"{JOURNAL_DIR}/{entry['case']['case_id']}.json", entry)

    def journal(self) -> dict[str, dict]:
        """Journal entries by case id."""
        return {
            cid: self.files.read_json(f"{JOURNAL_DIR}/{cid}.json")
            for cid in self.files.list_names(JOURNAL_DIR, ".json")
        }

    def _base_cases(self) -> pd.DataFrame:
        df = self.files.read_parquet(CASES_PARQUET)
        return pd.DataFrame(columns=INDEX_LEAD) if df is None else df

    def index(self) -> pd.DataFrame:
        """The dataset index: one row per visible case, sorted by ``case_id``.

        Columns: ``case_id``, ``split``, ``clean`` (bool), ``n_channels``, ``shape`` (spatial,
        tuple), ``spacing`` (mm, tuple), ``source``, ``n_lesions_<set>`` (Int64, lesions
        present in that label set; missing when the case has no such set), then extras.
        """
        base = self._base_cases()
        journal = self.journal()
        if journal:
            rows = pd.DataFrame([_entry_row(e) for e in journal.values()])
            base = base[~base["case_id"].isin(list(journal))]
            base = rows if base.empty else pd.concat([base, rows], ignore_index=True)
        base = self._overlay_counts(base)
        if base.empty:
            return normalise_index(base.astype(object))
        return normalise_index(base)

    def _overlay_counts(self, df: pd.DataFrame) -> pd.DataFrame:
        """``n_lesions_<set>`` of versioned sets, from their registry entries."""
        for name in self.label_sets():
            if name == TRUTH:
                continue
            entry = self.registry_entry(name)
            counts = entry.get("counts") if entry else None
            if counts is None:
                continue
            col = f"n_lesions_{name}"
            df = df.copy()
            df[col] = pd.array([counts.get(cid, pd.NA) for cid in df["case_id"]], dtype="Int64")
        return df

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
        if not V.is_safe_name(case_id):
            return False
        if self.files.exists(f"{JOURNAL_DIR}/{case_id}.json"):
            return True
        return case_id in self._compacted_ids()

    def _compacted_ids(self) -> frozenset[str]:
        try:
            info = self.files.fs.info(self.files.path(CASES_PARQUET))
        except FileNotFoundError:
            return frozenset()
        key = tuple(info.get(k) for k in ("mtime", "size", "ino", "ETag", "LastModified"))
        if self._ids_cache is None or self._ids_cache[0] != key:
            df = self.files.read_parquet(CASES_PARQUET)
            ids = frozenset(df["case_id"].tolist()) if df is not None else frozenset()
            self._ids_cache = (key, ids)
        return self._ids_cache[1]

    def compact(self) -> int:
        """Fold journal entries into ``cases.parquet`` and the lesion tables (driver-side), and
        list the cases in the root's OME collection (:func:`~noisyseg.storage.collection.update_collection`).

        Idempotent and crash-safe: files are replaced atomically and journal entries are deleted
        only after; a journal entry always overrides the compacted row of the same case.
        Returns the number of journal entries folded.
        """
        journal = self.journal()
        if not journal:
            update_collection(self.files, self._base_cases()["case_id"])
            return 0
        ids = list(journal)
        base = self._base_cases()
        base = base[~base["case_id"].isin(ids)]
        rows = pd.DataFrame([_entry_row(e) for e in journal.values()])
        cases = rows if base.empty else pd.concat([base, rows], ignore_index=True)
        set_names = set(self.files.list_names(LESIONS_DIR, ".parquet"))
        for e in journal.values():
            set_names |= set((e.get("lesions") or {}).keys())
        for name in sorted(set_names):
            self._fold_lesions(name, journal)
        self.files.write_parquet(CASES_PARQUET, normalise_index(cases))
        update_collection(self.files, cases["case_id"])
        for cid in ids:
            self.files.remove(f"{JOURNAL_DIR}/{cid}.json")
        return len(ids)

    def _fold_lesions(self, name: str, journal: dict[str, dict]) -> None:
        """Replace the rows of the journal's cases in ``lesions/<name>.parquet``."""
        ids = list(journal)
        rel = f"{LESIONS_DIR}/{name}.parquet"
        old = self.files.read_parquet(rel)
        recs = [
            {"case_id": cid, "label_set": name, **r}
            for cid, e in journal.items()
            for r in ((e.get("lesions") or {}).get(name) or [])
        ]
        touched = old is not None and old["case_id"].isin(ids).any()
        if not recs and not touched:
            return
        self._replace_lesion_rows(rel, old, ids, recs)

    def _replace_lesion_rows(
        self, rel: str, old: pd.DataFrame | None, case_ids: list[str], recs: list[dict]
    ) -> None:
        """Write lesion table ``rel``: the rows of ``old`` not of ``case_ids``, plus ``recs``."""
        parts = [old[~old["case_id"].isin(case_ids)]] if old is not None else []
        if recs:
            parts.append(pd.DataFrame(recs))
        parts = [p for p in parts if not p.empty]
        df = (
            pd.concat(parts, ignore_index=True)
            if parts
            else pd.DataFrame(columns=lesion_columns(self.spatial_dims))
        )
        self.files.write_parquet(rel, _sorted_lesions(df))

    def rewrite_cases(self, fn: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
        """Compact, apply ``fn`` to the index and write it back (driver-side)."""
        self.compact()
        self.files.write_parquet(CASES_PARQUET, normalise_index(fn(self.index())))

    def set_field(self, case_ids: Sequence[str], column: str, value: Any) -> None:
        """Set ``column`` to ``value`` for the given cases (driver-side)."""

        def fn(df: pd.DataFrame) -> pd.DataFrame:
            df.loc[df["case_id"].isin(list(case_ids)), column] = value
            return df

        self.rewrite_cases(fn)

    # ---- label set registry ---------------------------------------------------------------

    def label_sets(self) -> list[str]:
        """Registered label sets: ``"truth"`` first, then the others sorted."""
        names = self.files.list_names(LABELSETS_DIR, ".json")
        return [TRUTH] + sorted(n for n in names if n != TRUTH)

    def registry_entry(self, name: str) -> dict | None:
        """The registry entry of a set (None when not registered)."""
        try:
            return self.files.read_json(f"{LABELSETS_DIR}/{name}.json")
        except FileNotFoundError:
            return None

    def version(self, name: str) -> str | None:
        """Internal version of a registered set (None: unversioned layout or unregistered)."""
        if name == TRUTH:
            return None
        entry = self.registry_entry(name)
        return (entry or {}).get("version") or None

    def set_names(self, groups: Sequence[str]) -> list[str]:
        """Set names of label groups (``<name>`` or ``<name>~<version>``) that are what readers
        use: unversioned groups of unversioned sets, the registered version of the others."""
        out: list[str] = []
        for group in groups:
            name, _, version = group.partition(VERSION_SEP)
            if (self.version(name) or "") == version and name not in out:
                out.append(name)
        return out

    def write_registry_entry(self, name: str, doc: Mapping[str, Any]) -> None:
        self.files.write_json(f"{LABELSETS_DIR}/{name}.json", dict(doc))

    def register_label_set(
        self,
        name: str,
        records_by_case: Mapping[str, Sequence[Mapping[str, Any]]],
        params: Mapping[str, Any] | None = None,
        version: str | None = None,
    ) -> str | None:
        """Index a derived label set (driver-side). Returns the version it replaced.

        ``version`` None (original layout): rows of the given cases replace theirs in
        ``lesions/<name>.parquet``, the ``n_lesions_<name>`` column is updated, then the
        registry entry is written. With a ``version``: the set becomes exactly
        ``records_by_case``; its table is written to ``lesions/<name>~<version>.parquet`` and the
        registry entry (counts included) is written last, in one atomic write — the switch.
        """
        recs = [
            {**dict(r), "case_id": cid, "label_set": name}
            for cid, rs in records_by_case.items()
            for r in rs
        ]
        counts = {cid: present_count(rs) for cid, rs in records_by_case.items()}
        previous = self.version(name)
        doc: dict[str, Any] = {
            "name": name,
            "params": dict(params or {}),
            "n_cases": len(records_by_case),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if version:
            df = (
                pd.DataFrame(recs)
                if recs
                else pd.DataFrame(columns=lesion_columns(self.spatial_dims))
            )
            self.files.write_parquet(lesions_rel(name, version), _sorted_lesions(df))
            doc.update(version=version, counts=counts)
        else:
            self._register_unversioned(name, recs, records_by_case, counts)
        self.write_registry_entry(name, doc)
        return previous

    def _register_unversioned(
        self,
        name: str,
        recs: list[dict],
        records_by_case: Mapping[str, Any],
        counts: dict[str, int],
    ) -> None:
        self.compact()
        rel = lesions_rel(name)
        self._replace_lesion_rows(rel, self.files.read_parquet(rel), list(records_by_case), recs)
        col = f"n_lesions_{name}"

        def fn(cases: pd.DataFrame) -> pd.DataFrame:
            if col not in cases.columns:
                cases[col] = pd.array([pd.NA] * len(cases), dtype="Int64")
            mask = cases["case_id"].isin(list(counts))
            cases.loc[mask, col] = cases.loc[mask, "case_id"].map(counts).astype("Int64")
            return cases

        self.rewrite_cases(fn)

    def stale_lesion_tables(self, name: str) -> list[str]:
        """Lesion-table files of ``name`` other than the registered one (left by a replaced
        version or an interrupted write), relative to the store."""
        current = lesions_rel(name, self.version(name))
        out = []
        for base in self.files.list_names(LESIONS_DIR, ".parquet"):
            if base == name or base.startswith(f"{name}{VERSION_SEP}"):
                rel = f"{LESIONS_DIR}/{base}.parquet"
                if rel != current:
                    out.append(rel)
        return out

    # ---- lesion tables --------------------------------------------------------------------

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
            legacy = [
                n for n in self.files.list_names(LESIONS_DIR, ".parquet") if VERSION_SEP not in n
            ]
            names = sorted(set(legacy) | set(self.label_sets()))
        journal = self.journal()
        frames = []
        for name in names:
            frames.extend(self._set_frames(name, journal))
        return self._merge_frames(frames)

    def _set_frames(self, name: str, journal: dict[str, dict]) -> list[pd.DataFrame]:
        frames = []
        df = self.files.read_parquet(lesions_rel(name, self.version(name)))
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
        return frames

    def _merge_frames(self, frames: list[pd.DataFrame]) -> pd.DataFrame:
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

    def case_row(self, case_id: str) -> dict:
        """The case's index row as a dict (``n_lesions_<set>`` of sets it lacks left out);
        NoisysegInputError unless the case is visible."""
        df = self.index()
        row = df[df["case_id"] == case_id]
        if row.empty:
            raise NoisysegInputError("case not in store", case=case_id, path=self.files.url)
        return {
            k: v
            for k, v in row.iloc[0].to_dict().items()
            if not (k.startswith("n_lesions_") and pd.isna(v))
        }

    def require_case(self, case_id: str) -> None:
        """Raise unless the case is visible."""
        if not self.has_case(case_id):
            raise NoisysegInputError("case not in store", case=str(case_id), path=self.files.url)
