"""Phantom generators: determinism, layout, lesion placement, size distribution, contrast."""

from __future__ import annotations

import time

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from noisyseg.storage.phantoms import (
    BRAIN_CHANNELS,
    SKIN_CHANNELS,
    PhantomCase,
    brain_mets_case,
    default_brain_shape,
    skin_case,
)

# Small grids keep the suite fast; 3 mm voxels still cover most of the brain.
SMALL = {"shape": (48, 56, 48), "spacing_mm": 3.0, "diameter_vox": (1.0, 12.0)}
N_CASES = 16
T1C, FLAIR = BRAIN_CHANNELS.index("t1c"), BRAIN_CHANNELS.index("flair")


@pytest.fixture(scope="module")
def brain_cases() -> list[PhantomCase]:
    return [brain_mets_case(seed, **SMALL) for seed in range(N_CASES)]


@pytest.fixture(scope="module")
def clean_cases() -> list[PhantomCase]:
    """Noise-free twins (same seeds, no Rician noise) for contrast checks on the structure."""
    return [brain_mets_case(seed, noise=(0.0, 0.0), **SMALL) for seed in range(N_CASES)]


def _components(label: np.ndarray) -> tuple[np.ndarray, int]:
    cc = cc3d.connected_components(label, connectivity=26)
    return cc, int(cc.max())


def test_brain_layout(brain_cases: list[PhantomCase]) -> None:
    case = brain_cases[0]
    assert case.image.shape == (4, 48, 56, 48) and case.image.dtype == np.float32
    assert case.label.shape == (48, 56, 48) and case.label.dtype == np.uint8
    assert case.spacing == (3.0, 3.0, 3.0)
    assert case.channel_names == BRAIN_CHANNELS == ["t1", "t1c", "t2", "flair"]
    assert case.affine is not None and case.affine.shape == (4, 4)
    # The affine maps (z, y, x) indices to RAS mm: +1 in x moves 3 mm Right, +1 in z 3 mm Superior.
    assert np.allclose(case.affine[:3, :3], [[0, 0, 3], [0, 3, 0], [3, 0, 0]])
    assert np.isfinite(case.image).all() and (case.image >= 0).all()
    assert (case.image[:, case.tissue == 0] == 0).all()  # skull-stripped background
    assert case.tissue.shape == case.label.shape and set(np.unique(case.tissue)) <= {0, 1, 2, 3}
    for c in brain_cases:
        assert set(np.unique(c.label)) <= {0, 1}


def test_brain_deterministic_and_seed_dependent() -> None:
    a = brain_mets_case(7, **SMALL)
    b = brain_mets_case(7, **SMALL)
    c = brain_mets_case(8, **SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.label, c.label)
    assert np.abs(a.image - c.image).mean() > 0.05 * np.abs(a.image).mean()


def test_brain_default_grid_covers_whole_brain() -> None:
    case = brain_mets_case(0)
    assert case.image.shape == (4, 80, 104, 80) and case.spacing == (2.0, 2.0, 2.0)
    assert default_brain_shape(2.0) == (80, 104, 80) and default_brain_shape(3.0) == (56, 72, 56)
    brain = case.tissue > 0
    # The 160 x 208 x 160 mm grid holds the brain: no brain on the faces except the inferior one
    # (the template itself cuts the brainstem there).
    assert not np.take(brain, -1, axis=0).any()
    for axis in (1, 2):
        assert not np.take(brain, 0, axis=axis).any() and not np.take(brain, -1, axis=axis).any()
    assert 3 <= len(case.lesions) <= 15


def test_components_equal_lesions(brain_cases: list[PhantomCase]) -> None:
    for case in brain_cases:
        cc, n = _components(case.label)
        assert n == len(case.lesions) >= 1
        # Each recorded lesion is exactly one component, with the recorded voxel count.
        sizes = np.bincount(cc.ravel())[1:]
        assert sorted(sizes.tolist()) == sorted(les["voxels"] for les in case.lesions)
        assert sum(les["voxels"] for les in case.lesions) == int(case.label.sum())
        assert [les["id"] for les in case.lesions] == list(range(1, n + 1))
        # At least one empty voxel between lesions: dilating each component by one voxel (26-nbhd)
        # never reaches another.
        for k in range(1, n + 1):
            grown = ndimage.binary_dilation(cc == k, structure=np.ones((3, 3, 3)))
            assert not (grown & (cc > 0) & (cc != k)).any()


def test_lesions_inside_brain_tissue(brain_cases: list[PhantomCase]) -> None:
    for case in brain_cases:
        lesion = case.label > 0
        assert (case.tissue[lesion] > 0).all()  # never outside the brain
        assert np.isin(case.tissue[lesion], (2, 3)).mean() >= 0.8  # mostly GM / WM, not CSF
        for les in case.lesions:
            z, y, x = np.round(les["center"]).astype(int)
            assert case.tissue[z, y, x] > 0


def test_lesion_sizes_long_tailed(brain_cases: list[PhantomCase]) -> None:
    diam, measured = [], []
    for case in brain_cases:
        diam += [les["diameter_vox"] for les in case.lesions]
        measured += [les["voxels"] for les in case.lesions]
    diam_arr, vox = np.asarray(diam), np.asarray(measured)
    assert diam_arr.min() >= 1.0 and diam_arr.max() <= 12.0
    assert np.median(diam_arr) < diam_arr.mean()  # right-skewed
    assert (diam_arr < 5.0).mean() > 0.6  # many small
    assert 0.0 < (diam_arr >= 8.0).mean() < 0.15  # few large, but some
    # The labels follow the nominal sizes: equivalent-sphere diameter of the voxel count.
    eq = (6.0 * vox / np.pi) ** (1.0 / 3.0)
    big = diam_arr >= 4.0
    assert np.all(np.abs(eq[big] / diam_arr[big] - 1.0) < 0.35)
    assert np.median(vox) < vox.mean() / 2


def _component_of(cc: np.ndarray, les: dict) -> int:
    """The component id holding a lesion: the one at its centre, else the nearest one of its size."""
    z, y, x = np.round(les["center"]).astype(int)
    if cc[z, y, x] > 0:
        return int(cc[z, y, x])
    ids, sizes = np.unique(cc[cc > 0], return_counts=True)
    cand = ids[sizes == les["voxels"]]
    com = ndimage.center_of_mass(cc > 0, cc, cand)
    dist = [np.linalg.norm(np.subtract(c, les["center"])) for c in com]
    return int(cand[int(np.argmin(dist))])


def _surround(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    a = ndimage.binary_dilation(mask, iterations=outer)
    b = ndimage.binary_dilation(mask, iterations=inner)
    return a & ~b


def test_t1c_lesion_brighter_than_surrounding_tissue(
    brain_cases: list[PhantomCase], clean_cases: list[PhantomCase]
) -> None:
    tiny_diff = []
    for case, clean in zip(brain_cases, clean_cases, strict=True):
        cc, _ = _components(case.label)
        parenchyma = np.isin(case.tissue, (2, 3)) & (case.label == 0)
        for les in case.lesions:
            m = cc == _component_of(cc, les)
            ring = _surround(m, 1, 3) & parenchyma
            # A ring-enhancing lesion's mean includes its dark necrotic core: compare its rim.
            stat = np.mean if not les["ring"] else lambda v: np.percentile(v, 90)
            diff = stat(clean.image[T1C][m]) - clean.image[T1C][ring].mean()
            if m.sum() >= 3:  # noise-free: every lesion of >= 3 voxels enhances
                assert diff > 0
            else:  # 1-2 voxels: partial volume + PSF leave a faint blip, positive on average
                tiny_diff.append(diff / clean.image[T1C][ring].mean())
            if m.sum() >= 8:  # with noise: every lesion of >= 8 voxels is still brighter
                assert stat(case.image[T1C][m]) > case.image[T1C][ring].mean()
    assert len(tiny_diff) >= 5 and np.mean(tiny_diff) > 0.03


def test_small_lesions_lower_contrast(clean_cases: list[PhantomCase]) -> None:
    """Partial volume + PSF: mean T1c contrast of 1-2 voxel lesions is below that of >= 4 voxel ones."""
    small, large = [], []
    for case in clean_cases:
        cc, _ = _components(case.label)
        parenchyma = np.isin(case.tissue, (2, 3)) & (case.label == 0)
        t1c = case.image[T1C]
        for k in range(1, cc.max() + 1):
            m = cc == k
            ring = _surround(m, 1, 3) & parenchyma
            rel = t1c[m].max() / t1c[ring].mean() - 1.0
            (small if m.sum() <= 2 else large if m.sum() >= 30 else []).append(rel)
    assert len(small) >= 5 and len(large) >= 5
    assert np.median(small) < 0.6 * np.median(large)


def test_flair_oedema_brighter_than_background(brain_cases: list[PhantomCase]) -> None:
    shell_means = []
    for case in brain_cases:
        cc, _ = _components(case.label)
        parenchyma = np.isin(case.tissue, (2, 3))
        lesion_any = case.label > 0
        far = parenchyma & ~ndimage.binary_dilation(lesion_any, iterations=8)
        for les in case.lesions:
            if les["oedema_mm"] < 6.0 or les["voxels"] < 8:
                continue
            z, y, x = np.round(les["center"]).astype(int)
            k = cc[z, y, x]
            assert k > 0  # a lesion of >= 8 voxels contains its centre (star-shaped about it)
            shell = _surround(cc == k, 1, 2) & parenchyma & ~lesion_any
            shell_means.append(case.image[FLAIR][shell].mean() / case.image[FLAIR][far].mean())
    assert len(shell_means) >= 5
    assert np.median(shell_means) > 1.15
    assert np.mean(np.asarray(shell_means) > 1.0) > 0.9


def test_tissue_contrasts() -> None:
    """T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: GM > WM > CSF (CSF suppressed).

    Lesion-free, noise-free case; tissue masks eroded by one voxel to keep partial volume out.
    """
    case = brain_mets_case(0, n_lesions=(0, 0), noise=(0.0, 0.0), **SMALL)
    assert case.label.sum() == 0 and case.lesions == []
    pure = [ndimage.binary_erosion(case.tissue == t) for t in (1, 2, 3)]
    means = {ch: [np.median(case.image[i][m]) for m in pure] for i, ch in enumerate(BRAIN_CHANNELS)}
    csf, gm, wm = means["t1"]
    assert wm > 1.2 * gm and gm > 1.2 * csf
    csf, gm, wm = means["t2"]
    assert csf > 1.5 * gm and gm > 1.1 * wm
    csf, gm, wm = means["flair"]
    assert gm > 1.05 * wm and wm > 1.5 * csf


def test_brain_case_speed() -> None:
    brain_mets_case(0)  # template cache warm
    # CPU time, not wall time: the 2-core machine is shared, wall time depends on the neighbours.
    t0 = time.process_time()
    brain_mets_case(1)
    assert time.process_time() - t0 < 2.0  # measured ~0.7 s


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        brain_mets_case(0, shape=(4, 4, 4))
    with pytest.raises(ValueError):
        brain_mets_case(0, n_lesions=(5, 2))
    with pytest.raises(ValueError):
        brain_mets_case(0, spacing_mm=0.0)
    with pytest.raises(ValueError):
        skin_case(0, size=8)


# --- skin --------------------------------------------------------------------------------------


def test_skin_layout_and_determinism() -> None:
    a, b, c = skin_case(3), skin_case(3), skin_case(4)
    assert a.image.shape == (3, 128, 128) and a.image.dtype == np.float32
    assert a.label.shape == (128, 128) and a.label.dtype == np.uint8
    assert a.channel_names == SKIN_CHANNELS and a.affine is None
    assert a.spacing == pytest.approx((20.0 / 128, 20.0 / 128))
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert skin_case(0, size=64).image.shape == (3, 64, 64)


def test_skin_lesion_properties() -> None:
    fractions = []
    t0 = time.process_time()
    cases = [skin_case(seed) for seed in range(40)]
    assert (time.process_time() - t0) / 40 < 0.2  # measured ~0.011 s
    for case in cases:
        assert set(np.unique(case.label)) == {0, 1}
        _, n = ndimage.label(case.label, structure=np.ones((3, 3)))
        assert n == 1
        lum = case.image.mean(axis=0)
        lesion = case.label > 0
        skin = ~ndimage.binary_dilation(lesion, iterations=4)
        assert lum[lesion].mean() < lum[skin].mean()
        frac = lesion.mean()
        assert 0.08 <= frac <= 0.45
        assert case.lesions[0]["voxels"] == int(lesion.sum())
        fractions.append(frac)
    assert np.ptp(fractions) > 0.15  # sizes vary across the range
