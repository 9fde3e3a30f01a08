"""Rates, scopes, boundary modes and their named levels: the checked parameters of label noise.

Named levels (:data:`BOUNDARY_LEVELS`), concrete parameters:

=================  ================  ===================  ================
mode               ``mild``          ``moderate``         ``severe``
=================  ================  ===================  ================
``polygon``        n_vertices = 16   n_vertices = 8       n_vertices = 5
``dilate``         k = 1             k = 2                k = 3
``erode``          k = 1             k = 2                k = 3
``dilate_erode``   k = 1             k = 2                k = 3
``jitter``         shift 1 vox,      shift 2 vox,         shift 3 vox,
                   rot 5°, scale 5%  rot 10°, scale 10%   rot 20°, scale 20%
``hull``           (no parameters)
``ellipsoid``      (no parameters)
=================  ================  ===================  ================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from noisyseg.errors import NoisysegInputError

Scope = Literal["dataset", "case"]
BOUNDARY_MODES: tuple[str, ...] = (
    "polygon",
    "hull",
    "ellipsoid",
    "dilate",
    "erode",
    "dilate_erode",
    "jitter",
)
SCOPES: tuple[str, ...] = ("dataset", "case")

_RING = {"mild": 1, "moderate": 2, "severe": 3}
#: Named boundary-noise levels → concrete parameters (see the module docstring table).
BOUNDARY_LEVELS: dict[str, dict[str, dict[str, Any]]] = {
    "polygon": {
        "mild": {"n_vertices": 16},
        "moderate": {"n_vertices": 8},
        "severe": {"n_vertices": 5},
    },
    "hull": {"mild": {}, "moderate": {}, "severe": {}},
    "ellipsoid": {"mild": {}, "moderate": {}, "severe": {}},
    "dilate": {name: {"k": k} for name, k in _RING.items()},
    "erode": {name: {"k": k} for name, k in _RING.items()},
    "dilate_erode": {name: {"k": k} for name, k in _RING.items()},
    "jitter": {
        "mild": {"max_shift_vox": 1.0, "max_rotation_deg": 5.0, "max_scale": 0.05},
        "moderate": {"max_shift_vox": 2.0, "max_rotation_deg": 10.0, "max_scale": 0.10},
        "severe": {"max_shift_vox": 3.0, "max_rotation_deg": 20.0, "max_scale": 0.20},
    },
}
_PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "polygon": ("n_vertices",),
    "hull": (),
    "ellipsoid": (),
    "dilate": ("k",),
    "erode": ("k",),
    "dilate_erode": ("k",),
    "jitter": ("max_shift_vox", "max_rotation_deg", "max_scale"),
}


def check_rate(rate: float, name: str = "rate") -> float:
    """Return ``rate`` as a float; NoisysegInputError unless it is a finite number in [0, 1]."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise NoisysegInputError(f"{name} must be a number in [0, 1], got {rate!r}") from None
    if not (0.0 <= value <= 1.0):  # NaN fails this too
        raise NoisysegInputError(f"{name} must be in [0, 1], got {rate!r}")
    return value


def resolve_boundary_params(
    mode: str, level: str | None, params: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Concrete parameters of boundary ``mode``: the named ``level``'s (default ``moderate``)
    or the explicit ``params``, checked (NoisysegInputError naming the rule broken)."""
    if mode not in BOUNDARY_MODES:
        raise NoisysegInputError(f"boundary mode must be one of {BOUNDARY_MODES}, got {mode!r}")
    if params is None:
        level = "moderate" if level is None else level
        if level not in BOUNDARY_LEVELS[mode]:
            raise NoisysegInputError(
                f"level must be one of {tuple(BOUNDARY_LEVELS[mode])}, got {level!r}"
            )
        resolved = dict(BOUNDARY_LEVELS[mode][level])
    else:
        resolved = dict(params)
        missing = [p for p in _PARAM_NAMES[mode] if p not in resolved]
        if missing:
            raise NoisysegInputError(f"mode {mode!r} needs parameters {missing}")
    return _checked_params(resolved)


def _checked_params(resolved: dict[str, Any]) -> dict[str, Any]:
    """``resolved`` with ``k`` and ``n_vertices`` made ints, every value range checked."""
    if "k" in resolved:
        k = resolved["k"]
        if int(k) != k or k < 0:
            raise NoisysegInputError(f"k must be a non-negative integer, got {k!r}")
        resolved["k"] = int(k)
    if "n_vertices" in resolved:
        n = resolved["n_vertices"]
        if int(n) != n or n < 3:
            raise NoisysegInputError(f"n_vertices must be an integer >= 3, got {n!r}")
        resolved["n_vertices"] = int(n)
    for name in ("max_shift_vox", "max_rotation_deg"):
        if name in resolved and not (math.isfinite(resolved[name]) and resolved[name] >= 0):
            raise NoisysegInputError(f"{name} must be finite and >= 0, got {resolved[name]!r}")
    if "max_scale" in resolved and not (0 <= resolved["max_scale"] < 1):
        raise NoisysegInputError(f"max_scale must be in [0, 1), got {resolved['max_scale']!r}")
    return resolved


__all__ = [
    "BOUNDARY_LEVELS",
    "BOUNDARY_MODES",
    "SCOPES",
    "Scope",
    "check_rate",
    "resolve_boundary_params",
]
