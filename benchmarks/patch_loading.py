"""Patch loading throughput: Zarr store vs. whole-NIfTI load + crop vs. in-memory array, one run.

Issue 3 ("Must show"): patches per second for 96³ patches drawn at random from 256³ volumes,

(a) from the noisyseg Zarr store, through the real read path: :class:`PatchDataset`'s stream
    (lazy store, :class:`~noisyseg.storage.reader.RegionReader` chunk reads, z-score
    normalisation, label patch), single process, no DataLoader workers;
(b) by loading the whole NIfTI volume (``.nii.gz`` written by nibabel) and cropping, as a plain
    MONAI/TorchIO pipeline does: ``nibabel.load`` + ``np.asanyarray(img.dataobj)`` of the image
    *and* of the label for every patch, then the same crop/normalisation code;
(c) from uncompressed in-memory numpy arrays (the ceiling): the same crop/normalisation code.

All three run the very same sampling and post-processing code (``PatchDataset._generate`` and
``_ShardReader.read``); only the arrays differ, and the script checks that the three streams
yield identical patches. Patches are uniform over the volume (``foreground_fraction=0``), the
normalisation statistics are the ones recorded in the store for all three (so (b) is not charged
for a whole-volume mean/std). Measurements are interleaved: in every round each method draws a
fixed number of patches (the order rotates between rounds); the script reports the median rate
over rounds, the ratios of the medians and the median of the per-round ratios (robust to load
changing during the run). Files are freshly written, i.e. in the OS page cache (warm reads).

Data: ``--cases`` volumes of 1×256³, MRI-like (smooth random "tissue" around 600 with white noise
σ=20 inside a head-sized ellipsoid, zero background as in skull-stripped scans) with a binary
label of random balls. ``--content int`` (default): integer intensities, as scanners write them
(NIfTI int16; the store holds float32); ``--content float``: float32 with full-precision noise in
both (the least compressible case). About 0.5 GB of temporary files per 4 cases, removed at the end.

Usage::

    python benchmarks/patch_loading.py                       # 4 cases, 8 rounds
    python benchmarks/patch_loading.py --cases 2 --rounds 3  # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synth_volume(rng: np.random.Generator, size: int = 256, integer: bool = True) -> np.ndarray:
    """An MRI-like ``(size,)*3`` float32 volume: smooth random structure + white noise inside an
    ellipsoid (about 31 % of the volume), zero outside; rounded to integers when ``integer``
    (scanners write integer intensities: int16 DICOM / NIfTI)."""
    import scipy.ndimage as ndi

    half = size // 2
    smooth = ndi.gaussian_filter(rng.normal(size=(half,) * 3).astype(np.float32), 3.0)
    smooth = ndi.zoom(smooth, size / half, order=1)
    smooth = 600.0 + 200.0 * smooth / smooth.std()
    zz, yy, xx = np.ogrid[:size, :size, :size]
    c = (size - 1) / 2
    inside = (
        ((zz - c) / (0.42 * size)) ** 2
        + ((yy - c) / (0.46 * size)) ** 2
        + ((xx - c) / (0.38 * size)) ** 2
    ) <= 1.0
    vol = smooth + rng.normal(scale=20.0, size=smooth.shape).astype(np.float32)
    vol = np.where(inside, vol, 0.0).astype(np.float32)
    return np.round(vol) if integer else vol


def synth_label(rng: np.random.Generator, size: int = 256, n: int = 30) -> np.ndarray:
    """Binary ``(size,)*3`` uint8 label of ``n`` balls of radius 1-12 voxels."""
    label = np.zeros((size,) * 3, np.uint8)
    for _ in range(n):
        r = int(rng.integers(1, 13))
        c = rng.integers(r + size // 4, size - size // 4 - r, 3)
        lo = np.maximum(c - r, 0)
        hi = np.minimum(c + r + 1, size)
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= ball.astype(np.uint8)
    return label


class NiftiVolume:
    """Array-like whose every read loads the whole NIfTI file and crops it (plain pipeline).

    ``shape`` comes from the header; ``vol[sel]`` = ``nibabel.load`` + ``np.asanyarray(dataobj)``
    (the decompressed volume, no float64 conversion) + ``[sel]``. Store axis order (c,)z,y,x is
    NIfTI's reversed (i, j, k) = (x, y, z): the file holds the volume transposed.
    """

    def __init__(self, path: Path, channel_axis: bool) -> None:
        import nibabel as nib

        self.path = path
        self.channel_axis = channel_axis
        spatial = tuple(int(s) for s in nib.load(str(path)).shape[::-1])
        self.shape = (1, *spatial) if channel_axis else spatial
        self.ndim = len(self.shape)

    def __getitem__(self, sel):
        import nibabel as nib

        vol = np.asanyarray(nib.load(str(self.path)).dataobj).T  # (z, y, x) view
        if self.channel_axis:
            vol = vol[None]
        return vol[sel]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(tmp: Path, n_cases: int, size: int, integer: bool) -> tuple[str, list[str], dict, dict]:
    """Write the store and the NIfTI files; return (store url, ids, nifti arrays, memory arrays)."""
    import nibabel as nib

    from noisyseg.storage.store import VolumeStore

    url = str(tmp / "store.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    nifti, memory, ids = {}, {}, []
    t_zarr = t_nii = 0.0
    for i in range(n_cases):
        rng = np.random.default_rng(1000 + i)
        cid = f"case{i:03d}"
        image = synth_volume(rng, size, integer)[None]
        label = synth_label(rng, size)
        t0 = time.perf_counter()
        store.write_case(cid, image, {"truth": label}, spacing=(1.0, 1.0, 1.0))
        t_zarr += time.perf_counter() - t0
        t0 = time.perf_counter()
        img_path, lab_path = tmp / f"{cid}_0000.nii.gz", tmp / f"{cid}.nii.gz"
        # NIfTI voxel (i, j, k) = store (x, y, z): transpose, as ingest expects.
        # integer content is saved as int16, as scanners / dcm2niix write it
        on_disk = image[0].T.astype(np.int16 if integer else np.float32)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(on_disk), np.eye(4)), str(img_path))
        nib.save(nib.Nifti1Image(np.ascontiguousarray(label.T), np.eye(4)), str(lab_path))
        t_nii += time.perf_counter() - t0
        nifti[cid] = (NiftiVolume(img_path, True), NiftiVolume(lab_path, False))
        memory[cid] = (image, label)
        ids.append(cid)
    store.compact()
    raw = n_cases * (size**3) * 5
    zbytes = _dir_bytes(Path(url))
    nbytes = sum(p.stat().st_size for p in tmp.glob("*.nii.gz"))
    print(
        f"data: {n_cases} cases of 1x{size}^3 "
        f"{'integer-valued (NIfTI int16)' if integer else 'float32 full-precision'} intensities "
        f"+ uint8 label ({raw / 2**20:.0f} MiB raw as float32); "
        f"zarr store {zbytes / 2**20:.0f} MiB (written in {t_zarr:.1f} s), "
        f"nii.gz {nbytes / 2**20:.0f} MiB (written in {t_nii:.1f} s)"
    )
    return url, ids, nifti, memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--per-round",
        type=int,
        nargs=3,
        default=(40, 3, 120),
        metavar=("A", "B", "C"),
        help="patches per round for (a), (b), (c)",
    )
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--content",
        choices=("int", "float"),
        default="int",
        help="int: integer-valued intensities (NIfTI int16, store float32); "
        "float: float32 with full-precision noise (compresses worst)",
    )
    args = parser.parse_args(argv)

    import zarr

    from noisyseg.storage import layout, reader
    from noisyseg.storage.patches import PatchDataset, _ShardReader

    cores = os.cpu_count()
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {cores} logical CPU cores SHARED with other engineers' "
        f"jobs (load average {load[0]:.1f} at start); python {platform.python_version()}, "
        f"zarr {zarr.__version__}, single process, no DataLoader workers"
    )
    print(
        f"store layout: image chunks {layout.chunk_shape((args.size,) * 3, 4)} float32 Blosc "
        f"{layout.IMAGE_BLOSC}; label chunks {layout.chunk_shape((args.size,) * 3, 1)} "
        f"uint8 Blosc {layout.LABEL_BLOSC}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="noisyseg-patchbench-", dir=args.dir))
    try:
        url, ids, nifti, memory = build(tmp, args.cases, args.size, args.content == "int")
        patch = (args.patch,) * 3
        ds = PatchDataset(url, ids, patch_size=patch, foreground_fraction=0.0, seed=args.seed)
        streams = {
            "a": iter(ds),
            "b": ds._generate(_ShardReader(ds, list(ids), arrays=nifti), ds.rng_for(0)),
            "c": ds._generate(_ShardReader(ds, list(ids), arrays=memory), ds.rng_for(0)),
        }
        names = {
            "a": "(a) zarr store, PatchDataset",
            "b": "(b) whole .nii.gz load + crop",
            "c": "(c) in-memory numpy + crop",
        }
        # Warm-up and equality check: same seed, same code -> identical patches.
        first = {k: [next(s) for _ in range(2)] for k, s in streams.items()}
        for k in ("b", "c"):
            for pa, pk in zip(first["a"], first[k]):
                assert pa["origin"] == pk["origin"] and pa["case_id"] == pk["case_id"]
                assert np.array_equal(pa["image"].numpy(), pk["image"].numpy()), k
                assert np.array_equal(pa["label"].numpy(), pk["label"].numpy()), k
        print("check: (a), (b), (c) yield identical patches for the same draws")
        per_round = dict(zip("abc", args.per_round))
        rates: dict[str, list[float]] = {k: [] for k in "abc"}
        cpu: dict[str, list[float]] = {k: [] for k in "abc"}  # CPU ms per patch, all threads
        order = list("abc")
        for r in range(args.rounds):
            for k in order:
                n = per_round[k]
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    next(streams[k])
                rates[k].append(n / (time.perf_counter() - t0))
                cpu[k].append((time.process_time() - c0) / n * 1e3)
            order = order[1:] + order[:1]
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in "abc")
                + " patches/s",
                flush=True,
            )
        med = {k: float(np.median(v)) for k, v in rates.items()}
        mb = 4 * np.prod(patch) / 1e6  # image MB per patch (float32, 1 channel)
        print(
            f"\npatches/s, median of {args.rounds} interleaved rounds ({args.patch}^3 patches, "
            f"{args.size}^3 volumes, {mb:.1f} MB float32 image + label per patch):"
        )
        for k in "abc":
            print(
                f"  {names[k]:32s} {med[k]:9.1f} patches/s  ({med[k] * mb:7.1f} MB/s)"
                f"  [min {min(rates[k]):.1f}, max {max(rates[k]):.1f}]"
                f"  CPU {np.median(cpu[k]):.2f} ms/patch"
            )
        ab = [a / b for a, b in zip(rates["a"], rates["b"])]
        ac = [a / c for a, c in zip(rates["a"], rates["c"])]
        print(
            f"  (a)/(b) = {med['a'] / med['b']:.1f}x  (median of per-round ratios "
            f"{np.median(ab):.1f}x; target >= 10x)"
        )
        print(
            f"  (a)/(c) = {med['a'] / med['c']:.2f}x  (median of per-round ratios "
            f"{np.median(ac):.2f}x; target >= 0.25x)"
        )
        print(
            f"  CPU time per patch, (c)/(a) = {np.median(cpu['c']) / np.median(cpu['a']):.2f} "
            "(process CPU time of all threads; the load-independent part of the ratio)"
        )
        print(
            f"load average at end: {os.getloadavg()[0]:.1f} on {cores} cores; "
            f"RegionReader decoding threads: {reader.READ_THREADS}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
