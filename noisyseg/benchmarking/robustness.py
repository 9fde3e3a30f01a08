"""Reproduce the two papers' robustness claims on phantom data, over several seeds (issues 6, 12).

``noisyseg benchmark robustness --kind brain-mets|brain-mets-1mm|skin [--quick|--full] --seeds N``:

* **brain-mets** (Yi et al., MIDL 2020): one 3D U-Net per row trained on truth labels, on labels
  with 50% of the lesions censored at random and (at 1 mm, ``brain-mets-1mm``) with the smallest
  50% censored — BCE, the lopsided bootstrap loss, meta pixel reweighting (BCE on the noisy voxels,
  clean-BCE weights) at several clean-subset sizes, lopsided + meta, and the clean-only baseline —
  every model evaluated on held-out *truth*. The headline is the maximum lesion sensitivity
  relative to the truth-trained BCE baseline.
* **skin** (Mirikharaji et al., 2019): 2D RGB phantoms whose training labels are coarse polygon
  outlines; noisy-only, clean-only, clean + noisy, lopsided, meta at several clean sizes and
  lopsided + meta, scored by Dice and Jaccard.

Seed ``s`` gives its own phantoms (``synth --seed s``), censoring draw (label sets ``...-s<s>``)
and clean-subset draw (``TrainConfig.seed = s``); every row is trained once per seed and the table
shows mean ± 95% t-interval over seeds (:mod:`noisyseg.benchmarking.report`). Which rows run for
which setting: :mod:`noisyseg.benchmarking.settings`.

Every model is trained through :func:`noisyseg.distributed.trainer.run_training` (Ray Train,
tracked in MLflow) and evaluated with :func:`noisyseg.distributed.evaluation.evaluate_cases`; the
summary (table, JSON, plots) is logged to its own MLflow run.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlflow
import ray
from mlflow.tracking import MlflowClient

from noisyseg.benchmarking.plots import (
    plot_clean_sizes,
    plot_rate_sweep,
    plot_sensitivity_by_size,
)
from noisyseg.benchmarking.report import (
    ROW_METRICS,
    BenchmarkRow,
    format_table,
    operating_point_note,
    print_rich_table,
    relative_to_baseline,
    summarize,
)
from noisyseg.benchmarking.settings import (
    BenchmarkSettings,
    Variant,
    baseline_variant,
    brain_variants,
    censor_name,
    plan_variants,
    settings_for,
    skin_mixed_name,
    skin_noisy_name,
    skin_variants,
)
from noisyseg.distributed.config import make_config
from noisyseg.distributed.evaluation import evaluate_cases
from noisyseg.distributed.model_loading import load_trained_model
from noisyseg.distributed.ray_utils import ensure_ray
from noisyseg.distributed.tracking import resolve_tracking_uri
from noisyseg.distributed.trainer import run_training
from noisyseg.metrics import REPORT_CANDIDATE_THRESHOLD
from noisyseg.storage.clean_subset import DEFAULT_CLEAN_MIN_CASES, select_clean_cases
from noisyseg.storage.corrupt import corrupt_store
from noisyseg.storage.phantoms import synth_store
from noisyseg.storage.store import VolumeStore

__all__ = [  # the planning and reporting names keep their old import path (tests, H4's audit)
    "ROW_METRICS",
    "BenchmarkRow",
    "BenchmarkSettings",
    "RobustnessBenchmark",
    "Variant",
    "brain_variants",
    "censor_name",
    "format_table",
    "plan_variants",
    "print_rich_table",
    "relative_to_baseline",
    "settings_for",
    "skin_mixed_name",
    "skin_noisy_name",
    "skin_variants",
    "ui_command",
    "write_outputs",
]


def censoring(label_set: str) -> tuple[str | None, float | None]:
    """``(mode, rate)`` of a label set: ``(None, 0.0)`` for truth, ``("random", 0.5)`` for
    ``censor-random-0.50-s0``, ``(mode, None)`` for another derived set (``polygon-...``)."""
    if label_set == "truth":
        return None, 0.0
    parts = label_set.split("-")
    if parts[0] == "censor" and len(parts) >= 3:
        return parts[1], float(parts[2])
    return parts[0], None


def fp_at_max_sensitivity(metrics: dict[str, Any]) -> float:
    """FP per case with every candidate accepted (the maximum-sensitivity point)."""
    if "fp_per_case_at_max_sensitivity" in metrics:
        return float(metrics["fp_per_case_at_max_sensitivity"])
    fp = metrics["pr_curve"]["fp_per_case"]
    return float(fp[-1]) if len(fp) else 0.0


def start_ray(cpus_needed: float, attempts: int = 3) -> bool:
    """:func:`~noisyseg.distributed.ray_utils.ensure_ray`, tried ``attempts`` times.

    On a loaded machine Ray can miss its fixed 30 s start-up window ("The current node timed out
    during startup"), also when joining ``RAY_ADDRESS``; a later try usually makes it (seen at
    load average 30-50 on 2 cores). Tries after the first leave the dashboard out (about ten
    fewer processes to start). Returns whether this call connected.
    """
    for attempt in range(1, attempts + 1):
        try:
            return ensure_ray(cpus_needed, dashboard=attempt == 1)
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for start-up failures
            if attempt == attempts:
                raise
            ray.shutdown()
            time.sleep(5.0)
    return False


# ----------------------------------------------------------------------------------- the runner
class RobustnessBenchmark:
    """Builds the stores, trains every (seed, variant), evaluates on held-out truth, reports.

    Args:
        settings: sizes (:func:`settings_for`); ``settings.seed`` is the first seed.
        workdir: where the stores, Ray checkpoints and (by default) the MLflow database live.
        seeds: seeds to run (default: ``[settings.seed]``).
        only: glob patterns of seedless row keys to train (default: the whole plan); the
            baseline always runs.
        tracking_uri: MLflow URI; default ``MLFLOW_TRACKING_URI``, else the embedded
            ``sqlite:///<cwd>/mlflow.db`` that ``noisyseg train`` uses too.
        experiment: MLflow experiment of the training runs and the summary run.
        print_fn: terminal output.
    """

    def __init__(
        self,
        settings: BenchmarkSettings,
        workdir: str | Path,
        *,
        seeds: list[int] | None = None,
        only: list[str] | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.seeds = list(seeds) if seeds else [settings.seed]
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {self.seeds}")
        self.only = list(only) if only else None
        plan_variants(settings, self.only)  # a pattern matching nothing fails before any work
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store_url = self.store_url_for(self.seeds[0])
        self.tracking_uri = tracking_uri or resolve_tracking_uri()
        self.experiment = experiment or f"noisyseg-robustness-{settings.kind}"
        lock = threading.Lock()

        def locked_print(message: str) -> None:  # parallel variants print from driver threads
            with lock:
                print_fn(message)

        self.print = locked_print
        self.stamp = time.strftime("%Y%m%d-%H%M%S")

    def settings_for_seed(self, seed: int | None) -> BenchmarkSettings:
        return self.settings if seed is None else replace(self.settings, seed=seed)

    def store_url_for(self, seed: int) -> str:
        s = self.settings
        return str(self.workdir / f"{s.kind}-{s.size}-s{seed}.zarr")

    # -- data
    def prepare_store(self, seed: int | None = None) -> None:
        """Synthesize one seed's phantom store (resumable) and derive its noisy label sets."""
        s = self.settings_for_seed(seed)
        url = self.store_url_for(s.seed)
        self.print(f"[benchmark] store {url}: {s.cases} {s.kind} phantom cases (seed {s.seed})")
        synth_store(
            url,
            kind=s.phantom_kind,
            cases=s.cases,
            seed=s.seed,
            test_fraction=s.test_fraction,
            val_fraction=s.val_fraction,
            clean_fraction=s.clean_fraction_flagged,
            generator_opts=dict(s.generator_opts),
            progress=False,
        )
        if s.kind == "skin":
            self._skin_label_sets(s, url)
            return
        existing = set(VolumeStore.open(url).label_sets())
        wanted = {(m, s.censor_rate) for m in s.label_modes}
        wanted |= {("random", r) for r in s.rate_sweep if r > 0}
        for mode, rate in sorted(wanted):
            name = censor_name(mode, rate, s.seed)
            if name not in existing:
                report = corrupt_store(
                    url, name=name, mode=mode, rate=rate, seed=s.seed, progress=False
                )
                self.print(f"[benchmark] {report.summary()}")

    def _skin_label_sets(self, s: BenchmarkSettings, url: str) -> None:
        noisy = skin_noisy_name(s)
        existing = set(VolumeStore.open(url).label_sets())
        if noisy not in existing:
            report = corrupt_store(
                url, name=noisy, mode="polygon", level=s.boundary_level, seed=s.seed, progress=False
            )
            self.print(f"[benchmark] {report.summary()}")
        if "mixed" in s.methods and skin_mixed_name(s) not in existing:
            self._write_mixed_label_set(s, url, noisy)

    def _write_mixed_label_set(self, s: BenchmarkSettings, url: str, noisy: str) -> None:
        """Truth labels on the reference clean subset, the noisy set elsewhere (clean+noisy BCE).

        The subset is the one the clean-only and the meta runs at ``meta_clean_fraction`` draw
        (same fraction, same seed, the default minimum case count), so the three baselines see
        the same clean cases.
        """
        store = VolumeStore.open(url, "r+")
        clean = set(
            select_clean_cases(
                store,
                fraction=s.meta_clean_fraction,
                seed=s.seed,
                min_count=DEFAULT_CLEAN_MIN_CASES,
            )
        )
        records: dict[str, list[dict]] = {}
        for case_id in store.case_ids(split="train"):
            source = "truth" if case_id in clean else noisy
            labels = store.labels(case_id, source)[...]
            records[case_id] = store.write_label_set(case_id, skin_mixed_name(s), labels) or []
        store.register_label_set(
            skin_mixed_name(s), records, {"mode": "mixed", "clean": "truth", "noisy": noisy}
        )

    # -- training and evaluation
    def train_config(self, variant: Variant, seed: int | None = None):
        """The :class:`~noisyseg.distributed.config.TrainConfig` of one variant of one seed."""
        s = self.settings_for_seed(seed)
        fields = {
            "store": self.store_url_for(s.seed),
            "labels": variant.label_set,
            "loss": variant.loss,
            "entropy_weight": s.entropy_weight,
            "reweight": variant.reweight,
            "experiment": self.experiment,
            "run_name": f"{s.kind}-{s.size}-s{s.seed}-{variant.key}-{self.stamp}",
            "storage_path": str(self.workdir / "ray_results"),
            **s.train_fields(),
        }
        if variant.reweight != "none" or variant.train_subset != "all":
            fields["clean_fraction"] = variant.clean_fraction
        if variant.train_subset != "all":
            fields["train_subset"] = variant.train_subset
        return make_config(fields, source="benchmark")

    def run_variant(
        self, variant: Variant, test_cases: list[str], seed: int | None = None
    ) -> BenchmarkRow:
        """Train one variant of one seed, evaluate it on ``test_cases`` against truth."""
        s = self.settings_for_seed(seed)
        config = self.train_config(variant, s.seed)
        self.print(f"[benchmark] seed {s.seed}: training {variant.key} ({variant.method})")
        began = time.perf_counter()
        outcome = run_training(config, tracking_uri=self.tracking_uri, print_fn=self.print)
        seconds = time.perf_counter() - began
        model, spec, _ = load_trained_model(outcome.checkpoint_path)
        store = VolumeStore.open(config.store)
        result = evaluate_cases(
            model,
            store,
            test_cases,
            label_set="truth",
            roi_size=(s.patch_size,) * spec.spatial_dims,
            candidate_threshold=REPORT_CANDIDATE_THRESHOLD,
            device="cuda" if s.gpu else "cpu",
        )
        metrics = {k: float(result.metrics[k]) for k in ROW_METRICS if k in result.metrics}
        metrics["fp_per_case_at_max_sensitivity"] = fp_at_max_sensitivity(result.metrics)
        if math.isnan(metrics["precision"]):
            # No lesion predicted at the operating threshold: precision 0, as scikit-learn's
            # zero_division=0 (the table stays comparable; sensitivity is 0 there as well).
            metrics["precision"] = 0.0
        self._log_eval(outcome.run_id, metrics)
        mode, rate = censoring(variant.label_set)
        return BenchmarkRow(
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
            run_id=outcome.run_id,
            train_seconds=seconds,
            metrics=metrics,
            sensitivity_by_size=list(result.metrics.get("sensitivity_by_size") or []),
            seed=s.seed,
            row_key=variant.row_key,
            froc=[[float(f), float(v)] for f, v in result.metrics.get("froc") or []],
            clean_cases=self._clean_cases(config),
            operating_point=self._operating_point(result.metrics),
        )

    @staticmethod
    def _clean_cases(config: Any) -> int | None:
        """How many clean cases the run drew (the trainer's own draw, same arguments)."""
        if config.reweight == "none" and config.train_subset != "clean":
            return None
        return len(config.draw_clean_cases())

    @staticmethod
    def _operating_point(metrics: dict[str, Any]) -> dict[str, Any]:
        """Threshold, candidate threshold, minimum IoU and FROC rates of the evaluation."""
        names = ("threshold", "candidate_threshold", "min_iou")
        point: dict[str, Any] = {k: float(metrics[k]) for k in names if metrics.get(k) is not None}
        point["froc_fp_rates"] = [float(rate) for rate, _ in metrics.get("froc") or []]
        return point

    def _log_eval(self, run_id: str, metrics: dict[str, float]) -> None:
        client = MlflowClient(self.tracking_uri)
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, f"test/{key}", value, timestamp=stamp)

    def _run_jobs(self, jobs: list[tuple[int, Variant]], tests: dict[int, list[str]]):
        """Train and evaluate every (seed, variant), ``settings.parallel`` at a time, in order.

        Each is its own TorchTrainer (own Ray Train controller and workers) launched from a
        driver thread; the cluster schedules them side by side. Meta reweighting (~3x a standard
        step) starts first so the last job to finish is a short one.
        """
        if self.settings.parallel <= 1 or len(jobs) <= 1:
            return [self.run_variant(v, tests[seed], seed) for seed, v in jobs]
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][1].reweight == "none")
        with ThreadPoolExecutor(max_workers=self.settings.parallel) as pool:
            futures = {
                i: pool.submit(self.run_variant, jobs[i][1], tests[jobs[i][0]], jobs[i][0])
                for i in order
            }
            return [futures[i].result() for i in range(len(jobs))]

    def run(self) -> list[BenchmarkRow]:
        """Everything: stores, training, evaluation. Returns the rows (baseline-relative filled)."""
        s = self.settings
        jobs: list[tuple[int, Variant]] = []
        tests: dict[int, list[str]] = {}
        for seed in self.seeds:
            self.prepare_store(seed)
            tests[seed] = VolumeStore.open(self.store_url_for(seed)).case_ids(split="test")
            jobs += [(seed, v) for v in plan_variants(self.settings_for_seed(seed), self.only)]
        self.print(
            f"[benchmark] {len(jobs)} models to train ({len(jobs) // len(self.seeds)} per seed, "
            f"seeds {self.seeds}); each evaluated on its seed's held-out test cases against truth"
        )
        started_ray = start_ray(s.workers * s.cpus_per_worker * s.parallel)
        try:
            rows = self._run_jobs(jobs, tests)
        finally:
            if started_ray:
                ray.shutdown()
        relative_to_baseline(rows, baseline_variant(s).key)
        return rows


# ---------------------------------------------------------------------------------- the outputs
def _plots(benchmark: RobustnessBenchmark, rows: list[BenchmarkRow], out_dir: Path) -> list[Path]:
    plots = [plot_sensitivity_by_size(rows, out_dir / "sensitivity_by_size.png")]
    if benchmark.settings.kind == "skin":
        plots.append(plot_clean_sizes(rows, out_dir / "clean_sizes.png"))
    else:
        plots.append(plot_rate_sweep(rows, out_dir / "rate_sweep.png"))
    return [p for p in plots if p is not None]


def _log_summary(benchmark: RobustnessBenchmark, document: dict[str, Any], files: list[Path]):
    """The summary MLflow run: parameters, the mean of each row's headline figures, artifacts."""
    s = benchmark.settings
    mlflow.set_tracking_uri(benchmark.tracking_uri)
    mlflow.set_experiment(benchmark.experiment)
    with mlflow.start_run(run_name=f"robustness-{s.kind}-{s.size}-{benchmark.stamp}") as run:
        mlflow.set_tags({"noisyseg.benchmark": "robustness", "noisyseg.kind": s.kind})
        mlflow.log_params(
            {
                "kind": s.kind,
                "size": s.size,
                "cases": s.cases,
                "steps": s.steps,
                "entropy_weight": s.entropy_weight,
                "seeds": ",".join(str(x) for x in benchmark.seeds),
            }
        )
        for summary in document["summary"]:
            for stat, prefix in (("relative_max_sensitivity", "rel_max_sensitivity"),):
                mean = summary["metrics"].get(stat, {}).get("mean")
                if mean is not None and math.isfinite(mean):
                    mlflow.log_metric(f"{prefix}/{summary['row_key']}", mean)
            mlflow.log_metric(f"dice/{summary['row_key']}", summary["metrics"]["dice"]["mean"])
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


def write_outputs(
    benchmark: RobustnessBenchmark, rows: list[BenchmarkRow], output: str | Path | None
) -> dict[str, Any]:
    """JSON + Markdown + plots on disk, and a summary MLflow run holding them.

    The JSON holds every seed's rows (``rows``), the per-row summary over seeds (``summary``:
    mean, half-width, low, high, n per figure), the operating points (``evaluation``) and the
    note the table prints under it.
    """
    s = benchmark.settings
    out_dir = benchmark.workdir / f"report-{s.kind}-{s.size}-{benchmark.stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation = next((r.operating_point for r in rows if r.operating_point), {})
    note = operating_point_note(evaluation, benchmark.seeds)
    table = format_table(rows)
    document: dict[str, Any] = {
        "kind": s.kind,
        "size": s.size,
        "seeds": benchmark.seeds,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "stores": [benchmark.store_url_for(seed) for seed in benchmark.seeds],
        "tracking_uri": benchmark.tracking_uri,
        "evaluation": evaluation,
        "note": note,
        "rows": [asdict(r) for r in rows],
        "summary": [summary.as_dict() for summary in summarize(rows)],
    }
    (out_dir / "table.md").write_text(table + "\n\n" + note + "\n")
    results = out_dir / "results.json"
    results.write_text(json.dumps(document, indent=2, default=float))
    files = [results, out_dir / "table.md", *_plots(benchmark, rows, out_dir)]
    document["summary_run_id"] = _log_summary(benchmark, document, files)
    json_path = Path(output) if output else results
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=2, default=float))
    document["json_path"] = str(json_path)
    document["table"] = table
    return document


def ui_command(tracking_uri: str) -> str:
    """The one command that opens the MLflow UI on this benchmark's runs.

    For the embedded SQLite default it names the ``mlflow`` executable of this very environment
    (``.venv/bin/mlflow`` after ``make demo``), so it works without activating the venv.
    """
    if tracking_uri.startswith("sqlite:"):
        beside = Path(sys.executable).parent / "mlflow"
        mlflow_exe = str(beside) if beside.exists() else shutil.which("mlflow") or "mlflow"
        return f"{mlflow_exe} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
    return f"open {tracking_uri} in a browser"
