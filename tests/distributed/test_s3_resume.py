"""Integration (issue 15, item 1): ``noisyseg train --storage-path s3://...`` resumes by run name.

A real Ray head (``ray_head``), a real MLflow server (``mlflow_server``) and a real S3-compatible
server (moto, ``s3_server``). The launcher finds the S3 endpoint and keys in the standard AWS_*
environment; the Ray head does not have them: the storage filesystem handed to Ray carries them.

Launch 1 trains 4 steps (checkpoints 2 and 4 in the bucket); launch 2, the same command with
``--steps 6``, resumes from step 4 in the same MLflow run, which ends FINISHED with every step
logged once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import boto3
import pytest
from cluster_utils import S3_BUCKET, VENV_BIN, ray_env
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RAY_HEAD_CPUS = 2
RUN = "s3run"


def _train(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "noisyseg"), "train", *args],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def _checkpoint_steps() -> list[int]:
    listing = boto3.client("s3").list_objects_v2(Bucket=S3_BUCKET, Prefix=f"results/{RUN}/")
    keys = [item["Key"] for item in listing.get("Contents", [])]
    return sorted(int(key.split("/")[2].split("_")[1]) for key in keys if key.endswith("/state.pt"))


def test_relaunch_on_s3_resumes_in_the_same_mlflow_run(
    ray_head, mlflow_server, s3_server, ball_store: str, tmp_path: Path
) -> None:
    env = ray_env(RAY_ADDRESS=ray_head.address, MLFLOW_TRACKING_URI=mlflow_server.uri)
    base = [
        "--store",
        ball_store,
        "--labels",
        "noisy",
        "--loss",
        "bce",
        "--patch-size",
        "16",
        "--batch-size",
        "1",
        "--channels",
        "4",
        "8",
        "--num-res-units",
        "0",
        "--workers",
        "1",
        "--val-cases",
        "0",
        "--log-interval",
        "1",
        "--checkpoint-interval",
        "2",
        "--experiment",
        "s3itest",
        "--run-name",
        RUN,
        "--storage-path",
        f"s3://{S3_BUCKET}/results",
    ]
    first = _train([*base, "--steps", "4"], env, tmp_path)
    assert f"run {RUN!r} starting; checkpoints in s3://{S3_BUCKET}/results/{RUN}" in first
    assert _checkpoint_steps() == [2, 4]
    assert not (tmp_path / "s3:").exists()  # the URL was not taken for a local path

    second = _train([*base, "--steps", "6"], env, tmp_path)
    assert f"run {RUN!r} resuming from step 4" in second
    assert _checkpoint_steps()[-1] == 6

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("s3itest")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, continued
    run_id = run.info.run_id
    assert f"MLflow run id: {run_id}" in first and f"MLflow run id: {run_id}" in second
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == [1, 2, 3, 4, 5, 6]
    resumed = [(m.step, m.value) for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert resumed == [(4, 4.0)]
    assert run.info.status == "FINISHED"
