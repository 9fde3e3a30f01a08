"""Exact resume without Ray (issue 13, cases 5, 7, 15): the newest complete checkpoint wins, the
MLflow history holds every step once, a re-launch that changes the network or the data (or whose
MLflow run is not on this tracking server) is refused before any work, ``--force-new``.

MLflow is real (a SQLite tracking store in the test's folder); the loop runs in this process
(``LocalContext``), as Ray Train's worker would run it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from cluster_utils import make_ball_store, tiny_train_config
from mlflow import MlflowClient

from noisyseg.cli import main
from noisyseg.distributed.checkpoints import (
    STATE_FILE,
    checkpoint_dir_name,
    latest_checkpoint_state,
    read_state,
)
from noisyseg.distributed.config import check_against_store, make_config
from noisyseg.distributed.resume import identity_differences
from noisyseg.distributed.tracking import open_run
from noisyseg.distributed.train_loop import LocalContext, run_worker
from noisyseg.distributed.trainer import plan_launch
from noisyseg.errors import NoisysegInputError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_ball_store(tmp_path_factory.mktemp("resume") / "s.zarr", train=3, val=1, size=16)


def small(store: str, **fields):
    return tiny_train_config(store, "resume-test", **fields)


def loop_config(config, *, run_dir=None, tracking=None) -> dict:
    return {
        "config": config.model_dump(mode="json"),
        "store_info": check_against_store(config).model_dump(),
        "mlflow": tracking,
        "run_dir": str(run_dir) if run_dir else None,
    }


@pytest.mark.fault_case(7)
def test_worker_resumes_from_the_newest_checkpoint_on_disk(store: str, tmp_path: Path) -> None:
    """Ray hands back checkpoint 2 (its registration lags) while checkpoint 4 is complete on
    disk and checkpoint 6 is half-copied: the worker continues from 4."""
    config = small(store, steps=6, checkpoint_interval=2)
    run_dir = tmp_path / "run"
    run_worker(loop_config(config), LocalContext(checkpoint_root=run_dir))
    torn = run_dir / checkpoint_dir_name(6) / STATE_FILE
    torn.write_bytes(torn.read_bytes()[:1000])  # a copy cut short: not loadable

    assert latest_checkpoint_state(run_dir)[1]["step"] == 4
    again = LocalContext(restore=run_dir / checkpoint_dir_name(2))
    run_worker(loop_config(config, run_dir=run_dir), again)
    assert [r["step"] for r in again.reports] == [6]  # steps 5, 6 only: resumed from 4


@pytest.mark.fault_case(7)
def test_resumed_run_logs_each_step_once(store: str, tmp_path: Path) -> None:
    """Attempt 1 logs steps 1..6 and checkpoints 3 and 6; checkpoint 6 is lost (the crash came
    before it was saved). Attempt 2 redoes 4..6 from checkpoint 3: MLflow keeps one value per
    step, and the run ends FINISHED with its reason."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = small(store, steps=6, checkpoint_interval=3, run_name="once")
    handle = open_run(uri, config.experiment, "once", config.flat_params())
    tracking = {"tracking_uri": uri, "run_id": handle.run_id}
    run_dir = tmp_path / "run"
    run_worker(loop_config(config, tracking=tracking), LocalContext(checkpoint_root=run_dir))
    shutil.rmtree(run_dir / checkpoint_dir_name(6))

    second = LocalContext(checkpoint_root=run_dir)
    run_worker(loop_config(config, run_dir=run_dir, tracking=tracking), second)
    assert [r["step"] for r in second.reports] == [6]

    client = MlflowClient(uri)
    for key in ("train/loss", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(handle.run_id, key))
        assert steps == [1, 2, 3, 4, 5, 6], key
    assert [
        (m.step, m.value) for m in client.get_metric_history(handle.run_id, "resumed_from_step")
    ] == [(3, 3.0)]
    run = client.get_run(handle.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["noisyseg.end_reason"] == "completed 6 steps"


def _finished_run(store: str, tmp_path: Path, uri: str, **fields):
    """A 2-step run named ``r`` with a checkpoint under ``tmp_path/results/r``."""
    config = small(store, steps=2, checkpoint_interval=2, run_name="r",
                   storage_path=str(tmp_path / "results"), **fields)  # fmt: skip
    handle = open_run(uri, config.experiment, "r", config.flat_params())
    tracking = {"tracking_uri": uri, "run_id": handle.run_id}
    run_dir = tmp_path / "results" / "r"
    run_worker(loop_config(config, tracking=tracking), LocalContext(checkpoint_root=run_dir))
    return config, handle, run_dir


@pytest.mark.fault_case(5)
def test_changed_network_or_data_is_refused_before_any_work(
    store: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, handle, run_dir = _finished_run(store, tmp_path, uri)
    before = sorted(p.name for p in run_dir.iterdir())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["train", "--store", store, "--labels", "truth", "--loss", "bce", "--patch-size", "16",
            "--batch-size", "1", "--channels", "8", "16", "--num-res-units", "0", "--steps", "4",
            "--run-name", "r", "--storage-path", str(tmp_path / "results"),
            "--experiment", "resume-test", "--val-cases", "0"]  # fmt: skip
    capsys.readouterr()  # the first run's own output
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "channels: [4, 8] -> [8, 16]" in err[0] and "labels: noisy -> truth" in err[0]
    assert "--force-new" in err[0]
    # nothing touched: the earlier MLflow run is still FINISHED, the run folder unchanged
    assert MlflowClient(uri).get_run(handle.run_id).info.status == "FINISHED"
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.fault_case(5)
def test_identity_allows_more_steps_and_names_each_difference(store: str) -> None:
    saved = small(store, steps=10)
    spec = saved.unet_spec(3, 1).to_dict()
    more = small(store, steps=50, log_interval=7, workers=2)
    assert identity_differences(saved.model_dump(mode="json"), spec, more, spec) == []
    other = small(store, loss="lopsided", seed=3)
    two_channels = {**spec, "in_channels": 2}
    assert identity_differences(saved.model_dump(mode="json"), spec, other, two_channels) == [
        "seed: 0 -> 3",
        "loss: bce -> lopsided",
        "store in_channels: 1 -> 2",
    ]


@pytest.mark.fault_case(15)
def test_checkpoint_of_another_tracking_server_is_refused(store: str, tmp_path: Path) -> None:
    first_uri = f"sqlite:///{tmp_path / 'first.db'}"
    config, handle, _ = _finished_run(store, tmp_path, first_uri)
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    info = check_against_store(config)
    with pytest.raises(NoisysegInputError) as error:
        plan_launch(config.model_copy(update={"steps": 4}), info, other_uri)
    message = str(error.value)
    assert handle.run_id in message and other_uri in message and first_uri in message
    # the same checkpoint resumes where its run is
    plan = plan_launch(config.model_copy(update={"steps": 4}), info, first_uri)
    assert plan.resume_step == 2 and plan.resume_run_id == handle.run_id


@pytest.mark.fault_case(15)
def test_checkpoint_of_another_store_is_refused(store: str, tmp_path: Path) -> None:
    """A run name from another project (another store) under the shared storage path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, _, _ = _finished_run(store, tmp_path, uri)
    other = make_ball_store(tmp_path / "other.zarr", train=3, val=1, size=16, seed=5)
    config = small(other, steps=4, checkpoint_interval=2, run_name="r",
                   storage_path=str(tmp_path / "results"))  # fmt: skip
    with pytest.raises(NoisysegInputError, match=re.escape(f"store: {store} -> {other}")):
        plan_launch(config, check_against_store(config), uri)


@pytest.mark.fault_case(5)
def test_force_new_sets_the_old_run_aside(store: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, _, run_dir = _finished_run(store, tmp_path, uri)
    changed = config.model_copy(update={"channels": (8, 16)})
    plan = plan_launch(changed, check_against_store(changed), uri, force_new=True)
    assert plan.prior is None and plan.resume_run_id is None
    assert not run_dir.exists()
    assert plan.set_aside_to.parent == run_dir.parent
    assert plan.set_aside_to.name.startswith("r.old-")
    assert read_state(plan.set_aside_to / checkpoint_dir_name(2))["step"] == 2


@pytest.mark.fault_case(9)
def test_relative_store_is_made_absolute_where_it_is_typed(tmp_path: Path, monkeypatch) -> None:
    """Train V2 runs workers in the run folder: the driver must send an absolute path."""
    monkeypatch.chdir(tmp_path)
    config = make_config({"store": "brain.zarr", "storage_path": "results"})
    assert config.store == str(tmp_path / "brain.zarr")
    assert config.storage_path == str(tmp_path / "results")
    assert make_config({"store": "s3://bucket/brain.zarr"}).store == "s3://bucket/brain.zarr"
    # a worker re-validating the dict elsewhere keeps the driver's path
    monkeypatch.chdir("/")
    assert make_config(config.model_dump(mode="json")).store == str(tmp_path / "brain.zarr")


@pytest.mark.fault_case(15)
def test_checkpoint_records_where_it_logs(store: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, handle, run_dir = _finished_run(store, tmp_path, uri)
    state = torch.load(run_dir / checkpoint_dir_name(2) / STATE_FILE, weights_only=True)
    assert (state["mlflow_run_id"], state["tracking_uri"]) == (handle.run_id, uri)
