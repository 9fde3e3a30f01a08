"""Ingest throughput: cases per second with 1 vs 2 parallel workers, side by side in one run.

Issue 14 ("Must show"): ``benchmarks/ingest.py`` prints cases/s ingesting an MSD-Task01-shaped
folder with 1 and 2 workers. The folder is written once: ``--cases`` cases, each one 4-channel
4D NIfTI (int16 intensities as scanners write them, LPS orientation so every case is
reoriented), a multi-class label 0-3 and a ``dataset.json``. Each round ingests the folder into a
fresh store once per setting (the order alternates between rounds, so load changes on a shared
machine hit both); the script reports the median rate per setting and the ratio of the medians.
It checks that every setting wrote the same stores (image and label arrays equal).

Settings: ``threads`` with 1 and 2 workers (``--scheduler threads``, the default of
``noisyseg ingest``), and with ``--processes`` also the ``processes`` scheduler with 2 workers.

Usage::

    python benchmarks/ingest.py                       # 12 cases of 160x160x96, 3 rounds
    python benchmarks/ingest.py --cases 6 --rounds 2  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from noisyseg.storage.ingest import SOURCE_LABELS, ingest_folder
from noisyseg.storage.store import VolumeStore


def write_task01(root: Path, n_cases: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    """An MSD Task01-shaped folder: imagesTr 4D int16 (4 channels), labelsTr 0-3, LPS."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"},
            }
        )
    )
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    for i in range(n_cases):
        img = rng.normal(600, 80, size=(*shape, 4)).round().astype(np.int16)
        lab = np.zeros(shape, np.uint8)
        c = [s // 2 for s in shape]
        for r, v in ((12, 1), (6, 2), (3, 3)):
            lab[tuple(slice(ci - r, ci + r) for ci in c)] = v
        nib.save(nib.Nifti1Image(img, affine), str(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz"))


def run_once(src: Path, url: str, scheduler: str, workers: int) -> tuple[float, float]:
    """Ingest ``src`` into a fresh store; returns (cases per second of wall clock, CPU seconds
    of this process per wall second: near the worker count when the threads run in parallel,
    lower when the GIL or other load holds them back; not meaningful for ``processes``)."""
    shutil.rmtree(url, ignore_errors=True)
    c0 = time.process_time()
    t0 = time.perf_counter()
    report = ingest_folder(
        src,
        url,
        progress=False,
        scheduler=scheduler,
        num_workers=workers,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if not report.ok:
        raise SystemExit(f"ingest failed: {[f.line() for f in report.failed]}")
    return len(report.written) / dt, cpu / dt


def same_stores(a: str, b: str) -> bool:
    sa, sb = VolumeStore.open(a), VolumeStore.open(b)
    if sa.case_ids() != sb.case_ids():
        return False
    for cid in sa.case_ids():
        for get in (
            lambda s, c: s.image(c)[:],
            lambda s, c: s.labels(c)[:],
            lambda s, c: s.labels(c, SOURCE_LABELS)[:],
        ):
            if not np.array_equal(get(sa, cid), get(sb, cid)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--shape", default="160,160,96", help="voxels i,j,k per case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", action="store_true", help="also the processes scheduler")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    settings = [("threads", 1), ("threads", 2)] + ([("processes", 2)] if args.processes else [])
    tmp = Path(tempfile.mkdtemp(prefix="noisyseg-ingest-bench-"))
    try:
        src = tmp / "Task01_BrainTumour"
        write_task01(src, args.cases, shape)  # type: ignore[arg-type]
        rates: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
        cpu: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
        load = []
        for r in range(args.rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for sched, n in order:
                rate, busy = run_once(src, str(tmp / f"{sched}-{n}.zarr"), sched, n)
                rates[(sched, n)].append(rate)
                cpu[(sched, n)].append(busy)
                load.append(os.getloadavg()[0])
        ok = all(
            same_stores(str(tmp / "threads-1.zarr"), str(tmp / f"{s}-{n}.zarr"))
            for s, n in settings[1:]
        )
        gb = args.cases * np.prod(shape) * 4 * 4 / 1e9
        print(
            f"ingest benchmark: {args.cases} cases of 4x{'x'.join(map(str, shape))} (int16 "
            f"NIfTI, LPS -> RAS, labels 0-3; {gb:.2f} GB float32 written per run), "
            f"{args.rounds} rounds, {platform.python_version()}, {os.cpu_count()} CPUs, "
            f"1-min load average {min(load):.1f}-{max(load):.1f} during the runs"
        )
        base = statistics.median(rates[("threads", 1)])
        for (sched, n), vals in rates.items():
            med = statistics.median(vals)
            print(
                f"  {sched:9s} workers={n}: {med:6.2f} cases/s (median; rounds "
                f"{', '.join(f'{v:.2f}' for v in vals)})  x{med / base:.2f} vs 1 worker; "
                f"CPU/wall {statistics.median(cpu[(sched, n)]):.2f}"
            )
        print(f"  stores identical across settings: {ok}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
