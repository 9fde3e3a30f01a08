"""The local MLflow server: started in its own process group, stopped through its handle or
through the record a killed owner left — and never a process that merely reuses a recorded pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from noisyseg.distributed.mlflow_server import SERVER_FILE, LocalMlflowServer, stop_recorded_server


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pgid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _group_alive(pgid)


def test_a_record_naming_another_process_stops_nothing(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # the pid is alive but was started at another time: a reused pid, not our server
        record = {"pid": bystander.pid, "started": time.time() - 3600, "port": 1}
        (tmp_path / SERVER_FILE).write_text(json.dumps(record))
        assert stop_recorded_server(tmp_path) is False
        assert bystander.poll() is None
        assert not (tmp_path / SERVER_FILE).exists()
        # a record of a process that is gone (and whose group is empty): nothing to stop
        gone = subprocess.Popen(["true"], start_new_session=True)
        gone.wait()
        (tmp_path / SERVER_FILE).write_text(json.dumps({"pid": gone.pid, "started": 0, "port": 1}))
        assert stop_recorded_server(tmp_path) is False
        (tmp_path / SERVER_FILE).write_text("not json")
        assert stop_recorded_server(tmp_path) is False
        assert not (tmp_path / SERVER_FILE).exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.integration
def test_server_runs_in_its_own_group_and_a_killed_owners_server_is_stopped(
    tmp_path: Path,
) -> None:
    root = tmp_path / "mlflow"
    # An owner process starts a server and dies without stopping it (like a SIGKILLed driver).
    owner = textwrap.dedent(
        f"""
        import os
        from noisyseg.distributed.mlflow_server import LocalMlflowServer
        server = LocalMlflowServer.start({str(root)!r})
        print(server.uri, server.process.pid, flush=True)
        os._exit(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", owner], capture_output=True, text=True, timeout=400, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stale_uri, stale_pid = done.stdout.split()
    stale_pid = int(stale_pid)
    assert os.getpgid(stale_pid) == stale_pid  # leader of its own process group
    record = json.loads((root / SERVER_FILE).read_text())
    assert record["pid"] == stale_pid
    assert abs(record["started"] - psutil.Process(stale_pid).create_time()) < 0.5
    with urllib.request.urlopen(f"{stale_uri}/health", timeout=10) as response:
        assert response.status == 200  # it outlived its owner

    # The next start on the same database stops the stale server first (one writer per db).
    server = LocalMlflowServer.start(root)
    try:
        assert _wait_gone(stale_pid)
        assert server.uri != stale_uri or server.process.pid != stale_pid
        assert os.getpgid(server.process.pid) == server.process.pid != os.getpgid(0)
        client = MlflowClient(server.uri)
        experiment = client.create_experiment("x")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
        assert json.loads((root / SERVER_FILE).read_text())["pid"] == server.process.pid
    finally:
        server.stop()
    assert _wait_gone(server.process.pid)
    assert not server.running
    assert not (root / SERVER_FILE).exists()
    assert (root / "mlflow.db").exists()  # the data outlives the server
