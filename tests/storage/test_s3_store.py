"""A store addressed by an ``s3://`` URL, against a real S3-compatible server on 127.0.0.1.

The server is moto's standalone S3 server (``moto_server``, a separate process speaking the S3
HTTP API). Nothing is mocked in-process: s3fs/aiobotocore talk HTTP to it exactly as to AWS or
MinIO, configured only through the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) — which is how the
deploy/ manifests configure the cluster, and how the CLI verbs get storage options.

Each check runs the same command on a local store and on the S3 store and requires identical
results, and also checks the bytes really are in the bucket:
* ``noisyseg ingest SRC s3://bucket/ds.zarr`` (NIfTI folder -> store);
* ``PatchDataset("s3://...")`` patch streams;
* ``noisyseg predict --store s3://...`` writing probability maps into the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cluster_utils import S3_BUCKET, MotoS3Server

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
BUCKET = S3_BUCKET
SHAPE_XYZ = (24, 20, 16)
TRAIN_IDS = ["mets_001", "mets_002", "mets_003"]
TEST_IDS = ["mets_101"]


def _write_nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.2, 1.5)) -> None:
    import nibabel as nib

    affine = np.diag([*zooms, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms(zooms)
    nib.save(image, str(path))


def _make_source(root: Path, seed: int = 0) -> None:
    """nnU-Net-style folder: 2 channels, blobs as lesions; train cases and one test case."""
    rng = np.random.default_rng(seed)
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1c", "1": "FLAIR"},
                "labels": {"background": 0, "lesion": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    for images, labels, ids in (
        ("imagesTr", "labelsTr", TRAIN_IDS),
        ("imagesTs", "labelsTs", TEST_IDS),
    ):
        (root / images).mkdir(exist_ok=True)
        (root / labels).mkdir(exist_ok=True)
        for cid in ids:
            label = np.zeros(SHAPE_XYZ, np.uint8)
            for _ in range(2):
                x, y, z = (int(rng.integers(2, s - 6)) for s in SHAPE_XYZ)
                label[x : x + 4, y : y + 3, z : z + 3] = 1
            for c in range(2):
                vol = rng.normal(100.0 * (c + 1), 20.0, SHAPE_XYZ).astype(np.float32)
                vol += 80.0 * label
                _write_nifti(root / images / f"{cid}_{c:04d}.nii.gz", vol)
            _write_nifti(root / labels / f"{cid}.nii.gz", label)


@pytest.fixture(scope="module")
def s3(s3_server: MotoS3Server) -> Iterator[MotoS3Server]:
    """conftest's moto server and bucket; the commands run without a Ray cluster address."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        yield s3_server
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _noisyseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [str(VENV_BIN / "noisyseg"), *args],
        env=env,
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def stores(s3: MotoS3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("s3work")
    _make_source(work / "src")
    urls = {"local": str(work / "local.zarr"), "s3": f"s3://{BUCKET}/ds.zarr"}
    for url in urls.values():
        done = _noisyseg("ingest", str(work / "src"), url, "--no-progress", cwd=work)
        assert done.returncode == 0, done.stdout + done.stderr
    assert not (work / "s3:").exists()  # the URL was not taken for a local path
    urls["work"] = str(work)
    return urls


def _bucket_keys(prefix: str) -> list[str]:
    import boto3

    keys: list[str] = []
    for page in (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    ):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def test_ingest_into_s3_matches_local_ingest(stores: dict[str, str]) -> None:
    from noisyseg.storage.store import VolumeStore

    local = VolumeStore.open(stores["local"])
    remote = VolumeStore.open(stores["s3"])
    assert remote.url.startswith("s3://")
    assert sorted(remote.case_ids()) == sorted(TRAIN_IDS + TEST_IDS)
    assert remote.case_ids() == local.case_ids()
    assert remote.label_sets() == local.label_sets()
    assert remote.channel_names == local.channel_names == ["T1c", "FLAIR"]
    for cid in TRAIN_IDS + TEST_IDS:
        np.testing.assert_array_equal(remote.image(cid)[...], local.image(cid)[...])
        np.testing.assert_array_equal(remote.labels(cid)[...], local.labels(cid)[...])
        assert remote.spacing(cid) == local.spacing(cid)
        assert int(np.asarray(remote.labels(cid)[...]).sum()) > 0
    keys = _bucket_keys("ds.zarr/")
    assert "ds.zarr/zarr.json" in keys
    assert any(k.startswith("ds.zarr/") and "/c/" in k for k in keys), keys[:20]  # chunk objects


def test_reingest_into_s3_skips_existing_cases(stores: dict[str, str]) -> None:
    before = set(_bucket_keys("ds.zarr/"))
    done = _noisyseg(
        "ingest",
        str(Path(stores["work"]) / "src"),
        stores["s3"],
        "--no-progress",
        cwd=Path(stores["work"]),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(_bucket_keys("ds.zarr/cases/")) <= before  # resumed: nothing rewritten


def test_patch_dataset_reads_from_s3(stores: dict[str, str]) -> None:
    from noisyseg.storage.patches import PatchDataset
    from noisyseg.storage.store import VolumeStore

    kwargs = {"label_set": "truth", "patch_size": (8, 8, 8), "foreground_fraction": 0.5, "seed": 3}
    remote_ds = PatchDataset(stores["s3"], TRAIN_IDS, **kwargs)
    local_ds = PatchDataset(stores["local"], TRAIN_IDS, **kwargs)
    remote_it, local_it = iter(remote_ds), iter(local_ds)
    local_store = VolumeStore.open(stores["local"])
    inside = 0
    for _ in range(8):
        a, b = next(remote_it), next(local_it)
        assert a["case_id"] == b["case_id"] and tuple(a["origin"]) == tuple(b["origin"])
        assert tuple(a["image"].shape) == (2, 8, 8, 8) and tuple(a["label"].shape) == (1, 8, 8, 8)
        assert np.array_equal(a["image"].numpy(), b["image"].numpy())
        assert np.array_equal(a["label"].numpy(), b["label"].numpy())
        # independent of PatchDataset: slice the stored volume where the patch lies inside it
        origin = np.asarray(a["origin"])
        shape = np.asarray(local_store.labels(a["case_id"]).shape[-3:])
        if (origin >= 0).all() and (origin + 8 <= shape).all():
            inside += 1
            box = tuple(slice(int(o), int(o) + 8) for o in origin)
            label = np.asarray(local_store.labels(a["case_id"])[...]).reshape(tuple(shape))
            np.testing.assert_array_equal(a["label"].numpy()[0], label[box].astype(np.float32))
    assert inside >= 1


def test_predict_writes_probability_maps_into_s3_store(stores: dict[str, str]) -> None:
    import torch

    from noisyseg.distributed.prediction_io import read_prediction
    from noisyseg.models import UNetSpec, build_unet
    from noisyseg.storage.store import VolumeStore

    work = Path(stores["work"])
    spec = UNetSpec(spatial_dims=3, in_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    torch.manual_seed(0)
    model = build_unet(spec).eval()
    checkpoint = work / "final.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "unet_spec": spec.to_dict(),
            "config": {"patch_size": 16},
            "step": 1,
        },
        checkpoint,
    )
    for url in (stores["local"], stores["s3"]):
        done = _noisyseg(
            "predict",
            "--store",
            url,
            "--checkpoint",
            str(checkpoint),
            "--cases",
            *TEST_IDS,
            "--name",
            "s3check",
            "--device",
            "cpu",
            "--roi-size",
            "16",
            "--workers",
            "1",
            cwd=work,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    local, remote = VolumeStore.open(stores["local"]), VolumeStore.open(stores["s3"])
    for cid in TEST_IDS:
        p_remote = read_prediction(remote, cid, "s3check")
        p_local = read_prediction(local, cid, "s3check")
        assert p_remote.shape == tuple(local.image(cid).shape[1:])
        assert p_remote.dtype == np.float32
        assert float(p_remote.min()) >= 0.0 and float(p_remote.max()) <= 1.0
        np.testing.assert_allclose(p_remote, p_local, rtol=0, atol=1e-6)
    keys = _bucket_keys("ds.zarr/cases/")
    assert any("predictions/s3check" in k for k in keys)
