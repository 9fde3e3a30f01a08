"""Cost of the store's integrity checks on patch loading (issue 13), side by side in one run.

Three streams of 96³ patches from the same 256³ store, through the same sampling and
normalisation code (``PatchDataset._generate`` / ``_ShardReader``, as benchmarks/patch_loading.py),
differing only in how the arrays are opened:

(u) unchecked: the arrays opened straight from zarr (no manifest; what reads cost before);
(c) checked, the default: ``VolumeStore.image`` / ``labels`` (RegionReader verifies each chunk
    file against the manifest's CRC-32C the first time the process reads it, then compares the
    file's (size, mtime, inode) stamp on later reads; a missing chunk fails every read);
(e) checked on every read: as (c) with the stamp cache off (CRC-32C of every chunk object read).

Besides the rates (noisy on a shared machine), the script times the integrity check itself
(``Manifest.check_file``, wrapped with a timer) and reports it per patch and as a share of an
unchecked patch's time: the steadier measure of what checking adds.

Rounds are interleaved (the order rotates) and the median of per-round rates is reported, with
the overhead ``1 - rate/rate(u)`` of the medians and the median of per-round ratios. The script
also checks that the three streams yield identical patches.

Usage::

    python benchmarks/integrity_cost.py                  # 2 cases of 1×256³, 10 rounds
    python benchmarks/integrity_cost.py --cases 1 --size 128 --rounds 4   # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from noisyseg.storage.integrity import Manifest
from noisyseg.storage.patches import PatchDataset, _ShardReader
from noisyseg.storage.reader import RegionReader
from noisyseg.storage.store import VolumeStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_loading import synth_label, synth_volume  # noqa: E402  (same data as patch_loading)

#: Wall time spent inside the integrity check of chunk files (all threads), in seconds.
CHECK_SECONDS = [0.0]
_check_file = Manifest.check_file


def _timed_check_file(self, key, data, stat, ctx):  # the measured call, unchanged otherwise
    t0 = time.perf_counter()
    try:
        _check_file(self, key, data, stat, ctx)
    finally:
        CHECK_SECONDS[0] += time.perf_counter() - t0


Manifest.check_file = _timed_check_file


def build(tmp: Path, n_cases: int, size: int) -> tuple[str, list[str]]:
    """A store of ``n_cases`` MRI-like 1×size³ cases (integer-valued intensities)."""
    url = str(tmp / "store.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    ids = []
    for i in range(n_cases):
        rng = np.random.default_rng(1000 + i)
        cid = f"case{i:03d}"
        store.write_case(
            cid, synth_volume(rng, size)[None], {"truth": synth_label(rng, size)}, spacing=(1, 1, 1)
        )
        ids.append(cid)
    store.compact()
    return url, ids


def arrays(url: str, ids: list[str], mode: str) -> dict[str, tuple[RegionReader, RegionReader]]:
    """Per case ``(image, label)`` readers: ``u`` unchecked, ``c`` checked, ``e`` every read."""
    store = VolumeStore.open(url)
    out = {}
    for cid in ids:
        if mode == "u":
            plain = zarr.storage.LocalStore(store.root, read_only=True)
            pair = tuple(
                zarr.open_array(store=plain, path=p, mode="r")
                for p in (f"cases/{cid}/0", f"cases/{cid}/labels/truth/0")
            )
        else:
            pair = (store.image(cid), store.labels(cid))
            for arr in pair:
                arr.store_path.store.manifest.cache_verified = mode == "c"
        out[cid] = (RegionReader(pair[0]), RegionReader(pair[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=30, help="patches per stream per round")
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} logical CPU cores shared with other "
        f"jobs (load average {os.getloadavg()[0]:.1f} at start); python "
        f"{platform.python_version()}, zarr {zarr.__version__}; single process"
    )
    tmp = Path(tempfile.mkdtemp(prefix="noisyseg-integrity-", dir=args.dir))
    try:
        url, ids = build(tmp, args.cases, args.size)
        ds = PatchDataset(url, ids, patch_size=(args.patch,) * 3, foreground_fraction=0.0, seed=0)
        names = {"u": "(u) unchecked", "c": "(c) checked (default)", "e": "(e) checked every read"}
        streams = {
            k: ds._generate(_ShardReader(ds, list(ids), arrays=arrays(url, ids, k)), ds.rng_for(0))
            for k in names
        }
        first = {k: [next(s) for _ in range(2)] for k, s in streams.items()}
        for k in ("c", "e"):
            for pu, pk in zip(first["u"], first[k]):
                assert np.array_equal(pu["image"].numpy(), pk["image"].numpy()), k
                assert np.array_equal(pu["label"].numpy(), pk["label"].numpy()), k
        print("check: (u), (c), (e) yield identical patches")
        rates: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}  # CPU ms per patch, all threads
        check: dict[str, list[float]] = {k: [] for k in names}  # ms per patch inside the check
        order = list(names)
        for r in range(args.rounds):
            for k in order:
                t0, c0, k0 = time.perf_counter(), time.process_time(), CHECK_SECONDS[0]
                for _ in range(args.per_round):
                    next(streams[k])
                rates[k].append(args.per_round / (time.perf_counter() - t0))
                cpu[k].append((time.process_time() - c0) / args.per_round * 1e3)
                check[k].append((CHECK_SECONDS[0] - k0) / args.per_round * 1e3)
            order = order[1:] + order[:1]
            print(f"round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in names))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(
            f"\n{args.cases} case(s) of 1x{args.size}^3, {args.patch}^3 patches, "
            f"{args.rounds} rounds x {args.per_round} patches, load average now "
            f"{os.getloadavg()[0]:.1f}"
        )
        for k, label in names.items():
            ratio = statistics.median(a / b for a, b in zip(rates[k], rates["u"]))
            cpu_k, cpu_u = statistics.median(cpu[k]), statistics.median(cpu["u"])
            print(
                f"{label:26s} {med[k]:7.1f} patches/s  overhead {100 * (1 - med[k] / med['u']):+5.1f} %"
                f" (median of per-round ratios: {100 * (1 - ratio):+5.1f} %);"
                f" CPU {cpu_k:.2f} ms/patch ({100 * (cpu_k / cpu_u - 1):+5.1f} %)"
            )
        wall_u = 1e3 / med["u"]
        for k in ("c", "e"):
            ms = statistics.median(check[k])
            print(
                f"time inside the integrity check, {names[k]}: {ms:.3f} ms/patch = "
                f"{100 * ms / wall_u:.2f} % of an unchecked patch ({wall_u:.2f} ms)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
