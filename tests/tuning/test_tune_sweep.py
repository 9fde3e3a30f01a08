"""``noisyseg tune`` end to end: a real Ray head, a real MLflow server, the CLI as a subprocess.

One Ray head (8 logical CPUs on this 2-core machine) and one MLflow server for the module, the
shared fixtures of conftest.py.

* A 2 x 2 grid over entropy_weight x output_prior (lopsided loss) with ASHA on ``train_loss``
  (min), built so ASHA must stop a trial: a report every 2 steps, grace period 2 steps,
  reduction factor 2, 12 steps (rungs at 2, 4, 8), two trials at a time. A trial reaching a rung
  is stopped when it is worse than the median of the trials recorded there before it. The
  output prior sets the loss's scale: p = 0.5 everywhere starts near 0.69 per voxel, p = 0.01
  near 0.25 on these stores, and 8 steps move it little. So a prior-0.5 trial that reaches a
  rung after a prior-0.01 one is stopped, and with two of each and two at a time one of them
  must. (The former grid, meta reweighting's weighted loss over clean fractions, stopped one
  trial in most runs and none in one CI run: a weighted loss has no predictable order.)
* An interrupted sweep of meta reweighting (the driver killed with SIGKILL mid-trial) resumed by
  re-running the same command, with one MLflow child run per trial; its best configuration
  keeps the reweighting and the clean fraction.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_utils import make_ball_store, ray_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
RAY_HEAD_CPUS = 8  # logical CPUs of the module's Ray head (conftest.py)

NOISYSEG = [sys.executable, "-m", "noisyseg.cli"]
STEPS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_head, mlflow_server):
    """The module's store, with the shared Ray head and MLflow server of conftest.py."""
    from noisyseg.storage.store import VolumeStore

    root = tmp_path_factory.mktemp("tune")
    store = make_ball_store(root / "s.zarr", train=6, val=1, size=16, seed=1)
    # five of six flagged clean: the meta sweep's clean_fraction 0.2 draws 3 of them (at least 3
    # are drawn when the store has them, DEFAULT_CLEAN_MIN_CASES)
    VolumeStore.open(store, mode="r+").set_clean([f"case{i:03d}" for i in range(5)])
    return {"root": root, "store": store, "head": ray_head, "server": mlflow_server}


def _env(cluster, **extra: str) -> dict[str, str]:
    return ray_env(
        RAY_ADDRESS=cluster["head"].address,
        MLFLOW_TRACKING_URI=cluster["server"].uri,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        **extra,
    )


def _command(cluster, name: str, *extra: str) -> list[str]:
    return [
        *NOISYSEG,
        "tune",
        "--name",
        name,
        "--store",
        cluster["store"],
        "--labels",
        "noisy",
        "--loss",
        "lopsided",
        "--channels",
        "4",
        "8",
        "--num-res-units",
        "1",
        "--patch-size",
        "16",
        "--batch-size",
        "1",
        "--steps",
        str(STEPS),
        "--val-cases",
        "1",
        "--log-interval",
        "2",
        "--storage-path",
        str(cluster["root"] / "sweeps"),
        "--experiment",
        f"exp-{name}",
        "--trial-cpus",
        "0.5",
        *extra,
    ]


def _client(cluster):
    from mlflow import MlflowClient

    return MlflowClient(cluster["server"].uri)


def _runs(cluster, name: str):
    client = _client(cluster)
    experiment = client.get_experiment_by_name(f"exp-{name}")
    if experiment is None:
        return client, None, []
    return client, experiment, client.search_runs([experiment.experiment_id], max_results=100)


def _best_config(cluster, name: str):
    """``noisyseg tune --best NAME``'s YAML, read back as a TrainConfig (so `train --config`
    accepts it)."""
    from noisyseg.distributed.config import make_config

    shown = subprocess.run(
        [*NOISYSEG, "tune", "--best", name, "--storage-path", str(cluster["root"] / "sweeps")],
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    return make_config(yaml.safe_load(shown.stdout))


def test_grid_sweep_logs_parent_children_best_and_asha_stops_early(cluster) -> None:
    command = _command(
        cluster,
        "grid",
        "--space",
        "entropy_weight=grid(0.05, 0.9)",
        "--space",
        "output_prior=grid(0.01, 0.5)",
        "--metric",
        "train_loss",
        "--metric-mode",
        "min",
        "--checkpoint-interval",
        "2",
        "--val-interval",
        "4",
        "--grace-period",
        "2",
        "--reduction-factor",
        "2",
        "--max-concurrent",
        "2",
    )
    done = subprocess.run(command, env=_env(cluster), capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    client, experiment, runs = _runs(cluster, "grid")
    parents = [r for r in runs if r.data.tags.get("noisyseg.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("noisyseg.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.entropy_weight"] == "grid(0.05, 0.9)"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["noisyseg.trial_id"] for c in children}) == 4
    points = {(c.data.params["entropy_weight"], c.data.params["output_prior"]) for c in children}
    assert points == {("0.05", "0.01"), ("0.05", "0.5"), ("0.9", "0.01"), ("0.9", "0.5")}
    for child in children:
        assert child.data.tags["noisyseg.sweep"] == "grid"
        assert child.data.params["loss"] == "lopsided" and child.data.params["reweight"] == "none"
        assert child.info.run_name == f"grid-{child.data.tags['noisyseg.trial_id']}"

    # metrics per step; ASHA stopped some trials: fewer steps, status KILLED, tag set
    last_step = {}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/loss")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, steps[-1] + 1))  # one value per step, none twice
        last_step[child.info.run_id] = steps[-1]
    stopped = [c for c in children if c.data.tags["noisyseg.early_stopped"] == "true"]
    completed = [c for c in children if c.data.tags["noisyseg.early_stopped"] == "false"]
    assert stopped, "ASHA stopped no trial"
    assert completed
    for child in completed:
        assert last_step[child.info.run_id] == STEPS and child.info.status == "FINISHED"
        val_steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/ap")]
        assert sorted(val_steps) == [4, 8, 12]
    for child in stopped:
        assert child.info.status == "KILLED"

    # the best trial: tagged on its child, best_* on the parent, and it is the lowest final loss
    best = [c for c in children if c.data.tags.get("noisyseg.best") == "true"]
    assert len(best) == 1
    final_loss = {
        c.info.run_id: [
            m for m in client.get_metric_history(c.info.run_id, "train/loss") if m.step == STEPS
        ][0].value
        for c in completed
    }
    assert best[0].info.run_id == min(final_loss, key=final_loss.get)
    assert parent.data.tags["best_run_id"] == best[0].info.run_id
    assert parent.data.tags["best_entropy_weight"] == best[0].data.params["entropy_weight"]
    assert "best_train_loss" in parent.data.metrics

    # summary artifact: table + plot
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {
        "summary/trials.csv",
        "summary/trials.md",
        "summary/metric_vs_search.png",
        "summary/best.yaml",
    } <= names
    local = client.download_artifacts(parent.info.run_id, "summary", str(cluster["root"] / "dl"))
    table = (Path(local) / "trials.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("trial_id,run_id,status,last_step")
    # Tune saw a stopped trial's reports end at a rung (2, 4 or 8). Its workers may still log a
    # step or two to MLflow before Tune's stop reaches them (reports are forwarded
    # asynchronously), so the reported step count is the one to compare.
    rows = list(csv.DictReader(table))
    reported = {r["run_id"]: int(r["last_step"]) for r in rows}
    assert {r["run_id"] for r in rows if r["status"] == "stopped early"} == {
        c.info.run_id for c in stopped
    }
    for child in stopped:
        assert reported[child.info.run_id] in (2, 4, 8)
    for child in completed:
        assert reported[child.info.run_id] == STEPS
    assert (Path(local) / "metric_vs_search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --best prints YAML that `noisyseg train --config` accepts
    config = _best_config(cluster, "grid")
    assert str(config.entropy_weight) == best[0].data.params["entropy_weight"]
    assert str(config.output_prior) == best[0].data.params["output_prior"]
    assert config.channels == (4, 8) and config.steps == STEPS


def test_killed_sweep_resumes_with_one_child_run_per_trial(cluster) -> None:
    name = "resume"
    command = _command(
        cluster,
        name,
        "--space",
        "entropy_weight=grid(0.1, 0.6)",
        "--space",
        "clean_fraction=choice(0.2)",
        "--reweight",
        "meta",
        "--scheduler",
        "fifo",
        "--val-interval",
        "4",
        "--max-concurrent",
        "1",
    )
    sweep_dir = cluster["root"] / "sweeps" / name
    log = open(cluster["root"] / "resume-first.log", "w")
    first = subprocess.Popen(
        command,
        env=_env(cluster, NOISYSEG_TEST_STEP_DELAY_S="1.0"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # wait until Tune saved its state and the first trial wrote a Train checkpoint
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            states = list(sweep_dir.glob("experiment_state-*.json"))
            checkpoints = list((sweep_dir / "train").glob("*/checkpoint_*/state.pt"))
            if states and checkpoints:
                break
            assert first.poll() is None, (cluster["root"] / "resume-first.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the sweep never checkpointed")
        time.sleep(3)  # let Tune's periodic experiment checkpoint catch the running trial
        os.kill(first.pid, signal.SIGKILL)  # the driver only; Ray cleans up its actors
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        log.close()
    state = json.loads((sweep_dir / "noisyseg_sweep.json").read_text())
    assert state["status"] == "running"
    time.sleep(5)

    done = subprocess.run(command, env=_env(cluster), capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "resuming sweep" in done.stdout

    client, _, runs = _runs(cluster, name)
    parents = [r for r in runs if r.data.tags.get("noisyseg.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("noisyseg.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.run_id == state["parent_run_id"]
    assert len(children) == 2
    assert len({c.data.tags["noisyseg.trial_id"] for c in children}) == 2
    assert {c.data.params["entropy_weight"] for c in children} == {"0.1", "0.6"}
    resumed_from = []
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert max(steps) == STEPS
        assert sorted(set(steps)) == list(range(1, STEPS + 1))
        val = [m.step for m in client.get_metric_history(child.info.run_id, "val/ap")]
        assert max(val) == STEPS
        resumed_from += [
            m.value for m in client.get_metric_history(child.info.run_id, "resumed_from_step")
        ]
    # the interrupted trial continued from its Train checkpoint instead of starting over
    assert resumed_from and all(v > 0 for v in resumed_from)
    assert json.loads((sweep_dir / "noisyseg_sweep.json").read_text())["status"] == "finished"

    # the best configuration keeps the sweep's fixed meta reweighting and its clean fraction
    config = _best_config(cluster, name)
    assert config.reweight == "meta" and config.clean_fraction == 0.2
    assert all(c.data.params["reweight"] == "meta" for c in children)
