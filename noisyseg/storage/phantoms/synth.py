"""Write a store of phantom cases (``noisyseg synth``): splits, clean flags, resumable runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage import validate as V
from noisyseg.storage.atomic import replace_store
from noisyseg.storage.ingest import progress_bar
from noisyseg.storage.layout import TRUTH
from noisyseg.storage.phantoms.brain import brain_mets_case
from noisyseg.storage.phantoms.skin import skin_case
from noisyseg.storage.store import VolumeStore

SYNTH_KINDS = ("brain-mets", "skin")
#: Per-case seed: case i of a run with seed S uses ``S * SEED_STRIDE + i`` (distinct across
#: runs of different S for fewer than SEED_STRIDE cases).
SEED_STRIDE = 100003
SYNTH_META = "index/synth.json"


def assign_splits(
    n_cases: int, seed: int, *, test_fraction: float, val_fraction: float, clean_fraction: float
) -> tuple[list[str], list[bool]]:
    """Deterministic split and clean flag per case index.

    ``round(test_fraction·N)`` test and ``round(val_fraction·N)`` val cases drawn at random
    (at least one train case kept); ``max(1, round(clean_fraction·N_train))`` of the train cases
    flagged clean when ``clean_fraction > 0``.
    """
    for name, value in (
        ("test fraction", test_fraction),
        ("val fraction", val_fraction),
        ("clean fraction", clean_fraction),
    ):
        V.check_rate(value, name=name)
    if n_cases < 1:
        raise NoisysegInputError(f"--cases must be at least 1, got {n_cases}")
    rng = np.random.default_rng([int(seed), 7919])
    order = rng.permutation(n_cases)
    n_test = round(test_fraction * n_cases)
    n_val = round(val_fraction * n_cases)
    if n_test + n_val >= n_cases:
        raise NoisysegInputError(
            f"test fraction {test_fraction} + val fraction {val_fraction} leave no training case "
            f"out of {n_cases}"
        )
    splits = ["train"] * n_cases
    for i in order[:n_test]:
        splits[i] = "test"
    for i in order[n_test : n_test + n_val]:
        splits[i] = "val"
    train = [i for i in range(n_cases) if splits[i] == "train"]
    clean = [False] * n_cases
    if clean_fraction > 0:
        n_clean = max(1, round(clean_fraction * len(train)))
        for i in rng.choice(train, size=n_clean, replace=False):
            clean[int(i)] = True
    return splits, clean


def _zyx_affine_to_xyz(affine: Any) -> np.ndarray | None:
    """Phantom affines map store indices ``(z, y, x, 1)``; the store keeps NIfTI-style affines
    mapping ``(x, y, z, 1)`` (see :mod:`noisyseg.storage.ingest`): swap columns 0 and 2."""
    if affine is None:
        return None
    a = np.asarray(affine, dtype=np.float64).copy()
    a[:, [0, 2]] = a[:, [2, 0]]
    return a


def synth_store(
    store_url: str,
    *,
    kind: str,
    cases: int,
    seed: int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    clean_fraction: float = 0.05,
    overwrite: bool = False,
    generator: Callable[[int], Any] | None = None,
    generator_opts: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[str]:
    """Write ``cases`` phantom cases into a store; returns the case ids written (not skipped).

    Case ``i`` is ``<kind>-<i:05d>`` made by ``generator(seed * 100003 + i)`` (default: the
    phantom generator of ``kind``), which returns an object with ``image`` (C, *S) float32,
    ``label`` (*S) uint8, ``spacing`` (mm), ``channel_names``, ``affine``. Re-running with the
    same parameters resumes (cases already in the store are skipped); other parameters on an
    existing store need ``overwrite``.
    existing store need ``overwrite``, which builds the new store beside the old one and swaps
    it in at the end (:func:`noisyseg.storage.atomic.replace_store`; a kill leaves the complete
    old store).
    """
    if kind not in SYNTH_KINDS:
        raise NoisysegInputError(f"--kind must be one of {', '.join(SYNTH_KINDS)}, got {kind!r}")
    splits, clean = assign_splits(
        cases,
        seed,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        clean_fraction=clean_fraction,
    )
    opts = dict(generator_opts or {})
    params = {
        "kind": kind,
        "cases": int(cases),
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "val_fraction": float(val_fraction),
        "clean_fraction": float(clean_fraction),
        "generator_opts": opts,
    }
    job = _SynthJob(params, splits, clean, generator or _default_generator(kind, opts), progress)
    if overwrite and _is_local_store(store_url):
        return replace_store(store_url, lambda staged: job.run(staged, None))
    return job.run(store_url, None if overwrite else _resumable(store_url, params))


def _default_generator(kind: str, opts: dict[str, Any]) -> Callable[[int], Any]:
    fn = brain_mets_case if kind == "brain-mets" else skin_case
    return lambda case_seed: fn(case_seed, **opts)


def _is_local_store(url: str) -> bool:
    """True when ``url`` is an existing local noisyseg store (replaced atomically)."""
    try:
        store = VolumeStore.open(url)
    except NoisysegInputError:
        return False
    return store.files.local


def _resumable(store_url: str, params: dict[str, Any]) -> VolumeStore | None:
    """The existing store at ``store_url`` when it was made with the same ``params`` (None when
    there is none); other contents or parameters raise."""
    try:
        store = VolumeStore.open(store_url, "r+")
    except NoisysegInputError:
        return None
    try:
        old = store.files.read_json(SYNTH_META)
    except FileNotFoundError:
        old = None
    if old != params:
        raise NoisysegInputError(
            "store exists with other contents or synth parameters (pass --overwrite to replace it)",
            path=str(store_url),
        )
    store.cleanup_staging()
    return store


class _SynthJob:
    """The cases of one ``synth`` run (seeds, splits, clean flags), written into a store."""

    def __init__(
        self,
        params: dict[str, Any],
        splits: list[str],
        clean: list[bool],
        generator: Callable[[int], Any],
        progress: bool,
    ) -> None:
        self.params, self.splits, self.clean = params, splits, clean
        self.generator, self.progress = generator, progress
        self.kind, self.seed = params["kind"], int(params["seed"])

    def run(self, store_url: str, store: VolumeStore | None) -> list[str]:
        """Write the cases not yet in ``store`` (None: create the store at ``store_url``,
        replacing one there) and compact; returns the ids written."""
        done = set(store.case_ids()) if store is not None else set()
        written = []
        with progress_bar("synth", enabled=self.progress) as bar:
            task = bar.add_task(self.kind, total=len(self.splits))
            for i in range(len(self.splits)):
                cid = f"{self.kind}-{i:05d}"
                if cid not in done:
                    store = self._write(store_url, store, i, cid)
                    written.append(cid)
                bar.advance(task)
        assert store is not None
        store.compact()
        return written

    def _write(self, store_url: str, store: VolumeStore | None, i: int, cid: str) -> VolumeStore:
        case_seed = self.seed * SEED_STRIDE + i
        case = self.generator(case_seed)
        image = np.asarray(case.image, dtype=np.float32)
        if store is None:
            store = VolumeStore.create(
                store_url,
                spatial_dims=image.ndim - 1,
                channel_names=list(case.channel_names),
                overwrite=True,
                attrs={"synth": self.params},
                truth_params={"source": "synth", "kind": self.kind, "seed": self.seed},
            )
            store.files.write_json(SYNTH_META, self.params)
        store.write_case(
            cid,
            image,
            {TRUTH: np.asarray(case.label)},
            spacing=tuple(case.spacing),
            affine=_zyx_affine_to_xyz(getattr(case, "affine", None)),
            split=self.splits[i],
            clean=self.clean[i],
            source=f"synth:{self.kind}:seed={case_seed}",
        )
        return store
