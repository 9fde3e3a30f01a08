"""Search spaces for ``noisyseg tune``: parsed safely (no ``eval``), validated against TrainConfig.

A search space maps :class:`~noisyseg.distributed.config.TrainConfig` field names to a
*distribution*, written as a small call expression::

    entropy_weight=loguniform(0.01, 0.9)      # log-uniform on [0.01, 0.9)
    clean_fraction=choice(0.05, 0.1)          # or choice([0.05, 0.1])
    lr=uniform(1e-3, 1e-2)   steps=quniform(100, 400, 100)   seed=randint(0, 5)
    loss=grid(bce, lopsided)                  # grid_search: every value, once per sample

Functions: ``uniform(lo, hi)``, ``loguniform(lo, hi[, base])``, ``quniform(lo, hi, q)``,
``qloguniform(lo, hi, q)``, ``randint(lo, hi)`` (``hi`` excluded), ``qrandint(lo, hi, q)``,
``choice(v, ...)``, ``grid(v, ...)`` / ``grid_search(v, ...)``. Arguments are Python literals
(numbers, strings, ``True``/``False``/``None``, lists); a bare word such as ``lopsided`` is read as
the string ``"lopsided"``. The expression is parsed with :mod:`ast` and only these forms are
accepted — nothing is evaluated.

:func:`parse_space` turns ``--space NAME=EXPR`` flags and the YAML ``search_space:`` mapping into a
:class:`SearchSpace`; :meth:`SearchSpace.validate` builds a TrainConfig for every *probe* point
(each distribution's end points, every choice/grid value) before any Ray work, so a value outside
a field's range or a field combination pydantic rejects fails with one line.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from noisyseg.distributed.config import TrainConfig, check_against_store, make_config
from noisyseg.errors import NoisysegInputError

# name -> (min args, max args or None)
_ARITY: dict[str, tuple[int, int | None]] = {
    "uniform": (2, 2),
    "loguniform": (2, 3),
    "quniform": (3, 3),
    "qloguniform": (3, 3),
    "randint": (2, 2),
    "qrandint": (3, 3),
    "choice": (1, None),
    "grid": (1, None),
    "grid_search": (1, None),
}
_CONTINUOUS = {"uniform", "loguniform", "quniform", "qloguniform"}
_INTEGER = {"randint", "qrandint"}
_DISCRETE = {"choice", "grid", "grid_search"}

#: Fields the sweep itself sets for every trial; searching them makes no sense.
RESERVED_FIELDS = frozenset({"run_name", "storage_path", "experiment", "store"})


@dataclass(frozen=True)
class Dimension:
    """One searched field: ``kind`` is the function name (``grid_search`` normalised to ``grid``)."""

    name: str
    kind: str
    args: tuple[Any, ...]
    text: str

    @property
    def values(self) -> tuple[Any, ...]:
        """The candidate values of ``choice``/``grid`` (empty for distributions)."""
        return self.args if self.kind in ("choice", "grid") else ()

    def to_tune(self) -> Any:
        """The ``ray.tune`` search-space object."""
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1], *a[2:])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "qloguniform":
            return tune.qloguniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "qrandint":
            return tune.qrandint(a[0], a[1], a[2])
        if self.kind == "choice":
            return tune.choice(list(a))
        return tune.grid_search(list(a))

    def probes(self) -> list[Any]:
        """Values checked before launching: the end points, or every discrete value."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high - 1]
        if self.kind == "qrandint":
            q = self.args[2]
            return [int(math.ceil(low / q) * q), int(math.floor(high / q) * q)]
        if self.kind in ("quniform", "qloguniform"):
            q = self.args[2]
            return [math.ceil(low / q) * q, math.floor(high / q) * q]
        return [low, high]


class SearchSpace:
    """An ordered mapping of field name -> :class:`Dimension`."""

    def __init__(self, dimensions: Iterable[Dimension] = ()) -> None:
        self.dimensions: dict[str, Dimension] = {}
        for dim in dimensions:
            self.dimensions[dim.name] = dim

    def __len__(self) -> int:
        return len(self.dimensions)

    def __contains__(self, name: object) -> bool:
        return name in self.dimensions

    @property
    def names(self) -> list[str]:
        return list(self.dimensions)

    def to_tune(self) -> dict[str, Any]:
        """``param_space`` for ``ray.tune.Tuner``."""
        return {name: dim.to_tune() for name, dim in self.dimensions.items()}

    def describe(self) -> dict[str, str]:
        """``{field: expression}`` as the user wrote it (MLflow params of the parent run)."""
        return {name: dim.text for name, dim in self.dimensions.items()}

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid dimensions' sizes (1 without grids)."""
        size = 1
        for dim in self.dimensions.values():
            if dim.kind == "grid":
                size *= len(dim.args)
        return size

    def probe_points(self) -> list[dict[str, Any]]:
        """Points covering every probe value of every dimension (others at their first probe)."""
        first = {name: dim.probes()[0] for name, dim in self.dimensions.items()}
        points = [dict(first)]
        for name, dim in self.dimensions.items():
            for value in dim.probes()[1:]:
                points.append({**first, name: value})
        return points

    def validate(
        self,
        base: Mapping[str, Any],
        *,
        source: str | None = None,
        check_store: bool = True,
    ) -> list[Any]:
        """Build a TrainConfig for every probe point (and check it against the store).

        Returns the validated configs (the first is the sweep's representative config).
        Raises NoisysegInputError naming the field, the value and the rule broken.
        """

        if not self.dimensions:
            raise NoisysegInputError(
                "empty search space: give --space NAME=EXPR or a search_space: section", path=source
            )
        configs = []
        checked: set[str] = set()
        for point in self.probe_points():
            try:
                config = make_config({**base, **point}, source=source)
                key = config.model_dump_json()
                if check_store and key not in checked:
                    checked.add(key)
                    check_against_store(config)
                    if config.reweight != "none":
                        # the clean subset must exist among the cases flagged clean
                        config.draw_clean_cases()
            except NoisysegInputError as error:
                shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise NoisysegInputError(
                    f"search point ({shown}) is invalid: {error.rule}",
                    case=error.case,
                    path=error.path or source,
                ) from None
            configs.append(config)
        return configs


# ---------------------------------------------------------------------------------- parsing
def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Name):  # a bare word: a string value (choice(bce, lopsided))
        return {"True": True, "False": False, "None": None}.get(node.id, node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item, text) for item in node.elts]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(f"{ast.unparse(node)!r} is not a literal value") from None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def parse_expression(name: str, text: str) -> Dimension:
    """Parse one distribution expression such as ``loguniform(0.01, 0.9)`` (no ``eval``)."""
    stripped = str(text).strip()
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {stripped!r}; expected e.g. uniform(0.1, 0.9)") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ValueError(
            f"{stripped!r} is not a function call; use one of {', '.join(sorted(_ARITY))}"
        )
    kind = call.func.id
    if kind not in _ARITY:
        raise ValueError(f"unknown function {kind!r}; use one of {', '.join(sorted(_ARITY))}")
    if call.keywords:
        raise ValueError(f"{kind}() takes positional arguments only")
    args = [_literal(arg, stripped) for arg in call.args]
    if kind == "grid_search":
        kind = "grid"
    if kind in ("choice", "grid") and len(args) == 1 and isinstance(args[0], list):
        args = list(args[0])
    low_arity, high_arity = _ARITY[kind]
    if len(args) < low_arity or (high_arity is not None and len(args) > high_arity):
        expected = str(low_arity) if low_arity == high_arity else f"{low_arity} or more"
        if high_arity is not None and high_arity != low_arity:
            expected = f"{low_arity} to {high_arity}"
        raise ValueError(f"{kind}() takes {expected} arguments, got {len(args)}")
    if kind in _CONTINUOUS or kind in _INTEGER:
        low = _number(args[0], f"{kind} lower bound")
        high = _number(args[1], f"{kind} upper bound")
        if not low < high:
            raise ValueError(f"{kind} needs lower < upper, got {low} and {high}")
        if kind in _INTEGER and not all(isinstance(a, int) for a in args):
            raise ValueError(f"{kind} takes integers, got {stripped}")
        if kind in ("loguniform", "qloguniform") and low <= 0:
            raise ValueError(f"{kind} needs a positive lower bound, got {low}")
        if len(args) == 3:
            step = _number(args[2], f"{kind} step/base")
            if step <= 0:
                raise ValueError(f"{kind} needs a positive third argument, got {step}")
            if kind in ("quniform", "qloguniform", "qrandint") and step > high - low:
                raise ValueError(f"{kind} step {step} is wider than the range [{low}, {high}]")
    else:
        if not args:
            raise ValueError(f"{kind}() needs at least one value")
        seen: list[Any] = []
        for value in args:
            if value in seen:
                raise ValueError(f"{kind}() lists {value!r} twice")
            seen.append(value)
    return Dimension(name=name, kind=kind, args=tuple(args), text=stripped)


def _field_name(raw: str, source: str | None) -> str:

    name = raw.strip().replace("-", "_")
    if name not in TrainConfig.model_fields:
        raise NoisysegInputError(
            f"search space: {name!r} is not a training config field", path=source
        )
    if name in RESERVED_FIELDS:
        raise NoisysegInputError(
            f"search space: {name!r} is set by the sweep itself and cannot be searched",
            path=source,
        )
    return name


def _from_yaml_value(name: str, value: Any) -> Dimension:
    if isinstance(value, str):
        return parse_expression(name, value)
    if isinstance(value, Mapping) and len(value) == 1:
        ((kind, values),) = value.items()
        if not isinstance(values, list):
            values = [values]
        text = f"{kind}({', '.join(repr(v) for v in values)})"
        return parse_expression(name, text)
    raise ValueError(
        "expected an expression such as 'loguniform(0.01, 0.9)' or a mapping like "
        "{grid_search: [0.1, 0.5]}"
    )


def parse_space(
    flags: Iterable[str] = (),
    yaml_section: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
) -> SearchSpace:
    """Merge the YAML ``search_space:`` mapping with ``--space NAME=EXPR`` flags (flags win)."""
    dims: dict[str, Dimension] = {}
    if yaml_section is not None:
        if not isinstance(yaml_section, Mapping):
            raise NoisysegInputError(
                "search_space must be a mapping of field: expression", path=source
            )
        for raw, value in yaml_section.items():
            name = _field_name(str(raw), source)
            try:
                dims[name] = _from_yaml_value(name, value)
            except ValueError as error:
                raise NoisysegInputError(f"search_space.{name}: {error}", path=source) from None
    for flag in flags:
        if "=" not in flag:
            raise NoisysegInputError(
                f"--space {flag!r}: expected NAME=EXPR, e.g. lr=uniform(0.001,0.01)"
            )
        raw, text = flag.split("=", 1)
        name = _field_name(raw, None)
        try:
            dims[name] = parse_expression(name, text)
        except ValueError as error:
            raise NoisysegInputError(f"--space {flag!r}: {error}") from None
    return SearchSpace(dims.values())
