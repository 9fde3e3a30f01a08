"""Patch supply from object storage vs. local disk, side by side in one run (issue 15, item 5).

Builds a brain-phantom store on local disk, copies it byte for byte into a bucket of a real
S3-compatible server on 127.0.0.1 (moto's standalone server, a separate process speaking the S3
HTTP API), then measures the training loader of one Ray Train worker
(:func:`noisyseg.storage.patches.make_train_loaders`, 64³ patches, batch 2, foreground share 1/3)
reading each store:

* prefetching off: ``num_workers=0`` — every patch is read in the training process, on demand;
* prefetching on: ``num_workers=N`` DataLoader workers, each with ``prefetch_factor=2`` batches in
  flight (and the store's threaded chunk reads inside each worker).

It prints patches/s per training worker, the ratio S3/local for each setting (target >= 0.5x with
prefetching) and the ratio supply / consumption at a stated training step time (target >= 2x at
100 ms per step: ``batch / 0.1 s`` = 20 patches/s consumed).

Loopback moto answers a GET in about a millisecond; a real S3 endpoint takes 10-50 ms per
request. ``--latency-ms`` adds that delay to every object-store request (a fsspec wrapper in the
reading process, so DataLoader workers see it too), to show the rate a cluster would see.
docs/scaling.md and benchmarks/scaling_model.py turn these per-worker figures into cluster sizes.

Usage::

    python benchmarks/object_store_loading.py                     # 4 cases, workers 0 and 2
    python benchmarks/object_store_loading.py --latency-ms 20     # emulate a remote endpoint
"""

from __future__ import annotations

import argparse
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
from patch_loader import build_store, loader_throughput  # noqa: E402 - sibling benchmark script

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--step-ms", type=float, default=100.0, help="training step to feed")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added per S3 request")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (noise)")
    args = parser.parse_args(argv)

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, added S3 latency {args.latency_ms} ms"
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


def measure(
    local: str, remote: str, args: argparse.Namespace
) -> tuple[dict[tuple[str, int], float], float]:
    """Best patches/s per (store, workers) over ``rounds`` alternating rounds, and the S3
    requests per patch counted in-process (``num_workers=0`` runs, start-up included)."""
    rates: dict[tuple[str, int], float] = {}
    requests, patches = 0, 0
    for _ in range(args.rounds):
        for workers in args.workers:
            for name, url in (("local", local), ("s3", remote)):
                before = REQUESTS["count"]
                pps, _, _ = loader_throughput(
                    url,
                    patch=args.patch,
                    batch=args.batch,
                    workers=workers,
                    batches=args.batches,
                    warmup=2,
                )
                rates[name, workers] = max(rates.get((name, workers), 0.0), pps)
                if name == "s3" and workers == 0:
                    requests += REQUESTS["count"] - before
                    patches += (args.batches + 2) * args.batch
    return rates, (requests / patches if patches else float("nan"))


def report(rates: dict[tuple[str, int], float], per_patch: float, args: argparse.Namespace) -> None:
    consumed = args.batch / (args.step_ms / 1000.0)
    print(
        f"\none training worker's loader, {args.patch}^3 patches, batch {args.batch}; "
        f"a {args.step_ms:.0f} ms step consumes {consumed:.0f} patches/s"
    )
    print(
        f"{'DataLoader workers':>18} {'local /s':>9} {'s3 /s':>8} {'s3/local':>9} {'s3 supply/need':>15}"
    )
    for workers in args.workers:
        lo, s3 = rates["local", workers], rates["s3", workers]
        print(f"{workers:>18d} {lo:>9.1f} {s3:>8.1f} {s3 / lo:>8.2f}x {s3 / consumed:>14.2f}x")
    print(f"object-store requests per patch (no prefetch, start-up included): {per_patch:.1f}")


if __name__ == "__main__":
    sys.exit(main())
