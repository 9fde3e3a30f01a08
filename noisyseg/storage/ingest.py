"""Ingest a folder of scans into a :class:`~noisyseg.storage.store.VolumeStore`.

Layouts (nnU-Net v2 / MSD, BraTS, 2D images + masks) are found by :mod:`.layouts`; one case is
read by :mod:`.case_readers` (labels -> ``truth`` by ``--foreground``, the multi-class map kept
as :data:`SOURCE_LABELS`, reorientation to RAS and ``--target-spacing`` via :mod:`.geometry`);
splits and clean lists follow :mod:`.splits`. This module runs the cases as Dask tasks
(:func:`ingest_folder`; scheduler ``threads``, ``processes``, ``synchronous`` or ``ray``, as
``noisyseg corrupt``), :data:`COMPACT_EVERY` at a time.

Every case is validated on its own; a bad case gives one error line (case, file, rule) and the
other cases are still ingested. Cases already in the store are skipped, so a re-run after an
interruption finishes the job (see the atomicity notes in :mod:`noisyseg.storage.store`).
``overwrite`` of a local store builds the new store beside the old one and swaps it in at the end
(:func:`noisyseg.storage.atomic.replace_store`): a kill leaves the complete old store.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import nibabel as nib
import numpy as np
from dask.callbacks import Callback

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import geometry as G
from noisyseg.storage import splits as S
from noisyseg.storage.atomic import replace_store
from noisyseg.storage.case_readers import (
    SOURCE_LABELS,
    LabelRule,
    NiftiOptions,
    is_grey_image,
    load_2d_case,
    load_nifti_case,
    parse_foreground,
)
from noisyseg.storage.filesystems import open_filesystem
from noisyseg.storage.layout import TRUTH
from noisyseg.storage.layouts import LAYOUT_2D, CaseSpec, Layout, discover
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.tasks import SCHEDULERS, run_tasks

__all__ = [
    "SOURCE_LABELS",
    "CaseFailure",
    "CaseSpec",
    "IngestReport",
    "discover",
    "ingest_folder",
    "load_2d_case",
    "load_nifti_case",
    "parse_foreground",
    "progress_bar",
]

#: Compact the index every this many written cases (journal files -> Parquet).
COMPACT_EVERY = 500
#: Test hook: seconds to sleep after each written case, so a test can kill an ingest midway.
SLOW_ENV = "NOISYSEG_TEST_SLOW_INGEST"
#: Default share of labelled cases held out for validation.
DEFAULT_VAL_FRACTION = 0.2
#: Default share held out for test when the source has no labelled test set of its own.
DEFAULT_TEST_FRACTION = 0.1


@dataclass
class CaseFailure:
    """One bad case: its id, the offending file (when known) and the rule broken."""

    case_id: str
    path: str | None
    rule: str

    def line(self) -> str:
        return str(NoisysegInputError(self.rule, case=self.case_id, path=self.path))


@dataclass
class IngestReport:
    """Outcome of :func:`ingest_folder`."""

    store_url: str
    layout: str  # "nnunet", "brats" or "2d"
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the store
    failed: list[CaseFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)  # split planned per case
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (
            f"ingested {len(self.written)} case(s), skipped {len(self.skipped)} already in store, "
            f"{len(self.failed)} failed -> {self.store_url}"
        )


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


def progress_bar(verb: str, *, enabled: bool) -> Any:
    """A ``rich`` progress bar on stderr: ``<verb> <task description>``, bar, done/total, ETA.

    ``enabled=False`` gives a bar that prints nothing (``--no-progress``).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{verb}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


class _CaseDone(Callback):
    """Dask callback (local schedulers): calls ``fn(result)`` as each case task finishes."""

    def __init__(self, fn: Callable[[Any], None]) -> None:
        super().__init__()
        self.fn = fn

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith("ingest-case-"):
            self.fn(result)


# --------------------------------------------------------------------------------------------
# the ingest
# --------------------------------------------------------------------------------------------


def ingest_one(store: VolumeStore, spec: CaseSpec, options: Any, clean: bool) -> Any:
    """Task body: read one case and write it. Returns the case id, or a CaseFailure."""
    loader = load_2d_case if store.spatial_dims == 2 else load_nifti_case
    try:
        kwargs = loader(spec, options)
        store.write_case(spec.case_id, clean=clean, **kwargs)
    except NoisysegInputError as e:
        return CaseFailure(spec.case_id, e.path, e.rule)
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)
    if slow > 0:
        time.sleep(slow)
    return spec.case_id


def _channel_names(layout: Layout) -> list[str]:
    """Channel names of the store to create: dataset.json / BraTS names, else counted from the
    first readable case (headers only)."""
    if layout.info.channel_names:
        return list(layout.info.channel_names)
    for spec in layout.specs:
        if spec.problem is not None or not spec.images:
            continue
        try:
            if layout.kind == LAYOUT_2D:
                grey = is_grey_image(spec.images[0], spec.case_id)
                return ["gray"] if grey else ["R", "G", "B"]
            if len(spec.images) > 1:
                return [f"ch{i}" for i in range(len(spec.images))]
            shape = nib.load(str(spec.images[0])).shape
            n = shape[3] if len(shape) == 4 else 1
            return [f"ch{i}" for i in range(n)]
        except Exception:  # noqa: BLE001 - an unreadable file is that case's error, reported later
            continue
    return ["ch0"]


def _label_rule(layout: Layout, foreground: str | Sequence[Any] | None) -> LabelRule:
    fg = parse_foreground(foreground, layout.info)
    where = "dataset.json" if layout.info.path else "BraTS"
    return LabelRule(fg, dict(layout.info.labels), where)


def _truth_params(
    src: str, layout: Layout, rule: LabelRule, target: Any, interpolation: str
) -> dict[str, Any]:
    """The truth label set's params: where it comes from and how it was made (foreground,
    label names, target spacing in mm and the image interpolation used to reach it)."""
    return {
        "source": "ingest",
        "src": str(Path(src).resolve()),
        "layout": layout.kind,
        "foreground": list(rule.foreground) if rule.foreground is not None else "nonzero",
        "label_names": {str(v): n for v, n in sorted(rule.names.items())},
        "label_map": SOURCE_LABELS if layout.kind != LAYOUT_2D else None,
        "target_spacing": list(target) if target is not None else None,
        "image_interpolation": interpolation if target is not None else None,
    }


def _existing_store(url: str, storage_options: dict[str, Any] | None) -> bool:
    """True when a noisyseg store is at ``url``; False when nothing (or an empty folder) is.

    Raises:
        NoisysegInputError: something else is there (never replaced, even with ``overwrite``).
    """
    try:
        VolumeStore.open(url, "r", storage_options)
        return True
    except NoisysegInputError:
        pass
    fs, root = open_filesystem(str(url), storage_options)
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root, detail=False)):
        raise NoisysegInputError(
            "path exists and is not a noisyseg store (refusing to overwrite)", path=str(url)
        )
    return False


def _resume(store: VolumeStore, layout: Layout, params: dict[str, Any]) -> VolumeStore:
    """Check that an existing store was ingested the same way (dimensionality, foreground,
    target spacing) before cases are added to it."""
    if store.spatial_dims != layout.spatial_dims:
        raise NoisysegInputError(
            f"store holds {store.spatial_dims}D cases, source is {layout.spatial_dims}D",
            path=store.url,
        )
    old = store.label_set_info(TRUTH).get("params", {})
    for key in ("foreground", "target_spacing", "image_interpolation"):
        if key in old and old[key] != params[key]:
            raise NoisysegInputError(
                f"store was ingested with {key} {old[key]}, now {params[key]} "
                "(pass --overwrite to rebuild it)",
                path=store.url,
            )
    store.cleanup_staging()
    return store


def _plan(
    layout: Layout,
    *,
    seed: int,
    val_fraction: float | None,
    test_fraction: float | None,
    splits_file: str | None,
    fold: int,
) -> dict[str, str]:
    """Split of every case: labelled train candidates by :func:`splits.plan_splits`; cases the
    layout placed in ``test`` (labelsTs) or ``unlabeled`` keep that."""
    labelled = [s.case_id for s in layout.specs if s.split == "train"]
    has_test = any(s.split == "test" for s in layout.specs)
    if test_fraction is None:
        test_fraction = 0.0 if has_test else DEFAULT_TEST_FRACTION
    plan = S.plan_splits(
        labelled,
        seed=seed,
        val_fraction=DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
        test_fraction=test_fraction,
        splits_file=splits_file,
        fold=fold,
    )
    return {s.case_id: plan.get(s.case_id, s.split) for s in layout.specs}


@dataclass
class _Job:
    """Everything decided before the first case is read."""

    src: str
    layout: Layout
    params: dict[str, Any]  # truth label-set params (foreground, target spacing, names)
    options: NiftiOptions | None
    good: list[CaseSpec]  # cases without a scanning problem, split assigned
    clean_ids: set[str]
    scheduler: str
    num_workers: int | None
    progress: bool


def ingest_folder(
    src: str | os.PathLike,
    store_url: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_error: Callable[[CaseFailure], None] | None = None,
    foreground: str | Sequence[Any] | None = None,
    target_spacing: Sequence[float] | None = None,
    image_interpolation: str | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    splits_file: str | None = None,
    fold: int = 0,
    clean_cases: str | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
) -> IngestReport:
    """Ingest every case of ``src`` into the store at ``store_url`` (created when missing).

    Args:
        src: source folder (nnU-Net v2/MSD, BraTS, or 2D images + masks; :mod:`.layouts`).
        store_url: store location (path or fsspec URL). An existing store is resumed: cases
            already in it are skipped. ``overwrite`` replaces the whole store instead (local
            stores: built beside the old one and swapped in at the end).
        foreground: label values/names forming the lesion mask (None: every non-zero label).
        target_spacing: resample to this spacing (mm, x,y,z after RAS reorientation).
        image_interpolation: how images are resampled to ``target_spacing``: ``linear``
            (default) or ``bspline`` (cubic, nnU-Net's); labels are always nearest neighbour.
        val_fraction, test_fraction, seed: split rule of :mod:`.splits` over the labelled
            training cases (defaults 0.2 and 0.1, test 0 when the source has labelsTs).
        splits_file, fold: take the splits from a file instead (nnU-Net splits_final.json).
        clean_cases: file listing the cases with clean (trusted) annotation.
        scheduler, num_workers: Dask scheduler (``threads``, ``processes``, ``synchronous``,
            ``ray``) and its worker count.
        progress: show a progress bar (stderr). on_error: called with each failure.

    Returns an :class:`IngestReport` with the written, skipped and failed cases.

    Raises:
        NoisysegInputError: problems of the whole command (missing/empty folder, unknown
            ``--foreground`` name, bad split or clean file, a store of another kind); per-case
            problems go into the report instead.
    """
    t0 = time.perf_counter()
    _check_scheduler(scheduler)
    layout = discover(src)
    rule = _label_rule(layout, foreground)
    target = _target_spacing(target_spacing, layout)
    interpolation = _interpolation(image_interpolation, target)
    plan = _plan(
        layout,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        splits_file=splits_file,
        fold=fold,
    )
    clean_ids = _clean_ids(clean_cases, plan)
    report = IngestReport(str(store_url), layout.kind, notes=list(layout.notes), splits=plan)

    def fail(failure: CaseFailure) -> None:
        report.failed.append(failure)
        if on_error is not None:
            on_error(failure)

    good = _screen(layout, plan, fail)
    job = _Job(
        str(src),
        layout,
        _truth_params(str(src), layout, rule, target, interpolation),
        NiftiOptions(rule, target, interpolation) if layout.kind != LAYOUT_2D else None,
        good,
        clean_ids,
        scheduler,
        num_workers,
        progress,
    )
    if good:
        _write_store(job, str(store_url), report, fail, overwrite, storage_options)
    report.seconds = time.perf_counter() - t0
    return report


def _check_scheduler(scheduler: str) -> None:
    """NoisysegInputError for an unknown Dask scheduler; ``ray`` needs Ray installed."""
    if scheduler not in SCHEDULERS:
        raise NoisysegInputError(
            f"unknown scheduler {scheduler!r} (choose from {', '.join(SCHEDULERS)})"
        )
    if scheduler == "ray":
        _require_ray()


def _clean_ids(clean_cases: str | None, plan: dict[str, str]) -> set[str]:
    """Ids of the clean-case list (empty without one); every id must be a case of the source."""
    if clean_cases is None:
        return set()
    ids = set(S.read_case_list(clean_cases))
    S.check_known(ids, plan, what="clean-case list", path=str(clean_cases))
    return ids


def _screen(
    layout: Layout, plan: dict[str, str], fail: Callable[[CaseFailure], None]
) -> list[CaseSpec]:
    """Cases without a scanning problem, their split set from ``plan``; the others reported."""
    good = []
    for spec in layout.specs:
        if spec.problem is not None:
            fail(CaseFailure(spec.case_id, spec.problem.path, spec.problem.rule))
        else:
            spec.split = plan[spec.case_id]
            good.append(spec)
    return good


def _require_ray() -> None:
    """Refuse ``--scheduler ray`` before any work when there is no Ray to connect to."""
    import ray  # heavy optional import: only the ray scheduler needs it

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        raise NoisysegInputError(
            "scheduler 'ray' needs a Ray connection: call ray.init(...) first, set "
            "RAY_ADDRESS, or run under `ray job submit`"
        )


def _target_spacing(target_spacing: Sequence[float] | None, layout: Layout) -> Any:
    if target_spacing is None:
        return None
    if layout.kind == LAYOUT_2D:
        raise NoisysegInputError("--target-spacing applies to 3D NIfTI datasets only")
    target = tuple(float(t) for t in target_spacing)
    G.resampled_grid(G.make_grid((1, 1, 1), np.eye(4), (1, 1, 1)), target)  # validates it
    return target


def _interpolation(name: str | None, target: Any) -> str:
    """The image interpolation of ``--image-interpolation`` (default linear); refused without
    ``--target-spacing`` (nothing is resampled then)."""
    if name is None:
        return G.DEFAULT_IMAGE_INTERPOLATION
    G.interpolation_order(name)  # validates it
    if target is None:
        raise NoisysegInputError("--image-interpolation needs --target-spacing")
    return name


def _write_store(
    job: _Job,
    url: str,
    report: IngestReport,
    fail: Callable[[CaseFailure], None],
    overwrite: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Resume or create the store at ``url`` and ingest the job's cases into it; with
    ``overwrite`` a local store is rebuilt beside the old one and swapped in at the end."""

    def build(target_url: str, replace: bool) -> None:
        store = VolumeStore.create(
            target_url,
            spatial_dims=job.layout.spatial_dims,
            channel_names=_channel_names(job.layout),
            overwrite=replace,
            storage_options=storage_options,
            truth_params=job.params,
        )
        _ingest_into(store, job, report, fail)

    exists = _existing_store(url, storage_options)
    if exists and not overwrite:
        store = _resume(VolumeStore.open(url, "r+", storage_options), job.layout, job.params)
        _ingest_into(store, job, report, fail)
    elif exists:
        try:
            replace_store(url, lambda staged: build(staged, False), storage_options=storage_options)
        except NotImplementedError:  # object store: no atomic swap, replace in place
            build(url, True)
    else:
        build(url, False)


def _ingest_into(
    store: VolumeStore, job: _Job, report: IngestReport, fail: Callable[[CaseFailure], None]
) -> None:
    """Write the job's cases not yet in ``store``, then index, clean flags and cleanup."""
    done = set(store.case_ids())
    pending = [s for s in job.good if s.case_id not in done]
    report.skipped = [s.case_id for s in job.good if s.case_id in done]
    _run(store, pending, job, report, fail)
    store.compact()
    present = set(store.case_ids())
    if job.clean_ids & present:
        store.set_clean(sorted(job.clean_ids & present), True)
    store.cleanup_staging()


def _run(
    store: VolumeStore,
    pending: list[CaseSpec],
    job: _Job,
    report: IngestReport,
    fail: Callable[[CaseFailure], None],
) -> None:
    """Ingest ``pending`` cases as Dask tasks, :data:`COMPACT_EVERY` at a time (the index is
    compacted after each batch), reporting each result as its task finishes (local schedulers;
    with ``ray`` at the end of each batch)."""
    bar = progress_bar("ingest", enabled=job.progress)
    local = job.scheduler != "ray"
    with bar:
        task = bar.add_task(Path(job.src).name, total=len(pending))

        def on_result(result: Any) -> None:
            if isinstance(result, CaseFailure):
                fail(result)
            else:
                report.written.append(result)
            bar.advance(task)

        for start in range(0, len(pending), COMPACT_EVERY):
            tasks = [
                dask.delayed(ingest_one, pure=False)(
                    store,
                    s,
                    job.options,
                    s.case_id in job.clean_ids,
                    dask_key_name=f"ingest-case-{s.case_id}",
                )
                for s in pending[start : start + COMPACT_EVERY]
            ]
            with _CaseDone(on_result) if local else contextlib.nullcontext():
                results = run_tasks(tasks, scheduler=job.scheduler, num_workers=job.num_workers)
            if not local:
                for r in results:
                    on_result(r)
            store.compact()
