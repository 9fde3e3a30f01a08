"""Index of the 15 fault cases of issue 13: each case, the fault, and the tests that reproduce it
and assert the new behaviour. Every test listed carries ``@pytest.mark.fault_case(N, ...)``;
``test_every_fault_case_has_a_test`` checks (by parsing the test files) that the markers cover
1..15 and that this index and the markers name the same tests. Tests marked ``integration`` are
listed too (they start Ray, MLflow servers or subprocesses: ``-m integration``).

 1. deleted image / truth-label chunk read as zeros (evaluate exits 0 on damage)
    tests/storage/test_store_integrity.py::test_deleted_image_chunk_fails_every_read_path
    tests/storage/test_store_integrity.py::test_deleted_truth_chunk_fails_instead_of_reading_no_lesion
    tests/storage/test_store_integrity.py::test_sharded_arrays_are_checked_through_zarr
    tests/storage/test_store_integrity.py::test_patch_stream_fails_on_a_damaged_store
    tests/storage/test_store_integrity.py::test_verify_cli_ok_damaged_and_repair
    tests/test_fault_cases.py::test_evaluate_refuses_a_store_with_a_deleted_chunk
 2. kill -9 during corrupt --overwrite leaves masks that disagree with the provenance
    tests/storage/test_kill_overwrite.py::test_sigkill_corrupt_overwrite
    tests/storage/test_store_atomic.py::test_overwrite_switches_versions_and_removes_the_old
    tests/storage/test_store_atomic.py::test_interrupted_overwrite_is_invisible_and_cleaned
    tests/storage/test_corrupt.py::test_failure_midway_registers_nothing
 3. kill -9 during ingest --overwrite: old store gone, partial new one looks complete
    tests/storage/test_kill_overwrite.py::test_sigkill_ingest_overwrite
    tests/storage/test_store_atomic.py::test_publish_dir_and_recover_after_a_kill_between_renames
    tests/storage/test_store_atomic.py::test_replace_store_swaps_at_the_end_or_leaves_the_old
    tests/storage/test_ingest_msd_brats.py::test_overwrite_rebuilds_beside_the_old_store_and_refuses_a_foreign_folder
 4. predict --name silently overwrites earlier predictions; run id not recorded
    tests/storage/test_store_atomic.py::test_prediction_refused_without_overwrite_and_provenance_kept
    tests/distributed/test_predict_scans.py::test_store_predictions_refuse_existing_name_and_record_provenance
 5. re-running a --run-name with another network: traceback, earlier run flipped to FAILED
    tests/distributed/test_resume.py::test_changed_network_or_data_is_refused_before_any_work
    tests/distributed/test_resume.py::test_identity_allows_more_steps_and_names_each_difference
    tests/distributed/test_resume.py::test_force_new_sets_the_old_run_aside
    tests/distributed/test_s3_checkpoints.py::test_plan_launch_resumes_and_refuses_on_s3
 6. patch larger than the volume padded silently; no memory bound (workers OOM-killed)
    tests/distributed/test_faults_train.py::test_patch_larger_than_the_smallest_volume_is_refused
    tests/distributed/test_faults_train.py::test_run_that_cannot_fit_in_memory_is_refused_before_ray
 7. killed worker resumes a checkpoint behind the newest; MLflow holds redone steps twice
    tests/distributed/test_resume.py::test_worker_resumes_from_the_newest_checkpoint_on_disk
    tests/distributed/test_resume.py::test_resumed_run_logs_each_step_once
    tests/distributed/test_s3_checkpoints.py::test_newest_complete_remote_checkpoint_wins
    tests/distributed/test_s3_checkpoints.py::test_worker_resumes_from_remote_newest_when_ray_lags
    tests/distributed/test_train_ray.py::test_killed_worker_recovers_from_checkpoint
    tests/distributed/test_faults_train.py::test_killed_launcher_stops_its_workers_and_the_relaunch_resumes
 8. killed train driver: worker trains on, run stays RUNNING, resume line names a wrong step
    tests/distributed/test_faults_train.py::test_workers_stop_and_save_when_the_launcher_is_gone
    tests/distributed/test_faults_train.py::test_killed_launcher_stops_its_workers_and_the_relaunch_resumes
    tests/distributed/test_run_guard.py::test_a_dead_launcher_run_is_marked_killed_with_where_it_stopped
 9. relative --store passes the driver, then fails in the worker (run folder as cwd)
    tests/distributed/test_resume.py::test_relative_store_is_made_absolute_where_it_is_typed
10. disk full, uncreatable destination, s3/gs/unknown protocol, truncated store files: tracebacks
    tests/storage/test_filesystems.py::test_unknown_protocol_is_one_line
    tests/storage/test_filesystems.py::test_missing_optional_package_names_it
    tests/storage/test_filesystems.py::test_os_errors_are_translated
    tests/storage/test_filesystems.py::test_boto_errors_are_translated
    tests/storage/test_store_integrity.py::test_deleted_manifest_and_truncated_metadata_are_one_line
    tests/storage/test_store_integrity.py::test_truncated_index_and_root_metadata_are_one_line
    tests/test_fault_cases.py::test_ingest_into_an_uncreatable_destination_is_one_line
    tests/test_fault_cases.py::test_ingest_onto_a_full_disk_is_one_line
11. tune --metric val/AP not checked up front; parent run left RUNNING; hint names --mode
    tests/tuning/test_tune_faults.py::test_unreported_metric_is_one_line_before_any_work
12. label file without an image ignored silently; ingest exits 1 instead of 2
    tests/storage/test_ingest_msd_brats.py::test_bad_input_one_line_naming_case_and_file_good_cases_proceed
    tests/storage/test_ingest_msd_brats.py::test_cli_exit_2_with_one_line_per_bad_case
    tests/storage/test_storage_cli.py::test_cli_ingest_exit_codes_and_error_lines
13. tune's default --max-concurrent hangs on 2 CPUs; Ctrl-C ends in a traceback
    tests/tuning/test_tune_faults.py::test_concurrency_is_bounded_by_what_the_cluster_can_place
    tests/tuning/test_tune_faults.py::test_default_concurrency_finishes_on_a_two_cpu_cluster
    tests/tuning/test_tune_faults.py::test_unplaceable_trial_is_refused_before_any_trial_runs
    tests/tuning/test_tune_faults.py::test_ctrl_c_ends_with_one_line_parent_killed_and_server_stopped
    tests/tuning/test_tune_faults.py::test_worker_group_that_cannot_be_placed_fails_its_trial_with_a_reported_error
14. tune --steps 12 fails on the default --grace-period 100 the user never set
    tests/tuning/test_tune_faults.py::test_grace_period_adapts_to_short_runs_and_only_explicit_values_fail
15. checkpoint naming an MLflow run the tracking server lacks (or deleted), or another project's
    tests/distributed/test_resume.py::test_checkpoint_of_another_tracking_server_is_refused
    tests/distributed/test_resume.py::test_checkpoint_of_another_store_is_refused
    tests/distributed/test_resume.py::test_checkpoint_records_where_it_logs
    tests/distributed/test_s3_checkpoints.py::test_tracking_run_checked_on_s3
    tests/test_fault_cases.py::test_checkpoint_whose_mlflow_run_was_deleted_is_refused

The tests defined here fill gaps the other modules left: case 1 through ``noisyseg evaluate``
itself, case 10's disk full and uncreatable destination through ``noisyseg ingest``, and case
15's deleted MLflow run. All use real parts (Zarr stores, NIfTI files, a tmpfs, MLflow SQLite).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from noisyseg.cli import main

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CASES = set(range(1, 16))


# ------------------------------------------------------------------------------ the index
def _marked_tests() -> dict[str, set[int]]:
    """``{"tests/...py::name": {case, ...}}`` of every test function with a
    ``pytest.mark.fault_case(...)`` decorator, read with ``ast`` (no import, no collection)."""
    found: dict[str, set[int]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                if not (
                    isinstance(decorator, ast.Call)
                    and ast.unparse(decorator.func) in ("pytest.mark.fault_case", "mark.fault_case")
                ):
                    continue
                numbers = []
                for arg in decorator.args:
                    assert isinstance(arg, ast.Constant) and type(arg.value) is int, (
                        f"{path}:{decorator.lineno}: fault_case takes integer literals"
                    )
                    numbers.append(arg.value)
                assert numbers, f"{path}:{decorator.lineno}: fault_case() without a case number"
                key = f"{path.relative_to(REPO).as_posix()}::{node.name}"
                found.setdefault(key, set()).update(numbers)
    return found


def _indexed_tests() -> dict[str, set[int]]:
    """The same mapping as the module docstring states it."""
    indexed: dict[str, set[int]] = {}
    current = None
    for line in (__doc__ or "").splitlines():
        head = re.match(r"^\s?(\d{1,2})\. \S", line)
        if head:
            current = int(head.group(1))
            continue
        test = re.match(r"^\s+(tests/\S+\.py::\w+)\s*$", line)
        if test:
            assert current is not None, line
            indexed.setdefault(test.group(1), set()).add(current)
    return indexed


def test_every_fault_case_has_a_test() -> None:
    marked = _marked_tests()
    covered = set().union(*marked.values()) if marked else set()
    assert CASES - covered == set(), f"fault cases without a marked test: {CASES - covered}"
    assert covered - CASES == set(), f"fault_case numbers outside 1..15: {covered - CASES}"
    # the index in this module's docstring names exactly the marked tests, with their cases
    indexed = _indexed_tests()
    assert set(indexed) == set(marked), {
        "in the index, not marked": sorted(set(indexed) - set(marked)),
        "marked, not in the index": sorted(set(marked) - set(indexed)),
    }
    differ = {k: (indexed[k], marked[k]) for k in marked if indexed[k] != marked[k]}
    assert differ == {}, f"index cases != marker cases: {differ}"
    headed = {int(m) for m in re.findall(r"^\s?(\d{1,2})\. \S", __doc__ or "", re.M)}
    assert headed == CASES


# ------------------------------------------------------------------------------ case 1
def _store_and_checkpoint(tmp_path: Path) -> tuple[str, Path]:
    """A 2-case test split (16³, several image chunks per case) and a tiny U-Net checkpoint."""
    import torch

    from noisyseg.models import UNetSpec, build_unet
    from noisyseg.storage.store import VolumeStore

    url = str(tmp_path / "s.zarr")
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"], chunk_bytes=4096)
    rng = np.random.default_rng(0)
    for cid in ("c0", "c1"):
        label = np.zeros((16, 16, 16), np.uint8)
        label[2:6, 3:7, 4:8] = 1
        label[10:13, 9:12, 9:12] = 1
        image = (label * 4.0 + rng.normal(size=label.shape)).astype(np.float32)[None]
        st.write_case(cid, image, {"truth": label}, spacing=(1.0, 1.0, 1.0), split="test")
    st.compact()
    spec = UNetSpec(spatial_dims=3, in_channels=1, channels=(4, 8), num_res_units=0)
    torch.manual_seed(0)
    checkpoint = tmp_path / "final.pt"
    torch.save(
        {
            "model": build_unet(spec).eval().state_dict(),
            "unet_spec": spec.to_dict(),
            "config": {"patch_size": 16, "val_overlap": 0.25},
            "step": 1,
        },
        checkpoint,
    )
    return url, checkpoint


def _one_chunk(url: str, array: str) -> str:
    """A chunk key the array's manifest lists (a chunk noisyseg wrote)."""
    return sorted(json.loads(Path(url, array, "manifest.json").read_text())["chunks"])[0]


def _error_lines(stderr: str) -> list[str]:
    """The command's error lines (stderr also carries the progress bar)."""
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.mark.fault_case(1)
def test_evaluate_refuses_a_store_with_a_deleted_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Case 1 as reported: ``noisyseg evaluate`` scored a zero-filled volume (image chunk lost)
    and 0 lesions (truth chunk lost) with exit status 0. Now: status 2, one line naming case,
    array and chunk."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    url, checkpoint = _store_and_checkpoint(tmp_path)
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-log"]
    assert main([*argv, "--store", url]) == 0  # the intact store evaluates
    capsys.readouterr()

    image_damaged = str(tmp_path / "image.zarr")
    shutil.copytree(url, image_damaged)
    key = _one_chunk(image_damaged, "cases/c1/0")
    Path(image_damaged, "cases/c1/0", key).unlink()
    assert main([*argv, "--store", image_damaged]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert f"case c1: image chunk 0/{key} is missing" in err[0]
    assert err[0].endswith("run noisyseg verify")

    truth_damaged = str(tmp_path / "truth.zarr")
    shutil.copytree(url, truth_damaged)
    key = _one_chunk(truth_damaged, "cases/c0/labels/truth/0")
    Path(truth_damaged, "cases/c0/labels/truth/0", key).unlink()
    assert main([*argv, "--store", truth_damaged]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert f"case c0: label set truth chunk labels/truth/0/{key} is missing" in err[0]


# ------------------------------------------------------------------------------ case 10
def _nifti_source(root: Path, size: int = 32) -> Path:
    """An nnU-Net-style folder with two labelled cases of random (incompressible) images."""
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "t1"},
                "labels": {"background": 0, "lesion": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    rng = np.random.default_rng(0)
    for cid in ("a", "b"):
        image = rng.normal(size=(size,) * 3).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{cid}_0000.nii.gz"))
        label = np.zeros((size,) * 3, np.uint8)
        label[2:5, 2:5, 2:5] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"{cid}.nii.gz"))
    return root


@pytest.mark.fault_case(10)
def test_ingest_into_an_uncreatable_destination_is_one_line(tmp_path: Path, capsys) -> None:
    """A destination whose parent is a file cannot be created: one line, status 2."""
    source = _nifti_source(tmp_path / "src", size=8)
    (tmp_path / "afile").write_text("not a folder")
    destination = tmp_path / "afile" / "s.zarr"
    assert main(["ingest", str(source), str(destination), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"noisyseg ingest: error: {destination}: a parent of this path is a file, not a folder"
    ]


def _tmpfs_namespace_works(mountpoint: Path) -> bool:
    """Whether a private mount namespace with a tmpfs can be made here (root, or user
    namespaces); the mount vanishes with the namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(mountpoint)],
        capture_output=True,
        timeout=60,
    )
    return probe.returncode == 0


@pytest.mark.fault_case(10)
def test_ingest_onto_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """A real full disk: ``noisyseg ingest`` into a 16 KiB tmpfs (private mount namespace) ends
    with one line naming the store and "disk full", status 2, no traceback."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if not _tmpfs_namespace_works(mountpoint):
        pytest.skip("no private mount namespace with tmpfs here (needs unshare and root/userns)")
    source = _nifti_source(tmp_path / "src")
    noisyseg = Path(sys.executable).parent / "noisyseg"
    script = 'mount -t tmpfs -o size=16k tmpfs "$0" && exec "$1" ingest "$2" "$0/s.zarr" "$3"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, str(mountpoint), str(noisyseg), str(source),
         "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    err = [line for line in done.stderr.splitlines() if line.startswith("noisyseg ingest:")]
    assert len(err) == 1, done.stderr
    assert err[0].startswith(f"noisyseg ingest: error: {mountpoint / 's.zarr'}: ")
    assert "no space left on the device (disk full)" in err[0]


# ------------------------------------------------------------------------------ case 15
@pytest.mark.fault_case(15)
def test_checkpoint_whose_mlflow_run_was_deleted_is_refused(tmp_path: Path) -> None:
    """A re-run whose checkpoint names an MLflow run that was deleted on this tracking server is
    refused before any work (it crashed with RESOURCE_DOES_NOT_EXIST inside the Ray job)."""
    from cluster_utils import make_ball_store
    from mlflow import MlflowClient

    from noisyseg.distributed.config import check_against_store, make_config
    from noisyseg.distributed.tracking import open_run
    from noisyseg.distributed.train_loop import LocalContext, run_worker
    from noisyseg.distributed.trainer import plan_launch
    from noisyseg.errors import NoisysegInputError

    store = make_ball_store(tmp_path / "s.zarr", train=2, val=1, size=16)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(
        {"store": store, "labels": "noisy", "loss": "bce", "patch_size": 16, "batch_size": 1,
         "channels": [4, 8], "num_res_units": 0, "val_cases": 0, "log_interval": 1,
         "steps": 2, "checkpoint_interval": 2, "run_name": "r", "experiment": "fault-15",
         "storage_path": str(tmp_path / "results")}
    )  # fmt: skip
    handle = open_run(uri, config.experiment, "r", config.flat_params())
    loop = {
        "config": config.model_dump(mode="json"),
        "store_info": check_against_store(config).model_dump(),
        "mlflow": {"tracking_uri": uri, "run_id": handle.run_id},
        "run_dir": None,
    }
    run_worker(loop, LocalContext(checkpoint_root=tmp_path / "results" / "r"))
    longer = config.model_copy(update={"steps": 4})
    info = check_against_store(longer)
    assert plan_launch(longer, info, uri).resume_run_id == handle.run_id  # resumable as is

    MlflowClient(uri).delete_run(handle.run_id)
    with pytest.raises(NoisysegInputError) as error:
        plan_launch(longer, info, uri)
    message = str(error.value)
    assert "\n" not in message
    assert f"its MLflow run {handle.run_id} is deleted on {uri}" in message
