"""Shared helpers for integration tests: a real Ray head, a real MLflow server, a tiny store.

Each helper stops exactly the processes it started:

* :func:`start_ray_head` runs ``ray start --head`` with a unique, short ``--temp-dir``. Every Ray
  process of that head (gcs_server, raylet, dashboard, agents, workers) carries the temp dir (or
  its session dir) on its command line, so :meth:`RayHead.stop` kills the processes whose
  ``/proc/<pid>/cmdline`` contains it — never ``ray stop`` (which stops every Ray on the machine).
* :func:`start_mlflow_server` runs ``mlflow server`` in its own process group
  (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: 2 processes); :meth:`MlflowServer.stop` kills
  that group.

``RAY_AUTH_MODE=disabled`` is set for every process started here (and must be set for the client
processes too: :func:`ray_env`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_env(**extra: str) -> dict[str, str]:
    """Environment for Ray client/CLI processes of these tests."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


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


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


@dataclass
class RayHead:
    """A running ``ray start --head``; ``address`` is the GCS address, ``dashboard_url`` the job API."""

    temp_dir: Path
    address: str
    dashboard_url: str
    _stopped: bool = field(default=False, repr=False)

    def pids(self) -> list[int]:
        """Every live process of this head.

        The processes whose command line holds the unique temp dir (gcs_server, raylet,
        dashboard, monitors), every descendant of those (agents and workers rename themselves to
        ``ray::...`` and lose it), and the Ray client server, which is re-parented to init and
        named only by the GCS address.
        """
        roots = set(_pids_with(str(self.temp_dir)))
        gcs_port = self.address.rsplit(":", 1)[1]
        roots |= {
            pid
            for pid in _pids_with("ray.util.client.server")
            if pid in set(_pids_with(f":{gcs_port} "))
        }
        tree = _children()
        found, stack = set(), list(roots)
        while stack:
            pid = stack.pop()
            if pid in found or pid == os.getpid():
                continue
            found.add(pid)
            stack.extend(tree.get(pid, []))
        return sorted(found)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, exactly this head's processes; remove its temp dir."""
        if self._stopped:
            return
        self._stopped = True
        known: set[int] = set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = set(self.pids()) | {p for p in known if Path(f"/proc/{p}").exists()}
            known |= pids
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in known):
                time.sleep(0.2)
            if not any(Path(f"/proc/{p}").exists() for p in known):
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(num_cpus: int = 4, *, timeout: float = 60.0) -> RayHead:
    """``ray start --head`` on 127.0.0.1 with the dashboard (job server) on 127.0.0.1.

    Every port is a free one (GCS, dashboard, dashboard agent HTTP/gRPC, runtime-env agent,
    metrics, Ray client server): Ray's fixed defaults (agent 52365, client 10001) collide when two
    heads run on one machine and the job API then answers "No available agent". The temp dir is
    short (``/tmp/rt-XXXX``: Ray's socket paths must stay under 108 bytes) and unique, which is
    what :meth:`RayHead.stop` keys on.
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
    head = RayHead(temp_dir, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}")
    try:
        subprocess.run(command, env=ray_env(), check=True, capture_output=True, timeout=timeout)
        _wait_http(f"{head.dashboard_url}/api/version", timeout)
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


@dataclass
class MlflowServer:
    """A running ``mlflow server`` on SQLite; ``uri`` is its HTTP tracking URI."""

    uri: str
    process: subprocess.Popen
    root: Path

    def stop(self) -> None:
        """Kill the server's process group (it was started with ``start_new_session``)."""
        stop_process_group(self.process)


def start_mlflow_server(root: str | Path, *, timeout: float = 60.0) -> MlflowServer:
    """``mlflow server --backend-store-uri sqlite:///<root>/mlflow.db`` on a free loopback port.

    Artifacts are proxied by the server (``mlflow-artifacts:``) into ``<root>/mlartifacts``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
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
    server = MlflowServer(f"http://127.0.0.1:{port}", process, root)
    try:
        _wait_http(f"{server.uri}/health", timeout, process)
    except BaseException:
        server.stop()
        raise
    return server


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
