"""What the inference verbs (``evaluate``, ``predict``, ``audit``) share on the command line: the
sliding-window flags and the choice of store cases.

Light on purpose: the CLI loads every verb module for ``noisyseg --help``.
"""

from __future__ import annotations

import argparse
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


__all__ = ["add_window_args", "select_cases"]
