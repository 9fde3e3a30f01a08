"""``noisyseg evaluate`` (``predict`` and ``register``: :mod:`.predict_commands`).

``evaluate``: sliding-window inference of a trained model over a split of the store, lesion
metrics against a label set, a table in the terminal, and (with ``--run-id``) metrics
``eval_<split>_*``, ``evaluation/<split>/metrics.json`` and ``evaluation/<split>/pr_curve.png``
logged to the MLflow run.

"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from noisyseg.distributed.inference_args import (
    add_parallel_args,
    add_window_args,
    check_parallel_args,
    resolve_device,
    select_cases,
    uses_ray,
)
from noisyseg.errors import NoisysegInputError
from noisyseg.metrics import REPORT_CANDIDATE_THRESHOLD

if TYPE_CHECKING:  # pragma: no cover
    from noisyseg.distributed.evaluation import EvaluationResult
    from noisyseg.distributed.inference import InferenceSettings


def _add_model_args(parser: argparse.ArgumentParser, *, run_required: bool = False) -> None:
    parser.add_argument("--store", required=True, help="the volume store (path or fsspec URL)")
    parser.add_argument(
        "--run-id",
        help="MLflow run of the trained model (MLFLOW_TRACKING_URI, else ./mlflow.db); "
        "its artifact checkpoint/final.pt is loaded unless --checkpoint is given",
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint file (.pt) or Ray checkpoint directory (state.pt)"
    )
    add_window_args(parser)


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` verb."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="lesion metrics of a trained model on a split of the store",
        description="Sliding-window inference over a split, lesion metrics (maximum sensitivity, "
        "sensitivity at 80%% precision, AP, FP per case, Dice, sensitivity by lesion size), "
        "printed and logged to the MLflow run.",
    )
    _add_model_args(evaluate)
    evaluate.add_argument("--split", default="test", help="split to evaluate (default: test)")
    evaluate.add_argument("--cases", nargs="+", metavar="ID", help="evaluate these cases instead")
    evaluate.add_argument("--label-set", default="truth", help="reference labels (default truth)")
    evaluate.add_argument("--threshold", type=float, default=0.5, help="operating threshold")
    evaluate.add_argument(
        "--candidate-threshold",
        type=float,
        default=REPORT_CANDIDATE_THRESHOLD,
        help="lowest probability of lesion candidates for the PR/FROC curves, AP and maximum "
        "sensitivity (default 0.05)",
    )
    evaluate.add_argument("--output", help="write metrics and per-case results to this JSON file")
    evaluate.add_argument(
        "--no-log",
        action="store_true",
        help="do not log to the MLflow run even when --run-id is given",
    )
    add_parallel_args(evaluate)
    evaluate.set_defaults(func=run_evaluate)


# ---------------------------------------------------------------------------------- shared
def _load(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """Checkpoint dict, model and spec from --checkpoint or --run-id (validated)."""
    from noisyseg.distributed.checkpoints import model_from_checkpoint
    from noisyseg.distributed.model_loading import download_run_checkpoint, load_checkpoint

    if not args.run_id and not args.checkpoint:
        raise NoisysegInputError("give --run-id or --checkpoint")
    if args.checkpoint:
        if args.run_id:  # the run is still where results go: it must exist
            _check_run(args.run_id)
        checkpoint = load_checkpoint(args.checkpoint)
        source = args.checkpoint
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="noisyseg-ckpt-") as tmp:
            checkpoint = load_checkpoint(download_run_checkpoint(args.run_id, tmp))
        source = f"run {args.run_id}"
    model, spec = model_from_checkpoint(checkpoint, source=source)
    return checkpoint, model, spec


def _check_run(run_id: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from noisyseg.distributed.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri()
    try:
        mlflow.MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise NoisysegInputError(f"no MLflow run {run_id!r}", path=uri) from None


def _settings(args: argparse.Namespace, checkpoint: dict[str, Any], spec: Any):
    from noisyseg.distributed.inference import InferenceSettings
    from noisyseg.distributed.model_loading import check_roi, roi_from_config

    config = dict(checkpoint.get("config") or {})
    if args.roi_size:
        roi = roi_from_config({"patch_size": list(args.roi_size)}, spec.spatial_dims)
    else:
        roi = roi_from_config(config, spec.spatial_dims)
    roi = check_roi(roi, spec)
    overlap = args.overlap if args.overlap is not None else float(config.get("val_overlap", 0.25))
    if not 0.0 <= overlap < 1.0:
        raise NoisysegInputError(f"--overlap must be in [0, 1), got {overlap}")
    if args.sw_batch_size < 1:
        raise NoisysegInputError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    return InferenceSettings(
        roi_size=roi,
        overlap=overlap,
        sw_batch_size=args.sw_batch_size,
        device=resolve_device(args.device, args.gpu, uses_ray(args)),
        amp=args.amp,
    )


def _progress(console: Any, total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{what}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    )


def jsonable(value: Any) -> Any:
    """Plain JSON data: numpy arrays → lists, numpy scalars → Python, NaN/inf → ``None``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


# ---------------------------------------------------------------------------------- evaluate
_TABLE_ROWS = [
    ("max_sensitivity", "maximum lesion sensitivity"),
    ("sensitivity", "lesion sensitivity at t"),
    ("precision", "lesion precision at t"),
    ("sensitivity_at_80_precision", "sensitivity at 80% precision"),
    ("ap", "average precision (lesions)"),
    ("fp_per_case", "false positives per case at t"),
    ("froc_mean", "FROC mean (CPM)"),
    ("dice", "voxel Dice (mean over cases)"),
    ("jaccard", "voxel Jaccard (mean over cases)"),
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def print_metrics(console: Any, metrics: dict[str, Any], *, title: str) -> None:
    """Rich tables of the headline metrics and the size breakdown."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in _TABLE_ROWS:
        if key in metrics:
            table.add_row(label, _fmt(metrics[key]))
    table.add_row(
        "cases / truth lesions / candidates",
        f"{metrics.get('n_cases')} / {metrics.get('n_lesions')} / {metrics.get('n_candidates')}",
    )
    console.print(table)
    by_size = metrics.get("sensitivity_by_size") or []
    if by_size:
        sizes = Table(title="sensitivity by lesion size (mm³)")
        for column in ("size bin", "lesions", "detected", "sensitivity"):
            sizes.add_column(column, justify="right" if column != "size bin" else "left")
        for row in by_size:
            sizes.add_row(
                str(row["bin"]), str(row["count"]), str(row["detected"]), _fmt(row["sensitivity"])
            )
        console.print(sizes)


def eval_metric_dict(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """The finite scalars to log to MLflow, named ``eval_<split>_<metric>``; the size breakdown
    becomes ``eval_<split>_sensitivity_by_size.bin<i>`` (bin edges in the JSON artifact)."""
    from noisyseg.distributed.tracking import scalar_metrics

    prefix = f"eval_{split}_"
    scalars = {k: v for k, v in metrics.items() if k not in ("froc", "pr_curve")}
    out = scalar_metrics(scalars, prefix)
    for index, row in enumerate(metrics.get("sensitivity_by_size") or []):
        value = row.get("sensitivity")
        if value is not None and math.isfinite(float(value)):
            out[f"{prefix}sensitivity_by_size.bin{index}"] = float(value)
    for rate, value in metrics.get("froc") or []:
        if value is not None and math.isfinite(float(value)):
            out[f"{prefix}froc.fp{rate:g}"] = float(value)
    return out


def log_evaluation(run_id: str, split: str, report: dict[str, Any], *, step: int = 0) -> str:
    """Log metrics, the JSON report and the PR-curve PNG to an existing MLflow run."""
    import matplotlib.pyplot as plt
    import mlflow

    from noisyseg.distributed.tracking import pr_curve_figure, resolve_tracking_uri

    uri = resolve_tracking_uri()
    mlflow.set_tracking_uri(uri)
    metrics = report["metrics"]
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(eval_metric_dict(metrics, split), step=step)
        mlflow.log_dict(jsonable(report), f"evaluation/{split}/metrics.json")
        figure = pr_curve_figure(metrics.get("pr_curve"), title=f"lesion PR curve ({split})")
        mlflow.log_figure(figure, f"evaluation/{split}/pr_curve.png")
        plt.close(figure)
    return uri


def run_evaluate(args: argparse.Namespace) -> int:
    """``noisyseg evaluate``: predict the cases, score them, print, write and log the report."""
    from rich.console import Console

    from noisyseg.distributed.prediction_io import check_channels
    from noisyseg.storage.store import VolumeStore

    console = Console(stderr=True)
    for name in ("threshold", "candidate_threshold"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise NoisysegInputError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    store = VolumeStore.open(args.store, mode="r")
    cases = select_cases(store, args.cases, args.split)
    for case_id in cases:  # fail on a missing label set before any inference
        store.labels(case_id, name=args.label_set)
    checkpoint, model, spec = _load(args)
    check_channels(store, spec, store_path=store.url)
    settings = _settings(args, checkpoint, spec)
    if args.output and not Path(args.output).parent.exists():
        raise NoisysegInputError("output directory does not exist", path=args.output)
    check_parallel_args(args)
    use_ray = uses_ray(args)
    model.to(settings.device)
    maps = _ray_maps(console, checkpoint, store, cases, settings, args.workers) if use_ray else None
    result = _evaluate(console, model, store, cases, settings, maps, args)
    report = {
        "store": store.url,
        "split": None if args.cases else args.split,
        "cases": cases,
        "label_set": args.label_set,
        "run_id": args.run_id,
        "checkpoint": args.checkpoint,
        "step": int(checkpoint.get("step", 0)),
        "roi_size": list(settings.roi_size),
        "overlap": settings.overlap,
        "metrics": result.metrics,
        "per_case": result.per_case,
    }
    _publish(args, report, result.metrics, cases)
    return 0


def _ray_maps(
    console: Any,
    checkpoint: dict[str, Any],
    store: Any,
    cases: list[str],
    settings: InferenceSettings,
    workers: int,
) -> dict[str, np.ndarray]:
    """Probability maps ``case_id -> (*S)`` float32 predicted on ``workers`` Ray workers."""
    from noisyseg.distributed.inference import map_cases

    maps: dict[str, np.ndarray] = {}
    with _progress(console, len(cases), f"predict on Ray ({workers})") as progress:
        task = progress.add_task("", total=len(cases))
        for case_id, probability in map_cases(
            checkpoint,
            store.url,
            cases,
            settings,
            method="probability",
            workers=workers,
            use_ray=True,
            write=False,
        ):
            maps[case_id] = probability
            progress.update(task, completed=len(maps), description=case_id)
    return maps


def _evaluate(
    console: Any,
    model: Any,
    store: Any,
    cases: list[str],
    settings: InferenceSettings,
    maps: dict[str, np.ndarray] | None,
    args: argparse.Namespace,
) -> EvaluationResult:
    """:func:`evaluate_cases` with a progress bar (``maps``: precomputed, else predicted here)."""
    from noisyseg.distributed.evaluation import evaluate_cases

    with _progress(console, len(cases), "evaluate") as progress:
        task = progress.add_task("", total=len(cases))
        return evaluate_cases(
            model,
            store,
            cases,
            label_set=args.label_set,
            probabilities=maps,
            threshold=args.threshold,
            candidate_threshold=args.candidate_threshold,
            progress=lambda case_id, done, total: progress.update(
                task, completed=done, description=case_id
            ),
            **settings.kwargs(),
        )


def _publish(
    args: argparse.Namespace, report: dict[str, Any], metrics: dict[str, Any], cases: list[str]
) -> None:
    """Print the metrics table; write the report to ``--output``; log it to ``--run-id``."""
    from rich.console import Console

    out = Console()
    print_metrics(
        out,
        metrics,
        title=f"noisyseg evaluate: {len(cases)} cases "
        f"({'given' if args.cases else args.split}), label set {args.label_set}",
    )
    if args.output:
        Path(args.output).write_text(json.dumps(jsonable(report), indent=2))
        out.print(f"metrics written to {args.output}")
    if args.run_id and not args.no_log:
        split = "cases" if args.cases else args.split
        uri = log_evaluation(args.run_id, split, report, step=report["step"])
        out.print(f"logged eval_{split}_* to MLflow run {args.run_id} ({uri})")
