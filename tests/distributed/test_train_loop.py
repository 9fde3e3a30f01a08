"""The worker loop in a plain process (LocalContext): schedule, steps, checkpoints, resume."""

from __future__ import annotations

import math

import pytest
import torch
from cluster_utils import make_ball_store

from noisyseg.distributed.checkpoints import load_model_state, read_state
from noisyseg.distributed.config import check_against_store, make_config
from noisyseg.distributed.train_loop import (
    LocalContext,
    lr_factor,
    make_optimizer,
    make_step_loss,
    run_worker,
    train_step,
)
from noisyseg.models import build_unet


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_ball_store(tmp_path_factory.mktemp("loop") / "s.zarr", train=4, val=1, size=16)


def small(store: str, **fields):
    base = dict(
        store=store,
        labels="noisy",
        loss="lopsided",
        entropy_weight=0.3,
        patch_size=16,
        batch_size=2,
        channels=[4, 8, 16],
        num_res_units=1,
        val_cases=0,
        log_interval=100,
        foreground_fraction=0.5,
    )
    base.update(fields)
    return make_config(base)


def loop_config(config) -> dict:
    info = check_against_store(config)
    return {
        "config": config.model_dump(mode="json"),
        "store_info": info.model_dump(),
        "mlflow": None,
    }


def test_lr_schedules_hand_numbers() -> None:
    config = make_config({"store": "x", "steps": 10})
    assert lr_factor(config, 0) == 1.0
    assert lr_factor(config, 5) == pytest.approx(0.5**0.9)  # 0.535886731
    assert lr_factor(config, 10) == 0.0
    cosine = make_config({"store": "x", "steps": 10, "lr_schedule": "cosine"})
    assert lr_factor(cosine, 5) == pytest.approx(0.5)
    assert lr_factor(cosine, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(make_config({"store": "x", "lr_schedule": "constant"}), 7) == 1.0


def test_optimizer_is_nnunet_sgd() -> None:
    net = torch.nn.Linear(2, 1)
    sgd = make_optimizer(make_config({"store": "x"}), net.parameters())
    group = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        1e-2,
        0.99,
        True,
        3e-5,
    )
    adamw = make_optimizer(
        make_config({"store": "x", "optimizer": "adamw", "lr": 3e-4}), net.parameters()
    )
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 3e-4


def test_plain_loop_trains_checkpoints_and_resumes(store: str, tmp_path) -> None:
    config = small(store, steps=10, checkpoint_interval=5, lr=0.01)
    context = LocalContext(checkpoint_root=tmp_path)
    last = run_worker(loop_config(config), context)
    assert [r["step"] for r in context.reports] == [5, 10]
    assert last["step"] == 10 and math.isfinite(last["train_loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_0000005",
        "checkpoint_0000010",
    ]

    state = read_state(tmp_path / "checkpoint_0000010")  # torch.load(weights_only=True)
    assert state["step"] == 10 and state["config"]["entropy_weight"] == 0.3
    assert {"optimizer", "scheduler", "rng", "mlflow_run_id"} <= set(state)
    assert not any(k.startswith("module.") for k in state["model"])

    # Resume from step 10 with steps raised to 13: 3 more steps, and the LR schedule continues
    # (a fresh scheduler would give lr = 0.01 at step 11 instead of 0.01 * (1 - 10/13) ** 0.9).
    longer = small(store, steps=13, checkpoint_interval=1, lr=0.01)
    resumed = LocalContext(
        checkpoint_root=tmp_path / "more", restore=tmp_path / "checkpoint_0000010"
    )
    run_worker(loop_config(longer), resumed)
    assert [r["step"] for r in resumed.reports] == [11, 12, 13]
    assert resumed.reports[0]["lr"] == pytest.approx(0.01 * (1 - 10 / 13) ** 0.9)
    assert resumed.reports[2]["lr"] == pytest.approx(0.01 * (1 - 12 / 13) ** 0.9)

    # Resuming a finished run does no steps and writes no checkpoint, but reports the final
    # checkpoint's metrics once (a restored Tune trial ends with its metric, not an empty result).
    again = LocalContext(restore=tmp_path / "checkpoint_0000010", checkpoint_root=tmp_path / "x")
    run_worker(loop_config(config), again)
    assert len(again.reports) == 1 and again.reports[0]["step"] == 10
    assert again.reports[0]["train_loss"] == pytest.approx(last["train_loss"])
    assert again.reports[0]["lr"] == pytest.approx(context.reports[-1]["lr"])
    assert not (tmp_path / "x").exists()
    assert state["metrics"]["train_loss"] == pytest.approx(last["train_loss"])


def test_training_lowers_the_loss(store: str) -> None:
    config = small(store, steps=24, checkpoint_interval=1, lr=0.02, loss="bce", seed=3)
    context = LocalContext()
    run_worker(loop_config(config), context)
    losses = [r["train_loss"] for r in context.reports]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4


def test_load_model_state_rebuilds_the_network(store: str, tmp_path) -> None:
    config = small(store, steps=2, checkpoint_interval=2)
    run_worker(loop_config(config), LocalContext(checkpoint_root=tmp_path))
    model, spec, saved_config, step = load_model_state(tmp_path / "checkpoint_0000002" / "state.pt")
    state = torch.load(tmp_path / "checkpoint_0000002" / "state.pt", weights_only=True)
    reference = build_unet(spec)
    reference.load_state_dict(state["model"])
    reference.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    assert step == 2 and spec.channels == (4, 8, 16) and saved_config["loss"] == "lopsided"
    assert torch.equal(model(x), reference(x))
    # and differs from an untrained network, so the weights really were loaded
    assert not torch.allclose(model(x), build_unet(spec).eval()(x))


def test_meta_reweighting_step_updates_the_model(store: str) -> None:
    config = small(store, reweight="meta", clean_count=1, steps=1)
    torch.manual_seed(0)
    model = build_unet(config.unet_spec(3, 1))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(config, model.parameters())
    x, y = torch.randn(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.8).float()
    xc, yc = torch.randn(1, 1, 16, 16, 16), (torch.rand(1, 1, 16, 16, 16) > 0.8).float()
    out = train_step(model, optimizer, make_step_loss(config), x, y, config=config, clean=(xc, yc))
    assert math.isfinite(out.loss)
    assert 0.0 < out.extra["train/positive_weight_fraction"] <= 1.0
    assert 0.0 <= out.extra["train/lesion_weight_share"] <= 1.0
    # the batches' lesion shares, as MLflow gets them every step
    assert out.extra["train/noisy_lesion_fraction"] == pytest.approx(float(y.mean()))
    assert out.extra["train/clean_lesion_fraction"] == pytest.approx(float(yc.mean()))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_clip_defaults_follow_the_step_kind(store: str) -> None:
    assert small(store, loss="bce").effective_grad_clip_norm() == 12.0  # nnU-Net's
    assert small(store, reweight="meta", clean_count=1).effective_grad_clip_norm() == 0.1
    assert small(store, grad_clip_norm=3.0).effective_grad_clip_norm() == 3.0


def test_standard_step_clips_the_gradient_norm(store: str) -> None:
    """Independent: plain autograd mean BCE gradient g, SGD(lr=1) update g · c / (|g| + 1e-6)."""
    config = small(store, loss="bce", optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                   grad_clip_norm=1e-3)  # fmt: skip
    torch.manual_seed(0)
    model = build_unet(config.unet_spec(3, 1))
    twin = build_unet(config.unet_spec(3, 1))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.8).float()
    grads = torch.autograd.grad(
        torch.nn.functional.binary_cross_entropy_with_logits(twin(x), y), list(twin.parameters())
    )
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    assert norm > 1e-3  # so the clip is in force
    optimizer = make_optimizer(config, model.parameters())
    train_step(model, optimizer, make_step_loss(config), x, y, config=config)
    for parameter, before, g in zip(model.parameters(), twin.parameters(), grads):
        expected = before.detach() - g * (1e-3 / (norm + 1e-6))
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-4, atol=1e-7)


def test_output_prior_starts_training_near_the_background_rate(store: str) -> None:
    """The first step's BCE: ~ln 2 from MONAI's init (p ≈ 0.5); from logit(0.1) about
    f·ln 10 + (1-f)·ln(10/9) ≈ 0.37 with this store's ~12 % lesion voxels per patch."""
    losses = {}
    for prior in (0.0, 0.1):
        config = small(store, steps=1, loss="bce", output_prior=prior, seed=1)
        context = LocalContext()
        run_worker(loop_config(config), context)
        losses[prior] = context.reports[0]["train_loss"]
    assert 0.4 < losses[0.0] < 1.2
    assert losses[0.1] < 0.6 * losses[0.0]


def test_progress_line_eta_and_shared_live_display() -> None:
    """ETA = steps left / rate (10 steps at 2 steps/s: 5 s); two runs in one process (the
    benchmark's parallel models) share rich's one live display instead of failing."""
    from noisyseg.distributed import progress

    record = progress.ProgressRecord("lop1", "step", 10, 20, 0.5, 0.01, 2.0)
    assert record.line() == (
        "[noisyseg train] step 10/20  loss 0.5000  lr 1.000e-02  2.00 steps/s  ETA 0:00:05  [lop1]"
    )
    assert progress.ProgressRecord("x", "step", 0, 7300, steps_per_s=1.0).eta() == "2:01:40"
    lines: list[str] = []
    plain = progress.ProgressDisplay(lines.append, live=False)
    plain.show(record)
    assert lines == [record.line()]
    first, second = progress.ProgressDisplay(live=True), progress.ProgressDisplay(live=True)
    first.show(record)
    second.show(progress.ProgressRecord("lop2", "step", 5, 20, 0.7, 0.01, 1.0))
    assert progress._bars is not None and len(progress._bars.tasks) == 2
    first.close()
    assert len(progress._bars.tasks) == 1
    second.close()
    assert progress._bars is None
