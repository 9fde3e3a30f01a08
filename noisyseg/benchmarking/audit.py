"""``noisyseg benchmark audit``: how many of the lesions a label set leaves out does the audit find?

On brain-metastasis phantoms the censored lesions are known. For a label set with 50% of the
training lesions censored at random and, separately, the smallest 50% censored, a BCE-trained and a
lopsided-trained model (trained on that censored set by the robustness benchmark's machinery:
:meth:`noisyseg.benchmarking.robustness.RobustnessBenchmark.train_config` and
:func:`noisyseg.distributed.trainer.run_training`) audit the training split
(:mod:`noisyseg.audit.run`). With ``N`` censored lesions, the measurement is the share of them a
reviewer finds reading the top ``N`` and the top ``2N`` entries of the review list, by lesion
size (equivalent-sphere diameter < 4, 4–8, 8–20, ≥ 20 mm). A censored lesion is *found* at the
position of the first listed candidate that hits it: shares a voxel and has IoU ≥ 0.1 (the
detection rule of :mod:`noisyseg.metrics`) or lies at least half inside it (a fragment of a large
lesion, whose picture shows the lesion to the reviewer; see
:func:`noisyseg.candidates.hidden_lesions`). The IoU rule alone is reported beside it.

Target (issue 16), 50% random censoring, lopsided model: ≥ 80% of the censored lesions of ≥ 4 mm
among the top ``2N``, and more than the BCE-trained model finds.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.audit import run as audit_run
from noisyseg.benchmarking.robustness import RobustnessBenchmark, start_ray
from noisyseg.benchmarking.settings import BenchmarkSettings, Variant, censor_name, settings_for
from noisyseg.candidates import HiddenLesion, found_ranks, found_within, hidden_lesions
from noisyseg.distributed.inference import InferenceSettings
from noisyseg.distributed.trainer import run_training
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.store import VolumeStore

#: Equivalent-sphere diameter bin edges (mm) of the breakdown (the metrics' size bins).
DIAMETER_BINS_MM: tuple[float, ...] = (0.0, 4.0, 8.0, 20.0, math.inf)
#: The target counts censored lesions of at least this diameter.
TARGET_MIN_DIAMETER_MM = 4.0
TARGET_SHARE = 0.8
#: Hit rule of a candidate on a censored lesion: IoU (as the lesion metrics) or share inside.
MIN_IOU = 0.1
MIN_INSIDE = 0.5


#: Phantom kinds with known censored lesions.
AUDIT_KINDS: tuple[str, ...] = ("brain-mets", "brain-mets-1mm")


def audit_settings(
    size: str, *, kind: str = "brain-mets", seed: int = 0, gpu: bool = False
) -> BenchmarkSettings:
    """The robustness benchmark's brain setting of ``kind`` and ``size``, with BCE and lopsided
    only, no rate sweep; ``quick`` censors at random only (one pair of models), the others also
    by size.
    """
    if kind not in AUDIT_KINDS:
        raise ValueError(f"audit benchmark kind must be one of {AUDIT_KINDS}, got {kind!r}")
    base = settings_for(kind, size, seed=seed, gpu=gpu)  # type: ignore[arg-type]
    modes = ("random",) if size == "quick" else ("random", "size")
    return replace(base, methods=("bce", "lopsided"), label_modes=modes, rate_sweep=())


def audit_variants(settings: BenchmarkSettings) -> list[Variant]:
    """BCE and lopsided, trained on each censored label set."""
    return [
        Variant(censor_name(mode, settings.censor_rate, settings.seed), loss)
        for mode in settings.label_modes
        for loss in ("bce", "lopsided")
    ]


# ------------------------------------------------------------------------------- measurement
@dataclass
class AuditRow:
    """One model's audit of its own censored training labels."""

    key: str
    label_set: str
    censor_mode: str
    loss: str
    method: str
    run_id: str
    audit_run_id: str | None
    train_seconds: float
    n_censored: int
    list_length: int
    found_n: int
    found_2n: int
    n_censored_target: int
    found_2n_target: int
    found_2n_target_iou: int
    by_size: list[dict[str, Any]] = field(default_factory=list)
    curve: list[int] = field(default_factory=list)
    curve_target: list[int] = field(default_factory=list)

    @property
    def share_2n_target(self) -> float:
        """Share of the censored lesions ≥ 4 mm found in the top 2N (NaN when there are none)."""
        return self.found_2n_target / self.n_censored_target if self.n_censored_target else math.nan


def size_breakdown(lesions: Sequence[HiddenLesion], ranks: np.ndarray, n: int) -> list[dict]:
    """Per diameter bin: count, found in the top ``n`` and in the top ``2n``."""
    diameters = np.array([lesion.diameter_mm for lesion in lesions], dtype=float)
    rows = []
    for low, high in itertools.pairwise(DIAMETER_BINS_MM):
        inside = (diameters >= low) & (diameters < high)
        rows.append(
            {
                "bin_mm": f"[{low:g}, {high:g})",
                "count": int(inside.sum()),
                "found_n": found_within(ranks[inside], n),
                "found_2n": found_within(ranks[inside], 2 * n),
            }
        )
    return rows


def measure(lesions: Sequence[HiddenLesion], ranked_ids: Sequence[str]) -> dict[str, Any]:
    """The row's numbers from the censored lesions (with their hitting candidates) and the list.

    Returns:
        ``n_censored``, ``list_length``, ``found_n``, ``found_2n``, ``n_censored_target``,
        ``found_2n_target``, ``by_size`` and the curves ``curve`` / ``curve_target`` (found
        within the top ``k`` for ``k = 0..max(list length, 2N)``).
    """
    ranks = found_ranks(lesions, ranked_ids)
    n = len(lesions)
    target = np.array([lesion.diameter_mm >= TARGET_MIN_DIAMETER_MM for lesion in lesions], bool)
    longest = max(len(ranked_ids), 2 * n)
    return {
        "n_censored": n,
        "list_length": len(ranked_ids),
        "found_n": found_within(ranks, n),
        "found_2n": found_within(ranks, 2 * n),
        "n_censored_target": int(target.sum()),
        "found_2n_target": found_within(ranks[target], 2 * n),
        "by_size": size_breakdown(lesions, ranks, n),
        "curve": [found_within(ranks, k) for k in range(longest + 1)],
        "curve_target": [found_within(ranks[target], k) for k in range(longest + 1)],
    }


# ---------------------------------------------------------------------------------- the runner
class AuditBenchmark:
    """Store, censored sets and training from the robustness benchmark; then audit and measure.

    Args:
        settings: :func:`audit_settings`.
        workdir: store, Ray checkpoints, audit outputs and the report.
        tracking_uri: MLflow URI (default as for training).
        print_fn: terminal output.
        threshold: candidate threshold of the audits.
        top_figures: candidate pictures each audit logs.
    """

    def __init__(
        self,
        settings: BenchmarkSettings,
        workdir: str | Path,
        *,
        tracking_uri: str | None = None,
        print_fn: Callable[[str], None] = print,
        threshold: float = audit_run.DEFAULT_THRESHOLD,
        top_figures: int = 5,
    ) -> None:
        self.training = RobustnessBenchmark(
            settings,
            workdir,
            tracking_uri=tracking_uri,
            experiment=f"noisyseg-audit-{settings.kind}",
            print_fn=print_fn,
        )
        self.settings = settings
        self.threshold = threshold
        self.top_figures = top_figures

    @property
    def workdir(self) -> Path:
        return self.training.workdir

    def run(self) -> list[AuditRow]:
        """Prepare the store, then train and audit every variant (``parallel`` at a time)."""
        self.training.prepare_store()
        variants = audit_variants(self.settings)
        s = self.settings
        self.training.print(f"[benchmark] {len(variants)} models to train, then audit")
        started_ray = start_ray(s.workers * s.cpus_per_worker * s.parallel)
        try:
            with ThreadPoolExecutor(max_workers=max(1, s.parallel)) as pool:
                return list(pool.map(self.run_variant, variants))
        finally:
            if started_ray:
                import ray

                ray.shutdown()

    def run_variant(self, variant: Variant) -> AuditRow:
        """Train on the censored set, audit the training split, measure against truth."""

        self.training.print(f"[benchmark] training {variant.key} ({variant.method})")
        began = time.perf_counter()
        outcome = run_training(
            self.training.train_config(variant),
            tracking_uri=self.training.tracking_uri,
            print_fn=self.training.print,
        )
        seconds = time.perf_counter() - began
        numbers, audit_run_id = self.audit(outcome.checkpoint_path, outcome.run_id, variant)
        return AuditRow(
            key=variant.key,
            label_set=variant.label_set,
            censor_mode=variant.label_set.split("-")[1],
            loss=variant.loss,
            method=variant.method,
            run_id=outcome.run_id,
            audit_run_id=audit_run_id,
            train_seconds=seconds,
            **numbers,
        )

    def audit(self, checkpoint_path: str, run_id: str, variant: Variant) -> tuple[dict, str]:
        """Audit the training split with the model; returns the measurement and the audit run."""

        s = self.settings
        model = replace(audit_run.load_model(checkpoint_path), run_id=run_id)
        store = VolumeStore.open(self.training.store_url)
        cases = store.case_ids(split="train")
        inference = InferenceSettings(
            roi_size=(s.patch_size,) * 3, device="cuda" if s.gpu else "cpu"
        )
        found = audit_run.find_candidates(
            model.checkpoint,
            self.training.store_url,
            cases,
            inference,
            label_set=variant.label_set,
            threshold=self.threshold,
            use_ray=False,
        )
        ranked = audit_run.review_list(found)
        ranked_ids = [c.candidate_id for c in ranked]
        lesions, strict = [], []
        for case_id, candidates in found.items():
            truth = np.asarray(store.labels(case_id, "truth")[...])
            labels = np.asarray(store.labels(case_id, variant.label_set)[...])
            suspected = [c for c in candidates if c.suspected_missed]
            for rule, out in ((MIN_INSIDE, lesions), (None, strict)):
                out += hidden_lesions(
                    truth,
                    labels,
                    suspected,
                    case_id=case_id,
                    spacing=store.spacing(case_id),
                    min_iou=MIN_IOU,
                    min_inside=rule,
                )
        numbers = measure(lesions, ranked_ids)
        numbers["found_2n_target_iou"] = measure(strict, ranked_ids)["found_2n_target"]
        table = audit_run.candidates_table(ranked, 3)
        outputs = audit_run.write_outputs(
            store,
            ranked,
            table,
            label_set=variant.label_set,
            directory=self.workdir / f"audit-{variant.key}-{self.training.stamp}",
            top=self.top_figures,
        )
        params = {
            "model": checkpoint_path,
            "store": self.training.store_url,
            "label_set": variant.label_set,
            "split": "train",
            "threshold": self.threshold,
            "n_cases": len(cases),
        }
        metrics = {k: numbers[k] for k in ("n_censored", "list_length", "found_n", "found_2n")}
        audit_run_id = audit_run.log_audit(
            model, params, metrics, outputs, tracking_uri=self.training.tracking_uri
        )
        self.training.print(
            f"[benchmark] audit {variant.key}: {numbers['found_2n']}/{numbers['n_censored']} "
            f"censored lesions in the top 2N of {numbers['list_length']} candidates"
        )
        return numbers, audit_run_id


# ---------------------------------------------------------------------------------- reporting
TABLE_COLUMNS: tuple[str, ...] = (
    "labels",
    "method",
    "N censored",
    "list length",
    "found in top N",
    "found in top 2N",
    "≥ 4 mm in top 2N",
    "same, IoU rule only",
    "top 2N by size (<4 / 4-8 / 8-20 / ≥20 mm)",
)


def _share(found: int, count: int) -> str:
    return f"{found}/{count} ({found / count:.0%})" if count else f"{found}/0"


def row_cells(row: AuditRow) -> list[str]:
    """One table row as text (shared by the Markdown and the terminal tables)."""
    sizes = " / ".join(f"{b['found_2n']}/{b['count']}" for b in row.by_size)
    return [
        row.label_set,
        row.method,
        str(row.n_censored),
        str(row.list_length),
        _share(row.found_n, row.n_censored),
        _share(row.found_2n, row.n_censored),
        _share(row.found_2n_target, row.n_censored_target),
        _share(row.found_2n_target_iou, row.n_censored_target),
        sizes,
    ]


def format_table(rows: Sequence[AuditRow]) -> str:
    """The Markdown table."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def target_verdict(rows: Sequence[AuditRow]) -> str:
    """One line: is the target met at 50% random censoring (lopsided ≥ 80% of the ≥ 4 mm
    censored lesions in the top 2N, and more than BCE)?"""
    random_rows = {r.loss: r for r in rows if r.censor_mode == "random"}
    if not {"bce", "lopsided"} <= set(random_rows):
        return "target: no random-censoring pair of models to judge"
    lopsided, bce = random_rows["lopsided"], random_rows["bce"]
    share, other = lopsided.share_2n_target, bce.share_2n_target
    met = share >= TARGET_SHARE and share > other
    return (
        f"target (random 50%, lopsided: >= {TARGET_SHARE:.0%} of censored lesions >= "
        f"{TARGET_MIN_DIAMETER_MM:g} mm in the top 2N, more than BCE): "
        f"{'MET' if met else 'MISSED'} - lopsided {share:.0%}, BCE {other:.0%}"
    )


def plot_found_curves(rows: Sequence[AuditRow], path: Path) -> Path:
    """Found censored lesions (share of N) against the review-list length, one panel per
    censoring mode; solid: all sizes, dashed: ≥ 4 mm; dotted verticals at N and 2N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.censor_mode for r in rows))
    figure, axes = plt.subplots(1, max(1, len(modes)), figsize=(5.5 * max(1, len(modes)), 4.2))
    axes = np.atleast_1d(axes)
    for axis, mode in zip(axes, modes):
        for index, row in enumerate(r for r in rows if r.censor_mode == mode):
            colour = f"C{index}"
            k = np.arange(len(row.curve))
            if row.n_censored:
                axis.plot(k, np.array(row.curve) / row.n_censored, color=colour, label=row.method)
            if row.n_censored_target:
                axis.plot(
                    k,
                    np.array(row.curve_target) / row.n_censored_target,
                    color=colour,
                    linestyle="--",
                    label=f"{row.method}, ≥ 4 mm",
                )
            for multiple in (1, 2):
                axis.axvline(multiple * row.n_censored, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("review-list length (candidates read, best first)")
        axis.set_ylabel("censored lesions found (share)")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{mode} censoring, 50% (dotted: N and 2N)", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(benchmark: AuditBenchmark, rows: Sequence[AuditRow], output: str | None) -> dict:
    """JSON, Markdown table and curve on disk, and a summary MLflow run holding them."""
    import mlflow

    s = benchmark.settings
    out_dir = benchmark.workdir / f"report-audit-{s.kind}-{s.size}-{benchmark.training.stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    verdict = target_verdict(rows)
    (out_dir / "table.md").write_text(table + "\n\n" + verdict + "\n")
    curve = plot_found_curves(rows, out_dir / "found_vs_list_length.png")
    document = {
        "kind": s.kind,
        "size": s.size,
        "store": benchmark.training.store_url,
        "tracking_uri": benchmark.training.tracking_uri,
        "threshold": benchmark.threshold,
        "min_iou": MIN_IOU,
        "min_inside": MIN_INSIDE,
        "verdict": verdict,
        "rows": [asdict(r) | {"share_2n_target": r.share_2n_target} for r in rows],
    }
    json_path = Path(output) if output else out_dir / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(benchmark.training.tracking_uri)
    mlflow.set_experiment(benchmark.training.experiment)
    with mlflow.start_run(run_name=f"audit-{s.kind}-{s.size}-{benchmark.training.stamp}") as run:
        document["summary_run_id"] = run.info.run_id
        json_path.write_text(json.dumps(document, indent=2, default=float))
        mlflow.set_tags({"noisyseg.benchmark": "audit", "noisyseg.kind": s.kind})
        mlflow.log_params({"size": s.size, "cases": s.cases, "steps": s.steps, "seed": s.seed})
        for row in rows:
            for name in ("found_n", "found_2n", "found_2n_target"):
                mlflow.log_metric(f"{name}/{row.key}", getattr(row, name))
            if math.isfinite(row.share_2n_target):
                mlflow.log_metric(f"share_2n_4mm/{row.key}", row.share_2n_target)
        mlflow.log_text(json.dumps(document, indent=2, default=float), "results.json")
        mlflow.log_artifact(str(out_dir / "table.md"))
        mlflow.log_artifact(str(curve))
    document.update(json_path=str(json_path), table=table, curve=str(curve))
    return document


def print_rich_table(rows: Sequence[AuditRow], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column in ("labels", "method") else "right")
    for row in rows:
        table.add_row(*row_cells(row))
    Console(width=160).print(table)


def run_audit_benchmark(
    kind: str,
    size: str,
    *,
    workdir: str,
    output: str | None = None,
    seed: int = 0,
    gpu: bool = False,
    parallel: int | None = None,
    seeds: int = 1,
    only: list[str] | None = None,
    print_fn: Callable[[str], None] = print,
) -> int:
    """``noisyseg benchmark audit``: run, print the table and the verdict, write and log the
    report. Returns the exit status (0; 1 when a model's list found nothing to measure)."""

    if kind not in AUDIT_KINDS:
        raise NoisysegInputError(
            f"benchmark audit needs censored lesions: --kind {' or '.join(AUDIT_KINDS)}, "
            f"got {kind!r}"
        )
    if seeds != 1 or only:
        raise NoisysegInputError(
            "benchmark audit runs one seed of its fixed plan (no --seeds/--only)"
        )
    settings = audit_settings(size, kind=kind, seed=seed, gpu=gpu)
    if parallel is not None:
        if parallel < 1:
            raise NoisysegInputError(f"--parallel must be >= 1, got {parallel}")
        settings = replace(settings, parallel=parallel)
    began = time.perf_counter()
    benchmark = AuditBenchmark(settings, workdir, print_fn=print_fn)
    rows = benchmark.run()
    document = write_report(benchmark, rows, output)
    print_rich_table(
        rows, title=f"audit of censored {kind} labels ({size}): censored lesions found"
    )
    print_fn(f"[benchmark] {document['verdict']}")
    print_fn(f"[benchmark] wall time {time.perf_counter() - began:.0f} s")
    print_fn(f"[benchmark] results JSON: {document['json_path']}; curve: {document['curve']}")
    print_fn(
        f"[benchmark] MLflow summary run {document['summary_run_id']} "
        f"(experiment {benchmark.training.experiment}) at {benchmark.training.tracking_uri}"
    )
    return 0 if all(row.n_censored > 0 for row in rows) else 1
