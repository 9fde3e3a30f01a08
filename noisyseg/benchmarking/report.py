"""Robustness benchmark rows, their summary over seeds (mean and 95% t-interval) and tables.

Interval: for a row measured on ``n`` seeds with values ``x_1..x_n`` the cell shows
``mean ± h`` with ``h = t_{0.975, n-1} · s / sqrt(n)``, ``s`` the sample standard deviation
(``ddof = 1``) and ``t_{0.975, n-1}`` the Student-t quantile: the two-sided 95% confidence interval
of the mean, assuming the per-seed figures are independent and roughly normal. With 3 seeds
``t = 4.303``, so the interval is wide: it says how far apart two rows must be before the
difference is more than seed-to-seed spread. One seed gives no interval (the cell shows the
value alone). Seeds whose value is undefined (NaN, e.g. a relative figure whose baseline found
nothing) are left out and the number of seeds used is kept with the interval.

Relative maximum sensitivity is computed per seed (the row over the same seed's truth-trained BCE
baseline, both on that seed's phantoms), then summarised like any other figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from noisyseg.benchmarking.settings import seedless

#: Metrics every row carries (from :func:`noisyseg.metrics.lesion_metrics`).
ROW_METRICS: tuple[str, ...] = (
    "max_sensitivity",
    "fp_per_case_at_max_sensitivity",
    "froc_mean",
    "sensitivity",
    "sensitivity_at_80_precision",
    "ap",
    "precision",
    "fp_per_case",
    "dice",
    "jaccard",
)

CONFIDENCE = 0.95


# --------------------------------------------------------------------------------- the interval
@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` per-seed values and the half-width of its t-interval (NaN when ``n < 2``)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "half_width": self.half_width,
            "low": self.low,
            "high": self.high,
            "n": self.n,
        }


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Two-sided Student-t confidence interval of the mean of the finite ``values``.

    ``half_width = t_{(1+confidence)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof = 1``). ``n = 0``: mean NaN; ``n = 1``: half-width NaN.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    if n == 1:
        return Interval(float(x[0]), math.nan, 1)
    quantile = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1))
    return Interval(float(x.mean()), quantile * float(x.std(ddof=1)) / math.sqrt(n), n)


# ------------------------------------------------------------------------------------- the rows
@dataclass
class BenchmarkRow:
    """One trained and evaluated model of one seed (a row of the JSON output)."""

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
    seed: int = 0
    row_key: str = ""  # the key without the seed ("" -> key)
    froc: list[list[float]] = field(default_factory=list)  # [[fp_per_case, sensitivity], ...]
    clean_cases: int | None = None  # size of the clean subset the run used, when it used one
    #: threshold, candidate_threshold, min_iou, froc_fp_rates of the evaluation
    operating_point: dict[str, Any] = field(default_factory=dict)

    @property
    def table_key(self) -> str:
        return self.row_key or self.key


def relative_to_baseline(rows: list[BenchmarkRow], baseline_key: str) -> None:
    """Fill ``relative_max_sensitivity`` = max sensitivity / the same seed's baseline's.

    NaN where that baseline's maximum sensitivity is 0.

    Raises:
        ValueError: a seed of ``rows`` has no row keyed ``baseline_key``.
    """
    for seed in sorted({r.seed for r in rows}):
        same_seed = [r for r in rows if r.seed == seed]
        baseline = next((r for r in same_seed if r.key == baseline_key), None)
        if baseline is None:
            raise ValueError(f"no baseline row {baseline_key!r} for seed {seed}")
        reference = baseline.metrics["max_sensitivity"]
        for row in same_seed:
            value = row.metrics["max_sensitivity"]
            row.relative_max_sensitivity = value / reference if reference > 0 else math.nan


@dataclass
class RowSummary:
    """One table row: a variant over every seed it ran on."""

    row_key: str
    first: BenchmarkRow  # descriptive fields (label set, method, group) of the row
    seeds: list[int]
    stats: dict[str, Interval]

    @property
    def labels(self) -> str:
        return seedless(self.first.label_set)

    def as_dict(self) -> dict[str, Any]:
        first = self.first
        return {
            "row_key": self.row_key,
            "group": first.group,
            "label_set": self.labels,
            "method": first.method,
            "loss": first.loss,
            "reweight": first.reweight,
            "clean_fraction": first.clean_fraction,
            "train_subset": first.train_subset,
            "censor_mode": first.censor_mode,
            "censor_rate": first.censor_rate,
            "seeds": self.seeds,
            "metrics": {name: interval.as_dict() for name, interval in self.stats.items()},
        }


def summarize(rows: Sequence[BenchmarkRow]) -> list[RowSummary]:
    """Group rows by their seedless key (first-seen order) and take the t-interval per metric."""
    groups: dict[str, list[BenchmarkRow]] = {}
    for row in rows:
        groups.setdefault(row.table_key, []).append(row)
    summaries = []
    for key, members in groups.items():
        names = [m for m in ROW_METRICS if all(m in r.metrics for r in members)]
        figures = {name: t_interval([r.metrics[name] for r in members]) for name in names}
        relative = [r.relative_max_sensitivity for r in members]
        if any(v is not None for v in relative):
            figures["relative_max_sensitivity"] = t_interval(
                [math.nan if v is None else v for v in relative]
            )
        summaries.append(RowSummary(key, members[0], [r.seed for r in members], figures))
    return summaries


def rows_from_documents(
    documents: Sequence[dict[str, Any]],
) -> tuple[list[BenchmarkRow], list[BenchmarkRow]]:
    """The rows of several results JSONs of one setting (one run per seed, or per row group).

    A (seed, row) pair found in more than one document is kept from the first (e.g. the
    baseline, which every ``--only`` run trains again); the later copies are returned apart.

    Returns:
        ``(rows, dropped)``.

    Raises:
        ValueError: the documents are of different settings (kind, size).
    """
    settings = {(d.get("kind"), d.get("size")) for d in documents}
    if len(settings) != 1:
        raise ValueError(f"results of different settings cannot be merged: {sorted(settings)}")
    rows: list[BenchmarkRow] = []
    dropped: list[BenchmarkRow] = []
    seen: set[tuple[int, str]] = set()
    for row in (BenchmarkRow(**r) for d in documents for r in d["rows"]):
        (dropped if (row.seed, row.key) in seen else rows).append(row)
        seen.add((row.seed, row.key))
    return rows, dropped


# ---------------------------------------------------------------------------------- the tables
#: (column header, statistic, cell format): ``pct`` as a percentage, ``fN`` with N decimals.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rel. max sens.", "relative_max_sensitivity", "pct"),
    ("max sens.", "max_sensitivity", "f3"),
    ("FP/case @max sens.", "fp_per_case_at_max_sensitivity", "f2"),
    ("FROC mean", "froc_mean", "f3"),
    ("sens. @80% prec.", "sensitivity_at_80_precision", "f3"),
    ("AP", "ap", "f3"),
    ("FP/case @t", "fp_per_case", "f2"),
    ("Dice", "dice", "f3"),
    ("Jaccard", "jaccard", "f3"),
)
HEADERS: tuple[str, ...] = ("labels", "method", "seeds", *(c[0] for c in TABLE_COLUMNS))


def format_cell(interval: Interval | None, style: str) -> str:
    """``0.594 ± 0.050`` / ``97% ± 6%``; the value alone for one seed; ``n/a`` when undefined."""
    if interval is None or math.isnan(interval.mean):
        return "n/a"
    if style == "pct":
        text = f"{interval.mean:.0%}"
        return text if math.isnan(interval.half_width) else f"{text} ± {interval.half_width:.0%}"
    digits = int(style[1:])
    text = f"{interval.mean:.{digits}f}"
    if math.isnan(interval.half_width):
        return text
    return f"{text} ± {interval.half_width:.{digits}f}"


def _summary_cells(summary: RowSummary) -> list[str]:
    """One table row as text, in :data:`HEADERS` order (shared by Markdown and terminal)."""
    method = summary.first.method
    if summary.first.clean_cases is not None:
        method += f" [{summary.first.clean_cases} clean cases]"
    cells = [summary.labels, method, str(len(summary.seeds))]
    cells += [format_cell(summary.stats.get(stat), style) for _, stat, style in TABLE_COLUMNS]
    return cells


def format_table(rows: Sequence[BenchmarkRow]) -> str:
    """A Markdown table of the rows summarised over seeds (relative max sensitivity first)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_summary_cells(s)) + " |" for s in summarize(rows)]
    return "\n".join(lines)


def operating_point_note(evaluation: dict[str, Any], seeds: Sequence[int]) -> str:
    """The operating points and the interval the table's cells use, in one paragraph.

    ``evaluation``: ``threshold``, ``candidate_threshold``, ``min_iou`` and ``froc_fp_rates`` of
    the evaluation (:attr:`BenchmarkRow.operating_point`).
    """
    t = evaluation.get("threshold", 0.5)
    low = evaluation.get("candidate_threshold", t)
    iou = evaluation.get("min_iou")
    rule = (
        f"a candidate detects a truth lesion at IoU >= {iou:g}"
        if iou
        else "a candidate detects a truth lesion when it shares a voxel with it"
    )
    froc = evaluation.get("froc_fp_rates")
    rates = "/".join(f"{r:g}" for r in froc) if froc else "the FROC points'"
    n = len(seeds)
    interval = (
        f"mean ± half-width of the 95% t-interval over {n} seeds (t(0.975, {n - 1}) · s / √{n})"
        if n > 1
        else "one seed, no interval"
    )
    return (
        f"Operating points: candidates are the connected components of p >= {low:g}, each scored "
        f"by its max p; {rule}, further fragments of a detected lesion are neither TP nor FP. "
        f"'max sens.' and 'FP/case @max sens.' accept every candidate (p >= {low:g}); FROC mean "
        f"is the mean sensitivity at {rates} FP/case; sens. @80% prec. and AP come from the same "
        f"candidate ranking; 'FP/case @t', Dice and Jaccard are at threshold t = {t:g}. "
        f"Relative max sens. = max sens. / the same seed's truth-trained BCE baseline. "
        f"Cells: {interval}; seeds {', '.join(str(s) for s in seeds)}."
    )


def print_rich_table(rows: Sequence[BenchmarkRow], title: str, note: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=note or None)
    for column in HEADERS:
        table.add_column(column, justify="left" if column in ("labels", "method") else "right")
    for summary in summarize(rows):
        table.add_row(*_summary_cells(summary))
    Console(width=220).print(table)
