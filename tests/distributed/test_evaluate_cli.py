"""``noisyseg evaluate`` / ``noisyseg predict`` end to end on a tiny real store, real MLflow
(SQLite) and a real local Ray cluster (one per module).

The "perfect" model: the store's image is the truth mask itself and the network is a 1x1 conv
with a large weight, so after the z-score the prediction is ~1 on lesions and ~0 elsewhere —
every lesion must be found, with no false positive and Dice 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from noisyseg.cli import main
from noisyseg.distributed.evaluation import evaluate_cases
from noisyseg.distributed.prediction_io import read_prediction, write_prediction
from noisyseg.distributed.sliding_window import case_normalization_stats, predict_volume
from noisyseg.errors import NoisysegInputError
from noisyseg.metrics import lesion_metrics
from noisyseg.models import UNetSpec, build_unet
from noisyseg.storage.store import VolumeStore

SHAPE = (20, 24, 28)
SPACING = (2.0, 1.0, 0.5)
SPEC = UNetSpec(spatial_dims=3, in_channels=1, channels=(4, 8), num_res_units=0, norm="batch")
ROI = 16


def _label(rng: np.random.Generator) -> np.ndarray:
    """Three to five separate box lesions of different sizes."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    corners = [(1, 1, 1), (12, 2, 3), (3, 14, 18), (13, 15, 4), (6, 6, 12)]
    for k, (z, y, x) in enumerate(corners[: rng.integers(3, 6)]):
        size = 1 + k % 3 * 2
        label[z : z + size, y : y + size + 1, x : x + size + 2] = 1
    return label


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("store") / "tiny.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, 0, -0.5, 10], [0, 1.0, 0, -20], [2.0, 0, 0, 5], [0, 0, 0, 1]])
    for index, split in enumerate(["test", "test", "test", "train"]):
        label = _label(rng)
        image = label.astype(np.float32)[None]
        store.write_case(
            f"case{index}", image, {"truth": label}, spacing=SPACING, affine=affine, split=split
        )
    return url


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = build_unet(SPEC).eval()
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "unet_spec": SPEC.to_dict(),
            "config": {"patch_size": ROI, "val_overlap": 0.5},
            "step": 3,
        },
        path,
    )
    return path, model


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=2,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/m.db"
    yield os.environ["MLFLOW_TRACKING_URI"], root
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _pointwise(weight: float, bias: float) -> nn.Module:
    conv = nn.Conv3d(1, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(weight)
        conv.bias.fill_(bias)
    return conv


# --------------------------------------------------------------------------------- library
def test_perfect_model_scores_perfectly(store_url):
    store = VolumeStore.open(store_url)
    cases = store.case_ids(split="test")
    result = evaluate_cases(
        _pointwise(100.0, 0.0),
        store,
        cases,
        roi_size=(ROI,) * 3,
        candidate_threshold=0.05,
        keep_probabilities=True,
    )
    metrics = result.metrics
    n_lesions = sum(
        int(__import__("cc3d").connected_components(store.labels(c)[...], connectivity=26).max())
        for c in cases
    )
    assert metrics["n_lesions"] == n_lesions >= 9
    assert metrics["max_sensitivity"] == 1.0
    assert metrics["sensitivity"] == 1.0
    assert metrics["fp_per_case"] == 0.0
    assert metrics["ap"] == pytest.approx(1.0)
    assert metrics["dice"] == pytest.approx(1.0)
    assert [row["case_id"] for row in result.per_case] == cases
    assert all(row["dice"] == pytest.approx(1.0) for row in result.per_case)
    for case_id in cases:
        truth = store.labels(case_id)[...]
        probability = result.probabilities[case_id]
        assert probability.shape == SHAPE
        assert probability[truth == 1].min() > 0.99 and probability[truth == 0].max() < 0.01

    # a model that sees nothing finds nothing; one that inverts the image is all false positive
    blind = evaluate_cases(_pointwise(0.0, -10.0), store, cases, roi_size=(ROI,) * 3)
    assert blind.metrics["max_sensitivity"] == 0.0 and blind.metrics["dice"] == 0.0
    inverted = evaluate_cases(_pointwise(-100.0, 0.0), store, cases, roi_size=(ROI,) * 3)
    assert inverted.metrics["sensitivity"] == 0.0
    assert inverted.metrics["fp_per_case"] >= 1.0


def test_evaluate_cases_bad_input(store_url):
    store = VolumeStore.open(store_url)
    model = _pointwise(1.0, 0.0)
    with pytest.raises(NoisysegInputError, match="case nope.*not in the store"):
        evaluate_cases(model, store, ["case0", "nope"], roi_size=(ROI,) * 3)
    with pytest.raises(NoisysegInputError, match="case case0.*label set 'censored' missing"):
        evaluate_cases(model, store, ["case0"], label_set="censored", roi_size=(ROI,) * 3)
    with pytest.raises(NoisysegInputError, match="unsafe"):
        evaluate_cases(model, store, ["../case0"], roi_size=(ROI,) * 3)


def test_normalisation_matches_patch_loader(store_url):
    """The stats used at inference are the patch loader's (training) stats for the case."""
    from noisyseg.storage.patches import PatchDataset, _ShardReader

    store = VolumeStore.open(store_url)
    dataset = PatchDataset(store_url, ["case1"], patch_size=(ROI,) * 3)
    mean, std = _ShardReader(dataset, ["case1"]).case_stats("case1")
    ours = case_normalization_stats(store, "case1")
    np.testing.assert_allclose(ours[0], mean, rtol=1e-6)
    np.testing.assert_allclose(ours[1], std, rtol=1e-6)
    image = store.image("case1")[...].astype(np.float64)
    # the store volume is <= 32 voxels per axis, so the stats are those of the whole image
    np.testing.assert_allclose(mean, [image.mean()], rtol=1e-5)
    np.testing.assert_allclose(std, [image.std()], rtol=1e-5)


def test_write_and_read_prediction(store_url):
    store = VolumeStore.open(store_url, mode="r+")
    first = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    path = write_prediction(store, "case3", "unit", first)
    assert path == "cases/case3/predictions/unit/0"
    np.testing.assert_array_equal(read_prediction(store, "case3", "unit"), first)
    second = first[::-1].copy()
    with pytest.raises(NoisysegInputError, match="prediction 'unit' already exists"):
        write_prediction(store, "case3", "unit", second)  # an existing name is refused...
    np.testing.assert_array_equal(read_prediction(store, "case3", "unit"), first)
    write_prediction(store, "case3", "unit", second, overwrite=True)  # ...unless overwritten
    np.testing.assert_array_equal(read_prediction(store, "case3", "unit"), second)
    import zarr

    group = zarr.open_group(store=store.zstore, path="cases/case3/predictions/unit", mode="r")
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"] == list(SPACING)
    assert sorted(zarr.open_group(store=store.zstore, path="cases/case3/predictions").keys()) == [
        "unit"
    ]
    with pytest.raises(NoisysegInputError, match="read-only"):
        write_prediction(VolumeStore.open(store_url), "case3", "unit", first)
    with pytest.raises(NoisysegInputError, match="prediction 'other' missing"):
        read_prediction(store, "case3", "other")
    # the image and truth of the case are untouched
    assert store.labels("case3")[...].sum() > 0
    np.testing.assert_array_equal(store.image("case3")[0], store.labels("case3")[...])


# --------------------------------------------------------------------------------- predict CLI
def _expected(model: nn.Module, store: VolumeStore, case_id: str) -> np.ndarray:
    return predict_volume(model, store.image(case_id), roi_size=(ROI,) * 3, overlap=0.5)


def _expected_metrics(model: nn.Module, store: VolumeStore) -> dict:
    cases = store.case_ids(split="test")
    return lesion_metrics(
        [_expected(model, store, c) for c in cases],
        [store.labels(c)[...] for c in cases],
        spacings=[SPACING] * len(cases),
        threshold=0.5,
        candidate_threshold=0.05,
    )


def _assert_metrics_match(reported: dict, expected: dict) -> None:
    keys = (
        "max_sensitivity",
        "sensitivity",
        "ap",
        "fp_per_case",
        "dice",
        "sensitivity_at_80_precision",
        "n_lesions",
        "n_candidates",
    )
    for key in keys:
        if isinstance(expected[key], float) and np.isnan(expected[key]):
            assert reported[key] is None, key  # NaN is written as JSON null
        else:
            assert reported[key] == pytest.approx(expected[key], abs=1e-6), key


def test_predict_cli_in_process_writes_store(store_url, checkpoint_file, capsys):
    path, model = checkpoint_file
    rc = main(
        [
            "predict",
            "--store",
            store_url,
            "--checkpoint",
            str(path),
            "--name",
            "local",
            "--cases",
            "case0",
            "case2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert "case2" in capsys.readouterr().out
    store = VolumeStore.open(store_url)
    for case_id in ("case0", "case2"):
        got = read_prediction(store, case_id, "local")
        assert got.shape == SHAPE and got.dtype == np.float32
        assert got.min() >= 0.0 and got.max() <= 1.0 and got.std() > 0
        np.testing.assert_allclose(got, _expected(model, store, case_id), rtol=0, atol=1e-6)
    with pytest.raises(NoisysegInputError):
        read_prediction(store, "case1", "local")  # only the given cases were predicted


@pytest.mark.integration
def test_predict_cli_on_ray_two_workers_matches(store_url, checkpoint_file, ray_cluster, tmp_path):
    path, model = checkpoint_file
    rc = main(
        [
            "predict",
            "--store",
            store_url,
            "--checkpoint",
            str(path),
            "--name",
            "ray",
            "--split",
            "test",
            "--workers",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    store = VolumeStore.open(store_url)
    for case_id in store.case_ids(split="test"):
        got = read_prediction(store, case_id, "ray")
        np.testing.assert_allclose(got, _expected(model, store, case_id), rtol=0, atol=1e-6)
    with pytest.raises(NoisysegInputError):
        read_prediction(store, "case3", "ray")  # train split not predicted

    # evaluate with the predictions made on Ray gives the in-process numbers
    output = tmp_path / "ray_eval.json"
    rc = main(
        [
            "evaluate",
            "--store",
            store_url,
            "--checkpoint",
            str(path),
            "--workers",
            "2",
            "--output",
            str(output),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    report = json.loads(output.read_text())
    _assert_metrics_match(report["metrics"], _expected_metrics(model, store))


def test_predict_cli_nifti(store_url, checkpoint_file, tmp_path):
    import nibabel as nib

    path, model = checkpoint_file
    out = tmp_path / "nifti"
    rc = main(
        [
            "predict",
            "--store",
            store_url,
            "--checkpoint",
            str(path),
            "--name",
            "p",
            "--cases",
            "case1",
            "--nifti-dir",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    image = nib.load(str(out / "case1_p.nii.gz"))
    store = VolumeStore.open(store_url)
    np.testing.assert_allclose(image.affine, store.case_info("case1")["affine"])
    data = np.asarray(image.dataobj, dtype=np.float32)
    assert data.shape == SHAPE[::-1]  # NIfTI (i, j, k) = store (x, y, z)
    np.testing.assert_allclose(data.transpose(2, 1, 0), _expected(model, store, "case1"), atol=1e-6)


def test_predict_cli_bad_input(store_url, checkpoint_file, tmp_path, capsys):
    path, _ = checkpoint_file

    def error(*argv: str) -> str:
        assert main(["predict", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "no noisyseg store here" in error(
        "--store", str(tmp_path / "none.zarr"), "--checkpoint", str(path)
    )
    assert "case nope" in error(
        "--store", store_url, "--checkpoint", str(path), "--cases", "case0", "nope", "--name", "bad"
    )
    assert "give --run-id or --checkpoint" in error("--store", store_url)
    assert "not found" in error("--store", store_url, "--checkpoint", str(tmp_path / "x.pt"))
    assert "multiples of 2" in error(
        "--store", store_url, "--checkpoint", str(path), "--roi-size", "15"
    )
    assert "no cases in split 'val'" in error(
        "--store", store_url, "--checkpoint", str(path), "--split", "val"
    )
    assert "unsafe label set name" in error(
        "--store", store_url, "--checkpoint", str(path), "--name", "../x"
    )
    two_channel = tmp_path / "two.pt"
    torch.save(
        {
            "model": build_unet(SPEC, in_channels=2).state_dict(),
            "unet_spec": {**SPEC.to_dict(), "in_channels": 2},
            "config": {"patch_size": 16},
            "step": 0,
        },
        two_channel,
    )
    assert "model expects 2 image channels, store has 1" in error(
        "--store", store_url, "--checkpoint", str(two_channel)
    )
    store = VolumeStore.open(store_url)
    with pytest.raises(NoisysegInputError):  # nothing was written by the failed commands
        read_prediction(store, "case0", "bad")


def test_console_script_reports_one_line(tmp_path):
    script = Path(sys.executable).with_name("noisyseg")
    proc = subprocess.run(
        [
            str(script),
            "predict",
            "--store",
            str(tmp_path / "missing.zarr"),
            "--run-id",
            "0123456789abcdef",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("noisyseg predict: error:")
    assert "missing.zarr" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------- evaluate CLI
@pytest.mark.integration
def test_evaluate_cli_logs_to_mlflow_run(store_url, checkpoint_file, mlflow_uri, tmp_path, capsys):
    import mlflow
    from mlflow import MlflowClient

    path, model = checkpoint_file
    uri, root = mlflow_uri
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("eval", artifact_location=str(root / "artifacts"))
    run = client.create_run(experiment_id)
    client.log_artifact(run.info.run_id, str(path), artifact_path="checkpoint")
    client.set_terminated(run.info.run_id)

    output = tmp_path / "metrics.json"
    rc = main(
        [
            "evaluate",
            "--store",
            store_url,
            "--run-id",
            run.info.run_id,
            "--split",
            "test",
            "--output",
            str(output),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "maximum lesion sensitivity" in printed and "sensitivity by lesion size" in printed
    report = json.loads(output.read_text())
    store = VolumeStore.open(store_url)
    cases = store.case_ids(split="test")
    assert report["cases"] == cases and report["step"] == 3

    # the same numbers from the library, computed here from in-process predictions
    expected = _expected_metrics(model, store)
    _assert_metrics_match(report["metrics"], expected)

    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval_test_dice"] == pytest.approx(expected["dice"])
    assert logged["eval_test_fp_per_case"] == pytest.approx(expected["fp_per_case"])
    assert (
        "eval_test_sensitivity_by_size.bin0" in logged
        or expected["sensitivity_by_size"][0]["count"] == 0
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
    assert artifacts == {"evaluation/test/metrics.json", "evaluation/test/pr_curve.png"}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None

    # unknown run: one line, before any inference
    assert main(["evaluate", "--store", store_url, "--run-id", "f" * 32]) == 2
    assert "no MLflow run" in capsys.readouterr().err
    # a run without the checkpoint artifact
    empty = client.create_run(experiment_id)
    assert main(["evaluate", "--store", store_url, "--run-id", empty.info.run_id]) == 2
    assert "has no artifact checkpoint/final.pt" in capsys.readouterr().err
    # a missing label set is reported before the model is loaded
    assert (
        main(
            [
                "evaluate",
                "--store",
                store_url,
                "--run-id",
                run.info.run_id,
                "--label-set",
                "censored",
            ]
        )
        == 2
    )
    assert "label set 'censored' missing" in capsys.readouterr().err
