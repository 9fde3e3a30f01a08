"""The lesion module: components, records (hand-worked), table rows, checks, censor selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import (
    LesionRecord,
    censor_positions,
    check_binary_mask,
    check_spacing,
    count_to_select,
    equivalent_diameter_mm,
    label_lesions,
    lesion_records,
    lesion_table_rows,
    resolve_connectivity,
    resolve_spacings,
)


def two_lesions_2d() -> np.ndarray:
    """A: rows 1-2, cols 1-3 (6 px); B: the single pixel (4, 5). B touches nothing."""
    mask = np.zeros((6, 7), np.uint8)
    mask[1:3, 1:4] = 1
    mask[4, 5] = 1
    return mask


def test_components_follow_the_connectivity() -> None:
    diagonal = np.eye(3, dtype=bool)  # three pixels touching at corners only
    assert label_lesions(diagonal)[1] == 1  # 8-connectivity by default in 2D
    assert label_lesions(diagonal, 4)[1] == 3
    cube = np.zeros((3, 3, 3), bool)
    cube[0, 0, 0] = cube[1, 1, 1] = True  # corner neighbours
    assert label_lesions(cube)[1] == 1  # 26 by default in 3D
    assert label_lesions(cube, 18)[1] == 2
    edge = np.zeros((3, 3, 3), bool)
    edge[0, 0, 1] = edge[0, 1, 0] = True  # edge neighbours in one plane
    assert label_lesions(edge, 18)[1] == 1 and label_lesions(edge, 6)[1] == 2


def test_labels_are_in_raster_order_of_the_first_voxel() -> None:
    labels, n = label_lesions(two_lesions_2d())
    assert n == 2 and labels[1, 1] == 1 and labels[4, 5] == 2 and labels[0, 0] == 0


def test_records_by_hand_2d_with_spacing() -> None:
    labels, n = label_lesions(two_lesions_2d())
    a, b = lesion_records(labels, n, case=3, spacing=(0.5, 2.0))
    # A: 6 px of 0.5 x 2.0 = 1 mm^2 each; centroid rows (1+2)/2, cols (1+2+3)/3
    assert (a.case, a.label, a.voxels) == (3, 1, 6)
    assert a.volume_mm3 == pytest.approx(6.0)
    assert a.centroid == pytest.approx((1.5, 2.0))
    assert a.bbox == ((1, 3), (1, 4))
    assert a.equivalent_diameter_mm == pytest.approx(math.sqrt(4 * 6.0 / math.pi))
    assert (b.label, b.voxels, b.bbox, b.centroid) == (2, 1, ((4, 5), (5, 6)), (4.0, 5.0))
    assert b.volume_mm3 == pytest.approx(1.0)


def test_records_by_hand_3d() -> None:
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2:4, 3:5] = True  # a 2x2x2 cube
    (record,) = lesion_records(*label_lesions(mask), spacing=(2.0, 1.0, 1.0))
    assert record.voxels == 8 and record.volume_mm3 == pytest.approx(16.0)
    assert record.centroid == pytest.approx((1.5, 2.5, 3.5))
    assert record.bbox == ((1, 3), (2, 4), (3, 5))
    # sphere of 16 mm^3: d = (6 V / pi)^(1/3)
    assert record.equivalent_diameter_mm == pytest.approx((96 / math.pi) ** (1 / 3))
    assert equivalent_diameter_mm(math.pi / 6 * 8.0, 3) == pytest.approx(2.0)
    assert equivalent_diameter_mm(math.pi, 2) == pytest.approx(2.0)
    assert lesion_records(np.zeros((2, 2), np.int32), 0) == []


def test_table_rows_are_the_store_columns() -> None:
    rows = lesion_table_rows(two_lesions_2d(), (0.5, 2.0), status="removed")
    assert list(rows[0]) == [
        "lesion_id",
        "voxels",
        "volume_mm3",
        "centroid_y",
        "centroid_x",
        "bbox_min_y",
        "bbox_min_x",
        "bbox_max_y",
        "bbox_max_x",
        "status",
    ]
    assert rows[0] == {
        "lesion_id": 1,
        "voxels": 6,
        "volume_mm3": pytest.approx(6.0),
        "centroid_y": pytest.approx(1.5),
        "centroid_x": pytest.approx(2.0),
        "bbox_min_y": 1,
        "bbox_min_x": 1,
        "bbox_max_y": 3,
        "bbox_max_x": 4,
        "status": "removed",
    }
    mask3 = np.zeros((3, 3, 3), bool)
    mask3[1, 1, 1] = True
    (row,) = lesion_table_rows(mask3, (1.0, 1.0, 1.0))
    assert [k for k in row if k.startswith("centroid")] == [
        "centroid_z",
        "centroid_y",
        "centroid_x",
    ]
    assert row["status"] == "present"
    # 4-connectivity splits a diagonal pair in two
    assert len(lesion_table_rows(np.eye(2, dtype=bool), (1.0, 1.0), connectivity=4)) == 2


def test_record_as_dict_is_json_friendly() -> None:
    record = LesionRecord(0, 1, 2, 2.0, (0.5, 1.0), ((0, 1), (1, 2)), 1.6)
    assert record.as_dict() == {
        "case": 0,
        "label": 1,
        "voxels": 2,
        "volume_mm3": 2.0,
        "centroid": [0.5, 1.0],
        "bbox": [[0, 1], [1, 2]],
        "equivalent_diameter_mm": 1.6,
    }


def test_checks_name_the_case_and_rule() -> None:
    with pytest.raises(NoisysegInputError, match=r"case 4: mask is not binary: .*found 2"):
        check_binary_mask(np.array([[0, 2]]), 4)
    with pytest.raises(NoisysegInputError, match="case 1: truth has NaN"):
        check_binary_mask(np.array([[0.0, np.nan]]), 1, what="truth")
    with pytest.raises(NoisysegInputError, match="2D or 3D"):
        check_binary_mask(np.zeros(3), 0)
    assert check_binary_mask(np.array([[0.0, 1.0]]), 0).dtype == np.float64
    with pytest.raises(NoisysegInputError, match="connectivity 6 is not valid in 2D"):
        resolve_connectivity(2, 6)
    assert resolve_connectivity(3, None) == 26 and resolve_connectivity(2, None) == 8
    with pytest.raises(NoisysegInputError, match="case 2: spacing .* 2 axes but the array is 3D"):
        check_spacing((1.0, 1.0), 3, case=2)
    with pytest.raises(NoisysegInputError, match="finite and > 0"):
        check_spacing((1.0, 0.0), 2)
    assert resolve_spacings((0.5, 2.0), [(2, 2), (3, 3)]) == [(0.5, 2.0), (0.5, 2.0)]
    assert resolve_spacings(None, [(2, 2, 2)]) == [(1.0, 1.0, 1.0)]
    with pytest.raises(NoisysegInputError, match="got 1 spacings for 2 cases"):
        resolve_spacings([(1.0, 1.0)], [(2, 2), (2, 2)])


def test_censor_positions_size_mode_by_hand() -> None:
    volumes = np.array([5.0, 1.0, 3.0, 1.0, 2.0])
    rng = np.random.default_rng(0)
    # rate 0.4 of 5 -> 2 lesions: the two of volume 1 (positions 1 and 3), whatever the tie-break
    assert censor_positions(volumes, 0.4, "size", rng).tolist() == [1, 3]
    # rate 0.6 -> 3: then the volume-2 lesion
    assert censor_positions(volumes, 0.6, "size", rng).tolist() == [1, 3, 4]
    assert censor_positions(volumes, 0.0, "size", rng).tolist() == []
    assert censor_positions(volumes, 1.0, "random", rng).tolist() == [0, 1, 2, 3, 4]


def test_censor_positions_ties_and_random_follow_the_seed() -> None:
    equal = np.ones(40)
    picks = {
        tuple(censor_positions(equal, 0.25, "size", np.random.default_rng(s))) for s in range(5)
    }
    assert len(picks) > 1 and all(len(p) == 10 for p in picks)
    # the documented draw: rng.choice(K, n, replace=False), sorted (reproduces stored label sets)
    got = censor_positions(np.arange(7.0), 0.5, "random", np.random.default_rng(11))
    want = np.sort(np.random.default_rng(11).choice(7, size=count_to_select(0.5, 7), replace=False))
    assert got.tolist() == want.tolist() and len(got) == 4
    with pytest.raises(ValueError, match="censoring mode"):
        censor_positions(equal, 0.5, "largest", np.random.default_rng(0))


def test_components_of_masks_with_a_size_one_axis() -> None:
    """cc3d mislabels boolean input with a size-1 axis; the count must match scipy's."""
    rng = np.random.default_rng(3)
    for shape in [(1, 30), (30, 1), (1, 1, 30), (1, 30, 1)]:
        for _ in range(10):
            mask = rng.random(shape) > 0.5
            labels, n = label_lesions(mask)
            structure = np.ones((3,) * mask.ndim)
            expected, n_expected = ndi.label(mask, structure=structure)
            assert n == n_expected, shape
            assert np.array_equal(labels > 0, mask), shape
            # same partition: each reference component maps to exactly one label
            for k in range(1, n_expected + 1):
                assert len(np.unique(labels[expected == k])) == 1
