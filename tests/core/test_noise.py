"""Label-noise simulation: censoring counts, size order, determinism, boundary noise.

Component counts and sizes are recomputed independently with ``scipy.ndimage.label`` (not cc3d).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import count_to_select
from noisyseg.noise import (
    BOUNDARY_MODES,
    NoiseSpec,
    affine_jitter,
    apply_noise,
    bounding_ellipsoid,
    censor_lesions,
    coarsen_polygon,
    convex_hull,
    corrupt_boundaries,
    dilate_erode,
)


def components(mask: np.ndarray, full: bool = True) -> tuple[np.ndarray, int]:
    """Independent labelling: full connectivity (8 in 2D, 26 in 3D) or faces only."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full else 1)
    return ndimage.label(mask != 0, structure=structure)


def component_sizes(mask: np.ndarray) -> list[int]:
    labels, n = components(mask)
    return sorted(np.bincount(labels.ravel(), minlength=n + 1)[1:].tolist())


def blobs(sizes: list[int], ndim: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Separate lesions of the given voxel counts: rows of lesion voxels laid along the last
    axis, each in its own line/plane with a one-voxel gap so no connectivity joins them."""
    rows = len(sizes)
    width = max(sizes)
    shape = (2 * rows + 1, width + 2) if ndim == 2 else (3, 2 * rows + 1, width + 2)
    mask = np.zeros(shape, dtype=np.uint8)
    for i, n in enumerate(sizes):
        if ndim == 2:
            mask[2 * i + 1, 1 : 1 + n] = 1
        else:
            mask[1, 2 * i + 1, 1 : 1 + n] = 1
    return mask


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    ("rate", "k", "expected"),
    [
        (0.0, 10, 0),
        (0.1, 10, 1),
        (0.25, 10, 3),  # 2.5 rounds half up to 3 (Python's round would give 2)
        (0.5, 3, 2),  # 1.5 -> 2
        (0.5, 5, 3),  # 2.5 -> 3 (round(2.5) == 2)
        (0.15, 10, 2),  # 0.15*10 is 1.5 up to float error -> 2
        (0.7, 10, 7),
        (0.33, 10, 3),
        (1.0, 7, 7),
    ],
)
def test_count_to_select_rounds_half_up(rate: float, k: int, expected: int) -> None:
    assert count_to_select(rate, k) == expected


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["random", "size"])
@pytest.mark.parametrize(
    ("rate", "removed"), [(0.0, 0), (0.1, 1), (0.25, 3), (0.5, 5), (0.7, 7), (1.0, 10)]
)
def test_censor_removes_exact_count(ndim: int, mode: str, rate: float, removed: int) -> None:
    mask = blobs([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], ndim)
    assert components(mask)[1] == 10
    out, records = censor_lesions([mask], rate, mode=mode, seed=7)
    assert len(records) == removed
    assert components(out[0])[1] == 10 - removed
    # removed voxels are exactly the recorded lesions' voxels
    assert int(mask.sum()) - int(out[0].sum()) == sum(r.voxels for r in records)
    assert ((out[0] != 0) <= (mask != 0)).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_size_mode_removes_the_smallest(ndim: int) -> None:
    rng = np.random.default_rng(3)
    sizes = rng.permutation(np.arange(1, 21)).tolist()  # 20 distinct sizes in shuffled order
    mask = blobs(sizes, ndim)
    reference = component_sizes(mask)  # brute-force sort, independent labelling
    for rate in (0.2, 0.45, 0.5):
        n = count_to_select(rate, 20)
        out, records = censor_lesions([mask], rate, mode="size", seed=11)
        assert component_sizes(out[0]) == reference[n:]
        assert sorted(r.voxels for r in records) == reference[:n]


def test_size_ties_are_broken_by_seed() -> None:
    mask = blobs([4] * 20, 2)
    picks = set()
    for seed in range(3):
        out_a, rec_a = censor_lesions([mask], 0.5, mode="size", seed=seed)
        out_b, rec_b = censor_lesions([mask], 0.5, mode="size", seed=seed)
        assert rec_a == rec_b and np.array_equal(out_a[0], out_b[0])
        assert len(rec_a) == 10
        picks.add(tuple(r.label for r in rec_a))
    assert len(picks) > 1


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_censoring_is_deterministic_and_seed_dependent(ndim: int) -> None:
    mask = blobs([2] * 20, ndim)
    out0, rec0 = censor_lesions([mask], 0.5, seed=0)
    again, rec_again = censor_lesions([mask], 0.5, seed=0)
    out1, rec1 = censor_lesions([mask], 0.5, seed=1)
    assert rec0 == rec_again and np.array_equal(out0[0], again[0])
    # C(20, 10) = 184756 subsets: a collision would be a 5e-6 accident
    assert {r.label for r in rec0} != {r.label for r in rec1}
    assert not np.array_equal(out0[0], out1[0])


@pytest.mark.parametrize("ndim", [2, 3])
def test_rate_zero_is_identity_and_one_removes_all(ndim: int) -> None:
    mask = blobs([3, 2, 5], ndim).astype(np.int16)
    before = mask.copy()
    out, rec = censor_lesions([mask], 0.0, mode="random", seed=5)
    assert rec == [] and np.array_equal(out[0], mask) and out[0].dtype == np.int16
    assert out[0] is not mask
    out, rec = censor_lesions([mask], 1.0, mode="size", seed=5)
    assert len(rec) == 3 and not out[0].any() and out[0].dtype == np.int16
    assert np.array_equal(mask, before)  # input untouched


def test_dataset_vs_case_scope() -> None:
    # K = 1, 1, 4 lesions. rate 0.5: dataset floor(0.5*6+0.5) = 3 in total;
    # case scope: floor(0.5*1+0.5) = 1, 1, floor(0.5*4+0.5) = 2 -> 4 in total, per case [1, 1, 2].
    masks = [blobs([2], 2), blobs([3], 2), blobs([1, 2, 3, 4], 2)]
    _, rec = censor_lesions(masks, 0.5, scope="dataset", seed=0)
    assert len(rec) == 3
    out, rec = censor_lesions(masks, 0.5, scope="case", seed=0)
    assert [sum(r.case == i for r in rec) for i in range(3)] == [1, 1, 2]
    assert [components(m)[1] for m in out] == [0, 0, 2]
    # case scope: a case's result depends only on its own mask, seed and index
    others_empty = [np.zeros_like(masks[0]), np.zeros_like(masks[1]), masks[2]]
    out_alone, _ = censor_lesions(others_empty, 0.5, scope="case", seed=0)
    assert np.array_equal(out_alone[2], out[2])


def test_physical_spacing_changes_which_is_smallest() -> None:
    small_voxels = np.zeros((4, 4, 4), np.uint8)
    small_voxels[1, 1:3, 1:3] = 1  # 4 voxels
    many_voxels = np.zeros((4, 8, 4), np.uint8)
    many_voxels[1, 1:7, 1] = 1  # 6 voxels
    masks = [small_voxels, many_voxels]
    # by voxel count (1 mm isotropic) the 4-voxel lesion of case 0 is the smallest
    _, rec = censor_lesions(masks, 0.5, mode="size")
    assert [(r.case, r.voxels) for r in rec] == [(0, 4)]
    # with case 0 at 3 x 1 x 1 mm its lesion is 12 mm^3 > 6 mm^3 of case 1
    _, rec = censor_lesions(masks, 0.5, mode="size", spacings=[(3.0, 1.0, 1.0), (1.0, 1.0, 1.0)])
    assert [(r.case, r.voxels, r.volume_mm3) for r in rec] == [(1, 6, 6.0)]


def test_connectivity_decides_what_a_lesion_is() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 1
    mask[3:5, 3:5] = 1  # touches the first square only at a corner
    _, rec8 = censor_lesions([mask], 0.5)  # one 8-connected lesion: floor(0.5+0.5) = 1 removed
    assert len(rec8) == 1 and rec8[0].voxels == 8
    out4, rec4 = censor_lesions([mask], 0.5, connectivity=4)  # two lesions, one removed
    assert len(rec4) == 1 and rec4[0].voxels == 4 and int(out4[0].sum()) == 4


def test_removed_record_contents() -> None:
    mask = np.zeros((5, 10, 12), np.uint8)
    mask[1:3, 2:5, 4:8] = 1  # 2*3*4 = 24 voxels
    _, rec = censor_lesions([mask], 1.0, spacings=(2.0, 0.5, 0.5))
    (r,) = rec
    assert (r.case, r.label, r.voxels) == (0, 1, 24)
    assert r.volume_mm3 == pytest.approx(24 * 2.0 * 0.5 * 0.5)
    assert r.centroid == pytest.approx((1.5, 3.0, 5.5))
    assert r.bbox == ((1, 3), (2, 5), (4, 8))
    assert r.as_dict()["bbox"] == [[1, 3], [2, 5], [4, 8]]


def test_bad_input_names_case_and_rule() -> None:
    good = blobs([2, 3], 2)
    bad = good.copy()
    bad[0, 0] = 3
    with pytest.raises(NoisysegInputError, match=r"case 1: .*not binary"):
        censor_lesions([good, bad], 0.5)
    with pytest.raises(NoisysegInputError, match=r"rate must be in \[0, 1\]"):
        censor_lesions([good], 1.5)
    with pytest.raises(NoisysegInputError, match="rate"):
        censor_lesions([good], float("nan"))
    with pytest.raises(NoisysegInputError, match="mode"):
        censor_lesions([good], 0.5, mode="biggest")
    with pytest.raises(NoisysegInputError, match="scope"):
        censor_lesions([good], 0.5, scope="split")
    with pytest.raises(NoisysegInputError, match="case 0: .*connectivity 26"):
        censor_lesions([good], 0.5, connectivity=26)
    with pytest.raises(NoisysegInputError, match="case 0: .*spacing"):
        censor_lesions([good], 0.5, spacings=[(1.0, 1.0, 1.0)])
    with pytest.raises(NoisysegInputError, match="case 0: .*NaN"):
        censor_lesions([np.full((3, 3), np.nan)], 0.5)


# ----------------------------------------------------------------------------- boundary noise
def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_dilate_square_grows_by_the_disk_ring() -> None:
    mask = np.zeros((15, 15), np.uint8)
    mask[5:10, 5:10] = 1  # 5 x 5 square
    out, (change,) = dilate_erode(mask, 2, "dilate")
    # Disk radius 2: offsets with dx^2 + dy^2 <= 4. Four side bands 5 x 2 each = 40 pixels; in
    # each corner quadrant only offset (1, 1) qualifies ((1,2) has 5 > 4): 4 pixels.
    assert int(out.sum()) == 25 + 40 + 4 == 69
    # brute force: pixels within Euclidean distance 2 of the square
    dist = ndimage.distance_transform_edt(mask == 0)
    assert np.array_equal(out != 0, dist <= 2)
    assert (change.voxels, change.voxels_after, change.voxels_added, change.voxels_removed) == (
        25,
        69,
        44,
        0,
    )
    assert change.dice == pytest.approx(2 * 25 / (25 + 69))


def test_dilate_single_voxel_3d_ball() -> None:
    mask = np.zeros((9, 9, 9), np.uint8)
    mask[4, 4, 4] = 1
    # integer offsets with |o|^2 <= 4: 1 (origin) + 6 (|o|=1) + 12 (sqrt2) + 8 (sqrt3) + 6 (2) = 33
    out, (change,) = dilate_erode(mask, 2, "dilate")
    assert int(out.sum()) == 33 and change.voxels_added == 32
    out, _ = dilate_erode(mask, 1, "dilate")
    assert int(out.sum()) == 7


def test_erode_square_and_never_erase() -> None:
    mask = np.zeros((12, 12), np.uint8)
    mask[2:9, 2:9] = 1  # 7 x 7
    mask[10, 10] = 1  # single pixel
    out, changes = dilate_erode(mask, 1, "erode")
    big = {c.voxels: c for c in changes}
    # erosion by the radius-1 disk (a plus) of a 7x7 square leaves the 5x5 interior
    assert big[49].voxels_after == 25 and big[49].voxels_removed == 24
    assert out[3:8, 3:8].all() and int(out[2:9, 2:9].sum()) == 25
    assert out[10, 10] == 1 and big[1].voxels_after == 1  # kept, not censored
    assert components(out)[1] == 2


def test_erode_does_not_erode_from_the_image_edge() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[0:4, 0:6] = 1  # touches three image edges
    out, _ = dilate_erode(mask, 1, "erode")
    assert out[0:3, :].all() and not out[3:, :].any()


def test_polygon_stays_close_and_has_fewer_vertices() -> None:
    mask = disk((48, 48), (23.3, 24.1), 15)
    out, (change,) = coarsen_polygon(mask, 8, seed=1)
    assert change.params["n_vertices_out"] == 8 < change.params["n_vertices_in"]
    assert dice(out, mask) > 0.93 and change.dice == pytest.approx(dice(out, mask))
    # vertices lie on the boundary of a convex lesion, so the polygon is inside its hull
    from skimage.morphology import convex_hull_image

    assert ((out != 0) <= convex_hull_image(mask != 0)).all()
    # 4 vertices: roughly an inscribed quadrilateral, area <= 2 r^2 (square) vs pi r^2
    out4, _ = coarsen_polygon(mask, 4, seed=1)
    assert int(out4.sum()) <= 2 * 15.5**2 and dice(out4, mask) > 0.6


def test_polygon_3d_slicewise_and_tiny_lesions_kept() -> None:
    zz, yy, xx = np.indices((14, 24, 24))
    mask = ((zz - 7) ** 2 + (yy - 11) ** 2 + (xx - 12) ** 2 <= 36).astype(np.uint8)
    mask[0, 0, 23] = 1  # one-voxel lesion
    out, changes = coarsen_polygon(mask, 5, seed=0)
    by_size = {c.voxels: c for c in changes}
    assert dice(out, mask) > 0.8
    assert out[0, 0, 23] == 1 and by_size[1].voxels_after == 1
    assert (
        by_size[int(mask.sum()) - 1].params["n_vertices_out"]
        < by_size[int(mask.sum()) - 1].params["n_vertices_in"]
    )


def test_hull_of_an_l_shape() -> None:
    mask = np.zeros((7, 7), np.uint8)
    mask[1, 1:6] = 1
    mask[1:6, 1] = 1  # L with two 5-pixel arms: 9 pixels
    out, (change,) = convex_hull(mask)
    # the digital triangle (r-1) + (c-1) <= 4: 5 + 4 + 3 + 2 + 1 = 15 pixels
    rr, cc = np.indices(mask.shape)
    triangle = (rr >= 1) & (cc >= 1) & ((rr - 1) + (cc - 1) <= 4)
    assert np.array_equal(out != 0, triangle)
    assert (change.voxels, change.voxels_after, change.voxels_added) == (9, 15, 6)


def test_ellipsoid_contains_lesion_and_fits_an_ellipse() -> None:
    yy, xx = np.indices((40, 40))
    ellipse = (((yy - 20) / 12.0) ** 2 + ((xx - 19) / 6.0) ** 2 <= 1).astype(np.uint8)
    out, (change,) = bounding_ellipsoid(ellipse)
    assert ((ellipse != 0) <= (out != 0)).all() and change.voxels_removed == 0
    assert dice(out, ellipse) > 0.9
    flat = np.zeros((5, 9, 9), np.uint8)
    flat[2, 2:7, 3:5] = 1  # one voxel thick: regularised covariance keeps it well defined
    out3, (c3,) = bounding_ellipsoid(flat, spacings=(3.0, 1.0, 1.0))
    assert ((flat != 0) <= (out3 != 0)).all() and c3.voxels_after >= 10


def test_jitter_pure_shift_matches_recorded_shift() -> None:
    mask = np.zeros((30, 30), np.uint8)
    mask[10:16, 12:15] = 1
    mask[10, 15] = 1
    out, (change,) = affine_jitter(mask, 3.0, 0.0, 0.0, seed=4)
    shift = np.rint(change.params["shift_vox"]).astype(int)
    expected = np.roll(mask, tuple(shift), axis=(0, 1))
    assert np.array_equal(out, expected)
    assert change.params["scale"] == 1.0


def test_boundary_noise_is_deterministic_and_records_match() -> None:
    masks = [disk((40, 40), (12, 12), 6) | disk((40, 40), (28, 27), 8), disk((40, 40), (20, 20), 4)]
    for mode in BOUNDARY_MODES:
        a, ca = corrupt_boundaries(masks, mode, level="severe", seed=3)
        b, cb = corrupt_boundaries(masks, mode, level="severe", seed=3)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and ca == cb, mode
        assert len(ca) == 3
        for change in ca:
            assert (
                change.voxels_after == change.voxels + change.voxels_added - change.voxels_removed
            )
    a, _ = corrupt_boundaries(masks, "jitter", level="severe", seed=3)
    c, _ = corrupt_boundaries(masks, "jitter", level="severe", seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # with separated lesions and a single lesion per case, the record is the whole change
    single = [disk((40, 40), (20, 20), 6)]
    out, (change,) = corrupt_boundaries(single, "jitter", level="moderate", seed=9)
    both = int(np.count_nonzero((out[0] != 0) & (single[0] != 0)))
    assert change.voxels_added == int(out[0].sum()) - both
    assert change.voxels_removed == int(single[0].sum()) - both


def test_boundary_rate_selects_lesions() -> None:
    mask = blobs([6, 6, 6, 6], 2)
    mask = np.pad(mask, 3)
    _out, changes = corrupt_boundaries([mask], "dilate", params={"k": 1}, rate=0.5, seed=2)
    assert len(changes) == 2


def test_apply_noise_dispatch_and_names() -> None:
    masks = [blobs([1, 2, 3, 4], 3)]
    out, rec = apply_noise(masks, {"mode": "size", "rate": 0.5}, seed=1)
    ref, _ref_rec = censor_lesions(masks, 0.5, mode="size", seed=1)
    assert np.array_equal(out[0], ref[0]) and [r["voxels"] for r in rec] == [1, 2]
    assert all(r["change"] == "removed" for r in rec)
    out, rec = apply_noise(masks, NoiseSpec("dilate", level="mild"), seed=1)
    ref, _ = corrupt_boundaries(masks, "dilate", params={"k": 1}, seed=1)
    assert np.array_equal(out[0], ref[0]) and len(rec) == 4 and rec[0]["change"] == "dilate"
    assert NoiseSpec("random", rate=0.5).label_set_name(0) == "censor-random-0.50-s0"
    assert (
        NoiseSpec("polygon", rate=1.0, level="severe").label_set_name(2) == "polygon-severe-1.00-s2"
    )
    with pytest.raises(NoisysegInputError, match="noise mode"):
        apply_noise(masks, {"mode": "blur"})
    with pytest.raises(NoisysegInputError, match="level"):
        apply_noise(masks, {"mode": "jitter", "level": "extreme"})


def test_boundary_modes_3d_with_anisotropic_spacing() -> None:
    zz, yy, xx = np.indices((12, 24, 24))
    mask = ((zz - 6) ** 2 + ((yy - 8) / 2) ** 2 + ((xx - 8) / 2) ** 2 <= 9).astype(np.uint8)
    mask[2:4, 18:21, 18:21] = 1  # second lesion, 18 voxels
    for mode in BOUNDARY_MODES:
        a, ca = corrupt_boundaries([mask], mode, level="mild", seed=5, spacings=(2.5, 0.8, 0.8))
        b, cb = corrupt_boundaries([mask], mode, level="mild", seed=5, spacings=(2.5, 0.8, 0.8))
        assert np.array_equal(a[0], b[0]) and ca == cb, mode
        assert len(ca) == 2 and a[0].dtype == mask.dtype, mode
        assert all(c.voxels_after > 0 for c in ca), mode  # boundary noise never erases a lesion
        # mild noise keeps the big lesion recognisable
        big = max(ca, key=lambda c: c.voxels)
        assert big.dice > 0.5, (mode, big.dice)
