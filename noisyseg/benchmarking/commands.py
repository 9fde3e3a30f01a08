"""``noisyseg benchmark robustness`` and ``noisyseg demo``."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

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


def _merge_results(paths: list[str], output: str | None) -> dict:
    """Re-summarise the rows of several results JSONs (e.g. one run per seed) in one table."""
    # The report imports torch (via the settings) and scipy: loaded only when a benchmark runs.
    from noisyseg.benchmarking.report import (
        format_table,
        operating_point_note,
        print_rich_table,
        relative_to_baseline,
        rows_from_documents,
        summarize,
    )

    documents = []
    for path in paths:
        try:
            documents.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise NoisysegInputError(
                f"cannot read results JSON ({error.__class__.__name__})", path=path
            ) from None
    try:
        rows, dropped = rows_from_documents(documents)
        relative_to_baseline(rows, "truth_bce")
    except (ValueError, KeyError, TypeError) as error:
        raise NoisysegInputError(f"--from-json: {error}") from None
    for row in dropped:
        print(
            f"[benchmark] seed {row.seed} {row.key}: kept the first file's copy, not run {row.run_id}"
        )
    seeds = sorted({row.seed for row in rows})
    evaluation = next((r.operating_point for r in rows if r.operating_point), {})
    note = operating_point_note(evaluation, seeds)
    merged = {
        **{k: documents[0][k] for k in ("kind", "size", "settings") if k in documents[0]},
        "seeds": seeds,
        "sources": [str(Path(p).resolve()) for p in paths],
        "evaluation": evaluation,
        "note": note,
        "rows": [asdict(r) for r in rows],
        "summary": [s.as_dict() for s in summarize(rows)],
        "table": format_table(rows),
    }
    if output:
        Path(output).write_text(json.dumps(merged, indent=2, default=float))
    title = f"robustness on {merged.get('kind')} phantoms ({merged.get('size')}), merged"
    print_rich_table(rows, title=title, note=note)
    print(merged["table"] + "\n\n" + note)
    return merged


def _size(args: argparse.Namespace) -> str:
    """The benchmark size the flags name: ``quick``, ``full`` or ``default``."""
    return "quick" if args.quick else "full" if args.full else "default"


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments both benchmarks take from the flags (folders, seeds, GPU, ...)."""
    return {
        "workdir": args.workdir,
        "output": args.output,
        "seed": args.seed,
        "gpu": args.gpu,
        "parallel": args.parallel,
        "seeds": args.seeds,
        "only": args.only,
    }


def _cmd_benchmark(args: argparse.Namespace) -> int:
    if args.benchmark == "audit":
        # Ray, MLflow and torch load only when the benchmark runs (see _run_robustness).
        from noisyseg.benchmarking.audit import run_audit_benchmark

        return run_audit_benchmark(args.kind, _size(args), **_run_options(args))
    if args.benchmark != "robustness":
        raise NoisysegInputError(f"unknown benchmark {args.benchmark!r}")
    if args.from_json:
        _merge_results(args.from_json, args.output)
        return 0
    document = _run_robustness(args.kind, _size(args), **_run_options(args))
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
    bench.add_argument(
        "--from-json",
        action="append",
        metavar="RESULTS.json",
        help="train nothing: merge these results files (e.g. one run per seed) into one table "
        "with intervals (repeatable; --output writes the merged JSON)",
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
