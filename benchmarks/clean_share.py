"""Lesion share of the noisy and the clean stream of meta reweighting, by clean-case selection.

Issue 12 asks that clean batches carry at least the noisy batches' lesion share. The share of a
stream is lesion voxels / patch voxels over ``--patches`` patches drawn by the training loop's
own :class:`~noisyseg.storage.patches.PatchDataset`, for each given brain phantom store:

* noisy: the training cases outside the clean subset, label set ``censor-random-0.50-s<seed>``,
  foreground fraction 1/3, each lesion equally likely (the training defaults);
* clean: the ``truth`` labels of the clean subset (:func:`select_clean_cases`, clean fraction
  0.05, at least 3 cases, seed = the store's seed), lesion-centred patches drawn by lesion voxel,
  for each clean-case selection (``random``, ``lesion-rich``) and clean foreground fraction.

It prints one row per store and selection, the ratio clean / noisy and the truth lesion voxels of
the chosen clean cases. The stores are the benchmark's own (``noisyseg benchmark robustness
--kind brain-mets`` writes ``brain-mets-default-s<seed>.zarr`` in its work directory).

Usage::

    python benchmarks/clean_share.py /tmp/rb3/w/brain-mets-default-s{0,1,2}.zarr
"""

from __future__ import annotations

import argparse
import itertools
import re

import numpy as np

from noisyseg.storage.clean_subset import (
    CLEAN_SELECTIONS,
    select_clean_cases,
    truth_lesion_voxels,
)
from noisyseg.storage.patches import PatchDataset
from noisyseg.storage.store import VolumeStore

PATCH = (40, 40, 40)  # the default brain setting's patch
CLEAN_FRACTIONS = (2 / 3, 1.0)


def lesion_share(dataset: PatchDataset, patches: int) -> float:
    """Mean lesion share of ``patches`` patches of the stream (lesion voxels / patch voxels)."""
    labels = (item["label"] for item in itertools.islice(iter(dataset), patches))
    return float(np.mean([float(label.mean()) for label in labels]))


def measure_store(url: str, patches: int) -> list[str]:
    """The table rows of one store."""
    store = VolumeStore.open(url, mode="r")
    seed = int(re.search(r"-s(\d+)\.zarr", url).group(1))
    rows = []
    for selection in CLEAN_SELECTIONS:
        clean = select_clean_cases(store, fraction=0.05, seed=seed, selection=selection)
        noisy = [cid for cid in store.case_ids(split="train") if cid not in clean]
        common = {"patch_size": PATCH, "seed": seed}
        noisy_share = lesion_share(
            PatchDataset(url, noisy, label_set=f"censor-random-0.50-s{seed}", **common), patches
        )
        cells = [f"s{seed}", f"{selection:11s}", f"{noisy_share:6.2%}"]
        for fraction in CLEAN_FRACTIONS:
            clean_stream = PatchDataset(
                url,
                clean,
                label_set="truth",
                stream=1,
                foreground_fraction=fraction,
                foreground_sampling="voxel",
                **common,
            )
            share = lesion_share(clean_stream, patches)
            cells.append(f"{share:6.2%} ({share / noisy_share:4.2f}x)")
        cells.append("/".join(str(v) for v in truth_lesion_voxels(store, clean)))
        rows.append(" | ".join(cells))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", help="brain phantom stores (…-s<seed>.zarr)")
    parser.add_argument("--patches", type=int, default=300, help="patches per stream")
    args = parser.parse_args()
    header = ["store", "selection  ", "noisy ", "clean 2/3 voxel ", "clean 1.0 voxel ", "voxels"]
    print(" | ".join(header))
    for url in args.stores:
        for row in measure_store(url, args.patches):
            print(row, flush=True)


if __name__ == "__main__":
    main()
