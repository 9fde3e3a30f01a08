"""Patch loader throughput vs. the CPU training step of the default 3D U-Net, in one run.

Prints, for DataLoader ``num_workers`` 0, 1, 2: patches/s and MB/s delivered by
:func:`noisyseg.storage.patches.make_train_loaders` (64³ patches, batch 2, foreground share 1/3,
reading straight from the Zarr store), the training step time of the default 3D U-Net
(:func:`noisyseg.models.build_unet`, batch 2, 64³, SGD forward + backward) measured in the same
process, and the ratio loader-throughput / consumption (patches/s the loader delivers over
patches/s one training step consumes). A ratio above 1 means the loader keeps up.

The loader and the training step are timed one after the other, not concurrently: on a machine
with few cores they would compete for them in a real run.

Usage::

    python benchmarks/patch_loader.py                 # builds a phantom store in a temp dir
    python benchmarks/patch_loader.py --store PATH    # use an existing store (train split)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

import numpy as np
import torch


def build_store(url: str, n_cases: int, kind: str) -> None:
    """Write ``n_cases`` brain-metastasis phantoms (4 channels, 80×96×80 at 2 mm) or, with
    ``kind="random"``, smooth random volumes of the same shape with random balls."""
    from noisyseg.storage.store import VolumeStore

    store = None
    for i in range(n_cases):
        if kind == "phantom":
            from noisyseg.storage.phantoms import brain_mets_case

            case = brain_mets_case(i)
            image, label, spacing, channels = (
                case.image,
                case.label,
                case.spacing,
                case.channel_names,
            )
        else:
            import scipy.ndimage as ndi

            rng = np.random.default_rng(i)
            shape = (80, 96, 80)
            image = ndi.gaussian_filter(rng.normal(size=(4, *shape)), (0, 2, 2, 2)).astype(
                np.float32
            )
            zz, yy, xx = np.indices(shape)
            label = np.zeros(shape, np.uint8)
            for _ in range(8):
                c = [rng.integers(8, s - 8) for s in shape]
                r = rng.uniform(1, 6)
                label |= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r).astype(
                    np.uint8
                )
            spacing, channels = (2.0, 2.0, 2.0), ["t1", "t1c", "t2", "flair"]
        if store is None:
            store = VolumeStore.create(url, spatial_dims=3, channel_names=channels)
        store.write_case(f"case{i:03d}", image, {"truth": label}, spacing=spacing)
    store.compact()


def loader_throughput(
    url: str, *, patch: int, batch: int, workers: int, batches: int, warmup: int
) -> tuple[float, float, int]:
    """(patches/s, MB/s, channels) of the training loader with ``workers`` DataLoader workers."""
    from noisyseg.storage.patches import make_train_loaders

    loaders = make_train_loaders(
        url,
        label_set="truth",
        patch_size=(patch,) * 3,
        batch_size=batch,
        num_workers=workers,
        seed=0,
    )
    it = iter(loaders.noisy)
    for _ in range(warmup):  # worker start-up, store open, first chunk reads
        first = next(it)
    channels = int(first["image"].shape[1])
    nbytes = 0
    t0 = time.perf_counter()
    for b in itertools.islice(it, batches):
        nbytes += b["image"].numel() * 4 + b["label"].numel() * 4
    seconds = time.perf_counter() - t0
    del it, loaders
    return batches * batch / seconds, nbytes / seconds / 1e6, channels


def training_step_time(
    in_channels: int, *, patch: int, batch: int, steps: int, warmup: int
) -> float:
    """Median seconds of one SGD step (forward + backward + update) of the default 3D U-Net."""
    from noisyseg.losses import make_loss
    from noisyseg.models import build_unet

    torch.manual_seed(0)
    net = build_unet(in_channels=in_channels)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = make_loss("bce")
    x = torch.randn(batch, in_channels, patch, patch, patch)
    y = (torch.rand(batch, 1, patch, patch, patch) > 0.9).float()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="existing store URL (default: build one in a temp dir)")
    parser.add_argument("--cases", type=int, default=4, help="cases in the built store")
    parser.add_argument("--kind", choices=["phantom", "random"], default="phantom")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loader setting")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store
        if url is None:
            url = os.path.join(tmp, "bench.zarr")
            t0 = time.perf_counter()
            build_store(url, args.cases, args.kind)
            print(
                f"built {args.cases} {args.kind} cases in {time.perf_counter() - t0:.1f} s: {url}"
            )
        from noisyseg.storage.store import VolumeStore

        info = VolumeStore.open(url).index()
        print(f"store: {len(info)} cases, shapes {sorted(set(info['shape']))}")

        rows = []
        channels = 1
        for w in args.workers:
            pps, mbps, channels = loader_throughput(
                url, patch=args.patch, batch=args.batch, workers=w, batches=args.batches, warmup=2
            )
            rows.append((w, pps, mbps))
        step = training_step_time(
            channels, patch=args.patch, batch=args.batch, steps=args.steps, warmup=2
        )
        consume = args.batch / step
        print(
            f"\ntraining step, default 3D U-Net, batch {args.batch}, {args.patch}^3, "
            f"{channels} channels: {step * 1e3:.0f} ms -> consumes {consume:.1f} patches/s"
        )
        print(f"\n{'workers':>7} {'patches/s':>10} {'MB/s':>8} {'loader/consumption':>19}")
        for w, pps, mbps in rows:
            print(f"{w:>7d} {pps:>10.1f} {mbps:>8.1f} {pps / consume:>18.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
