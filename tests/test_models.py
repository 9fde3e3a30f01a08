"""U-Net factory: shapes, norms, spec round-trip and validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisyseg.models import UNetSpec, build_unet, count_parameters


def _norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm))}


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
