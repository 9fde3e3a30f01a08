"""What a sweep leaves behind: one row per trial, the best trial, tables, a plot, MLflow tags.

* :func:`trial_rows`: one row per Tune trial from the sweep's saved experiment state (Ray's public
  :class:`ray.tune.ExperimentAnalysis`): status (``completed``, ``stopped early`` by ASHA,
  ``error``, ``unfinished``), last step, search point, the metric's history.
* :func:`pick_best` and :func:`best_config_yaml`: the best completed trial and its full
  TrainConfig as YAML for ``noisyseg train --config``.
* :func:`write_summary`: ``trials.csv``, ``trials.md`` and ``metric_vs_search.png``.
* :func:`finish_sweep_runs`: terminal status of each child run (``KILLED`` + tag
  ``noisyseg.early_stopped=true`` for trials the scheduler stopped), ``noisyseg.best=true`` on the
  best child, ``best_*`` tags and metric on the parent, the summary files logged to the parent.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mlflow import MlflowClient

from noisyseg.distributed.config import make_config
from noisyseg.distributed.tracking import (
    BEST_TAG,
    EARLY_TAG,
    find_child,
    finish_run,
    safe_metric_name,
)

#: Row status -> MLflow status of the trial's child run.
_RUN_STATUS = {
    "completed": "FINISHED",
    "stopped early": "KILLED",
    "unfinished": "KILLED",
    "error": "FAILED",
}


# ---------------------------------------------------------------------------------- rows
def _history(frame: Any, metric: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every report of ``metric`` in a trial's progress dataframe."""
    if frame is None or metric not in frame or "step" not in frame:
        return []
    out = []
    for step, value in zip(frame["step"], frame[metric]):
        if value is not None and math.isfinite(float(value)) and step == step:
            out.append((int(step), float(value)))
    return out


def _row_status(trial_status: str, errored: bool, last_step: int, steps: int) -> str:
    if errored or trial_status == "ERROR":
        return "error"
    if trial_status != "TERMINATED":
        return "unfinished"  # the sweep was interrupted (Ctrl-C) before the trial ended
    return "completed" if last_step >= steps else "stopped early"  # ASHA stopped it at a rung


def trial_rows(
    experiment_path: str,
    *,
    metric: str,
    mode: str,
    search_fields: Sequence[str],
    steps: int,
    tracking: tuple[str, str, str] | None = None,
    storage_filesystem: Any = None,
) -> list[dict[str, Any]]:
    """One row per trial of the Tune experiment saved at ``experiment_path``.

    ``storage_filesystem``: the pyarrow filesystem ``experiment_path`` is on (object storage:
    the prefix-stripped path and its filesystem); ``None`` for a local folder.

    Rows (sorted by trial id): ``trial_id``, ``run_id`` (its MLflow child run, found through
    ``tracking = (uri, experiment_id, parent_run_id)``; ``None`` without), ``status``,
    ``last_step``, ``point`` (the search fields), ``metric_last``, ``metric_best``, ``history``
    (``[(step, value)]``), ``error`` (first line of the trial's error, else ``None``), ``best``.
    """
    from ray.tune import ExperimentAnalysis  # Ray loads only where a sweep is summarised

    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=storage_filesystem)
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        history = _history(frames.get(trial.trial_id), metric)
        values = [v for _, v in history]
        error = _first_error_line(trial)
        last_step = int(last.get("step") or 0)
        run_id = find_child(*tracking, str(trial.trial_id)) if tracking else None
        rows.append(
            {
                "trial_id": str(trial.trial_id),
                "run_id": run_id,
                "status": _row_status(trial.status, error is not None, last_step, steps),
                "last_step": last_step,
                "point": {k: trial.config.get(k) for k in search_fields},
                "metric_last": values[-1] if values else None,
                "metric_best": ((max if mode == "max" else min)(values) if values else None),
                "history": history,
                "error": error,
                "best": False,
            }
        )
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _first_error_line(trial: Any) -> str | None:
    """The last line of a failed trial's error (the exception), ``None`` when it did not fail."""
    if trial.status != "ERROR":
        return None
    text = ""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    else:  # not staged on this machine (object storage): read it from the trial's storage
        error = trial.get_error()
        text = str(error) if error is not None else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "the trial failed (no error file)"


def pick_best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """Best final metric among completed trials (trials ASHA stopped lost at a rung); among all
    trials with a value when none completed."""
    pool = [r for r in rows if r["status"] == "completed" and r["metric_last"] is not None]
    pool = pool or [r for r in rows if r["metric_last"] is not None]
    if not pool:
        return None
    chooser = max if mode == "max" else min
    return chooser(pool, key=lambda r: r["metric_last"])


def best_config_yaml(base: dict[str, Any], best: dict[str, Any], *, sweep: str, metric: str) -> str:
    """The best trial's full TrainConfig as YAML (validated by loading it back)."""
    config = make_config({**base, **best["point"]})
    data = config.model_dump(mode="json", exclude={"run_name"})
    if data.get("storage_path") is None:
        data.pop("storage_path", None)
    text = (
        f"# best trial {best['trial_id']} of sweep {sweep}: {metric} = {best['metric_last']} "
        f"(MLflow run {best['run_id']})\n"
        "# use: noisyseg train --config best.yaml --run-name NAME\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    make_config(yaml.safe_load(text))  # round trip: what we print must load
    return text


# ---------------------------------------------------------------------------------- files
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(
    rows: Sequence[dict[str, Any]], metric: str, mode: str, search_fields: Sequence[str]
) -> tuple[list[str], list[list[Any]]]:
    columns = [
        "trial_id",
        "run_id",
        "status",
        "last_step",
        *search_fields,
        f"{metric} (last)",
        f"{metric} ({mode})",
        "best",
        "error",
    ]
    table = [
        [
            row.get("trial_id"),
            row.get("run_id"),
            row.get("status"),
            row.get("last_step"),
            *[row.get("point", {}).get(f) for f in search_fields],
            row.get("metric_last"),
            row.get("metric_best"),
            "yes" if row.get("best") else "",
            row.get("error"),
        ]
        for row in rows
    ]
    return columns, table


def _plot_final_vs_point(
    ax: Axes, rows: Sequence[dict[str, Any]], metric: str, search_fields: Sequence[str]
) -> None:
    """Final metric against the first searched field (``entropy_weight`` when searched), one
    line per value of the second (``clean_fraction`` when searched); hollow: stopped early."""
    ordered = sorted(search_fields, key=lambda f: (f != "entropy_weight", f != "clean_fraction", f))
    x_field = ordered[0] if ordered else None
    group_field = ordered[1] if len(ordered) > 1 else None
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["point"].get(group_field) if group_field else None, []).append(row)
    for index, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        colour = f"C{index % 10}"
        points = sorted(
            (r["point"].get(x_field), r["metric_last"], r["status"])
            for r in members
            if x_field
            and isinstance(r["point"].get(x_field), (int, float))
            and r.get("metric_last") is not None
        )
        if not points:
            continue
        label = f"{group_field}={key}" if group_field else metric
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], color=colour, alpha=0.5, label=label
        )
        for x, y, status in points:
            face = "none" if status == "stopped early" else colour
            ax.scatter([x], [y], color=colour, facecolors=face, s=40, zorder=3)
    xs = [r["point"].get(x_field) for r in rows] if x_field else []
    numeric_positive = xs and all(isinstance(x, (int, float)) and x > 0 for x in xs)
    if x_field == "entropy_weight" or (numeric_positive and len(set(xs)) > 2):
        ax.set_xscale("log")
    ax.set_xlabel(x_field or "")
    ax.set_ylabel(f"{metric} (last reported)")
    ax.set_title("final metric vs search point (hollow: stopped early)", fontsize=9)
    if group_field:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_histories(ax: Axes, rows: Sequence[dict[str, Any]], metric: str) -> None:
    """Every trial's metric against the training step, one line per trial."""
    for index, row in enumerate(rows):
        history = row.get("history") or []
        if history:
            ax.plot(
                [h[0] for h in history],
                [h[1] for h in history],
                marker=".",
                color=f"C{index % 10}",
                label=str(row.get("trial_id")),
            )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("metric per report (one line per trial)", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def write_summary(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    metric: str,
    mode: str,
    search_fields: Sequence[str],
) -> list[Path]:
    """Write ``trials.csv``, ``trials.md`` and ``metric_vs_search.png`` into ``out_dir``.

    ``rows`` as from :func:`trial_rows` (``history`` is plotted, not tabled). Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns, table = _table(rows, metric, mode, search_fields)
    csv_path = out / "trials.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[("" if v is None else v) for v in line] for line in table])
    md_path = out / "trials.md"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in table]
    md_path.write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(10, 4), dpi=100)
    left, right = fig.subplots(1, 2)
    _plot_final_vs_point(left, rows, metric, search_fields)
    _plot_histories(right, rows, metric)
    fig.tight_layout()
    png_path = out / "metric_vs_search.png"
    fig.savefig(png_path)
    return [csv_path, md_path, png_path]


# ---------------------------------------------------------------------------------- MLflow
def finish_sweep_runs(
    uri: str,
    parent_run_id: str,
    rows: Sequence[dict[str, Any]],
    summary_files: Sequence[Path],
    *,
    metric: str,
    sweep_status: str = "FINISHED",
    reason: str | None = None,
) -> None:
    """Mark children (status, early stop, best), tag the parent with ``best_*``, log the summary
    files to the parent under ``summary/`` and end the parent with ``sweep_status``."""
    client = MlflowClient(uri)
    best = None
    for row in rows:
        run_id = row.get("run_id")
        if not run_id:
            continue
        status = _RUN_STATUS.get(row["status"], "FAILED")
        client.set_tag(run_id, EARLY_TAG, str(row["status"] == "stopped early").lower())
        client.set_tag(run_id, BEST_TAG, str(bool(row.get("best"))).lower())
        if client.get_run(run_id).info.status != status:
            finish_run(uri, run_id, status, reason=row.get("error") or row["status"])
        if row.get("best"):
            best = row
    if best is not None:
        client.set_tag(parent_run_id, "best_trial_id", best["trial_id"])
        client.set_tag(parent_run_id, "best_run_id", best["run_id"])
        for key, value in best["point"].items():
            client.set_tag(parent_run_id, f"best_{key}", str(value))
        if best.get("metric_last") is not None:
            client.log_metric(
                parent_run_id, safe_metric_name(f"best_{metric}"), float(best["metric_last"])
            )
    for path in summary_files:
        client.log_artifact(parent_run_id, str(path), artifact_path="summary")
    finish_run(uri, parent_run_id, sweep_status, reason=reason)
