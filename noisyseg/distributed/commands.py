"""``noisyseg train``: every :class:`~noisyseg.distributed.config.TrainConfig` field is a flag."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from noisyseg.distributed.config import add_config_arguments, check_against_store, config_from_args
from noisyseg.errors import NoisysegInputError


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
    parser.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="register the final model in the MLflow Model Registry as a new version of NAME "
        "(see `noisyseg register`)",
    )
    parser.add_argument(
        "--alias", default=None, help="with --register: point this alias (e.g. champion) at it"
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
    if args.register:
        from noisyseg.distributed.registry import check_registry_names, register_run

        check_registry_names(args.register, args.alias)
    elif args.alias:
        raise NoisysegInputError("--alias needs --register NAME")
    _stop_on_sigterm()
    outcome = run_training(config, store_info=info, force_new=args.force_new, verbose=args.verbose)
    if args.register:
        done = register_run(
            outcome.run_id, args.register, alias=args.alias, tracking_uri=outcome.tracking_uri
        )
        print(f"[noisyseg train] registered as {done.uri} (version {done.version})")
    return 0
