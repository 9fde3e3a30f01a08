"""Patch supply from object storage vs. local disk, side by side in one run (issue 15, item 5).

Builds a brain-phantom store on local disk, copies it byte for byte into a bucket of a real
S3-compatible server on 127.0.0.1 (moto's standalone server, a separate process speaking the S3
HTTP API), then measures the training loader of one Ray Train worker
(:func:`noisyseg.storage.patches.make_train_loaders`, 64³ patches, batch 2, foreground share 1/3)
reading each store, with the loader's read-ahead and chunk cache in three settings:

* ``off``: ``read_ahead=0, chunk_cache_mb=0`` — each patch is read when it is asked for (its
  chunk objects are still fetched concurrently, one round trip per patch);
* ``read-ahead``: ``read_ahead=N`` patches read by background threads, no cache;
* ``read-ahead+cache``: the same plus a ``chunk_cache_mb`` cache of stored chunk objects per
  stream process (the default for ``s3://`` stores).

Local disk is measured in the same three settings (the cache only acts on object stores). It
prints patches/s per training worker, the ratio S3/local of each setting (target >= 0.5x with
prefetching), the ratio supply / consumption at a stated training step time (target >= 2x at
100 ms per step: ``batch / 0.1 s`` = 20 patches/s consumed) and the object-store requests per
patch, counted in-process over the timed batches (``num_workers=0``; start-up apart).

Loopback moto answers a GET in a few ms of its own CPU; a real S3 endpoint takes 10-50 ms per
request but serves many at once. ``--latency-ms`` adds that delay to every object-store request
(a fsspec wrapper in the reading process), to show the rate a cluster would see.
docs/scaling.md and benchmarks/scaling_model.py turn these per-worker figures into cluster sizes.

Usage::

    python benchmarks/object_store_loading.py                     # 4 cases, DataLoader workers 0
    python benchmarks/object_store_loading.py --latency-ms 20     # emulate a remote endpoint
    python benchmarks/object_store_loading.py --workers 0 2       # also 2 DataLoader workers
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_loader import build_store  # noqa: E402 - sibling benchmark script

BUCKET = "noisyseg-bench"
LATENCY_ENV = "NOISYSEG_BENCH_S3_LATENCY_MS"


def start_moto(log_dir: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port, in its own process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(log_dir, "moto.log"), "wb")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


#: Object-store requests made by this process (DataLoader workers count their own copies).
REQUESTS = {"count": 0}


def instrument_s3(ms: float) -> None:
    """Count every s3fs request of this process and delay it by ``ms`` (forked workers inherit).

    Installed once, after the upload, so only the loader's reads are counted.
    """
    import asyncio

    import s3fs

    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        REQUESTS["count"] += 1
        if ms > 0:
            await asyncio.sleep(ms / 1000.0)
        return await original(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted


def copy_to_bucket(local: str, endpoint: str) -> str:
    """Upload the store to ``s3://BUCKET/bench.zarr``; returns that URL."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    fs = fsspec.filesystem("s3")
    fs.put(local.rstrip("/") + "/", f"{BUCKET}/bench.zarr/", recursive=True)
    return f"s3://{BUCKET}/bench.zarr"


#: The loader settings compared (their arguments: :func:`setting_kwargs`, from ``--read-ahead``
#: and ``--cache-mb``).
SETTINGS = ("off", "read-ahead", "read-ahead+cache")


def setting_kwargs(name: str, args: argparse.Namespace) -> dict[str, float]:
    """``make_train_loaders`` keyword arguments of one loader setting."""
    read_ahead = 0 if name == "off" else args.read_ahead
    cache = args.cache_mb if name == "read-ahead+cache" else 0
    return {"read_ahead": read_ahead, "chunk_cache_mb": cache}


def throughput(
    url: str, args: argparse.Namespace, workers: int, setting: str
) -> tuple[float, int, int]:
    """(patches/s, requests in the timed batches, requests at start-up) of one loader."""
    from noisyseg.storage.patches import make_train_loaders

    before = REQUESTS["count"]
    loaders = make_train_loaders(
        url,
        label_set="truth",
        patch_size=(args.patch,) * 3,
        batch_size=args.batch,
        num_workers=workers,
        seed=0,
        **setting_kwargs(setting, args),
    )
    it = iter(loaders.noisy)
    for _ in range(2):  # worker start-up, store open, first chunk reads
        next(it)
    start = REQUESTS["count"]
    t0 = time.perf_counter()
    for _ in itertools.islice(it, args.batches):
        pass
    seconds = time.perf_counter() - t0
    timed = REQUESTS["count"] - start
    del it, loaders
    return args.batches * args.batch / seconds, timed, start - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--read-ahead", type=int, default=4, help="patches read ahead")
    parser.add_argument("--cache-mb", type=float, default=512.0, help="chunk cache per stream")
    parser.add_argument("--step-ms", type=float, default=100.0, help="training step to feed")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added per S3 request")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (noise)")
    args = parser.parse_args(argv)

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, added S3 latency {args.latency_ms} ms, "
        f"read-ahead {args.read_ahead} patches, cache {args.cache_mb:.0f} MB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "bench.zarr")
        t0 = time.perf_counter()
        build_store(local, args.cases, "phantom")
        print(f"built {args.cases} phantom cases in {time.perf_counter() - t0:.1f} s")
        server, endpoint = start_moto(tmp)
        try:
            os.environ.update(
                AWS_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
            )
            remote = copy_to_bucket(local, endpoint)
            instrument_s3(args.latency_ms)
            rates, per_patch = measure(local, remote, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(rates, per_patch, args)
    return 0


Key = tuple[str, int, str]  # (store, DataLoader workers, setting)


def measure(
    local: str, remote: str, args: argparse.Namespace
) -> tuple[dict[Key, float], dict[str, float]]:
    """Best patches/s per (store, workers, setting) over ``rounds`` alternating rounds, and the
    S3 requests per timed patch per setting (``num_workers=0`` runs: counted in-process)."""
    rates: dict[Key, float] = {}
    requests: dict[str, list[int]] = {name: [0, 0] for name in SETTINGS}
    for _ in range(args.rounds):
        for workers in args.workers:
            for setting in SETTINGS:
                for name, url in (("local", local), ("s3", remote)):
                    pps, timed, _ = throughput(url, args, workers, setting)
                    key = (name, workers, setting)
                    rates[key] = max(rates.get(key, 0.0), pps)
                    if name == "s3" and workers == 0:
                        requests[setting][0] += timed
                        requests[setting][1] += args.batches * args.batch
    per_patch = {k: (r / n if n else float("nan")) for k, (r, n) in requests.items()}
    return rates, per_patch


def report(rates: dict[Key, float], per_patch: dict[str, float], args: argparse.Namespace) -> None:
    """The table: one row per (DataLoader workers, setting)."""
    consumed = args.batch / (args.step_ms / 1000.0)
    print(
        f"\none training worker's loader, {args.patch}^3 patches, batch {args.batch}; "
        f"a {args.step_ms:.0f} ms step consumes {consumed:.0f} patches/s"
    )
    print(
        f"{'workers':>7} {'setting':>17} {'local /s':>9} {'s3 /s':>8} {'s3/local':>9} "
        f"{'s3 supply/need':>15} {'s3 requests/patch':>18}"
    )
    for workers in args.workers:
        for setting in SETTINGS:
            lo, s3 = rates["local", workers, setting], rates["s3", workers, setting]
            req = f"{per_patch[setting]:.1f}" if workers == 0 else "-"
            print(
                f"{workers:>7d} {setting:>17} {lo:>9.1f} {s3:>8.1f} {s3 / lo:>8.2f}x "
                f"{s3 / consumed:>14.2f}x {req:>18}"
            )


if __name__ == "__main__":
    sys.exit(main())
