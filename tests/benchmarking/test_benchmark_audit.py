"""``noisyseg benchmark audit``: the measurement by hand (unit) and the --quick run (integration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from noisyseg.benchmarking.audit import (
    AuditRow,
    audit_settings,
    audit_variants,
    format_table,
    measure,
    plot_found_curves,
    run_audit_benchmark,
    target_verdict,
)
from noisyseg.benchmarking.settings import settings_for
from noisyseg.candidates import HiddenLesion
from noisyseg.cli import main
from noisyseg.errors import NoisysegInputError


def _lesion(diameter: float, *hits: str) -> HiddenLesion:
    volume = np.pi / 6 * diameter**3
    return HiddenLesion("c", 1, 1, volume, diameter, tuple(hits))


def test_measure_by_hand() -> None:
    lesions = [
        _lesion(3.0, "c:1"),  # listed 2nd
        _lesion(5.0, "c:3"),  # listed 4th
        _lesion(10.0),  # no candidate hits it
        _lesion(25.0, "d:1", "c:2"),  # listed 5th and 1st: found at 1
    ]
    ranked = ["c:2", "c:1", "x:1", "c:3", "d:1"]
    got = measure(lesions, ranked)
    assert got["n_censored"] == 4 and got["list_length"] == 5
    assert got["found_n"] == 3  # ranks 1, 2, 4 are within the top N = 4
    assert got["found_2n"] == 3
    assert got["n_censored_target"] == 3 and got["found_2n_target"] == 2  # >= 4 mm: 5, 10, 25
    assert [(b["count"], b["found_n"], b["found_2n"]) for b in got["by_size"]] == [
        (1, 1, 1),
        (1, 1, 1),
        (1, 0, 0),
        (1, 1, 1),
    ]
    assert got["curve"] == [0, 1, 2, 2, 3, 3, 3, 3, 3]  # k = 0 .. max(5, 2N = 8)
    assert got["curve_target"] == [0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_plan_reuses_the_robustness_settings() -> None:
    quick = audit_settings("quick")
    base = settings_for("brain-mets", "quick")
    assert (quick.steps, quick.patch_size, quick.cases) == (base.steps, base.patch_size, base.cases)
    assert [v.key for v in audit_variants(quick)] == [
        "censor-random-0.50-s0_bce",
        "censor-random-0.50-s0_lopsided",
    ]
    default = audit_settings("default", seed=2)
    assert default.rate_sweep == () and default.methods == ("bce", "lopsided")
    assert [v.key for v in audit_variants(default)] == [
        "censor-random-0.50-s2_bce",
        "censor-random-0.50-s2_lopsided",
        "censor-size-0.50-s2_bce",
        "censor-size-0.50-s2_lopsided",
    ]
    with pytest.raises(ValueError, match="kind"):
        audit_settings("quick", kind="skin")


def _row(mode: str, loss: str, found_target: int, n_target: int = 10) -> AuditRow:
    return AuditRow(
        key=f"{mode}_{loss}",
        label_set=f"censor-{mode}-0.50-s0",
        censor_mode=mode,
        loss=loss,
        method=loss,
        run_id="r",
        audit_run_id="a",
        train_seconds=1.0,
        n_censored=12,
        list_length=30,
        found_n=6,
        found_2n=9,
        n_censored_target=n_target,
        found_2n_target=found_target,
        found_2n_target_iou=found_target - 1,
        by_size=[{"bin_mm": "[0, 4)", "count": 2, "found_n": 0, "found_2n": 1}],
        curve=list(range(13)),
        curve_target=list(range(11)) + [10, 10],
    )


def test_target_verdict() -> None:
    met = target_verdict([_row("random", "bce", 5), _row("random", "lopsided", 8)])
    assert met.startswith("target") and "MET - lopsided 80%, BCE 50%" in met
    assert "MISSED" in target_verdict([_row("random", "bce", 5), _row("random", "lopsided", 7)])
    # >= 80% but not more than BCE: missed
    assert "MISSED" in target_verdict([_row("random", "bce", 9), _row("random", "lopsided", 8)])
    assert "no random-censoring pair" in target_verdict([_row("size", "bce", 9)])
    assert np.isnan(_row("random", "bce", 0, n_target=0).share_2n_target)


def test_table_and_curve(tmp_path: Path) -> None:
    rows = [_row("random", "bce", 5), _row("random", "lopsided", 8), _row("size", "bce", 1)]
    table = format_table(rows)
    assert table.count("\n") == 4  # header, rule, three rows
    assert (
        "| censor-random-0.50-s0 | lopsided | 12 | 30 | 6/12 (50%) | 9/12 (75%) | 8/10 (80%) "
        "| 7/10 (70%) |"
    ) in table
    path = plot_found_curves(rows, tmp_path / "curve.png")
    assert path.stat().st_size > 10_000


def test_kinds_without_censored_lesions_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(NoisysegInputError, match="needs censored lesions"):
        run_audit_benchmark("skin", "quick", workdir=str(tmp_path))
    with pytest.raises(NoisysegInputError, match="one seed"):
        run_audit_benchmark("brain-mets", "quick", workdir=str(tmp_path), seeds=2)
    assert main(["benchmark", "audit", "--kind", "skin", "--workdir", str(tmp_path)]) == 2
    assert "needs censored lesions" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused run must not start any work"


@pytest.mark.integration
def test_quick_audit_benchmark_end_to_end(tmp_path: Path) -> None:
    """`noisyseg benchmark audit --quick`: phantoms, censoring, Ray Train, audits, MLflow."""
    from mlflow.tracking import MlflowClient

    from noisyseg.storage.store import VolumeStore

    output = tmp_path / "audit.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    command = [str(Path(sys.executable).parent / "noisyseg"), "benchmark", "audit", "--quick"]
    command += ["--workdir", str(tmp_path / "work"), "--output", str(output)]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "target (random 50%" in done.stdout
    document = json.loads(output.read_text())
    rows = document["rows"]
    assert [r["key"] for r in rows] == [v.key for v in audit_variants(audit_settings("quick"))]
    store = VolumeStore.open(document["store"])
    client = MlflowClient(document["tracking_uri"])
    for row in rows:
        # N = the lesions the censoring step recorded as removed (its own table, not the audit's)
        table = store.lesion_table(row["label_set"])
        assert row["n_censored"] == int((table["status"] == "removed").sum()) > 0
        assert sum(b["count"] for b in row["by_size"]) == row["n_censored"]
        curve = row["curve"]
        assert curve[0] == 0 and all(b >= a for a, b in zip(curve, curve[1:]))
        assert curve[row["n_censored"]] == row["found_n"]
        assert curve[2 * row["n_censored"]] == row["found_2n"]
        assert row["found_2n_target_iou"] <= row["found_2n_target"]  # the IoU rule is stricter
        assert row["found_2n_target"] <= row["n_censored_target"] <= row["n_censored"]
        audit = client.get_run(row["audit_run_id"])
        assert audit.data.tags["noisyseg.model_run_id"] == row["run_id"]
        assert audit.data.tags["mlflow.parentRunId"] == row["run_id"]
        assert audit.data.metrics["found_2n"] == row["found_2n"]
    summary = {a.path for a in client.list_artifacts(document["summary_run_id"])}
    assert {"results.json", "table.md", "found_vs_list_length.png"} <= summary
