"""Time one training step with and without meta pixel reweighting, side by side in one run.

Steps timed (each includes ``zero_grad``, the backward and ``optimizer.step()``):

* ``standard``  — forward, mean BCE, backward, Adam step;
* ``reference`` — Ren et al. weights (virtual step + double backward), then the weighted step;
* ``fast``      — exact weights: clean gradient, a gradient-free forward-mode pass for the tangents,
  then a plain weighted forward/backward (:func:`noisyseg.reweight.meta_reweighted_step`);
* ``fast-shared`` — as ``fast`` but the weighted backward reuses the tangent-carrying forward
  (``share_forward=True``) instead of a separate plain forward;
* ``head``      — as ``fast`` but only the last layers are differentiated (approximate).

The methods run interleaved (one step of each per round, order rotated every round) so that load
from other processes on a shared machine hits them alike; the script reports the median time per
method, the median over rounds of each method's ratio to that round's standard step, and the
ratio of the fastest (least disturbed) runs.

Example::

    python benchmarks/meta_step.py --repeats 15            # default 3D U-Net, batch 2, 64^3, CPU
    python benchmarks/meta_step.py --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time

import torch

from noisyseg.losses import bce_with_logits
from noisyseg.models import build_unet
from noisyseg.reweight import head_weight_correlation, meta_reweighted_step

METHODS = ("standard", "reference", "fast", "fast-shared", "head")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--size", type=int, default=64, help="cubic patch edge in voxels (64)")
    parser.add_argument("--batch", type=int, default=2, help="noisy batch size (default 2)")
    parser.add_argument("--clean-batch", type=int, default=None, help="clean batch (= --batch)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="CUDA autocast")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.amp == "bf16" and device.type != "cuda":
        parser.error("--amp bf16 is for CUDA devices")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if "standard" not in methods:
        methods.insert(0, "standard")
    clean_batch = args.clean_batch or args.batch
    torch.manual_seed(0)
    shape = (args.batch, 1, args.size, args.size, args.size)
    clean_shape = (clean_batch, 1, args.size, args.size, args.size)
    noisy_x = torch.randn(shape, device=device)
    noisy_y = (torch.rand(shape, device=device) < 0.05).float()
    clean_x = torch.randn(clean_shape, device=device)
    clean_y = (torch.rand(clean_shape, device=device) < 0.05).float()

    base = build_unet().to(device)
    models = {m: copy.deepcopy(base) for m in methods}
    optimizers = {m: torch.optim.Adam(models[m].parameters(), lr=1e-4) for m in methods}

    def autocast():
        if args.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(method: str) -> None:
        model, optimizer = models[method], optimizers[method]
        with autocast():
            if method == "standard":
                loss = bce_with_logits(model(noisy_x).float(), noisy_y).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                meta_reweighted_step(
                    model,
                    optimizer,
                    noisy_x,
                    noisy_y,
                    clean_x,
                    clean_y,
                    method=method.removesuffix("-shared"),
                    share_forward=True if method.endswith("-shared") else None,
                )

    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            _sync(device)
            start = time.perf_counter()
            step(method)
            _sync(device)
            if round_index >= args.warmup:
                times[method].append(time.perf_counter() - start)

    with autocast():
        correlation = head_weight_correlation(base, noisy_x, noisy_y, clean_x, clean_y)

    print(
        f"# default 3D U-Net (channels 16-128, instance norm), batch {args.batch}, clean batch "
        f"{clean_batch}, {args.size}^3, device {device}, amp {args.amp}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
        f"{args.repeats} rounds after {args.warmup} warm-up"
    )
    standard = times["standard"]
    print(
        f"{'method':<12} {'median ms':>10} {'min ms':>8} {'ratio: median per-round':>24} "
        f"{'ratio of mins':>14}"
    )
    for method in methods:
        ratios = [t / s for t, s in zip(times[method], standard)]
        print(
            f"{method:<12} {1e3 * statistics.median(times[method]):>10.1f} "
            f"{1e3 * min(times[method]):>8.1f} {statistics.median(ratios):>24.2f} "
            f"{min(times[method]) / min(standard):>14.2f}"
        )
    if "reference" in methods and "fast" in methods:
        ratios = [f / r for f, r in zip(times["fast"], times["reference"])]
        print(
            f"fast / reference: median per-round {statistics.median(ratios):.2f}, "
            f"ratio of mins {min(times['fast']) / min(times['reference']):.2f}"
        )
    print(
        f"head-vs-exact weight Pearson correlation (initial network, this batch): {correlation:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
