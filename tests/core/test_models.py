"""U-Net factory: shapes, norms, spec round-trip and validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from noisyseg.models import (
    UNetSpec,
    autocast,
    build_unet,
    count_parameters,
    init_output_bias,
    output_convolution,
    unwrap_model,
)


def _norm_types(model: nn.Module) -> set[type]:
    return {
        type(m)
        for m in model.modules()
        if isinstance(
            m, (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
        )
    }


def test_default_is_3d_instance_norm_single_logit() -> None:
    spec = UNetSpec()
    assert spec.spatial_dims == 3 and spec.strides == (2, 2, 2) and spec.divisor == 8
    model = build_unet(spec, channels=(4, 8, 16, 32))
    assert _norm_types(model) == {nn.InstanceNorm3d}
    out = model(torch.randn(2, 1, 16, 24, 16))
    assert out.shape == (2, 1, 16, 24, 16)


def test_2d_multichannel_and_depth() -> None:
    model = build_unet(spatial_dims=2, in_channels=3, channels=(4, 8, 16, 32, 64), norm="batch")
    assert _norm_types(model) == {nn.BatchNorm2d}
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 1, 32, 48)
    deeper = build_unet(spatial_dims=2, channels=(4, 8, 16, 32, 64, 128))
    shallower = build_unet(spatial_dims=2, channels=(4, 8))
    assert count_parameters(deeper) > count_parameters(shallower)


def test_spec_round_trip_rebuilds_identical_network() -> None:
    spec = UNetSpec(spatial_dims=3, in_channels=4, channels=(4, 8, 16), num_res_units=1)
    torch.manual_seed(0)
    first = build_unet(spec)
    second = build_unet(UNetSpec(**spec.to_dict()))
    second.load_state_dict(first.state_dict())
    x = torch.randn(1, 4, 8, 8, 8)
    assert torch.equal(first(x), second(x))


def test_invalid_specs_rejected() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        UNetSpec(spatial_dims=4)
    with pytest.raises(ValueError, match="strides"):
        UNetSpec(channels=(4, 8, 16), strides=(2,))
    with pytest.raises(ValueError, match="at least 2 levels"):
        UNetSpec(channels=(4,))
    with pytest.raises(ValueError, match="norm"):
        UNetSpec(norm="layer")


@pytest.mark.parametrize("res_units", [0, 1, 2])
def test_output_bias_is_the_last_additive_term(res_units: int) -> None:
    """Moving the found bias by δ moves every output logit by exactly δ: it really is the
    output's bias (a bias feeding a norm or a nonlinearity would not shift outputs uniformly)."""
    torch.manual_seed(0)
    model = build_unet(spatial_dims=2, channels=(4, 8, 16), num_res_units=res_units).eval()
    x = torch.randn(2, 1, 16, 16)
    before = model(x)
    with torch.no_grad():
        output_convolution(model).bias += 0.75
    assert torch.allclose(model(x) - before, torch.full_like(before, 0.75), atol=1e-5)


def test_init_output_bias_starts_at_the_prior() -> None:
    torch.manual_seed(0)
    model = init_output_bias(build_unet(channels=(4, 8, 16)), 0.01)
    assert output_convolution(model).bias.item() == pytest.approx(math.log(0.01 / 0.99))
    p = torch.sigmoid(model(torch.randn(2, 1, 16, 16, 16)))
    # the rest of the network adds O(1) logits around the bias: p stays near the prior
    assert 0.001 < float(p.mean()) < 0.1
    untouched = build_unet(channels=(4, 8, 16))
    assert 0.2 < float(torch.sigmoid(untouched(torch.randn(2, 1, 16, 16, 16))).mean()) < 0.8
    with pytest.raises(ValueError, match="prior"):
        init_output_bias(model, 1.0)


def test_unwrap_model_returns_the_network_inside_a_wrapper() -> None:
    net = nn.Conv2d(1, 1, 1)
    assert unwrap_model(net) is net
    assert unwrap_model(nn.DataParallel(net)) is net


def test_autocast_none_keeps_float32_and_bf16_casts_on_cpu() -> None:
    conv = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(1, 1, 8, 8)
    with autocast("cpu", "none"):
        assert conv(x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="amp"):
        autocast("cpu", "fp8")  # type: ignore[arg-type]
