"""The robustness benchmark: variant planning (unit) and the --quick run end to end (integration)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noisyseg.benchmarking.robustness import (
    BenchmarkRow,
    Variant,
    brain_variants,
    censor_name,
    format_table,
    relative_to_baseline,
    settings_for,
    skin_noisy_name,
    skin_variants,
)
from noisyseg.storage.corrupt import default_name


def _row(key: str, max_sensitivity: float) -> BenchmarkRow:
    metrics = {
        k: 0.5
        for k in (
            "sensitivity",
            "sensitivity_at_80_precision",
            "ap",
            "precision",
            "fp_per_case",
            "dice",
            "jaccard",
        )
    }
    metrics["max_sensitivity"] = max_sensitivity
    return BenchmarkRow(
        key=key,
        group="main",
        label_set="truth",
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
    )


def test_label_set_names_match_the_store_defaults() -> None:
    assert censor_name("random", 0.5, 0) == "censor-random-0.50-s0"
    assert censor_name("size", 0.25, 3) == default_name("size", rate=0.25, seed=3)
    settings = settings_for("skin", "quick")
    assert skin_noisy_name(settings) == default_name("polygon", level="severe", seed=0)


def test_quick_brain_plan_is_the_demo_comparison() -> None:
    keys = [v.key for v in brain_variants(settings_for("brain-mets", "quick"))]
    assert keys == [
        "truth_bce",
        "truth_lopsided",
        "censor-random-0.50-s0_bce",
        "censor-random-0.50-s0_lopsided",
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
    sizes = sorted(v.clean_fraction for v in variants if v.reweight == "meta")
    assert sizes == [0.02, 0.05, 0.1, 0.2]


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
        timeout=900,
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
    assert "mlflow ui --backend-store-uri sqlite:///" in completed.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(document["tracking_uri"])
    summary = client.get_run(document["summary_run_id"])
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"results.json", "table.md", "sensitivity_by_size.png"} <= artifacts
    for row in rows:  # every model's test metrics are logged on its own training run
        assert "test/max_sensitivity" in client.get_run(row["run_id"]).data.metrics
