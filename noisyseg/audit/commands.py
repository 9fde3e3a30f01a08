"""``noisyseg audit``: the review list of suspected missed lesions, and ``--accept`` to repair.

::

    noisyseg audit --model MODEL --store STORE --labels LABEL_SET [--split train] [--top K]
                   [--output DIR] [--threshold T]
    noisyseg audit --model MODEL --store STORE --labels LABEL_SET --accept ID [ID ...] --name NEW

MODEL is what ``noisyseg predict`` loads: ``models:/NAME@ALIAS``, an MLflow run id, a ``.pt``
checkpoint or a Ray checkpoint directory. The library code lives in :mod:`noisyseg.audit.run`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from noisyseg.audit import DEFAULT_THRESHOLD
from noisyseg.distributed.inference_args import (
    add_parallel_args,
    add_window_args,
    check_parallel_args,
    resolve_device,
    uses_ray,
)
from noisyseg.distributed.inference_args import select_cases as store_cases
from noisyseg.errors import NoisysegInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` verb."""
    audit = subparsers.add_parser(
        "audit",
        help="rank the lesions a label set probably misses; accept some into a new set",
        description="Predict every case of a split, keep the predicted lesions (components of "
        "p >= threshold) that neither overlap nor touch a labelled lesion, rank them (max "
        "probability, then volume, then distance to the labels), write CSV + Parquet and a "
        "picture per top candidate, and log them to MLflow. With --accept IDS --name NEW: "
        "write label set NEW = the audited set plus those candidates.",
    )
    audit.add_argument(
        "--model",
        required=True,
        help="as predict takes it: models:/NAME@ALIAS, an MLflow run id, a .pt file or a Ray "
        "checkpoint directory",
    )
    audit.add_argument("--store", required=True, help="the volume store (path or fsspec URL)")
    audit.add_argument("--labels", required=True, help="the label set to audit")
    audit.add_argument("--split", default="train", help="cases to audit (default: train)")
    audit.add_argument("--cases", nargs="+", metavar="ID", help="audit these cases instead")
    audit.add_argument("--top", type=int, default=20, help="pictures for the top K (default 20)")
    audit.add_argument("--output", help="output folder (default ./audit-<labels>-<time>)")
    audit.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"candidate probability threshold ({DEFAULT_THRESHOLD}; low on purpose: docs/audit.md)",
    )
    audit.add_argument("--accept", nargs="+", metavar="ID", help="candidate ids <case>:<n>")
    audit.add_argument("--name", help="the new label set written with --accept")
    audit.add_argument("--overwrite", action="store_true", help="replace an existing --name set")
    audit.add_argument("--experiment", help="MLflow experiment (default: the model run's)")
    audit.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    add_window_args(audit)
    add_parallel_args(audit)
    audit.set_defaults(func=run_audit)


# ------------------------------------------------------------------------------ validation
def check_args(args: argparse.Namespace) -> None:
    """Flag values that are wrong whatever the store holds."""
    if not 0.0 < args.threshold <= 1.0:
        raise NoisysegInputError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.top < 0:
        raise NoisysegInputError(f"--top must be >= 0, got {args.top}")
    check_parallel_args(args)
    if args.sw_batch_size < 1:
        raise NoisysegInputError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise NoisysegInputError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.accept and not args.name:
        raise NoisysegInputError("--accept needs --name (the new label set)")
    if args.name and not args.accept:
        raise NoisysegInputError("--name is only used with --accept")


def absolute_store(path: str) -> str:
    """Local store paths made absolute (Ray workers run elsewhere); URLs unchanged."""
    return path if "://" in path else str(Path(path).resolve())


def inference_settings(args: argparse.Namespace, model: Any, store: Any):
    """Sliding-window settings from the flags and the training config (as ``predict``)."""
    from noisyseg.distributed.checkpoints import model_from_checkpoint
    from noisyseg.distributed.inference import InferenceSettings
    from noisyseg.distributed.model_loading import check_roi, roi_from_config
    from noisyseg.distributed.prediction_io import check_channels

    _, spec = model_from_checkpoint(model.checkpoint, source=model.source)
    check_channels(store, spec, store_path=store.url)
    config = dict(model.checkpoint.get("config") or {})
    if args.roi_size:
        roi = roi_from_config({"patch_size": list(args.roi_size)}, spec.spatial_dims)
    else:
        roi = roi_from_config(config, spec.spatial_dims)
    overlap = args.overlap if args.overlap is not None else float(config.get("val_overlap", 0.25))
    return InferenceSettings(
        roi_size=check_roi(roi, spec),
        overlap=overlap,
        sw_batch_size=args.sw_batch_size,
        device=resolve_device(args.device, args.gpu, uses_ray(args)),
        amp=args.amp,
    )


def select_cases(store: Any, args: argparse.Namespace) -> list[str]:
    """The cases to audit: ``--cases`` or the split; each must hold the audited label set."""
    cases = store_cases(store, args.cases, args.split)
    for case_id in cases:
        if args.labels not in store.case_label_sets(case_id):
            raise NoisysegInputError(f"case has no label set {args.labels!r}", case=case_id)
    return cases


# ----------------------------------------------------------------------------------- verbs
def run_audit(args: argparse.Namespace) -> int:
    """``noisyseg audit``: the review list, or ``--accept``."""
    # Heavy imports (torch, MLflow, Zarr) only when the verb runs: `noisyseg --help` stays fast.
    from noisyseg.audit import run
    from noisyseg.storage.store import VolumeStore

    check_args(args)
    store_url = absolute_store(args.store)
    store = VolumeStore.open(store_url, "r+" if args.accept else "r")
    if args.labels not in store.label_sets():
        raise NoisysegInputError(f"label set {args.labels!r} not in store", path=store.url)
    if args.accept:
        run.check_new_set(store, args.labels, args.name, overwrite=args.overwrite)
        run.parse_ids(args.accept)
    model = run.load_model(args.model)
    settings = inference_settings(args, model, store)
    use_ray = uses_ray(args)
    if args.accept:
        return _accept(args, model, store_url, settings, use_ray)
    return _review(args, model, store, settings, use_ray)


def _accept(args: argparse.Namespace, model: Any, store_url: str, settings: Any, use_ray: bool):
    from noisyseg.audit import run

    provenance = run.accept_candidates(
        model,
        store_url,
        settings,
        label_set=args.labels,
        new_name=args.name,
        candidate_ids=args.accept,
        threshold=args.threshold,
        overwrite=args.overwrite,
        workers=args.workers,
        use_ray=use_ray,
    )
    accepted = ", ".join(row["candidate_id"] for row in provenance["candidates"])
    print(f"[noisyseg audit] label set {args.name!r} = {args.labels!r} + {accepted}")
    return 0


def _review(args: argparse.Namespace, model: Any, store: Any, settings: Any, use_ray: bool):
    from rich.console import Console

    from noisyseg.audit import run

    console = Console(stderr=True)
    cases = select_cases(store, args)
    began = time.perf_counter()
    found = run.find_candidates(
        model.checkpoint,
        store.url,
        cases,
        settings,
        label_set=args.labels,
        threshold=args.threshold,
        workers=args.workers,
        use_ray=use_ray,
        progress=lambda case_id, done, total: console.print(
            f"[noisyseg audit] {done}/{total} {case_id}", highlight=False
        ),
    )
    ranked = run.review_list(found)
    table = run.candidates_table(ranked, int(store.spatial_dims))
    output = args.output or f"audit-{args.labels}-{time.strftime('%Y%m%d-%H%M%S')}"
    outputs = run.write_outputs(
        store, ranked, table, label_set=args.labels, directory=Path(output).resolve(), top=args.top
    )
    n_candidates = sum(len(c) for c in found.values())
    print_review(table, args.top, title=f"suspected missed lesions in {args.labels!r}")
    print(
        f"[noisyseg audit] {len(cases)} cases, {n_candidates} candidates, {len(ranked)} "
        f"suspected missed ({time.perf_counter() - began:.1f} s); table {outputs.csv}"
    )
    if not args.no_log:
        params = {
            "model": model.source,
            "store": store.url,
            "label_set": args.labels,
            "split": "cases" if args.cases else args.split,
            "threshold": args.threshold,
            "top": args.top,
            "roi_size": list(settings.roi_size),
            "overlap": settings.overlap,
            "n_cases": len(cases),
        }
        metrics = {"n_candidates": n_candidates, "n_suspected": len(ranked)}
        run_id = run.log_audit(model, params, metrics, outputs, experiment=args.experiment)
        print(f"[noisyseg audit] MLflow run {run_id} (model run {model.run_id or 'unknown'})")
    return 0


def print_review(table: Any, top: int, *, title: str) -> None:
    """The first ``max(top, 10)`` rows of the review table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=title)
    for column in (
        "rank",
        "candidate id",
        "world x, y, z (mm)",
        "volume mm³",
        "score",
        "to labels mm",
    ):
        shown.add_column(column, justify="left" if column == "candidate id" else "right")
    for row in table.head(max(top, 10)).itertuples(index=False):
        distance = "none labelled" if math.isinf(row.distance_mm) else f"{row.distance_mm:.1f}"
        shown.add_row(
            str(row.rank),
            row.candidate_id,
            f"{row.world_x_mm:.1f}, {row.world_y_mm:.1f}, {row.world_z_mm:.1f}",
            f"{row.volume_mm3:.1f}",
            f"{row.score:.3f}",
            distance,
        )
    Console(width=120).print(shown)
