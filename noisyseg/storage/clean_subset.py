"""The clean subset for meta reweighting: which training cases flagged clean take part."""

from __future__ import annotations

from typing import Any

import numpy as np

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.validate import check_split

#: Fewest clean cases a *fraction*-sized clean subset gets, when the store has that many flagged
#: clean (and keeps a noisy case): one case is too few to represent the lesions.
DEFAULT_CLEAN_MIN_CASES = 3


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
) -> list[str]:
    """Pick the clean subset for reweighting among the cases flagged clean in ``split``.

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
    clean = list(store.case_ids(split=split, clean=True))
    if n > len(clean):
        raise NoisysegInputError(
            f"clean subset larger than the data: asked for {asked} cases, "
            f"only {len(clean)} {split} cases are flagged clean",
            path=str(store.url),
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC1EA]))
    chosen = set(rng.choice(len(clean), size=n, replace=False).tolist())
    return [cid for i, cid in enumerate(clean) if i in chosen]


__all__ = ["DEFAULT_CLEAN_MIN_CASES", "open_store", "select_clean_cases"]
