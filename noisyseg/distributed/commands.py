"""``noisyseg train``: every :class:`~noisyseg.distributed.config.TrainConfig` field is a flag."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from noisyseg.distributed.config import add_config_arguments, check_against_store, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb."""
    parser = subparsers.add_parser(
        "train",
        help="train a U-Net on Ray Train (DDP), tracked in MLflow",
        description=(
            "Train a lesion-segmentation U-Net with Ray Train (TorchTrainer, DDP) and log it to "
            "MLflow (MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db). Connects to RAY_ADDRESS "
            "when set, else starts a local Ray instance. Re-using --run-name resumes that run "
            "from its newest complete checkpoint, provided the network, data and objective are "
            "the same and its MLflow run is on this tracking server; --force-new instead moves "
            "the earlier run directory aside (<name>.old-<time>) and starts afresh. Flags "
            "override the --config YAML file. Ray's and MLflow's own logs go to "
            "<run dir>/noisyseg.log unless --verbose."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--force-new",
        action="store_true",
        help="start a fresh run under an existing --run-name (the earlier run directory is "
        "renamed <name>.old-<time>, its MLflow run left as it is)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and MLflow's own output on the terminal",
    )
    parser.set_defaults(func=_train)


def _stop_on_sigterm() -> None:
    """``kill <pid>`` ends the launcher like Ctrl-C: one line, the MLflow run marked KILLED."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _train(args: argparse.Namespace) -> int:
    # The launcher imports Ray and torch: loaded only when the verb runs (keeps --help fast).
    from noisyseg.distributed.trainer import run_training

    config = config_from_args(args)
    info = check_against_store(config)  # bad input fails here, before any Ray work
    _stop_on_sigterm()
    run_training(config, store_info=info, force_new=args.force_new, verbose=args.verbose)
    return 0
