"""Lesion metrics on hand-built cases whose expected numbers are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noisyseg.errors import NoisysegInputError
from noisyseg.metrics import FROC_FP_RATES, case_candidates, lesion_metrics

#: The seven CPM rates, passed explicitly where a test reads FROC below 1 FP/case.
CPM_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def place(shape: tuple[int, ...], boxes: list[tuple[tuple[slice, ...], float]]) -> np.ndarray:
    """Array of zeros with each box set to its value."""
    out = np.zeros(shape)
    for box, value in boxes:
        out[box] = value
    return out


def hit_miss_fp_case() -> tuple[np.ndarray, np.ndarray]:
    """Truth: A = 3x3 at rows 1-3, cols 1-3 (9 px); B = 2x2 at rows 10-11, cols 10-11 (4 px).
    Prediction: 0.9 on rows 2-3, cols 3-5 (6 px, 2 of them inside A: (2,3), (3,3));
    0.7 on rows 8-9, cols 1-2 (4 px, touches nothing) -> one hit, one miss, one FP."""
    truth = place((14, 14), [((slice(1, 4), slice(1, 4)), 1), ((slice(10, 12), slice(10, 12)), 1)])
    prob = place((14, 14), [((slice(2, 4), slice(3, 6)), 0.9), ((slice(8, 10), slice(1, 3)), 0.7)])
    prob[0, 13] = 0.3  # below threshold: no candidate
    return prob, truth.astype(np.uint8)


def test_one_hit_one_miss_one_false_positive() -> None:
    prob, truth = hit_miss_fp_case()
    m = lesion_metrics([prob], [truth], froc_fp_rates=CPM_RATES)
    # IoU of the 0.9 candidate with A: 2 / (6 + 9 - 2) = 2/13 >= 0.1, a hit
    assert (m["n_lesions"], m["n_cases"], m["tp"], m["fp"], m["detected"]) == (2, 1, 1, 1, 1)
    assert m["sensitivity"] == 0.5 and m["precision"] == 0.5 and m["fp_per_case"] == 1.0
    assert m["max_sensitivity"] == 0.5
    # points: s=0.9 -> P=1, R=1/2; s=0.7 -> P=1/2, R=1/2.  AP = (1/2 - 0)*1 + 0*(1/2) = 1/2
    assert m["ap"] == pytest.approx(0.5)
    assert m["sensitivity_at_80_precision"] == 0.5
    # the s=0.9 point has 0 FP/case and recall 1/2, so every FROC point reads 1/2
    assert m["froc"] == [(f, 0.5) for f in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
    # voxels: |T| = 9 + 4 = 13, |P| = 6 + 4 = 10, |P∩T| = 2
    # Dice = 2*2/(13+10) = 4/23; Jaccard = 2/(13+10-2) = 2/21
    assert m["dice"] == pytest.approx(4 / 23)
    assert m["jaccard"] == pytest.approx(2 / 21)
    np.testing.assert_allclose(m["pr_curve"]["precision"], [1.0, 0.5])
    np.testing.assert_allclose(m["pr_curve"]["recall"], [0.5, 0.5])
    np.testing.assert_allclose(m["pr_curve"]["thresholds"], [0.9, 0.7])


def test_two_touching_truth_lesions_2d() -> None:
    # two 2x2 squares touching only at the corner (2,2)-(3,3); the prediction covers the first.
    truth = place(
        (7, 7), [((slice(1, 3), slice(1, 3)), 1), ((slice(3, 5), slice(3, 5)), 1)]
    ).astype(np.uint8)
    prob = place((7, 7), [((slice(1, 3), slice(1, 3)), 0.8)])
    m8 = lesion_metrics([prob], [truth], connectivity=8)  # one lesion, detected
    assert (m8["n_lesions"], m8["sensitivity"], m8["precision"]) == (1, 1.0, 1.0)
    m4 = lesion_metrics([prob], [truth], connectivity=4)  # two lesions, one detected
    assert (m4["n_lesions"], m4["sensitivity"], m4["precision"]) == (2, 0.5, 1.0)
    # Dice is connectivity-free: |T| = 8, |P| = 4, overlap 4 -> 8/12
    assert m8["dice"] == m4["dice"] == pytest.approx(8 / 12)


def test_two_touching_truth_lesions_3d() -> None:
    # two 2x2x2 cubes sharing only an edge (along axis 0): one lesion with 18/26, two with 6.
    truth = place(
        (4, 6, 6),
        [
            ((slice(1, 3), slice(1, 3), slice(1, 3)), 1),
            ((slice(1, 3), slice(3, 5), slice(3, 5)), 1),
        ],
    )
    prob = place((4, 6, 6), [((slice(1, 3), slice(3, 5), slice(3, 5)), 0.6)])
    assert lesion_metrics([prob], [truth])["sensitivity"] == 1.0  # default 26
    assert lesion_metrics([prob], [truth], connectivity=18)["n_lesions"] == 1
    m6 = lesion_metrics([prob], [truth], connectivity=6)
    assert (m6["n_lesions"], m6["sensitivity"]) == (2, 0.5)


def test_empty_truth() -> None:
    truth = np.zeros((8, 8), np.uint8)
    prob = place((8, 8), [((slice(2, 4), slice(2, 4)), 0.8)])
    m = lesion_metrics([prob], [truth])
    assert m["n_lesions"] == 0 and m["fp"] == 1 and m["fp_per_case"] == 1.0
    assert m["precision"] == 0.0
    for key in ("sensitivity", "max_sensitivity", "ap", "sensitivity_at_80_precision", "froc_mean"):
        assert math.isnan(m[key]), key
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    # empty truth and empty prediction: overlap 1.0 by definition, precision undefined
    e = lesion_metrics([np.zeros((8, 8))], [truth])
    assert e["dice"] == 1.0 and e["jaccard"] == 1.0 and e["fp_per_case"] == 0.0
    assert math.isnan(e["precision"])
    # mixed with the hit/miss/FP case: per-case mean Dice (4/23 + 1)/2, FP/case 1/2
    p1, t1 = hit_miss_fp_case()
    both = lesion_metrics([p1, np.zeros((8, 8))], [t1, truth])
    assert both["dice"] == pytest.approx((4 / 23 + 1.0) / 2)
    assert both["jaccard"] == pytest.approx((2 / 21 + 1.0) / 2)
    assert both["fp_per_case"] == 0.5 and both["sensitivity"] == 0.5 and both["n_cases"] == 2


def test_empty_prediction() -> None:
    prob, truth = hit_miss_fp_case()
    low = np.full(prob.shape, 0.2)
    m = lesion_metrics([low], [truth])
    assert (m["n_lesions"], m["tp"], m["fp"], m["n_candidates"]) == (2, 0, 0, 0)
    assert m["sensitivity"] == 0.0 and m["max_sensitivity"] == 0.0
    assert m["ap"] == 0.0 and m["sensitivity_at_80_precision"] == 0.0
    assert math.isnan(m["precision"]) and m["fp_per_case"] == 0.0
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert all(s == 0.0 for _, s in m["froc"])


def ranking_cases(scores_hits: list[tuple[float, bool]], n_missed: int, n_cases: int = 2):
    """Separate 1x1 candidates with the given scores, spread over ``n_cases`` cases; each TP sits
    on its own 1x1 truth lesion, FPs on background; ``n_missed`` extra truth lesions nobody hits."""
    probs = [np.zeros((5, 40)) for _ in range(n_cases)]
    truths = [np.zeros((5, 40), np.uint8) for _ in range(n_cases)]
    for i, (score, hit) in enumerate(scores_hits):
        case, col = i % n_cases, 2 * (i // n_cases) + 1
        probs[case][1, col] = score
        truths[case][1, col] = int(hit)
    for j in range(n_missed):
        truths[j % n_cases][3, 2 * j + 1] = 1
    return probs, truths


def test_ap_and_sensitivity_at_80_precision_hand_ranking() -> None:
    # ranking TP .9, FP .8, TP .7, TP .6, FP .55 and one truth lesion never hit: 4 lesions.
    probs, truths = ranking_cases(
        [(0.9, True), (0.8, False), (0.7, True), (0.6, True), (0.55, False)], 1
    )
    m = lesion_metrics(probs, truths, froc_fp_rates=CPM_RATES)
    # k: accepted  TP  P      R     FP/case (2 cases)
    # 1  .9        1   1      1/4   0
    # 2  .8        1   1/2    1/4   1/2
    # 3  .7        2   2/3    2/4   1/2
    # 4  .6        3   3/4    3/4   1/2
    # 5  .55       3   3/5    3/4   1
    # AP = 1/4*1 + 0*1/2 + 1/4*2/3 + 1/4*3/4 + 0*3/5 = 0.25 + 0.1666.. + 0.1875 = 0.6041666..
    assert m["ap"] == pytest.approx(0.25 + 1 / 6 + 0.1875)
    # only k=1 reaches precision >= 0.8 -> recall 1/4
    assert m["sensitivity_at_80_precision"] == pytest.approx(0.25)
    assert m["max_sensitivity"] == pytest.approx(0.75) and m["sensitivity"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(3 / 5) and m["fp_per_case"] == pytest.approx(1.0)
    # FROC: best recall with FP/case <= f: f < 1/2 -> k=1 (1/4); f >= 1/2 -> k=4 (3/4)
    assert [s for _, s in m["froc"]] == pytest.approx([0.25, 0.25, 0.75, 0.75, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(m["pr_curve"]["recall"], [0.25, 0.25, 0.5, 0.75, 0.75])
    np.testing.assert_allclose(m["pr_curve"]["fp_per_case"], [0, 0.5, 0.5, 0.5, 1.0])


def test_candidate_threshold_extends_the_curve() -> None:
    # TP .9, FP .8, TP .7, TP .6, TP .5, TP .4; 5 truth lesions, all hit by some candidate.
    probs, truths = ranking_cases(
        [(0.9, True), (0.8, False), (0.7, True), (0.6, True), (0.5, True), (0.4, True)], 0
    )
    m = lesion_metrics(probs, truths, threshold=0.5, candidate_threshold=0.3)
    # curve: P = 1, 1/2, 2/3, 3/4, 4/5, 5/6 ; R = .2, .2, .4, .6, .8, 1.0
    # AP = 0.2*(1 + 2/3 + 3/4 + 4/5 + 5/6) = 0.2*4.05 = 0.81
    assert m["ap"] == pytest.approx(0.81)
    # precision >= 0.8 at k=1 (R .2), k=5 (P exactly 4/5, R .8), k=6 (R 1) -> 1.0
    assert m["sensitivity_at_80_precision"] == pytest.approx(1.0)
    assert m["max_sensitivity"] == pytest.approx(1.0)
    # at t = 0.5 the .4 candidate is out (p = 0.5 itself is in): 4 of 5 detected, 1 FP of 5
    assert m["sensitivity"] == pytest.approx(0.8) and m["precision"] == pytest.approx(0.8)
    assert m["n_candidates"] == 6 and m["tp"] + m["fp"] == 5
    # without the lower candidate threshold the curve stops at t: max sensitivity 0.8
    assert lesion_metrics(probs, truths)["max_sensitivity"] == pytest.approx(0.8)


def test_precision_of_exactly_80_percent_counts() -> None:
    # TP .9, FP .8, TP .7, TP .6, TP .55, FP .52 and one missed lesion: 5 lesions.
    probs, truths = ranking_cases(
        [(0.9, True), (0.8, False), (0.7, True), (0.6, True), (0.55, True), (0.52, False)], 1
    )
    m = lesion_metrics(probs, truths)
    # P = 1, 1/2, 2/3, 3/4, 4/5, 4/6 ; R = .2, .2, .4, .6, .8, .8
    # precision >= 0.8 at k=1 (R .2) and k=5 (P = 4/5 exactly, R .8) -> 0.8
    assert m["sensitivity_at_80_precision"] == pytest.approx(0.8)
    # AP = 0.2*(1 + 2/3 + 3/4 + 4/5) = 0.2*3.21666.. = 0.64333..
    assert m["ap"] == pytest.approx(0.2 * (1 + 2 / 3 + 3 / 4 + 4 / 5))


def test_tied_scores_enter_together() -> None:
    probs, truths = ranking_cases([(0.9, True), (0.9, False)], 0, n_cases=1)
    m = lesion_metrics(probs, truths)
    # one operating point: P = 1/2, R = 1 -> AP 1/2, no point with precision >= 0.8
    assert m["ap"] == pytest.approx(0.5) and m["sensitivity_at_80_precision"] == 0.0


def test_fragments_and_min_iou() -> None:
    truth = place((6, 12), [((slice(1, 3), slice(1, 9)), 1)]).astype(np.uint8)  # 16 px
    # two fragments on the same lesion: detected once (one TP), neither is a FP
    prob = place((6, 12), [((slice(1, 3), slice(1, 3)), 0.9), ((slice(1, 3), slice(6, 9)), 0.7)])
    m = lesion_metrics([prob], [truth])
    # (the old any-overlap rule counted each fragment as a TP: tp was 2)
    assert (m["sensitivity"], m["tp"], m["fp"], m["precision"]) == (1.0, 1, 0, 1.0)
    assert lesion_metrics([prob], [truth], min_iou=0.0)["tp"] == 1
    # IoU of the 4-px fragment = 4/16 = 0.25, of the 6-px one 6/16 = 0.375
    m = lesion_metrics([prob], [truth], min_iou=0.3)
    # only the 6-px fragment hits; the 4-px one lies on the detected lesion: neither TP nor FP
    # (the old rule made it a FP: fp was 1)
    assert (m["sensitivity"], m["tp"], m["fp"]) == (1.0, 1, 0)
    m = lesion_metrics([prob], [truth], min_iou=0.5)
    assert (m["sensitivity"], m["tp"], m["fp"]) == (0.0, 0, 2)


def test_sensitivity_by_size_with_spacing() -> None:
    # lesions of 1, 10 and 100 px; only the 10-px one is detected
    truth = np.zeros((30, 30), np.uint8)
    truth[1, 1] = 1
    truth[5, 1:11] = 1
    truth[10:20, 10:20] = 1
    prob = np.zeros((30, 30))
    prob[5, 3] = 0.9
    bins = [0, 5, 50, math.inf]
    m = lesion_metrics([prob], [truth], size_bins=bins)
    assert [(b["count"], b["detected"]) for b in m["sensitivity_by_size"]] == [
        (1, 0),
        (1, 1),
        (1, 0),
    ]
    assert [b["sensitivity"] for b in m["sensitivity_by_size"]] == [0.0, 1.0, 0.0]
    # 3 x 3 mm pixels: volumes 9, 90, 900 mm^3 -> bins hold 0, 1, 2 lesions
    m = lesion_metrics([prob], [truth], size_bins=bins, spacings=[(3.0, 3.0)])
    rows = m["sensitivity_by_size"]
    assert [(b["count"], b["detected"]) for b in rows] == [(0, 0), (1, 0), (2, 1)]
    assert math.isnan(rows[0]["sensitivity"]) and rows[2]["sensitivity"] == 0.5


def test_case_candidates_helper() -> None:
    prob, truth = hit_miss_fp_case()
    c = case_candidates(prob, truth)
    np.testing.assert_allclose(c.scores, [0.9, 0.7])
    assert c.hits.tolist() == [True, False] and c.sizes.tolist() == [6, 4]
    assert c.covers.tolist() == [0.9, -np.inf]  # the 0.7 candidate overlaps no lesion
    assert c.truth_scores[0] == 0.9 and c.truth_scores[1] == -np.inf
    assert c.truth_voxels.tolist() == [9, 4]


def test_bad_input() -> None:
    prob, truth = hit_miss_fp_case()
    with pytest.raises(NoisysegInputError, match=r"case 1: .*shape"):
        lesion_metrics([prob, prob], [truth, truth[:-1]])
    with pytest.raises(NoisysegInputError, match="2 probability arrays but 1"):
        lesion_metrics([prob, prob], [truth])
    bad = truth.copy()
    bad[0, 0] = 2
    with pytest.raises(NoisysegInputError, match=r"case 0: truth is not binary"):
        lesion_metrics([prob], [bad])
    nan = prob.copy()
    nan[0, 0] = np.nan
    with pytest.raises(NoisysegInputError, match="case 0: .*NaN"):
        lesion_metrics([nan], [truth])
    with pytest.raises(NoisysegInputError, match=r"\[0, 1\]"):
        lesion_metrics([prob * 2], [truth])
    with pytest.raises(NoisysegInputError, match="threshold"):
        lesion_metrics([prob], [truth], threshold=0.0)
    with pytest.raises(NoisysegInputError, match="size_bins"):
        lesion_metrics([prob], [truth], size_bins=[5, 1])


# ------------------------------------------------------------- detection rules that cannot be gamed
def three_lesions_under_a_blob() -> tuple[np.ndarray, np.ndarray]:
    """Three 2x2 lesions (4 px each) at (2,2), (2,10), (10,6); one diffuse p = 0.6 blob over
    rows/cols 1-14 (196 px) covers all three: IoU with each 4/196 ≈ 0.02 < 0.1."""
    truth = place(
        (20, 20),
        [
            ((slice(2, 4), slice(2, 4)), 1),
            ((slice(2, 4), slice(10, 12)), 1),
            ((slice(10, 12), slice(6, 8)), 1),
        ],
    ).astype(np.uint8)
    prob = place((20, 20), [((slice(1, 15), slice(1, 15)), 0.6)])
    return prob, truth


def test_diffuse_blob_touching_three_lesions_detects_none() -> None:
    prob, truth = three_lesions_under_a_blob()
    m = lesion_metrics([prob], [truth], candidate_threshold=0.05)
    assert (m["n_lesions"], m["n_candidates"]) == (3, 1)
    assert (m["tp"], m["fp"], m["sensitivity"], m["precision"]) == (0, 1, 0.0, 0.0)
    assert m["max_sensitivity"] == 0.0 and m["fp_per_case_at_max_sensitivity"] == 1.0
    assert m["froc_mean"] == 0.0 and m["ap"] == 0.0
    # the old any-overlap rule (min_iou = 0) let this blob "find" all three lesions
    gamed = lesion_metrics([prob], [truth], min_iou=0.0)
    assert (gamed["tp"], gamed["fp"], gamed["max_sensitivity"]) == (3, 0, 1.0)


def test_two_fragments_of_one_lesion_one_tp_no_fp_and_fp_can_fall() -> None:
    # lesion: rows 2-5, cols 2-5 (16 px). Fragment A rows 2-3 (8 px, IoU 0.5) at p = 0.6;
    # fragment B the single pixel (5, 5) (IoU 1/16 < 0.1) at p = 0.9.
    truth = place((8, 8), [((slice(2, 6), slice(2, 6)), 1)]).astype(np.uint8)
    prob = place((8, 8), [((slice(2, 4), slice(2, 6)), 0.6), ((slice(5, 6), slice(5, 6)), 0.9)])
    m = lesion_metrics([prob], [truth])
    assert (m["tp"], m["fp"], m["sensitivity"], m["precision"]) == (1, 0, 1.0, 1.0)
    # s = 0.9: B alone detects nothing and lies on no detected lesion -> FP, recall 0;
    # s = 0.6: A detects the lesion, B becomes a fragment of it -> 1 TP, 0 FP.
    np.testing.assert_allclose(m["pr_curve"]["fp"], [1, 0])
    np.testing.assert_allclose(m["pr_curve"]["recall"], [0.0, 1.0])
    np.testing.assert_allclose(m["pr_curve"]["precision"], [0.0, 1.0])
    # AP = (0 - 0)·0 + (1 - 0)·1
    assert m["ap"] == pytest.approx(1.0) and m["fp_per_case_at_max_sensitivity"] == 0.0


def froc_cases():
    """Two cases; candidates by score: TP .95, FP .9, FP .85, TP .8, FP .7, FP .65, TP .6,
    FP .55, .52, .51, .5; plus one lesion nobody hits -> 4 lesions."""
    ranking = [(0.95, True), (0.9, False), (0.85, False), (0.8, True), (0.7, False)]
    ranking += [(0.65, False), (0.6, True), (0.55, False), (0.52, False), (0.51, False)]
    ranking += [(0.5, False)]
    return ranking_cases(ranking, 1)


def test_froc_at_1_2_4_8_fp_per_case_by_hand() -> None:
    probs, truths = froc_cases()
    m = lesion_metrics(probs, truths)
    assert FROC_FP_RATES == (1.0, 2.0, 4.0, 8.0)
    # k:        1    2   3   4   5    6   7   8    9   10   11
    # FP:       0    1   2   2   3    4   4   5    6   7    8
    # FP/case:  0   .5   1   1  1.5   2   2  2.5   3  3.5   4
    # recall:  .25 .25 .25  .5  .5   .5 .75  .75 .75  .75 .75
    np.testing.assert_allclose(
        m["pr_curve"]["fp_per_case"], [0, 0.5, 1, 1, 1.5, 2, 2, 2.5, 3, 3.5, 4]
    )
    # f = 1: best recall among k <= 4 is .5; f = 2: k = 7 reaches .75; f = 4, 8: .75
    assert m["froc"] == [(1.0, 0.5), (2.0, 0.75), (4.0, 0.75), (8.0, 0.75)]
    assert m["froc_mean"] == pytest.approx((0.5 + 0.75 * 3) / 4)
    # max sensitivity .75 with every candidate in: 8 FP over 2 cases, precision 3/11
    assert m["max_sensitivity"] == pytest.approx(0.75)
    assert m["fp_per_case_at_max_sensitivity"] == pytest.approx(4.0)
    assert m["precision_at_max_sensitivity"] == pytest.approx(3 / 11)


def test_every_operating_point_is_named() -> None:
    probs, truths = froc_cases()
    m = lesion_metrics(probs, truths, threshold=0.6, candidate_threshold=0.5)
    points = m["operating_points"]
    assert list(points) == [
        "threshold",
        "max_sensitivity",
        "precision_80",
        "froc_1fp",
        "froc_2fp",
        "froc_4fp",
        "froc_8fp",
    ]
    assert all(
        set(p) == {"rule", "score", "sensitivity", "precision", "fp_per_case"}
        for p in points.values()
    )
    # at t = 0.6: candidates k1..k7 -> 3 TP, 4 FP over 2 cases
    assert points["threshold"]["score"] == 0.6 and "t = 0.6" in points["threshold"]["rule"]
    assert (m["tp"], m["fp"], m["fp_per_case"]) == (3, 4, 2.0)
    assert points["threshold"]["precision"] == pytest.approx(3 / 7)
    assert points["max_sensitivity"]["score"] == 0.5 and "0.5" in points["max_sensitivity"]["rule"]
    assert points["max_sensitivity"]["fp_per_case"] == m["fp_per_case_at_max_sensitivity"] == 4.0
    # FROC at 1 FP/case: k = 4 (score .8), 2 FP over 2 cases, precision 2/4
    assert points["froc_1fp"] == {
        "rule": "largest sensitivity with FP/case <= 1",
        "score": 0.8,
        "sensitivity": 0.5,
        "precision": 0.5,
        "fp_per_case": 1.0,
    }
    assert points["froc_2fp"]["score"] == 0.6 and points["froc_2fp"]["sensitivity"] == 0.75
    # precision >= 0.8 only at k = 1 (score .95, recall .25)
    assert (points["precision_80"]["score"], points["precision_80"]["sensitivity"]) == (0.95, 0.25)
    assert m["sensitivity_at_80_precision"] == 0.25
