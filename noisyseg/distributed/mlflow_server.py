"""A local ``mlflow server`` (SQLite + proxied artifacts) that this process starts and stops.

:meth:`LocalMlflowServer.start` runs ``mlflow server`` on 127.0.0.1 (a free port) in its own
process group (``start_new_session``: Ctrl-C in the terminal does not reach it, the starter stops
it), with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (2 processes instead of 9), and writes
``<root>/server.json`` (pid, process start time, port). :meth:`LocalMlflowServer.stop` stops the
group through the handle that started it.

A process that was killed before it could stop its server leaves the record behind; the next
:meth:`~LocalMlflowServer.start` on the same root calls :func:`stop_recorded_server`, which stops
that group only when the recorded pid is still the same process (same start time) or its group
still exists without a leader — a pid in use as a process group id is never handed to a new
process, so neither case can hit another program. Nothing is found by scanning the process table.
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
from pathlib import Path

import psutil

SERVER_FILE = "server.json"
LOG_FILE = "server.log"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mlflow_command() -> list[str]:
    """The venv's ``mlflow`` executable (beside this Python), else ``python -m mlflow``."""
    exe = Path(sys.executable).parent / "mlflow"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a group of another user: certainly not ours
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _terminate_group(pgid: int, wait_leader: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM the group, wait ``grace_s`` for it to go, then SIGKILL what is left."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if wait_leader is not None and wait_leader.poll() is None:
            time.sleep(0.1)
            continue
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    if wait_leader is not None:
        try:
            wait_leader.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


def stop_recorded_server(root: str | Path, *, grace_s: float = 10.0) -> bool:
    """Stop the server recorded in ``<root>/server.json`` if it is still that server.

    Returns ``True`` when a live server group was stopped. The record is removed either way.
    """
    record = Path(root) / SERVER_FILE
    if not record.is_file():
        return False
    try:
        data = json.loads(record.read_text())
        pid, started = int(data["pid"]), float(data["started"])
    except (ValueError, KeyError, TypeError, OSError):
        record.unlink(missing_ok=True)
        return False
    ours = False
    try:
        ours = abs(psutil.Process(pid).create_time() - started) < 0.5
    except psutil.NoSuchProcess:
        # The leader is gone; its group id cannot have been reused while members are alive.
        ours = _group_alive(pid)
    if ours:
        _terminate_group(pid, None, grace_s)
    record.unlink(missing_ok=True)
    return ours


class LocalMlflowServer:
    """An ``mlflow server`` this process started, in its own process group.

    Attributes:
        uri: ``http://127.0.0.1:<port>``, the tracking URI to hand to clients.
        process: the ``mlflow server`` process (leader of its process group).
        root: the folder holding ``mlflow.db``, ``mlartifacts/``, ``server.log``,
            ``server.json``.
    """

    def __init__(self, uri: str, process: subprocess.Popen, root: Path) -> None:
        self.uri = uri
        self.process = process
        self.root = root

    @classmethod
    def start(cls, root: str | Path, *, timeout: float = 180.0) -> LocalMlflowServer:
        """Start ``mlflow server`` on SQLite ``<root>/mlflow.db``; return once ``/health`` answers.

        A server a killed process left on the same root is stopped first (one writer per
        database). Raises ``RuntimeError`` when the server exits during start-up and
        ``TimeoutError`` when it does not answer within ``timeout`` seconds (it is stopped).
        """
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        stop_recorded_server(root)
        port = free_port()
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            *_mlflow_command(),
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
        ]
        with open(root / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = psutil.Process(process.pid).create_time()
        record = {"pid": process.pid, "started": started, "port": port}
        (root / SERVER_FILE).write_text(json.dumps(record))
        server = cls(f"http://127.0.0.1:{port}", process, root)
        try:
            server._wait_healthy(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with status {self.process.returncode}; "
                    f"see {self.root / LOG_FILE}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer within {timeout} s")
            time.sleep(0.3)

    @property
    def running(self) -> bool:
        """Whether the server's leader process is still running."""
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace_s``; remove the record."""
        if self.process.poll() is None or _group_alive(self.process.pid):
            _terminate_group(self.process.pid, self.process, grace_s)
        (self.root / SERVER_FILE).unlink(missing_ok=True)

    def __enter__(self) -> LocalMlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
