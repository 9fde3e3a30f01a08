"""``noisyseg predict`` on new scans: the way into the model's grid and back, lesion tables, bad
cases, store predictions with provenance.

Expected values are computed here independently: z-scores and sigmoids in NumPy on the input
arrays, reorientation with nibabel's own ``as_closest_canonical``, lesion geometry from
``np.argwhere`` and the affine, components with ``scipy.ndimage.label``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from torch import nn

from noisyseg.cli import main
from noisyseg.distributed.scan_inputs import Preprocessing, discover_scans, load_scan
from noisyseg.distributed.scan_prediction import (
    ScanPredictor,
    label_instances,
    lesion_table,
    predict_scans,
    scan_probability,
)
from noisyseg.distributed.sliding_window import predict_volume
from noisyseg.models import UNetSpec, build_unet
from noisyseg.storage.store import VolumeStore

SPEC = UNetSpec(spatial_dims=3, in_channels=2, channels=(4, 8), num_res_units=0, norm="batch")
ROI = (8, 8, 8)
SHAPE = (10, 12, 9)  # NIfTI (i, j, k)


def affine_for(kind: str, zooms, origin=(-20.0, 15.0, 7.5)) -> np.ndarray:
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
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def smooth(shape, rng) -> np.ndarray:
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32) * 50 + 300


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A flat folder of nnU-Net channel files / 4D files: two good cases, four bad ones."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(3)
    lps = affine_for("LPS", (1.5, 1.0, 2.0))
    for c in range(2):
        save(root / f"caseA_{c:04d}.nii.gz", smooth(SHAPE, rng), lps)
    save(
        root / "caseB.nii.gz",
        np.stack([smooth(SHAPE, rng)] * 2, -1) * [1, 3],
        affine_for("PSR", (1.0, 2.0, 1.5)),
    )
    save(root / "caseC_0000.nii.gz", smooth(SHAPE, rng), lps)  # no _0001
    save(root / "caseC_0002.nii.gz", smooth(SHAPE, rng), lps)
    save(root / "caseD_0000.nii.gz", smooth(SHAPE, rng), lps)
    save(root / "caseD_0001.nii.gz", smooth((10, 12, 8), rng), lps)  # other shape
    save(root / "caseE_0000.nii.gz", smooth(SHAPE, rng), lps)
    save(
        root / "caseE_0001.nii.gz",
        smooth(SHAPE, rng),
        affine_for("LPS", (1.5, 1.0, 2.0), (-15.0, 15.0, 7.5)),
    )
    save(root / "caseF.nii.gz", np.stack([smooth(SHAPE, rng)] * 3, -1), lps)  # 3 channels
    return root


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = build_unet(SPEC).eval()
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "unet_spec": SPEC.to_dict(),
            "config": {"patch_size": 8, "val_overlap": 0.5},
            "step": 5,
        },
        path,
    )
    return path, model


def pointwise(weights, bias: float) -> nn.Module:
    conv = nn.Conv3d(len(weights), 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights, dtype=torch.float32).reshape(1, -1, 1, 1, 1))
        conv.bias.fill_(bias)
    return conv.eval()


def numpy_zscore(channels: list[np.ndarray]) -> list[np.ndarray]:
    return [(c - c.mean(dtype=np.float64)) / c.std(dtype=np.float64) for c in channels]


def case(folder: Path, case_id: str):
    return next(c for c in discover_scans(folder, in_channels=2) if c.case_id == case_id)


def canonical_expected(model: nn.Module, files: list[str]) -> np.ndarray:
    """The model's probability on nibabel's canonical grid, mapped back to the file's grid with
    nibabel's orientation tools — independent of noisyseg's geometry code."""
    first = nib.load(files[0])
    channels = []
    for path in files:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        vols = [data[..., c] for c in range(data.shape[3])] if data.ndim == 4 else [data]
        for vol in vols:
            canon = nib.as_closest_canonical(nib.Nifti1Image(vol, image.affine))
            channels.append(np.asarray(canon.dataobj, dtype=np.float32))
    z = np.stack([c.astype(np.float32) for c in numpy_zscore(channels)]).transpose(0, 3, 2, 1)
    probability = predict_volume(model, z, roi_size=ROI, overlap=0.5, normalize=False)
    ornt = nib.orientations.io_orientation(first.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return nib.orientations.apply_orientation(probability.transpose(2, 1, 0), back)


# --------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("case_id", ["caseA", "caseB"])
def test_scan_probability_on_the_input_grid(folder, case_id):
    """A pointwise model makes the probability a known function of each input voxel: after
    reorientation, prediction and the way back it must sit on the very same voxel."""
    model = pointwise([0.7, -0.4], 0.2)
    prep = Preprocessing(in_channels=2, orientation="RAS", roi_size=ROI, overlap=0.5)
    scan = load_scan(case(folder, case_id), in_channels=2)
    got = scan_probability(model, scan, prep)
    image = nib.load(scan_files := case(folder, case_id).files[0])
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim == 4:
        channels = [data[..., 0], data[..., 1]]
    else:
        channels = [data, np.asarray(nib.load(scan_files.replace("_0000", "_0001")).dataobj)]
    z = numpy_zscore([np.asarray(c, dtype=np.float32) for c in channels])
    expected = 1.0 / (1.0 + np.exp(-(0.7 * z[0] - 0.4 * z[1] + 0.2)))
    assert got.shape == SHAPE
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_target_spacing_resamples_there_and_back(folder):
    model = pointwise([1.0, 0.0], 0.0)
    scan = load_scan(case(folder, "caseA"), in_channels=2)
    native = Preprocessing(in_channels=2, orientation="RAS", roi_size=ROI)
    same = Preprocessing(
        in_channels=2, orientation="RAS", roi_size=ROI, target_spacing=(1.5, 1.0, 2.0)
    )
    coarse = Preprocessing(
        in_channels=2, orientation="RAS", roi_size=ROI, target_spacing=(3.0, 2.0, 2.0)
    )
    reference = scan_probability(model, scan, native)
    # a target equal to the scan's own spacing resamples onto the same grid: same numbers
    np.testing.assert_allclose(scan_probability(model, scan, same), reference, atol=1e-5)
    resampled = scan_probability(model, scan, coarse)
    assert resampled.shape == SHAPE
    # a smooth image survives halving the resolution: the maps agree closely, not exactly
    assert np.corrcoef(resampled.ravel(), reference.ravel())[0, 1] > 0.95
    assert not np.allclose(resampled, reference, atol=1e-4)


# --------------------------------------------------------------------------------- lesions
def test_lesion_table_against_hand_computation():
    affine = affine_for("LPS", (0.5, 2.0, 1.5))
    instances = np.zeros((9, 9, 5), dtype=np.uint16)
    instances[1:8, 1:8, 2] = 1
    instances[3:6, 3:8, 2] = 0  # a C-shaped lesion: its centre of mass is in the gap
    instances[7:9, 0:2, 0:2] = 2
    rng = np.random.default_rng(0)
    probability = rng.random(instances.shape).astype(np.float32)
    table = lesion_table(probability, instances, affine)
    assert list(table["lesion_id"]) == [1, 2]
    voxel_volume = 0.5 * 2.0 * 1.5
    for row in table.to_dict("records"):
        k = row["lesion_id"]
        voxels = np.argwhere(instances == k)
        com = affine @ np.append(voxels.mean(axis=0), 1.0)
        assert [row[f"center_of_mass_{a}_mm"] for a in "xyz"] == pytest.approx(com[:3])
        assert row["n_voxels"] == len(voxels)
        assert row["volume_mm3"] == pytest.approx(len(voxels) * voxel_volume)
        assert row["max_probability"] == pytest.approx(probability[instances == k].max())
        assert row["mean_probability"] == pytest.approx(probability[instances == k].mean())
        inside = (row["voxel_i"], row["voxel_j"], row["voxel_k"])
        assert instances[inside] == k  # the reported centroid lies in its lesion
        world = affine @ np.append(inside, 1.0)
        assert [row[f"centroid_{a}_mm"] for a in "xyz"] == pytest.approx(world[:3])
    c_com = np.round(np.argwhere(instances == 1).mean(axis=0)).astype(int)
    assert instances[tuple(c_com)] != 1  # the case the inside point exists for
    empty = lesion_table(probability, np.zeros_like(instances), affine)
    assert len(empty) == 0 and "centroid_x_mm" in empty.columns


def test_label_instances_matches_scipy():
    rng = np.random.default_rng(1)
    mask = (ndimage.gaussian_filter(rng.random((20, 18, 16)), 1.0) > 0.52).astype(np.uint8)
    ours = label_instances(mask)
    theirs, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert count > 2 and ours.max() == count and ours.dtype == np.uint16
    pairs = {(int(a), int(b)) for a, b in zip(ours[mask > 0], theirs[mask > 0], strict=True)}
    assert len(pairs) == count  # the same partition, one-to-one


# --------------------------------------------------------------------------------- many cases
def test_predict_scans_outputs_and_bad_cases(folder, checkpoint_file, tmp_path):
    path, model = checkpoint_file
    checkpoint = torch.load(path, weights_only=True)
    prep = Preprocessing(in_channels=2, orientation="RAS", roi_size=ROI, overlap=0.5)
    cases = discover_scans(folder, in_channels=2)
    assert [c.case_id for c in cases] == [f"case{x}" for x in "ABCDEF"]
    probe = ScanPredictor(checkpoint, prep.to_dict(), str(tmp_path))
    threshold = float(np.quantile(probe.probability(cases[0])[0], 0.8))  # some lesions
    summary = predict_scans(cases, checkpoint, prep, str(tmp_path / "out"), threshold=threshold)
    status = dict(zip(summary["case_id"], summary["status"], strict=True))
    assert status == {"caseA": "ok", "caseB": "ok"} | {f"case{x}": "failed" for x in "CDEF"}
    errors = dict(zip(summary["case_id"], summary["error"], strict=True))
    assert (
        errors["caseC"].startswith("case caseC: ")
        and "missing channel file(s) _0001" in (errors["caseC"])
    )
    assert "case caseD: " in errors["caseD"] and "caseD_0001.nii.gz" in errors["caseD"]
    assert "shape (10, 12, 8)" in errors["caseD"]
    assert "caseE_0001.nii.gz" in errors["caseE"] and "affine differs" in errors["caseE"]
    assert "model expects 2 image channels, the case has 3" in errors["caseF"]
    assert all("\n" not in line for line in errors.values())
    for x in "CDEF":
        assert not (tmp_path / "out" / f"case{x}").exists()
    on_disk = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert list(on_disk["case_id"]) == list(summary["case_id"])
    for case_id in ("caseA", "caseB"):
        source = nib.load(case(folder, case_id).files[0])
        out = tmp_path / "out" / case_id
        maps = {n: nib.load(str(out / f"{n}.nii.gz")) for n in ("probability", "mask", "lesions")}
        for image in maps.values():
            np.testing.assert_array_equal(image.affine, source.affine)
            assert image.shape == SHAPE
        probability = np.asarray(maps["probability"].dataobj)
        expected = canonical_expected(model, case(folder, case_id).files)
        np.testing.assert_allclose(probability, expected, atol=1e-5)
        mask = np.asarray(maps["mask"].dataobj)
        np.testing.assert_array_equal(mask, probability >= threshold)
        instances = np.asarray(maps["lesions"].dataobj)
        np.testing.assert_array_equal(instances > 0, mask > 0)
        table = pd.read_csv(out / "lesions.csv")
        assert (
            len(table)
            == instances.max()
            == int(summary.set_index("case_id").at[case_id, "n_lesions"])
        )
        for row in table.to_dict("records"):
            assert instances[row["voxel_i"], row["voxel_j"], row["voxel_k"]] == row["lesion_id"]
    assert summary.set_index("case_id").loc[["caseA", "caseB"], "n_lesions"].sum() > 0


def test_predict_cli_folder(folder, checkpoint_file, tmp_path, capsys):
    path, _ = checkpoint_file
    out = tmp_path / "pred"
    argv = ["predict", "--model", str(path), "--input", str(folder), "--output", str(out)]
    assert main(argv + ["--table-format", "parquet"]) == 2  # bad cases: status 2, good ones done
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("noisyseg predict: error:")]
    assert [line.split()[4] for line in errors] == ["caseC:", "caseD:", "caseE:", "caseF:"]
    assert (out / "caseA" / "lesions.parquet").is_file() and (out / "summary.parquet").is_file()
    assert (out / "run.json").is_file()
    assert main(argv) == 2
    assert "output folder is not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--threshold", "1.5"]) == 2
    assert "--threshold must be in [0, 1]" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "--model",
                str(path),
                "--input",
                str(tmp_path / "nope"),
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "input does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------- store
@pytest.fixture()
def store_url(tmp_path) -> str:
    url = str(tmp_path / "s.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["a", "b"])
    rng = np.random.default_rng(0)
    for index in range(2):
        truth = np.zeros((8, 10, 12), np.uint8)
        truth[2:5, 3:6, 4:8] = 1
        image = np.stack([truth * 5.0 + rng.normal(size=truth.shape)] * 2).astype(np.float32)
        store.write_case(
            f"c{index}", image, {"truth": truth}, spacing=(2.0, 1.0, 1.0), split="test"
        )
    return url


@pytest.mark.fault_case(4)
def test_store_predictions_refuse_existing_name_and_record_provenance(
    store_url, checkpoint_file, capsys
):
    import zarr

    path, _ = checkpoint_file
    argv = ["predict", "--store", store_url, "--checkpoint", str(path), "--name", "p1"]
    assert main(argv + ["--threshold", "0.3"]) == 0
    store = VolumeStore.open(store_url)
    first = store.prediction("c0", "p1")[...]
    attrs = zarr.open_group(store=store.zstore, path="cases/c0/predictions/p1", mode="r").attrs
    recorded = attrs["noisyseg"]
    assert recorded["model"] == str(path) and recorded["threshold"] == 0.3
    assert recorded["step"] == 5 and recorded["run_id"] is None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prediction 'p1' exists for 2 case(s)" in err[0]
    np.testing.assert_array_equal(VolumeStore.open(store_url).prediction("c0", "p1")[...], first)
    assert main(argv + ["--overwrite"]) == 0


def test_store_to_files_in_stored_geometry(store_url, checkpoint_file, tmp_path):
    path, model = checkpoint_file
    out = tmp_path / "o"
    assert (
        main(
            [
                "predict",
                "--model",
                str(path),
                "--input",
                store_url,
                "--split",
                "test",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    store = VolumeStore.open(store_url)
    image = nib.load(str(out / "c1" / "probability.nii.gz"))
    assert image.shape == (12, 10, 8)  # NIfTI (x, y, z) of the stored (z, y, x)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [1.0, 1.0, 2.0])
    volume = store.image("c1")[...]
    z = np.stack(numpy_zscore(list(volume))).astype(np.float32)
    expected = predict_volume(model, z, roi_size=ROI, overlap=0.5, normalize=False)
    np.testing.assert_allclose(np.asarray(image.dataobj).transpose(2, 1, 0), expected, atol=1e-5)
