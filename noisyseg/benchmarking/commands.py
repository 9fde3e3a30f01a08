"""``noisyseg benchmark robustness`` and ``noisyseg demo``."""

from __future__ import annotations

import argparse
import math
import time
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
    seeds: int = 1,
    only: list[str] | None = None,
) -> dict:
    # The benchmark machinery imports Ray, MLflow and torch: loaded only when a benchmark runs,
    # so `noisyseg --help` and the other verbs stay fast.
    from noisyseg.benchmarking.robustness import (
        RobustnessBenchmark,
        print_rich_table,
        settings_for,
        ui_command,
        write_outputs,
    )

    if seeds < 1:
        raise NoisysegInputError(f"--seeds must be >= 1, got {seeds}")
    if seed < 0:
        raise NoisysegInputError(f"--seed must be >= 0, got {seed}")
    settings = settings_for(kind, size, seed=seed, gpu=gpu)  # type: ignore[arg-type]
    if parallel is not None:
        if parallel < 1:
            raise NoisysegInputError(f"--parallel must be >= 1, got {parallel}")
        settings = replace(settings, parallel=parallel)
    try:
        benchmark = RobustnessBenchmark(
            settings, workdir, seeds=list(range(seed, seed + seeds)), only=only
        )
    except ValueError as error:  # an --only pattern that matches no row of the plan
        raise NoisysegInputError(f"--only: {error}") from None
    began = time.perf_counter()
    rows = benchmark.run()
    document = write_outputs(benchmark, rows, output)
    print_rich_table(
        rows,
        title=f"robustness on {kind} phantoms ({size}), test split vs truth",
        note=document["note"],
    )
    print(f"[benchmark] wall time {time.perf_counter() - began:.0f} s")
    print(f"[benchmark] results JSON: {document['json_path']}")
    print(
        f"[benchmark] MLflow summary run {document['summary_run_id']} "
        f"(experiment {benchmark.experiment}) at {benchmark.tracking_uri}"
    )
    print(f"[benchmark] open the MLflow UI: {ui_command(benchmark.tracking_uri)}")
    return document


def _cmd_benchmark(args: argparse.Namespace) -> int:
    if args.benchmark == "audit":
        # Ray, MLflow and torch load only when the benchmark runs (see _run_robustness).
        from noisyseg.benchmarking.audit import run_audit_benchmark

        return run_audit_benchmark(
            args.kind,
            "quick" if args.quick else "full" if args.full else "default",
            workdir=args.workdir,
            output=args.output,
            seed=args.seed,
            gpu=args.gpu,
            parallel=args.parallel,
            seeds=args.seeds,
            only=args.only,
        )
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
        seeds=args.seeds,
        only=args.only,
    )
    finite = all(
        math.isfinite(value)
        for row in document["rows"]
        for value in row["metrics"].values()
        if value is not None and not (isinstance(value, float) and math.isnan(value))
    )
    return 0 if finite else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    """Quick brain-mets comparison: truth vs 50% random censoring; BCE, lopsided and meta."""
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
    bench.add_argument(
        "benchmark",
        choices=["robustness", "audit"],
        help="robustness: the papers' claims; audit: censored lesions found by noisyseg audit",
    )
    bench.add_argument(
        "--kind",
        choices=["brain-mets", "brain-mets-1mm", "skin"],
        default="brain-mets",
        help="brain-mets: 3D phantoms at 2 mm; brain-mets-1mm: 1 mm, cropped field of view "
        "(size-based censoring rows); skin: 2D RGB phantoms",
    )
    sizes = bench.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="CI-sized smoke setting (minutes)")
    sizes.add_argument("--full", action="store_true", help="GPU-sized setting")
    bench.add_argument("--output", help="write the results JSON here")
    bench.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"store, checkpoints and reports (default ./{DEFAULT_WORKDIR})",
    )
    bench.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    bench.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run seeds SEED..SEED+N-1 (own phantoms, censoring and clean draw each); the table "
        "shows mean ± 95%% t-interval over seeds",
    )
    bench.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="train only the rows whose seedless key matches this glob (repeatable), e.g. "
        "'censor-random-0.50_*'; the truth BCE baseline always runs",
    )
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
        description="Synthesize phantoms, censor 50%% of lesions, train BCE, lopsided and "
        "meta-reweighting models on Ray, evaluate on truth, print the table and the MLflow UI "
        "command.",
    )
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
