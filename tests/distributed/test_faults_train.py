"""Faults of `noisyseg train` (issue 13, cases 6 and 8, Ctrl-C, quiet by default).

Bounds before work (no Ray): a patch larger than the smallest training volume and a run that
cannot fit in a worker's memory are refused with one line; the activation part of the memory
estimate is checked against the memory a real forward pass holds.

Integration (a real Ray head and a real MLflow server, shared by the module): a killed launcher
stops its workers and its MLflow run says so; the re-launch resumes from the step it names, the
history holds each step once and the terminal shows only noisyseg's lines; Ctrl-C ends with one
line, the run KILLED and the workers stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cluster_utils import VENV_BIN, make_ball_store, ray_env
from mlflow import MlflowClient

from noisyseg.cli import main
from noisyseg.distributed.checkpoints import latest_checkpoint_state
from noisyseg.distributed.config import check_against_store, make_config
from noisyseg.distributed.memory import META_PASSES, estimate_worker_memory
from noisyseg.distributed.progress import ProgressSender
from noisyseg.distributed.tracking import open_run
from noisyseg.distributed.train_loop import LocalContext, run_worker
from noisyseg.errors import NoisysegInputError
from noisyseg.models import UNetSpec, build_unet, count_parameters

REPO = Path(__file__).resolve().parents[2]
RAY_HEAD_CPUS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults_train")


@pytest.fixture(scope="module")
def store(workspace: Path) -> str:
    return make_ball_store(workspace / "balls.zarr", train=3, val=1, size=16, seed=2)


# ------------------------------------------------------------------------------ bounds (no Ray)
@pytest.mark.fault_case(6)
def test_patch_larger_than_the_smallest_volume_is_refused(store: str) -> None:
    config = make_config({"store": store, "patch_size": 32, "channels": [4, 8], "val_cases": 0})
    with pytest.raises(NoisysegInputError) as error:
        check_against_store(config)
    message = str(error.value)
    assert "patch_size [32, 32, 32] is larger than training case" in message
    assert "16x16x16 voxels" in message and "fits every training case is [16, 16, 16]" in message


@pytest.mark.fault_case(6)
def test_run_that_cannot_fit_in_memory_is_refused_before_ray(
    store: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Batch 100,000 of 16³ patches through 64..256 channels: over 200 GiB of activations."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["train", "--store", store, "--patch-size", "16", "--batch-size", "100000",
            "--channels", "64", "128", "256", "--val-cases", "0", "--steps", "1",
            "--storage-path", str(tmp_path / "results")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "training needs about" in err[0] and "per worker but available memory" in err[0]
    assert "GiB" in err[0] and "lower --patch-size or --batch-size" in err[0]
    import ray

    assert not ray.is_initialized()  # refused before Ray


def test_model_state_and_passes_by_hand() -> None:
    spec = UNetSpec(spatial_dims=3, in_channels=2, channels=(4, 8, 16), num_res_units=1)
    parameters = count_parameters(build_unet(spec))
    sgd = estimate_worker_memory(spec, batch_size=2, patch=(16, 16, 16))
    adamw = estimate_worker_memory(
        spec, batch_size=2, patch=(16, 16, 16), optimizer="adamw", reweight="meta"
    )
    assert sgd.parameters == parameters
    assert sgd.model_state == parameters * 4 * 3  # weights, grads, momentum (float32)
    assert adamw.model_state == parameters * 4 * 4  # weights, grads, two Adam moments
    assert (sgd.passes, adamw.passes) == (1, META_PASSES)
    assert sgd.inputs == 2 * 16**3 * 4 * (2 + 1)  # images (2 channels) and labels
    assert adamw.inputs == 2 * sgd.inputs  # a clean batch as well
    assert adamw.total - adamw.runtime > sgd.total - sgd.runtime + 2 * sgd.activations


MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import psutil, torch
    from noisyseg.distributed.memory import activation_bytes
    from noisyseg.models import UNetSpec, build_unet

    torch.set_num_threads(1)
    spec = UNetSpec(spatial_dims=3, in_channels=1, channels=(8, 16, 32), num_res_units=1)
    batch, patch = int(sys.argv[1]), tuple(int(v) for v in sys.argv[2:])
    model = build_unet(spec).train()
    x = torch.randn(batch, 1, *patch)
    out = model(x)  # warm-up: one-off allocations (thread pools, kernels' workspaces)
    del out
    gc.collect()
    rss = psutil.Process().memory_info().rss
    out = model(x)
    held = psutil.Process().memory_info().rss - rss
    print(json.dumps({"held": held, "estimate": activation_bytes(spec, batch, patch),
                      "input": x.numel() * 4}))
    """
)


@pytest.mark.parametrize("shape", [(2, 64, 64, 64), (1, 96, 96, 64)])
def test_activation_estimate_matches_the_memory_a_forward_pass_holds(shape) -> None:
    """Independent check: the resident memory a real CPU forward pass adds (every large tensor
    mmapped, so RSS follows allocations) against the meta-device count, within 15 %."""
    import json

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, shape)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    # the input tensor existed before the measurement but is part of what autograd keeps
    expected = numbers["estimate"] - numbers["input"]
    assert 0.85 < numbers["held"] / expected < 1.15, numbers


# ------------------------------------------------------------------------------ lost launcher
class LauncherGoneAfter(ProgressSender):
    """A launcher that answers ``n`` liveness checks, then is gone (what the real sender reports
    once Ray has removed the inbox of a dead launcher). Records what rank 0 sends."""

    def __init__(self, n: int) -> None:
        super().__init__(None)
        self.left = n
        self.records: list = []

    def launcher_alive(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def send(self, record) -> None:
        self.records.append(record)


@pytest.mark.fault_case(8)
def test_workers_stop_and_save_when_the_launcher_is_gone(store: str, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config({"store": store, "labels": "truth", "loss": "bce", "patch_size": 16,
                          "batch_size": 1, "channels": [4, 8], "num_res_units": 0,
                          "val_cases": 0, "steps": 20, "log_interval": 2,
                          "checkpoint_interval": 10, "run_name": "g", "experiment": "faults"})  # fmt: skip
    handle = open_run(uri, "faults", "g", config.flat_params())
    run_dir = tmp_path / "run"
    loop = {
        "config": config.model_dump(mode="json"),
        "store_info": check_against_store(config).model_dump(),
        "mlflow": {"tracking_uri": uri, "run_id": handle.run_id},
        "run_dir": str(run_dir),
    }
    sender = LauncherGoneAfter(3)  # alive at the flushes of steps 2, 4, 6; gone at step 8
    context = LocalContext(sender=sender)
    metrics = run_worker(loop, context)

    assert metrics["step"] == 8 and context.reports == []  # stopped before checkpoint 10
    assert [r.step for r in sender.records if r.kind == "step"] == [2, 4, 6, 8]
    assert latest_checkpoint_state(run_dir)[1]["step"] == 8  # saved where it stopped
    client = MlflowClient(uri)
    run = client.get_run(handle.run_id)
    assert run.info.status == "KILLED"
    assert "stopped at step 8" in run.data.tags["noisyseg.end_reason"]
    assert sorted(m.step for m in client.get_metric_history(handle.run_id, "train/loss")) == list(
        range(1, 9)
    )


# ------------------------------------------------------------------------------ integration
ARGS = ["--labels", "truth", "--loss", "bce", "--patch-size", "16", "--batch-size", "1",
        "--channels", "4", "8", "--num-res-units", "0", "--val-cases", "0", "--workers", "1",
        "--experiment", "faults", "--log-interval", "1", "--checkpoint-interval", "5"]  # fmt: skip


def _history_steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _run_named(uri: str, name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("faults")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`noisyseg.run_name` = '{name}'"
    )
    return run


def _wait(predicate, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: launcher exited early:\n{process.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.3)


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "noisyseg"), "train", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.fault_case(7, 8)
@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_killed_launcher_stops_its_workers_and_the_relaunch_resumes(
    ray_head, mlflow_server, store: str, workspace: Path
) -> None:
    results = workspace / "results"
    pids = workspace / "pids"
    pids.mkdir()
    env = ray_env(
        RAY_ADDRESS=ray_head.address,
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        NOISYSEG_TEST_PID_DIR=str(pids),
        NOISYSEG_TEST_STEP_DELAY_S="0.4",
    )
    args = ["--store", store, *ARGS, "--steps", "30", "--run-name", "d1",
            "--storage-path", str(results)]  # fmt: skip
    launcher = _launch(args, env)
    try:
        _wait(lambda: (results / "d1" / "checkpoint_0000005").is_dir(), 900, "checkpoint 5",
              launcher)  # fmt: skip
        launcher.kill()  # SIGKILL: no chance to clean up
        launcher.wait(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    uri = mlflow_server.uri
    run = _run_named(uri, "d1")

    def killed() -> bool:
        return MlflowClient(uri).get_run(run.info.run_id).info.status == "KILLED"

    _wait(killed, 120, "MLflow run marked KILLED")
    reason = MlflowClient(uri).get_run(run.info.run_id).data.tags["noisyseg.end_reason"]
    assert "launcher" in reason and "stopped at step" in reason, reason
    logged = _history_steps(uri, run.info.run_id)
    time.sleep(5)  # at 0.4 s per step a worker still training would log ~12 more steps
    assert _history_steps(uri, run.info.run_id) == logged
    newest = latest_checkpoint_state(results / "d1")[1]["step"]
    # Ray ends the dead driver's job, workers included, usually before rank 0 notices; then the
    # run guard marks the run and names the step a re-launch resumes from. When rank 0 noticed
    # first, it saved where it stopped. Either way the re-launch resumes from the newest state.
    assert 5 <= newest <= max(logged)
    if "was killed" in reason:  # the run guard's line
        assert f"stopped at step {max(logged)}" in reason
        assert f"resumes from checkpoint step {newest}" in reason
    else:  # rank 0 ended the run: it saved where it stopped
        assert newest == max(logged), reason

    env.pop("NOISYSEG_TEST_STEP_DELAY_S")
    again = subprocess.run(
        [str(VENV_BIN / "noisyseg"), "train", *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-6000:]
    assert f"resuming from step {newest};" in output
    assert f"resumed from step {newest} " in output  # what the worker actually did
    assert _history_steps(uri, run.info.run_id) == list(range(1, 31))  # each step once
    final = MlflowClient(uri).get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    assert final.data.tags["noisyseg.end_reason"] == "completed 30 steps"
    # quiet by default: only noisyseg's own lines, and the log file it names exists
    lines = [line for line in output.splitlines() if line.strip()]
    assert all(line.startswith("[noisyseg train]") for line in lines), output[-6000:]
    assert "memory per worker ~" in output
    assert (results / "d1" / "noisyseg.log").is_file()
    assert f"Ray and MLflow logs: {results / 'd1' / 'noisyseg.log'}" in output


@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_ctrl_c_ends_with_one_line_and_stops_the_workers(
    ray_head, mlflow_server, store: str, workspace: Path
) -> None:
    results = workspace / "results"
    env = ray_env(
        RAY_ADDRESS=ray_head.address,
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        NOISYSEG_TEST_STEP_DELAY_S="0.4",
    )
    args = ["--store", store, *ARGS, "--steps", "200", "--run-name", "c1",
            "--storage-path", str(results)]  # fmt: skip
    launcher = _launch(args, env)
    try:
        _wait(lambda: (results / "c1" / "checkpoint_0000005").is_dir(), 900, "checkpoint 5",
              launcher)  # fmt: skip
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, output[-4000:]
    assert output.strip().splitlines()[-1] == "noisyseg train: interrupted", output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    run = _run_named(mlflow_server.uri, "c1")
    assert run.info.status == "KILLED"
    assert run.data.tags["noisyseg.end_reason"] == "interrupted (Ctrl-C)"
    logged = _history_steps(mlflow_server.uri, run.info.run_id)
    time.sleep(5)
    assert _history_steps(mlflow_server.uri, run.info.run_id) == logged  # workers stopped
