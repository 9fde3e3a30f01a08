"""Lesion statistics of a label set, recomputed from its arrays (Dask, one task per case).

Independent of the lesion table (every case is relabelled), so they double as a consistency check
of the table.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import pandas as pd

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import label_lesions
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.tasks import run_tasks


def _case_statistics(store: Any, case_id: str, label_set: str) -> dict:
    """One case's lesions in ``label_set``: count, foreground voxels, volumes (mm³)."""
    mask = np.asarray(store.labels(case_id, label_set)[...])
    labels, n = label_lesions(mask)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    voxel_mm3 = float(np.prod(store.spacing(case_id)))
    return {
        "case_id": case_id,
        "lesions": n,
        "foreground_voxels": int(counts.sum()),
        "volumes_mm3": (counts * voxel_mm3).tolist(),
    }


def lesion_statistics(
    store_url: str,
    label_set: str = "truth",
    *,
    split: str | None = None,
    scheduler: str = "threads",
    progress: bool = False,
) -> dict[str, Any]:
    """Lesion statistics of a label set, computed from the arrays with Dask (one task per case).

    Independent of the lesion table (every case is relabelled), so it doubles as a consistency
    check of the table.

    Returns:
        ``label_set``, ``cases``, ``lesions``, ``lesions_per_case`` (mean), ``foreground_voxels``,
        ``volume_mm3_quantiles`` (min, 25 %, median, 75 %, max; empty without lesions) and
        ``per_case`` (DataFrame: case_id, lesions, foreground_voxels).
    """
    store = VolumeStore.open(store_url, mode="r")
    if label_set not in store.label_sets():
        raise NoisysegInputError(f"label set {label_set!r} not found", path=str(store_url))
    case_ids = list(store.case_ids(split=split))
    tasks = [dask.delayed(_case_statistics, pure=False)(store, cid, label_set) for cid in case_ids]
    results = run_tasks(tasks, scheduler=scheduler, progress=progress)
    volumes = (
        np.concatenate([np.asarray(r["volumes_mm3"], dtype=np.float64) for r in results])
        if results
        else np.zeros(0)
    )
    per_case = pd.DataFrame(
        [{k: r[k] for k in ("case_id", "lesions", "foreground_voxels")} for r in results],
        columns=["case_id", "lesions", "foreground_voxels"],
    )
    return {
        "label_set": label_set,
        "cases": len(case_ids),
        "lesions": int(sum(r["lesions"] for r in results)),
        "lesions_per_case": float(np.mean([r["lesions"] for r in results])) if results else 0.0,
        "foreground_voxels": int(sum(r["foreground_voxels"] for r in results)),
        "volume_mm3_quantiles": np.quantile(volumes, [0, 0.25, 0.5, 0.75, 1]).tolist()
        if volumes.size
        else [],
        "per_case": per_case,
    }


__all__ = ["lesion_statistics"]
