"""``noisyseg tune``: Ray Tune sweeps over training config fields, tracked in MLflow.

Every ``noisyseg train`` flag is accepted and fixed for all trials; ``--space NAME=EXPR`` (or the
``search_space:`` section of the ``--config`` YAML) makes a field searched. A ``tune:`` section
of the YAML may hold the sweep options (``name``, ``metric``, ``metric_mode`` (or ``mode``), ``num_samples``,
``max_concurrent``, ``scheduler``, ``grace_period``, ``reduction_factor``, ``trial_cpus``,
``trial_max_failures``);
flags override it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from noisyseg.distributed.config import TrainConfig, add_config_arguments, load_yaml
from noisyseg.errors import NoisysegInputError
from noisyseg.tuning.space import parse_space

if TYPE_CHECKING:  # pragma: no cover
    from noisyseg.tuning.plan import SweepSettings

_TUNE_OPTIONS = {
    "name": str,
    "metric": str,
    "metric_mode": str,
    "num_samples": int,
    "max_concurrent": int,
    "scheduler": str,
    "grace_period": int,
    "reduction_factor": float,
    "trial_cpus": float,
    "trial_max_failures": int,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` verb."""
    parser = subparsers.add_parser(
        "tune",
        help="Ray Tune sweep (ASHA) over training fields; one MLflow child run per trial",
        description=(
            "Run a Ray Tune sweep: every trial launches a Ray Train TorchTrainer with the train "
            "flags given plus one point of the search space; ASHA stops poor trials early on a "
            "validation metric. MLflow: one parent run per sweep, one child run per trial "
            "(MLFLOW_TRACKING_URI must be an HTTP server for concurrent trials; without it the "
            "sweep starts its own local server). Re-running the same --name resumes the sweep. "
            "`noisyseg tune --best SWEEP` prints the best configuration as YAML."
        ),
    )
    group = parser.add_argument_group("sweep")
    group.add_argument("--name", default=None, help="sweep name (re-use it to resume)")
    _add_best_args(group)
    _add_search_args(group)
    add_config_arguments(parser)
    parser.set_defaults(func=_tune)


def _add_best_args(group: argparse._ArgumentGroup) -> None:
    """``--best``, ``--register``, ``--alias``: what to do with a finished sweep."""
    group.add_argument(
        "--best",
        metavar="SWEEP",
        default=None,
        help="print the best config of a finished sweep as YAML for `noisyseg train --config`",
    )
    group.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="with --best: register the best trial's model in the MLflow Model Registry as a "
        "new version of NAME (instead of printing its config)",
    )
    group.add_argument(
        "--alias", default=None, help="with --register: point this alias (e.g. champion) at it"
    )


def _add_search_args(group: argparse._ArgumentGroup) -> None:
    """The search space, its sampling, the metric and the ASHA scheduler's options."""
    group.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="NAME=EXPR",
        help="searched field, e.g. 'entropy_weight=uniform(0.8,0.99)', "
        "'clean_fraction=choice(0.05,0.1)', 'lr=grid(0.01,0.02)' (repeatable)",
    )
    group.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples of the space (grids are repeated per sample; default 1)",
    )
    group.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="most trials running at once (default and upper bound: as many as the Ray cluster "
        "can place, each trial holding its driver's and its workers' CPUs)",
    )
    group.add_argument(
        "--metric", default=None, help="metric ASHA and the best trial use (default val/ap)"
    )
    group.add_argument(
        "--metric-mode",
        dest="metric_mode",
        choices=["min", "max"],
        default=None,
        help="maximise or minimise --metric (default max; --mode is the bootstrap loss's mode)",
    )
    group.add_argument("--scheduler", choices=["asha", "fifo"], default=None, help="default asha")
    group.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: steps before a trial can be stopped (default: the first report, at most "
        "steps - 1)",
    )
    group.add_argument("--reduction-factor", type=float, default=None, help="ASHA (default 2)")
    group.add_argument(
        "--trial-cpus",
        type=float,
        default=None,
        help="CPUs reserved by each trial's driver actor (default 1; the Train "
        "workers reserve workers x cpus_per_worker themselves)",
    )
    group.add_argument(
        "--trial-max-failures",
        type=int,
        default=None,
        help="times Tune restarts a trial whose actor died, e.g. with its node (-1: without "
        "limit; default 0: the trial fails and re-running the command resumes it); a restarted "
        "trial resumes from its newest checkpoint. Fixed when the sweep starts. (--max-failures "
        "is Ray Train's: worker-group restarts inside a trial.)",
    )


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    """Merge the YAML (``search_space:``, ``tune:``, train fields) with the flags."""
    # The plan module loads MLflow and the metrics: only when the verb runs (`--help` stays fast).
    from noisyseg.tuning.plan import SweepSettings

    source = getattr(args, "config", None)
    data: dict[str, Any] = load_yaml(source) if source else {}
    yaml_space = data.pop("search_space", None)
    tune_section = data.pop("tune", None) or {}
    if not isinstance(tune_section, dict):
        raise NoisysegInputError("tune: must be a mapping of sweep options", path=source)
    options: dict[str, Any] = {}
    for key, value in tune_section.items():
        key = str(key).replace("-", "_")
        key = "metric_mode" if key == "mode" else key
        if key not in _TUNE_OPTIONS:
            raise NoisysegInputError(
                f"tune.{key}: unknown sweep option (known: {', '.join(_TUNE_OPTIONS)})", path=source
            )
        try:
            options[key] = _TUNE_OPTIONS[key](value)
        except (TypeError, ValueError):
            raise NoisysegInputError(f"tune.{key}: invalid value {value!r}", path=source) from None
    for key in _TUNE_OPTIONS:
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    for name in TrainConfig.model_fields:
        if hasattr(args, name):
            data[name] = getattr(args, name)
    if not options.get("name"):
        raise NoisysegInputError("--name SWEEP is required (or tune.name in the config)")
    space = parse_space(args.space, yaml_space, source=source)
    if "metric_mode" in options:
        options["mode"] = options.pop("metric_mode")
    return SweepSettings(base=data, space=space, source=source, **options)


def _tune(args: argparse.Namespace) -> int:
    # Ray Tune and MLflow load only when the verb runs (keeps `noisyseg --help` fast).
    from noisyseg.tuning.sweep import best_yaml_of, run_sweep

    if args.register or args.alias:
        if not args.best or not args.register:
            raise NoisysegInputError("--register NAME [--alias A] goes with --best SWEEP")
        return _register_best(args)
    if args.best:
        print(best_yaml_of(args.best, getattr(args, "storage_path", None)), end="")
        return 0
    outcome = run_sweep(settings_from_args(args))
    if outcome.interrupted:
        return 130
    if outcome.best is not None:
        print(
            f"[noisyseg tune] best trial {outcome.best['trial_id']}: "
            f"`noisyseg tune --best {outcome.sweep_dir}` prints its config"
        )
    return 1 if any(r["status"] == "error" for r in outcome.rows) else 0


def _register_best(args: argparse.Namespace) -> int:
    """Register the best trial of a finished sweep (the parent run's ``best_run_id`` tag) on the
    sweep's tracking server: ``MLFLOW_TRACKING_URI``, else the sweep's own server, restarted on
    its database for the call."""
    from mlflow import MlflowClient

    from noisyseg.distributed.registry import check_registry_names, register_run
    from noisyseg.tuning.sweep import find_sweep_dir, read_state, resolve_sweep_tracking

    check_registry_names(args.register, args.alias)
    sweep_dir = find_sweep_dir(args.best, getattr(args, "storage_path", None))
    state = read_state(sweep_dir)
    uri, server = resolve_sweep_tracking(sweep_dir, 1)
    try:
        parent = MlflowClient(uri).get_run(state["parent_run_id"])
        run_id = parent.data.tags.get("best_run_id")
        if not run_id:
            raise NoisysegInputError(
                f"sweep {args.best!r} has no best trial yet (unfinished?)", path=sweep_dir.url
            )
        done = register_run(run_id, args.register, alias=args.alias, tracking_uri=uri)
    finally:
        if server is not None:
            server.stop()
    print(f"[noisyseg tune] best run {run_id} registered as {done.uri} (version {done.version})")
    return 0
