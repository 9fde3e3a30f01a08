"""The audit measurement over several seeds, from models a robustness run already trained.

``noisyseg benchmark audit`` trains its own BCE and lopsided models on the censored label sets;
those are the same models (same settings, same store, same seed) as the robustness benchmark's
``censor-random-0.50_bce`` / ``_lopsided`` rows. This script audits the checkpoints such a run
left in its workdir, seed by seed, with ``AuditBenchmark.audit`` (the benchmark's own audit and
measurement), and prints the per-seed table and the mean ± 95 % t-interval over seeds of the
share of censored lesions ≥ 4 mm found in the top 2N, with the paired lopsided − BCE difference.

    .venv/bin/python benchmarks/audit_seeds.py --workdir W --seeds 0 1 2 [--kind brain-mets]

W is the ``--workdir`` of ``noisyseg benchmark robustness --kind K --seeds N`` (run from the
same directory, so the MLflow database is the same ``./mlflow.db`` unless
``MLFLOW_TRACKING_URI`` is set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow

from noisyseg.benchmarking.audit import AuditBenchmark, AuditRow, audit_settings, format_table
from noisyseg.benchmarking.report import format_cell, t_interval
from noisyseg.benchmarking.settings import Variant, censor_name
from noisyseg.distributed.tracking import resolve_tracking_uri


def final_checkpoint(workdir: Path, kind: str, seed: int, key: str) -> Path:
    """The last ``state.pt`` of the robustness run ``<kind>-default-s<seed>-<key>-<stamp>``."""
    runs = sorted((workdir / "ray_results").glob(f"{kind}-default-s{seed}-{key}-*"))
    if not runs:
        raise SystemExit(f"no robustness run {key} of seed {seed} under {workdir}/ray_results")
    checkpoints = sorted(runs[-1].glob("checkpoint_*/state.pt"))
    if not checkpoints:
        raise SystemExit(f"{runs[-1]}: no checkpoint")
    return checkpoints[-1]


def training_run_id(run_name: str) -> str:
    """The MLflow run id of a robustness training run, by its run name."""
    found = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"attributes.run_name = '{run_name}'",
        output_format="list",
    )
    if not found:
        raise SystemExit(f"no MLflow run named {run_name}")
    return found[0].info.run_id


def audit_seed(workdir: Path, kind: str, seed: int) -> list[AuditRow]:
    """Audit the censor-random BCE and lopsided models of one seed."""
    settings = audit_settings("default", kind=kind, seed=seed)
    benchmark = AuditBenchmark(settings, workdir)
    label_set = censor_name("random", settings.censor_rate, seed)
    rows = []
    for loss in ("bce", "lopsided"):
        variant = Variant(label_set, loss)
        checkpoint = final_checkpoint(workdir, kind, seed, variant.key)
        run_id = training_run_id(checkpoint.parent.parent.name)
        numbers, audit_run_id = benchmark.audit(str(checkpoint), run_id, variant)
        rows.append(
            AuditRow(
                key=variant.key,
                label_set=label_set,
                censor_mode="random",
                loss=loss,
                method=variant.method,
                run_id=run_id,
                audit_run_id=audit_run_id,
                train_seconds=0.0,
                **numbers,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--kind", default="brain-mets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, help="write the per-seed numbers as JSON")
    args = parser.parse_args()
    mlflow.set_tracking_uri(resolve_tracking_uri())
    per_seed = {seed: audit_seed(args.workdir.resolve(), args.kind, seed) for seed in args.seeds}
    shares: dict[str, list[float]] = {"bce": [], "lopsided": []}
    for seed, rows in per_seed.items():
        print(f"\nseed {seed}\n{format_table(rows)}")
        for row in rows:
            shares[row.loss].append(row.share_2n_target)
    print("\ncensored lesions >= 4 mm in the top 2N, mean ± 95% t-interval over seeds")
    for loss, values in shares.items():
        print(
            f"  {loss:9s} {format_cell(t_interval(values), 'pct')}  per seed {[f'{v:.0%}' for v in values]}"
        )
    difference = [a - b for a, b in zip(shares["lopsided"], shares["bce"], strict=True)]
    print(f"  lopsided - BCE (paired) {format_cell(t_interval(difference), 'pct')}")
    if args.output:
        document = {str(seed): [row.__dict__ for row in rows] for seed, rows in per_seed.items()}
        args.output.write_text(json.dumps(document, indent=1, default=str))


if __name__ == "__main__":
    main()
