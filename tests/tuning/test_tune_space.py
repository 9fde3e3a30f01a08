"""Search-space parsing and validation (no Ray cluster, no MLflow): fast unit tests."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import yaml
from cluster_utils import make_ball_store
from ray import tune

from noisyseg.distributed.config import make_config
from noisyseg.errors import NoisysegInputError
from noisyseg.tuning.plan import SweepSettings, prepare
from noisyseg.tuning.space import parse_expression, parse_space
from noisyseg.tuning.summary import best_config_yaml


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from noisyseg.storage.store import VolumeStore

    path = make_ball_store(tmp_path_factory.mktemp("space") / "s.zarr", train=6, val=1, size=16)
    VolumeStore.open(path, mode="r+").set_clean(["case000", "case001"])
    return path


def test_each_function_becomes_the_matching_tune_domain() -> None:
    rng = np.random.default_rng(0)
    dim = parse_expression("entropy_weight", "loguniform(0.01, 0.9)")
    domain = dim.to_tune()
    assert isinstance(domain, tune.search.sample.Float)
    assert isinstance(domain.get_sampler(), tune.search.sample.LogUniform)
    assert (domain.lower, domain.upper) == (0.01, 0.9)
    draws = np.array(domain.sample(size=2000, random_state=rng))
    assert draws.min() >= 0.01 and draws.max() < 0.9
    # log-uniform: the median sits at the geometric mean sqrt(0.01*0.9) = 0.0949, not at 0.455
    assert abs(np.median(draws) - 0.0949) < 0.02

    choice = parse_expression("clean_fraction", "choice(0.05, 0.1)").to_tune()
    assert isinstance(choice, tune.search.sample.Categorical) and choice.categories == [0.05, 0.1]
    assert parse_expression("clean_fraction", "choice([0.02, 0.05])").args == (0.02, 0.05)
    assert parse_expression("loss", "grid_search([bce, 'lopsided'])").to_tune() == {
        "grid_search": ["bce", "lopsided"]
    }
    q = parse_expression("steps", "quniform(100, 400, 100)")
    assert sorted(set(q.to_tune().sample(size=200, random_state=rng))) == [
        100.0,
        200.0,
        300.0,
        400.0,
    ]
    r = parse_expression("seed", "randint(0, 3)")
    assert sorted(set(r.to_tune().sample(size=200, random_state=rng))) == [0, 1, 2]
    assert r.probes() == [0, 2]  # the upper bound is excluded
    u = parse_expression("lr", "uniform(1e-3, 1e-2)").to_tune()
    assert isinstance(u.get_sampler(), tune.search.sample.Uniform)


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('true')", "not a function call"),
        ("os.system('x')", "not a function call"),
        ("uniform(0.1)", "takes 2 arguments"),
        ("uniform(0.9, 0.1)", "lower < upper"),
        ("loguniform(0, 1)", "positive lower bound"),
        ("uniform(a, 1)", "must be a number"),
        ("choice()", "1 or more arguments"),
        ("choice([])", "1 or more arguments"),
        ("choice(0.1, 0.1)", "twice"),
        ("normal(0, 1)", "unknown function"),
        ("uniform(0, x.y)", "not a literal"),
        ("randint(0.5, 3)", "integers"),
        ("uniform(0, 1", "cannot parse"),
        ("uniform(lo=0, hi=1)", "positional"),
    ],
)
def test_bad_expressions_are_rejected_without_evaluating(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_expression("lr", text)


def test_flags_and_yaml_merge_flags_win() -> None:
    space = parse_space(
        ["entropy-weight=uniform(0.1, 0.5)"],
        {
            "entropy_weight": "choice(0.3)",
            "clean_fraction": {"grid_search": [0.2, 0.4]},
            "lr": "loguniform(1e-3, 1e-1)",
        },
    )
    assert space.names == ["entropy_weight", "clean_fraction", "lr"]
    assert space.dimensions["entropy_weight"].kind == "uniform"
    assert space.dimensions["clean_fraction"].values == (0.2, 0.4)
    assert space.grid_size() == 2
    assert space.describe()["lr"] == "loguniform(1e-3, 1e-1)"


def test_unknown_or_reserved_fields_and_bad_flags() -> None:
    with pytest.raises(NoisysegInputError, match="'entropy' is not a training config field"):
        parse_space(["entropy=uniform(0,1)"])
    with pytest.raises(NoisysegInputError, match="set by the sweep"):
        parse_space(["run_name=choice(a, b)"])
    with pytest.raises(NoisysegInputError, match="expected NAME=EXPR"):
        parse_space(["uniform(0,1)"])
    with pytest.raises(NoisysegInputError, match="cfg.yaml: search_space.lr"):
        parse_space([], {"lr": 0.1}, source="cfg.yaml")


def _base(store: str, **extra) -> dict:
    base = dict(
        store=store,
        labels="noisy",
        loss="lopsided",
        reweight="meta",
        channels=[4, 8],
        num_res_units=1,
        patch_size=16,
        steps=20,
        val_interval=5,
        val_cases=1,
    )
    base.update(extra)
    return base


def test_validation_builds_a_config_for_every_probe_value(store: str) -> None:
    space = parse_space(["entropy_weight=uniform(0.1, 0.9)", "clean_fraction=choice(0.2, 0.3)"])
    configs = space.validate(_base(store))
    # first probe point, then the other end of entropy_weight, then the other clean fraction
    assert [(c.entropy_weight, c.clean_fraction) for c in configs] == [
        (0.1, 0.2),
        (0.9, 0.2),
        (0.1, 0.3),
    ]

    out_of_range = parse_space(["entropy_weight=uniform(0.1, 1.5)", "clean_fraction=choice(0.2)"])
    with pytest.raises(NoisysegInputError, match=r"entropy_weight=1\.5.*less than or equal to 1"):
        out_of_range.validate(_base(store))

    # 0.5 of 6 training cases = 3 clean cases, but only 2 are flagged clean in the store
    too_big = parse_space(["clean_fraction=choice(0.2, 0.5)"])
    with pytest.raises(NoisysegInputError, match="clean_fraction=0.5.*only 2 train cases"):
        too_big.validate(_base(store))

    # clean_fraction searched while reweight=none: pydantic's cross-field rule names it
    with pytest.raises(NoisysegInputError, match="only apply with reweight"):
        parse_space(["clean_fraction=choice(0.2)"]).validate(_base(store, reweight="none"))


def test_prepare_aligns_reports_with_validation_and_checks_asha(store: str) -> None:
    space = parse_space(["entropy_weight=grid(0.1, 0.9)", "clean_fraction=grid(0.2, 0.3)"])
    plan = prepare(SweepSettings(name="s1", base=_base(store, checkpoint_interval=7), space=space))
    base, sample = plan.base, plan.sample
    assert base["checkpoint_interval"] == 5  # every report carries val/ap
    assert "entropy_weight" not in base and sample.entropy_weight == 0.1
    with pytest.raises(NoisysegInputError, match="needs validation during training"):
        prepare(SweepSettings(name="s1", base=_base(store, val_cases=0), space=space))
    with pytest.raises(NoisysegInputError, match="grace-period must be between 1 and steps - 1"):
        prepare(SweepSettings(name="s1", base=_base(store), space=space, grace_period=20))
    with pytest.raises(NoisysegInputError, match="sweep name"):
        prepare(SweepSettings(name="../x", base=_base(store), space=space))
    # train_loss needs no validation, and reports stay at checkpoint_interval
    plan = prepare(
        SweepSettings(
            name="s2",
            base=_base(store, val_cases=0, checkpoint_interval=4),
            space=space,
            metric="train_loss",
            mode="min",
        )
    )
    assert plan.base["checkpoint_interval"] == 4


def test_best_yaml_loads_back_into_the_same_config(store: str) -> None:
    base = {k: v for k, v in _base(store).items() if k not in ("entropy_weight",)}
    best = {
        "trial_id": "abc_00001",
        "run_id": "r1",
        "metric_last": 0.5,
        "point": {"entropy_weight": 0.3, "clean_fraction": 0.2},
    }
    text = best_config_yaml(base, best, sweep="s", metric="val/ap")
    loaded = make_config(yaml.safe_load(text))
    assert loaded == make_config({**base, **best["point"]})
    assert loaded.entropy_weight == 0.3 and loaded.channels == (4, 8) and loaded.run_name is None
    assert text.startswith("# best trial abc_00001 of sweep s")


def test_cli_merges_yaml_sections_and_flags(store: str, tmp_path) -> None:
    from noisyseg.cli import build_parser
    from noisyseg.tuning.commands import settings_from_args

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                **_base(store),
                "search_space": {"entropy_weight": "loguniform(0.01, 0.9)"},
                "tune": {
                    "name": "from-yaml",
                    "num_samples": 3,
                    "mode": "min",
                    "metric": "train_loss",
                },
            }
        )
    )
    args = build_parser().parse_args(
        [
            "tune",
            "--config",
            str(cfg),
            "--space",
            "clean_fraction=choice(0.2,0.3)",
            "--num-samples",
            "5",
            "--lr",
            "0.02",
            "--mode",
            "hard",
        ]
    )
    settings = settings_from_args(args)
    assert isinstance(args, argparse.Namespace)
    assert settings.name == "from-yaml" and settings.num_samples == 5
    assert settings.mode == "min" and settings.metric == "train_loss"
    assert settings.space.names == ["entropy_weight", "clean_fraction"]
    assert settings.base["lr"] == "0.02" and settings.base["mode"] == "hard"
    assert "search_space" not in settings.base and "tune" not in settings.base


def test_sqlite_tracking_is_refused_for_concurrent_trials(monkeypatch, tmp_path) -> None:
    from noisyseg.tuning.sweep import resolve_sweep_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(NoisysegInputError, match="concurrent trials must log to an MLflow server"):
        resolve_sweep_tracking(tmp_path, max_concurrent=None)
    with pytest.raises(NoisysegInputError, match="local file store"):
        resolve_sweep_tracking(tmp_path, max_concurrent=4)
    # one trial at a time: no concurrent writers, the URI is used as given
    assert resolve_sweep_tracking(tmp_path, max_concurrent=1) == (
        f"sqlite:///{tmp_path}/m.db",
        None,
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_sweep_tracking(tmp_path, max_concurrent=8)[1] is None


def test_best_of_an_unknown_or_unfinished_sweep_is_one_line(tmp_path) -> None:
    from noisyseg.cli import main

    assert main(["tune", "--best", "nope", "--storage-path", str(tmp_path)]) == 2
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "noisyseg_sweep.json").write_text("{}")
    with pytest.raises(NoisysegInputError, match="no best trial yet"):
        from noisyseg.tuning.sweep import best_yaml_of

        best_yaml_of("half", str(tmp_path))
