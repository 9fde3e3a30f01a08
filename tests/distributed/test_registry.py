"""The MLflow Model Registry path on a real ``mlflow server``: ``noisyseg register`` logs a pyfunc
model that carries its preprocessing; the model loaded with ``mlflow.pyfunc.load_model(
"models:/NAME@ALIAS")`` gives the same probabilities as ``noisyseg predict --model
models:/NAME@ALIAS`` on the same raw case, and both match a NumPy z-score + the network."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch

from noisyseg.cli import main
from noisyseg.distributed.registry import PYFUNC_NAME, RUN_TAG, resolve_model
from noisyseg.distributed.sliding_window import predict_volume
from noisyseg.models import UNetSpec, build_unet
from noisyseg.storage.store import VolumeStore

pytestmark = pytest.mark.integration

SPEC = UNetSpec(spatial_dims=3, in_channels=2, channels=(4, 8), num_res_units=0, norm="batch")
ZOOMS = (1.0, 1.5, 2.0)  # NIfTI (i, j, k) = (x, y, z)
SHAPE = (10, 12, 9)


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    yield mlflow_server.uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """One RAS case as two nnU-Net channel files; returns the folder and ``(C, Z, Y, X)``."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(5)
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = (4.0, -3.0, 2.0)
    channels = []
    for c in range(2):
        data = (rng.normal(size=SHAPE) * (c + 1) * 40 + 200).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), str(root / f"case1_{c:04d}.nii.gz"))
        channels.append(data.transpose(2, 1, 0))
    return root, np.stack(channels)


def _training_run(uri: str, tmp: Path, name: str, store: str | None) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(len(name))
    model = build_unet(SPEC).eval()
    path = tmp / "final.pt"
    config = {"patch_size": 8, "val_overlap": 0.5, "store": store}
    torch.save(
        {"model": model.state_dict(), "unet_spec": SPEC.to_dict(), "config": config, "step": 7},
        path,
    )
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("reg") or client.get_experiment(
        client.create_experiment("reg")
    )
    run = client.create_run(experiment.experiment_id, run_name=name)
    client.log_artifact(run.info.run_id, str(path), "checkpoint")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id, model


def _predict_cli(model: str, folder: Path, out: Path) -> np.ndarray:
    assert main(["predict", "--model", model, "--input", str(folder), "--output", str(out)]) == 0
    image = nib.load(str(out / "case1" / "probability.nii.gz"))
    return np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)  # -> (z, y, x)


def test_registered_pyfunc_matches_predict(tracking, scan, tmp_path, capsys):
    folder, volume = scan
    run_id, model = _training_run(tracking, tmp_path, "native", None)
    assert main(["register", "--run-id", run_id, "--name", "seg", "--alias", "champion"]) == 0
    assert "models:/seg@champion" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking)
    version = client.get_model_version_by_alias("seg", "champion")
    assert version.run_id == run_id and version.tags[RUN_TAG] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"  # the training run keeps its status

    pyfunc = mlflow.pyfunc.load_model("models:/seg@champion")
    signature = pyfunc.metadata.signature
    assert signature.inputs.inputs[0].shape == (2, -1, -1, -1)
    assert signature.outputs.inputs[0].shape == (-1, -1, -1)
    prep = pyfunc.metadata.metadata["noisyseg_preprocessing"]
    assert prep["in_channels"] == 2 and prep["roi_size"] == [8, 8, 8] and prep["overlap"] == 0.5
    from_registry = pyfunc.predict(volume)
    assert from_registry.shape == volume.shape[1:] and from_registry.dtype == np.float32

    # the same raw case through `noisyseg predict` with the registered model
    from_cli = _predict_cli("models:/seg@champion", folder, tmp_path / "cli")
    np.testing.assert_allclose(from_registry, from_cli, atol=1e-6)
    # ... and by hand: NumPy z-score per channel over the whole volume, then the network
    z = np.stack([(c - c.mean(dtype=np.float64)) / c.std(dtype=np.float64) for c in volume]).astype(
        np.float32
    )
    expected = predict_volume(model, z, roi_size=(8, 8, 8), overlap=0.5, normalize=False)
    np.testing.assert_allclose(from_registry, expected, atol=1e-5)
    # the other model references give the same map
    for reference in (f"runs:/{run_id}/model", run_id):
        np.testing.assert_allclose(
            _predict_cli(
                reference, folder, tmp_path / reference.replace("/", "_").replace(":", "")
            ),
            from_cli,
            atol=1e-6,
        )
    assert resolve_model("models:/seg/1").run_id == run_id

    # registering again: a new version, the alias moves, the logged model is re-used
    assert main(["register", "--run-id", run_id, "--name", "seg", "--alias", "champion"]) == 0
    again = client.get_model_version_by_alias("seg", "champion")
    assert again.version == "2" and again.source == version.source
    logged = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{PYFUNC_NAME}'",
    )
    assert len(logged) == 1


def test_registry_bad_input(tracking, scan, tmp_path, capsys):
    folder, _ = scan

    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "no MLflow run" in error("register", "--run-id", "f" * 32, "--name", "x")
    run_id, _ = _training_run(tracking, tmp_path, "bad", None)
    assert "reserved" in error("register", "--run-id", run_id, "--name", "x", "--alias", "v1")
    assert "must be letters" in error("register", "--run-id", run_id, "--name", "a b")
    empty = mlflow.MlflowClient(tracking).create_run(
        mlflow.MlflowClient(tracking).get_experiment_by_name("reg").experiment_id
    )
    assert "has no artifact checkpoint/final.pt" in error(
        "register", "--run-id", empty.info.run_id, "--name", "x"
    )
    assert "no such registered model version" in error(
        "predict",
        "--model",
        "models:/seg@nope",
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "o"),
    )


def test_target_spacing_travels_with_the_model(tracking, scan, tmp_path):
    """A model trained on a store ingested with --target-spacing resamples raw scans to it (and
    back): the pyfunc with the scan's spacing equals `noisyseg predict` on the NIfTI file."""
    folder, volume = scan
    store = str(tmp_path / "train.zarr")
    VolumeStore.create(
        store,
        spatial_dims=3,
        channel_names=["a", "b"],
        truth_params={"source": "ingest", "layout": "nnunet", "target_spacing": [2.0, 2.0, 2.0]},
    )
    run_id, _ = _training_run(tracking, tmp_path, "coarse", store)
    assert main(["register", "--run-id", run_id, "--name", "coarse", "--alias", "champion"]) == 0
    pyfunc = mlflow.pyfunc.load_model("models:/coarse@champion")
    prep = pyfunc.metadata.metadata["noisyseg_preprocessing"]
    assert prep["target_spacing"] == [2.0, 2.0, 2.0] and prep["orientation"] == "RAS"
    resampled = pyfunc.predict(volume, params={"spacing": list(ZOOMS[::-1])})
    native = pyfunc.predict(volume)
    assert resampled.shape == native.shape == volume.shape[1:]
    assert not np.allclose(resampled, native, atol=1e-4)  # the spacing parameter acts
    from_cli = _predict_cli("models:/coarse@champion", folder, tmp_path / "cli")
    np.testing.assert_allclose(resampled, from_cli, atol=1e-6)


def test_tune_best_register(tracking, tmp_path, capsys):
    """``noisyseg tune --best SWEEP --register NAME`` registers the run the sweep's parent run
    names as best (the tag the sweep summary writes)."""
    import json

    best_id, _ = _training_run(tracking, tmp_path, "trial-best", None)
    other_id, _ = _training_run(tracking, tmp_path, "trial-other", None)
    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("reg").experiment_id
    parent = client.create_run(experiment, run_name="sweep", tags={"best_run_id": best_id})
    sweep_dir = tmp_path / "sweeps" / "s1"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "noisyseg_sweep.json").write_text(
        json.dumps({"parent_run_id": parent.info.run_id, "tracking_uri": tracking})
    )
    argv = ["tune", "--best", str(sweep_dir), "--register", "swept", "--alias", "champion"]
    assert main(argv) == 0
    assert "registered as models:/swept@champion" in capsys.readouterr().out
    version = client.get_model_version_by_alias("swept", "champion")
    assert version.run_id == best_id != other_id
    assert main(["tune", "--register", "swept"]) == 2
    assert "goes with --best SWEEP" in capsys.readouterr().err
    unfinished = client.create_run(experiment, run_name="sweep2")
    (sweep_dir / "noisyseg_sweep.json").write_text(
        json.dumps({"parent_run_id": unfinished.info.run_id, "tracking_uri": tracking})
    )
    assert main(argv) == 2
    assert "has no best trial yet" in capsys.readouterr().err
