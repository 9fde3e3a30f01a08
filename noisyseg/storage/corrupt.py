"""Derived (noisy) label sets computed with Dask over the cases of a :class:`VolumeStore`.

``corrupt_store`` writes a new label set next to ``truth`` (DESIGN.md, "Label noise"):

* ``random`` / ``size`` — lesion censoring at rate ``r``. The driver lists the lesions of the
  source set from the store's lesion table (no volume reads) and chooses which to remove with
  :mod:`noisyseg.noise`'s own selection rule, so the result is identical to
  ``noise.censor_lesions(masks, r, mode=..., seed=..., scope=...)`` run in memory on the source
  masks of the split in case-id order: exactly ``count_to_select(r, K) = floor(r·K + 1/2)``
  lesions (round half up), uniformly at random or the smallest physical volumes (ties by seed);
  ``scope="dataset"`` pools ``K`` over the split, ``scope="case"`` uses ``K_i`` per case with the
  generator ``[seed, i]`` (``i`` = the case's position in the split). Then one Dask task per case
  reads that case's source labels, deletes the chosen components and writes the new set.
* ``polygon`` / ``hull`` / ``ellipsoid`` / ``dilate`` / ``erode`` / ``dilate_erode`` /
  ``jitter`` — boundary noise from :func:`noisyseg.noise.corrupt_boundaries`, at a named
  ``level`` (``mild``/``moderate``/``severe``) or explicit ``params``. Independent per case, so
  the tasks run directly in parallel; each case uses the seed :func:`case_seed_for(seed, case_id)`
  so its result does not depend on the other cases. ``rate`` (default 1: every lesion) is the
  fraction of each case's lesions whose outline changes (per case, unlike noise.py's in-memory
  pooled choice).

Lesion table of the new set (``VolumeStore.register_label_set``):

* censoring: one row per source lesion, ``lesion_id`` = the source set's id, geometry of the
  source lesion (unchanged for kept lesions), ``status`` ``present`` (kept) or ``removed``.
* boundary noise: one row per connected component of the new mask (fresh raster-order ids),
  its own geometry, ``status`` ``changed`` (differs from every source lesion) or ``present``
  (identical to one), plus ``source_lesion_ids`` (the overlapping source lesions, space
  separated: a grown lesion may have merged several), ``dice`` against their union,
  ``voxels_added`` and ``voxels_removed``.

The set is written as a new internal version (``labels/<name>~<version>`` in each case, beside
any version readers use now) and becomes the set only when every case has been written: one
atomic write of its registry entry (``index/labelsets/<name>.json``, which names the version, its
lesion table and per-case counts) switches masks, lesion table and counts together; the replaced
version is removed after. A kill at any moment leaves the complete old set (or no set) or the
complete new one, never a mix; the next run removes the leftovers. ``truth`` is never written.

Schedulers: ``threads`` (default), ``processes``, ``synchronous`` (debugging) and ``ray`` (Ray's
Dask scheduler, :func:`ray.util.dask.ray_dask_get`, on the cluster Ray is connected to).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import pandas as pd
import scipy.ndimage as ndi

from noisyseg import noise
from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import censor_positions, label_lesions, lesion_table_rows
from noisyseg.storage.index import lesion_columns
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.tasks import SCHEDULERS, run_tasks
from noisyseg.storage.validate import check_label_set_name, check_split

CENSOR_MODES: tuple[str, ...] = noise.CENSOR_MODES
BOUNDARY_MODES: tuple[str, ...] = noise.BOUNDARY_MODES
MODES: tuple[str, ...] = noise.NOISE_MODES


@dataclass
class CorruptReport:
    """What :func:`corrupt_store` wrote.

    Attributes:
        name: the new label set.
        source: the label set it was derived from.
        mode: corruption mode.
        params: everything needed to reproduce it (also stored with the set in the store).
        case_ids: cases written, in split order.
        lesions_source: lesions of the source set over those cases (``K``).
        lesions_removed: lesions deleted (censoring: ``floor(r·K + 1/2)`` for dataset scope).
        lesions_changed: lesions of the new set whose outline differs from the source.
        lesions_result: lesions (connected components) in the written set.
        seconds: wall time of the Dask computation plus registration.
        records_by_case: the lesion-table rows registered, per case.
    """

    name: str
    source: str
    mode: str
    params: dict[str, Any]
    case_ids: list[str]
    lesions_source: int
    lesions_removed: int
    lesions_changed: int
    lesions_result: int
    seconds: float
    records_by_case: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"{self.name}: {self.mode} of {self.source} over {len(self.case_ids)} cases: "
            f"{self.lesions_source} lesions -> {self.lesions_result} "
            f"({self.lesions_removed} removed, {self.lesions_changed} changed) "
            f"in {self.seconds:.1f} s"
        )


def default_name(
    mode: str,
    *,
    rate: float | None = None,
    level: str | None = None,
    params: Mapping[str, Any] | None = None,
    scope: str = "dataset",
    seed: int = 0,
) -> str:
    """The project's label-set name (:meth:`noisyseg.noise.NoiseSpec.label_set_name`):
    ``censor-random-0.50-s0``, ``censor-size-case-0.50-s0``, ``dilate-mild-1.00-s0``, ...
    """
    spec = noise.NoiseSpec(
        mode=mode,
        rate=1.0 if rate is None else float(rate),
        level=level or "moderate",
        scope=scope,
        params=params,
    )
    return spec.label_set_name(seed)


# --------------------------------------------------------------------------------------------
# Central censoring choice (driver side, from the lesion table only)
# --------------------------------------------------------------------------------------------


def select_censored(
    lesions: pd.DataFrame,
    rate: float,
    *,
    case_order: Sequence[str],
    mode: str = "random",
    seed: int = 0,
    scope: str = "dataset",
) -> pd.DataFrame:
    """Choose which lesions to censor from a lesion table alone, exactly as
    :func:`noisyseg.noise.censor_lesions` would on the masks of ``case_order``.

    Args:
        lesions: lesion-table rows (``case_id``, ``lesion_id``, ``volume_mm3``) of the lesions
            present in the source set; ``lesion_id`` is the raster-order component id that
            :func:`noisyseg.noise.label_lesions` gives (the store's ids for ``truth``).
        rate: censoring rate ``r`` in ``[0, 1]``.
        case_order: the cases, in the order noise.py would get their masks (case index ``i``).
        mode: ``random`` or ``size``.
        seed: RNG seed.
        scope: ``dataset`` or ``case``.

    Returns:
        The chosen rows, ordered by case then lesion id.
    """
    rank = {cid: i for i, cid in enumerate(case_order)}
    table = lesions[lesions["case_id"].isin(rank)].copy()
    table["_case"] = table["case_id"].map(rank).astype(int)
    table = table.sort_values(["_case", "lesion_id"], kind="stable").reset_index(drop=True)
    volumes = table["volume_mm3"].to_numpy(np.float64)
    picked = np.zeros(len(table), dtype=bool)
    if scope == "dataset":
        picked[censor_positions(volumes, rate, mode, np.random.default_rng(seed))] = True
    else:
        sizes = np.bincount(table["_case"].to_numpy(), minlength=len(case_order))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for i in range(len(case_order)):
            block = volumes[starts[i] : starts[i + 1]]
            chosen = censor_positions(block, rate, mode, np.random.default_rng([seed, i]))
            picked[starts[i] + chosen] = True
    return table[picked].drop(columns="_case").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Per-case tasks (run inside Dask workers: threads, processes or Ray workers)
# --------------------------------------------------------------------------------------------


def case_seed_for(seed: int, case_id: str) -> int:
    """Per-case seed for boundary noise: a function of ``(seed, case_id)`` only."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode("utf-8"))])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _axes(nd: int) -> tuple[str, ...]:
    return ("z", "y", "x")[-nd:]


def _match_components(
    labels: np.ndarray, n: int, rows: list[dict], *, case_id: str, label_set: str
) -> list[int]:
    """Component number in ``labels`` of each lesion-table row.

    Direct by ``lesion_id`` when its voxel count and bbox agree (truth and boundary sets number
    lesions in raster order); otherwise by voxel count + bbox (censored sets keep their source's
    ids). A table that disagrees with the array raises instead of deleting the wrong lesion.
    """
    axes = _axes(labels.ndim)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    boxes = ndi.find_objects(labels, max_label=n)

    def same(comp: int, row: dict) -> bool:
        if not (1 <= comp <= n) or counts[comp] != int(row["voxels"]) or boxes[comp - 1] is None:
            return False
        box = boxes[comp - 1]
        return all(
            box[i].start == int(row[f"bbox_min_{a}"]) and box[i].stop == int(row[f"bbox_max_{a}"])
            for i, a in enumerate(axes)
        )

    out = []
    for row in rows:
        comp = int(row["lesion_id"])
        if not same(comp, row):
            found = [
                int(c)
                for c in np.flatnonzero(counts == int(row["voxels"]))
                if c > 0 and same(int(c), row)
            ]
            if len(found) != 1:
                raise NoisysegInputError(
                    f"lesion table out of date: lesion {row['lesion_id']} ({row['voxels']} voxels) "
                    f"not found in labels/{label_set}",
                    case=case_id,
                )
            comp = found[0]
        out.append(comp)
    return out


def _clean_row(row: Mapping[str, Any], keep: Sequence[str]) -> dict[str, Any]:
    out = {}
    for k in keep:
        v = row[k]
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def _censor_case(
    store: Any,
    case_id: str,
    source: str,
    name: str,
    version: str | None,
    rows: pd.DataFrame,
    remove_ids: list[int],
) -> dict:
    """Read ``source`` of one case, delete the lesions ``remove_ids``, write set ``name`` (as
    internal ``version``).

    ``rows`` are the case's lesion-table rows of the source set (present lesions).
    """
    rows = rows.to_dict("records")

    mask = np.asarray(store.labels(case_id, source)[...])
    labels, n = label_lesions(mask)
    out = mask.copy()
    removed = {int(i) for i in remove_ids}
    doomed_rows = [r for r in rows if int(r["lesion_id"]) in removed]
    if doomed_rows:
        comps = _match_components(labels, n, doomed_rows, case_id=case_id, label_set=source)
        doomed = np.zeros(n + 1, dtype=bool)
        doomed[comps] = True
        out[doomed[labels]] = 0
    keep_cols = [
        c for c in lesion_columns(mask.ndim) if c not in ("case_id", "label_set", "status")
    ]
    records = [
        {
            **_clean_row(r, keep_cols),
            "status": "removed" if int(r["lesion_id"]) in removed else "present",
        }
        for r in rows
    ]
    store.write_label_set(case_id, name, out, records=records, version=version)
    return {
        "case_id": case_id,
        "records": records,
        "lesions_before": len(rows),
        "lesions_after": len(rows) - len(doomed_rows),
        "removed": len(doomed_rows),
        "changed": 0,
    }


def _boundary_case(
    store: Any,
    case_id: str,
    source: str,
    name: str,
    version: str | None,
    mode: str,
    level: str | None,
    params: Mapping[str, Any] | None,
    rate: float,
    seed: int,
) -> dict:
    """Boundary noise ``mode`` on one case's ``source`` labels; writes set ``name`` (as internal
    ``version``)."""
    mask = np.asarray(store.labels(case_id, source)[...])
    spacing = tuple(store.spacing(case_id))
    noisy, _changes = noise.corrupt_boundaries(
        [mask],
        mode,
        level=level,
        params=params,
        rate=rate,
        seed=case_seed_for(seed, case_id),
        spacings=[spacing],
    )
    out = np.asarray(noisy[0], dtype=np.uint8)
    src_labels, n_src = label_lesions(mask)
    new_labels, n_new = label_lesions(out)
    src_counts = np.bincount(src_labels.ravel(), minlength=n_src + 1)
    records = lesion_table_rows(out, spacing)
    boxes = ndi.find_objects(new_labels, max_label=n_new)
    changed = 0
    for rec in records:
        lid = rec["lesion_id"]
        box = boxes[lid - 1]
        comp = new_labels[box] == lid
        inside = src_labels[box][comp]
        overlap = np.unique(inside[inside > 0])
        both = int(np.count_nonzero(inside))  # source voxels of the overlapping lesions in comp
        n_comp = int(comp.sum())
        n_region = int(src_counts[overlap].sum())
        identical = len(overlap) == 1 and both == n_comp == n_region
        rec["status"] = "present" if identical else "changed"
        rec["source_lesion_ids"] = " ".join(str(int(v)) for v in overlap)
        rec["dice"] = 2.0 * both / (n_comp + n_region)
        rec["voxels_added"] = n_comp - both
        rec["voxels_removed"] = n_region - both
        changed += 0 if identical else 1
    store.write_label_set(case_id, name, out, records=records, version=version)
    return {
        "case_id": case_id,
        "records": records,
        "lesions_before": n_src,
        "lesions_after": n_new,
        "removed": 0,
        "changed": changed,
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def corrupt_store(
    store_url: str,
    *,
    source: str = "truth",
    name: str | None = None,
    mode: str,
    rate: float | None = None,
    level: str | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    scope: str = "dataset",
    split: str | None = "train",
    scheduler: str = "threads",
    progress: bool = True,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> CorruptReport:
    """Write label set ``name`` derived from ``source`` for every case of ``split``.

    Args:
        store_url: the store (path or fsspec URL).
        source: label set to corrupt (default ``truth``).
        name: new set name; default :func:`default_name` (``censor-random-0.50-s0``, ...).
        mode: ``random`` | ``size`` (censoring) or a boundary mode (see module docstring).
        rate: censoring rate in ``[0, 1]`` (required for censoring); for boundary modes the
            fraction of each case's lesions changed (default 1).
        level: boundary level ``mild`` | ``moderate`` (default) | ``severe``.
        params: explicit boundary parameters instead of ``level`` (``k``, ``n_vertices``, ...).
        seed: RNG seed; same store, arguments and seed give the same set.
        scope: censoring scope, ``dataset`` or ``case``.
        split: cases to write (``None``: all cases). Censoring counts ``K`` over this split.
        scheduler: Dask scheduler: ``threads``, ``processes``, ``synchronous`` or ``ray``.
        progress: show a Dask progress bar (local schedulers).
        overwrite: replace an existing registered set of the same name (never ``truth``).
        num_workers: worker count for the threads/processes schedulers (Dask default if None).

    Raises:
        NoisysegInputError: bad mode/rate/level/scope/scheduler, missing store or source set,
            name ``truth`` or already registered without ``overwrite``, no cases in the split.
    """
    rate, level, resolved = _check_arguments(mode, rate, level, params, scope, scheduler, split)
    name = _set_name(name, mode, rate, level, params, scope, seed)
    store = VolumeStore.open(store_url, mode="r+")
    case_ids = _target_cases(store, source, name, overwrite, split)
    info: dict[str, Any] = {
        "source": source,
        "mode": mode,
        "rate": float(rate),
        "seed": int(seed),
        "split": split,
    }
    t0 = time.perf_counter()
    store.cleanup_label_versions(name)  # leftovers of an interrupted run of this set
    version = store.new_label_version()
    if mode in CENSOR_MODES:
        info["scope"] = scope
        tasks = _censor_tasks(store, case_ids, source, name, version, rate, mode, seed, scope)
    else:
        info.update(level=level, params=dict(resolved), scope="case")
        tasks = [
            dask.delayed(_boundary_case, pure=False)(
                store, cid, source, name, version, mode, level, params, rate, seed
            )
            for cid in case_ids
        ]
    results = run_tasks(tasks, scheduler=scheduler, progress=progress, num_workers=num_workers)
    records_by_case = {r["case_id"]: r["records"] for r in results}
    # Commit point: one atomic write of the set's registry entry switches readers to the new
    # version (masks, lesion table and counts together); the replaced version is removed after.
    store.register_label_set(name, records_by_case, info, version=version)
    return _report(name, source, mode, info, case_ids, results, time.perf_counter() - t0)


def _set_name(
    name: str | None,
    mode: str,
    rate: float,
    level: str | None,
    params: Mapping[str, Any] | None,
    scope: str,
    seed: int,
) -> str:
    """The new set's name: ``name``, else :func:`default_name`; checked, never ``truth``."""
    if name is None:
        name = default_name(mode, rate=rate, level=level, params=params, scope=scope, seed=seed)
    check_label_set_name(name)
    if name == "truth":
        raise NoisysegInputError("the label set 'truth' is never overwritten; choose another name")
    return name


def _report(
    name: str,
    source: str,
    mode: str,
    info: dict[str, Any],
    case_ids: list[str],
    results: list[dict[str, Any]],
    seconds: float,
) -> CorruptReport:
    """The :class:`CorruptReport` of the per-case task ``results`` (lesion counts summed)."""
    return CorruptReport(
        name=name,
        source=source,
        mode=mode,
        params=info,
        case_ids=case_ids,
        lesions_source=sum(r["lesions_before"] for r in results),
        lesions_removed=sum(r["removed"] for r in results),
        lesions_changed=sum(r["changed"] for r in results),
        lesions_result=sum(r["lesions_after"] for r in results),
        seconds=seconds,
        records_by_case={r["case_id"]: r["records"] for r in results},
    )


def _check_arguments(
    mode: str,
    rate: float | None,
    level: str | None,
    params: Mapping[str, Any] | None,
    scope: str,
    scheduler: str,
    split: str | None,
) -> tuple[float, str | None, dict[str, Any]]:
    """Validated ``(rate, level, resolved boundary parameters)`` of a corruption request."""
    if mode not in MODES:
        raise NoisysegInputError(
            f"unknown corruption mode {mode!r} (choose from {', '.join(MODES)})"
        )
    if scheduler not in SCHEDULERS:
        raise NoisysegInputError(
            f"unknown scheduler {scheduler!r} (choose from {', '.join(SCHEDULERS)})"
        )
    if scope not in noise.SCOPES:
        raise NoisysegInputError(f"scope must be 'dataset' or 'case', got {scope!r}")
    if split is not None:
        check_split(split)
    if mode in CENSOR_MODES:
        if rate is None:
            raise NoisysegInputError(f"mode {mode!r} needs a rate in [0, 1] (--rate)")
        return noise.check_rate(rate), level, {}
    rate = noise.check_rate(1.0 if rate is None else rate)
    resolved = noise.resolve_boundary_params(mode, level, params)  # validates level/params
    return rate, (level or "moderate") if params is None else level, resolved


def _target_cases(
    store: VolumeStore, source: str, name: str, overwrite: bool, split: str | None
) -> list[str]:
    """The cases to write; refuses a missing source set, an existing ``name`` without
    ``overwrite`` and an empty split."""
    sets = store.label_sets()
    if source not in sets:
        raise NoisysegInputError(
            f"label set {source!r} not found (available: {', '.join(sets)})", path=store.url
        )
    if name in sets and not overwrite:
        raise NoisysegInputError(
            f"label set {name!r} already exists (pass overwrite / --overwrite to replace it)",
            path=store.url,
        )
    case_ids = list(store.case_ids(split=split))
    if not case_ids:
        raise NoisysegInputError(f"no cases in split {split!r}", path=store.url)
    return case_ids


def _censor_tasks(
    store: VolumeStore,
    case_ids: list[str],
    source: str,
    name: str,
    version: str,
    rate: float,
    mode: str,
    seed: int,
    scope: str,
) -> list:
    """One Dask task per case deleting the lesions :func:`select_censored` chose."""
    table = present_lesions(store.lesion_table(source), case_ids)
    chosen = select_censored(table, rate, case_order=case_ids, mode=mode, seed=seed, scope=scope)
    # per-case frames (not one dict per row: the table may hold 10^6 lesions)
    empty = table.iloc[:0]
    groups = dict(iter(table.groupby("case_id", sort=False)))
    remove_by_case: dict[str, list[int]] = {cid: [] for cid in case_ids}
    for cid, lid in zip(chosen["case_id"], chosen["lesion_id"]):
        remove_by_case[cid].append(int(lid))
    return [
        dask.delayed(_censor_case, pure=False)(
            store, cid, source, name, version, groups.get(cid, empty), remove_by_case[cid]
        )
        for cid in case_ids
    ]


def present_lesions(table: pd.DataFrame, case_ids: Sequence[str]) -> pd.DataFrame:
    """Rows of a lesion table that are lesions of the set now (status not ``removed``)."""
    table = table[table["case_id"].isin(set(case_ids))]
    if "status" in table.columns:
        table = table[table["status"] != "removed"]
    return table.reset_index(drop=True)
