"""``--image-interpolation bspline``: images resampled at ingest with a cubic B-spline (nnU-Net's
order 3), labels nearest; checked against an analytic function and against scipy directly."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from noisyseg.cli import main as cli_main
from noisyseg.errors import NoisysegInputError
from noisyseg.storage import geometry as G
from noisyseg.storage.ingest import ingest_folder
from noisyseg.storage.store import VolumeStore

SHAPE = (20, 18, 16)  # i, j, k
ZOOMS = (1.0, 1.5, 2.0)  # mm
TARGET = (0.8, 1.1, 1.3)  # mm, x, y, z: no target voxel centre on a source voxel centre


def smooth(i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """A smooth test function of source voxel coordinates."""
    return np.sin(0.35 * i) * np.cos(0.3 * j) + 0.05 * (k - 7.0) ** 2


def _source() -> tuple[np.ndarray, G.Grid]:
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 22.0]
    data = smooth(*np.indices(SHAPE, dtype=np.float64)).astype(np.float32)
    return data, G.make_grid(SHAPE, affine, ZOOMS)


def _target_coords(dst: G.Grid) -> np.ndarray:
    """Source voxel coordinates (3, *dst.shape) of every target voxel centre."""
    idx = np.indices(dst.shape, dtype=np.float64)
    scale = np.asarray(TARGET) / np.asarray(ZOOMS)
    return idx * scale[:, None, None, None]


def test_bspline_beats_linear_and_is_scipy_order_3():
    data, src = _source()
    dst = G.resampled_grid(src, TARGET)
    coords = _target_coords(dst)
    truth = smooth(*coords)
    inside = np.all(
        [(c >= 2) & (c <= n - 3) for c, n in zip(coords, SHAPE)], axis=0
    )  # away from the edges, where both fall back on the edge voxel
    linear = G.resample(data, src, dst, order=G.interpolation_order("linear"))
    bspline = G.resample(data, src, dst, order=G.interpolation_order("bspline"))
    err_linear = np.abs(linear - truth)[inside].max()
    err_bspline = np.abs(bspline - truth)[inside].max()
    assert err_bspline < 0.25 * err_linear, (err_bspline, err_linear)
    direct = ndi.map_coordinates(data.astype(np.float64), coords, order=3, mode="nearest")
    np.testing.assert_allclose(bspline, direct, atol=1e-4)
    np.testing.assert_allclose(
        linear,
        ndi.map_coordinates(data.astype(np.float64), coords, order=1, mode="nearest"),
        atol=1e-4,
    )
    with pytest.raises(NoisysegInputError, match="image-interpolation"):
        G.interpolation_order("cubic")


def _msd(root: Path) -> np.ndarray:
    """One-case nnU-Net folder (RAS, no reorientation): image = :func:`smooth`, label a box."""
    data, grid = _source()
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1"},
                "labels": {"background": 0, "lesion": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    label = np.zeros(SHAPE, np.uint8)
    label[5:12, 4:10, 3:9] = 1
    for arr, rel in ((data, "imagesTr/c_001_0000.nii.gz"), (label, "labelsTr/c_001.nii.gz")):
        img = nib.Nifti1Image(arr, grid.affine)
        img.header.set_zooms(ZOOMS)
        nib.save(img, str(root / rel))
    return data


def test_ingest_bspline_recorded_images_order_3_labels_nearest(tmp_path):
    data = _msd(tmp_path / "src")
    url = str(tmp_path / "bs.zarr")
    kw = dict(progress=False, val_fraction=0.0, test_fraction=0.0, target_spacing=TARGET)
    report = ingest_folder(tmp_path / "src", url, image_interpolation="bspline", **kw)
    assert report.ok, [f.line() for f in report.failed]
    store = VolumeStore.open(url)
    geo = G.Geometry.from_json(store.case_attrs("c_001")["geometry"])
    assert geo.image_interpolation == "bspline"
    params = store.label_set_info("truth")["params"]
    assert params["image_interpolation"] == "bspline" and params["target_spacing"] == list(TARGET)
    coords = _target_coords(geo.stored)
    want = ndi.map_coordinates(data.astype(np.float64), coords, order=3, mode="nearest")
    np.testing.assert_allclose(store.image("c_001")[0], want.transpose(2, 1, 0), atol=1e-4)
    label = np.zeros(SHAPE, np.uint8)
    label[5:12, 4:10, 3:9] = 1
    nearest = ndi.map_coordinates(label, coords, order=0, mode="nearest")
    np.testing.assert_array_equal(store.labels("c_001")[:], nearest.transpose(2, 1, 0))
    # resuming with another interpolation is refused; the flag alone (no resampling) too
    with pytest.raises(NoisysegInputError, match="image_interpolation"):
        ingest_folder(tmp_path / "src", url, image_interpolation="linear", **kw)
    with pytest.raises(NoisysegInputError, match="needs --target-spacing"):
        ingest_folder(tmp_path / "src", str(tmp_path / "x.zarr"), image_interpolation="bspline")
    # linear (the default) is recorded as such
    lin = str(tmp_path / "lin.zarr")
    assert ingest_folder(tmp_path / "src", lin, **kw).ok
    lin_store = VolumeStore.open(lin)
    assert G.Geometry.from_json(lin_store.case_attrs("c_001")["geometry"]).image_interpolation == (
        "linear"
    )
    assert lin_store.label_set_info("truth")["params"]["image_interpolation"] == "linear"


def test_cli_flag(tmp_path, capsys):
    _msd(tmp_path / "src")
    url = str(tmp_path / "cli.zarr")
    args = ["ingest", str(tmp_path / "src"), url, "--no-progress", "--val-fraction", "0"]
    spacing = ["--target-spacing", ",".join(str(t) for t in TARGET)]
    assert cli_main([*args, *spacing, "--image-interpolation", "bspline"]) == 0
    geo = VolumeStore.open(url).case_attrs("c_001")["geometry"]
    assert geo["image_interpolation"] == "bspline"
    with pytest.raises(SystemExit):
        cli_main([*args, *spacing, "--image-interpolation", "cubic"])
    assert "invalid choice" in capsys.readouterr().err
