"""Brain-mets training study: one model per variant, in a plain process, scored on the test split.

The runs behind the robustness benchmark's choices (benchmarks/RESULTS.md, issue 6): the output
prior, the optimiser, the lopsided ``entropy_weight`` λ, steps and patch size. Each variant is
``key=value`` TrainConfig overrides on top of the benchmark's default brain setting; the model is
trained with :func:`noisyseg.distributed.train_loop.run_worker` (no Ray, no MLflow, one thread
unless ``cpus_per_worker`` says otherwise) and evaluated like the benchmark (sliding window, test
split, truth labels, candidates down to p = 0.05, a lesion detected at IoU >= 0.1 — the metrics'
default rule).

    # STORE: the one `noisyseg benchmark robustness --kind brain-mets` wrote,
    # <workdir>/brain-mets-default-s0.zarr (32 cases, every censored label set)
    .venv/bin/python benchmarks/brain_loss_study.py STORE \\
        "labels=censor-random-0.50-s0 loss=lopsided entropy_weight=0.5" \\
        "labels=censor-random-0.50-s0 loss=lopsided entropy_weight=0.95"

Prints one JSON line per variant (and appends it to ``--jsonl``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path

BASE = {
    "labels": "truth",
    "loss": "bce",
    "steps": 2000,
    "patch_size": 40,
    "batch_size": 2,
    "channels": [16, 32, 64, 128],
    "lr": 1e-2,
    "val_cases": 0,
    "val_interval": 0,
    "checkpoint_interval": 10**9,
    "log_interval": 500,
    "cpus_per_worker": 1,
    "seed": 0,
}
METRICS = (
    "max_sensitivity",
    "fp_per_case_at_max_sensitivity",
    "froc_mean",
    "sensitivity_at_80_precision",
    "ap",
    "fp_per_case",
    "dice",
)


def parse_overrides(text: str) -> dict:
    """``"a=1 b=x"`` -> ``{"a": 1, "b": "x"}`` (Python literals where they parse)."""
    out = {}
    for item in text.split():
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run_variant(store: str, overrides: dict) -> dict:
    from noisyseg.distributed.config import check_against_store, make_config
    from noisyseg.distributed.contexts import LocalContext
    from noisyseg.distributed.evaluation import evaluate_cases
    from noisyseg.distributed.model_loading import load_trained_model
    from noisyseg.distributed.train_loop import run_worker
    from noisyseg.metrics import REPORT_CANDIDATE_THRESHOLD
    from noisyseg.storage.store import VolumeStore

    fields = {**BASE, **overrides, "store": store}
    fields["checkpoint_interval"] = fields["steps"]
    config = make_config(fields)
    info = check_against_store(config)
    with tempfile.TemporaryDirectory() as tmp:
        context = LocalContext(checkpoint_root=tmp)
        began = time.perf_counter()
        run_worker(
            {
                "config": config.model_dump(mode="json"),
                "store_info": info.model_dump(mode="json"),
                "mlflow": None,
            },
            context,
        )
        seconds = time.perf_counter() - began
        model, _, _ = load_trained_model(sorted(Path(tmp).glob("checkpoint_*"))[-1])
    volumes = VolumeStore.open(store)
    result = evaluate_cases(
        model,
        volumes,
        volumes.case_ids(split="test"),
        label_set="truth",
        roi_size=config.patch_shape(info.spatial_dims),
        candidate_threshold=REPORT_CANDIDATE_THRESHOLD,
    )
    return {
        "overrides": overrides,
        "train_seconds": round(seconds, 1),
        **{k: round(float(result.metrics[k]), 3) for k in METRICS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a brain-mets store with the censored label sets")
    parser.add_argument("variants", nargs="+", help="quoted 'key=value ...' TrainConfig overrides")
    parser.add_argument("--jsonl", help="append each result line here")
    args = parser.parse_args(argv)
    for text in args.variants:
        line = json.dumps(run_variant(args.store, parse_overrides(text)))
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
