"""U-Net factory over MONAI networks, 2D and 3D.

The networks output one **logit** channel for "lesion" (shape ``(N, 1, *spatial)``); the losses in
:mod:`noisyseg.losses` apply the sigmoid themselves. Spatial sizes of the input must be divisible
by ``prod(strides)`` (``2 ** (depth - 1)`` with the default strides of 2).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

NormName = Literal["instance", "batch", "group", "none"]


@dataclass(frozen=True)
class UNetSpec:
    """Everything needed to rebuild a network (stored in checkpoints and MLflow params).

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: image channels (e.g. 4 MRI sequences, 3 for RGB).
        out_channels: 1 (binary lesion logit).
        channels: feature maps per level, e.g. ``(16, 32, 64, 128)``; depth = its length.
        strides: downsampling per level transition; ``len(channels) - 1`` entries.
        num_res_units: residual units per block (MONAI ``UNet``).
        norm: ``instance`` (3D default, nnU-Net's choice), ``batch``, ``group`` or ``none``.
        dropout: dropout probability.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = field(default=())
    num_res_units: int = 2
    norm: NormName = "instance"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.channels) < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got channels={self.channels}")
        if not self.strides:
            object.__setattr__(self, "strides", (2,) * (len(self.channels) - 1))
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {self.strides}"
            )
        if self.norm not in ("instance", "batch", "group", "none"):
            raise ValueError(f"unknown norm {self.norm!r}")

    @property
    def divisor(self) -> int:
        """Input spatial sizes must be multiples of this."""
        result = 1
        for stride in self.strides:
            result *= stride
        return result

    def to_dict(self) -> dict:
        """Plain-data form (lists, not tuples), for YAML/JSON/checkpoints."""
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["strides"] = list(self.strides)
        return data


def _monai_norm(norm: NormName):
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": 8})
    return None


def build_unet(spec: UNetSpec | None = None, **overrides) -> nn.Module:
    """Build a MONAI ``UNet`` from a :class:`UNetSpec` (or keyword overrides of the default).

    Default: 3D, 1 input channel, 1 output logit, channels ``(16, 32, 64, 128)``, strides 2,
    two residual units, instance norm — the network DESIGN.md and the benchmarks time.

    Example::

        net = build_unet(spatial_dims=2, in_channels=3, channels=(16, 32, 64, 128, 256))
    """
    from monai.networks.nets import UNet

    if spec is None:
        spec = UNetSpec(**overrides)
    elif overrides:
        spec = UNetSpec(**{**spec.to_dict(), **overrides})
    return UNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=tuple(spec.channels),
        strides=tuple(spec.strides),
        num_res_units=spec.num_res_units,
        norm=_monai_norm(spec.norm),
        dropout=spec.dropout,
    )


def output_convolution(model: nn.Module, out_channels: int = 1) -> nn.Module:
    """The convolution that produces the logits: the last one (in module order) with
    ``out_channels`` outputs. In MONAI's U-Net that is the final conv of the top residual unit
    (whose skip is the identity), or the top transposed conv when ``num_res_units=0``."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.out_channels == out_channels:
            last = module
    if last is None or last.bias is None:
        raise ValueError(f"no biased convolution with {out_channels} output channels found")
    return last


def init_output_bias(model: nn.Module, prior: float, out_channels: int = 1) -> nn.Module:
    """Start the lesion logit at ``log(prior / (1 - prior))`` (Lin et al. 2017, "Focal Loss").

    With lesions at ~1 % of the voxels a default-initialised network starts at ``p ≈ 0.5`` and
    spends hundreds of steps (thousands with Adam's bounded step size) learning the background
    rate before it learns lesions; starting at the prior removes that phase. Only the output
    convolution's bias changes. Returns the model (changed in place).
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    conv = output_convolution(model, out_channels)
    with torch.no_grad():
        conv.bias.fill_(math.log(prior / (1.0 - prior)))
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network itself: ``model.module`` for ``DistributedDataParallel`` / ``DataParallel``
    (what ``ray.train.torch.prepare_model`` returns), else ``model`` unchanged."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


AmpName = Literal["none", "bf16", "fp16"]


def autocast(device: torch.device | str, amp: AmpName) -> contextlib.AbstractContextManager:
    """The mixed-precision context for a forward pass on ``device``.

    ``amp="none"``: no autocast (a null context; ops run in the inputs' dtype, float32).
    ``"bf16"`` / ``"fp16"``: ``torch.autocast`` on the device's type with that dtype (CUDA, and
    CPU where PyTorch supports it). Training allows AMP only with a GPU (``TrainConfig``);
    inference also accepts it on CPU. Logits should be cast back with ``.float()`` before the
    loss or the sigmoid.
    """
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
