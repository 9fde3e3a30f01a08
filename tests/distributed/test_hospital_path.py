"""The hospital path end to end, as a user types it: bring the dataset you have (an
MSD-Task01-shaped folder and a BraTS-style folder, built here), ``noisyseg ingest`` with a
val/test split and ``--target-spacing``, ``noisyseg train`` a few steps on the defaults with
``--register`` and an alias, then ``noisyseg predict`` the unlabeled ``imagesTs`` scans (and the
BraTS cases) through ``models:/hospital@champion``.

Checked: every output NIfTI has exactly its input file's affine and shape; the lesion table's
centroids fall inside their predicted lesions; the multi-class label set kept by ingest equals
the source labels voxel for voxel (nibabel's own canonical reorientation as the reference).

Real parts: a real MLflow server, a real Ray head (``RAY_ADDRESS``: Ray Train for training, Ray
Data for the prediction, ``--workers 2``), real Zarr stores.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from cluster_utils import VENV_BIN, ray_env
from scipy import ndimage

from noisyseg.storage.geometry import Geometry, to_original
from noisyseg.storage.store import VolumeStore

pytestmark = pytest.mark.integration

LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
TARGET = (1.0, 1.0, 1.0)
#: case: (shape i, j, k; zooms; orientation) — per-case spacings and orientations differ
TRAIN = {
    "BRATS_001": ((20, 18, 16), (1.0, 1.0, 1.0), "RAS"),
    "BRATS_002": ((18, 20, 16), (1.0, 1.0, 1.0), "LPS"),
    "BRATS_003": ((16, 20, 18), (1.0, 1.0, 1.0), "PSR"),
    "BRATS_004": ((20, 16, 12), (1.0, 1.0, 1.5), "LPS"),
    "BRATS_005": ((18, 18, 16), (1.0, 1.0, 1.0), "RAS"),
    "BRATS_006": ((16, 18, 20), (1.0, 1.0, 1.0), "PSR"),
}
TEST = {
    "BRATS_101": ((18, 20, 16), (1.0, 1.0, 1.0), "LPS"),
    "BRATS_102": ((20, 12, 18), (1.0, 1.5, 1.0), "PSR"),
}


def affine_for(kind: str, zooms, origin=(-12.0, 9.0, 4.5)) -> np.ndarray:
    sx, sy, sz = zooms
    matrices = {
        "RAS": np.diag([sx, sy, sz]),
        "LPS": np.diag([-sx, -sy, sz]),
        "PSR": np.array([[0, 0, sz], [-sx, 0, 0], [0, sy, 0]], dtype=float),
    }
    affine = np.eye(4)
    affine[:3, :3] = matrices[kind]
    affine[:3, 3] = origin
    return affine


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def tumour(shape, rng) -> np.ndarray:
    """Nested blobs: edema (1) around non-enhancing (2) around enhancing (3)."""
    label = np.zeros(shape, np.uint8)
    centre = [int(rng.integers(5, s - 5)) for s in shape]
    grid = np.indices(shape)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    for radius, value in ((4.5, 1), (3.0, 2), (1.5, 3)):
        label[dist <= radius] = value
    return label


def scan(label: np.ndarray, rng, channels: int = 4) -> np.ndarray:
    """Channels: brighter where the tumour is, smooth noise elsewhere (I, J, K, C)."""
    out = []
    for c in range(channels):
        noise = ndimage.gaussian_filter(rng.normal(size=label.shape), 1.0)
        out.append((100 + 20 * c + 40 * (label > 0) + 10 * noise).astype(np.float32))
    return np.stack(out, axis=-1)


def make_msd(root: Path) -> dict[str, tuple[Path, Path | None]]:
    rng = np.random.default_rng(11)
    (root / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(
        json.dumps({"name": "BrainTumour", "modality": MODALITY, "labels": LABELS})
    )
    files: dict[str, tuple[Path, Path | None]] = {}
    for split, cases in (("Tr", TRAIN), ("Ts", TEST)):
        for case_id, (shape, zooms, kind) in cases.items():
            affine = affine_for(kind, zooms)
            label = tumour(shape, rng)
            image_path = root / f"images{split}" / f"{case_id}.nii.gz"
            save(image_path, scan(label, rng), affine)
            label_path = None
            if split == "Tr":
                label_path = root / "labelsTr" / f"{case_id}.nii.gz"
                save(label_path, label, affine)
            files[case_id] = (image_path, label_path)
    return files


def make_brats(root: Path) -> dict[str, Path]:
    """BraTS 2023 naming (``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``; labels 0-3)."""
    rng = np.random.default_rng(12)
    segs = {}
    for index, (kind, zooms) in enumerate((("LPS", (1.0, 1.0, 1.0)), ("RAS", (1.0, 1.0, 1.0)))):
        case_id = f"BraTS-MET-0000{index + 1}-000"
        shape = (18, 20, 16)
        affine = affine_for(kind, zooms)
        label = tumour(shape, rng)
        image = scan(label, rng)
        for c, tag in enumerate(("t1n", "t1c", "t2w", "t2f")):
            save(root / case_id / f"{case_id}-{tag}.nii.gz", image[..., c], affine)
        segs[case_id] = root / case_id / f"{case_id}-seg.nii.gz"
        save(segs[case_id], label, affine)
    return segs


def noisyseg(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "noisyseg"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def assert_labels_kept(store: VolumeStore, sources: dict[str, Path], exact: set[str]) -> None:
    """The stored multi-class map, taken back to the source grid, equals the source labels:
    voxel for voxel where ingest did not resample (and in nibabel's canonical space); where it
    did (nearest neighbour there and back), on almost every voxel with the same label values."""
    for case_id, label_path in sources.items():
        source = nib.load(str(label_path))
        want = np.asarray(source.dataobj).astype(np.int64)
        stored = np.asarray(store.labels(case_id, "source-multiclass")[...]).astype(np.int64)
        geometry = Geometry.from_json(store.case_attrs(case_id)["geometry"])
        back = to_original(stored, geometry, order=0)
        assert back.shape == want.shape
        assert set(np.unique(back)) == set(np.unique(want)) == {0, 1, 2, 3}
        if case_id in exact:
            np.testing.assert_array_equal(back, want)
            canonical = nib.as_closest_canonical(source)
            np.testing.assert_array_equal(
                stored.transpose(2, 1, 0), np.asarray(canonical.dataobj).astype(np.int64)
            )
        else:
            assert (back == want).mean() > 0.95


def assert_outputs_in_input_geometry(out: Path, inputs: dict[str, Path]) -> int:
    """Every map has its input's affine and shape; centroids are inside their lesions."""
    lesions = 0
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["case_id"]) == sorted(inputs)
    assert set(summary["status"]) == {"ok"}
    for case_id, image_path in inputs.items():
        source = nib.load(str(image_path))
        for name in ("probability", "mask", "lesions"):
            image = nib.load(str(out / case_id / f"{name}.nii.gz"))
            np.testing.assert_array_equal(image.affine, source.affine)
            assert image.shape == source.shape[:3]
        instances = np.asarray(nib.load(str(out / case_id / "lesions.nii.gz")).dataobj)
        mask = np.asarray(nib.load(str(out / case_id / "mask.nii.gz")).dataobj)
        np.testing.assert_array_equal(instances > 0, mask > 0)
        table = pd.read_csv(out / case_id / "lesions.csv")
        assert len(table) == int(instances.max())
        inverse = np.linalg.inv(source.affine)
        for row in table.to_dict("records"):
            world = np.array([row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"], 1])
            voxel = tuple(np.rint((inverse @ world)[:3]).astype(int))
            assert instances[voxel] == row["lesion_id"]  # the centroid is inside its lesion
        lesions += len(table)
    return lesions


@pytest.mark.timeout(3000)  # ingest, train, register, predict: minutes on a loaded 2-core machine
def test_hospital_path(ray_head, mlflow_server, tmp_path):
    env = ray_env(MLFLOW_TRACKING_URI=mlflow_server.uri, RAY_ADDRESS=ray_head.address)
    msd_root = tmp_path / "Task01_BrainTumour"
    msd_files = make_msd(msd_root)
    brats_root = tmp_path / "brats"
    brats_segs = make_brats(brats_root)

    # 1. ingest: val/test split, resampled to 1 mm (two cases have a 1.5 mm axis)
    target = ",".join(str(t) for t in TARGET)
    split = ["--val-fraction", "0.34", "--test-fraction", "0.17", "--seed", "1"]
    msd_store = str(tmp_path / "msd.zarr")
    noisyseg(
        "ingest",
        str(msd_root),
        msd_store,
        "--target-spacing",
        target,
        *split,
        "--no-progress",
        env=env,
        cwd=tmp_path,
    )
    brats_store = str(tmp_path / "brats.zarr")
    noisyseg("ingest", str(brats_root), brats_store, "--no-progress", env=env, cwd=tmp_path)
    store = VolumeStore.open(msd_store)
    splits = {s: store.case_ids(split=s) for s in ("train", "val", "test", "unlabeled")}
    assert sorted(splits["unlabeled"]) == sorted(TEST)
    assert len(splits["val"]) >= 1 and len(splits["test"]) >= 1 and len(splits["train"]) >= 2
    resampled = {"BRATS_004"}
    assert_labels_kept(store, {c: msd_files[c][1] for c in TRAIN}, set(TRAIN) - resampled)
    assert_labels_kept(VolumeStore.open(brats_store), brats_segs, set(brats_segs))

    # 2. train a few steps on the defaults (val split, loss, ...) and register with an alias
    output = noisyseg(
        "train",
        "--store",
        msd_store,
        "--steps",
        "4",
        "--patch-size",
        "16",
        "--channels",
        "4",
        "8",
        "--num-res-units",
        "0",
        "--batch-size",
        "1",
        "--val-interval",
        "4",
        "--checkpoint-interval",
        "4",
        "--output-prior",
        "0",
        "--run-name",
        "hospital-1",
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--register",
        "hospital",
        "--alias",
        "champion",
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert "registered as models:/hospital@champion" in output
    client = mlflow.MlflowClient(mlflow_server.uri)
    version = client.get_model_version_by_alias("hospital", "champion")
    assert client.get_run(version.run_id).info.status == "FINISHED"

    # 3. predict the unlabeled imagesTs scans (Ray Data, 2 workers) and the BraTS cases
    out = tmp_path / "predictions"
    noisyseg(
        "predict",
        "--model",
        "models:/hospital@champion",
        "--input",
        str(msd_root / "imagesTs"),
        "--output",
        str(out),
        "--workers",
        "2",
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    run = json.loads((out / "run.json").read_text())
    assert run["run_id"] == version.run_id and run["preprocessing"]["orientation"] == "RAS"
    assert run["preprocessing"]["target_spacing"] == list(TARGET)
    lesions = assert_outputs_in_input_geometry(out, {c: msd_files[c][0] for c in TEST})
    brats_out = tmp_path / "brats_predictions"
    noisyseg(
        "predict",
        "--model",
        "models:/hospital@champion",
        "--input",
        str(brats_root),
        "--output",
        str(brats_out),
        env=env,
        cwd=tmp_path,
    )
    brats_inputs = {c: p.with_name(f"{c}-t1n.nii.gz") for c, p in brats_segs.items()}
    lesions += assert_outputs_in_input_geometry(brats_out, brats_inputs)
    assert lesions > 0  # the centroid check above was not vacuous
