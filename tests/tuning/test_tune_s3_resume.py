"""Integration (issue 15, item 1): a sweep whose ``--storage-path`` is ``s3://`` resumes there.

A real Ray head, a real MLflow server and a real S3-compatible server (moto), the CLI as a
subprocess. The Ray head starts before the S3 server, so it (and every trial actor) lacks the
AWS_* variables: the sweep's storage must reach the trials through what the launcher hands them.

Two trials (a grid of two, FIFO, one at a time, 24 steps, a Train checkpoint every 4 steps, two
seconds per step in the first launch): the driver is SIGKILLed once Tune's experiment state and the
first trial's Train checkpoint are in the bucket, before that trial's last step (Tune uploads its
experiment state on its own sync period, so the trial must outlast a few of those: on a loaded
2-core machine 12 steps did not); the same command then resumes
the sweep from the bucket (``Tuner.restore`` through the pyarrow S3 filesystem) and the trial
continues from its checkpoint there. Nothing of the sweep is written locally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml
from cluster_utils import S3_BUCKET, ray_env
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
RAY_HEAD_CPUS = 4
NAME = "s3resume"
STEPS = 24
ROOT = f"s3://{S3_BUCKET}/sweeps"
NOISYSEG = [sys.executable, "-m", "noisyseg.cli"]


def _keys(prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def _command(store: str) -> list[str]:
    return [
        *NOISYSEG,
        *("tune", "--name", NAME, "--store", store, "--labels", "noisy"),
        *("--loss", "lopsided", "--channels", "4", "8", "--num-res-units", "0"),
        *("--patch-size", "16", "--batch-size", "1", "--steps", str(STEPS)),
        *("--val-cases", "1", "--val-interval", "4", "--log-interval", "2"),
        *("--space", "entropy_weight=grid(0.1, 0.6)", "--scheduler", "fifo"),
        *("--max-concurrent", "1", "--trial-cpus", "0.5", "--experiment", f"exp-{NAME}"),
        *("--storage-path", ROOT),
    ]


def _kill_after_first_checkpoint(command: list[str], env: dict[str, str], log: Path) -> list[str]:
    """Start the sweep; SIGKILL its driver once Tune's state and a Train checkpoint are in S3.

    Returns the Train checkpoints in the bucket when the driver was killed."""
    with open(log, "w") as out:
        first = subprocess.Popen(
            command,
            env={**env, "NOISYSEG_TEST_STEP_DELAY_S": "2.0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                keys = _keys(f"sweeps/{NAME}/")
                states = [k for k in keys if "/experiment_state-" in k]
                checkpoints = [k for k in keys if "/train/" in k and k.endswith("/state.pt")]
                if states and checkpoints:
                    break
                assert first.poll() is None, log.read_text()[-3000:]
                time.sleep(1)
            else:
                pytest.fail("the sweep never checkpointed to S3: " + log.read_text()[-3000:])
            time.sleep(1)  # the kill lands mid-step, between checkpoints
            checkpoints = [k for k in _keys(f"sweeps/{NAME}/train/") if k.endswith("/state.pt")]
            os.kill(first.pid, signal.SIGKILL)  # the driver only; Ray cleans up its actors
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGKILL)
    return checkpoints


def test_killed_sweep_on_s3_resumes_from_the_bucket(
    ray_head, mlflow_server, s3_server, ball_store: str, tmp_path: Path
) -> None:
    env = ray_env(
        RAY_ADDRESS=ray_head.address,
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )
    command = _command(ball_store)
    checkpoints = _kill_after_first_checkpoint(command, env, tmp_path / "first.log")
    assert checkpoints and not any(f"checkpoint_{STEPS:07d}/" in k for k in checkpoints)
    state = json.loads(
        boto3.client("s3")
        .get_object(Bucket=S3_BUCKET, Key=f"sweeps/{NAME}/noisyseg_sweep.json")["Body"]
        .read()
    )
    assert state["status"] == "running"
    time.sleep(5)

    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "resuming sweep" in done.stdout and f"in {ROOT}/{NAME}" in done.stdout

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(f"exp-{NAME}")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("noisyseg.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("noisyseg.role") == "trial"]
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2
    assert parents[0].info.run_id == state["parent_run_id"]
    assert all(r.info.status == "FINISHED" for r in runs)  # no RUNNING run left behind
    resumed_from = []
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, STEPS + 1))  # every step once: none run twice
        resumed_from += [
            m.value for m in client.get_metric_history(child.info.run_id, "resumed_from_step")
        ]
    assert resumed_from and all(0 < v < STEPS for v in resumed_from)  # mid-trial, from S3

    keys = set(_keys(f"sweeps/{NAME}/"))
    assert {f"sweeps/{NAME}/best.yaml", f"sweeps/{NAME}/summary/trials.csv"} <= keys
    final = json.loads(
        boto3.client("s3")
        .get_object(Bucket=S3_BUCKET, Key=f"sweeps/{NAME}/noisyseg_sweep.json")["Body"]
        .read()
    )
    assert final["status"] == "finished"
    assert not list(tmp_path.glob("s3*"))  # the URL was never taken for a local path

    shown = subprocess.run(
        [*NOISYSEG, "tune", "--best", f"{ROOT}/{NAME}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["steps"] == STEPS
