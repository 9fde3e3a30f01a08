"""The ``noisyseg`` command line.

Each verb lives with the module that implements it; a module exposes
``register(subparsers) -> None`` which adds its verbs with ``set_defaults(func=...)``.
``func(args) -> int`` returns the exit status. Heavy imports (Ray, MLflow, torch) happen inside
the verbs, so ``noisyseg --help`` stays fast.

A :class:`~noisyseg.errors.NoisysegInputError` (something the user typed or supplied) ends the
command with its one line on stderr and exit status 2; ``noisyseg --debug COMMAND`` (or
``NOISYSEG_DEBUG=1``) prints its traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.filesystems import describe_failure

#: Environment variable that turns on ``--debug`` (tracebacks for input errors).
DEBUG_ENV = "NOISYSEG_DEBUG"

# Modules that register verbs, in the order shown in --help.
_COMMAND_MODULES: list[str] = [
    "noisyseg.storage.commands",  # synth, ingest, corrupt, info
    "noisyseg.distributed.commands",  # train
    "noisyseg.distributed.inference_commands",  # evaluate
    "noisyseg.distributed.predict_commands",  # predict, register
    "noisyseg.audit.commands",  # audit
    "noisyseg.tuning.commands",  # tune
    "noisyseg.benchmarking.commands",  # benchmark, demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisyseg",
        description="Train lesion-segmentation U-Nets that stay sensitive under noisy annotations.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get(DEBUG_ENV, "") not in ("", "0"),
        help=f"show the full traceback of an input error (or set {DEBUG_ENV}=1)",
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
        return _input_error(args, str(error))
    except Exception as error:
        # A storage failure the user can fix (disk full, no credentials, endpoint down) that no
        # inner layer named: still one line, naming the path it concerns when there is one.
        rule = describe_failure(error)
        if rule is None:
            raise
        return _input_error(args, f"{_failure_place(args, error)}{rule}")
    except KeyboardInterrupt:
        print(f"noisyseg {args.command}: interrupted", file=sys.stderr)
        return 130


def _input_error(args: argparse.Namespace, line: str) -> int:
    """Print the one line of an input error (and the traceback with ``--debug``): status 2."""
    if args.debug:
        traceback.print_exc()
    print(f"noisyseg {args.command}: error: {line}", file=sys.stderr)
    return 2


def _failure_place(args: argparse.Namespace, error: BaseException) -> str:
    """``"<path>: "`` of a storage failure: the file it names, else the command's store."""
    place = getattr(error, "filename", None)
    for name in ("store", "destination", "output", "dest"):
        place = place or getattr(args, name, None)
    return f"{place}: " if place else ""


if __name__ == "__main__":
    sys.exit(main())
