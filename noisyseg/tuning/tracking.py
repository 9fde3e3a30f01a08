"""MLflow for sweeps: one parent run per sweep, one child run per trial, a summary artifact.

* Tracking URI (:func:`resolve_sweep_tracking`): ``MLFLOW_TRACKING_URI`` when set. Concurrent
  trials must log over HTTP to one server, so a ``sqlite:`` (or ``file:``) URI is refused unless
  ``max_concurrent == 1``. Without ``MLFLOW_TRACKING_URI`` the sweep starts its own
  ``mlflow server`` (:class:`LocalMlflowServer`: 127.0.0.1, free port, SQLite + artifacts under
  ``<sweep dir>/mlflow``, own process group) and stops it at the end; a resumed sweep starts a
  new one on the same database (a server left behind by a killed driver is stopped first).
* Parent run (:func:`open_parent_run`): created once; its id is kept in the sweep directory and
  re-used on resume. Tags ``noisyseg.sweep``, ``noisyseg.role=sweep``; params: the search space,
  metric, mode, scheduler settings.
* Child runs (:func:`find_or_create_child`): one per Tune trial, found by the tags
  ``mlflow.parentRunId`` + ``noisyseg.trial_id`` before one is created, so a restarted trial
  re-uses its run. Params: every config field of the trial (search point included).
* :func:`finish_sweep_runs`: terminal status of each child (``KILLED`` + tag
  ``noisyseg.early_stopped=true`` for trials the scheduler stopped), ``noisyseg.best=true`` on the
  best child, ``best_*`` tags and metric on the parent, and the summary (``summary/trials.csv``,
  ``summary/trials.md``, ``summary/metric_vs_search.png``) logged to the parent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisyseg.distributed.tracking import experiment_id_for
from noisyseg.errors import NoisysegInputError

SWEEP_TAG = "noisyseg.sweep"
TRIAL_TAG = "noisyseg.trial_id"
ROLE_TAG = "noisyseg.role"
BEST_TAG = "noisyseg.best"
EARLY_TAG = "noisyseg.early_stopped"
PARENT_TAG = "mlflow.parentRunId"
SERVER_FILE = "server.json"


# ---------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive_with(pid: int, marker: str) -> bool:
    try:
        cmdline = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return False
    return "mlflow" in cmdline and marker in cmdline


@dataclass
class LocalMlflowServer:
    """An ``mlflow server`` this process started, in its own process group."""

    uri: str
    process: subprocess.Popen
    root: Path

    @classmethod
    def start(cls, root: str | Path, *, timeout: float = 90.0) -> LocalMlflowServer:
        """Start ``mlflow server`` on SQLite ``<root>/mlflow.db``; wait for ``/health``."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        db = root / "mlflow.db"
        _stop_stale(root, str(db))
        port = _free_port()
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        command = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
        log = open(root / "server.log", "ab")
        process = subprocess.Popen(
            [
                *command,
                "server",
                "--backend-store-uri",
                f"sqlite:///{db}",
                "--artifacts-destination",
                str(root / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        (root / SERVER_FILE).write_text(json.dumps({"pid": process.pid, "port": port}))
        server = cls(f"http://127.0.0.1:{port}", process, root)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                server.stop()
                raise RuntimeError(
                    f"mlflow server exited with {process.returncode}; see {root / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return server
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"mlflow server did not answer within {timeout} s")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 10 s."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=5)
            except ProcessLookupError:
                pass
        (self.root / SERVER_FILE).unlink(missing_ok=True)


def _stop_stale(root: Path, db: str) -> None:
    """Stop a server a killed driver of this sweep left on the same database (one writer only)."""
    record = root / SERVER_FILE
    if not record.is_file():
        return
    try:
        pid = int(json.loads(record.read_text())["pid"])
    except (ValueError, KeyError, TypeError):
        record.unlink(missing_ok=True)
        return
    if _alive_with(pid, db):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive_with(pid, db) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive_with(pid, db):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    record.unlink(missing_ok=True)


def resolve_sweep_tracking(
    sweep_dir: str | Path, max_concurrent: int | None
) -> tuple[str, LocalMlflowServer | None]:
    """The tracking URI for a sweep, and the server started for it (``None``: not ours)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        local_file = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        if local_file and max_concurrent != 1:
            raise NoisysegInputError(
                f"MLFLOW_TRACKING_URI={uri} is a local file store: concurrent trials must log to "
                "an MLflow server over HTTP (start `mlflow server --backend-store-uri "
                f"{uri if uri.startswith('sqlite:') else 'sqlite:///mlflow.db'}` and point "
                "MLFLOW_TRACKING_URI at it), unset MLFLOW_TRACKING_URI to let the sweep start "
                "one, or pass --max-concurrent 1"
            )
        return uri, None
    server = LocalMlflowServer.start(Path(sweep_dir) / "mlflow")
    return server.uri, server


# ---------------------------------------------------------------------------------- runs
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def open_parent_run(
    uri: str,
    experiment: str,
    sweep: str,
    state_file: str | Path,
    params: dict[str, Any],
) -> tuple[str, str, bool]:
    """Create the sweep's parent run, or re-open the one recorded in ``state_file``.

    Returns ``(experiment_id, run_id, resumed)``.
    """
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    state_file = Path(state_file)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            _log_params(client, run_id, params)
            return run.info.experiment_id, run_id, True
    experiment_id = experiment_id_for(uri, experiment)
    run = client.create_run(
        experiment_id, run_name=sweep, tags={SWEEP_TAG: sweep, ROLE_TAG: "sweep"}
    )
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    state.update(parent_run_id=run_id, experiment_id=experiment_id, tracking_uri=uri)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file)
    return experiment_id, run_id, False


def find_child(uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run of ``trial_id`` under the parent, if one exists (oldest first)."""
    runs = _client(uri).search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return runs[0].info.run_id if runs else None


def find_or_create_child(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    sweep: str,
    trial_id: str,
    run_name: str,
    params: dict[str, str],
    point: dict[str, Any],
) -> str:
    """The trial's child run: re-used when it exists, else created with tags and params."""
    client = _client(uri)
    run_id = find_child(uri, experiment_id, parent_run_id, trial_id)
    if run_id is None:
        from noisyseg.distributed.tracking import RUN_NAME_TAG

        tags = {
            PARENT_TAG: parent_run_id,
            SWEEP_TAG: sweep,
            TRIAL_TAG: trial_id,
            ROLE_TAG: "trial",
            RUN_NAME_TAG: run_name,
            "noisyseg.search_point": json.dumps(point, sort_keys=True),
        }
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    _log_params(client, run_id, params)
    return run_id


def children(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every active child run of the parent."""
    return _client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
    )


# ---------------------------------------------------------------------------------- summary
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_summary(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    metric: str,
    mode: str,
    search_fields: Sequence[str],
) -> list[Path]:
    """Write ``trials.csv``, ``trials.md`` and ``metric_vs_search.png`` into ``out_dir``.

    ``rows``: one dict per trial with ``trial_id``, ``status``, ``last_step``, the search fields,
    ``metric_last``, ``metric_best`` and ``history`` (list of ``(step, value)``; plotted, not
    tabled). The plot's left panel is the final metric against the first searched field (
    ``entropy_weight`` when searched), one line per value of the second (``clean_fraction`` when
    searched); hollow markers are trials stopped early. The right panel is every trial's metric
    against the training step.
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [
        "trial_id",
        "run_id",
        "status",
        "last_step",
        *search_fields,
        f"{metric} (last)",
        f"{metric} ({mode})",
        "best",
    ]
    table = []
    for row in rows:
        table.append(
            [
                row.get("trial_id"),
                row.get("run_id"),
                row.get("status"),
                row.get("last_step"),
                *[row.get("point", {}).get(f) for f in search_fields],
                row.get("metric_last"),
                row.get("metric_best"),
                "yes" if row.get("best") else "",
            ]
        )
    csv_path = out / "trials.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[("" if v is None else v) for v in line] for line in table])
    md_path = out / "trials.md"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in table]
    md_path.write_text("\n".join(lines) + "\n")

    ordered = sorted(search_fields, key=lambda f: (f != "entropy_weight", f != "clean_fraction", f))
    x_field = ordered[0] if ordered else None
    group_field = ordered[1] if len(ordered) > 1 else None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        key = row.get("point", {}).get(group_field) if group_field else None
        groups.setdefault(key, []).append(row)
    for index, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        colour = f"C{index % 10}"
        points = [
            (r["point"].get(x_field), r.get("metric_last"), r.get("status"))
            for r in members
            if x_field
            and isinstance(r["point"].get(x_field), (int, float))
            and r.get("metric_last") is not None
        ]
        points.sort(key=lambda p: p[0])
        label = f"{group_field}={key}" if group_field else metric
        if points:
            left.plot(
                [p[0] for p in points], [p[1] for p in points], color=colour, alpha=0.5, label=label
            )
            for x, y, status in points:
                left.scatter(
                    [x],
                    [y],
                    color=colour,
                    facecolors="none" if status == "stopped early" else colour,
                    s=40,
                    zorder=3,
                )
    left.set_xlabel(x_field or "")
    left.set_ylabel(f"{metric} (last reported)")
    if x_field == "entropy_weight" or (
        x_field
        and all(
            isinstance(r["point"].get(x_field), (int, float)) and r["point"][x_field] > 0
            for r in rows
        )
        and len({r["point"].get(x_field) for r in rows}) > 2
    ):
        left.set_xscale("log")
    left.set_title("final metric vs search point (hollow: stopped early)", fontsize=9)
    if len(groups) > 1 or group_field:
        left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for index, row in enumerate(rows):
        history = row.get("history") or []
        if history:
            right.plot(
                [h[0] for h in history],
                [h[1] for h in history],
                marker=".",
                color=f"C{index % 10}",
                label=str(row.get("trial_id")),
            )
    right.set_xlabel("step")
    right.set_ylabel(metric)
    right.set_title("metric per report (one line per trial)", fontsize=9)
    right.legend(fontsize=6)
    right.grid(alpha=0.3)
    fig.tight_layout()
    png_path = out / "metric_vs_search.png"
    fig.savefig(png_path)
    plt.close(fig)
    return [csv_path, md_path, png_path]


def finish_sweep_runs(
    uri: str,
    parent_run_id: str,
    rows: Sequence[dict[str, Any]],
    summary_files: Sequence[Path],
    *,
    metric: str,
    sweep_status: str = "FINISHED",
) -> None:
    """Mark children (status, early stop, best), tag the parent with ``best_*``, log the summary."""
    from noisyseg.distributed.tracking import _safe_metric_name

    client = _client(uri)
    best = None
    for row in rows:
        run_id = row.get("run_id")
        if not run_id:
            continue
        status = {"completed": "FINISHED", "stopped early": "KILLED"}.get(row["status"], "FAILED")
        client.set_tag(run_id, EARLY_TAG, str(row["status"] == "stopped early").lower())
        client.set_tag(run_id, BEST_TAG, str(bool(row.get("best"))).lower())
        if client.get_run(run_id).info.status != status:
            client.set_terminated(run_id, status=status)
        if row.get("best"):
            best = row
    if best is not None:
        client.set_tag(parent_run_id, "best_trial_id", best["trial_id"])
        client.set_tag(parent_run_id, "best_run_id", best["run_id"])
        for key, value in best["point"].items():
            client.set_tag(parent_run_id, f"best_{key}", str(value))
        if best.get("metric_last") is not None:
            client.log_metric(
                parent_run_id, _safe_metric_name(f"best_{metric}"), float(best["metric_last"])
            )
    for path in summary_files:
        client.log_artifact(parent_run_id, str(path), artifact_path="summary")
    client.set_terminated(parent_run_id, status=sweep_status)
