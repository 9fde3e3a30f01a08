"""Checkpoint discovery and launch planning on ``s3://`` storage (issue 15, item 1), no Ray.

The object store is real: moto's standalone S3 server (``s3_server`` fixture), reached only
through the standard AWS_* environment, as AWS or MinIO would be. Checkpoints are real training
states (a tiny run in this process, ``LocalContext``), uploaded under ``s3://<bucket>/...``:

* the newest *complete* checkpoint wins (a torn ``state.pt`` and a directory without one are
  skipped), listed and read through pyarrow, loaded with ``weights_only=True``;
* ``plan_launch`` finds it, refuses a changed network, and ``--force-new`` copies the run to
  ``<run>.old-<time>`` and deletes it;
* a worker resumes from the remote newest when Ray's checkpoint lags;
* the filesystem handed to Ray carries endpoint and keys explicitly (Ray's nodes need no env);
* sweeps on object storage are refused in one line (not supported yet).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
from cluster_utils import S3_BUCKET, tiny_train_config
from mlflow import MlflowClient

from noisyseg.distributed.checkpoints import (
    STATE_FILE,
    checkpoint_dir_name,
    checkpoint_dirs,
    latest_checkpoint_state,
)
from noisyseg.distributed.config import check_against_store
from noisyseg.distributed.run_storage import RunLocation, resolve_filesystem
from noisyseg.distributed.tracking import open_run
from noisyseg.distributed.train_loop import LocalContext, run_worker
from noisyseg.distributed.trainer import plan_launch
from noisyseg.errors import NoisysegInputError
from noisyseg.tuning.sweep import sweep_root


def _config(store: str, **fields):
    return tiny_train_config(
        store, "s3-resume-test", **{"steps": 6, "checkpoint_interval": 2, **fields}
    )


def _loop_config(config, tracking=None, run_location=None) -> dict:
    return {
        "config": config.model_dump(mode="json"),
        "store_info": check_against_store(config).model_dump(),
        "mlflow": tracking,
        "run_dir": None,
        "run_location": run_location,
    }


def _keys(prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def _put(key: str, data: bytes) -> None:
    boto3.client("s3").put_object(Bucket=S3_BUCKET, Key=key, Body=data)


@pytest.fixture(scope="module")
def trained(ball_store: str, tmp_path_factory: pytest.TempPathFactory, s3_server) -> dict:
    """A 6-step run (checkpoints 2, 4, 6) logged to a SQLite MLflow store, on local disk."""
    work = tmp_path_factory.mktemp("s3ckpt")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    config = _config(ball_store, run_name="r")
    handle = open_run(uri, config.experiment, "r", config.flat_params())
    tracking = {"tracking_uri": uri, "run_id": handle.run_id}
    run_worker(_loop_config(config, tracking), LocalContext(checkpoint_root=work / "run"))
    return {"dir": work / "run", "uri": uri, "run_id": handle.run_id, "config": config}


def _upload(local: Path, url: str) -> RunLocation:
    location = RunLocation.resolve(url)
    for step in (2, 4, 6):
        location.upload(str(local / checkpoint_dir_name(step)), checkpoint_dir_name(step))
    return location


@pytest.mark.fault_case(7)
def test_newest_complete_remote_checkpoint_wins(trained: dict) -> None:
    """6's ``state.pt`` is torn, 8 has no ``state.pt`` (upload under way): 4 wins."""
    url = f"s3://{S3_BUCKET}/discover/r"
    _upload(trained["dir"], url)
    whole = (trained["dir"] / checkpoint_dir_name(6) / STATE_FILE).read_bytes()
    _put(f"discover/r/{checkpoint_dir_name(6)}/{STATE_FILE}", whole[:1000])
    _put(f"discover/r/{checkpoint_dir_name(8)}/other.bin", b"x")
    _put("discover/r/not_a_checkpoint/state.pt", b"x")

    steps = [step for step, _ in checkpoint_dirs(url)]
    assert steps == [8, 6, 4, 2]
    where, payload = latest_checkpoint_state(url)
    assert payload["step"] == 4 and payload["mlflow_run_id"] == trained["run_id"]
    assert where == f"{url}/{checkpoint_dir_name(4)}/{STATE_FILE}"
    assert latest_checkpoint_state(RunLocation.resolve(url))[1]["step"] == 4


def test_missing_remote_run_has_no_checkpoint(s3_server) -> None:
    assert checkpoint_dirs(f"s3://{S3_BUCKET}/nothing/here") == []
    assert latest_checkpoint_state(f"s3://{S3_BUCKET}/nothing/here") is None


def test_missing_bucket_is_refused_in_one_line(trained: dict) -> None:
    config = trained["config"].model_copy(update={"storage_path": "s3://no-such-bucket/results"})
    with pytest.raises(NoisysegInputError, match="bucket 'no-such-bucket' does not exist"):
        plan_launch(config, check_against_store(config), trained["uri"])


@pytest.mark.fault_case(5)
def test_plan_launch_resumes_and_refuses_on_s3(trained: dict) -> None:
    _upload(trained["dir"], f"s3://{S3_BUCKET}/plan/r")
    config = trained["config"].model_copy(
        update={"storage_path": f"s3://{S3_BUCKET}/plan", "steps": 8}
    )
    plan = plan_launch(config, check_against_store(config), trained["uri"])
    assert plan.resume_step == 6 and plan.resume_run_id == trained["run_id"]
    assert plan.location.path == f"{S3_BUCKET}/plan/r"

    changed = config.model_copy(update={"channels": (8, 16)})
    with pytest.raises(NoisysegInputError, match="channels"):
        plan_launch(changed, check_against_store(changed), trained["uri"])


def test_force_new_on_s3_sets_the_run_aside(trained: dict) -> None:
    _upload(trained["dir"], f"s3://{S3_BUCKET}/aside/r")
    config = trained["config"].model_copy(update={"storage_path": f"s3://{S3_BUCKET}/aside"})
    plan = plan_launch(config, check_against_store(config), trained["uri"], force_new=True)
    assert plan.prior is None
    assert plan.set_aside_to.startswith(f"s3://{S3_BUCKET}/aside/r.old-")
    assert _keys("aside/r/") == []
    assert latest_checkpoint_state(plan.set_aside_to)[1]["step"] == 6


@pytest.mark.fault_case(7)
def test_worker_resumes_from_remote_newest_when_ray_lags(trained: dict, tmp_path: Path) -> None:
    """Ray hands back checkpoint 2; checkpoint 4 is complete in the bucket: steps 5, 6 run."""
    location = _upload(trained["dir"], f"s3://{S3_BUCKET}/worker/r")
    boto3.client("s3").delete_object(
        Bucket=S3_BUCKET, Key=f"worker/r/{checkpoint_dir_name(6)}/{STATE_FILE}"
    )
    context = LocalContext(restore=trained["dir"] / checkpoint_dir_name(2))
    run_worker(
        _loop_config(trained["config"], run_location=pickle.loads(pickle.dumps(location))), context
    )
    assert [r["step"] for r in context.reports] == [6]


def test_s3_filesystem_carries_endpoint_and_keys(s3_server) -> None:
    filesystem, path = resolve_filesystem(f"s3://{S3_BUCKET}/results/")
    assert path == f"{S3_BUCKET}/results"
    options = filesystem.__reduce__()[1][0]
    assert options["endpoint_override"] == s3_server.endpoint
    assert options["access_key"] == "testing" and options["region"] == "us-east-1"
    local, local_path = resolve_filesystem("~/results")
    assert isinstance(local, pafs.LocalFileSystem) and local_path == str(Path.home() / "results")


@pytest.mark.fault_case(15)
def test_tracking_run_checked_on_s3(trained: dict, tmp_path: Path) -> None:
    """A checkpoint whose MLflow run another tracking server has is refused, as on local disk."""
    _upload(trained["dir"], f"s3://{S3_BUCKET}/other/r")
    config = trained["config"].model_copy(update={"storage_path": f"s3://{S3_BUCKET}/other"})
    other = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(other).search_experiments()
    with pytest.raises(NoisysegInputError, match="does not have"):
        plan_launch(config, check_against_store(config), other)


def test_sweep_root_on_object_storage_resolves_to_the_bucket() -> None:
    """Sweeps on s3 are supported (tests/tuning/test_tune_s3*.py); the root resolves remote."""
    location = sweep_root(f"s3://{S3_BUCKET}/tune")
    assert location.remote and location.path == f"{S3_BUCKET}/tune"
