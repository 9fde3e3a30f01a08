"""A sweep on the two-node local cluster survives the loss of its worker node (issue 15, item 1).

``deploy/local-cluster.sh up --object-store --head-cpus 0``: an S3-compatible server (moto), MLflow
(artifacts in the bucket) and two Ray nodes; the head offers no CPU (as a KubeRay head usually
does), so the job's driver runs on the head (``--entrypoint-num-cpus 0``) and every trial, with
its Train worker, runs on the worker node. The phantom store (2D skin phantoms: the cheapest to
train and validate) and the sweep live in the bucket.

``ray job submit`` runs ``noisyseg tune --trial-max-failures 2 --storage-path s3://...``: two trials
at once (a grid of two, FIFO), a Train checkpoint every ``VAL_INTERVAL`` steps, steps slowed by
``NOISYSEG_TEST_STEP_DELAY_S`` (the job's runtime env, so every trial actor has it). Once both
trials' Train workers run on the worker node and both have a checkpoint in the bucket, the test
SIGKILLs the worker node's process group and whatever it started (``kill-worker``: a lost
machine), then starts the node again (``restart-worker``). Tune sees the trials' actors die and
restarts each trial (``FailureConfig(max_failures=2)``) once the node is back; a restarted trial
keeps its trial id, so its Train run name points Ray Train at its checkpoints in the bucket and
it resumes from there. The one job then succeeds, with no re-submission.

The alternative, ``--trial-max-failures 0`` (the default, Ray's own): the trials fail, the job
ends with a failed sweep, and re-submitting the same command resumes it from the bucket
(``Tuner.restore(..., restart_errored=True)``; tests/tuning/test_tune_s3_resume.py covers the
re-launch). Restarting in place is what a Ray user expects of ``FailureConfig``.

Checked: the job succeeded; MLflow (the cluster's server) holds exactly one parent and two
children, all FINISHED (none RUNNING); each child logged every ``train/loss`` step once and
``resumed_from_step`` strictly between 0 and ``STEPS`` (both trials resumed mid-run from S3: none
ran twice from zero); Tune's record of each trial counts the failure; the state API shows the
trials' Train workers on the *new* worker node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_utils import local_cluster_env, read_env_file

from noisyseg.cli import build_parser
from noisyseg.distributed.run_storage import RunLocation
from noisyseg.errors import NoisysegInputError
from noisyseg.tuning.commands import settings_from_args
from noisyseg.tuning.plan import SweepSettings, _check_options
from noisyseg.tuning.space import parse_space
from noisyseg.tuning.sweep import run_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-cluster.sh"
VENV_BIN = Path(sys.executable).parent
BUCKET = "noisyseg"
NAME = "nodeloss"
STEPS = 16
VAL_INTERVAL = 4
STEP_DELAY_S = "1.0"
WORKER_CPUS = 4  # two trials x (0.5 trial actor + 1 Train worker), and slack


# ---------------------------------------------------------------------------------- fast checks
def test_trial_max_failures_reaches_tunes_failure_config() -> None:
    args = build_parser().parse_args(
        ["tune", "--name", "s", "--store", "/x.zarr", "--trial-max-failures", "2"]
    )
    settings = settings_from_args(args)
    assert settings.trial_max_failures == 2
    config = run_config(settings, RunLocation.resolve("/tmp/sweeps/s"))
    assert config.failure_config.max_failures == 2
    default = settings_from_args(build_parser().parse_args(["tune", "--name", "s"]))
    assert default.trial_max_failures == 0  # Ray's default: a failed trial stays failed
    assert (
        run_config(default, RunLocation.resolve("/tmp/sweeps/s")).failure_config.max_failures == 0
    )


def test_trial_max_failures_below_minus_one_is_refused() -> None:
    settings = SweepSettings(name="s", base={}, space=parse_space([]), trial_max_failures=-2)
    with pytest.raises(NoisysegInputError, match="--trial-max-failures must be >= -1"):
        _check_options(settings)


# ---------------------------------------------------------------------------------- integration
def _script_env() -> dict[str, str]:
    env = local_cluster_env()
    # the script's wait for each service (default 90 s): a loaded 2-core machine needs more
    env.setdefault("STARTUP_TIMEOUT", "300")
    return env


def _script(root: Path, verb: str, *args: str, timeout: float = 300):
    return subprocess.run(
        ["bash", str(SCRIPT), verb, "--dir", str(root), *args],
        env=_script_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cluster(tmp_path: Path):
    """``up --object-store --head-cpus 0``; retried (twice) when a node misses Ray's own 30 s
    start-up deadline on a loaded machine. Always ``down`` at the end."""
    root = tmp_path / "cluster"
    started = time.monotonic()
    for attempt in (1, 2, 3):
        up = _script(root, "up", "--object-store", "--head-cpus", "0", "--worker-cpus",
                     str(WORKER_CPUS), timeout=600)  # fmt: skip
        if up.returncode == 0:
            break
        _script(root, "down", timeout=120)
        print(f"up attempt {attempt} failed: {up.stderr[-300:]}")
        if attempt == 3:
            pytest.fail(f"local-cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    print(f"local cluster up in {time.monotonic() - started:.1f} s")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield root
    finally:
        down = _script(root, "down", timeout=180)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        assert down.returncode == 0, down.stdout + down.stderr


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def _keys(s3, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def _checkpointed_runs(s3) -> dict[str, list[int]]:
    """Train run name -> the steps of its checkpoints in the bucket."""
    runs: dict[str, list[int]] = {}
    for key in _keys(s3, f"sweeps/{NAME}/train/"):
        parts = key.split("/")  # sweeps/NAME/train/RUN/checkpoint_0000004/state.pt
        if key.endswith("/state.pt") and parts[4].startswith("checkpoint_"):
            runs.setdefault(parts[3], []).append(int(parts[4].removeprefix("checkpoint_")))
    return runs


def _train_workers(dashboard: str) -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=dashboard,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )


def _node2_ids(dashboard: str, state: str = "ALIVE") -> set[str]:
    from ray.util.state import list_nodes

    return {
        n.node_id
        for n in list_nodes(address=dashboard, detail=True)
        if "node2" in n.resources_total and n.state == state
    }


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_sweep_survives_the_loss_of_its_worker_node(cluster: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    started = time.monotonic()
    env = read_env_file(cluster / "cluster.env")
    dashboard, tracking_uri, bucket = (
        env["RAY_ADDRESS"],
        env["MLFLOW_TRACKING_URI"],
        env["NOISYSEG_BUCKET"],
    )
    client_env = {**_script_env(), **env}
    s3 = _s3(env)

    store = f"{bucket}/phantoms.zarr"
    synth = subprocess.run(
        [str(VENV_BIN / "noisyseg"), "synth", store, "--kind", "skin", "--cases", "3",
         "--seed", "0", "--val-fraction", "0.34", "--test-fraction", "0", "--no-progress"],
        env=client_env, cwd=cluster, check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert synth.returncode == 0, synth.stdout + synth.stderr
    assert _keys(s3, "phantoms.zarr/") and not (cluster / "s3:").exists()

    root = f"{bucket}/sweeps"
    entrypoint = [
        *("noisyseg", "tune", "--name", NAME, "--store", store, "--labels", "truth"),
        *("--loss", "lopsided", "--channels", "4", "8", "--num-res-units", "0"),
        *("--patch-size", "16", "--batch-size", "1", "--steps", str(STEPS)),
        *("--val-cases", "1", "--val-interval", str(VAL_INTERVAL), "--log-interval", "2"),
        *("--space", "entropy_weight=grid(0.1,0.6)", "--scheduler", "fifo"),
        *("--max-concurrent", "2", "--trial-cpus", "0.5", "--cpus-per-worker", "1"),
        *("--trial-max-failures", "2", "--experiment", f"exp-{NAME}", "--storage-path", root),
    ]
    runtime_env = {"env_vars": {"NOISYSEG_TEST_STEP_DELAY_S": STEP_DELAY_S}}
    command = [
        *(str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard, "--no-wait"),
        *("--entrypoint-num-cpus", "0", "--runtime-env-json", json.dumps(runtime_env)),
        *("--", *entrypoint),
    ]
    deadline = time.monotonic() + 60
    while True:  # the dashboard answers a moment before its job agent registers
        submitted = subprocess.run(
            command, env=client_env, check=False, capture_output=True, text=True, timeout=120
        )
        output = submitted.stdout + submitted.stderr
        if "No available agent" not in output or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, output
    job_id = next(
        word.strip("'")
        for line in output.splitlines()
        if "submitted successfully" in line
        for word in line.split()
        if word.strip("'").startswith("raysubmit_")
    )
    jobs = JobSubmissionClient(dashboard)
    print(f"job {job_id} submitted {time.monotonic() - started:.0f} s in")
    try:
        _kill_and_check(cluster, jobs, job_id, dashboard, tracking_uri, s3, started)
    finally:  # the job's log, kept by pytest's tmp_path
        (cluster.parent / "job.log").write_text(jobs.get_job_logs(job_id))


def _kill_and_check(
    cluster: Path, jobs, job_id: str, dashboard: str, tracking_uri: str, s3, started: float
) -> None:
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus

    def job_failed_message() -> str:
        return f"job {jobs.get_job_status(job_id)}:\n" + jobs.get_job_logs(job_id)[-6000:]

    # Both trials train on the worker node and have a checkpoint in the bucket: kill the node.
    old_node = _node2_ids(dashboard)
    assert len(old_node) == 1
    deadline = time.monotonic() + 300
    while True:
        assert not jobs.get_job_status(job_id).is_terminal(), job_failed_message()
        checkpointed = _checkpointed_runs(s3)
        workers = _train_workers(dashboard)
        if len(checkpointed) == 2 and len(workers) == 2:
            break
        assert time.monotonic() < deadline, f"{checkpointed} {workers}\n" + job_failed_message()
        time.sleep(1)
    assert {w.node_id for w in workers} == old_node  # the trials' Train workers run on node2
    assert all(max(steps) < STEPS for steps in checkpointed.values()), checkpointed
    killed = _script(cluster, "kill-worker", timeout=180)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    at_kill = _checkpointed_runs(s3)
    assert all(max(steps) < STEPS for steps in at_kill.values()), at_kill  # killed mid-run
    print(f"worker node killed {time.monotonic() - started:.0f} s in; checkpoints {at_kill}")
    assert _node2_ids(dashboard, "DEAD") == old_node
    for attempt in (1, 2, 3):  # `ray start` gives up after 30 s when the GCS answers slowly
        restarted = _script(cluster, "restart-worker", timeout=300)
        if restarted.returncode == 0:
            break
        print(f"restart-worker attempt {attempt} failed: {restarted.stderr[-300:]}")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    print(f"worker node back {time.monotonic() - started:.0f} s in")
    new_node = _node2_ids(dashboard)
    assert len(new_node) == 1 and new_node != old_node

    # The same job goes on: Tune restarts both trials on the new node, each from its checkpoint.
    deadline = time.monotonic() + 480
    resumed_on: set[str] = set()
    while not (status := jobs.get_job_status(job_id)).is_terminal():
        resumed_on |= {w.node_id for w in _train_workers(dashboard)}
        assert time.monotonic() < deadline, job_failed_message()
        time.sleep(1)
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, job_failed_message()
    assert resumed_on <= new_node and resumed_on, resumed_on
    print(f"sweep finished {time.monotonic() - started:.0f} s in")

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"exp-{NAME}")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("noisyseg.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("noisyseg.role") == "trial"]
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2, runs
    assert [r.info.status for r in runs] == ["FINISHED"] * 3  # none RUNNING, none FAILED
    assert parents[0].data.params["trial_max_failures"] == "2"
    for child in children:
        run_id = child.info.run_id
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(1, STEPS + 1)), steps  # every step logged once
        resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]
        # the killed trial went on from its checkpoint in the bucket, not from step 0
        assert len(resumed) == 1 and 0 < resumed[0] < STEPS, (child.info.run_name, resumed)
        assert resumed[0] in at_kill[child.info.run_name]  # a checkpoint the bucket held

    keys = set(_keys(s3, f"sweeps/{NAME}/"))
    assert {f"sweeps/{NAME}/best.yaml", f"sweeps/{NAME}/summary/trials.csv"} <= keys
    final = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"sweeps/{NAME}/noisyseg_sweep.json")["Body"].read()
    )
    assert final["status"] == "finished"
    assert "resuming from step" in logs or "resumed from step" in logs, logs[-4000:]
    print(f"test body took {time.monotonic() - started:.0f} s")
