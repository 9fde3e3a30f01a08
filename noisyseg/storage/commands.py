"""Storage verbs of the ``noisyseg`` CLI: ``synth``, ``ingest``, ``corrupt``, ``info``, ``verify``.

Heavy modules (phantom generators, Dask jobs) are imported inside the verbs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V

# --------------------------------------------------------------------------------------------
# synth
# --------------------------------------------------------------------------------------------


#: Phantom kinds ``noisyseg synth --kind`` offers (checked again by ``synth_store``).
SYNTH_KINDS = ("brain-mets", "skin")


def _cmd_synth(args: argparse.Namespace) -> int:
    # heavy (zarr, pandas, scipy): imported when the verb runs, so `noisyseg --help` stays fast
    from noisyseg.storage.phantoms.synth import synth_store

    written = synth_store(
        args.store,
        kind=args.kind,
        cases=args.cases,
        seed=args.seed,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        clean_fraction=args.clean_fraction,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"synth: wrote {len(written)} case(s) ({args.cases} requested) -> {args.store}")
    return 0


# --------------------------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------------------------


def _cmd_ingest(args: argparse.Namespace) -> int:
    # heavy (zarr, pandas, dask, rich): imported when the verb runs, keeping --help fast
    from noisyseg.storage.ingest import ingest_folder

    def on_error(failure: Any) -> None:
        print(f"noisyseg ingest: error: {failure.line()}", file=sys.stderr, flush=True)

    report = ingest_folder(
        args.src,
        args.store,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        on_error=on_error,
        foreground=args.foreground,
        target_spacing=_floats(args.target_spacing, "--target-spacing", 3),
        image_interpolation=args.image_interpolation,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        splits_file=args.splits,
        fold=args.fold,
        clean_cases=args.clean_cases,
        scheduler=args.scheduler,
        num_workers=args.workers,
    )
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    # a failed case is bad input: status 2, the good cases are in the store
    return 0 if report.ok else 2


def _floats(text: str | None, flag: str, n: int) -> tuple[float, ...] | None:
    """``"1,1,3"`` -> ``(1.0, 1.0, 3.0)`` (exactly ``n`` numbers) or None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise NoisysegInputError(f"{flag} must be {n} comma-separated numbers, got {text!r}")
    return values


def _cmd_split(args: argparse.Namespace) -> int:
    # heavy (zarr, pandas, dask, rich): imported when the verb runs, keeping --help fast
    from noisyseg.storage.splits import resplit_store
    from noisyseg.storage.store import VolumeStore

    store = VolumeStore.open(args.store, "r+")
    counts = resplit_store(
        store,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        splits_file=args.splits,
        fold=args.fold,
        clean_cases=args.clean_cases,
    )
    print("split: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {args.store}")
    return 0


# --------------------------------------------------------------------------------------------
# corrupt
# --------------------------------------------------------------------------------------------


def _parse_params(items: Sequence[str] | None) -> dict[str, Any] | None:
    """``["k=2", "n_vertices=8"]`` -> ``{"k": 2, "n_vertices": 8}`` (values parsed as JSON when
    they are, else kept as strings); None when no item is given."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise NoisysegInputError(f"--param must be KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _cmd_corrupt(args: argparse.Namespace) -> int:
    # heavy (zarr, pandas, dask, rich): imported when the verb runs, keeping --help fast
    from noisyseg.storage.layout import TRUTH
    from noisyseg.storage.store import VolumeStore

    # Validate before any work (DESIGN.md, "Bad input"); corrupt_store re-checks its own rules.
    rate = V.check_rate(args.rate) if args.rate is not None else None
    store = VolumeStore.open(args.store, "r")
    source = V.check_label_set_name(args.source)
    sets = store.label_sets()
    if source not in sets:
        raise NoisysegInputError(
            f"label set {source!r} missing (have: {', '.join(sets)})", path=args.store
        )
    if args.name is not None:
        V.check_label_set_name(args.name)
        if args.name == TRUTH:
            raise NoisysegInputError("the 'truth' label set is never overwritten", path=args.store)
        if args.name in sets and not args.overwrite:
            raise NoisysegInputError(
                f"label set {args.name!r} already exists (choose another --name or pass --overwrite)",
                path=args.store,
            )
    split = None if args.split == "all" else args.split
    # heavy (zarr, pandas, dask, rich): imported when the verb runs, keeping --help fast
    from noisyseg.storage.corrupt import corrupt_store

    kwargs: dict[str, Any] = {
        "source": source,
        "name": args.name,
        "mode": args.mode,
        "rate": rate,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "scope": args.scope,
        "split": split,
        "progress": not args.no_progress,
        "overwrite": args.overwrite,
    }
    if args.level is not None:
        kwargs["level"] = args.level
    params = _parse_params(args.param)
    if params is not None:
        kwargs["params"] = params
    report = corrupt_store(args.store, **kwargs)
    summary = getattr(report, "summary", None)
    print(summary() if callable(summary) else f"corrupt: done ({report})")
    return 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def store_summary(store: Any) -> dict[str, Any]:
    """Summary of a store: cases per split, label sets with params and lesion statistics.

    Lesion statistics per label set: number of cases, lesions by status, and quantiles
    (0, 0.25, 0.5, 0.75, 1) of lesion ``voxels`` and ``volume_mm3`` over lesions not removed.
    """
    index = store.index()
    lesions = store.lesion_table()
    sets = []
    for name in store.label_sets():
        try:
            params = store.label_set_info(name).get("params", {})
        except NoisysegInputError:
            params = {}
        t = lesions[lesions["label_set"] == name]
        kept = t[t["status"] != "removed"]
        stats: dict[str, Any] = {
            "name": name,
            "params": params,
            "cases": int(t["case_id"].nunique()),
            "lesions": len(kept),
            "by_status": {
                s: int((t["status"] == s).sum()) for s in ("present", "removed", "changed")
            },
        }
        for col in ("voxels", "volume_mm3"):
            vals = kept[col].to_numpy(dtype=np.float64)
            stats[f"{col}_quantiles"] = (
                [float(q) for q in np.quantile(vals, [0, 0.25, 0.5, 0.75, 1])] if vals.size else []
            )
        sets.append(stats)
    return {
        "url": store.url,
        "spatial_dims": store.spatial_dims,
        "channel_names": store.channel_names,
        "cases": len(index),
        "splits": {
            s: int((index["split"] == s).sum())
            for s in (*V.SPLITS, V.UNLABELED)
            if s in V.SPLITS or (index["split"] == s).any()  # unlabeled shown when present
        },
        "clean": int(index["clean"].sum()) if len(index) else 0,
        "label_sets": sets,
    }


def _fmt_q(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{v:.4g}" for v in values)


def _cmd_info(args: argparse.Namespace) -> int:
    # heavy (zarr, pandas, dask, rich): imported when the verb runs, keeping --help fast
    from noisyseg.storage.store import VolumeStore

    store = VolumeStore.open(args.store, "r")
    summary = store_summary(store)
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    # heavy (zarr, pandas, dask, rich): imported when the verb runs, keeping --help fast
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    # piped output (files, CI logs) gets a wide console instead of rich's 80-column default
    console = Console(width=None if sys.stdout.isatty() else 200)
    index = store.index()
    console.print(
        f"[bold]{store.url}[/bold]: {summary['cases']} cases ({store.spatial_dims}D, channels "
        f"{', '.join(store.channel_names)}); splits "
        + ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
        + f"; clean {summary['clean']}"
    )
    table = Table(title="cases", show_lines=False)
    count_cols = [c for c in index.columns if c.startswith("n_lesions_")]
    for col in ["case_id", "split", "clean", "shape", "spacing", *count_cols]:
        table.add_column(
            col.replace("n_lesions_", "lesions:"), no_wrap=col == "case_id", overflow="fold"
        )
    shown = index if args.limit <= 0 else index.head(args.limit)
    for _, row in shown.iterrows():
        table.add_row(
            str(row["case_id"]),
            str(row["split"]),
            "yes" if row["clean"] else "",
            "×".join(str(s) for s in row["shape"]),
            ", ".join(f"{s:g}" for s in row["spacing"]),
            *["-" if pd.isna(row[c]) else str(int(row[c])) for c in count_cols],
        )
    console.print(table)
    if len(index) > len(shown):
        console.print(f"... {len(index) - len(shown)} more case(s) (use --limit 0 to show all)")
    sets = Table(title="label sets and lesion statistics")
    for col in (
        "label set",
        "params",
        "cases",
        "lesions",
        "removed",
        "changed",
        "voxels q0/25/50/75/100",
        "volume mm³ q0/25/50/75/100",
    ):
        sets.add_column(col, overflow="fold")
    for s in summary["label_sets"]:
        sets.add_row(
            s["name"],
            ", ".join(f"{k}={v}" for k, v in s["params"].items()),
            str(s["cases"]),
            str(s["lesions"]),
            str(s["by_status"]["removed"]),
            str(s["by_status"]["changed"]),
            _fmt_q(s["voxels_quantiles"]),
            _fmt_q(s["volume_mm3_quantiles"]),
        )
    console.print(sets)
    return 0


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    # heavy (zarr, pandas, dask): imported when the verb runs, so `noisyseg --help` stays fast
    from noisyseg.storage.verify import verify_store

    report = verify_store(
        args.store,
        repair_from=args.repair_from,
        scheduler=args.scheduler,
        num_workers=args.workers,
    )
    for problem in report.problems:
        print(f"store: {problem}")
    for case in report.cases:
        if not case.ok or case.repaired or args.all:
            print(case.line())
        for problem in case.problems:
            print(f"  {problem}")
        if args.all:
            for note in case.notes:
                print(f"  note: {note}")
    print(report.summary())
    return 0 if report.ok else 2


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


def _add_split_arguments(
    p: argparse.ArgumentParser, *, val_default: float | None, test_default: float | None
) -> None:
    """Split flags shared by ``ingest`` and ``split`` (rule: noisyseg.storage.splits)."""
    p.add_argument(
        "--val-fraction",
        type=float,
        default=val_default,
        help="share of labelled cases for validation (ingest default 0.2; split: 0 if unset)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=test_default,
        help="share held out for test (ingest default 0.1, 0 when the source has labelsTs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split permutation")
    p.add_argument(
        "--splits",
        default=None,
        metavar="FILE",
        help="take splits from a file: nnU-Net splits_final.json or {train,val,test} lists",
    )
    p.add_argument("--fold", type=int, default=0, help="fold of a splits_final.json (default 0)")
    p.add_argument(
        "--clean-cases",
        default=None,
        metavar="FILE",
        help="file listing the clean-annotated cases (one id per line or a JSON list)",
    )


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    """The ``synth`` verb."""
    p = subparsers.add_parser("synth", help="write a store of phantom cases (no scans needed)")
    p.add_argument("store", help="store path or URL (file://, s3://, gs://)")
    p.add_argument("--kind", required=True, choices=SYNTH_KINDS)
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--clean-fraction",
        type=float,
        default=0.05,
        help="share of train cases flagged clean (at least 1 when > 0)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_synth)


def _add_ingest(subparsers: argparse._SubParsersAction) -> None:
    """The ``ingest`` verb."""
    p = subparsers.add_parser(
        "ingest",
        help="turn a folder of scans (nnU-Net v2/MSD, BraTS, 2D images+masks) into a store",
    )
    p.add_argument("src", help="source folder")
    p.add_argument("store", help="store path or URL; an existing store is resumed")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing store instead of resuming"
    )
    p.add_argument(
        "--foreground",
        default=None,
        help="labels forming the lesion mask: values '1,2,3' or dataset.json names "
        "'enhancing tumor,necrosis' (default: every non-zero label)",
    )
    p.add_argument(
        "--target-spacing",
        default=None,
        metavar="X,Y,Z",
        help="resample to this voxel spacing in mm (RAS x,y,z; images linear or B-spline, "
        "labels nearest)",
    )
    p.add_argument(
        "--image-interpolation",
        default=None,
        choices=["linear", "bspline"],
        help="how --target-spacing resamples images: linear (default) or bspline (cubic "
        "B-spline, order 3, nnU-Net's default); labels are always nearest neighbour",
    )
    p.add_argument(
        "--scheduler",
        default="threads",
        help="Dask scheduler: threads | processes | synchronous | ray",
    )
    p.add_argument("--workers", type=int, default=None, help="parallel cases (default: cores)")
    p.add_argument("--no-progress", action="store_true")
    _add_split_arguments(p, val_default=None, test_default=None)
    p.set_defaults(func=_cmd_ingest)


def _add_split(subparsers: argparse._SubParsersAction) -> None:
    """The ``split`` verb."""
    p = subparsers.add_parser(
        "split", help="re-assign train/val/test (and the clean flag) of a store's labelled cases"
    )
    p.add_argument("store")
    _add_split_arguments(p, val_default=None, test_default=None)
    p.set_defaults(func=_cmd_split)


def _add_corrupt(subparsers: argparse._SubParsersAction) -> None:
    """The ``corrupt`` verb."""
    p = subparsers.add_parser(
        "corrupt", help="derive a noisy label set with Dask (truth is never touched)"
    )
    p.add_argument("store")
    p.add_argument(
        "--from", dest="source", default="truth", help="source label set (default truth)"
    )
    p.add_argument(
        "--name", default=None, help="new label set name (default e.g. censor-random-0.50-s0)"
    )
    p.add_argument(
        "--mode",
        required=True,
        help="random | size (censoring) | polygon | hull | ellipsoid | dilate | erode | dilate_erode | jitter",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="censoring rate in [0, 1] (boundary modes: share of lesions changed, default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scope",
        default="dataset",
        choices=("dataset", "case"),
        help="censoring: K counted over the split or per case",
    )
    p.add_argument(
        "--split",
        default="train",
        choices=("train", "val", "test", "all"),
        help="cases to write (default train)",
    )
    p.add_argument("--level", default=None, help="boundary noise level: mild | moderate | severe")
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="explicit boundary parameter (repeatable), e.g. k=2",
    )
    p.add_argument(
        "--scheduler",
        default="threads",
        help="Dask scheduler: threads | processes | synchronous | ray",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a registered set of the same name (never truth)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_corrupt)


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    """The ``info`` verb."""
    p = subparsers.add_parser(
        "info", help="print a store's index, label sets and lesion statistics"
    )
    p.add_argument("store")
    p.add_argument("--limit", type=int, default=50, help="cases shown (0: all)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")
    p.set_defaults(func=_cmd_info)


def _add_verify(subparsers: argparse._SubParsersAction) -> None:
    """The ``verify`` verb."""
    p = subparsers.add_parser(
        "verify",
        help="check every chunk of a store against its integrity manifests (exit 2 on damage)",
    )
    p.add_argument("store")
    p.add_argument(
        "--repair-from",
        default=None,
        metavar="SRC",
        help="copy of the store: put back missing/damaged chunks whose copy has the recorded hash",
    )
    p.add_argument("--scheduler", default="threads", help="Dask scheduler: threads | processes")
    p.add_argument("--workers", type=int, default=None, help="Dask workers (default: Dask's)")
    p.add_argument("--all", action="store_true", help="print every case, not only damaged ones")
    p.set_defaults(func=_cmd_verify)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the storage verbs: ``synth``, ``ingest``, ``split``, ``corrupt``, ``info``, ``verify``."""
    _add_synth(subparsers)
    _add_ingest(subparsers)
    _add_split(subparsers)
    _add_corrupt(subparsers)
    _add_info(subparsers)
    _add_verify(subparsers)
