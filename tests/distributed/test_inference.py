"""Sliding-window prediction and trained-model loading (noisyseg.distributed.inference).

Predictions are checked against numpy computations of a known pointwise network (a 1x1 conv with
set weights: the blended sliding-window output must equal ``sigmoid(w . x + b)`` everywhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from noisyseg.distributed.model_loading import load_checkpoint, load_trained_model
from noisyseg.distributed.sliding_window import normalize_image, predict_volume
from noisyseg.errors import NoisysegInputError
from noisyseg.models import UNetSpec, build_unet


def _pointwise(weights: np.ndarray, bias: float, spatial_dims: int) -> nn.Module:
    conv_cls = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    conv = conv_cls(len(weights), 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights, dtype=torch.float32).reshape(conv.weight.shape))
        conv.bias.fill_(bias)
    return conv


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_zscore(image: np.ndarray) -> np.ndarray:
    out = np.empty(image.shape, dtype=np.float64)
    for c in range(image.shape[0]):
        channel = image[c].astype(np.float64)
        out[c] = (channel - channel.mean()) / channel.std()
    return out


@pytest.mark.parametrize(
    ("shape", "roi"),
    [((2, 13, 17, 11), (8, 8, 8)), ((3, 37, 29), (16, 16)), ((1, 5, 6, 7), (8, 8, 8))],
    ids=["3d-not-divisible", "2d-not-divisible", "3d-smaller-than-roi"],
)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_pointwise_model_matches_numpy(shape, roi, mode):
    rng = np.random.default_rng(0)
    image = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
    weights = rng.normal(size=shape[0])
    bias = -0.3
    model = _pointwise(weights, bias, len(shape) - 1)

    got = predict_volume(
        model, image, roi_size=roi, overlap=0.5, sw_batch_size=3, mode=mode, normalize=False
    )
    expected = _sigmoid(np.tensordot(weights, image.astype(np.float64), axes=(0, 0)) + bias)
    assert got.shape == shape[1:]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_normalisation_is_per_channel_zscore():
    rng = np.random.default_rng(1)
    image = np.stack([rng.normal(100, 20, (9, 10, 11)), rng.normal(-5, 0.1, (9, 10, 11))])
    image = image.astype(np.float32)
    weights = np.array([0.7, -1.2])
    model = _pointwise(weights, 0.1, 3)
    got = predict_volume(model, image, roi_size=(8, 8, 8), overlap=0.25)
    expected = _sigmoid(np.tensordot(weights, _numpy_zscore(image), axes=(0, 0)) + 0.1)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    normalized = normalize_image(image)
    np.testing.assert_allclose(normalized.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(axis=(1, 2, 3)), 1.0, atol=1e-4)


def test_zarr_input_equals_numpy_input(tmp_path):
    import zarr

    rng = np.random.default_rng(2)
    image = rng.normal(size=(1, 20, 24)).astype(np.float32)
    array = zarr.create_array(
        str(tmp_path / "img.zarr"), shape=image.shape, chunks=(1, 8, 8), dtype="float32"
    )
    array[...] = image
    model = build_unet(spatial_dims=2, in_channels=1, channels=(4, 8), num_res_units=0)
    from_numpy = predict_volume(model, image, roi_size=(16, 16))
    from_zarr = predict_volume(model, array, roi_size=(16, 16))
    np.testing.assert_array_equal(from_numpy, from_zarr)
    assert ((from_numpy >= 0) & (from_numpy <= 1)).all()
    assert model.training, "predict_volume must restore the model's training flag"


def test_bf16_autocast_close_to_float32():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 24, 24)).astype(np.float32)
    model = build_unet(spatial_dims=2, in_channels=1, channels=(4, 8), num_res_units=0).eval()
    full = predict_volume(model, image, roi_size=(16, 16))
    half = predict_volume(model, image, roi_size=(16, 16), amp="bf16")
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=3e-2)


def test_bad_predict_arguments():
    model = _pointwise(np.ones(1), 0.0, 2)
    image = np.zeros((1, 8, 8), dtype=np.float32)
    with pytest.raises(NoisysegInputError, match="roi_size"):
        predict_volume(model, image, roi_size=(8, 8, 8))
    with pytest.raises(NoisysegInputError, match="overlap"):
        predict_volume(model, image, roi_size=(8, 8), overlap=1.0)
    with pytest.raises(NoisysegInputError, match="amp"):
        predict_volume(model, image, roi_size=(8, 8), amp="fp8")


# ---------------------------------------------------------------------------------------------
# Loading checkpoints

SPEC = UNetSpec(spatial_dims=2, in_channels=2, channels=(4, 8, 16), num_res_units=1)


def _checkpoint(seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = build_unet(SPEC).eval()
    return model, {
        "model": model.state_dict(),
        "unet_spec": SPEC.to_dict(),
        "config": {"patch_size": 32, "loss": "lopsided"},
        "step": 7,
    }


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, SPEC.in_channels, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_load_pt_file_and_ray_directory(tmp_path):
    model, checkpoint = _checkpoint()
    torch.save(checkpoint, tmp_path / "final.pt")
    loaded, spec, config = load_trained_model(str(tmp_path / "final.pt"))
    assert spec == SPEC
    assert config == {"patch_size": 32, "loss": "lopsided"}
    _same_outputs(model, loaded)

    ray_dir = tmp_path / "checkpoint_000003"
    ray_dir.mkdir()
    ddp_state = {f"module.{k}": v for k, v in checkpoint["model"].items()}
    torch.save(
        {**checkpoint, "model": ddp_state, "optimizer": {"state": {}, "param_groups": []}},
        ray_dir / "state.pt",
    )
    loaded_dir, _, _ = load_trained_model(ray_dir)
    _same_outputs(model, loaded_dir)
    # a different random init really gives different outputs (the comparison has teeth)
    other, _ = _checkpoint(seed=1)
    with pytest.raises(AssertionError):
        _same_outputs(other, loaded)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(NoisysegInputError, match="not found"):
        load_trained_model(str(tmp_path / "missing.pt"))
    empty_dir = tmp_path / "ckpt"
    empty_dir.mkdir()
    with pytest.raises(NoisysegInputError, match="not found"):
        load_trained_model(empty_dir)
    _, checkpoint = _checkpoint()
    torch.save(checkpoint, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(NoisysegInputError, match="not a loadable checkpoint"):
        load_trained_model(tmp_path / "truncated.pt")
    torch.save({"weights": checkpoint["model"]}, tmp_path / "nokeys.pt")
    with pytest.raises(NoisysegInputError, match="lacks"):
        load_trained_model(tmp_path / "nokeys.pt")
    wrong = {**checkpoint, "unet_spec": {**SPEC.to_dict(), "channels": [8, 16, 32]}}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(NoisysegInputError, match="does not match"):
        load_trained_model(tmp_path / "wrong.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_weights_only_refuses_arbitrary_pickles(tmp_path):
    _, checkpoint = _checkpoint()
    torch.save({**checkpoint, "extra": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(NoisysegInputError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.fixture(scope="module")
def mlflow_sqlite(tmp_path_factory):
    import os

    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    # the loader resolves the URI like training does: MLFLOW_TRACKING_URI first
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/m.db"
    # An earlier in-process command may have set a global URI, which outranks the variable.
    previous_global = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment_id = mlflow.create_experiment("inference-test", artifact_location=str(root / "art"))
    yield mlflow, experiment_id, root
    mlflow.set_tracking_uri(previous_global)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.mark.integration
def test_load_from_mlflow_run(mlflow_sqlite):
    mlflow, experiment_id, root = mlflow_sqlite
    model, checkpoint = _checkpoint(seed=2)
    staging = root / "staging"
    staging.mkdir()
    torch.save(checkpoint, staging / "final.pt")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifact(str(staging / "final.pt"), artifact_path="checkpoint")
    loaded, spec, config = load_trained_model(run.info.run_id)
    assert spec == SPEC and config["loss"] == "lopsided"
    _same_outputs(model, loaded)

    with mlflow.start_run(experiment_id=experiment_id) as empty_run:
        mlflow.log_param("x", 1)
    with pytest.raises(NoisysegInputError, match="has no artifact checkpoint/final.pt"):
        load_trained_model(empty_run.info.run_id)
    with pytest.raises(NoisysegInputError, match="no MLflow run"):
        load_trained_model("0123456789abcdef0123456789abcdef")
