"""Robustness benchmark figures (PNG): sensitivity by lesion size, censoring-rate sweep, clean sizes.

Every figure is drawn from the rows of all seeds: points are means over seeds with the 95%
t-interval as error bars (:func:`noisyseg.benchmarking.report.t_interval`); the size breakdown
pools the lesions of every seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)

from noisyseg.benchmarking.report import BenchmarkRow, RowSummary, summarize  # noqa: E402


def _pooled_by_size(rows: list[BenchmarkRow]) -> tuple[list[str], list[float]]:
    """Bins and sensitivity per bin, lesions of every seed pooled (detected / count)."""
    bins: list[str] = []
    detected: list[int] = []
    counts: list[int] = []
    for row in rows:
        for i, entry in enumerate(row.sensitivity_by_size):
            if i == len(bins):
                bins.append(str(entry.get("bin", i)))
                detected.append(0)
                counts.append(0)
            detected[i] += int(entry.get("detected") or 0)
            counts[i] += int(entry.get("count") or 0)
    return bins, [d / c if c else 0.0 for d, c in zip(detected, counts, strict=True)]


def plot_sensitivity_by_size(rows: list[BenchmarkRow], path: Path) -> Path:
    """Grouped bars: lesion sensitivity at t per size bin, one bar per table row."""
    groups: dict[str, list[BenchmarkRow]] = {}
    for row in rows:
        if row.sensitivity_by_size:
            groups.setdefault(row.table_key, []).append(row)
    figure, axis = plt.subplots(figsize=(10, 4.5))
    if groups:
        width = 0.8 / len(groups)
        bins: list[str] = []
        for j, members in enumerate(groups.values()):
            bins, values = _pooled_by_size(members)
            axis.bar(
                [i + j * width for i in range(len(values))],
                values,
                width,
                label=f"{members[0].label_set} / {members[0].method}",
            )
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(bins))], bins)
    axis.set_xlabel("lesion size bin (mm³)")
    axis.set_ylabel("lesion sensitivity at t (seeds pooled)")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _errorbar(axis: Any, points: list[tuple[float, RowSummary]], stat: str, label: str) -> None:
    points.sort(key=lambda p: p[0])
    means = [s.stats[stat].mean for _, s in points]
    errors = [s.stats[stat].half_width for _, s in points]
    errors = [0.0 if e != e else e for e in errors]  # NaN (one seed): no bar
    axis.errorbar([x for x, _ in points], means, yerr=errors, marker="o", capsize=3, label=label)


def plot_rate_sweep(rows: list[BenchmarkRow], path: Path) -> Path | None:
    """Maximum sensitivity against the random-censoring rate, BCE vs lopsided (no reweighting)."""
    points: dict[str, list[tuple[float, RowSummary]]] = {}
    for summary in summarize(rows):
        row = summary.first
        if row.reweight != "none" or row.train_subset != "all":
            continue
        if row.censor_mode not in (None, "random"):
            continue
        points.setdefault(row.method, []).append((row.censor_rate or 0.0, summary))
    if not any(len(p) > 2 for p in points.values()):
        return None
    figure, axis = plt.subplots(figsize=(5, 4))
    for method, values in sorted(points.items()):
        _errorbar(axis, values, "max_sensitivity", method)
    axis.set_xlabel("random censoring rate (fraction of lesions removed)")
    axis.set_ylabel("maximum lesion sensitivity (test, truth)")
    axis.set_ylim(0, 1.05)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_clean_sizes(rows: list[BenchmarkRow], path: Path) -> Path | None:
    """Dice against clean-subset size for meta reweighting, with the other rows as lines."""
    summaries = summarize(rows)
    meta = [(s.first.clean_fraction or 0.0, s) for s in summaries if s.first.reweight == "meta"]
    meta_bce = [p for p in meta if p[1].first.loss == "bce"]
    if not meta_bce:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    _errorbar(axis, meta_bce, "dice", "meta reweighting (BCE)")
    for summary in summaries:
        if summary.first.reweight == "meta" and summary.first.loss == "bce":
            continue
        axis.axhline(
            summary.stats["dice"].mean,
            linestyle="--",
            linewidth=1,
            label=f"{summary.first.method} ({summary.labels})",
        )
    axis.set_xlabel("clean subset (fraction of training cases)")
    axis.set_ylabel("Dice (test, truth)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
