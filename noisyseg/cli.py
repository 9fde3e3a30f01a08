"""The ``noisyseg`` command line.

Each verb lives with the module that implements it; a module exposes
``register(subparsers) -> None`` which adds its verbs with ``set_defaults(func=...)``.
``func(args) -> int`` returns the exit status. Heavy imports (Ray, MLflow, torch) happen inside
the verbs, so ``noisyseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from noisyseg.errors import NoisysegInputError

# Modules that register verbs, in the order shown in --help.
_COMMAND_MODULES: list[str] = [
    "noisyseg.storage.commands",  # synth, ingest, corrupt, info
    "noisyseg.distributed.commands",  # train
    "noisyseg.distributed.inference_commands",  # evaluate, predict
    "noisyseg.tuning.commands",  # tune
    "noisyseg.benchmarking.commands",  # benchmark, demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisyseg",
        description="Train lesion-segmentation U-Nets that stay sensitive under noisy annotations.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only tolerate the command module itself being absent (a partial checkout);
            # a missing dependency inside it must surface.
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NoisysegInputError as error:
        print(f"noisyseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noisyseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
