"""corrupt_store: Dask-built derived label sets in a VolumeStore.

Every count is checked against an independent relabelling of the written arrays
(scipy.ndimage.label with a full 3x3x3 structure = 26-connectivity), and the in-memory
noise.censor_lesions on the same masks is the reference for which lesions go.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from noisyseg import noise
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.corrupt import corrupt_store, select_censored
from noisyseg.storage.statistics import lesion_statistics
from noisyseg.storage.store import VolumeStore

SHAPE = (24, 28, 32)
STRUCT26 = np.ones((3, 3, 3), dtype=bool)


def ball_case(rng: np.random.Generator, n_lesions: int) -> np.ndarray:
    """Binary (24, 28, 32) mask of ``n_lesions`` non-touching balls of radius 0..3 (cells of 8³
    voxels, one ball per cell, so 26-connectivity never merges two balls)."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    cells = [(z, y, x) for z in range(3) for y in range(3) for x in range(4)]
    picks = rng.choice(len(cells), size=n_lesions, replace=False)
    grid = np.indices((7, 7, 7)) - 3
    dist2 = (grid**2).sum(axis=0)
    for p in picks:
        cz, cy, cx = (np.asarray(cells[p]) * 8) + 4
        r = int(rng.integers(0, 4))
        ball = dist2 <= r * r
        label[cz - 3 : cz + 4, cy - 3 : cy + 4, cx - 3 : cx + 4] |= ball.astype(np.uint8)
    return label


def make_store(root: Path, n_cases: int = 5, seed: int = 0) -> str:
    """Store with ``n_cases`` train cases (+1 val case), 2 channels, anisotropic spacings."""
    url = str(root / "balls.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["t1", "flair"])
    rng = np.random.default_rng(seed)
    for i in range(n_cases + 1):
        label = ball_case(rng, int(rng.integers(3, 9)))
        image = rng.normal(size=(2, *SHAPE)).astype(np.float32) + label
        spacing = (1.0 + 0.5 * (i % 3), 1.0, 0.8)
        split = "val" if i == n_cases else "train"
        store.write_case(f"case{i:02d}", image, {"truth": label}, spacing=spacing, split=split)
    store.compact()
    return url


def tree_hash(path: Path) -> str:
    """sha256 over (relative path, bytes) of every file below ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def truth_hashes(url: str) -> dict[str, str]:
    cases = Path(url) / "cases"
    return {c.name: tree_hash(c / "labels" / "truth") for c in sorted(cases.iterdir())}


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndi.label(mask, structure=STRUCT26)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return make_store(tmp_path)


def read_sets(url: str, name: str, split: str = "train") -> tuple[list[str], list[np.ndarray]]:
    store = VolumeStore.open(url)
    ids = store.case_ids(split=split)
    return ids, [np.asarray(store.labels(cid, name)[...]) for cid in ids]


@pytest.mark.parametrize("mode", ["random", "size"])
def test_censor_half_dataset_scope(store_url: str, mode: str) -> None:
    before = truth_hashes(store_url)
    ids, truths = read_sets(store_url, "truth")
    report = corrupt_store(store_url, mode=mode, rate=0.5, seed=3, progress=False)
    assert report.name == f"censor-{mode}-0.50-s3"
    _, noisy = read_sets(store_url, report.name)

    # independent count: scipy 26-connected components of the written arrays
    k = sum(components(t)[1] for t in truths)
    k_after = sum(components(m)[1] for m in noisy)
    n_removed = int(np.floor(0.5 * k + 0.5))
    assert k_after == k - n_removed
    assert report.lesions_source == k and report.lesions_removed == n_removed

    # removal only: each written mask is the truth minus whole components
    removed_sizes, kept_sizes = [], []
    store = VolumeStore.open(store_url)
    for cid, t, m in zip(ids, truths, noisy):
        assert not np.any(m & ~t)
        lab, n = components(t)
        voxel_mm3 = float(np.prod(store.spacing(cid)))
        for j in range(1, n + 1):
            comp = lab == j
            kept = m[comp]
            assert kept.all() or not kept.any()  # whole lesions only
            (kept_sizes if kept.all() else removed_sizes).append(comp.sum() * voxel_mm3)
    assert len(removed_sizes) == n_removed
    if mode == "size":
        # the smallest half by physical volume (mm³, spacings differ per case)
        assert max(removed_sizes) <= min(kept_sizes)

    # the in-memory reference makes the very same choice
    ref, _ = noise.censor_lesions(
        truths,
        0.5,
        mode=mode,
        seed=3,
        scope="dataset",
        spacings=[store.spacing(c) for c in ids],
    )
    for r, m in zip(ref, noisy):
        np.testing.assert_array_equal(r, m)

    # the val case was not touched and truth is byte-identical
    assert truth_hashes(store_url) == before
    assert store.case_ids(split="val")[0] not in report.case_ids


def test_lesion_table_records_removed(store_url: str) -> None:
    report = corrupt_store(store_url, mode="random", rate=0.5, seed=1, progress=False)
    store = VolumeStore.open(store_url)
    table = store.lesion_table(report.name)
    truth = store.lesion_table("truth")
    truth = truth[truth["case_id"].isin(report.case_ids)]
    assert len(table) == len(truth)  # one row per source lesion
    assert (table["status"] == "removed").sum() == report.lesions_removed
    _, noisy = read_sets(store_url, report.name)
    assert (table["status"] == "present").sum() == sum(components(m)[1] for m in noisy)
    index = store.index().set_index("case_id")
    for cid, m in zip(report.case_ids, noisy):
        assert index.loc[cid, f"n_lesions_{report.name}"] == components(m)[1]
    assert store.label_set_info(report.name)["params"]["rate"] == 0.5


def test_case_scope_matches_noise(store_url: str) -> None:
    _ids, truths = read_sets(store_url, "truth")
    report = corrupt_store(store_url, mode="random", rate=0.3, seed=7, scope="case", progress=False)
    _, noisy = read_sets(store_url, report.name)
    ref, _ = noise.censor_lesions(truths, 0.3, mode="random", seed=7, scope="case")
    for t, r, m in zip(truths, ref, noisy):
        np.testing.assert_array_equal(r, m)
        k = components(t)[1]
        assert components(m)[1] == k - int(np.floor(0.3 * k + 0.5))


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = make_store(tmp_path / "a")
    b = make_store(tmp_path / "b")
    corrupt_store(a, mode="random", rate=0.5, seed=0, name="x", progress=False)
    corrupt_store(
        b, mode="random", rate=0.5, seed=0, name="x", scheduler="synchronous", progress=False
    )
    corrupt_store(b, mode="random", rate=0.5, seed=1, name="y", progress=False)
    _, xa = read_sets(a, "x")
    _, xb = read_sets(b, "x")
    _, yb = read_sets(b, "y")
    assert all(np.array_equal(p, q) for p, q in zip(xa, xb))
    assert not all(np.array_equal(p, q) for p, q in zip(xa, yb))


def test_rate_zero_and_one(store_url: str) -> None:
    _ids, truths = read_sets(store_url, "truth")
    corrupt_store(store_url, mode="size", rate=0.0, name="none", progress=False)
    corrupt_store(store_url, mode="size", rate=1.0, name="all", progress=False)
    _, none = read_sets(store_url, "none")
    _, every = read_sets(store_url, "all")
    assert all(np.array_equal(t, m) for t, m in zip(truths, none))
    assert all(not m.any() for m in every)


def test_censor_from_censored_set(store_url: str) -> None:
    """A censored set keeps its source's lesion ids; censoring it again matches by geometry."""
    corrupt_store(store_url, mode="random", rate=0.5, seed=0, name="half", progress=False)
    report = corrupt_store(
        store_url, source="half", mode="size", rate=0.5, name="quarter", progress=False
    )
    _, half = read_sets(store_url, "half")
    _, quarter = read_sets(store_url, "quarter")
    k = sum(components(m)[1] for m in half)
    assert report.lesions_source == k
    assert sum(components(m)[1] for m in quarter) == k - int(np.floor(0.5 * k + 0.5))
    assert all(not np.any(q & ~h) for q, h in zip(quarter, half))


def test_boundary_dilate(store_url: str) -> None:
    before = truth_hashes(store_url)
    _ids, truths = read_sets(store_url, "truth")
    report = corrupt_store(store_url, mode="dilate", level="mild", progress=False)
    assert report.name == "dilate-mild-1.00-s0"
    _, noisy = read_sets(store_url, report.name)
    ball1 = ndi.generate_binary_structure(3, 1)  # offsets with sum of squares <= 1
    for t, m in zip(truths, noisy):
        np.testing.assert_array_equal(m, ndi.binary_dilation(t, ball1).astype(np.uint8))
    table = VolumeStore.open(store_url).lesion_table(report.name)
    assert set(table["status"]) == {"changed"}  # every ball grew (radius-0 balls too)
    assert (table["voxels_removed"] == 0).all() and (table["voxels_added"] > 0).all()
    assert truth_hashes(store_url) == before


def test_bad_input(store_url: str, tmp_path: Path) -> None:
    with pytest.raises(NoisysegInputError, match=r"\[0, 1\]"):
        corrupt_store(store_url, mode="random", rate=1.5, progress=False)
    with pytest.raises(NoisysegInputError, match=r"\[0, 1\]"):
        corrupt_store(store_url, mode="random", rate=-0.1, progress=False)
    with pytest.raises(NoisysegInputError, match="needs a rate"):
        corrupt_store(store_url, mode="size", progress=False)
    with pytest.raises(NoisysegInputError, match="unknown corruption mode"):
        corrupt_store(store_url, mode="blur", rate=0.5, progress=False)
    with pytest.raises(NoisysegInputError, match="'nope' not found"):
        corrupt_store(store_url, source="nope", mode="random", rate=0.5, progress=False)
    with pytest.raises(NoisysegInputError, match="never overwritten"):
        corrupt_store(store_url, name="truth", mode="random", rate=0.5, progress=False)
    with pytest.raises(NoisysegInputError, match="unsafe label set name"):
        corrupt_store(store_url, name="../x", mode="random", rate=0.5, progress=False)
    with pytest.raises(NoisysegInputError, match="missing store"):
        corrupt_store(str(tmp_path / "nowhere.zarr"), mode="random", rate=0.5, progress=False)
    with pytest.raises(NoisysegInputError, match="level must be one of"):
        corrupt_store(store_url, mode="dilate", level="huge", progress=False)
    assert VolumeStore.open(store_url).label_sets() == ["truth"]


def test_existing_name_refused_unless_overwrite(store_url: str) -> None:
    corrupt_store(store_url, mode="random", rate=0.5, seed=0, name="x", progress=False)
    _, first = read_sets(store_url, "x")
    with pytest.raises(NoisysegInputError, match="already exists"):
        corrupt_store(store_url, mode="random", rate=0.5, seed=5, name="x", progress=False)
    _, still = read_sets(store_url, "x")
    assert all(np.array_equal(a, b) for a, b in zip(first, still))
    corrupt_store(store_url, mode="size", rate=1.0, name="x", overwrite=True, progress=False)
    _, replaced = read_sets(store_url, "x")
    assert all(not m.any() for m in replaced)
    table = VolumeStore.open(store_url).lesion_table("x")
    assert set(table["status"]) == {"removed"}  # old rows replaced, not appended


@pytest.mark.fault_case(2)
def test_failure_midway_registers_nothing(store_url: str) -> None:
    """A source set missing in one case makes that case's task fail after others wrote."""
    store = VolumeStore.open(store_url, mode="r+")
    ids = store.case_ids(split="train")
    records = {}
    for cid in ids[:-1]:
        records[cid] = store.write_label_set(cid, "partial", np.asarray(store.labels(cid)[...]))
    store.register_label_set("partial", records, {"note": "last case missing"})
    before = truth_hashes(store_url)
    with pytest.raises(NoisysegInputError, match="missing"):
        corrupt_store(
            store_url,
            source="partial",
            mode="random",
            rate=0.5,
            name="broken",
            scheduler="synchronous",
            progress=False,
        )
    store = VolumeStore.open(store_url)
    assert "broken" not in store.label_sets()
    assert len(store.lesion_table("broken")) == 0
    assert not any(c.startswith("n_lesions_broken") for c in store.index().columns)
    assert truth_hashes(store_url) == before
    # the same name works on a re-run from a complete source (orphans are overwritten)
    report = corrupt_store(store_url, mode="random", rate=0.5, name="broken", progress=False)
    assert "broken" in VolumeStore.open(store_url).label_sets()
    assert report.lesions_removed == int(np.floor(0.5 * report.lesions_source + 0.5))


def test_select_censored_from_table_only() -> None:
    """Hand-checkable: 4 lesions, size mode, rate 0.5 removes the two smallest volumes."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "case_id": ["b", "a", "a", "b"],
            "lesion_id": [1, 2, 1, 2],
            "voxels": [10, 3, 50, 4],
            "volume_mm3": [10.0, 6.0, 100.0, 4.0],  # a has 2 mm³ voxels
        }
    )
    chosen = select_censored(table, 0.5, case_order=["a", "b"], mode="size", seed=0)
    assert sorted(zip(chosen["case_id"], chosen["lesion_id"])) == [("a", 2), ("b", 2)]
    chosen = select_censored(table, 0.25, case_order=["a", "b"], mode="random", seed=0)
    assert len(chosen) == 1


def test_processes_scheduler_and_statistics(store_url: str) -> None:
    report = corrupt_store(
        store_url, mode="random", rate=0.5, scheduler="processes", num_workers=2, progress=False
    )
    ids, noisy = read_sets(store_url, report.name)
    stats = lesion_statistics(store_url, report.name, split="train")
    assert stats["lesions"] == sum(components(m)[1] for m in noisy) == report.lesions_result
    assert stats["foreground_voxels"] == sum(int(m.sum()) for m in noisy)
    assert stats["per_case"]["case_id"].tolist() == ids


@pytest.mark.integration
def test_ray_scheduler(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(NoisysegInputError, match="needs a Ray connection"):
        corrupt_store(store_url, mode="random", rate=0.5, scheduler="ray", progress=False)
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
        log_to_driver=False,
    )
    try:
        report = corrupt_store(
            store_url, mode="size", rate=0.5, seed=2, scheduler="ray", progress=False
        )
    finally:
        ray.shutdown()
    ids, truths = read_sets(store_url, "truth")
    _, noisy = read_sets(store_url, report.name)
    store = VolumeStore.open(store_url)
    ref, _ = noise.censor_lesions(
        truths, 0.5, mode="size", seed=2, spacings=[store.spacing(c) for c in ids]
    )
    assert all(np.array_equal(r, m) for r, m in zip(ref, noisy))
    assert report.name in store.label_sets()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_cli_corrupt_on_synth_brain_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The issue's check on phantoms: `noisyseg corrupt` at rate 0.5, random and size."""
    from noisyseg.cli import main
    from noisyseg.storage.phantoms import synth_store

    url = str(tmp_path / "brain.zarr")
    synth_store(
        url,
        kind="brain-mets",
        cases=4,
        seed=0,
        test_fraction=0.0,
        val_fraction=0.0,
        generator_opts={"shape": (40, 48, 40)},
        progress=False,
    )
    before = truth_hashes(url)
    ids, truths = read_sets(url, "truth")
    k = sum(components(t)[1] for t in truths)
    assert k >= 8
    assert main(["corrupt", url, "--mode", "random", "--rate", "0.5", "--no-progress"]) == 0
    assert main(["corrupt", url, "--mode", "size", "--rate", "0.5", "--no-progress"]) == 0
    assert "censor-size-0.50-s0" in capsys.readouterr().out
    _, rand = read_sets(url, "censor-random-0.50-s0")
    _, size = read_sets(url, "censor-size-0.50-s0")
    n = int(np.floor(0.5 * k + 0.5))
    assert sum(components(m)[1] for m in rand) == k - n
    assert sum(components(m)[1] for m in size) == k - n
    store = VolumeStore.open(url)
    removed, kept = [], []
    for cid, t, m in zip(ids, truths, size):
        lab, nl = components(t)
        vox = float(np.prod(store.spacing(cid)))
        for j in range(1, nl + 1):
            comp = lab == j
            (kept if m[comp].all() else removed).append(comp.sum() * vox)
    assert len(removed) == n and max(removed) <= min(kept)
    assert truth_hashes(url) == before
    # an existing name is refused with one line and exit status 2
    assert main(["corrupt", url, "--mode", "size", "--rate", "0.5", "--no-progress"]) == 2
    assert main(["corrupt", url, "--mode", "size", "--rate", "2", "--no-progress"]) == 2


def test_skin_store_2d_eight_connectivity(tmp_path: Path) -> None:
    from noisyseg.storage.phantoms import synth_store

    url = str(tmp_path / "skin.zarr")
    synth_store(
        url, kind="skin", cases=7, seed=1, test_fraction=0.0, val_fraction=0.0, progress=False
    )
    _ids, truths = read_sets(url, "truth")
    k = sum(ndi.label(t, structure=np.ones((3, 3)))[1] for t in truths)
    report = corrupt_store(url, mode="random", rate=0.5, seed=0, progress=False)
    _, noisy = read_sets(url, report.name)
    assert sum(ndi.label(m, structure=np.ones((3, 3)))[1] for m in noisy) == k - int(
        np.floor(0.5 * k + 0.5)
    )


@pytest.mark.parametrize("scope", ["dataset", "case"])
@pytest.mark.parametrize("mode", ["random", "size"])
def test_select_censored_equals_noise_selection(mode: str, scope: str) -> None:
    """Table-only selection == noise.py's censoring of the same lesions as masks, many seeds and
    rates, with many tied volumes."""
    import pandas as pd

    rng = np.random.default_rng(0)
    for trial in range(20):
        n_cases = int(rng.integers(1, 6))
        cases = [f"k{i}" for i in range(n_cases)]
        rows = []
        for c in cases:
            for lid in range(1, int(rng.integers(0, 9)) + 1):
                rows.append((c, lid, float(rng.integers(1, 4))))  # few distinct volumes: ties
        table = pd.DataFrame(rows, columns=["case_id", "lesion_id", "volume_mm3"])
        table["voxels"] = table["volume_mm3"].astype(int)
        rate = float(rng.uniform(0, 1))
        seed = int(rng.integers(0, 1000))
        got = set(
            zip(
                select_censored(table, rate, case_order=cases, mode=mode, seed=seed, scope=scope)[
                    "case_id"
                ],
                select_censored(table, rate, case_order=cases, mode=mode, seed=seed, scope=scope)[
                    "lesion_id"
                ],
            )
        )
        # the same lesions as masks: lesion lid of volume v is v voxels of row 1 from column
        # 4·(lid - 1), so noise.py's raster-order ids are the table's lesion ids
        masks = []
        for c in cases:
            mask = np.zeros((3, 4 * 8), np.uint8)
            for case_id, lid, v in rows:
                if case_id == c:
                    mask[1, 4 * (lid - 1) : 4 * (lid - 1) + int(v)] = 1
            masks.append(mask)
        _, removed = noise.censor_lesions(masks, rate, mode=mode, seed=seed, scope=scope)
        assert got == {(cases[r.case], r.label) for r in removed}, trial
