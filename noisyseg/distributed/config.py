"""Training configuration: one pydantic model, loadable from YAML, every field a CLI flag.

:class:`TrainConfig` holds everything a training run needs. It is validated twice before any Ray
work starts:

1. field by field and across fields by pydantic (:meth:`TrainConfig.model_validate`), e.g. rates
   in ``[0, 1]``, ``clean_fraction`` xor ``clean_count`` when ``reweight != "none"``, AMP only on GPU;
   local paths (``store``, ``storage_path``) become absolute where they are typed (Ray Train V2
   runs workers in the run folder);
2. against the store (:func:`check_against_store`): the store opens, the label set and the
   validation split exist, the clean subset fits, the patch matches the store's dimensionality and
   the network's downsampling and is no larger than the smallest training volume (refused, not
   clamped: the error names the largest patch that fits).

Every failure is a :class:`~noisyseg.errors.NoisysegInputError` (one line). The launcher
(:mod:`.trainer`) and the workers trust a config that passed both.

Command line: :func:`add_config_arguments` derives a flag from every field (``entropy_weight`` ->
``--entropy-weight``, booleans ``--gpu/--no-gpu``, tuples take several values); flags given on
the command line override the YAML file given with ``--config``; :func:`config_from_args` merges
both.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from noisyseg.errors import NoisysegInputError
from noisyseg.losses import DEFAULT_ENTROPY_WEIGHT
from noisyseg.storage.clean_subset import select_clean_cases
from noisyseg.storage.store import VolumeStore

LossName = Literal["bce", "dicebce", "bootstrap", "lopsided"]
ReweightName = Literal["none", "meta", "meta-head"]
#: nnU-Net clips every step's gradient norm at 12 (``nnUNetTrainer.train_step``); mean-loss
#: gradients here stay far below it (0.006-0.09 on the brain phantoms), so it only stops spikes.
NNUNET_GRAD_CLIP_NORM = 12.0
#: Meta reweighting puts the unit weight mass on the few voxels whose gradients agree with the
#: clean one, so its update is 30-300x the mean loss's (median norm 0.2-2.6, spikes to 16, on
#: the brain phantoms); unclipped, nnU-Net's SGD (lr 1e-2, momentum 0.99) drives the network to
#: a constant output within ~150 steps, from which first-order weights cannot recover
#: (docs/training.md, issue 12). Clipping at 1 was not enough in every seed; 0.1 (a few times
#: the mean loss's norm) kept the quick brain run at the baseline's max sensitivity.
META_GRAD_CLIP_NORM = 0.1
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TrainConfig(BaseModel):
    """One training run. Units: learning rates per step, sizes in voxels, fractions in ``[0, 1]``.

    Defaults follow nnU-Net (SGD, lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5, poly
    schedule with exponent 0.9, instance norm).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- data
    store: str = Field(description="Zarr store path or URL (made by `noisyseg synth|ingest`)")
    labels: str = Field("truth", description="label set to train on (e.g. censor-random-0.50-s0)")
    val_split: str = Field("val", description="split used for validation during training")
    val_labels: str = Field("truth", description="label set validation is scored against")
    val_cases: int = Field(2, ge=0, description="validation cases scored each time (0: none)")
    foreground_fraction: float = Field(
        1 / 3, ge=0.0, le=1.0, description="fraction of patches centred on a labelled lesion"
    )
    num_dataloader_workers: int = Field(0, ge=0, description="DataLoader processes per worker")

    # --- loss
    loss: LossName = Field("bce", description="bce | dicebce | bootstrap | lopsided")
    entropy_weight: float = Field(
        DEFAULT_ENTROPY_WEIGHT,
        ge=0.0,
        le=1.0,
        description="lopsided bootstrap entropy weight (lambda; soft mode needs > 0.78 to keep "
        "confident predictions on unlabelled lesions)",
    )
    beta: float = Field(0.95, ge=0.0, le=1.0, description="Reed bootstrap label weight")
    mode: Literal["soft", "hard"] = Field("soft", description="bootstrap target: soft | hard")

    # --- meta pixel reweighting
    reweight: ReweightName = Field("none", description="none | meta | meta-head")
    clean_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="fraction of training cases used as the clean set"
    )
    clean_count: int | None = Field(None, ge=1, description="number of clean cases")
    train_subset: Literal["all", "clean"] = Field(
        "all",
        description="all: every training case; clean: only the clean subset "
        "(clean_fraction/clean_count), e.g. the clean-only baseline",
    )
    inner_lr: float = Field(1.0, gt=0.0, description="virtual-step learning rate (alpha)")
    # the clean stream (defaults = noisyseg.storage.patches.DEFAULT_CLEAN_* and clean_subset.DEFAULT_CLEAN_MIN_CASES, test_patches checks)
    clean_min_cases: int = Field(
        3, ge=1, description="fewest clean cases a clean_fraction subset gets (when flagged)"
    )
    clean_batch_size: int | None = Field(
        None, ge=1, description="clean patches per worker per step (default, minimum: batch_size)"
    )
    clean_selection: Literal["lesion-rich", "random"] = Field(
        "lesion-rich",
        description="clean subset drawn from the lesion-richer half of the cases flagged clean "
        "(lesion-rich) or from all of them (random)",
    )
    clean_foreground_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="fraction of clean patches centred on a lesion"
    )
    clean_foreground_sampling: Literal["lesion", "voxel"] = Field(
        "voxel", description="clean lesion-centred patches: by lesion or by lesion voxel"
    )
    class_balanced_clean: bool = Field(
        False,
        description="deviation from the papers: class-balanced clean BCE instead of mean BCE",
    )

    # --- network (spatial_dims and in_channels come from the store)
    channels: tuple[int, ...] = Field((16, 32, 64, 128), description="feature maps per level")
    strides: tuple[int, ...] | None = Field(None, description="downsampling per level (default 2s)")
    num_res_units: int = Field(2, ge=0, description="residual units per U-Net block")
    norm: Literal["instance", "batch", "group", "none"] = Field("instance", description="norm")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    output_prior: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="initial lesion probability: the output bias starts at logit(prior), "
        "as in RetinaNet (0: MONAI's default init, p ≈ 0.5 everywhere)",
    )

    # --- optimisation
    patch_size: int | tuple[int, ...] = Field(64, description="patch edge (int) or per-axis sizes")
    batch_size: int = Field(2, ge=1, description="patches per worker per step")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd | adamw")
    lr: float = Field(1e-2, gt=0.0, description="initial learning rate")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD)")
    weight_decay: float = Field(3e-5, ge=0.0, description="weight decay")
    grad_clip_norm: float | None = Field(
        None,
        gt=0.0,
        description="clip the gradient's global L2 norm before each step; default: "
        "12 (nnU-Net) for standard steps, 0.1 for meta reweighting (its weighted gradients are "
        "30-300x the mean loss's: docs/training.md)",
    )
    lr_schedule: Literal["poly", "constant", "cosine"] = Field("poly", description="LR schedule")
    poly_exponent: float = Field(0.9, gt=0.0, description="poly schedule exponent")
    steps: int = Field(1000, ge=1, description="total optimiser steps")
    val_interval: int = Field(100, ge=0, description="validate every N steps (0: only at end)")
    checkpoint_interval: int = Field(100, ge=1, description="checkpoint every N steps")
    num_checkpoints_to_keep: int = Field(2, ge=1, description="Ray checkpoints kept")
    log_interval: int = Field(10, ge=1, description="terminal progress line every N steps")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision (GPU only)")
    seed: int = Field(0, ge=0, description="random seed")
    val_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="sliding-window overlap")
    val_sw_batch_size: int = Field(4, ge=1, description="sliding-window batch size")

    # --- Ray
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes)")
    gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="logical CPUs reserved per worker")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts (-1: unlimited)")
    run_name: str | None = Field(None, description="stable run name (re-use it to resume)")
    experiment: str = Field("noisyseg", description="MLflow experiment name")
    storage_path: str | None = Field(
        None, description="Ray Train storage for checkpoints (default ~/ray_results)"
    )

    # ------------------------------------------------------------------ validators
    @field_validator("store", "storage_path")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        """A local path becomes absolute here, where it was typed: Ray Train V2 runs each worker
        in the run folder, where a relative path would name something else. URLs stay as given."""
        if value is None or "://" in value:
            return value
        return str(Path(value).expanduser().absolute())

    @field_validator("patch_size", mode="before")
    @classmethod
    def _patch_size_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\sx]+", value) if v]
        if isinstance(value, (list, tuple)) and len(value) == 1:
            return value[0]
        return value

    @field_validator("channels", "strides", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in re.split(r"[,\s]+", value) if v]
        if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
            return [v for v in re.split(r"[,\s]+", value[0]) if v]
        return value

    @field_validator("patch_size")
    @classmethod
    def _patch_positive(cls, value: int | tuple[int, ...]) -> int | tuple[int, ...]:
        sizes = (value,) if isinstance(value, int) else value
        if not sizes or any(s < 1 for s in sizes) or len(sizes) not in (1, 2, 3):
            raise ValueError(f"patch_size must be 1 to 3 positive sizes, got {value}")
        return value

    @field_validator("channels")
    @classmethod
    def _channels_ok(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) < 2 or any(c < 1 for c in value):
            raise ValueError(f"channels needs at least 2 positive entries, got {value}")
        return value

    @field_validator("run_name")
    @classmethod
    def _run_name_safe(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_NAME.match(value):
            raise ValueError(
                f"run_name {value!r} must be 1-128 characters of letters, digits, '.', '_', '-' "
                "and start with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.reweight != "none" and self.clean_fraction is None and self.clean_count is None:
            raise ValueError(
                f"reweight={self.reweight} needs a clean subset: give clean_fraction or clean_count"
            )
        if self.clean_fraction is not None and self.clean_count is not None:
            raise ValueError("clean_fraction and clean_count are mutually exclusive; give one")
        if self.reweight != "none" and self.loss == "dicebce":
            raise ValueError(
                f"reweight={self.reweight} needs a voxel-separable loss (bce, bootstrap or "
                "lopsided): dicebce spreads a per-sample Dice term over the voxels"
            )
        if self.clean_batch_size is not None and self.clean_batch_size < self.batch_size:
            raise ValueError(
                f"clean_batch_size ({self.clean_batch_size}) must be >= batch_size "
                f"({self.batch_size})"
            )
        uses_clean_subset = self.reweight != "none" or self.train_subset == "clean"
        if not uses_clean_subset and (
            self.clean_fraction is not None or self.clean_count is not None
        ):
            raise ValueError(
                "clean_fraction/clean_count only apply with reweight=meta or meta-head "
                "or train_subset=clean"
            )
        if self.train_subset == "clean":
            if self.reweight != "none":
                raise ValueError(
                    "train_subset=clean trains on clean labels only: use reweight=none"
                )
            if self.clean_fraction is None and self.clean_count is None:
                raise ValueError("train_subset=clean needs clean_fraction or clean_count")
        if self.amp != "none" and not self.gpu:
            raise ValueError(f"amp={self.amp} needs a GPU (--gpu); on CPU use amp=none")
        if self.amp != "none" and self.reweight != "none":
            raise ValueError("amp is not supported with meta reweighting (forward-mode AD)")
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {self.strides}"
            )
        return self

    # ------------------------------------------------------------------ derived values
    def unet_strides(self) -> tuple[int, ...]:
        """Strides of the network (2 per level transition unless given)."""
        return self.strides if self.strides is not None else (2,) * (len(self.channels) - 1)

    def effective_grad_clip_norm(self) -> float:
        """The gradient-norm clip in force: ``grad_clip_norm``, else the default of the step
        kind (:data:`NNUNET_GRAD_CLIP_NORM` standard, :data:`META_GRAD_CLIP_NORM` meta)."""
        if self.grad_clip_norm is not None:
            return self.grad_clip_norm
        return NNUNET_GRAD_CLIP_NORM if self.reweight == "none" else META_GRAD_CLIP_NORM

    def patch_shape(self, spatial_dims: int) -> tuple[int, ...]:
        """Patch size per spatial axis (an int is broadcast to every axis)."""
        if isinstance(self.patch_size, int):
            return (self.patch_size,) * spatial_dims
        if len(self.patch_size) != spatial_dims:
            raise NoisysegInputError(
                f"patch_size {list(self.patch_size)} has {len(self.patch_size)} axes but the "
                f"store is {spatial_dims}D",
                path=self.store,
            )
        return tuple(self.patch_size)

    def unet_spec(self, spatial_dims: int, in_channels: int):
        """The :class:`~noisyseg.models.UNetSpec` for a store's dimensionality and channels."""
        from noisyseg.models import UNetSpec

        return UNetSpec(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            channels=tuple(self.channels),
            strides=self.unet_strides(),
            num_res_units=self.num_res_units,
            norm=self.norm,
            dropout=self.dropout,
        )

    def draw_clean_cases(self, store: Any = None) -> list[str]:
        """The clean subset the workers draw from the training split (the run's seed, size,
        minimum and selection): :func:`select_clean_cases` on ``store`` (an open store, or
        None for ``self.store``)."""
        return select_clean_cases(
            self.store if store is None else store,
            fraction=self.clean_fraction,
            count=self.clean_count,
            seed=self.seed,
            split="train",
            min_count=self.clean_min_cases,
            selection=self.clean_selection,
        )

    def flat_params(self) -> dict[str, str]:
        """Every field as a string, for MLflow params (``None`` as ``"none"``)."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(mode="json").items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            out[key] = "none" if value is None else str(value)
        return out


# ---------------------------------------------------------------------------------- loading
def _one_line(error: ValidationError, source: str | None) -> NoisysegInputError:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{where}: {message}")
    return NoisysegInputError("invalid training config: " + "; ".join(parts), path=source)


def make_config(data: dict[str, Any], *, source: str | None = None) -> TrainConfig:
    """Validate a plain dict into a :class:`TrainConfig`; errors become one NoisysegInputError."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise _one_line(error, source) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (``-`` in keys accepted as ``_``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NoisysegInputError("config file not found", path=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise NoisysegInputError(
            f"not valid YAML ({error.__class__.__name__})", path=str(path)
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NoisysegInputError("config file must hold a mapping of fields", path=str(path))
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Load a YAML config file, apply keyword overrides, validate."""
    data = load_yaml(path)
    data.update(overrides)
    return make_config(data, source=str(path))


# ---------------------------------------------------------------------------------- CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(a) for a in typing.get_args(annotation))
    return False


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE.yaml`` and one flag per :class:`TrainConfig` field.

    Flags default to ``argparse.SUPPRESS`` so only what is typed overrides the YAML file; values
    stay strings and pydantic converts them (``"0.3"`` -> 0.3).
    """
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML file of config fields; flags given on the command line override it",
    )
    for name, field in TrainConfig.model_fields.items():
        annotation = field.annotation
        help_text = field.description or ""
        if field.is_required():
            help_text += " (required)"
        else:
            help_text += f" (default: {field.default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": name}
        if _is_bool(annotation):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_sequence(annotation):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "N"
        elif (choices := _choices(annotation)) is not None:
            kwargs["choices"] = choices
        parser.add_argument(_flag(name), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge ``--config`` YAML (if any) with the flags typed; validate."""
    data: dict[str, Any] = {}
    source = getattr(args, "config", None)
    if source:
        data.update(load_yaml(source))
    for name in TrainConfig.model_fields:
        if hasattr(args, name):
            data[name] = getattr(args, name)
    return make_config(data, source=source)


# ---------------------------------------------------------------------------------- store check
class StoreInfo(BaseModel):
    """What the training launch learned from the store (plain data, sent to workers)."""

    spatial_dims: int
    in_channels: int
    channel_names: list[str]
    patch_shape: list[int]
    train_cases: int
    val_case_ids: list[str]


def check_patch_fits(
    store: Any, case_ids: list[str], patch: tuple[int, ...], divisor: int, where: str
) -> None:
    """Refuse a patch larger than the smallest training volume on some axis.

    A patch larger than a volume would be zero-padded (and its memory paid) for nothing; the
    error names the smallest volume and the largest patch that fits (rounded down to the
    network's ``divisor``).
    """
    index = store.index()
    shapes = {
        str(case): tuple(int(n) for n in shape)
        for case, shape in zip(index["case_id"], index["shape"])
        if str(case) in set(case_ids)
    }
    if not shapes:
        return
    smallest = [min(shape[axis] for shape in shapes.values()) for axis in range(len(patch))]
    if all(p <= m for p, m in zip(patch, smallest)):
        return
    axis = next(a for a, (p, m) in enumerate(zip(patch, smallest)) if p > m)
    case = min(shapes, key=lambda c: shapes[c][axis])
    fits = [max(divisor, m // divisor * divisor) for m in smallest]
    raise NoisysegInputError(
        f"patch_size {list(patch)} is larger than training case {case} "
        f"({'x'.join(map(str, shapes[case]))} voxels) on axis {axis}; the largest patch that "
        f"fits every training case is {fits} (multiples of the network's stride {divisor})",
        path=where,
    )


def check_against_store(config: TrainConfig) -> StoreInfo:
    """Open the store and check the config fits it; raise NoisysegInputError when not.

    Checks: the store opens; the training label set and the validation label set exist; the
    training split has cases; the clean subset is no larger than the training cases (and leaves
    some noisy cases); patch axes = store dimensionality; each patch size is a multiple of the
    network's total stride and fits the smallest training volume; the validation split has cases
    when validation is on.
    """

    try:
        store = VolumeStore.open(config.store)
    except NoisysegInputError:
        raise
    except (FileNotFoundError, OSError, ValueError, KeyError) as error:
        raise NoisysegInputError(
            f"cannot open store ({error.__class__.__name__}: {error})", path=config.store
        ) from None
    label_sets = set(store.label_sets())
    for label_set in (config.labels, config.val_labels):
        if label_set not in label_sets:
            raise NoisysegInputError(
                f"label set {label_set!r} not in store (has: {', '.join(sorted(label_sets))})",
                path=config.store,
            )
    train_ids = list(store.case_ids(split="train"))
    if not train_ids:
        raise NoisysegInputError("store has no cases in split 'train'", path=config.store)
    if config.reweight != "none" or config.train_subset == "clean":
        # The same draw the workers make (seed = config.seed): fails when too few cases are
        # flagged clean in the store.
        clean = config.draw_clean_cases(store)
        if config.reweight != "none" and len(clean) >= len(train_ids):
            raise NoisysegInputError(
                f"clean subset of {len(clean)} cases leaves no noisy cases out of "
                f"{len(train_ids)} training cases",
                path=config.store,
            )
    spatial_dims = int(store.spatial_dims)
    patch = config.patch_shape(spatial_dims)
    divisor = 1
    for stride in config.unet_strides():
        divisor *= stride
    if any(p % divisor for p in patch):
        raise NoisysegInputError(
            f"patch_size {list(patch)} must be a multiple of the network's total stride {divisor} "
            f"on every axis",
            path=config.store,
        )
    check_patch_fits(store, train_ids, patch, divisor, config.store)
    val_ids = list(store.case_ids(split=config.val_split)) if config.val_cases else []
    if config.val_cases and not val_ids:
        raise NoisysegInputError(
            f"no cases in validation split {config.val_split!r} (set val_cases=0 to skip "
            "validation)",
            path=config.store,
        )
    channel_names = [str(c) for c in store.channel_names]
    return StoreInfo(
        spatial_dims=spatial_dims,
        in_channels=len(channel_names),
        channel_names=channel_names,
        patch_shape=list(patch),
        train_cases=len(train_ids),
        val_case_ids=sorted(val_ids)[: config.val_cases],
    )
