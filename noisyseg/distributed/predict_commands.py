"""``noisyseg predict`` (new scans or store cases) and ``noisyseg register`` (MLflow registry).

``predict --model M --input I --output DIR``: ``M`` is ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/ID/model``, a run id or a checkpoint file; ``I`` a folder of
NIfTI scans (ingest's layouts) or a store (``--split`` / ``--cases``). Every case gets its
probability map, mask, lesion instances and lesion table in its own geometry under
``DIR/<case>/`` and one row in ``DIR/summary.csv`` (:mod:`noisyseg.distributed.scan_prediction`);
cases run in parallel with Ray Data (``--workers N``, ``--gpu``). A bad case is one line on
stderr naming case and file; the others still run; the exit status is then 2.

``predict --store S --name N`` (no ``--output``) writes the maps into the store as
``predictions/N`` (refused when ``N`` exists, unless ``--overwrite``), with the model, run id and
threshold recorded beside them; ``--nifti-dir`` writes them as NIfTI files on the stored grid.

``register --run-id ID --name NAME [--alias champion]``: :mod:`noisyseg.distributed.registry`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from noisyseg.distributed.inference_args import (
    add_parallel_args,
    add_window_args,
    check_parallel_args,
    resolve_device,
    select_cases,
    uses_ray,
)
from noisyseg.errors import NoisysegInputError

_MODEL_HELP = (
    "the model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, an MLflow run id "
    "(MLFLOW_TRACKING_URI, else ./mlflow.db) or a checkpoint file (.pt / Ray checkpoint dir)"
)


def register(subparsers: Any) -> None:
    """Add the ``predict`` and ``register`` verbs."""
    _add_predict(subparsers)
    _add_register(subparsers)


def _add_predict(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment new scans (NIfTI folder) or store cases with a trained/registered model",
        description="Probability map, mask at --threshold, lesion instances and lesion table per "
        "case, in each input's own geometry (--output DIR), in parallel with Ray Data; or "
        "probability maps written into the store (--store S --name N).",
    )
    parser.add_argument("--model", help=_MODEL_HELP)
    parser.add_argument("--input", help="a folder of NIfTI scans (ingest's layouts) or a store")
    parser.add_argument("--output", help="folder for the per-case NIfTI files and tables")
    parser.add_argument(
        "--store",
        help="a store (same as --input STORE; without --output the "
        "maps are written into it as predictions/--name)",
    )
    parser.add_argument("--run-id", help="MLflow run of the model (same as --model RUN_ID)")
    parser.add_argument("--checkpoint", help="checkpoint file (same as --model FILE)")
    parser.add_argument("--split", default="test", help="store split to predict (default test)")
    parser.add_argument("--cases", nargs="+", metavar="ID", help="store cases to predict")
    parser.add_argument("--name", default="prediction", help="name of maps in the store")
    parser.add_argument("--nifti-dir", help="store input: probability maps as NIfTI here")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs")
    parser.add_argument(
        "--threshold", type=float, default=None, help="mask threshold (default: the model's, 0.5)"
    )
    parser.add_argument("--table-format", choices=("csv", "parquet"), default="csv")
    add_parallel_args(parser)
    add_window_args(parser, sw_batch_size=None)
    parser.set_defaults(func=run_predict)


def _add_register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register a training run's model in the MLflow Model Registry",
        description="Log the run's final checkpoint as an mlflow.pyfunc model that carries its "
        "preprocessing, register it as a new version of NAME and point --alias at it; then "
        "mlflow.pyfunc.load_model('models:/NAME@ALIAS').predict(volume) segments a raw "
        "(C, Z, Y, X) volume and `noisyseg predict --model models:/NAME@ALIAS` new scans.",
    )
    parser.add_argument("--run-id", required=True, help="the MLflow training run")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument(
        "--alias", default=None, help="alias to point at the version, e.g. champion"
    )
    parser.set_defaults(func=run_register)


# ---------------------------------------------------------------------------------- register
def _quiet_mlflow() -> None:
    """No MLflow download progress bars on the terminal (issue 13: quiet by default)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run_register(args: argparse.Namespace) -> int:
    from noisyseg.distributed.registry import register_run

    _quiet_mlflow()

    registration = register_run(args.run_id, args.name, alias=args.alias)
    print(
        f"[noisyseg register] run {registration.run_id} -> {args.name} version "
        f"{registration.version}"
        + (f" (alias {args.alias})" if args.alias else "")
        + f"; load it with mlflow.pyfunc.load_model({registration.uri!r})"
    )
    return 0


# ---------------------------------------------------------------------------------- predict
def _model_reference(args: argparse.Namespace) -> str:
    given = [v for v in (args.model, args.checkpoint, args.run_id) if v]
    if not given:
        raise NoisysegInputError("give --model (or give --run-id or --checkpoint)")
    if len(given) > 1 and not (args.checkpoint and args.run_id and not args.model):
        raise NoisysegInputError("give one of --model, --run-id, --checkpoint")
    return str(args.checkpoint or args.model or args.run_id)


def _input_kind(args: argparse.Namespace) -> tuple[str, str]:
    """``("store" | "folder", source)``; a store is a folder with a root ``zarr.json`` or a URL."""
    if args.store and args.input:
        raise NoisysegInputError("give --input or --store, not both")
    if args.store:
        return "store", str(args.store)
    if not args.input:
        raise NoisysegInputError("give --input (a folder of NIfTI scans or a store)")
    source = str(args.input)
    if "://" in source or (Path(source) / "zarr.json").is_file():
        return "store", source
    if not Path(source).exists():
        raise NoisysegInputError("input does not exist", path=source)
    return "folder", str(Path(source).resolve())


def _check_ranges(args: argparse.Namespace) -> None:
    check_parallel_args(args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise NoisysegInputError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise NoisysegInputError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise NoisysegInputError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")


def _preprocessing(args: argparse.Namespace, resolved: Any) -> Any:
    """The model's preprocessing with the window flags applied (window checked against the
    network's divisor)."""
    from noisyseg.distributed.checkpoints import model_from_checkpoint
    from noisyseg.distributed.model_loading import check_roi, roi_from_config

    _, spec = model_from_checkpoint(resolved.checkpoint, source=resolved.source)
    prep = resolved.preprocessing
    changes: dict[str, Any] = {}
    if args.roi_size:
        changes["roi_size"] = roi_from_config(
            {"patch_size": list(args.roi_size)}, spec.spatial_dims
        )
    changes["roi_size"] = check_roi(changes.get("roi_size", prep.roi_size), spec)
    if args.overlap is not None:
        changes["overlap"] = args.overlap
    if args.sw_batch_size is not None:
        changes["sw_batch_size"] = args.sw_batch_size
    if args.threshold is not None:
        changes["threshold"] = args.threshold
    return dataclasses.replace(prep, **changes)


def run_predict(args: argparse.Namespace) -> int:
    from noisyseg.storage.validate import check_label_set_name

    _check_ranges(args)
    check_label_set_name(args.name)
    _quiet_mlflow()
    kind, source = _input_kind(args)
    reference = _model_reference(args)
    if kind == "store" and not args.output:
        return _predict_into_store(args, source, reference)
    if not args.output:
        raise NoisysegInputError("give --output DIR for the predictions of a folder of scans")
    return _predict_to_files(args, kind, source, reference)


def _check_store_channels(store: Any, in_channels: int) -> None:
    if len(store.channel_names) != in_channels:
        raise NoisysegInputError(
            f"model expects {in_channels} image channels, store has {len(store.channel_names)}",
            path=store.url,
        )


def _output_dir(path: str, overwrite: bool) -> Path:
    out = Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise NoisysegInputError("--output is not a folder", path=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NoisysegInputError(
            "output folder is not empty (pass --overwrite to replace earlier predictions)",
            path=str(out),
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _predict_to_files(args: argparse.Namespace, kind: str, source: str, reference: str) -> int:
    from rich.console import Console

    from noisyseg.distributed.registry import resolve_model
    from noisyseg.distributed.scan_inputs import ScanCase, discover_scans
    from noisyseg.distributed.scan_prediction import predict_scans
    from noisyseg.storage.ingest import progress_bar
    from noisyseg.storage.store import VolumeStore

    if kind == "store":
        store = VolumeStore.open(source)
        cases_ids = select_cases(store, args.cases, args.split)
    resolved = resolve_model(reference)
    prep = _preprocessing(args, resolved)
    if kind == "store":
        _check_store_channels(store, prep.in_channels)
        cases = [ScanCase(c, [], store_url=store.url) for c in cases_ids]
    else:
        cases = discover_scans(source, in_channels=prep.in_channels)
    use_ray = uses_ray(args)
    device = resolve_device(args.device, args.gpu, use_ray)
    out = _output_dir(args.output, args.overwrite)
    start = time.perf_counter()
    with progress_bar(
        f"predict ({args.workers} on Ray)" if use_ray else "predict", enabled=True
    ) as progress:
        task = progress.add_task("", total=len(cases))
        summary = predict_scans(
            cases,
            resolved.checkpoint,
            prep,
            str(out),
            threshold=prep.threshold,
            table_format=args.table_format,
            device=device,
            amp=args.amp,
            workers=args.workers,
            gpu=args.gpu,
            use_ray=use_ray,
            progress=lambda row, done, total: progress.update(
                task, completed=done, description=row["case_id"]
            ),
        )
    record = {
        "model": reference,
        "run_id": resolved.run_id,
        "threshold": prep.threshold,
        "input": source,
        "preprocessing": prep.to_dict(),
        "cases": int(len(summary)),
        "failed": int((summary["status"] != "ok").sum()),
        "seconds": time.perf_counter() - start,
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    _print_summary(summary, out, args.table_format)
    failed = summary[summary["status"] != "ok"]
    err = Console(stderr=True, soft_wrap=True)
    for line in failed["error"]:
        err.print(f"noisyseg predict: error: {line}", markup=False, highlight=False)
    return 2 if len(failed) else 0


def _print_summary(summary: Any, out: Path, table_format: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"noisyseg predict: {len(summary)} cases -> {out}")
    for column in ("case", "status", "lesions", "volume mm³", "max p", "seconds"):
        table.add_column(column, justify="left" if column in ("case", "status") else "right")
    for row in summary.to_dict("records"):
        table.add_row(
            row["case_id"],
            row["status"],
            str(row["n_lesions"]),
            f"{row['lesion_volume_mm3']:.1f}",
            "-" if row["status"] != "ok" else f"{row['max_probability']:.3f}",
            f"{row['seconds']:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(f"summary: {out / f'summary.{table_format}'}")


def _predict_into_store(args: argparse.Namespace, source: str, reference: str) -> int:
    """Maps written into the store (``predictions/--name``) or as NIfTI files (``--nifti-dir``)."""
    from rich.console import Console
    from rich.table import Table

    from noisyseg.distributed.inference import InferenceSettings, predict_cases
    from noisyseg.distributed.registry import resolve_model
    from noisyseg.storage.ingest import progress_bar
    from noisyseg.storage.store import VolumeStore

    store = VolumeStore.open(source, mode="r" if args.nifti_dir else "r+")
    cases = select_cases(store, args.cases, args.split)
    resolved = resolve_model(reference)
    prep = _preprocessing(args, resolved)
    _check_store_channels(store, prep.in_channels)
    if args.nifti_dir:
        nifti_dir = Path(args.nifti_dir)
        if nifti_dir.exists() and not nifti_dir.is_dir():
            raise NoisysegInputError("--nifti-dir is not a directory", path=str(nifti_dir))
        nifti_dir.mkdir(parents=True, exist_ok=True)
    elif not args.overwrite:
        taken = [c for c in cases if args.name in store.prediction_names(c)]
        if taken:
            raise NoisysegInputError(
                f"prediction {args.name!r} exists for {len(taken)} case(s) (first {taken[0]}); "
                "choose another --name or pass --overwrite",
                path=store.url,
            )
    use_ray = uses_ray(args)
    settings = InferenceSettings(
        roi_size=prep.roi_size,
        overlap=prep.overlap,
        sw_batch_size=prep.sw_batch_size,
        device=resolve_device(args.device, args.gpu, use_ray),
        amp=args.amp,
    )
    metadata = {
        "model": reference,
        "run_id": resolved.run_id,
        "threshold": prep.threshold,
        "step": int(resolved.checkpoint.get("step", 0)),
    }
    with progress_bar("predict", enabled=True) as progress:
        task = progress.add_task("", total=len(cases))
        records = predict_cases(
            resolved.checkpoint,
            store.url,
            cases,
            settings,
            name=args.name,
            nifti_dir=str(args.nifti_dir) if args.nifti_dir else None,
            workers=args.workers,
            use_ray=use_ray,
            overwrite=args.overwrite,
            metadata=metadata,
            progress=lambda record, done, total: progress.update(
                task, completed=done, description=record["case_id"]
            ),
        )
    table = Table(
        title=f"noisyseg predict: {len(records)} cases "
        f"({'Ray, ' + str(args.workers) + ' workers' if use_ray else 'in-process'})"
    )
    for column in ("case", "shape", "written to", "seconds"):
        table.add_column(column)
    for record in records:
        table.add_row(
            record["case_id"],
            "x".join(map(str, record["shape"])),
            record["output"],
            f"{record['seconds']:.2f}",
        )
    Console().print(table)
    return 0
