"""The run guard closes a killed launcher's MLflow run, and only then (real MLflow, real process)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from noisyseg.distributed.checkpoints import checkpoint_dir_name, save_training_state
from noisyseg.distributed.run_guard import RunGuard
from noisyseg.distributed.tracking import END_REASON_TAG, finish_run


@pytest.fixture()
def run(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("guard")
    run_id = client.create_run(experiment).info.run_id
    for step in range(1, 8):
        client.log_metric(run_id, "train/loss", 1.0 / step, step=step)
    return uri, run_id


def _wait_exit(guard: RunGuard, timeout: float = 300) -> int:
    # The guard imports MLflow and torch only after the launcher died: ~5 s idle, but 52 s was
    # measured here at load 10 and CI's run overran the former 60 s.
    return guard.process.wait(timeout=timeout)


def _checkpoint(run_dir: Path, step: int) -> None:
    directory = run_dir / checkpoint_dir_name(step)
    directory.mkdir(parents=True)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_training_state(directory, model=model, optimizer=optimizer, scheduler=scheduler,
                        unet_spec={}, config={}, step=step, mlflow_run_id=None)  # fmt: skip


@pytest.mark.fault_case(8)
def test_a_dead_launcher_run_is_marked_killed_with_where_it_stopped(run, tmp_path: Path) -> None:
    uri, run_id = run
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 5)
    (run_dir / checkpoint_dir_name(6)).mkdir()  # being copied: no state.pt, not resumable
    guard = RunGuard.start(uri, run_id, run_dir, grace_s=0.5)
    guard.pipe.close()  # what the kernel does when the launcher is killed: EOF, no "done"
    assert _wait_exit(guard) == 0
    got = MlflowClient(uri).get_run(run_id)
    assert got.info.status == "KILLED"
    reason = got.data.tags[END_REASON_TAG]
    assert "launcher" in reason and "stopped at step 7" in reason
    assert "resumes from checkpoint step 5" in reason


def test_a_released_guard_leaves_the_run_alone(run) -> None:
    uri, run_id = run
    guard = RunGuard.start(uri, run_id, None, grace_s=0.5)
    started = time.monotonic()
    guard.release()
    assert _wait_exit(guard) == 0 and time.monotonic() - started < 10  # no MLflow import
    got = MlflowClient(uri).get_run(run_id)
    assert got.info.status == "RUNNING" and END_REASON_TAG not in got.data.tags


def test_a_run_the_workers_ended_keeps_their_verdict(run) -> None:
    uri, run_id = run
    finish_run(uri, run_id, "KILLED", reason="the launcher (noisyseg train) ended; workers stopped")
    guard = RunGuard.start(uri, run_id, None, grace_s=5)
    guard.pipe.close()
    assert _wait_exit(guard) == 0
    got = MlflowClient(uri).get_run(run_id)
    assert got.data.tags[END_REASON_TAG] == "the launcher (noisyseg train) ended; workers stopped"
