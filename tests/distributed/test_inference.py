"""Sliding-window prediction and trained-model loading (noisyseg.distributed.inference).

Predictions are checked against numpy computations of a known pointwise network (a 1x1 conv with
set weights: the blended sliding-window output must equal ``sigmoid(w . x + b)`` everywhere).
"""

from __future__ import annotations

import os

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


# ------------------------------------------------------------------ many cases: Ray Data pool
SPEC_3D = UNetSpec(spatial_dims=3, in_channels=1, channels=(4, 8), num_res_units=0, norm="batch")
#: cases of different shapes: their probability maps are tensor columns of different shapes
CASE_SHAPES = {"c0": (12, 10, 9), "c1": (9, 13, 11), "c2": (10, 10, 10)}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    from noisyseg.storage.store import VolumeStore

    url = str(tmp_path_factory.mktemp("pool") / "s.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    rng = np.random.default_rng(3)
    for case_id, shape in CASE_SHAPES.items():
        label = (rng.random(shape) > 0.9).astype(np.uint8)
        image = (label + rng.normal(0, 0.3, shape)).astype(np.float32)[None]
        store.write_case(case_id, image, {"truth": label}, spacing=(1.0, 1.0, 1.0), split="test")
    return url


@pytest.fixture(scope="module")
def ray_local(ray_head):
    """This process joined to a real ``ray start --head`` (every port a free one, so another
    Ray instance on the machine does not collide with it); ``map_cases`` uses that connection."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=ray_head.address, log_to_driver=False)
    yield
    ray.shutdown()


def _checkpoint_3d() -> dict:
    torch.manual_seed(4)
    model = build_unet(SPEC_3D).eval()
    return {"model": model.state_dict(), "unet_spec": SPEC_3D.to_dict(), "config": {}, "step": 1}


@pytest.mark.integration
def test_map_cases_on_ray_data_matches_in_process(small_store, ray_local):
    """The Ray Data actor pool (2 actors on the module's Ray) gives every case
    what the in-process path gives: the probability maps (back through the object store as
    tensor columns of different shapes) and the written predictions and their records."""
    from noisyseg.distributed.inference import InferenceSettings, map_cases, predict_cases
    from noisyseg.distributed.prediction_io import read_prediction
    from noisyseg.storage.store import VolumeStore

    checkpoint = _checkpoint_3d()
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.5, device="cpu")
    cases = list(CASE_SHAPES)
    local = dict(
        map_cases(
            checkpoint,
            small_store,
            cases,
            settings,
            method="probability",
            use_ray=False,
            write=False,
        )
    )
    pooled = list(
        map_cases(
            checkpoint, small_store, cases, settings, method="probability", workers=2, write=False
        )
    )
    assert sorted(case_id for case_id, _ in pooled) == sorted(cases)
    for case_id, probability in pooled:
        assert probability.shape == CASE_SHAPES[case_id] and probability.dtype == np.float32
        assert probability.flags.writeable  # callers may change it in place
        np.testing.assert_allclose(probability, local[case_id], rtol=0, atol=1e-6)

    done: list[tuple[str, int, int]] = []
    records = predict_cases(
        checkpoint,
        small_store,
        cases,
        settings,
        name="pooled",
        workers=2,
        progress=lambda record, n, total: done.append((record["case_id"], n, total)),
    )
    assert [r["case_id"] for r in records] == cases  # input order
    assert sorted(c for c, _, _ in done) == cases and [n for _, n, _ in done] == [1, 2, 3]
    store = VolumeStore.open(small_store)
    for record in records:
        case_id = record["case_id"]
        assert record["shape"] == list(CASE_SHAPES[case_id])
        assert isinstance(record["output"], str) and isinstance(record["seconds"], float)
        written = read_prediction(store, case_id, "pooled")
        np.testing.assert_allclose(written, local[case_id], rtol=0, atol=1e-6)


def test_actor_pool_requests_one_gpu_per_actor():
    """What ``map_batches`` is given: one case per batch, one CPU per actor, and one GPU per
    actor exactly when the prediction runs on GPUs (``--gpu``, or a CUDA ``--device``)."""
    from ray.data import ActorPoolStrategy

    from noisyseg.distributed.inference import InferenceSettings, actor_settings, wants_gpu
    from noisyseg.distributed.ray_utils import actor_pool_map_kwargs

    on_gpu = actor_pool_map_kwargs(3, gpu=True, constructor_kwargs={"a": 1})
    assert on_gpu["num_gpus"] == 1 and on_gpu["num_cpus"] == 1 and on_gpu["batch_size"] == 1
    assert on_gpu["fn_constructor_kwargs"] == {"a": 1}
    pool = on_gpu["compute"]
    assert isinstance(pool, ActorPoolStrategy)
    assert (pool.min_size, pool.max_size) == (1, 3)  # grows with the GPUs the cluster gives
    on_cpu = actor_pool_map_kwargs(3, gpu=False, constructor_kwargs={})
    assert on_cpu["num_gpus"] == 0 and on_cpu["num_cpus"] == 1 and on_cpu["batch_size"] == 1
    assert (on_cpu["compute"].min_size, on_cpu["compute"].max_size) == (3, 3)

    cuda = InferenceSettings(roi_size=(8, 8, 8), device="cuda:1")
    cpu = InferenceSettings(roi_size=(8, 8, 8), device="cpu")
    assert wants_gpu(cuda) and not wants_gpu(cpu)
    assert wants_gpu(cpu, gpu=True) and not wants_gpu(cuda, gpu=False)
    # an actor sees only its own GPU (as "cuda"); one without a GPU runs on the CPU
    assert actor_settings(cuda, True).device == "cuda"
    assert actor_settings(cuda, False).device == "cpu"
    assert actor_settings(cpu, False) == cpu


def test_case_batch_predictor_rows_round_trip_through_arrow_blocks(small_store, tmp_path):
    """The actor UDF on one-case batches, its output through the Arrow block Ray Data stores
    it in and back to rows: the same probability maps and records as ``CasePredictor``."""
    from ray.data.block import BlockAccessor

    from noisyseg.distributed.inference import (
        CaseBatchPredictor,
        CasePredictor,
        InferenceSettings,
        _result_from_row,
    )

    checkpoint = _checkpoint_3d()
    settings = InferenceSettings(roi_size=(8, 8, 8), overlap=0.5, device="cpu")
    direct = CasePredictor(checkpoint, small_store, settings, write=False)
    udf = CaseBatchPredictor(checkpoint, small_store, settings, "probability", {"write": False})
    for case_id in CASE_SHAPES:
        block = BlockAccessor.batch_to_block(udf({"case_id": np.asarray([case_id])}))
        (row,) = list(BlockAccessor.for_block(block).iter_rows(public_row_format=True))
        got_id, probability = _result_from_row("probability", dict(row))
        assert got_id == case_id and probability.dtype == np.float32
        assert probability.flags.writeable
        np.testing.assert_array_equal(probability, direct.probability(case_id)[1])

    writer = CaseBatchPredictor(
        checkpoint, small_store, settings, "predict", {"nifti_dir": str(tmp_path), "name": "u"}
    )
    block = BlockAccessor.batch_to_block(writer({"case_id": np.asarray(["c1"])}))
    (row,) = list(BlockAccessor.for_block(block).iter_rows(public_row_format=True))
    record = _result_from_row("predict", dict(row))
    assert record["case_id"] == "c1" and record["shape"] == list(CASE_SHAPES["c1"])
    assert (
        record["output"] == str(tmp_path / "c1_u.nii.gz") and (tmp_path / "c1_u.nii.gz").is_file()
    )
    assert isinstance(record["seconds"], float)
