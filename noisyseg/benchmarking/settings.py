"""Robustness benchmark settings and plan: which models a benchmark trains (issues 6 and 12).

Three settings (``--kind``), each in three sizes (``quick`` for CI and ``make demo``, ``default``
sized for a 2-core CPU, ``full`` for GPUs):

* ``brain-mets``: 3D four-sequence phantoms at 2 mm (Yi et al.'s lesion-censoring comparison).
* ``brain-mets-1mm``: the same phantom generator at 1 mm isotropic on a *cropped* field of view
  around the brain centre (64 x 96 x 80 mm at the default size), with the documented lesion-size
  distribution kept in millimetres (median 6 mm, 2-60 mm; ``median_diameter_vox`` and
  ``diameter_vox`` are scaled by the spacing). At 1 mm a lesion of 4-6 mm is 4-6 voxels across,
  so hiding the smallest half of the lesions (size-based censoring) hides lesions a model can
  learn to find; at 2 mm it did not (issue 12, item 5).
* ``skin``: 2D RGB phantoms with coarse polygon outlines (Mirikharaji et al.'s clean-subset
  comparison).

The plan (:func:`plan_variants`) is what :class:`~noisyseg.benchmarking.robustness.RobustnessBenchmark`
trains for one seed; every seed trains the same plan on its own phantoms, censoring draw and
clean-subset draw.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from noisyseg.losses import DEFAULT_ENTROPY_WEIGHT
from noisyseg.noise import NoiseSpec

Kind = Literal["brain-mets", "brain-mets-1mm", "skin"]
Size = Literal["quick", "default", "full"]
KINDS: tuple[str, ...] = ("brain-mets", "brain-mets-1mm", "skin")

#: Method names of a plan (``BenchmarkSettings.methods``): plain BCE, the lopsided bootstrap,
#: meta reweighting with BCE on the noisy voxels (at every ``clean_sizes`` entry on the first
#: censoring, at ``meta_clean_fraction`` elsewhere), lopsided loss on the noisy voxels weighted by
#: clean-BCE meta weights, the clean-only baseline (BCE on the clean subset alone) and, for skin,
#: BCE on noisy labels with the clean subset's truth swapped in ("clean + noisy").
METHODS: tuple[str, ...] = ("bce", "lopsided", "meta", "lopsided-meta", "clean-only", "mixed")


# ------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One trained model: which labels it sees and how it learns from them."""

    label_set: str  # "truth" or a derived label set name in the store
    loss: str = "bce"
    reweight: str = "none"  # none | meta | meta-head
    clean_fraction: float | None = None
    train_subset: str = "all"  # all | clean (clean-only training)
    group: str = "main"  # main | rate-sweep | reference

    @property
    def key(self) -> str:
        """Unique name within one seed (label set names carry the seed: ``-s0``)."""
        parts = [self.label_set, self.loss]
        if self.reweight != "none":
            parts.append(f"{self.reweight}{self.clean_fraction:g}")
        if self.train_subset != "all":
            parts.append(f"{self.train_subset}-only")
        return "_".join(parts)

    @property
    def row_key(self) -> str:
        """The key without the seed: the same row of the table for every seed."""
        return "_".join([seedless(self.label_set), *self.key.split("_")[1:]])

    @property
    def method(self) -> str:
        """Human name of the learning method (table column)."""
        if self.train_subset == "clean":
            return "BCE, clean only"
        loss = {"bce": "BCE", "dicebce": "Dice+BCE", "lopsided": "lopsided bootstrap"}.get(
            self.loss, self.loss
        )
        if self.reweight != "none":
            meta = f"meta reweighting ({self.clean_fraction:.0%} clean)"
            return meta if self.loss == "bce" else f"{loss} + {meta}"
        return loss


def seedless(label_set: str) -> str:
    """``censor-random-0.50-s3`` -> ``censor-random-0.50`` (every ``-s<digits>`` part dropped)."""
    return re.sub(r"-s\d+(?=[-_]|$)", "", label_set)


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class BenchmarkSettings:
    """Sizes of one benchmark setting (data, network, optimisation) and its plan."""

    kind: Kind
    size: Size
    cases: int
    seed: int
    generator_opts: dict[str, Any]
    clean_fraction_flagged: float  # cases flagged clean at synth time (upper bound of subsets)
    steps: int
    patch_size: int
    batch_size: int
    channels: tuple[int, ...]
    lr: float
    entropy_weight: float
    #: clean subset of the clean-only baseline, of lopsided+meta and of meta on the second
    #: censoring (and of the skin "clean + noisy" labels)
    meta_clean_fraction: float
    censor_rate: float = 0.5
    rate_sweep: tuple[float, ...] = ()
    #: clean-subset sizes of meta reweighting (BCE) on the first label mode / the skin labels
    clean_sizes: tuple[float, ...] = ()
    workers: int = 1
    cpus_per_worker: float = 1.0
    #: models trained at the same time (one TorchTrainer each). On a 2-core CPU two one-thread
    #: trainers do ~1.5x the steps of one two-thread trainer (small 3D convolutions do not use
    #: two threads well); on one GPU use 1.
    parallel: int = 2
    gpu: bool = False
    val_cases: int = 0
    methods: tuple[str, ...] = ("bce", "lopsided", "meta")
    label_modes: tuple[str, ...] = ("random", "size")
    boundary_level: str = "severe"
    test_fraction: float = 0.25
    val_fraction: float = 0.1

    @property
    def phantom_kind(self) -> str:
        """The phantom generator (``noisyseg synth --kind``) behind this setting."""
        return "skin" if self.kind == "skin" else "brain-mets"

    @property
    def spacing_mm(self) -> float | None:
        """Voxel size of the brain phantoms (mm); ``None`` for skin."""
        if self.phantom_kind != "brain-mets":
            return None
        return float(self.generator_opts.get("spacing_mm", 2.0))

    def train_fields(self) -> dict[str, Any]:
        """TrainConfig fields shared by every variant."""
        return {
            "steps": self.steps,
            "patch_size": self.patch_size,
            "batch_size": self.batch_size,
            "channels": list(self.channels),
            "lr": self.lr,
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "gpu": self.gpu,
            "amp": "bf16" if self.gpu else "none",
            "val_cases": self.val_cases,
            "val_interval": 0,
            "checkpoint_interval": self.steps,
            "num_checkpoints_to_keep": 1,
            "log_interval": max(1, self.steps // 10),
            "seed": self.seed,
        }


def brain_lesion_opts(spacing_mm: float) -> dict[str, Any]:
    """Generator options that keep the documented lesion sizes in mm at ``spacing_mm``.

    docs/phantoms.md: nominal diameters log-normal, median 3 voxels at 2 mm (6 mm), truncated to
    1-30 voxels (2-60 mm). At 1 mm that is a median of 6 voxels, truncated to 2-60 voxels.
    """
    scale = 2.0 / spacing_mm
    return {
        "spacing_mm": spacing_mm,
        "median_diameter_vox": 3.0 * scale,
        "diameter_vox": [1.0 * scale, 30.0 * scale],
    }


def settings_for(kind: Kind, size: Size, *, seed: int = 0, gpu: bool = False) -> BenchmarkSettings:
    """The embedded settings. ``quick`` is the CI smoke test and ``make demo``.

    On CPU two models train at once; with ``gpu`` one (each worker holds the one GPU).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == "skin":
        settings = _skin_settings(size, seed=seed, gpu=gpu)
    else:
        settings = _brain_settings(kind, size, seed=seed, gpu=gpu)
    return replace(settings, parallel=1) if gpu else settings


_BRAIN_DEFAULT_METHODS = ("bce", "lopsided", "meta", "lopsided-meta", "clean-only")


#: The brain benchmark's quick and default sizes: what does not depend on the kind.
_BRAIN_SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "cases": 10,
        "clean_fraction_flagged": 0.45,
        "steps": 1000,
        "patch_size": 32,
        "batch_size": 2,
        "channels": (8, 16, 32),
        "meta_clean_fraction": 0.4,
        "clean_sizes": (0.4,),
        "methods": ("bce", "lopsided", "meta"),
    },
    "default": {
        "cases": 32,
        "clean_fraction_flagged": 0.3,
        "steps": 2000,
        "patch_size": 40,
        "batch_size": 2,
        "channels": (16, 32, 64, 128),
        "meta_clean_fraction": 0.05,
        "clean_sizes": (0.05, 0.1, 0.2),
        "methods": _BRAIN_DEFAULT_METHODS,
    },
}


def _brain_settings(kind: Kind, size: Size, *, seed: int, gpu: bool) -> BenchmarkSettings:
    """The brain benchmark's settings of ``size`` (``brain-mets-1mm``: 1 mm lesion options)."""
    one_mm = kind == "brain-mets-1mm"
    if size in _BRAIN_SIZES:
        if size == "quick":
            shape = [48, 64, 48]
            by_kind = {"label_modes": ("random", "size") if one_mm else ("random",)}
        else:
            shape = [64, 96, 80] if one_mm else [64, 80, 64]
            by_kind = {"rate_sweep": () if one_mm else (0.0, 0.25, 0.5, 0.75)}
        opts = (
            {"shape": shape, **brain_lesion_opts(1.0)}
            if one_mm
            else {"shape": shape, "spacing_mm": 2.0}
        )
        return BenchmarkSettings(
            kind=kind,
            size=size,
            seed=seed,
            generator_opts=opts,
            lr=1e-2,
            entropy_weight=DEFAULT_ENTROPY_WEIGHT,
            gpu=gpu,
            **_BRAIN_SIZES[size],
            **by_kind,
        )
    return BenchmarkSettings(
        kind=kind,
        size=size,
        cases=200,
        seed=seed,
        generator_opts=brain_lesion_opts(1.0) if one_mm else {},
        clean_fraction_flagged=0.25,
        steps=10000,
        patch_size=64 if not one_mm else 96,
        batch_size=4,
        channels=(32, 64, 128, 256, 320),
        lr=1e-2,
        entropy_weight=DEFAULT_ENTROPY_WEIGHT,
        meta_clean_fraction=0.05,
        clean_sizes=(0.05, 0.1, 0.2),
        rate_sweep=(0.0, 0.25, 0.5, 0.75),
        methods=_BRAIN_DEFAULT_METHODS,
        gpu=gpu,
        val_cases=4,
        cpus_per_worker=4.0,
    )


_SKIN_METHODS = ("bce", "lopsided", "meta", "lopsided-meta", "clean-only", "mixed")


def _skin_settings(size: Size, *, seed: int, gpu: bool) -> BenchmarkSettings:
    common: dict[str, Any] = {
        "kind": "skin",
        "size": size,
        "seed": seed,
        "lr": 1e-2,
        "entropy_weight": DEFAULT_ENTROPY_WEIGHT,
        "meta_clean_fraction": 0.05,
        "methods": _SKIN_METHODS,
        "gpu": gpu,
    }
    if size == "quick":
        return BenchmarkSettings(
            **{**common, "meta_clean_fraction": 0.1},
            cases=24,
            generator_opts={"size": 64},
            clean_fraction_flagged=0.25,
            steps=40,
            patch_size=64,
            batch_size=4,
            channels=(8, 16, 32),
            clean_sizes=(0.1,),
        )
    if size == "default":
        return BenchmarkSettings(
            **common,
            cases=160,
            generator_opts={"size": 128},
            clean_fraction_flagged=0.2,
            steps=400,
            patch_size=128,
            batch_size=8,
            channels=(16, 32, 64, 128),
            clean_sizes=(0.02, 0.05, 0.1, 0.2),
        )
    return BenchmarkSettings(
        **common,
        cases=2000,
        generator_opts={"size": 256},
        clean_fraction_flagged=0.2,
        steps=5000,
        patch_size=256,
        batch_size=16,
        channels=(32, 64, 128, 256, 512),
        clean_sizes=(0.02, 0.05, 0.1, 0.2),
        val_cases=8,
        cpus_per_worker=4.0,
    )


# ---------------------------------------------------------------------------------------- plan
def censor_name(mode: str, rate: float, seed: int) -> str:
    """The store's default name for a censored label set (``censor-random-0.50-s0``)."""
    return NoiseSpec(mode=mode, rate=rate).label_set_name(seed)


def _meta_rows(settings: BenchmarkSettings, label_set: str, sizes: list[float]) -> list[Variant]:
    """Meta (BCE) at each size, then lopsided + meta at the reference size, per the methods."""
    rows: list[Variant] = []
    if "meta" in settings.methods:
        rows += [Variant(label_set, "bce", "meta", clean_fraction=size) for size in sizes]
    if "lopsided-meta" in settings.methods:
        rows.append(
            Variant(label_set, "lopsided", "meta", clean_fraction=settings.meta_clean_fraction)
        )
    return rows


def brain_variants(settings: BenchmarkSettings) -> list[Variant]:
    """Truth / censored label sets x methods, the clean-only baseline and the rate sweep.

    On truth: BCE (the baseline every relative figure divides by) and lopsided; reweighting clean
    labels against clean labels shows nothing, so no meta there. Per censoring (``label_modes``
    at ``censor_rate``): BCE, lopsided, meta (BCE) at every ``clean_sizes`` entry for the first
    mode and at ``meta_clean_fraction`` for the others, lopsided + meta. Then the rate sweep
    (BCE vs lopsided under random censoring) for rates not already in the grid.
    """
    methods = settings.methods
    variants: list[Variant] = [Variant("truth", "bce")]
    if "lopsided" in methods:
        variants.append(Variant("truth", "lopsided"))
    if "clean-only" in methods:
        variants.append(
            Variant(
                "truth", "bce", clean_fraction=settings.meta_clean_fraction, train_subset="clean"
            )
        )
    for index, mode in enumerate(settings.label_modes):
        label_set = censor_name(mode, settings.censor_rate, settings.seed)
        variants += [Variant(label_set, m) for m in ("bce", "lopsided") if m in methods]
        sizes = set(settings.clean_sizes) if index == 0 else set()
        sizes = sorted(sizes | {settings.meta_clean_fraction})
        variants += _meta_rows(settings, label_set, sizes)
    done = {v.key for v in variants}
    for rate in settings.rate_sweep:
        label_set = "truth" if rate == 0 else censor_name("random", rate, settings.seed)
        for loss in ("bce", "lopsided"):
            variant = Variant(label_set, loss, group="rate-sweep")
            if replace(variant, group="main").key not in done:
                variants.append(variant)
    return variants


def skin_noisy_name(settings: BenchmarkSettings) -> str:
    """Coarse polygon outlines on every training case (``polygon-severe-1.00-s0``)."""
    return NoiseSpec(mode="polygon", level=settings.boundary_level).label_set_name(settings.seed)


def skin_mixed_name(settings: BenchmarkSettings) -> str:
    return f"{skin_noisy_name(settings)}-clean-truth"


def skin_variants(settings: BenchmarkSettings) -> list[Variant]:
    """Mirikharaji et al.'s comparison plus the lopsided rows.

    Truth-trained reference, noisy-only BCE, clean-only BCE, clean + noisy BCE, noisy-only
    lopsided, meta (BCE) at every clean size, lopsided + meta at ``meta_clean_fraction``.
    """
    methods = settings.methods
    noisy, mixed = skin_noisy_name(settings), skin_mixed_name(settings)
    reference = settings.meta_clean_fraction
    variants = [Variant("truth", "bce", group="reference"), Variant(noisy, "bce")]
    if "clean-only" in methods:
        variants.append(Variant("truth", "bce", clean_fraction=reference, train_subset="clean"))
    if "mixed" in methods:
        variants.append(Variant(mixed, "bce"))
    if "lopsided" in methods:
        variants.append(Variant(noisy, "lopsided"))
    sizes = sorted(set(settings.clean_sizes) | {reference})
    return variants + _meta_rows(settings, noisy, sizes)


def baseline_variant(settings: BenchmarkSettings) -> Variant:
    """The truth-trained BCE model every relative figure is measured against."""
    return Variant("truth", "bce", group="reference" if settings.kind == "skin" else "main")


def plan_variants(settings: BenchmarkSettings, only: list[str] | None = None) -> list[Variant]:
    """The models of one seed; ``only`` keeps rows whose seedless key matches a glob pattern.

    The baseline is always kept (relative maximum sensitivity needs it).

    Raises:
        ValueError: a pattern matches no row of the plan.
    """
    variants = skin_variants(settings) if settings.kind == "skin" else brain_variants(settings)
    if not only:
        return variants
    for pattern in only:
        if not any(fnmatch.fnmatchcase(v.row_key, pattern) for v in variants):
            rows = ", ".join(v.row_key for v in variants)
            raise ValueError(f"pattern {pattern!r} matches no row of the plan ({rows})")
    baseline = baseline_variant(settings).key
    return [
        v
        for v in variants
        if v.key == baseline or any(fnmatch.fnmatchcase(v.row_key, p) for p in only)
    ]
