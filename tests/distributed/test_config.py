"""TrainConfig: validation rules, YAML + CLI merging, store checks (no Ray)."""

from __future__ import annotations

import pytest
from cluster_utils import make_ball_store

from noisyseg.cli import build_parser
from noisyseg.distributed.config import (
    TrainConfig,
    check_against_store,
    config_from_args,
    load_config,
    make_config,
)
from noisyseg.errors import NoisysegInputError


def parse(*argv: str):
    return build_parser().parse_args(["train", *argv])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_ball_store(
        tmp_path_factory.mktemp("cfg") / "s.zarr", train=4, val=1, size=16, clean=2
    )


def test_defaults_follow_nnunet() -> None:
    config = make_config({"store": "x"})
    assert (config.optimizer, config.lr, config.momentum, config.nesterov) == (
        "sgd",
        1e-2,
        0.99,
        True,
    )
    assert (config.weight_decay, config.lr_schedule, config.poly_exponent) == (3e-5, "poly", 0.9)
    assert config.norm == "instance"


def test_issue_command_line_parses_to_typed_fields() -> None:
    args = parse(
        "--store",
        "s.zarr",
        "--labels",
        "noisy",
        "--loss",
        "lopsided",
        "--entropy-weight",
        "0.3",
        "--reweight",
        "meta",
        "--clean-fraction",
        "0.25",
        "--workers",
        "2",
        "--gpu",
        "--steps",
        "20",
        "--patch-size",
        "32",
        "--batch-size",
        "2",
        "--run-name",
        "t1",
        "--experiment",
        "exp",
        "--channels",
        "8",
        "16",
        "32",
        "--no-nesterov",
    )
    config = config_from_args(args)
    assert config.entropy_weight == 0.3 and isinstance(config.entropy_weight, float)
    assert config.clean_fraction == 0.25 and config.reweight == "meta"
    assert (config.workers, config.gpu, config.steps, config.patch_size) == (2, True, 20, 32)
    assert config.channels == (8, 16, 32) and config.nesterov is False
    assert (config.run_name, config.experiment, config.labels) == ("t1", "exp", "noisy")


def test_every_field_has_a_flag() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in TrainConfig.model_fields:
        assert "--" + name.replace("_", "-") in help_text, name


def test_cli_flags_override_yaml(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store: a.zarr\nentropy-weight: 0.7\nsteps: 50\npatch_size: [16, 32, 32]\n")
    config = config_from_args(parse("--config", str(path), "--steps", "7"))
    assert config.steps == 7  # flag wins
    assert config.entropy_weight == 0.7  # from YAML, not the default 0.95
    assert config.patch_size == (16, 32, 32)
    assert load_config(path, loss="bce").loss == "bce"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"entropy_weight": 1.5}, "entropy_weight"),
        ({"reweight": "meta"}, "needs a clean subset"),
        ({"reweight": "meta", "clean_fraction": 0.2, "clean_count": 3}, "mutually exclusive"),
        ({"clean_count": 2}, "only apply with reweight"),
        ({"amp": "bf16"}, "needs a GPU"),
        ({"loss": "focal"}, "loss"),
        ({"run_name": "../escape"}, "run_name"),
        ({"strides": [2]}, "strides needs"),
        ({"bogus": 1}, "bogus: unknown field"),
        ({"patch_size": [0, 16]}, "patch_size"),
        ({"train_subset": "clean"}, "train_subset=clean needs clean_fraction"),
        (
            {"train_subset": "clean", "reweight": "meta", "clean_fraction": 0.2},
            "use reweight=none",
        ),
        ({"train_subset": "noisy"}, "train_subset"),
    ],
)
def test_invalid_values_fail_with_one_line(fields: dict, message: str) -> None:
    with pytest.raises(NoisysegInputError) as info:
        make_config({"store": "x", **fields})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_store_flag_is_reported() -> None:
    with pytest.raises(NoisysegInputError, match="store: Field required"):
        config_from_args(parse("--steps", "3"))


def test_store_checks(store: str, tmp_path) -> None:
    base = {"store": store, "patch_size": 16, "channels": [8, 16, 32]}
    info = check_against_store(make_config(base))
    check_against_store(make_config({**base, "reweight": "meta", "clean_fraction": 0.5}))  # fits
    assert (info.spatial_dims, info.in_channels, info.patch_shape) == (3, 1, [16, 16, 16])
    assert info.train_cases == 4 and info.val_case_ids == ["case004"]
    bad = [
        ({"store": str(tmp_path / "nothing.zarr")}, "nothing.zarr"),
        ({"labels": "censor-random-0.50-s0"}, "label set 'censor-random-0.50-s0' not in store"),
        ({"patch_size": 10}, "multiple of the network's total stride 4"),
        ({"patch_size": [16, 16]}, "has 2 axes but the store is 3D"),
        ({"reweight": "meta", "clean_count": 3}, "only 2 train cases are flagged clean"),
        ({"val_split": "test"}, "no cases in validation split 'test'"),
    ]
    for fields, message in bad:
        with pytest.raises(NoisysegInputError, match=message.replace("(", r"\(")):
            check_against_store(make_config({**base, **fields}))


def test_cli_rejects_bad_input_before_ray(store: str, capsys) -> None:
    from noisyseg.cli import main

    status = main(["train", "--store", store, "--labels", "nope", "--steps", "1"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "label set 'nope' not in store" in err
