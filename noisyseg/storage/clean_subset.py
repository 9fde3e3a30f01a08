"""The clean subset for meta reweighting: which training cases flagged clean take part."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.layout import TRUTH
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.validate import check_split

#: Fewest clean cases a *fraction*-sized clean subset gets, when the store has that many flagged
#: clean (and keeps a noisy case): one case is too few to represent the lesions.
DEFAULT_CLEAN_MIN_CASES = 3

#: How the clean subset is drawn from the cases flagged clean (see :func:`select_clean_cases`).
CLEAN_SELECTIONS = ("lesion-rich", "random")
DEFAULT_CLEAN_SELECTION = "lesion-rich"


def open_store(store_or_url: VolumeStore | Any) -> VolumeStore:
    """``store_or_url`` itself when it is a :class:`VolumeStore`, else the store it names,
    opened read-only."""
    if isinstance(store_or_url, VolumeStore):
        return store_or_url
    return VolumeStore.open(str(store_or_url), mode="r")


def select_clean_cases(
    store_or_url,
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
    split: str = "train",
    min_count: int = DEFAULT_CLEAN_MIN_CASES,
    selection: str = DEFAULT_CLEAN_SELECTION,
) -> list[str]:
    """Pick the clean subset for reweighting among the cases flagged clean in ``split``.

    ``selection="random"`` draws the subset uniformly from the flagged cases. The default,
    ``"lesion-rich"``, draws it uniformly from the lesion-richer half of them: the
    ``max(n, ceil(F / 2))`` of the ``F`` flagged cases with the most ``truth`` lesion voxels
    (ties by store order). Meta reweighting needs a clean set that represents the lesions (Ren et
    al. use a class-balanced one): clean cases that happen to hold only small lesions give clean
    batches with less lesion than the noisy ones, whatever the patch sampling, and the weights
    then move away from lesions (measured in ``benchmarks/clean_share.py``).

    Args:
        store_or_url: a :class:`VolumeStore` or its URL.
        fraction: subset size as a fraction of the split's size (``round(fraction · N)``, at least
            one case), e.g. 0.05 = 5 % of the training cases; raised to ``min_count`` when the
            data allow (see below).
        count: subset size as a number of cases, taken as given. Exactly one of
            ``fraction``/``count``.
        min_count: fewest cases a ``fraction``-sized subset gets, capped by the cases flagged
            clean and by ``N - 1`` (one case stays for the noisy stream).
        seed: the choice is uniform without replacement, deterministic by seed.
        split: the split to draw from.
        selection: ``"lesion-rich"`` (default) or ``"random"``, as above.

    Returns:
        The chosen case ids, in store order.

    Raises:
        NoisysegInputError: neither/both sizes given, a size out of range, or more cases asked
            for than are flagged clean.
    """

    check_split(split)
    if (fraction is None) == (count is None):
        raise NoisysegInputError("clean subset: give exactly one of fraction or count")
    store = open_store(store_or_url)
    n_split = len(store.case_ids(split=split))
    if fraction is not None:
        if not (0.0 < float(fraction) <= 1.0):
            raise NoisysegInputError(f"clean fraction must lie in (0, 1], got {fraction!r}")
        n = max(1, round(float(fraction) * n_split))
        asked = f"{fraction:g} of {n_split} {split} cases = {n}"
        n_flagged = len(store.case_ids(split=split, clean=True))
        n = max(n, min(int(min_count), n_flagged, n_split - 1))
    else:
        if int(count) != count or int(count) < 1:
            raise NoisysegInputError(f"clean count must be a positive integer, got {count!r}")
        n = int(count)
        asked = f"{n}"
    if selection not in CLEAN_SELECTIONS:
        raise NoisysegInputError(
            f"clean selection must be one of {', '.join(CLEAN_SELECTIONS)}, got {selection!r}"
        )
    clean = list(store.case_ids(split=split, clean=True))
    if n > len(clean):
        raise NoisysegInputError(
            f"clean subset larger than the data: asked for {asked} cases, "
            f"only {len(clean)} {split} cases are flagged clean",
            path=str(store.url),
        )
    if selection == "random":
        pool = clean
    else:
        pool = lesion_richest(store, clean, max(n, math.ceil(len(clean) / 2)))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC1EA]))
    chosen = {pool[i] for i in rng.choice(len(pool), size=n, replace=False).tolist()}
    return [cid for cid in clean if cid in chosen]


def truth_lesion_voxels(store: VolumeStore, case_ids: list[str]) -> list[int]:
    """``truth`` lesion voxels of each case of ``case_ids`` (lesions whose status is not
    ``removed``, from the store's lesion table); 0 for a case without lesions."""
    table = store.lesion_table(TRUTH)
    per_case = table[table["status"] != "removed"].groupby("case_id")["voxels"].sum()
    return [int(per_case.get(cid, 0)) for cid in case_ids]


def lesion_richest(store: VolumeStore, case_ids: list[str], keep: int) -> list[str]:
    """The ``keep`` cases of ``case_ids`` with the most ``truth`` lesion voxels
    (:func:`truth_lesion_voxels`), in ``case_ids`` order; ties go to the earlier case."""
    counts = np.array(truth_lesion_voxels(store, case_ids))
    order = np.argsort(-counts, kind="stable")[:keep]
    kept = {case_ids[i] for i in order.tolist()}
    return [cid for cid in case_ids if cid in kept]


__all__ = [
    "CLEAN_SELECTIONS",
    "DEFAULT_CLEAN_MIN_CASES",
    "DEFAULT_CLEAN_SELECTION",
    "lesion_richest",
    "open_store",
    "select_clean_cases",
    "truth_lesion_voxels",
]
