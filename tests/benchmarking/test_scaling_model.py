"""benchmarks/scaling_model.py against hand-worked figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling_model.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_model"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _inputs(scaling, **change):
    base = dict(
        step_ms=100.0,
        patches_per_step=4,
        requests_per_patch=10.0,
        compressed_mb_per_patch=2.0,
        decode_ms_per_patch=5.0,
        loader_patches_per_s=15.0,
        case_mb=12.0,
        chunk_objects_per_case=40,
        steps=1000,
        gpus_per_node=8,
    )
    base.update(change)
    return scaling.Inputs(**base)


def test_one_configuration_by_hand(scaling) -> None:
    row = scaling.model(_inputs(scaling), cases=1000, gpus=16)
    # 4 patches per 0.1 s = 40 patches/s per GPU; 16 GPUs -> 640 patches/s.
    assert row.patches_per_s == pytest.approx(640.0)
    assert row.get_per_s == pytest.approx(6400.0)
    assert row.mb_per_s == pytest.approx(1280.0)
    # 2 nodes share 1280 MB/s: 640 MB/s each = 5.12 Gbit/s.
    assert row.gbit_per_node == pytest.approx(5.12)
    # 40 patches/s x 5 ms = 0.2 core; 40 / 15 per loader -> 3 loaders.
    assert row.decode_cores_per_gpu == pytest.approx(0.2)
    assert row.loaders_per_gpu == 3
    assert row.dataset_gb == pytest.approx(12.0)
    # 16 GPUs x 1000 steps x 4 patches x 10 GETs; cached: 2 nodes x 1000 cases x 40 objects.
    assert row.run_gets_uncached == pytest.approx(640_000.0)
    assert row.run_gets_cached == pytest.approx(80_000.0)
    assert row.cost_uncached_usd == pytest.approx(640 * 0.0004)


def test_table_covers_every_pair(scaling) -> None:
    rows = scaling.table(_inputs(scaling), [1000, 10000], [8, 64])
    assert [(r.cases, r.gpus) for r in rows] == [(1000, 8), (1000, 64), (10000, 8), (10000, 64)]
    # Request rate scales with GPUs, not with the dataset size.
    assert rows[1].get_per_s == pytest.approx(8 * rows[0].get_per_s)
    assert rows[2].get_per_s == pytest.approx(rows[0].get_per_s)
