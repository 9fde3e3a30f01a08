"""Ray Train overhead: steps/s of the same training loop in a plain process vs. TorchTrainer(1).

Both sides run :func:`noisyseg.distributed.train_loop.run_worker` — same store, model, batch,
patch size, steps, seed, one intra-op thread — once through :class:`LocalContext` (no Ray) and
once as ``train_loop_per_worker`` of ``TorchTrainer(ScalingConfig(num_workers=1))`` (Train V2,
local Ray instance). Throughput is what the loop itself measures: whole iterations (patch
loading, step, logging, the checkpoint report) after the first, from the last report.
No MLflow, no validation (they are rank-0 extras, identical on both sides).

Order plain, Ray, plain: the ratio is Ray / mean(plain), which cancels slow drift in the load of
a shared machine. Target: ratio >= 0.95.

    .venv/bin/python benchmarks/train_overhead.py [--steps 40] [--patch 48] [--channels 16 32 64 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument(
        "--gpu", action="store_true", help="one GPU, bf16 autocast; prints voxels/s"
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from cluster_utils import make_ball_store

    from noisyseg.distributed.config import check_against_store, make_config
    from noisyseg.distributed.train_loop import LocalContext, run_worker, train_loop_per_worker

    with tempfile.TemporaryDirectory() as tmp:
        store = make_ball_store(Path(tmp) / "bench.zarr", train=4, val=1, size=max(64, args.patch))
        config = make_config(
            dict(
                store=store,
                labels="noisy",
                loss="lopsided",
                entropy_weight=0.3,
                patch_size=args.patch,
                batch_size=args.batch,
                channels=args.channels,
                steps=args.steps,
                checkpoint_interval=args.steps,
                log_interval=args.steps,
                val_cases=0,
                cpus_per_worker=1,
                gpu=args.gpu,
                amp="bf16" if args.gpu else "none",
            )
        )
        loop_config = {
            "config": config.model_dump(mode="json"),
            "store_info": check_against_store(config).model_dump(),
            "mlflow": None,
        }

        def plain() -> float:
            context = LocalContext(device="cuda" if args.gpu else "cpu")
            run_worker(loop_config, context)
            return float(context.reports[-1]["steps_per_s"])

        def under_ray() -> float:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(
                    num_workers=1, use_gpu=args.gpu, resources_per_worker={"CPU": 1}
                ),
                run_config=RunConfig(
                    name=f"overhead-{int(time.time())}", storage_path=str(Path(tmp) / "ray")
                ),
            )
            result = trainer.fit()
            return float(result.metrics["steps_per_s"])

        import ray

        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=max(2, os.cpu_count() or 2),
            log_to_driver=False,
        )
        try:
            first = plain()
            ray_rate = under_ray()
            second = plain()
        finally:
            ray.shutdown()

    plain_rate = (first + second) / 2
    voxels = args.batch * args.patch**3
    print(
        f"model channels={args.channels} patch={args.patch}^3 batch={args.batch} steps={args.steps}"
    )
    print(f"plain process      : {first:.3f}, {second:.3f} steps/s (mean {plain_rate:.3f})")
    print(f"TorchTrainer(1)    : {ray_rate:.3f} steps/s")
    if args.gpu:
        print(
            f"GPU throughput bf16: {ray_rate * voxels:.3e} voxels/s (Ray), "
            f"{plain_rate * voxels:.3e} (plain)"
        )
    ratio = ray_rate / plain_rate
    print(f"ratio Ray/plain    : {ratio:.3f} (target >= 0.95) {'OK' if ratio >= 0.95 else 'BELOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
