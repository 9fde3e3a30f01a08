"""The robustness benchmark: variant planning (unit) and the --quick run end to end (integration)."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from scipy import stats

from noisyseg.benchmarking.report import (
    Interval,
    format_cell,
    operating_point_note,
    summarize,
    t_interval,
)
from noisyseg.benchmarking.robustness import (
    BenchmarkRow,
    RobustnessBenchmark,
    Variant,
    brain_variants,
    censor_name,
    format_table,
    relative_to_baseline,
    settings_for,
    skin_noisy_name,
    skin_variants,
)
from noisyseg.benchmarking.settings import plan_variants, seedless
from noisyseg.cli import main as cli_main
from noisyseg.storage.corrupt import default_name
from noisyseg.storage.phantoms import brain_mets_case


def _row(key: str, max_sensitivity: float, seed: int = 0, dice: float = 0.5) -> BenchmarkRow:
    metrics = {
        k: 0.5
        for k in (
            "sensitivity",
            "sensitivity_at_80_precision",
            "ap",
            "precision",
            "fp_per_case",
            "fp_per_case_at_max_sensitivity",
            "froc_mean",
            "dice",
            "jaccard",
        )
    }
    metrics["max_sensitivity"] = max_sensitivity
    metrics["dice"] = dice
    return BenchmarkRow(
        key=key,
        group="main",
        label_set=key.split("_")[0],
        loss="bce",
        reweight="none",
        clean_fraction=None,
        train_subset="all",
        method="BCE",
        censor_mode=None,
        censor_rate=0.0,
        run_id="r",
        train_seconds=1.0,
        metrics=metrics,
        seed=seed,
        row_key=seedless(key),
    )


def test_label_set_names_match_the_store_defaults() -> None:
    assert censor_name("random", 0.5, 0) == "censor-random-0.50-s0"
    assert censor_name("size", 0.25, 3) == default_name("size", rate=0.25, seed=3)
    settings = settings_for("skin", "quick")
    assert skin_noisy_name(settings) == default_name("polygon", level="severe", seed=0)


def test_quick_brain_plan_is_the_demo_comparison() -> None:
    keys = [v.key for v in brain_variants(settings_for("brain-mets", "quick"))]
    # BCE, lopsided and meta side by side on the censored labels (issue 12: make demo shows all)
    assert keys == [
        "truth_bce",
        "truth_lopsided",
        "censor-random-0.50-s0_bce",
        "censor-random-0.50-s0_lopsided",
        "censor-random-0.50-s0_bce_meta0.4",
    ]


def test_default_brain_plan_covers_both_censorings_meta_and_the_rate_sweep() -> None:
    variants = brain_variants(settings_for("brain-mets", "default"))
    keys = [v.key for v in variants]
    assert len(keys) == len(set(keys)), "a model would be trained twice"
    for mode in ("random", "size"):
        for method in ("bce", "lopsided"):
            assert f"censor-{mode}-0.50-s0_{method}" in keys
        assert f"censor-{mode}-0.50-s0_bce_meta0.05" in keys
    assert "truth_bce_meta0.05" not in keys  # reweighting clean labels shows nothing
    sweep = {(v.label_set, v.loss) for v in variants if v.group == "rate-sweep"}
    # rates 0 and 0.5 are already in the main grid; 0.25 and 0.75 are added for both losses
    assert sweep == {
        (f"censor-random-{r}-s0", loss) for r in ("0.25", "0.75") for loss in ("bce", "lopsided")
    }


def test_skin_plan_has_the_papers_baselines_and_every_clean_size() -> None:
    settings = settings_for("skin", "default")
    variants = skin_variants(settings)
    noisy = skin_noisy_name(settings)
    methods = {(v.label_set, v.reweight, v.train_subset, v.clean_fraction) for v in variants}
    assert (noisy, "none", "all", None) in methods  # noisy-only BCE
    assert ("truth", "none", "clean", 0.05) in methods  # clean-only BCE
    assert any(v.label_set.endswith("-clean-truth") for v in variants)  # clean + noisy BCE
    sizes = sorted(v.clean_fraction for v in variants if v.reweight == "meta" and v.loss == "bce")
    assert sizes == [0.02, 0.05, 0.1, 0.2]
    # issue 12: the skin table adds lopsided and lopsided + meta (at the reference clean size)
    assert (noisy, "lopsided", "none", None) in {
        (v.label_set, v.loss, v.reweight, v.clean_fraction) for v in variants
    }
    assert (noisy, "lopsided", "meta", 0.05) in {
        (v.label_set, v.loss, v.reweight, v.clean_fraction) for v in variants
    }


def test_relative_max_sensitivity_against_the_baseline() -> None:
    rows = [_row("truth_bce", 0.8), _row("censored_bce", 0.2), _row("censored_lopsided", 0.76)]
    relative_to_baseline(rows, "truth_bce")
    assert [r.relative_max_sensitivity for r in rows] == pytest.approx([1.0, 0.25, 0.95])
    table = format_table(rows)
    assert "| 95% |" in table and "| 25% |" in table
    zero = [_row("truth_bce", 0.0), _row("x", 0.3)]
    relative_to_baseline(zero, "truth_bce")
    assert math.isnan(zero[1].relative_max_sensitivity)


def test_variant_names() -> None:
    assert Variant("truth", "bce", "meta", clean_fraction=0.05).method == (
        "meta reweighting (5% clean)"
    )
    assert Variant("truth", "bce", clean_fraction=0.05, train_subset="clean").key == (
        "truth_bce_clean-only"
    )


def test_t_interval_against_hand_worked_numbers() -> None:
    # x = 0.5, 0.6, 0.7: mean 0.6, s = 0.1 (ddof 1), t(0.975, 2) = 4.3027 (printed t tables),
    # half-width = 4.302653 * 0.1 / sqrt(3) = 0.248414
    interval = t_interval([0.5, 0.6, 0.7])
    assert interval.n == 3
    assert interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(0.248414, abs=1e-6)
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    low, high = stats.t.interval(0.95, df=2, loc=0.6, scale=stats.sem([0.5, 0.6, 0.7]))
    assert (interval.low, interval.high) == pytest.approx((low, high))
    # two seeds 1 and 3: s = sqrt(2), so the half-width is t(0.975, 1) = 12.7062 itself
    assert t_interval([1.0, 3.0]).half_width == pytest.approx(12.7062, abs=1e-4)
    # NaN seeds are left out; one value has no interval; none has no mean
    single = t_interval([math.nan, 0.4])
    assert (single.mean, single.n) == (0.4, 1) and math.isnan(single.half_width)
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)
    with pytest.raises(ValueError):
        t_interval([1.0, 2.0], confidence=1.0)


def test_cells_show_mean_and_half_width() -> None:
    assert format_cell(Interval(0.5943, 0.0504, 3), "f3") == "0.594 ± 0.050"
    assert format_cell(Interval(0.97, 0.061, 3), "pct") == "97% ± 6%"
    assert format_cell(Interval(1.25, math.nan, 1), "f2") == "1.25"
    assert format_cell(Interval(math.nan, math.nan, 0), "f3") == "n/a"
    assert format_cell(None, "f3") == "n/a"


def test_every_table_names_its_operating_points() -> None:
    evaluation = {
        "threshold": 0.5,
        "candidate_threshold": 0.05,
        "min_iou": 0.1,
        "froc_fp_rates": [1.0, 2.0, 4.0, 8.0],
    }
    note = operating_point_note(evaluation, [0, 1, 2])
    assert "components of p >= 0.05" in note and "IoU >= 0.1" in note
    assert "neither TP nor FP" in note
    assert "at 1/2/4/8 FP/case" in note and "threshold t = 0.5" in note
    assert "95% t-interval over 3 seeds (t(0.975, 2)" in note and "seeds 0, 1, 2" in note
    one = operating_point_note({**evaluation, "min_iou": 0.0}, [4])
    assert "shares a voxel" in one and "one seed, no interval" in one


def test_summary_over_seeds_takes_each_seeds_own_baseline() -> None:
    # three seeds; the relative figure is taken per seed (0.4/0.8, 0.5/0.5, 0.2/0.4), then averaged
    rows = []
    for seed, (base, censored) in enumerate([(0.8, 0.4), (0.5, 0.5), (0.4, 0.2)]):
        rows.append(_row("truth_bce", base, seed=seed, dice=0.8 + 0.01 * seed))
        rows.append(_row(f"censor-random-0.50-s{seed}_bce", censored, seed=seed))
    relative_to_baseline(rows, "truth_bce")
    summaries = summarize(rows)
    assert [s.row_key for s in summaries] == ["truth_bce", "censor-random-0.50_bce"]
    censored = summaries[1]
    assert censored.seeds == [0, 1, 2]
    relative = censored.stats["relative_max_sensitivity"]
    # ratios 0.5, 1.0, 0.5: mean 2/3, s = 0.288675, half = 4.302653 * 0.288675 / sqrt(3) = 0.717109
    assert relative.mean == pytest.approx(2 / 3)
    assert relative.half_width == pytest.approx(0.717109, abs=1e-6)
    dice = summaries[0].stats["dice"]  # 0.80, 0.81, 0.82: s = 0.01
    assert dice.mean == pytest.approx(0.81)
    assert dice.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    table = format_table(rows)
    assert "| censor-random-0.50 | BCE | 3 | 67% ± 72% |" in table
    assert "| truth | BCE | 3 | 100% |" not in table  # three seeds: every cell has an interval
    assert "| truth | BCE | 3 | 100% ± 0% |" in table
    with pytest.raises(ValueError, match="seed 3"):
        relative_to_baseline([*rows, _row("censor-random-0.50-s3_bce", 0.1, seed=3)], "truth_bce")


def test_seedless_keys() -> None:
    assert seedless("censor-random-0.50-s12") == "censor-random-0.50"
    assert seedless("censor-size-0.50-s0") == "censor-size-0.50"
    assert seedless("polygon-severe-1.00-s3-clean-truth") == "polygon-severe-1.00-clean-truth"
    assert Variant("censor-random-0.50-s7", "lopsided", "meta", 0.05).row_key == (
        "censor-random-0.50_lopsided_meta0.05"
    )


def test_default_brain_plan_has_the_issue_12_rows() -> None:
    keys = [v.key for v in brain_variants(settings_for("brain-mets", "default", seed=2))]
    random = "censor-random-0.50-s2"
    assert keys[:3] == ["truth_bce", "truth_lopsided", "truth_bce_clean-only"]
    for fraction in ("0.05", "0.1", "0.2"):
        assert f"{random}_bce_meta{fraction}" in keys
    assert f"{random}_lopsided_meta0.05" in keys
    # the second censoring gets meta and lopsided + meta at the reference size only
    size = "censor-size-0.50-s2"
    assert [k for k in keys if k.startswith(size)] == [
        f"{size}_bce",
        f"{size}_lopsided",
        f"{size}_bce_meta0.05",
        f"{size}_lopsided_meta0.05",
    ]
    clean_only = next(
        v
        for v in brain_variants(settings_for("brain-mets", "default"))
        if v.train_subset == "clean"
    )
    assert (clean_only.label_set, clean_only.clean_fraction) == ("truth", 0.05)
    assert clean_only.method == "BCE, clean only"


def test_one_mm_setting_keeps_the_lesion_sizes_in_mm_and_reports_size_censoring() -> None:
    one_mm = settings_for("brain-mets-1mm", "default")
    two_mm = settings_for("brain-mets", "default")
    assert one_mm.phantom_kind == "brain-mets" and one_mm.spacing_mm == 1.0
    # the documented phantom (2 mm defaults of brain_mets_case) in mm: median 3 vox = 6 mm,
    # 1-30 vox = 2-60 mm; at 1 mm the same millimetres are 6 and 2-60 voxels
    defaults = inspect.signature(brain_mets_case).parameters
    opts = one_mm.generator_opts
    assert opts["median_diameter_vox"] * 1.0 == defaults["median_diameter_vox"].default * 2.0
    assert [d * 1.0 for d in opts["diameter_vox"]] == [
        d * 2.0 for d in defaults["diameter_vox"].default
    ]
    # a lesion of the smallest half (below the 6 mm median) is 2-6 voxels across at 1 mm
    assert opts["diameter_vox"][0] >= 2.0
    # cropped field of view: at most twice the voxels of the 2 mm default (same patches, steps)
    assert math.prod(opts["shape"]) <= 2 * math.prod(two_mm.generator_opts["shape"])
    assert (one_mm.patch_size, one_mm.steps) == (two_mm.patch_size, two_mm.steps)
    keys = {v.key for v in brain_variants(one_mm)}
    for method in ("bce", "lopsided", "bce_meta0.05", "lopsided_meta0.05"):
        assert f"censor-size-0.50-s0_{method}" in keys
    quick = {v.key for v in brain_variants(settings_for("brain-mets-1mm", "quick"))}
    assert {"censor-size-0.50-s0_bce", "censor-size-0.50-s0_lopsided"} <= quick
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        settings_for("brain-mets-3mm", "default")  # type: ignore[arg-type]


def test_only_patterns_select_rows_and_keep_the_baseline() -> None:
    settings = settings_for("brain-mets", "default", seed=1)
    chosen = [v.key for v in plan_variants(settings, ["censor-random-0.50_*meta*"])]
    assert chosen == [
        "truth_bce",
        "censor-random-0.50-s1_bce_meta0.05",
        "censor-random-0.50-s1_bce_meta0.1",
        "censor-random-0.50-s1_bce_meta0.2",
        "censor-random-0.50-s1_lopsided_meta0.05",
    ]
    assert plan_variants(settings) == brain_variants(settings)
    with pytest.raises(ValueError, match="matches no row"):
        plan_variants(settings, ["censor-gaussian*"])


def test_each_seed_trains_on_its_own_store_censoring_and_clean_draw(tmp_path: Path) -> None:
    settings = settings_for("brain-mets", "default")
    bench = RobustnessBenchmark(settings, tmp_path, seeds=[0, 1, 2], tracking_uri="sqlite:///x.db")
    stores = set()
    for seed in (0, 1, 2):
        variant = plan_variants(bench.settings_for_seed(seed))[3]  # censored BCE
        config = bench.train_config(variant, seed)
        assert config.labels == f"censor-random-0.50-s{seed}"
        assert config.seed == seed  # the clean-subset draw, init and patch stream
        assert config.store.endswith(f"brain-mets-default-s{seed}.zarr")
        stores.add(config.store)
        meta = bench.train_config(Variant(variant.label_set, "bce", "meta", 0.1), seed)
        assert (meta.reweight, meta.clean_fraction) == ("meta", 0.1)
    assert len(stores) == 3
    with pytest.raises(ValueError, match="distinct"):
        RobustnessBenchmark(settings, tmp_path, seeds=[1, 1])


def test_cli_refuses_bad_seed_counts_and_patterns(tmp_path: Path, capsys) -> None:
    work = str(tmp_path / "w")
    base = ["benchmark", "robustness", "--workdir", work]
    assert cli_main([*base, "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert cli_main([*base, "--only", "no-such-row"]) == 2
    err = capsys.readouterr().err
    assert "--only" in err and "matches no row" in err and len(err.strip().splitlines()) == 1
    assert not Path(work).exists()  # refused before any work


def test_from_json_merges_per_seed_results(tmp_path: Path, capsys) -> None:
    """Runs made one seed at a time give the same table as one run over the seeds."""
    paths = []
    for seed, (base, censored) in enumerate([(0.8, 0.4), (0.5, 0.5)]):
        rows = [
            _row("truth_bce", base, seed=seed),
            _row(f"censor-random-0.50-s{seed}_bce", censored, seed=seed),
        ]
        path = tmp_path / f"s{seed}.json"
        path.write_text(
            json.dumps({"kind": "brain-mets", "size": "default", "rows": [asdict(r) for r in rows]})
        )
        paths.append(str(path))
    merged_path = tmp_path / "merged.json"
    args = ["benchmark", "robustness", "--from-json", paths[0], "--from-json", paths[1]]
    assert cli_main([*args, "--output", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert merged["seeds"] == [0, 1]
    censored = merged["summary"][1]["metrics"]["relative_max_sensitivity"]
    # ratios 0.5 and 1.0: mean 0.75, s = 0.353553, half = 12.7062 * 0.353553 / sqrt(2) = 3.17655
    assert censored["mean"] == pytest.approx(0.75)
    assert censored["half_width"] == pytest.approx(3.17655, abs=1e-4)
    assert censored["n"] == 2
    assert "75% ± 318%" in capsys.readouterr().out
    # a row found twice (the baseline every --only run trains again) is kept from the first file
    again = tmp_path / "again.json"
    rows = [_row("truth_bce", 0.1, seed=1), _row("censor-random-0.50-s1_lopsided", 0.5, seed=1)]
    again.write_text(
        json.dumps({"kind": "brain-mets", "size": "default", "rows": [asdict(r) for r in rows]})
    )
    assert cli_main([*args, "--from-json", str(again), "--output", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert [(r["seed"], r["key"]) for r in merged["rows"]] == [
        (0, "truth_bce"),
        (0, "censor-random-0.50-s0_bce"),
        (1, "truth_bce"),
        (1, "censor-random-0.50-s1_bce"),
        (1, "censor-random-0.50-s1_lopsided"),
    ]
    lopsided = merged["summary"][2]["metrics"]["relative_max_sensitivity"]
    assert (lopsided["mean"], lopsided["n"]) == (1.0, 1)  # 0.5 over seed 1's first baseline, 0.5
    assert "kept the first file's copy" in capsys.readouterr().out
    skin = tmp_path / "skin.json"
    skin.write_text(json.dumps({"kind": "skin", "size": "default", "rows": []}))
    assert cli_main([*args, "--from-json", str(skin)]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.integration
def test_quick_brain_benchmark_end_to_end(tmp_path: Path) -> None:
    """`noisyseg benchmark robustness --quick`: real phantoms, Ray Train, MLflow, evaluation."""
    output = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    noisyseg = Path(sys.executable).parent / "noisyseg"
    completed = subprocess.run(
        [
            str(noisyseg),
            "benchmark",
            "robustness",
            "--kind",
            "brain-mets",
            "--quick",
            "--workdir",
            str(tmp_path / "work"),
            "--output",
            str(output),
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # five models incl. meta; the 2-core machine is often shared
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document = json.loads(output.read_text())
    rows = document["rows"]
    assert [r["key"] for r in rows] == [
        v.key for v in brain_variants(settings_for("brain-mets", "quick"))
    ]
    for row in rows:
        assert set(row["metrics"]) >= {
            "max_sensitivity",
            "sensitivity_at_80_precision",
            "ap",
            "fp_per_case",
            "dice",
            "jaccard",
        }
        for name, value in row["metrics"].items():
            assert math.isfinite(value), (row["key"], name, value)
        assert 0.0 <= row["metrics"]["max_sensitivity"] <= 1.0
        assert row["run_id"]
    baseline = next(r for r in rows if r["key"] == "truth_bce")
    reference = baseline["metrics"]["max_sensitivity"]
    # the truth-trained baseline finds lesions even at the quick budget, so every relative
    # figure is defined (finite), and each is the row's max sensitivity over the baseline's
    assert reference > 0
    for row in rows:
        expected = row["metrics"]["max_sensitivity"] / reference
        assert math.isfinite(row["relative_max_sensitivity"])
        assert row["relative_max_sensitivity"] == pytest.approx(expected)
    assert "rel. max sens." in completed.stdout
    assert "FP/case @max sens." in completed.stdout and "Operating points" in completed.stdout
    # one seed: one summary row per model, each over that one seed, with no interval
    assert [s["row_key"] for s in document["summary"]] == [
        v.row_key for v in brain_variants(settings_for("brain-mets", "quick"))
    ]
    for summary in document["summary"]:
        assert summary["seeds"] == [0]
        assert summary["metrics"]["max_sensitivity"]["n"] == 1
    meta = next(r for r in rows if r["reweight"] == "meta")
    assert meta["clean_cases"] >= 1 and meta["loss"] == "bce"
    assert "mlflow ui --backend-store-uri sqlite:///" in completed.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(document["tracking_uri"])
    summary = client.get_run(document["summary_run_id"])
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"results.json", "table.md", "sensitivity_by_size.png"} <= artifacts
    for row in rows:  # every model's test metrics are logged on its own training run
        assert "test/max_sensitivity" in client.get_run(row["run_id"]).data.metrics
