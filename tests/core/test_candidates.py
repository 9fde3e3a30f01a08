"""Candidate extraction, the "suspected missed" rule, ranking and world coordinates
(noisyseg.candidates), on hand-made masks with hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nibabel.affines import apply_affine

from noisyseg.candidates import (
    add_candidates,
    extract_candidates,
    found_ranks,
    found_within,
    hidden_lesions,
    parse_candidate_id,
    rank_candidates,
    suspected_missed,
    voxel_to_world,
)


def _by_id(candidates):
    return {c.candidate_id: c for c in candidates}


def test_touching_or_overlapping_candidates_are_not_suspected() -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:4, 2:4, 2:4] = 1  # one labelled lesion
    probability = np.zeros(labels.shape, np.float32)
    probability[1:3, 1:3, 1:3] = 0.9  # overlaps the label (shares voxel (2, 2, 2))
    probability[2:4, 2:4, 5:7] = 0.8  # one empty voxel (x = 4) between it and the label
    probability[6, 6, 6] = 0.7  # far from everything
    probability[10, 10, 10] = 0.6
    probability[4, 1, 1] = 0.95  # touches only at a corner: 26-neighbour of labelled (3, 2, 2)
    candidates = extract_candidates(probability, labels, case_id="c", threshold=0.5)
    assert len(candidates) == 5
    overlapping = next(c for c in candidates if c.max_probability == pytest.approx(0.9))
    corner = next(c for c in candidates if c.max_probability == pytest.approx(0.95))
    gap = next(c for c in candidates if c.max_probability == pytest.approx(0.8))
    assert overlapping.touches_label and not overlapping.suspected_missed
    assert overlapping.distance_mm == 0.0
    assert corner.touches_label and not corner.suspected_missed
    assert corner.distance_mm == pytest.approx(math.sqrt(3.0))
    assert not gap.touches_label and gap.suspected_missed
    assert gap.distance_mm == pytest.approx(2.0)  # x = 5 to x = 3
    suspected = suspected_missed(candidates)
    assert sorted(c.max_probability for c in suspected) == pytest.approx([0.6, 0.7, 0.8])


def test_edge_adjacent_candidate_touches_under_4_and_8_connectivity() -> None:
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 1
    probability = np.zeros((6, 6), np.float32)
    probability[1:3, 3] = 0.9  # shares an edge with the label, no voxel in common
    probability[5, 5] = 0.9
    for connectivity in (4, 8):
        candidates = extract_candidates(probability, labels, case_id="c", connectivity=connectivity)
        edge = next(c for c in candidates if c.bbox == ((1, 3), (3, 4)))
        assert edge.touches_label, connectivity
        assert [c.bbox for c in suspected_missed(candidates)] == [((5, 6), (5, 6))]


def test_candidate_statistics_by_hand() -> None:
    probability = np.zeros((5, 6, 7), np.float32)
    probability[1, 2, 3] = 0.6
    probability[1, 2, 4] = 0.9
    probability[2, 2, 4] = 0.75
    labels = np.zeros(probability.shape, np.uint8)
    spacing = (3.0, 1.0, 0.5)
    (candidate,) = extract_candidates(
        probability, labels, case_id="case-7", threshold=0.5, spacing=spacing
    )
    assert candidate.candidate_id == "case-7:1"
    assert candidate.voxels == 3
    assert candidate.volume_mm3 == pytest.approx(3 * 1.5)
    assert candidate.max_probability == pytest.approx(0.9)
    assert candidate.score == candidate.max_probability
    assert candidate.mean_probability == pytest.approx((0.6 + 0.9 + 0.75) / 3)
    np.testing.assert_allclose(candidate.centroid_voxel, [4 / 3, 2.0, 11 / 3])
    assert candidate.bbox == ((1, 3), (2, 3), (3, 5))
    assert candidate.distance_mm == math.inf  # nothing labelled in the case
    full = candidate.full_mask(probability.shape)
    np.testing.assert_array_equal(full, probability >= 0.5)
    # the default affine is diag(spacing in x, y, z order)
    np.testing.assert_allclose(candidate.centroid_world, [11 / 3 * 0.5, 2.0, 4 / 3 * 3.0])
    row = candidate.record()
    assert row["candidate_id"] == "case-7:1" and row["world_z_mm"] == pytest.approx(4.0)


def test_threshold_is_inclusive_and_ids_follow_raster_order() -> None:
    probability = np.zeros((8, 8), np.float32)
    probability[6, 1] = 0.5  # later in raster order
    probability[1, 6] = 0.5
    probability[4, 4] = 0.49
    candidates = extract_candidates(probability, np.zeros((8, 8)), case_id="k", threshold=0.5)
    assert [(c.number, c.bbox) for c in candidates] == [
        (1, ((1, 2), (6, 7))),
        (2, ((6, 7), (1, 2))),
    ]


def test_ranking_ties_broken_by_volume_then_distance_then_case_and_number() -> None:
    labels = np.zeros((3, 40), np.uint8)
    labels[1, 0] = 1
    probability = np.zeros((3, 40), np.float32)
    probability[1, 10:12] = 1.0  # "a:1" p 1.0, 2 voxels, 10 from the label
    probability[1, 14:17] = 1.0  # "a:2" p 1.0, 3 voxels (larger: first)
    probability[1, 30:32] = 1.0  # "a:3" p 1.0, 2 voxels, 30 from the label (farther: before a:1)
    probability[1, 35] = 0.99  # "a:4" lower score: after every p = 1.0 candidate
    case_a = extract_candidates(probability, labels, case_id="a")
    # case "b": same voxels, no label at all (distance inf: first among its ties)
    case_b = extract_candidates(probability, np.zeros_like(labels), case_id="b")
    # case "c" equals "b" exactly: only the case id breaks the tie with "b"
    case_c = extract_candidates(probability, np.zeros_like(labels), case_id="c")
    ranked = [c.candidate_id for c in rank_candidates(case_c + case_a + case_b)]
    assert ranked == [
        "b:2",  # 3 voxels, inf
        "c:2",
        "a:2",  # 3 voxels, 14 mm
        "b:1",  # 2 voxels, inf (tie with b:3, c:1, c:3: case, then number)
        "b:3",
        "c:1",
        "c:3",
        "a:3",  # 2 voxels, 30 mm
        "a:1",  # 2 voxels, 10 mm
        "b:4",  # p 0.99, 1 voxel, inf
        "c:4",
        "a:4",  # p 0.99, 1 voxel, 35 mm
    ]


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_world_coordinates_follow_an_oblique_anisotropic_affine(spatial_dims: int) -> None:
    # rotation about three axes, anisotropic voxels (0.7, 1.3, 3.5) mm in (x, y, z), translation
    a, b, c = np.deg2rad([20.0, -35.0, 50.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag([0.7, 1.3, 3.5])
    affine[:3, 3] = [-91.0, 12.5, 40.25]
    shape = (9, 10, 11) if spatial_dims == 3 else (10, 11)
    probability = np.zeros(shape, np.float32)
    blob = (slice(2, 5), slice(6, 8), slice(1, 4))[-spatial_dims:]
    probability[blob] = 0.8
    probability[(7, 2, 9)[-spatial_dims:]] = 0.8  # a second, single-voxel candidate
    spacing = (3.5, 1.3, 0.7)[-spatial_dims:]
    candidates = extract_candidates(
        probability, np.zeros(shape), case_id="c", spacing=spacing, affine=affine
    )
    assert len(candidates) == 2
    for candidate in candidates:
        voxels = np.argwhere(candidate.full_mask(shape)).astype(float)  # (N, D) in z, y, x order
        centre_zyx = voxels.mean(axis=0)
        ijk = centre_zyx[::-1]  # NIfTI voxel axes are (x, y, z)
        if spatial_dims == 2:
            ijk = np.append(ijk, 0.0)
        expected = apply_affine(affine, ijk)
        np.testing.assert_allclose(candidate.centroid_voxel, centre_zyx, atol=1e-12)
        np.testing.assert_allclose(candidate.centroid_world, expected, atol=1e-9)
    points = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(
        voxel_to_world(affine, points), apply_affine(affine, points[:, ::-1]), atol=1e-12
    )


def test_distance_uses_the_voxel_spacing() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0, 0, 0] = 1
    probability = np.zeros(labels.shape, np.float32)
    probability[3, 4, 0] = 0.9  # 3 voxels along z, 4 along y
    (candidate,) = extract_candidates(probability, labels, case_id="c", spacing=(2.0, 0.5, 1.0))
    assert candidate.distance_mm == pytest.approx(math.hypot(3 * 2.0, 4 * 0.5))


def test_add_candidates_keeps_old_labels_and_adds_exactly_the_candidate_voxels() -> None:
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    probability = np.zeros(labels.shape, np.float32)
    probability[4:6, 4:6, 3] = 0.9
    probability[3, 0, 5] = 0.9
    candidates = suspected_missed(extract_candidates(probability, labels, case_id="c"))
    assert len(candidates) == 2
    before = labels.copy()
    merged = add_candidates(labels, candidates[:1])
    np.testing.assert_array_equal(labels, before)  # the input is not modified
    expected = before.copy()
    expected[candidates[0].full_mask(labels.shape)] = 1
    np.testing.assert_array_equal(merged, expected)
    assert merged.dtype == np.uint8 and int(merged.sum()) == 8 + candidates[0].voxels


def test_parse_candidate_id() -> None:
    assert parse_candidate_id("brain-mets-00003:12") == ("brain-mets-00003", 12)
    for bad in ("nocolon", "case:", ":3", "case:0", "case:x", "case:-1"):
        with pytest.raises(ValueError):
            parse_candidate_id(bad)


def test_bad_core_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="differ"):
        extract_candidates(np.zeros((4, 4)), np.zeros((4, 5)), case_id="c")
    with pytest.raises(ValueError, match="threshold"):
        extract_candidates(np.zeros((4, 4)), np.zeros((4, 4)), case_id="c", threshold=0.0)
    with pytest.raises(ValueError, match="spacing"):
        extract_candidates(np.zeros((4, 4)), np.zeros((4, 4)), case_id="c", spacing=(1, 1, 1))


def test_hidden_lesions_and_the_rank_at_which_each_is_found() -> None:
    truth = np.zeros((3, 30), np.uint8)
    truth[1, 1:3] = 1  # lesion 1: kept by the labels
    truth[1, 6:10] = 1  # lesion 2: hidden, 4 voxels
    truth[1, 14:16] = 1  # lesion 3: hidden, 2 voxels
    truth[1, 20] = 1  # lesion 4: hidden, never predicted
    labels = np.zeros_like(truth)
    labels[1, 1:3] = 1
    probability = np.zeros((3, 30), np.float32)
    probability[1, 7:9] = 0.9  # hits lesion 2: IoU 2/4
    probability[1, 12:28] = 0.95  # covers lesion 3 (IoU 2/16 >= 0.1) and lesion 4 (1/16 < 0.1)
    probability[1, 29] = 0.99  # a false positive (x = 28 empty), ranked first
    probability[1, 0] = 0.5  # touches the kept lesion: not suspected
    candidates = suspected_missed(extract_candidates(probability, labels, case_id="c"))
    hidden = hidden_lesions(truth, labels, candidates, case_id="c", spacing=(1.0, 2.0))
    assert [(h.number, h.voxels) for h in hidden] == [(2, 4), (3, 2), (4, 1)]
    assert hidden[0].volume_mm3 == pytest.approx(8.0)
    assert hidden[0].diameter_mm == pytest.approx(math.sqrt(4 * 8.0 / math.pi))
    ranked = [c.candidate_id for c in rank_candidates(candidates)]
    by_prob = {round(c.max_probability, 2): c.candidate_id for c in candidates}
    assert ranked == [by_prob[0.99], by_prob[0.95], by_prob[0.9]]
    assert hidden[0].hit_by == (by_prob[0.9],)
    assert hidden[1].hit_by == (by_prob[0.95],)
    assert hidden[2].hit_by == ()  # IoU 1/16 is below 0.1
    ranks = found_ranks(hidden, ranked)
    np.testing.assert_array_equal(ranks, [3, 2, np.inf])
    assert [found_within(ranks, k) for k in range(5)] == [0, 0, 1, 2, 2]
    # with any overlap counting, the wide candidate also finds lesion 4
    loose = hidden_lesions(truth, labels, candidates, case_id="c", min_iou=0.0)
    np.testing.assert_array_equal(found_ranks(loose, ranked), [3, 2, 2])


def test_a_fragment_inside_a_large_hidden_lesion_finds_it_unless_iou_alone() -> None:
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[1:11, 1:11, 1:11] = 1  # 1000 voxels, hidden (the labels are empty)
    probability = np.zeros(truth.shape, np.float32)
    probability[5:7, 5:7, 5] = 0.9  # 4 voxels, all inside: IoU 0.004, inside share 1
    probability[1, 1, 0:2] = 0.8  # 2 voxels, 1 inside (x = 1): share 1/2 -> hit
    candidates = extract_candidates(probability, np.zeros_like(truth), case_id="c")
    assert sorted(c.voxels for c in candidates) == [2, 4]
    (lesion,) = hidden_lesions(truth, np.zeros_like(truth), candidates, case_id="c")
    assert sorted(lesion.hit_by) == sorted(c.candidate_id for c in candidates)
    (strict,) = hidden_lesions(
        truth, np.zeros_like(truth), candidates, case_id="c", min_inside=None
    )
    assert strict.hit_by == ()
    (half,) = hidden_lesions(truth, np.zeros_like(truth), candidates, case_id="c", min_inside=0.6)
    assert half.hit_by == tuple(c.candidate_id for c in candidates if c.voxels == 4)
