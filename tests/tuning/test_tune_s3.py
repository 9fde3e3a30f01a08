"""Sweeps on object storage without Ray (issue 15, item 1): a real S3-compatible server (moto).

* The sweep's own files (state, ``summary/``, ``best.yaml``) are written to and read back from
  ``s3://`` through the same code a sweep runs (``--best`` on a sweep name and on its URL).
* ``noisyseg tune --storage-path s3://...`` checks, before any Ray or MLflow work, what a sweep on
  object storage needs: ``MLFLOW_TRACKING_URI`` and a bucket that exists (one line, exit 2).

The Ray end of it (Tune writing, and restoring, its experiment on ``s3://``) is
``test_tune_s3_resume.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from cluster_utils import S3_BUCKET, ray_env

from noisyseg.distributed.config import make_config
from noisyseg.errors import NoisysegInputError
from noisyseg.tuning.plan import SweepSettings
from noisyseg.tuning.space import parse_space
from noisyseg.tuning.summary import best_config_yaml
from noisyseg.tuning.sweep import (
    _write_state,
    _write_sweep_files,
    best_yaml_of,
    check_sweep_tracking,
    find_sweep_dir,
    read_state,
    resolve_sweep_tracking,
    storage_env,
    sweep_root,
)

ROOT = f"s3://{S3_BUCKET}/tune"


def _keys(prefix: str) -> set[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def _rows() -> list[dict]:
    def row(trial_id: str, weight: float, loss: float) -> dict:
        return {
            "trial_id": trial_id,
            "run_id": None,
            "status": "completed",
            "last_step": 4,
            "point": {"entropy_weight": weight},
            "metric_last": loss,
            "metric_best": loss,
            "history": [(2, loss + 0.1), (4, loss)],
            "error": None,
            "best": False,
        }

    return [row("a_00000", 0.1, 0.5), row("a_00001", 0.6, 0.4)]


def test_state_summary_and_best_live_in_the_s3_sweep_folder(s3_server, ball_store: str) -> None:
    sweep = sweep_root(ROOT).child("s3sweep")
    assert (
        sweep.remote
        and sweep.url == f"{ROOT}/s3sweep"
        and sweep.path == f"{S3_BUCKET}/tune/s3sweep"
    )
    _write_state(sweep, name="s3sweep", parent_run_id="p1", status="running")
    _write_state(sweep, status="finished")
    assert _keys("tune/s3sweep/") == {"tune/s3sweep/noisyseg_sweep.json"}
    assert read_state(sweep)["parent_run_id"] == "p1" and read_state(sweep)["status"] == "finished"
    # found by name under --storage-path and by its URL; nothing was written locally
    assert find_sweep_dir("s3sweep", ROOT).url == sweep.url
    assert find_sweep_dir(sweep.url).url == sweep.url
    with pytest.raises(NoisysegInputError, match="no best trial yet"):
        best_yaml_of(sweep.url)

    rows = _rows()
    rows[1]["best"] = True
    base = {"store": ball_store, "labels": "noisy", "steps": 4, "patch_size": 16}
    text = best_config_yaml(base, rows[1], sweep="s3sweep", metric="train_loss")
    settings = SweepSettings(
        name="s3sweep", base=base, space=parse_space(["entropy_weight=grid(0.1,0.6)"], None)
    )
    settings.metric, settings.mode = "train_loss", "min"
    staging = Path(ball_store).parent / "staging"
    staging.mkdir()
    files = _write_sweep_files(settings, rows, text, sweep, staging)
    assert {f.name for f in files} == {
        "trials.csv",
        "trials.md",
        "metric_vs_search.png",
        "best.yaml",
    }
    assert all(f.is_file() and staging in f.parents for f in files)  # local copies, for MLflow
    assert _keys("tune/s3sweep/") == {
        "tune/s3sweep/noisyseg_sweep.json",
        "tune/s3sweep/best.yaml",
        "tune/s3sweep/summary/trials.csv",
        "tune/s3sweep/summary/trials.md",
        "tune/s3sweep/summary/metric_vs_search.png",
    }
    shown = best_yaml_of("s3sweep", ROOT)
    assert shown == text and make_config(yaml.safe_load(shown)).entropy_weight == pytest.approx(0.6)


def test_trial_actors_get_the_launchers_storage_variables(s3_server) -> None:
    env = storage_env(sweep_root(ROOT))
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert env["AWS_ACCESS_KEY_ID"] == "testing" and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert storage_env(sweep_root("/tmp/sweeps")) == {}


def test_s3_sweep_needs_a_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    location = sweep_root(ROOT).child("x")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(NoisysegInputError, match="needs MLFLOW_TRACKING_URI") as error:
        check_sweep_tracking(location)
    assert location.url in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(NoisysegInputError, match="needs MLFLOW_TRACKING_URI"):
        resolve_sweep_tracking(location, 1)  # never starts a server for object storage
    check_sweep_tracking(sweep_root("/tmp/sweeps"))  # a local sweep starts its own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_sweep_tracking(location)


def _tune(store: str, storage: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [
        *(sys.executable, "-m", "noisyseg.cli", "tune", "--name", "refused"),
        *("--store", store, "--labels", "noisy", "--patch-size", "16", "--steps", "4"),
        *("--space", "entropy_weight=grid(0.1,0.6)", "--metric", "train_loss"),
        *("--metric-mode", "min", "--storage-path", storage),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_an_s3_sweep_it_cannot_run_in_one_line(s3_server, ball_store: str) -> None:
    env = ray_env(PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    done = _tune(ball_store, ROOT, env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "needs MLFLOW_TRACKING_URI" in lines[0] and f"{ROOT}/refused" in lines[0]

    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # never contacted: refused before
    done = _tune(ball_store, "s3://no-such-bucket/tune", env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "bucket 'no-such-bucket' does not exist" in lines[0]
    assert not _keys("tune/refused")  # nothing written


def test_a_local_sweep_folder_gets_the_same_files_in_place(tmp_path: Path, ball_store: str) -> None:
    sweep = sweep_root(str(tmp_path / "sweeps")).child("local")
    assert not sweep.remote and sweep.url == sweep.path == str(tmp_path / "sweeps" / "local")
    _write_state(sweep, parent_run_id="p2", status="running")
    rows = _rows()
    rows[0]["best"] = True
    base = {"store": ball_store, "labels": "noisy", "steps": 4, "patch_size": 16}
    text = best_config_yaml(base, rows[0], sweep="local", metric="train_loss")
    settings = SweepSettings(
        name="local", base=base, space=parse_space(["entropy_weight=grid(0.1,0.6)"], None)
    )
    staging = tmp_path / "staging"
    staging.mkdir()
    files = _write_sweep_files(settings, rows, text, sweep, staging)
    folder = tmp_path / "sweeps" / "local"
    assert {f.parent for f in files} == {folder, folder / "summary"} and not any(staging.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.yaml",
        "noisyseg_sweep.json",
        "summary",
    ]
    assert (
        find_sweep_dir(str(folder)).url == sweep.url and read_state(sweep)["parent_run_id"] == "p2"
    )
    assert best_yaml_of("local", str(tmp_path / "sweeps")) == text
