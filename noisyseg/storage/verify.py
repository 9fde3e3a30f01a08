"""``noisyseg verify``: check a whole store against what noisyseg recorded when it wrote it.

Store level (driver): the root metadata, the index (``cases.parquet``, journal entries), the
label-set registry and the lesion table of every registered set must parse; every indexed case
must have its group. Case level (one Dask task per case, in parallel): the case group and its
``labels`` group parse; every array of the case (image, every label group, every probability map)
is checked against its integrity manifest (:func:`noisyseg.storage.integrity.check_array`:
missing, damaged and unlisted chunk objects); every registered label set has its registered
version in the case. Arrays written before manifests existed are reported as unchecked, not as
damage.

``repair_from``: another copy of the store (a backup, the source it was copied from). A missing
or damaged chunk object is replaced by the same key of the copy when the copy's bytes have the
hash the damaged store's manifest records (so only identical data is ever put back), then the
case is checked again.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field

import dask

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.files import StoreDamageError
from noisyseg.storage.integrity import (
    INTEGRITY_ATTR,
    ArrayContext,
    Manifest,
    check_array,
    chunk_hash,
    load_manifest,
)
from noisyseg.storage.layout import (
    CASES_DIR,
    PREDICTIONS_GROUP,
    TRUTH,
    VERSION_SEP,
    label_group_name,
    lesions_rel,
)
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.tasks import SCHEDULERS, run_tasks
from noisyseg.storage.writer import case_dirs


@dataclass
class CaseReport:
    """Result of checking one case: ``problems`` (damage, one line each), ``notes`` (not
    damage: arrays without a manifest), ``repaired`` (chunk objects put back)."""

    case_id: str
    arrays: int = 0
    chunks: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """One line for the terminal."""
        head = f"{self.case_id}: " + ("ok" if self.ok else f"DAMAGED ({len(self.problems)})")
        head += f" ({self.arrays} arrays, {self.chunks} chunks)"
        if self.repaired:
            head += f"; repaired {len(self.repaired)} chunk(s)"
        return head


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`: store-level problems and one :class:`CaseReport` per
    case."""

    url: str
    problems: list[str] = field(default_factory=list)
    cases: list[CaseReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.cases)

    def summary(self) -> str:
        bad = [c for c in self.cases if not c.ok]
        n_problems = len(self.problems) + sum(len(c.problems) for c in bad)
        repaired = sum(len(c.repaired) for c in self.cases)
        state = "ok" if self.ok else f"DAMAGED: {n_problems} problem(s)"
        text = (
            f"verify: {len(self.cases)} case(s), {len(self.cases) - len(bad)} ok, "
            f"{len(bad)} damaged; {state} -> {self.url}"
        )
        return text + (f"; repaired {repaired} chunk object(s)" if repaired else "")


# ---- store level ---------------------------------------------------------------------------


def _store_problems(store: VolumeStore) -> tuple[list[str], list[str]]:
    """Problems of the index, registry and lesion tables; and the indexed case ids."""
    problems: list[str] = []
    ids: list[str] = []
    try:
        ids = store.case_ids()
    except StoreDamageError as exc:
        problems.append(exc.problem)
    for name in store.label_sets():
        try:
            store.label_set_info(name)
            store.files.read_parquet(lesions_rel(name, store.catalog.version(name)))
        except StoreDamageError as exc:
            problems.append(f"label set {name}: {exc.problem}")
    present = set(case_dirs(store))
    problems += [
        f"case {cid}: indexed but its group cases/{cid} is missing"
        for cid in ids
        if cid not in present
    ]
    return problems, [cid for cid in ids if cid in present]


# ---- case level ----------------------------------------------------------------------------


def _case_arrays(store: VolumeStore, case_id: str, notes: list[str]) -> list[tuple[str, str]]:
    """``(what, array path)`` of every array of a case: image, label groups that readers use,
    predictions. Label groups of versions that are not registered (left by an interrupted
    ``corrupt --overwrite``; no reader uses them) go to ``notes`` instead."""
    base = f"{CASES_DIR}/{case_id}"
    out = [("image", f"{base}/0")]
    for group in store.files.list_names(f"{base}/labels"):
        if group == "zarr.json":
            continue
        name, _, version = group.partition(VERSION_SEP)
        if version and store.catalog.version(name) != version:
            notes.append(
                f"leftover label group labels/{group} (unregistered version; the next "
                f"noisyseg corrupt of set {name} removes it)"
            )
            continue
        out.append((f"label set {group}", f"{base}/labels/{group}/0"))
    for name in store.files.list_names(f"{base}/{PREDICTIONS_GROUP}"):
        if name != "zarr.json":
            out.append((f"prediction {name}", f"{base}/{PREDICTIONS_GROUP}/{name}/0"))
    return out


def _check_one_array(
    store: VolumeStore, report: CaseReport, what: str, rel: str, source: VolumeStore | None
) -> None:
    ctx = ArrayContext(report.case_id, what, rel, store.url)
    try:
        doc = store.files.read_json(f"{rel}/zarr.json")
    except FileNotFoundError:
        report.problems.append(f"{what}: array metadata {rel}/zarr.json is missing")
        return
    except StoreDamageError as exc:
        report.problems.append(exc.problem)
        return
    attrs = (doc.get("attributes") or {}) if isinstance(doc, dict) else {}
    if INTEGRITY_ATTR not in attrs:
        report.notes.append(f"{what}: no integrity manifest (written before manifests)")
        return
    try:
        manifest = load_manifest(store.files, rel, attrs, ctx)
    except StoreDamageError as exc:
        report.problems.append(exc.problem)
        return
    report.arrays += 1
    report.chunks += len(manifest.chunks)
    problems = check_array(store.fs, store.files.path(rel), manifest, ctx)
    if problems and source is not None:
        report.repaired += _repair_array(store, source, rel, manifest)
        problems = check_array(store.fs, store.files.path(rel), manifest, ctx)
    report.problems += problems


def _repair_array(
    store: VolumeStore, source: VolumeStore, rel: str, manifest: Manifest
) -> list[str]:
    """Put back every chunk object of ``rel`` whose copy in ``source`` has the manifest's hash
    (missing or damaged ones); objects the manifest does not list are removed. Returns the
    repaired keys."""
    repaired = []
    base = store.files.path(rel)
    for key, expected in sorted(manifest.chunks.items()):
        path = f"{base}/{key}"
        try:
            current = store.fs.cat_file(path)
        except FileNotFoundError:
            current = None
        if current is not None and chunk_hash(current, manifest.hash) == expected:
            continue
        try:
            good = source.fs.cat_file(source.files.path(f"{rel}/{key}"))
        except FileNotFoundError:
            continue
        if chunk_hash(good, manifest.hash) != expected:
            continue
        store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        store.fs.pipe_file(path, good)
        repaired.append(f"{rel}/{key}")
    return repaired


def _registered_versions_present(store: VolumeStore, case_id: str) -> list[str]:
    """A registered set whose lesion counts name this case must have its registered group."""
    problems = []
    groups = set(store.files.list_names(f"{CASES_DIR}/{case_id}/labels"))
    for name in store.label_sets():
        if name == TRUTH:
            continue
        entry = store.catalog.registry_entry(name) or {}
        counts = entry.get("counts")
        if counts is None or case_id not in counts:
            continue
        group = label_group_name(name, entry.get("version"))
        if group not in groups:
            problems.append(f"label set {name}: registered group labels/{group} is missing")
    return problems


def check_case(store: VolumeStore, case_id: str, source: VolumeStore | None = None) -> CaseReport:
    """Check (and with ``source``, repair) every array of one case."""
    report = CaseReport(case_id)
    for rel in (f"{CASES_DIR}/{case_id}/zarr.json", f"{CASES_DIR}/{case_id}/labels/zarr.json"):
        try:
            store.files.read_json(rel)
        except FileNotFoundError:
            report.problems.append(f"{rel} is missing")
        except StoreDamageError as exc:
            report.problems.append(exc.problem)
    for what, rel in _case_arrays(store, case_id, report.notes):
        _check_one_array(store, report, what, rel, source)
    try:
        report.problems += _registered_versions_present(store, case_id)
    except StoreDamageError as exc:
        report.problems.append(exc.problem)
    return report


# ---- driver --------------------------------------------------------------------------------


def verify_store(
    url: str,
    *,
    repair_from: str | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
    case_ids: Iterable[str] | None = None,
) -> VerifyReport:
    """Check a whole store (Dask, one task per case); repair from a copy when given.

    Args:
        url: the store. repair_from: a copy of it (path/URL) to take intact chunks from.
        scheduler: Dask scheduler (``threads``, ``processes``, ``synchronous``, ``ray``).
        num_workers: Dask workers (default: Dask's). case_ids: check only these cases.

    Raises:
        NoisysegInputError: no store at ``url`` / ``repair_from``, unknown scheduler; a damaged
            root ``zarr.json`` (the store cannot be read at all).
    """
    if scheduler not in SCHEDULERS:
        raise NoisysegInputError(
            f"unknown scheduler {scheduler!r} (choose from {', '.join(SCHEDULERS)})"
        )
    store = VolumeStore.open(url, "r+" if repair_from else "r")
    source = VolumeStore.open(repair_from, "r") if repair_from else None
    report = VerifyReport(url=str(url))
    report.problems, ids = _store_problems(store)
    if case_ids is not None:
        wanted = set(case_ids)
        ids = [c for c in ids if c in wanted]
    tasks = [dask.delayed(check_case, pure=False)(store, cid, source) for cid in ids]
    report.cases = run_tasks(tasks, scheduler=scheduler, num_workers=num_workers) if tasks else []
    return report
