"""Rows of a robustness benchmark read back from MLflow, for a run stopped before its end.

``noisyseg benchmark robustness`` writes its results JSON only when every model is done, but it
logs each model's test figures (``test/<metric>``) on that model's MLflow run as soon as the model
is evaluated. This script turns the finished runs of one benchmark experiment into a results JSON
that ``noisyseg benchmark robustness --from-json`` merges like any other (no size breakdown: that
is not logged)::

    .venv/bin/python benchmarks/robustness_from_mlflow.py sqlite:////path/mlflow.db \\
        --kind brain-mets --size quick --output partial.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict

from mlflow.tracking import MlflowClient

from noisyseg.benchmarking.report import ROW_METRICS, BenchmarkRow
from noisyseg.benchmarking.robustness import censoring
from noisyseg.benchmarking.settings import Variant
from noisyseg.metrics import DEFAULT_MIN_IOU, FROC_FP_RATES, REPORT_CANDIDATE_THRESHOLD


def _variant(params: dict[str, str]) -> Variant:
    fraction = params.get("clean_fraction", "none")
    return Variant(
        label_set=params["labels"],
        loss=params["loss"],
        reweight=params["reweight"],
        clean_fraction=None if fraction == "none" else float(fraction),
        train_subset=params.get("train_subset", "all"),
    )


def rows_from_runs(tracking_uri: str, kind: str, size: str) -> list[BenchmarkRow]:
    """One row per finished, evaluated training run named ``<kind>-<size>-s<seed>-...``."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"noisyseg-robustness-{kind}")
    if experiment is None:
        raise SystemExit(f"no experiment noisyseg-robustness-{kind} at {tracking_uri}")
    pattern = re.compile(rf"^{re.escape(kind)}-{re.escape(size)}-s(\d+)-")
    rows = []
    for run in client.search_runs([experiment.experiment_id]):
        match = pattern.match(run.info.run_name or "")
        metrics = {k.removeprefix("test/"): v for k, v in run.data.metrics.items()}
        if not match or "max_sensitivity" not in metrics:
            continue  # another benchmark's run, the summary run, or not evaluated yet
        variant = _variant(run.data.params)
        mode, rate = censoring(variant.label_set)
        rows.append(
            BenchmarkRow(
                key=variant.key,
                group=variant.group,
                label_set=variant.label_set,
                loss=variant.loss,
                reweight=variant.reweight,
                clean_fraction=variant.clean_fraction,
                train_subset=variant.train_subset,
                method=variant.method,
                censor_mode=mode,
                censor_rate=rate,
                run_id=run.info.run_id,
                train_seconds=(run.info.end_time - run.info.start_time) / 1000.0
                if run.info.end_time
                else math.nan,
                metrics={m: float(metrics[m]) for m in ROW_METRICS if m in metrics},
                seed=int(match.group(1)),
                row_key=variant.row_key,
                operating_point={
                    "threshold": 0.5,
                    "candidate_threshold": REPORT_CANDIDATE_THRESHOLD,
                    "min_iou": DEFAULT_MIN_IOU,
                    "froc_fp_rates": list(FROC_FP_RATES),
                },
            )
        )
    rows.sort(key=lambda r: (r.seed, r.run_id))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tracking_uri")
    parser.add_argument("--kind", required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    rows = rows_from_runs(args.tracking_uri, args.kind, args.size)
    document = {"kind": args.kind, "size": args.size, "rows": [asdict(r) for r in rows]}
    with open(args.output, "w") as handle:
        json.dump(document, handle, indent=2, default=float)
    for row in rows:
        print(f"seed {row.seed} {row.key}: max sensitivity {row.metrics['max_sensitivity']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
