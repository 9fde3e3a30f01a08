"""deploy/local-cluster.sh: a two-node Ray cluster + MLflow on 127.0.0.1, and a real 2-worker job.

The integration tests share one cluster (module fixture). They show that
* ``up`` starts two Ray nodes (custom resources ``node1`` / ``node2``) and an MLflow server;
* ``ray job submit ... -- noisyseg train --workers 2`` runs its two Ray Train workers on *both*
  nodes (Ray state API) and leaves a FINISHED MLflow run with logged losses (MlflowClient);
* ``down`` leaves no process of the cluster behind (no live member in any process group the
  script recorded) and removes the cluster's temp dir.

Spreading the workers: ``noisyseg train`` has no placement-strategy flag, so each node offers one
logical CPU and each worker asks for one (``--cpus-per-worker 1``): two workers cannot share a
node. The Train controller and the job driver take 0 CPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_utils import local_cluster_env, read_env_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-cluster.sh"
VENV_BIN = Path(sys.executable).parent


def _script(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env or local_cluster_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _live_groups(state: dict[str, str]) -> list[int]:
    """The recorded process groups (head, worker node, MLflow) that still have a live member.

    A member is live unless it is a zombie: a process that has exited and waits for its parent to
    reap it holds no port, memory or file, but ``kill(-pgid, 0)`` still finds it, and where the
    parent of orphans (PID 1 of a CI container) does not reap, it stays in the table for good.
    So the members of exactly the recorded groups are read from ``/proc/<pid>/stat`` (group
    and state); no process is looked up by name.
    """
    pgids = {int(state[k]) for k in ("HEAD_PGID", "WORKER_PGID", "MLFLOW_PGID") if state.get(k)}
    alive: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue  # exited while we looked
        fields = stat[stat.rindex(b")") + 2 :].split()  # state, ppid, pgrp, ...
        if fields[0] != b"Z" and int(fields[2]) in pgids:
            alive.add(int(fields[2]))
    return sorted(alive)


# ---------------------------------------------------------------------------------- fast checks
def test_down_without_state_is_a_no_op(tmp_path: Path) -> None:
    done = _script("down", "--dir", str(tmp_path), timeout=30)
    assert done.returncode == 0, done.stderr
    assert "nothing recorded" in done.stdout


def test_rejects_unknown_auth_mode_before_starting_anything(tmp_path: Path) -> None:
    done = _script(
        "up", "--dir", str(tmp_path), env=local_cluster_env(RAY_AUTH_MODE="open"), timeout=30
    )
    assert done.returncode != 0
    assert "RAY_AUTH_MODE must be 'disabled' or 'token'" in done.stderr
    assert not (tmp_path / "state").exists()


def test_rejects_unknown_option(tmp_path: Path) -> None:
    done = _script("up", "--dir", str(tmp_path), "--frobnicate", timeout=30)
    assert done.returncode != 0
    assert "unknown option: --frobnicate" in done.stderr


def test_status_reports_down_when_nothing_runs(tmp_path: Path) -> None:
    done = _script("status", "--dir", str(tmp_path), timeout=30)
    assert done.returncode == 3
    assert "down" in done.stdout


# ---------------------------------------------------------------------------------- integration
class LocalCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = read_env_file(root / "state")
        self.env = read_env_file(root / "cluster.env")
        self.dashboard = self.env["RAY_ADDRESS"]
        self.tracking_uri = self.env["MLFLOW_TRACKING_URI"]
        self.down_result: subprocess.CompletedProcess | None = None

    def down(self) -> subprocess.CompletedProcess:
        if self.down_result is None:
            self.down_result = _script("down", "--dir", str(self.root), timeout=120)
        return self.down_result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("local-cluster")
    started = time.monotonic()
    up = _script("up", "--dir", str(root), timeout=300)
    if up.returncode != 0:
        _script("down", "--dir", str(root), timeout=120)
        pytest.fail(f"local-cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    print(f"local cluster up in {time.monotonic() - started:.1f} s")
    # The state API client in this process must agree with the cluster's auth mode.
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    handle = LocalCluster(root)
    try:
        yield handle
    finally:
        handle.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.integration
def test_up_starts_two_ray_nodes_and_mlflow(cluster: LocalCluster) -> None:
    from ray.util.state import list_nodes

    nodes = [n for n in list_nodes(address=cluster.dashboard, detail=True) if n.state == "ALIVE"]
    assert len(nodes) == 2
    # One machine: both nodes share an address. (`ray start` rewrites --node-ip-address
    # 127.0.0.1 to the machine's reachable address, services.resolve_ip_for_localhost; the
    # dashboard/job API the script hands out still listens on 127.0.0.1 only.)
    assert len({n.node_ip for n in nodes}) == 1
    assert len({n.node_id for n in nodes}) == 2
    assert cluster.dashboard.startswith("http://127.0.0.1:")
    assert sorted(n.is_head_node for n in nodes) == [False, True]
    custom = sorted(k for n in nodes for k in n.resources_total if k in ("node1", "node2"))
    assert custom == ["node1", "node2"]
    assert cluster.env["RAY_AUTH_MODE"] == "disabled"

    status = _script("status", "--dir", str(cluster.root), timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "ray nodes alive: 2" in status.stdout
    assert "mlflow: up" in status.stdout

    again = _script("up", "--dir", str(cluster.root), timeout=60)
    assert again.returncode != 0 and "already up" in again.stderr


@pytest.mark.integration
def test_two_worker_training_job_runs_on_both_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors, list_nodes

    store = tmp_path / "mets.zarr"
    synth = subprocess.run(
        [
            str(VENV_BIN / "noisyseg"),
            "synth",
            str(store),
            "--kind",
            "brain-mets",
            "--cases",
            "3",
            "--seed",
            "0",
            "--val-fraction",
            "0",
            "--test-fraction",
            "0",
            "--no-progress",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synth.returncode == 0, synth.stderr

    run_name = "local-two-node"
    experiment = "local-cluster-test"
    entrypoint = [
        "noisyseg",
        "train",
        "--store",
        str(store),
        "--labels",
        "truth",
        "--loss",
        "lopsided",
        "--entropy-weight",
        "0.3",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--steps",
        "3",
        "--patch-size",
        "16",
        "--batch-size",
        "1",
        "--channels",
        "4",
        "8",
        "--num-res-units",
        "0",
        "--val-cases",
        "0",
        "--checkpoint-interval",
        "3",
        "--log-interval",
        "1",
        "--run-name",
        run_name,
        "--experiment",
        experiment,
        "--storage-path",
        str(tmp_path / "ray_results"),
    ]
    command = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--entrypoint-num-cpus",
        "0",
        "--",
        *entrypoint,
    ]
    env = local_cluster_env()
    deadline = time.monotonic() + 60
    while True:  # the dashboard answers a moment before its job agent registers
        job = subprocess.run(
            command, env=env, check=False, capture_output=True, text=True, timeout=600
        )
        if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr

    node_of = {
        n.node_id: ("node1" if "node1" in n.resources_total else "node2")
        for n in list_nodes(address=cluster.dashboard, detail=True)
    }
    workers = list_actors(
        address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    assert len(workers) == 2, workers
    assert sorted(node_of[w.node_id] for w in workers) == ["node1", "node2"]

    client = MlflowClient(cluster.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2"
    assert run.data.params["entropy_weight"] == "0.3"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert losses and all(m.value == m.value for m in losses)  # logged and not NaN


@pytest.mark.integration
def test_down_leaves_no_process_behind(cluster: LocalCluster) -> None:
    state = cluster.state
    assert _live_groups(state), "the cluster should be running before down"
    done = cluster.down()
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 5  # processes just killed may take a moment to be reaped
    while _live_groups(state) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_groups(state) == []
    assert not Path(state["TEMP_ROOT"]).exists()
    assert not (cluster.root / "state").exists()
    assert not (cluster.root / "cluster.env").exists()
    assert (cluster.root / "mlflow.db").exists()  # the tracking data outlives the cluster
    status = _script("status", "--dir", str(cluster.root), timeout=30)
    assert status.returncode == 3


@pytest.mark.integration
def test_token_mode_rejects_requests_without_the_token(tmp_path: Path) -> None:
    """RAY_AUTH_MODE=token: the job/state API answers only with the cluster's own token."""
    import urllib.error
    import urllib.request

    up = _script("up", "--dir", str(tmp_path), env=local_cluster_env(RAY_AUTH_MODE="token"))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = read_env_file(tmp_path / "cluster.env")
        assert env["RAY_AUTH_MODE"] == "token"
        token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
        assert token_file.parent == tmp_path and oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        assert len(token) == 64
        url = f"{env['RAY_ADDRESS']}/api/v0/nodes?limit=10"
        for header in (None, "Bearer not-the-token"):
            request = urllib.request.Request(url)
            if header:
                request.add_header("Authorization", header)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code in (401, 403)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        state = read_env_file(tmp_path / "state") if (tmp_path / "state").exists() else None
        down = _script("down", "--dir", str(tmp_path), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert state is not None and _live_groups(state) == []


def test_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(SCRIPT, os.X_OK)
