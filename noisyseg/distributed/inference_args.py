"""What the inference verbs (``evaluate``, ``predict``, ``audit``) share on the command line: the
sliding-window flags, where the forward passes run (in-process, Ray Data actors, GPUs) and the
choice of store cases.

Light on purpose: the CLI loads every verb module for ``noisyseg --help``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from noisyseg.distributed.prediction_io import check_cases
from noisyseg.errors import NoisysegInputError


def add_window_args(parser: argparse.ArgumentParser, *, sw_batch_size: int | None = 4) -> None:
    """Add ``--roi-size``, ``--overlap``, ``--sw-batch-size``, ``--device`` and ``--amp``.

    ``sw_batch_size`` is the default of ``--sw-batch-size`` (None: the model's own); the window
    size and overlap default to the model's training config (``patch_size``, ``val_overlap``).
    """
    parser.add_argument(
        "--roi-size",
        type=int,
        nargs="+",
        metavar="N",
        help="sliding-window size (one value or one per axis; default: the training patch size)",
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="window overlap in [0, 1) (default: training val_overlap, else 0.25)",
    )
    parser.add_argument(
        "--sw-batch-size", type=int, default=sw_batch_size, help="windows per forward pass"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="autocast precision for the forward passes",
    )


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--workers``, ``--ray`` and ``--gpu``: how many models predict at once, and where."""
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="models predicting in parallel (Ray Data actors); "
        "1 runs in-process unless RAY_ADDRESS is set or --ray is given",
    )
    parser.add_argument("--ray", action="store_true", help="run on Ray even with one worker")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="one GPU per worker (joining a Ray cluster: each actor reserves one there, this "
        "machine needs none)",
    )


def check_parallel_args(args: argparse.Namespace) -> None:
    """Refuse a ``--workers`` below 1 (one line, before any work)."""
    if args.workers < 1:
        raise NoisysegInputError(f"--workers must be >= 1, got {args.workers}")


def uses_ray(args: argparse.Namespace) -> bool:
    """Whether the cases are predicted on Ray: ``--ray``, ``--workers > 1`` or ``RAY_ADDRESS``."""
    return bool(args.ray) or args.workers > 1 or bool(os.environ.get("RAY_ADDRESS"))


def resolve_device(device: str | None, gpu: bool = False, use_ray: bool = False) -> str:
    """The torch device of the forward passes.

    ``--gpu`` on a Ray cluster (``RAY_ADDRESS`` set) gives ``cuda`` unchecked: each actor
    reserves one GPU of the cluster (an autoscaler may still have to add the GPU nodes), the
    driver need not have one. Otherwise the GPUs are this machine's (in-process, or a local Ray
    instance) and the device is checked here, before any work: ``--gpu`` or ``--device cuda``
    without a local GPU, or a name torch does not know, is refused. Default (no flag): ``cuda``
    when this process sees a GPU, else ``cpu``.

    Raises:
        NoisysegInputError: the device is unknown or not present.
    """
    import torch  # heavy: imported by the verb only, so `noisyseg --help` stays fast

    if gpu and use_ray and os.environ.get("RAY_ADDRESS", "").strip():
        return "cuda"
    if gpu:
        device = "cuda"
    elif device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NoisysegInputError(f"device {device!r} requested but no CUDA GPU is available")
    try:
        torch.device(device)
    except RuntimeError:
        raise NoisysegInputError(f"unknown torch device {device!r}") from None
    return device


def select_cases(store: Any, cases: Sequence[str] | None, split: str) -> list[str]:
    """The given ``cases`` (checked: in the store, none twice), else every case of ``split``.

    Raises:
        NoisysegInputError: a given case is unknown or repeated, or ``split`` has no case.
    """
    if cases:
        return check_cases(store, cases, store_path=store.url)
    found = store.case_ids(split=split)
    if not found:
        raise NoisysegInputError(f"no cases in split {split!r}", path=store.url)
    return list(found)


__all__ = [
    "add_parallel_args",
    "add_window_args",
    "check_parallel_args",
    "resolve_device",
    "select_cases",
    "uses_ray",
]
