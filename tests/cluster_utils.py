"""Shared helpers for integration tests: a real Ray head, a real MLflow server, a tiny store.

Each helper stops exactly the processes it started, through the handle that started them:

* :func:`start_ray_head` runs ``ray start --head`` in a new session (a unique, short
  ``--temp-dir``, every port a free one); the head's GCS, raylet, dashboard and agents stay in
  that process group. :meth:`RayHead.stop` sends SIGTERM, then SIGKILL, to that group — never
  ``ray stop`` (which stops every Ray on the machine), and no process is looked up by name.
* :func:`start_mlflow_server` is :class:`noisyseg.distributed.mlflow_server.LocalMlflowServer`
  (``mlflow server`` in its own process group, stopped through its handle).

``RAY_AUTH_MODE=disabled`` is set for every process started here (and must be set for the client
processes too: :func:`ray_env`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noisyseg.distributed.config import TrainConfig, make_config
from noisyseg.distributed.mlflow_server import LocalMlflowServer, free_port

VENV_BIN = Path(sys.executable).parent

__all__ = [
    "VENV_BIN",
    "LocalMlflowServer",
    "S3_BUCKET",
    "MotoS3Server",
    "RayHead",
    "free_port",
    "local_cluster_env",
    "make_ball_store",
    "read_env_file",
    "tiny_train_config",
    "ray_env",
    "ray_job_submit",
    "start_mlflow_server",
    "start_ray_head",
    "stop_process_group",
]


def ray_env(**extra: str) -> dict[str, str]:
    """Environment for Ray client/CLI processes of these tests."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def read_env_file(path: str | Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` / ``export KEY=VALUE`` lines (deploy/local-cluster.sh's state and
    cluster.env files)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip().removeprefix("export ").strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def local_cluster_env(**extra: str) -> dict[str, str]:
    """Environment for running deploy/local-cluster.sh: none of an outer cluster's addresses,
    tokens or object-store variables (the script writes its own into cluster.env), auth off, the
    test's Python for ray/mlflow/noisyseg, then ``extra``."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith("AWS_")]:
        env.pop(key)
    env["RAY_AUTH_MODE"] = "disabled"
    env["NOISYSEG_PYTHON"] = sys.executable
    env.update(extra)
    return env


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is alive (zombies count until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@dataclass
class RayHead:
    """A running Ray head started by ``ray start --head``; ``address`` is the GCS address,
    ``dashboard_url`` the job API, ``pgid`` the process group that holds every head process."""

    temp_dir: Path
    address: str
    dashboard_url: str
    pgid: int
    _stopped: bool = field(default=False, repr=False)

    def alive(self) -> bool:
        """Whether any process of the head's process group is still alive."""
        return group_alive(self.pgid)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the head's process group, SIGKILL what is left after ``timeout``; remove the
        temp dir. (Some of the head's processes outlive SIGTERM by 20 s and more; a test head
        holds nothing to save, so the grace is short: it cost every Ray test module ~20 s.)"""
        if self._stopped:
            return
        self._stopped = True
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            if _wait_group_gone(self.pgid, wait):
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


#: Tries of ``ray start --head``: Ray gives a starting node a fixed 30 s to register with its
#: GCS ("The current node timed out during startup"), which a loaded CI machine sometimes misses;
#: deploy/local-cluster.sh retries its nodes the same way (NODE_START_ATTEMPTS).
RAY_HEAD_START_ATTEMPTS = 3


def start_ray_head(
    num_cpus: int = 4, *, timeout: float = 300.0, env: dict[str, str] | None = None
) -> RayHead:
    """:func:`start_ray_head_once`, tried up to :data:`RAY_HEAD_START_ATTEMPTS` times when
    ``ray start`` itself fails (each failed try's processes and temp dir are removed first)."""
    errors: list[str] = []
    for _ in range(RAY_HEAD_START_ATTEMPTS):
        try:
            return start_ray_head_once(num_cpus, timeout=timeout, env=env)
        except RayStartError as error:
            errors.append(str(error))
    raise RuntimeError("\n---\n".join(errors))


class RayStartError(RuntimeError):
    """``ray start --head`` exited non-zero, or its dashboard never answered."""


def start_ray_head_once(
    num_cpus: int = 4, *, timeout: float = 300.0, env: dict[str, str] | None = None
) -> RayHead:
    """``ray start --head`` on 127.0.0.1 with the dashboard (job server) on 127.0.0.1.

    ``ray start`` runs in a new session: the GCS, raylet, dashboard and agents it launches stay in
    that process group after it returns, which is the handle :meth:`RayHead.stop` uses. (Not
    ``--block``: that mode tears the whole head down as soon as any one of its processes dies,
    which happens under heavy load.) Every port is a free one (GCS, dashboard, dashboard agent
    HTTP/gRPC, runtime-env agent, metrics, Ray client server): Ray's fixed defaults (agent 52365,
    client 10001) collide when two heads run on one machine and the job API then answers "No
    available agent". The temp dir is short (``/tmp/rt-XXXX``: Ray's socket paths must stay under
    108 bytes) and unique. ``env``: extra environment for the head, and so for every worker and
    actor it starts.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    port, dash_port = free_port(), free_port()
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash_port),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--include-dashboard",
        "true",
        "--num-cpus",
        str(num_cpus),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    with open(temp_dir / "ray-start.log", "wb") as log:
        process = subprocess.Popen(
            command,
            env=ray_env(**(env or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    head = RayHead(temp_dir, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}", process.pid)
    try:
        if process.wait(timeout=timeout) != 0:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        _wait_http(f"{head.dashboard_url}/api/version", timeout)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
        said = (temp_dir / "ray-start.log").read_text(errors="replace")[-3000:]
        head.stop()
        raise RayStartError(f"{error}; ray start said:\n{said}") from None
    except BaseException:
        head.stop()
        raise
    return head


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of ``process`` (started with ``start_new_session``), wait up to
    10 s, then SIGKILL it; nothing when the process has already exited."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=5)


#: The bucket the ``s3_server`` fixture (conftest) creates.
S3_BUCKET = "noisyseg-test"


@dataclass
class MotoS3Server:
    """moto's standalone S3 server (``moto_server``, S3 over HTTP) on a free 127.0.0.1 port.

    Clients reach it through the standard environment only (:meth:`env`), as they would AWS or
    MinIO; :meth:`stop` ends exactly its own process group.
    """

    endpoint: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, root: str | Path, timeout: float = 60.0) -> MotoS3Server:
        """Start the server, logging to ``<root>/moto.log``; wait until it answers."""
        port = free_port()
        log_path = Path(root) / "moto.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = cls(f"http://127.0.0.1:{port}", process, log_path)
        try:
            _wait_http(server.endpoint, timeout, process)
        except BaseException:
            server.stop()
            raise
        return server

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point S3 clients (boto3, s3fs, pyarrow) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        """Stop the server's process group."""
        stop_process_group(self.process)


#: The test suite's MLflow server is the library's (the same start/stop code is under test).
MlflowServer = LocalMlflowServer


def start_mlflow_server(root: str | Path, *, timeout: float = 180.0) -> LocalMlflowServer:
    """``mlflow server --backend-store-uri sqlite:///<root>/mlflow.db`` on a free loopback port.

    Artifacts are proxied by the server (``mlflow-artifacts:``) into ``<root>/mlartifacts``.
    """
    return LocalMlflowServer.start(root, timeout=timeout)


# ---------------------------------------------------------------------------------- tiny store
def _balls(shape: tuple[int, ...], rng: np.random.Generator, count: int) -> list[np.ndarray]:
    grid = np.indices(shape)
    masks = []
    for _ in range(count):
        radius = rng.uniform(2.5, 5.0)
        centre = [rng.uniform(radius + 1, s - radius - 1) for s in shape]
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        masks.append(dist2 <= radius**2)
    return masks


def make_ball_store(
    path: str | Path,
    *,
    train: int = 4,
    val: int = 2,
    size: int = 32,
    spatial_dims: int = 3,
    lesions: int = 3,
    seed: int = 0,
    noisy_drop: int = 1,
    clean: int = 0,
) -> str:
    """A tiny store of bright balls ("lesions") in noise, written with ``VolumeStore``.

    Each case: image ``(1, size, ...)`` = 1.0 inside the balls + N(0, 0.3) noise, label set
    ``truth`` (every ball) and ``noisy`` (the first ``noisy_drop`` balls removed: false negatives).
    The first ``clean`` training cases are flagged clean. Returns the store path.
    """
    from noisyseg.storage.store import VolumeStore

    rng = np.random.default_rng(seed)
    store = VolumeStore.create(str(path), spatial_dims=spatial_dims, channel_names=["intensity"])
    shape = (size,) * spatial_dims
    noisy_by_case: dict[str, np.ndarray] = {}
    for index in range(train + val):
        balls = _balls(shape, rng, lesions)
        truth = np.any(balls, axis=0)
        noisy = (
            np.any(balls[noisy_drop:], axis=0) if len(balls) > noisy_drop else np.zeros(shape, bool)
        )
        image = truth.astype(np.float32) + rng.normal(0, 0.3, shape).astype(np.float32)
        case_id = f"case{index:03d}"
        store.write_case(
            case_id,
            image[None],
            {"truth": truth.astype(np.uint8)},
            spacing=(1.0,) * spatial_dims,
            split="train" if index < train else "val",
        )
        noisy_by_case[case_id] = noisy.astype(np.uint8)
    records = {
        case_id: store.write_label_set(case_id, "noisy", noisy)
        for case_id, noisy in noisy_by_case.items()
    }
    store.register_label_set("noisy", records, params={"mode": "test", "dropped": noisy_drop})
    if clean:
        store.set_clean([f"case{index:03d}" for index in range(clean)], True)
    return str(path)


def ray_job_submit(
    head: RayHead,
    entrypoint: list[str],
    *,
    working_dir: str | Path,
    runtime_env: dict | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess:
    """``ray job submit`` (waits for the job, streams its logs into ``stdout``).

    Retries while the head's job agent is still starting ("No available agent to submit job":
    the dashboard answers a few seconds before its agent registers).
    """
    import json

    command = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--working-dir",
        str(working_dir),
    ]
    if runtime_env:
        command += ["--runtime-env-json", json.dumps(runtime_env)]
    command += ["--", *entrypoint]
    deadline = time.monotonic() + 120  # the agent registers a few seconds after the dashboard
    while True:
        done = subprocess.run(
            command, check=False, env=ray_env(), capture_output=True, text=True, timeout=timeout
        )
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def tiny_train_config(store: str, experiment: str, **fields: Any) -> TrainConfig:
    """A TrainConfig of the smallest network on a ball store (``noisy`` labels, BCE, 16³
    patches, channels 4, 8, no validation, a log line per step); ``fields`` override."""
    base: dict[str, Any] = dict(
        store=store,
        labels="noisy",
        loss="bce",
        patch_size=16,
        batch_size=1,
        channels=[4, 8],
        num_res_units=0,
        val_cases=0,
        log_interval=1,
        experiment=experiment,
    )
    base.update(fields)
    return make_config(base)
