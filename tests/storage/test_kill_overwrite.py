"""SIGKILL during ``noisyseg corrupt --overwrite`` and ``noisyseg ingest --overwrite`` at random
moments (3 seeds each): afterwards every registered label set's masks match its provenance (the
masks equal what its recorded parameters give, and its lesion table and counts describe those
masks), the store is either the complete old or the complete new one, and ``noisyseg verify``
passes. Each case's writer pauses briefly before publishing (test hook) so the kills land while
the work is under way; the kill moment is uniform over that window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from noisyseg import noise
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.corrupt import corrupt_store
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.verify import verify_store

pytestmark = pytest.mark.integration

NOISYSEG = Path(sys.executable).parent / "noisyseg"
SEEDS = (0, 1, 2)
N_CASES = 12
SHAPE = (12, 16, 16)
PAUSE_S = 0.15
STRUCT = np.ones((3, 3, 3))


def _truth(i: int) -> np.ndarray:
    """3-5 separated boxes (distinct 26-connected lesions)."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:3, 1:4, 1:3] = 1
    lab[6:9, 2:4, 9:13] = 1
    lab[2:5, 10:14, 2:4] = 1
    if i % 2:
        lab[9:11, 10:12, 10:14] = 1
    if i % 3 == 0:
        lab[5:6, 6:7, 5:7] = 1
    return lab


def _store(url: str) -> list[str]:
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    rng = np.random.default_rng(7)
    ids = [f"c{i:02d}" for i in range(N_CASES)]
    for i, cid in enumerate(ids):
        image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
        st.write_case(cid, image, {"truth": _truth(i)}, spacing=(1.0, 1.0, 1.0))
    st.compact()
    return ids


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NOISYSEG_TEST_PAUSE_BEFORE_COMMIT": str(PAUSE_S)}
    return subprocess.Popen(
        [str(NOISYSEG), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_during(proc: subprocess.Popen, started: Callable[[], bool], window: float, rng) -> str:
    """Wait until ``started()`` (the work is under way), then SIGKILL at a uniform moment of
    the next ``window`` seconds. Returns "killed", or "finished" when it ended first."""
    deadline = time.monotonic() + 120
    while not started():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"process ended before its work started: {err[-2000:]}")
        assert time.monotonic() < deadline, "work never started"
        time.sleep(0.01)
    time.sleep(float(rng.uniform(0.0, window)))
    if proc.poll() is not None:
        return "finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return "killed"


def _expected_masks(st: VolumeStore, name: str) -> dict[str, np.ndarray]:
    """What the set's recorded provenance gives, recomputed in memory by noise.py."""
    params = st.label_set_info(name)["params"]
    ids = st.case_ids(split=params["split"])
    truths = [np.asarray(st.labels(cid, params["source"])[...]) for cid in ids]
    masks, _ = noise.censor_lesions(
        truths, params["rate"], mode=params["mode"], seed=params["seed"], scope=params["scope"]
    )
    return dict(zip(ids, masks, strict=True))


def _check_sets(url: str) -> None:
    """Every registered set: masks == provenance, lesion table and counts == masks."""
    st = VolumeStore.open(url)
    index = st.index().set_index("case_id")
    for name in st.label_sets():
        table = st.lesion_table(name)
        expected = _expected_masks(st, name) if name != "truth" else None
        for cid in st.case_ids():
            mask = np.asarray(st.labels(cid, name)[...])
            if expected is not None:
                np.testing.assert_array_equal(mask, expected[cid], err_msg=f"{name} {cid}")
            comp, n = ndi.label(mask, structure=STRUCT)
            rows = table[(table["case_id"] == cid) & (table["status"] != "removed")]
            assert sorted(rows["voxels"].astype(int)) == sorted(np.bincount(comp.ravel())[1:])
            assert index.loc[cid, f"n_lesions_{name}"] == n, (name, cid)


@pytest.mark.fault_case(2)
def test_sigkill_corrupt_overwrite(tmp_path: Path) -> None:
    url = str(tmp_path / "k.zarr")
    _store(url)
    corrupt_store(url, mode="random", rate=0.5, seed=100, name="n", split=None, progress=False)
    rng = np.random.default_rng(2024)
    seen = []
    for seed in SEEDS:
        old_info = VolumeStore.open(url).label_set_info("n")
        before = old_info["version"]

        def started(before: str = before) -> bool:
            labels = Path(url, "cases", "c00", "labels")
            return any(g.name != f"n~{before}" and "n~" in g.name for g in labels.iterdir())

        proc = _spawn(
            ["corrupt", url, "--mode", "random", "--rate", "0.5", "--seed", str(seed), "--name",
             "n", "--split", "all", "--overwrite", "--scheduler", "synchronous", "--no-progress"]
        )  # fmt: skip
        if seed == SEEDS[-1]:  # right after the switch, while the old version is removed

            def started(before: str = before) -> bool:
                return VolumeStore.open(url).label_set_info("n")["version"] != before

            outcome = _kill_during(proc, started, 0.2, rng)
        else:
            outcome = _kill_during(proc, started, N_CASES * PAUSE_S + 1.0, rng)
        info = VolumeStore.open(url).label_set_info("n")
        state = "old" if info["version"] == before else "new"
        assert info["params"] == (
            old_info["params"] if state == "old" else {**info["params"], "seed": seed}
        )
        seen.append((outcome, state))
        _check_sets(url)
        report = verify_store(url)
        assert report.ok, [report.problems] + [c.problems for c in report.cases]
    print("outcomes (kill, state):", seen)
    assert any(o == "killed" for o, _ in seen), seen
    assert seen[-1][1] == "new", seen  # the last kill came after the switch
    # a later overwrite removes whatever the killed runs left behind
    corrupt_store(
        url, mode="random", rate=0.5, seed=9, name="n", split=None, overwrite=True, progress=False
    )
    v = VolumeStore.open(url).label_set_info("n")["version"]
    assert sorted(g.name for g in Path(url, "cases", "c00", "labels").iterdir()) == [
        f"n~{v}",
        "truth",
        "zarr.json",
    ]
    _check_sets(url)
    done = subprocess.run([str(NOISYSEG), "verify", url], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"verify: {N_CASES} case(s), {N_CASES} ok, 0 damaged; ok" in done.stdout


def _nifti_source(root: Path, prefix: str, n: int) -> list[str]:
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "t1"},
                "labels": {"background": 0, "lesion": 1},
                "file_ending": ".nii.gz",
            }
        )
    )
    rng = np.random.default_rng(len(prefix))
    ids = [f"{prefix}_{i:03d}" for i in range(n)]
    for i, cid in enumerate(ids):
        image = rng.normal(size=SHAPE[::-1]).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{cid}_0000.nii.gz"))
        label = np.ascontiguousarray(_truth(i).T)
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"{cid}.nii.gz"))
    return ids


@pytest.mark.fault_case(3)
def test_sigkill_ingest_overwrite(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    sources = {
        "a": (tmp_path / "src_a", _nifti_source(tmp_path / "src_a", "a", 8)),
        "b": (tmp_path / "src_b", _nifti_source(tmp_path / "src_b", "bb", 8)),
    }
    current = _store(url)
    rng = np.random.default_rng(77)
    seen = []
    for seed, key in zip(SEEDS, ("a", "b", "a"), strict=True):
        src, new_ids = sources[key]
        if current == new_ids:  # replace with the other source, so old and new differ
            key = "b" if key == "a" else "a"
            src, new_ids = sources[key]

        def started() -> bool:
            return any(p.name.startswith(".tmp-s.zarr-") for p in tmp_path.iterdir())

        proc = _spawn(
            ["ingest", str(src), url, "--overwrite", "--no-progress", "--workers", "1",
             "--seed", str(seed)]
        )  # fmt: skip
        if seed == SEEDS[-1]:  # right after the swap, while the old store is removed
            old_ids = current

            def started(old_ids: list[str] = old_ids) -> bool:
                try:
                    return VolumeStore.open(url).case_ids() != old_ids
                except NoisysegInputError:  # between the two renames
                    return False

            outcome = _kill_during(proc, started, 0.2, rng)
        else:
            outcome = _kill_during(proc, started, len(new_ids) * PAUSE_S + 1.5, rng)
        ids = VolumeStore.open(url).case_ids()
        assert ids in (current, new_ids), ids  # complete old or complete new, nothing between
        seen.append((outcome, "old" if ids == current else "new"))
        current = ids
        _check_sets(url)
        assert verify_store(url).ok
    print("outcomes (kill, state):", seen)
    assert any(o == "killed" for o, _ in seen), seen
    assert seen[-1][1] == "new", seen  # the last kill came after the swap
