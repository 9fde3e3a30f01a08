"""Capacity model: what the store must serve to keep N GPUs fed (docs/scaling.md's table).

Every input is a figure measured on this machine (benchmarks/RESULTS.md names the command that
produced it) or a stated assumption; the defaults are those of docs/scaling.md. The model:

* a GPU consumes ``patches_per_step / step_s`` patches/s (noisy batch + clean batch for meta);
* each patch costs ``requests_per_patch`` object-store GETs and ``compressed_mb_per_patch`` MB
  (measured by benchmarks/object_store_loading.py on the store's real chunk layout);
* decoding costs ``decode_ms_per_patch`` CPU-ms (benchmarks/patch_loading.py);
* one prefetching loader process delivers ``loader_patches_per_s`` from object storage
  (benchmarks/object_store_loading.py), so a GPU needs ``ceil(need / that)`` of them;
* a run of ``steps`` steps on every GPU reads ``steps × patches_per_step × requests`` objects
  when nothing is cached, or each chunk object once when the dataset is copied to node-local
  disk first (``--cache``), which needs ``cases × case_mb`` of local disk per node.

Usage::

    python benchmarks/scaling_model.py                       # docs/scaling.md's table
    python benchmarks/scaling_model.py --step-ms 250 --requests-per-patch 12
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

#: S3 list price of GET requests, USD per 1,000 (us-east-1, standard tier).
GET_USD_PER_1000 = 0.0004
#: S3's documented request rate per partitioned prefix (GET/HEAD per second).
S3_GET_PER_PREFIX = 5500


@dataclass(frozen=True)
class Inputs:
    step_ms: float
    patches_per_step: int
    requests_per_patch: float
    compressed_mb_per_patch: float
    decode_ms_per_patch: float
    loader_patches_per_s: float
    case_mb: float
    chunk_objects_per_case: int
    steps: int
    gpus_per_node: int


@dataclass(frozen=True)
class Row:
    cases: int
    gpus: int
    patches_per_s: float
    get_per_s: float
    mb_per_s: float
    gbit_per_node: float
    decode_cores_per_gpu: float
    loaders_per_gpu: int
    dataset_gb: float
    run_gets_uncached: float
    run_gets_cached: float

    @property
    def cost_uncached_usd(self) -> float:
        return self.run_gets_uncached / 1000 * GET_USD_PER_1000

    @property
    def cost_cached_usd(self) -> float:
        return self.run_gets_cached / 1000 * GET_USD_PER_1000


def model(inputs: Inputs, cases: int, gpus: int) -> Row:
    """The load one configuration puts on the store, the CPUs and the network."""
    per_gpu = inputs.patches_per_step / (inputs.step_ms / 1000.0)
    patches = per_gpu * gpus
    nodes = max(1, math.ceil(gpus / inputs.gpus_per_node))
    mb_per_s = patches * inputs.compressed_mb_per_patch
    return Row(
        cases=cases,
        gpus=gpus,
        patches_per_s=patches,
        get_per_s=patches * inputs.requests_per_patch,
        mb_per_s=mb_per_s,
        gbit_per_node=mb_per_s / nodes * 8 / 1000,
        decode_cores_per_gpu=per_gpu * inputs.decode_ms_per_patch / 1000.0,
        loaders_per_gpu=math.ceil(per_gpu / inputs.loader_patches_per_s),
        dataset_gb=cases * inputs.case_mb / 1000.0,
        run_gets_uncached=gpus * inputs.steps * inputs.patches_per_step * inputs.requests_per_patch,
        run_gets_cached=nodes * cases * inputs.chunk_objects_per_case,
    )


def table(inputs: Inputs, cases: list[int], gpus: list[int]) -> list[Row]:
    return [model(inputs, c, g) for c in cases for g in gpus]


def print_table(rows: list[Row]) -> None:
    print(
        "| cases | GPUs | patches/s | GET/s | MB/s | Gbit/s per node | decode cores/GPU "
        "| loaders/GPU | dataset GB | run GETs (no cache) | GET cost | run GETs (node cache) "
        "| GET cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.cases:,} | {r.gpus} | {r.patches_per_s:,.0f} | {r.get_per_s:,.0f} "
            f"| {r.mb_per_s:,.0f} | {r.gbit_per_node:.1f} | {r.decode_cores_per_gpu:.2f} "
            f"| {r.loaders_per_gpu} | {r.dataset_gb:,.0f} | {r.run_gets_uncached:.3g} "
            f"| ${r.cost_uncached_usd:,.0f} | {r.run_gets_cached:.3g} "
            f"| ${r.cost_cached_usd:,.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=100.0)
    parser.add_argument("--patches-per-step", type=int, default=4, help="batch 2 + clean 2")
    parser.add_argument("--requests-per-patch", type=float, default=40.0)
    parser.add_argument("--compressed-mb-per-patch", type=float, default=9.3)
    parser.add_argument("--decode-ms-per-patch", type=float, default=4.65)
    parser.add_argument("--loader-patches-per-s", type=float, default=20.0)
    parser.add_argument("--case-mb", type=float, default=11.0)
    parser.add_argument("--chunk-objects-per-case", type=int, default=40)
    parser.add_argument("--steps", type=int, default=250_000, help="nnU-Net: 1000 x 250")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cases", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args(argv)
    inputs = Inputs(
        step_ms=args.step_ms,
        patches_per_step=args.patches_per_step,
        requests_per_patch=args.requests_per_patch,
        compressed_mb_per_patch=args.compressed_mb_per_patch,
        decode_ms_per_patch=args.decode_ms_per_patch,
        loader_patches_per_s=args.loader_patches_per_s,
        case_mb=args.case_mb,
        chunk_objects_per_case=args.chunk_objects_per_case,
        steps=args.steps,
        gpus_per_node=args.gpus_per_node,
    )
    print_table(table(inputs, args.cases, args.gpus))
    busiest = model(inputs, max(args.cases), max(args.gpus))
    prefixes = math.ceil(busiest.get_per_s / S3_GET_PER_PREFIX)
    print(
        f"\nbusiest row needs >= {prefixes} S3 prefixes at {S3_GET_PER_PREFIX} GET/s each "
        f"(one prefix per case spreads it over {max(args.cases):,})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
