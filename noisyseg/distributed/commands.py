"""``noisyseg train``: every :class:`~noisyseg.distributed.config.TrainConfig` field is a flag."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb."""
    from noisyseg.distributed.config import add_config_arguments

    parser = subparsers.add_parser(
        "train",
        help="train a U-Net on Ray Train (DDP), tracked in MLflow",
        description=(
            "Train a lesion-segmentation U-Net with Ray Train (TorchTrainer, DDP) and log it to "
            "MLflow (MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db). Connects to RAY_ADDRESS "
            "when set, else starts a local Ray instance. Re-using --run-name resumes that run "
            "from its last checkpoint. Flags override the --config YAML file."
        ),
    )
    add_config_arguments(parser)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from noisyseg.distributed.config import check_against_store, config_from_args
    from noisyseg.distributed.trainer import run_training

    config = config_from_args(args)
    info = check_against_store(config)  # bad input fails here, before any Ray work
    run_training(config, store_info=info)
    return 0
