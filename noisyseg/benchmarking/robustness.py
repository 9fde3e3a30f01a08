"""Reproduce the two papers' robustness claims on phantom data (issue 6).

``noisyseg benchmark robustness --kind brain-mets|skin [--quick|--full]``:

* **brain-mets** (Yi et al., MIDL 2020): one 3D U-Net trained on (a) truth labels, (b) labels with
  50% of the lesions censored at random, (c) the smallest 50% censored — each with standard BCE,
  the lopsided bootstrap loss and meta pixel reweighting from a clean subset — then every model is
  evaluated on held-out *truth*. The table gives the maximum lesion sensitivity relative to the
  truth-trained BCE baseline (the papers' headline number), sensitivity at 80% precision, AP,
  false positives per case and Dice. A sweep of the censoring rate (0, 0.25, 0.5, 0.75) compares
  BCE with lopsided as a curve.
* **skin** (Mirikharaji et al., 2019): 2D RGB phantoms whose non-clean cases carry coarse polygon
  outlines; noisy-only BCE, clean-only BCE, clean+noisy BCE and meta reweighting at several
  clean-subset sizes, scored by Dice and Jaccard.

Every model is trained through :func:`noisyseg.distributed.trainer.run_training` (Ray Train,
tracked in MLflow) and evaluated with :func:`noisyseg.distributed.inference.evaluate_cases`; the
summary (table, JSON, plots) is logged to its own MLflow run. Sizes: ``quick`` (CI smoke, and
``make demo``), ``default`` (under 30 minutes per kind on a 2-core CPU) and ``full`` (GPUs).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from noisyseg.losses import DEFAULT_ENTROPY_WEIGHT

Kind = Literal["brain-mets", "skin"]
Size = Literal["quick", "default", "full"]

#: Metrics every row carries (from :func:`noisyseg.metrics.lesion_metrics`).
ROW_METRICS: tuple[str, ...] = (
    "max_sensitivity",
    "sensitivity",
    "sensitivity_at_80_precision",
    "ap",
    "precision",
    "fp_per_case",
    "dice",
    "jaccard",
)


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Variant:
    """One trained model: which labels it sees and how it learns from them."""

    label_set: str  # "truth" or a derived label set name in the store
    loss: str = "bce"
    reweight: str = "none"  # none | meta | meta-head
    clean_fraction: float | None = None
    train_subset: str = "all"  # all | clean (clean-only training)
    group: str = "main"  # main | rate-sweep

    @property
    def key(self) -> str:
        parts = [self.label_set, self.loss]
        if self.reweight != "none":
            parts.append(f"{self.reweight}{self.clean_fraction:g}")
        if self.train_subset != "all":
            parts.append(f"{self.train_subset}-only")
        return "_".join(parts)

    @property
    def method(self) -> str:
        """Human name of the learning method (table column)."""
        if self.train_subset == "clean":
            return "BCE, clean only"
        if self.reweight != "none":
            return f"meta reweighting ({self.clean_fraction:.0%} clean)"
        return {"bce": "BCE", "dicebce": "Dice+BCE", "lopsided": "lopsided bootstrap"}.get(
            self.loss, self.loss
        )


@dataclass(frozen=True)
class BenchmarkSettings:
    """Sizes of one benchmark setting (data, network, optimisation)."""

    kind: Kind
    size: Size
    cases: int
    seed: int
    generator_opts: dict[str, Any]
    clean_fraction_flagged: float  # cases flagged clean at synth time (upper bound of subsets)
    steps: int
    patch_size: int
    batch_size: int
    channels: tuple[int, ...]
    lr: float
    entropy_weight: float
    meta_clean_fraction: float
    censor_rate: float = 0.5
    rate_sweep: tuple[float, ...] = ()
    clean_sizes: tuple[float, ...] = ()
    workers: int = 1
    cpus_per_worker: float = 1.0
    #: models trained at the same time (one TorchTrainer each). On a 2-core CPU two one-thread
    #: trainers do ~1.5x the steps of one two-thread trainer (small 3D convolutions do not use
    #: two threads well); on one GPU use 1.
    parallel: int = 2
    gpu: bool = False
    val_cases: int = 0
    methods: tuple[str, ...] = ("bce", "lopsided", "meta")
    label_modes: tuple[str, ...] = ("random", "size")
    boundary_level: str = "severe"
    test_fraction: float = 0.25
    val_fraction: float = 0.1

    def train_fields(self) -> dict[str, Any]:
        """TrainConfig fields shared by every variant."""
        return {
            "steps": self.steps,
            "patch_size": self.patch_size,
            "batch_size": self.batch_size,
            "channels": list(self.channels),
            "lr": self.lr,
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "gpu": self.gpu,
            "amp": "bf16" if self.gpu else "none",
            "val_cases": self.val_cases,
            "val_interval": 0,
            "checkpoint_interval": self.steps,
            "num_checkpoints_to_keep": 1,
            "log_interval": max(1, self.steps // 10),
            "seed": self.seed,
        }


def settings_for(kind: Kind, size: Size, *, seed: int = 0, gpu: bool = False) -> BenchmarkSettings:
    """The embedded settings. ``quick`` is the CI smoke test and ``make demo``.

    On CPU two models train at once; with ``gpu`` one (each worker holds the one GPU).
    """
    settings = _embedded_settings(kind, size, seed=seed, gpu=gpu)
    return replace(settings, parallel=1) if gpu else settings


def _embedded_settings(kind: Kind, size: Size, *, seed: int, gpu: bool) -> BenchmarkSettings:
    if kind == "brain-mets":
        if size == "quick":
            return BenchmarkSettings(
                kind=kind,
                size=size,
                cases=10,
                seed=seed,
                generator_opts={"shape": [48, 64, 48], "spacing_mm": 2.0},
                clean_fraction_flagged=0.2,
                steps=1000,
                patch_size=32,
                batch_size=2,
                channels=(8, 16, 32),
                lr=1e-2,
                entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                meta_clean_fraction=0.2,
                methods=("bce", "lopsided"),
                label_modes=("random",),
                gpu=gpu,
            )
        if size == "default":
            return BenchmarkSettings(
                kind=kind,
                size=size,
                cases=32,
                seed=seed,
                generator_opts={"shape": [64, 80, 64], "spacing_mm": 2.0},
                clean_fraction_flagged=0.1,
                steps=2000,
                patch_size=40,
                batch_size=2,
                channels=(16, 32, 64, 128),
                lr=1e-2,
                entropy_weight=DEFAULT_ENTROPY_WEIGHT,
                meta_clean_fraction=0.05,
                rate_sweep=(0.0, 0.25, 0.5, 0.75),
                gpu=gpu,
            )
        return BenchmarkSettings(
            kind=kind,
            size=size,
            cases=200,
            seed=seed,
            generator_opts={},
            clean_fraction_flagged=0.1,
            steps=10000,
            patch_size=64,
            batch_size=4,
            channels=(32, 64, 128, 256, 320),
            lr=1e-2,
            entropy_weight=DEFAULT_ENTROPY_WEIGHT,
            meta_clean_fraction=0.05,
            rate_sweep=(0.0, 0.25, 0.5, 0.75),
            gpu=gpu,
            val_cases=4,
            cpus_per_worker=4.0,
        )
    if size == "quick":
        return BenchmarkSettings(
            kind=kind,
            size=size,
            cases=24,
            seed=seed,
            generator_opts={"size": 64},
            clean_fraction_flagged=0.25,
            steps=40,
            patch_size=64,
            batch_size=4,
            channels=(8, 16, 32),
            lr=1e-2,
            entropy_weight=DEFAULT_ENTROPY_WEIGHT,
            meta_clean_fraction=0.1,
            clean_sizes=(0.1,),
            gpu=gpu,
        )
    if size == "default":
        return BenchmarkSettings(
            kind=kind,
            size=size,
            cases=160,
            seed=seed,
            generator_opts={"size": 128},
            clean_fraction_flagged=0.2,
            steps=400,
            patch_size=128,
            batch_size=8,
            channels=(16, 32, 64, 128),
            lr=1e-2,
            entropy_weight=DEFAULT_ENTROPY_WEIGHT,
            meta_clean_fraction=0.05,
            clean_sizes=(0.02, 0.05, 0.1, 0.2),
            gpu=gpu,
        )
    return BenchmarkSettings(
        kind=kind,
        size=size,
        cases=2000,
        seed=seed,
        generator_opts={"size": 256},
        clean_fraction_flagged=0.2,
        steps=5000,
        patch_size=256,
        batch_size=16,
        channels=(32, 64, 128, 256, 512),
        lr=1e-2,
        entropy_weight=DEFAULT_ENTROPY_WEIGHT,
        meta_clean_fraction=0.05,
        clean_sizes=(0.02, 0.05, 0.1, 0.2),
        gpu=gpu,
        val_cases=8,
        cpus_per_worker=4.0,
    )


# ------------------------------------------------------------------------------------ variants
def censor_name(mode: str, rate: float, seed: int) -> str:
    """The store's default name for a censored label set (``censor-random-0.50-s0``)."""
    from noisyseg.noise import NoiseSpec

    return NoiseSpec(mode=mode, rate=rate).label_set_name(seed)


def brain_variants(settings: BenchmarkSettings) -> list[Variant]:
    """Truth / censored label sets × methods, plus the censoring-rate sweep."""
    label_sets = ["truth"] + [
        censor_name(mode, settings.censor_rate, settings.seed) for mode in settings.label_modes
    ]
    variants: list[Variant] = []
    for label_set in label_sets:
        for method in settings.methods:
            if method == "meta":
                if label_set == "truth":
                    continue  # reweighting clean labels against clean labels shows nothing
                variants.append(
                    Variant(label_set, "bce", "meta", clean_fraction=settings.meta_clean_fraction)
                )
            else:
                variants.append(Variant(label_set, method))
    done = {v.key for v in variants}
    for rate in settings.rate_sweep:
        label_set = "truth" if rate == 0 else censor_name("random", rate, settings.seed)
        for loss in ("bce", "lopsided"):
            variant = Variant(label_set, loss, group="rate-sweep")
            if replace(variant, group="main").key not in done:
                variants.append(variant)
    return variants


def skin_noisy_name(settings: BenchmarkSettings) -> str:
    """Coarse polygon outlines on every training case (``polygon-severe-1.00-s0``)."""
    from noisyseg.noise import NoiseSpec

    return NoiseSpec(mode="polygon", level=settings.boundary_level).label_set_name(settings.seed)


def skin_mixed_name(settings: BenchmarkSettings) -> str:
    return f"{skin_noisy_name(settings)}-clean-truth"


def skin_variants(settings: BenchmarkSettings) -> list[Variant]:
    """Mirikharaji et al.'s comparison: noisy-only, clean-only, clean+noisy, meta at clean sizes."""
    noisy, mixed = skin_noisy_name(settings), skin_mixed_name(settings)
    reference = settings.meta_clean_fraction
    variants = [
        Variant("truth", "bce", group="reference"),
        Variant(noisy, "bce"),
        Variant("truth", "bce", clean_fraction=reference, train_subset="clean"),
        Variant(mixed, "bce"),
    ]
    sizes = sorted(set(settings.clean_sizes) | {reference})
    variants += [Variant(noisy, "bce", "meta", clean_fraction=size) for size in sizes]
    return variants


# ------------------------------------------------------------------------------------- results
@dataclass
class BenchmarkRow:
    """One trained and evaluated model (a row of the JSON output)."""

    key: str
    group: str
    label_set: str
    loss: str
    reweight: str
    clean_fraction: float | None
    train_subset: str
    method: str
    censor_mode: str | None
    censor_rate: float | None
    run_id: str
    train_seconds: float
    metrics: dict[str, float]
    relative_max_sensitivity: float | None = None
    sensitivity_by_size: list[dict[str, Any]] = field(default_factory=list)


def _censoring(label_set: str) -> tuple[str | None, float | None]:
    if label_set == "truth":
        return None, 0.0
    parts = label_set.split("-")
    if parts[0] == "censor" and len(parts) >= 3:
        return parts[1], float(parts[2])
    return parts[0], None


def relative_to_baseline(rows: list[BenchmarkRow], baseline_key: str) -> None:
    """Fill ``relative_max_sensitivity`` = row max sensitivity / baseline's (NaN if baseline 0)."""
    baseline = next(r for r in rows if r.key == baseline_key)
    reference = baseline.metrics["max_sensitivity"]
    for row in rows:
        value = row.metrics["max_sensitivity"]
        row.relative_max_sensitivity = value / reference if reference > 0 else math.nan


# ----------------------------------------------------------------------------------- the runner
class RobustnessBenchmark:
    """Builds the store, trains every variant, evaluates on held-out truth, reports.

    Args:
        settings: sizes (:func:`settings_for`).
        workdir: where the store, Ray checkpoints and (by default) the MLflow database live.
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
        tracking_uri: str | None = None,
        experiment: str | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store_url = str(
            self.workdir / f"{settings.kind}-{settings.size}-s{settings.seed}.zarr"
        )
        from noisyseg.distributed.tracking import resolve_tracking_uri

        self.tracking_uri = tracking_uri or resolve_tracking_uri()
        self.experiment = experiment or f"noisyseg-robustness-{settings.kind}"
        lock = threading.Lock()

        def locked_print(message: str) -> None:  # parallel variants print from driver threads
            with lock:
                print_fn(message)

        self.print = locked_print
        self.stamp = time.strftime("%Y%m%d-%H%M%S")

    # -- data
    def prepare_store(self) -> None:
        """Synthesize the phantom store (resumable) and derive the noisy label sets."""
        from noisyseg.storage.commands import synth_store
        from noisyseg.storage.corrupt import corrupt_store
        from noisyseg.storage.store import VolumeStore

        s = self.settings
        self.print(f"[benchmark] store {self.store_url}: {s.cases} {s.kind} phantom cases")
        synth_store(
            self.store_url,
            kind=s.kind,
            cases=s.cases,
            seed=s.seed,
            test_fraction=s.test_fraction,
            val_fraction=s.val_fraction,
            clean_fraction=s.clean_fraction_flagged,
            generator_opts=dict(s.generator_opts),
            progress=False,
        )
        store = VolumeStore.open(self.store_url, "r+")
        existing = set(store.label_sets())
        if s.kind == "brain-mets":
            wanted = {(m, s.censor_rate) for m in s.label_modes}
            wanted |= {("random", r) for r in s.rate_sweep if r > 0}
            for mode, rate in sorted(wanted):
                name = censor_name(mode, rate, s.seed)
                if name not in existing:
                    report = corrupt_store(
                        self.store_url,
                        name=name,
                        mode=mode,
                        rate=rate,
                        seed=s.seed,
                        progress=False,
                    )
                    self.print(f"[benchmark] {report.summary()}")
        else:
            noisy = skin_noisy_name(s)
            if noisy not in existing:
                report = corrupt_store(
                    self.store_url,
                    name=noisy,
                    mode="polygon",
                    level=s.boundary_level,
                    seed=s.seed,
                    progress=False,
                )
                self.print(f"[benchmark] {report.summary()}")
            if skin_mixed_name(s) not in existing:
                self._write_mixed_label_set(store, noisy, skin_mixed_name(s))

    def _write_mixed_label_set(self, store: Any, noisy: str, name: str) -> None:
        """Truth labels on the reference clean subset, the noisy set elsewhere (clean+noisy BCE).

        The subset is the one the clean-only and the meta runs at ``meta_clean_fraction`` draw
        (same fraction, same seed), so the three baselines see the same clean cases.
        """
        from noisyseg.storage.patches import select_clean_cases

        records: dict[str, list[dict]] = {}
        clean = set(
            select_clean_cases(
                store, fraction=self.settings.meta_clean_fraction, seed=self.settings.seed
            )
        )
        for case_id in store.case_ids(split="train"):
            source = "truth" if case_id in clean else noisy
            records[case_id] = (
                store.write_label_set(case_id, name, store.labels(case_id, source)[...]) or []
            )
        store.register_label_set(name, records, {"mode": "mixed", "clean": "truth", "noisy": noisy})

    # -- training and evaluation
    def train_config(self, variant: Variant):
        from noisyseg.distributed.config import make_config

        s = self.settings
        fields = {
            "store": self.store_url,
            "labels": variant.label_set,
            "loss": variant.loss,
            "entropy_weight": s.entropy_weight,
            "reweight": variant.reweight,
            "experiment": self.experiment,
            "run_name": f"{s.kind}-{s.size}-{variant.key}-{self.stamp}",
            "storage_path": str(self.workdir / "ray_results"),
            **s.train_fields(),
        }
        if variant.reweight != "none" or variant.train_subset != "all":
            fields["clean_fraction"] = variant.clean_fraction
        if variant.train_subset != "all":
            fields["train_subset"] = variant.train_subset
        return make_config(fields, source="benchmark")

    def run_variant(self, variant: Variant, test_cases: list[str]) -> BenchmarkRow:
        from noisyseg.distributed.inference import evaluate_cases, load_trained_model
        from noisyseg.distributed.trainer import run_training
        from noisyseg.metrics import REPORT_CANDIDATE_THRESHOLD
        from noisyseg.storage.store import VolumeStore

        config = self.train_config(variant)
        self.print(f"[benchmark] training {variant.key} ({variant.method})")
        began = time.perf_counter()
        outcome = run_training(config, tracking_uri=self.tracking_uri, print_fn=self.print)
        seconds = time.perf_counter() - began
        model, spec, _ = load_trained_model(outcome.checkpoint_path)
        store = VolumeStore.open(self.store_url)
        result = evaluate_cases(
            model,
            store,
            test_cases,
            label_set="truth",
            roi_size=(self.settings.patch_size,) * spec.spatial_dims,
            candidate_threshold=REPORT_CANDIDATE_THRESHOLD,
            device="cuda" if self.settings.gpu else "cpu",
        )
        metrics = {k: float(result.metrics[k]) for k in ROW_METRICS}
        if math.isnan(metrics["precision"]):
            # No lesion predicted at the operating threshold: precision 0, as scikit-learn's
            # zero_division=0 (the table stays comparable; sensitivity is 0 there as well).
            metrics["precision"] = 0.0
        self._log_eval(outcome.run_id, metrics)
        mode, rate = _censoring(variant.label_set)
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
        )

    def _log_eval(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, f"test/{key}", value, timestamp=stamp)

    def _run_variants(self, variants: list[Variant], test_cases: list[str]) -> list[BenchmarkRow]:
        """Train and evaluate every variant, ``settings.parallel`` at a time; rows in input order.

        Each variant is its own TorchTrainer (own Ray Train controller and workers) launched
        from a driver thread; the cluster schedules them side by side. The longest (meta
        reweighting, ~2.5x a standard step) start first so the last one to finish is short.
        MLflow on SQLite takes the concurrent writers (it waits up to 20 s on a lock), and
        :func:`noisyseg.distributed.tracking.open_run` creates the experiment race-free.
        """
        from concurrent.futures import ThreadPoolExecutor

        if self.settings.parallel <= 1 or len(variants) <= 1:
            return [self.run_variant(v, test_cases) for v in variants]
        order = sorted(range(len(variants)), key=lambda i: variants[i].reweight == "none")
        with ThreadPoolExecutor(max_workers=self.settings.parallel) as pool:
            futures = {i: pool.submit(self.run_variant, variants[i], test_cases) for i in order}
            return [futures[i].result() for i in range(len(variants))]

    def run(self) -> list[BenchmarkRow]:
        """Everything: store, training, evaluation. Returns the rows (baseline-relative filled)."""
        from noisyseg.distributed.trainer import ensure_ray
        from noisyseg.storage.store import VolumeStore

        self.prepare_store()
        s = self.settings
        variants = brain_variants(s) if s.kind == "brain-mets" else skin_variants(s)
        test_cases = VolumeStore.open(self.store_url).case_ids(split="test")
        self.print(
            f"[benchmark] {len(variants)} models to train; evaluating on {len(test_cases)} "
            f"held-out test cases against truth"
        )
        started_ray = ensure_ray(s.workers * s.cpus_per_worker * s.parallel)
        try:
            rows = self._run_variants(variants, test_cases)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        baseline = Variant("truth", "bce", group="main" if s.kind == "brain-mets" else "reference")
        relative_to_baseline(rows, baseline.key)
        return rows


# ---------------------------------------------------------------------------------- reporting
TABLE_COLUMNS: tuple[str, ...] = (
    "labels",
    "method",
    "rel. max sens.",
    "max sens.",
    "sens. @80% prec.",
    "AP",
    "FP/case",
    "Dice",
    "Jaccard",
)


def _row_cells(row: BenchmarkRow) -> list[str]:
    """One table row as text, in :data:`TABLE_COLUMNS` order (shared by Markdown and terminal)."""
    m = row.metrics
    rel = row.relative_max_sensitivity
    return [
        row.label_set,
        row.method,
        "n/a" if rel is None or math.isnan(rel) else f"{rel:.0%}",
        f"{m['max_sensitivity']:.3f}",
        f"{m['sensitivity_at_80_precision']:.3f}",
        f"{m['ap']:.3f}",
        f"{m['fp_per_case']:.2f}",
        f"{m['dice']:.3f}",
        f"{m['jaccard']:.3f}",
    ]


def format_table(rows: list[BenchmarkRow]) -> str:
    """A Markdown table in the papers' form (relative maximum sensitivity first)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def print_rich_table(rows: list[BenchmarkRow], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column in ("labels", "method") else "right")
    for row in rows:
        table.add_row(*_row_cells(row))
    Console(width=140).print(table)


def plot_sensitivity_by_size(rows: list[BenchmarkRow], path: Path) -> Path:
    """Grouped bars: lesion sensitivity per size bin, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.sensitivity_by_size]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    if rows:
        bins = [str(b.get("bin", i)) for i, b in enumerate(rows[0].sensitivity_by_size)]
        width = 0.8 / len(rows)
        for j, row in enumerate(rows):
            values = [float(b.get("sensitivity") or 0.0) for b in row.sensitivity_by_size]
            axis.bar(
                [i + j * width for i in range(len(values))],
                values,
                width,
                label=f"{row.label_set} / {row.method}",
            )
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(bins))], bins)
    axis.set_xlabel("lesion size bin")
    axis.set_ylabel("lesion sensitivity")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_rate_sweep(rows: list[BenchmarkRow], path: Path) -> Path | None:
    """Maximum sensitivity against the random-censoring rate, BCE vs lopsided."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.reweight != "none" or row.censor_mode not in (None, "random"):
            continue
        points.setdefault(row.method, []).append(
            (row.censor_rate or 0.0, row.metrics["max_sensitivity"])
        )
    if not any(len(p) > 2 for p in points.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for method, values in sorted(points.items()):
        values.sort()
        axis.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=method)
    axis.set_xlabel("random censoring rate (fraction of lesions removed)")
    axis.set_ylabel("maximum lesion sensitivity (test, truth)")
    axis.set_ylim(0, 1.05)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_clean_sizes(rows: list[BenchmarkRow], path: Path) -> Path | None:
    """Skin: Dice against clean-subset size for meta reweighting, with the BCE references."""
    meta = sorted(
        (r.clean_fraction or 0.0, r.metrics["dice"]) for r in rows if r.reweight == "meta"
    )
    if not meta:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot([m[0] for m in meta], [m[1] for m in meta], marker="o", label="meta reweighting")
    for row in rows:
        if row.reweight == "none":
            axis.axhline(
                row.metrics["dice"],
                linestyle="--",
                linewidth=1,
                label=f"{row.method} ({row.label_set})",
            )
    axis.set_xlabel("clean subset (fraction of training cases)")
    axis.set_ylabel("Dice (test, truth)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(
    benchmark: RobustnessBenchmark, rows: list[BenchmarkRow], output: str | Path | None
) -> dict[str, Any]:
    """JSON + Markdown + plots on disk, and a summary MLflow run holding them."""
    import mlflow

    s = benchmark.settings
    out_dir = benchmark.workdir / f"report-{s.kind}-{s.size}-{benchmark.stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "kind": s.kind,
        "size": s.size,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "store": benchmark.store_url,
        "tracking_uri": benchmark.tracking_uri,
        "rows": [asdict(r) for r in rows],
    }
    json_path = Path(output) if output else out_dir / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    (out_dir / "table.md").write_text(table + "\n")
    plots = [plot_sensitivity_by_size(rows, out_dir / "sensitivity_by_size.png")]
    if s.kind == "brain-mets":
        plots.append(plot_rate_sweep(rows, out_dir / "rate_sweep.png"))
    else:
        plots.append(plot_clean_sizes(rows, out_dir / "clean_sizes.png"))

    mlflow.set_tracking_uri(benchmark.tracking_uri)
    mlflow.set_experiment(benchmark.experiment)
    with mlflow.start_run(run_name=f"robustness-{s.kind}-{s.size}-{benchmark.stamp}") as run:
        document["summary_run_id"] = run.info.run_id
        json_path.write_text(json.dumps(document, indent=2, default=float))
        mlflow.set_tags({"noisyseg.benchmark": "robustness", "noisyseg.kind": s.kind})
        mlflow.log_params(
            {
                "kind": s.kind,
                "size": s.size,
                "cases": s.cases,
                "steps": s.steps,
                "entropy_weight": s.entropy_weight,
                "seed": s.seed,
            }
        )
        for row in rows:
            if row.relative_max_sensitivity is not None and math.isfinite(
                row.relative_max_sensitivity
            ):
                mlflow.log_metric(f"rel_max_sensitivity/{row.key}", row.relative_max_sensitivity)
            mlflow.log_metric(f"dice/{row.key}", row.metrics["dice"])
        mlflow.log_artifact(str(json_path), artifact_path=None)
        if json_path.name != "results.json":  # the summary run always holds results.json
            mlflow.log_text(json_path.read_text(), "results.json")
        mlflow.log_artifact(str(out_dir / "table.md"))
        for plot in plots:
            if plot is not None:
                mlflow.log_artifact(str(plot))
    document["json_path"] = str(json_path)
    document["table"] = table
    return document


def ui_command(tracking_uri: str) -> str:
    """The one command that opens the MLflow UI on this benchmark's runs.

    For the embedded SQLite default it names the ``mlflow`` executable of this very environment
    (``.venv/bin/mlflow`` after ``make demo``), so it works without activating the venv.
    """
    if tracking_uri.startswith("sqlite:"):
        import shutil
        import sys

        beside = Path(sys.executable).parent / "mlflow"
        mlflow_exe = str(beside) if beside.exists() else shutil.which("mlflow") or "mlflow"
        return f"{mlflow_exe} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
    return f"open {tracking_uri} in a browser"
