"""The one MLflow tracking module: runs, params, parent/child runs, metric names.

Real MLflow on an embedded SQLite store (one process writes; no server needed for these rules).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from noisyseg.distributed import tracking


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_params_are_logged_once_and_a_changed_value_becomes_a_resume_tag(uri: str) -> None:
    handle = tracking.open_run(uri, "exp", "run-a", {"steps": 10, "lr": 0.01})
    client = MlflowClient(uri)
    run = client.get_run(handle.run_id)
    assert not handle.resumed
    assert run.data.params == {"steps": "10", "lr": "0.01"}
    assert run.data.tags[tracking.RUN_NAME_TAG] == "run-a"
    assert run.info.run_name == "run-a"

    again = tracking.open_run(
        uri, "exp", "run-a", {"steps": 20, "lr": 0.01, "seed": 3}, resume_run_id=handle.run_id
    )
    assert again.run_id == handle.run_id and again.resumed
    run = client.get_run(handle.run_id)
    # params are immutable: steps keeps 10, the new value is a tag; a new key is logged
    assert run.data.params == {"steps": "10", "lr": "0.01", "seed": "3"}
    assert run.data.tags["resume.steps"] == "20"
    assert "resume.lr" not in run.data.tags
    assert tracking.log_params(uri, handle.run_id, {"lr": 0.02, "seed": 3}) == {"lr": "0.02"}


def test_more_params_than_one_batch_and_long_values(uri: str) -> None:
    params = {f"p{i:03d}": i for i in range(250)}  # MLflow takes 100 params per batch
    params["long"] = "x" * 7000  # MLflow keeps at most 6000 characters
    handle = tracking.open_run(uri, "exp", "many", params)
    logged = MlflowClient(uri).get_run(handle.run_id).data.params
    assert len(logged) == 251 and logged["p249"] == "249"
    assert logged["long"] == "x" * 6000


def test_finish_run_records_status_and_reason(uri: str) -> None:
    handle = tracking.open_run(uri, "exp", "r", {})
    assert tracking.run_status(uri, handle.run_id) == "RUNNING"
    tracking.finish_run(uri, handle.run_id, "KILLED", reason="interrupted (Ctrl-C)")
    run = MlflowClient(uri).get_run(handle.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.END_REASON_TAG] == "interrupted (Ctrl-C)"
    assert tracking.run_exists(uri, handle.run_id)
    assert not tracking.run_exists(uri, "0" * 32)
    MlflowClient(uri).delete_run(handle.run_id)
    assert not tracking.run_exists(uri, handle.run_id)


def test_experiment_is_created_once(uri: str) -> None:
    first = tracking.experiment_id_for(uri, "shared")
    assert tracking.experiment_id_for(uri, "shared") == first
    assert MlflowClient(uri).get_experiment_by_name("shared").experiment_id == first


def test_parent_run_is_reopened_and_children_are_found_by_trial(uri: str) -> None:
    parent = tracking.open_parent_run(uri, "exp", "sw", {"metric": "val/ap"})
    client = MlflowClient(uri)
    tags = client.get_run(parent.run_id).data.tags
    assert tags[tracking.ROLE_TAG] == "sweep" and tags[tracking.SWEEP_TAG] == "sw"
    assert not parent.resumed

    child = tracking.find_or_create_child(
        uri, parent.experiment_id, parent.run_id, "sw", "t_00000", "sw-t_00000", {"lr": 1}, {}
    )
    other = tracking.find_or_create_child(
        uri, parent.experiment_id, parent.run_id, "sw", "t_00001", "sw-t_00001", {"lr": 2}, {}
    )
    # a restarted trial finds its run instead of creating a second one
    same = tracking.find_or_create_child(
        uri, parent.experiment_id, parent.run_id, "sw", "t_00000", "sw-t_00000", {"lr": 1}, {}
    )
    assert same == child and other != child
    tags = client.get_run(child).data.tags
    assert tags[tracking.PARENT_TAG] == parent.run_id and tags[tracking.TRIAL_TAG] == "t_00000"
    assert tags[tracking.RUN_NAME_TAG] == "sw-t_00000" and tags[tracking.ROLE_TAG] == "trial"
    found = {r.info.run_id for r in tracking.children(uri, parent.experiment_id, parent.run_id)}
    assert found == {child, other}
    assert tracking.find_child(uri, parent.experiment_id, parent.run_id, "t_00009") is None

    # an interrupted sweep's parent is re-opened (RUNNING again), not duplicated
    tracking.finish_run(uri, parent.run_id, "KILLED")
    reopened = tracking.open_parent_run(
        uri, "exp", "sw", {"metric": "val/ap"}, run_id=parent.run_id
    )
    assert reopened.run_id == parent.run_id and reopened.resumed
    assert tracking.run_status(uri, parent.run_id) == "RUNNING"
    # a recorded parent the server no longer has: a new parent run
    fresh = tracking.open_parent_run(uri, "exp", "sw", {}, run_id="f" * 32)
    assert fresh.run_id != parent.run_id and not fresh.resumed


def test_metric_names_flatten_nested_dicts_and_keep_only_finite_values() -> None:
    metrics = {
        "ap": 0.5,
        "precision": math.nan,
        "nested": {"dice": 1, "skip": "text"},
        "curve": [1.0, 2.0],
        "flag": True,
        "odd(name)": 2.0,
    }
    assert tracking.scalar_metrics(metrics, "val/") == {
        "val/ap": 0.5,
        "val/nested.dice": 1.0,
        "val/odd_name_": 2.0,
    }
    assert tracking.scalar_metric_names(metrics, "val/") == [
        "val/ap",
        "val/precision",
        "val/nested.dice",
        "val/odd_name_",
    ]


def test_uri_resolution_and_file_stores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    assert tracking.resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5555"
    assert tracking.is_local_file_store("sqlite:///x.db")
    assert tracking.is_local_file_store("file:///tmp/mlruns")
    assert tracking.is_local_file_store("/tmp/mlruns")
    assert not tracking.is_local_file_store("http://127.0.0.1:5000")
    assert tracking.run_url("http://h:1/", "3", "abc") == "http://h:1/#/experiments/3/runs/abc"
