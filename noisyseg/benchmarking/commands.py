"""``noisyseg benchmark robustness`` and ``noisyseg demo``."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from noisyseg.errors import NoisysegInputError

DEFAULT_WORKDIR = "noisyseg-runs"


def _run_robustness(
    kind: str,
    size: str,
    *,
    workdir: str,
    output: str | None,
    seed: int,
    gpu: bool,
    parallel: int | None = None,
) -> dict:
    from noisyseg.benchmarking.robustness import (
        RobustnessBenchmark,
        print_rich_table,
        settings_for,
        ui_command,
        write_outputs,
    )

    settings = settings_for(kind, size, seed=seed, gpu=gpu)  # type: ignore[arg-type]
    if parallel is not None:
        if parallel < 1:
            raise NoisysegInputError(f"--parallel must be >= 1, got {parallel}")
        settings = replace(settings, parallel=parallel)
    benchmark = RobustnessBenchmark(settings, workdir)
    rows = benchmark.run()
    document = write_outputs(benchmark, rows, output)
    print_rich_table(rows, title=f"robustness on {kind} phantoms ({size}), test split vs truth")
    print(f"[benchmark] results JSON: {document['json_path']}")
    print(
        f"[benchmark] MLflow summary run {document['summary_run_id']} "
        f"(experiment {benchmark.experiment}) at {benchmark.tracking_uri}"
    )
    print(f"[benchmark] open the MLflow UI: {ui_command(benchmark.tracking_uri)}")
    return document


def _cmd_benchmark(args: argparse.Namespace) -> int:
    if args.benchmark != "robustness":
        raise NoisysegInputError(f"unknown benchmark {args.benchmark!r}")
    size = "quick" if args.quick else "full" if args.full else "default"
    document = _run_robustness(
        args.kind,
        size,
        workdir=args.workdir,
        output=args.output,
        seed=args.seed,
        gpu=args.gpu,
        parallel=args.parallel,
    )
    finite = all(
        math.isfinite(value)
        for row in document["rows"]
        for value in row["metrics"].values()
        if value is not None and not (isinstance(value, float) and math.isnan(value))
    )
    return 0 if finite else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    """Quick brain-mets comparison: truth vs 50% random censoring, BCE vs lopsided."""
    _run_robustness(
        "brain-mets", "quick", workdir=args.workdir, output=None, seed=args.seed, gpu=False
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "benchmark",
        help="reproduce the papers' robustness claims on phantom data",
        description="Train and evaluate every variant of a robustness comparison; "
        "prints the table, writes JSON, logs a summary MLflow run.",
    )
    bench.add_argument("benchmark", choices=["robustness"], help="which benchmark")
    bench.add_argument("--kind", choices=["brain-mets", "skin"], default="brain-mets")
    sizes = bench.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="CI-sized smoke setting (minutes)")
    sizes.add_argument("--full", action="store_true", help="GPU-sized setting")
    bench.add_argument("--output", help="write the results JSON here")
    bench.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"store, checkpoints and reports (default ./{DEFAULT_WORKDIR})",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--gpu", action="store_true", help="train and evaluate on GPUs (bf16)")
    bench.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="models trained at once (default: 2 on CPU, 1 with --gpu)",
    )
    bench.set_defaults(func=_cmd_benchmark)

    demo = subparsers.add_parser(
        "demo",
        help="the quick brain-metastasis robustness comparison, end to end",
        description="Synthesize phantoms, censor 50%% of lesions, train BCE and lopsided "
        "models on Ray, evaluate on truth, print the table and the MLflow UI command.",
    )
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
