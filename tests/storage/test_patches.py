"""PatchDataset / select_clean_cases / make_train_loaders over a real Zarr VolumeStore.

References are numpy slices of the full arrays read independently (np.asarray of the whole
Zarr array), zero-padded, normalised with statistics computed here.
"""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.clean_subset import lesion_richest, select_clean_cases
from noisyseg.storage.patches import PatchDataset, make_train_loaders, shard_cases
from noisyseg.storage.store import VolumeStore

PATCH = (8, 12, 16)
SHAPES = [(24, 28, 32), (20, 24, 18), (6, 20, 10), (16, 16, 16), (22, 18, 26), (18, 30, 20)]
N_CLEAN = 3  # the first three train cases are flagged clean


def random_balls(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    label = np.zeros(shape, dtype=np.uint8)
    for _ in range(n):
        c = [rng.integers(0, s) for s in shape]
        r = rng.uniform(0.8, 3.0)
        label |= (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r).astype(
            np.uint8
        )
    return label


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 train cases (one, (6, 20, 10), smaller than the patch), 2 channels with different
    means/scales; cases 0-2 clean and with z-score statistics recorded; a censored set."""
    root = tmp_path_factory.mktemp("patches")
    url = str(root / "p.zarr")
    st = VolumeStore.create(url, spatial_dims=3, channel_names=["a", "b"])
    rng = np.random.default_rng(0)
    for i, shape in enumerate(SHAPES):
        label = random_balls(rng, shape, 4)
        image = np.stack([rng.normal(100.0, 20.0, shape), rng.normal(-5.0, 2.0, shape)])
        image[0] += 50.0 * label
        image = image.astype(np.float32)
        extra = None
        if i < N_CLEAN:
            extra = {
                "channel_mean": image.reshape(2, -1).mean(axis=1).tolist(),
                "channel_std": image.reshape(2, -1).std(axis=1).tolist(),
            }
        st.write_case(
            f"c{i}",
            image,
            {"truth": label},
            spacing=(1.0, 1.0, 1.0),
            clean=i < N_CLEAN,
            extra=extra,
        )
    # a derived set: every other case's labels emptied
    records = {}
    for i in range(len(SHAPES)):
        lab = np.asarray(st.labels(f"c{i}")[...])
        records[f"c{i}"] = st.write_label_set(
            f"c{i}", "noisy", lab if i % 2 else np.zeros_like(lab)
        )
    st.register_label_set("noisy", records, {"mode": "test"})
    st.compact()
    full = {}
    for i in range(len(SHAPES)):
        cid = f"c{i}"
        img = np.asarray(st.image(cid)[...])
        mean = img.reshape(2, -1).mean(axis=1)
        std = img.reshape(2, -1).std(axis=1)
        full[cid] = {
            "image": img,
            "norm": (img - mean[:, None, None, None]) / std[:, None, None, None],
            "truth": np.asarray(st.labels(cid, "truth")[...]),
            "noisy": np.asarray(st.labels(cid, "noisy")[...]),
        }
    return {"url": url, "full": full, "ids": [f"c{i}" for i in range(len(SHAPES))]}


def reference(arr: np.ndarray, origin: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """Zero-padded numpy slice of the last len(size) axes at ``origin``."""
    pad = [(0, 0)] * (arr.ndim - len(size)) + [(p, p) for p in size]
    padded = np.pad(arr, pad)
    sl = tuple(slice(o + p, o + 2 * p) for o, p in zip(origin, size))
    return padded[(Ellipsis,) + sl]


def take(ds, n: int) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


def test_patches_match_numpy_slices(store: dict) -> None:
    # clean cases carry stored stats equal to the full-volume mean/std: exact comparison
    ds = PatchDataset(
        store["url"], store["ids"][:N_CLEAN], patch_size=PATCH, foreground_fraction=0.5, seed=1
    )
    for s in take(ds, 40):
        ref = store["full"][s["case_id"]]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (2, *PATCH)
        assert s["label"].dtype == torch.float32 and s["label"].shape == (1, *PATCH)
        np.testing.assert_allclose(
            s["image"].numpy(), reference(ref["norm"], s["origin"], PATCH), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(
            s["label"][0].numpy(), reference(ref["truth"], s["origin"], PATCH)
        )


def test_small_volume_is_zero_padded(store: dict) -> None:
    ds = PatchDataset(store["url"], ["c2"], patch_size=PATCH, foreground_fraction=0.0, seed=0)
    shape = np.asarray(SHAPES[2])
    for s in take(ds, 10):
        origin = np.asarray(s["origin"])
        # along z (6 < 8) the whole volume lies inside the patch
        assert origin[0] <= 0 and origin[0] + PATCH[0] >= shape[0]
        np.testing.assert_array_equal(
            s["label"][0].numpy(), reference(store["full"]["c2"]["truth"], s["origin"], PATCH)
        )
        outside = np.ones(PATCH, bool)
        lo = np.maximum(-origin, 0)
        hi = np.minimum(shape - origin, PATCH)
        outside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = False
        assert outside.any() and not s["image"][:, outside].any()


def test_fallback_statistics_from_subsample(store: dict) -> None:
    """Cases without stored stats: z-score from a strided subsample, close to full-volume."""
    ds = PatchDataset(store["url"], ["c4"], patch_size=PATCH, foreground_fraction=0.0, seed=0)
    s = take(ds, 1)[0]
    raw = reference(store["full"]["c4"]["image"], s["origin"], PATCH)
    got = s["image"].numpy()
    for c in range(2):
        # got = (raw - m) / sd for the loader's (m, sd): recover them by least squares
        slope, intercept = np.polyfit(raw[c].ravel(), got[c].ravel(), 1)
        sd, m = 1 / slope, -intercept / slope
        img = store["full"]["c4"]["image"][c]
        assert abs(m - img.mean()) < 0.05 * img.std()
        assert abs(sd / img.std() - 1) < 0.05


@pytest.mark.parametrize("fraction", [1 / 3, 1.0])
def test_foreground_fraction(store: dict, fraction: float) -> None:
    ids = store["ids"]
    ds = PatchDataset(store["url"], ids, patch_size=PATCH, foreground_fraction=fraction, seed=5)
    n = 900 if fraction < 1 else 100
    centre = np.asarray(PATCH) // 2
    hits = sum(int(s["label"][(0, *centre)] > 0) for s in take(ds, n))
    # chance that a uniform patch's centre is foreground, computed exactly from the volumes
    q = []
    for cid in ids:
        lab = store["full"][cid]["truth"]
        shape = np.asarray(lab.shape)
        low, high = np.minimum(0, shape - PATCH), np.maximum(0, shape - PATCH)
        pl = np.pad(lab, [(p, p) for p in PATCH])
        region = tuple(
            slice(int(a + c + p), int(b + c + p + 1))
            for a, b, c, p in zip(low, high, centre, PATCH)
        )
        q.append(pl[region].mean())
    q = float(np.mean(q))
    expected = fraction + (1 - fraction) * q
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(hits / n - expected) <= 4 * sigma + 1e-9, (hits / n, expected)


def test_foreground_uses_chosen_label_set(store: dict) -> None:
    """Oversampling follows the served label set: cases emptied in 'noisy' give no fg centres."""
    ds = PatchDataset(
        store["url"],
        ["c0", "c1"],
        label_set="noisy",
        patch_size=PATCH,
        foreground_fraction=1.0,
        seed=0,
    )
    centre = tuple(np.asarray(PATCH) // 2)
    for s in take(ds, 30):
        ref = reference(store["full"][s["case_id"]]["noisy"], s["origin"], PATCH)
        np.testing.assert_array_equal(s["label"][0].numpy(), ref)
        if s["case_id"] == "c1":
            assert s["label"][(0, *centre)] == 1
        else:
            assert not s["label"].any()


def test_voxel_sampling_draws_lesions_by_volume(store: dict) -> None:
    """foreground_sampling='voxel': the centre's lesion is drawn with probability ∝ its voxel
    count; 'lesion': uniformly. Lesions labelled here independently (scipy, 26-connectivity)."""
    truth = store["full"]["c0"]["truth"]
    labels, n = ndimage.label(truth, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(float)
    assert n >= 3 and sizes.max() > 2 * sizes.min()  # lesions of clearly different sizes
    centre = np.asarray(PATCH) // 2
    draws = 600
    for how, expected in (("voxel", sizes / sizes.sum()), ("lesion", np.full(n, 1 / n))):
        ds = PatchDataset(
            store["url"],
            ["c0"],
            patch_size=PATCH,
            foreground_fraction=1.0,
            foreground_sampling=how,
            seed=3,
        )
        counts = np.zeros(n)
        for sample in take(ds, draws):
            voxel = np.asarray(sample["origin"]) + centre
            counts[labels[tuple(voxel)] - 1] += 1
        sigma = np.sqrt(expected * (1 - expected) / draws)
        assert np.all(np.abs(counts / draws - expected) <= 4 * sigma + 1e-9), (how, counts)
    with pytest.raises(NoisysegInputError, match="foreground_sampling"):
        PatchDataset(store["url"], ["c0"], patch_size=PATCH, foreground_sampling="blob")


def test_clean_stream_has_its_own_batch_and_foreground_settings(store: dict) -> None:
    loaders = make_train_loaders(
        store["url"],
        label_set="noisy",
        patch_size=PATCH,
        batch_size=2,
        clean_count=2,
        clean_batch_size=3,
        clean_foreground_fraction=1.0,
        foreground_fraction=0.0,
        seed=1,
    )
    centre = tuple(np.asarray(PATCH) // 2)
    for batch in itertools.islice(loaders.clean, 5):
        assert batch["label"].shape == (3, 1, *PATCH)
        # every clean patch is centred on a truth lesion voxel (the clean cases have lesions)
        assert all(batch["label"][(b, 0, *centre)] == 1 for b in range(3))
    assert next(iter(loaders.noisy))["label"].shape == (2, 1, *PATCH)
    with pytest.raises(NoisysegInputError, match="clean_batch_size must be >= batch_size"):
        make_train_loaders(
            store["url"],
            label_set="noisy",
            patch_size=PATCH,
            batch_size=2,
            clean_count=2,
            clean_batch_size=1,
        )
    with pytest.raises(NoisysegInputError, match="foreground_fraction"):
        make_train_loaders(
            store["url"],
            label_set="noisy",
            patch_size=PATCH,
            batch_size=2,
            clean_count=2,
            clean_foreground_fraction=1.5,
        )


def test_shards_disjoint_and_complete() -> None:
    ids = [f"c{i}" for i in range(11)]
    for world, workers in [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2)]:
        shards = [
            shard_cases(ids, rank=r, world_size=world, worker=w, num_workers=workers)
            for r in range(world)
            for w in range(workers)
        ]
        flat = [c for s in shards for c in s]
        assert sorted(flat) == sorted(ids) and len(flat) == len(ids)
    # fewer cases than shards: nobody is empty, streams differ instead
    few = ["a", "b"]
    shards = [shard_cases(few, rank=r, world_size=4, worker=0, num_workers=2) for r in range(4)]
    assert all(s for s in shards)
    d0 = PatchDataset("unused", few, patch_size=PATCH, rank=0, world_size=4)
    d1 = PatchDataset("unused", few, patch_size=PATCH, rank=1, world_size=4)
    assert d0.rng_for(0).integers(1 << 30) != d1.rng_for(0).integers(1 << 30)


def test_dataloader_workers_ranks_no_duplicates(store: dict) -> None:
    ids = store["ids"]
    seen = []
    for rank in range(2):
        ds = PatchDataset(store["url"], ids, patch_size=PATCH, rank=rank, world_size=2, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        cases: set[str] = set()
        for batch in itertools.islice(loader, 12):
            assert batch["image"].shape == (4, 2, *PATCH)
            assert batch["label"].shape == (4, 1, *PATCH)
            cases |= set(batch["case_id"])
        seen.append(cases)
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(ids)
    # each of the 4 shards holds 1 or 2 of the 6 cases (6 cases -> 3 per rank -> 2 + 1)
    assert {len(s) for s in seen} == {3}


def test_deterministic_by_seed(store: dict) -> None:
    def run(seed: int) -> list[tuple]:
        ds = PatchDataset(store["url"], store["ids"], patch_size=PATCH, seed=seed, augment=True)
        return [(s["case_id"], s["origin"], s["image"].sum().item()) for s in take(ds, 15)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    ds = PatchDataset(store["url"], store["ids"], patch_size=PATCH, seed=0)
    first = [s["origin"] for s in take(ds, 5)]
    ds.set_epoch(1)
    assert [s["origin"] for s in take(ds, 5)] != first


def test_augment_flips_match_slices(store: dict) -> None:
    ds = PatchDataset(
        store["url"],
        store["ids"][:N_CLEAN],
        patch_size=PATCH,
        seed=2,
        augment=True,
        foreground_fraction=0.5,
    )
    flipped = 0
    for s in take(ds, 20):
        ref = store["full"][s["case_id"]]
        img = reference(ref["norm"], s["origin"], PATCH)
        lab = reference(ref["truth"], s["origin"], PATCH)[None]
        matches = []
        for axes in itertools.chain.from_iterable(
            itertools.combinations((1, 2, 3), k) for k in range(4)
        ):
            fi = np.flip(img, axes) if axes else img
            fl = np.flip(lab, axes) if axes else lab
            if np.allclose(s["image"].numpy(), fi, atol=1e-5) and np.array_equal(
                s["label"].numpy(), fl
            ):
                matches.append(axes)
        assert matches
        flipped += () not in matches
    assert flipped > 0


def test_pickles_before_and_after_iteration(store: dict) -> None:
    ds = PatchDataset(store["url"], store["ids"], patch_size=PATCH, seed=3)
    expected = [(s["case_id"], s["origin"]) for s in take(ds, 5)]
    clone = pickle.loads(pickle.dumps(ds))
    assert [(s["case_id"], s["origin"]) for s in take(clone, 5)] == expected
    assert len(pickle.dumps(ds)) < 2000  # strings and numbers only, no store handles


def test_select_clean_cases(store: dict) -> None:
    url = store["url"]
    assert select_clean_cases(url, count=3) == ["c0", "c1", "c2"]
    two = select_clean_cases(url, count=2, seed=4)
    assert len(two) == 2 and set(two) <= {"c0", "c1", "c2"}
    assert select_clean_cases(url, count=2, seed=4) == two
    # fraction of the training split (6 cases): 0.5 -> 3 cases
    assert len(select_clean_cases(url, fraction=0.5)) == 3
    assert len(select_clean_cases(VolumeStore.open(url), fraction=0.01, min_count=1)) == 1
    # a fraction-sized subset gets at least min_count cases (default 3) when the data allow:
    # 3 flagged clean of 6 train cases
    assert len(select_clean_cases(url, fraction=0.01)) == 3
    assert len(select_clean_cases(url, fraction=0.01, min_count=2)) == 2
    assert len(select_clean_cases(url, fraction=0.01, min_count=5)) == 3  # only 3 flagged
    assert len(select_clean_cases(url, count=1, min_count=3)) == 1  # a count is taken as given
    with pytest.raises(NoisysegInputError, match="clean subset larger than the data"):
        select_clean_cases(url, count=4)
    with pytest.raises(NoisysegInputError, match="clean subset larger than the data"):
        select_clean_cases(url, fraction=0.75)  # 0.75 * 6 = 4.5 -> 4 > 3 flagged clean
    with pytest.raises(NoisysegInputError, match="exactly one"):
        select_clean_cases(url)
    with pytest.raises(NoisysegInputError, match="exactly one"):
        select_clean_cases(url, count=1, fraction=0.1)
    with pytest.raises(NoisysegInputError, match=r"\(0, 1\]"):
        select_clean_cases(url, fraction=1.5)
    with pytest.raises(NoisysegInputError, match="positive integer"):
        select_clean_cases(url, count=0)
    with pytest.raises(NoisysegInputError, match="split"):
        select_clean_cases(url, count=1, split="holdout")


def test_lesion_rich_selection_draws_from_the_cases_with_most_lesion_voxels(store: dict) -> None:
    """Default selection: uniform over the lesion-richer half of the flagged cases (voxels
    counted here from the label arrays, not from the store's lesion table); random: over all."""
    url = store["url"]
    opened = VolumeStore.open(url)
    flagged = opened.case_ids(split="train", clean=True)
    voxels = {cid: int((np.asarray(opened.labels(cid)[...]) > 0).sum()) for cid in flagged}
    assert len(set(voxels.values())) == len(flagged)  # no ties, so the ranking is unambiguous
    ranked = sorted(flagged, key=voxels.get, reverse=True)
    assert lesion_richest(opened, flagged, 2) == [c for c in flagged if c in ranked[:2]]
    assert lesion_richest(opened, flagged, 1) == ranked[:1]
    # 1 case from 3 flagged: the pool is the ceil(3 / 2) = 2 richest
    rich = {select_clean_cases(url, count=1, seed=seed)[0] for seed in range(20)}
    assert rich == set(ranked[:2])
    uniform = {
        select_clean_cases(url, count=1, seed=seed, selection="random")[0] for seed in range(20)
    }
    assert uniform == set(flagged)
    # the pool grows to the size asked for: 3 of 3 flagged is all of them
    assert select_clean_cases(url, count=3) == flagged
    with pytest.raises(NoisysegInputError, match="clean selection must be one of"):
        select_clean_cases(url, count=1, selection="largest")


def test_make_train_loaders_clean_stream_reads_truth(store: dict) -> None:
    loaders = make_train_loaders(
        store["url"],
        label_set="noisy",
        patch_size=PATCH,
        batch_size=3,
        clean_count=2,
        foreground_fraction=0.5,
        seed=0,
    )
    assert len(loaders.clean_case_ids) == 2
    assert not set(loaders.clean_case_ids) & set(loaders.noisy_case_ids)
    assert sorted(loaders.clean_case_ids + loaders.noisy_case_ids) == sorted(store["ids"])
    for name, loader in (("truth", loaders.clean), ("noisy", loaders.noisy)):
        for batch in itertools.islice(loader, 4):
            for b in range(3):
                cid = batch["case_id"][b]
                origin = tuple(int(o[b]) for o in batch["origin"])
                ref = reference(store["full"][cid][name], origin, PATCH)
                np.testing.assert_array_equal(batch["label"][b, 0].numpy(), ref)
    assert set(loaders.clean_case_ids) <= {"c0", "c1", "c2"}
    # the training run's config names the same draw (the trainer logs and checks it)
    from noisyseg.distributed.config import make_config

    config = make_config(
        {"store": store["url"], "reweight": "meta", "clean_count": 2, "patch_size": 8}
    )
    assert config.draw_clean_cases() == loaders.clean_case_ids
    for seed in range(6):
        random_draw = make_train_loaders(
            store["url"],
            label_set="noisy",
            patch_size=PATCH,
            batch_size=2,
            clean_count=2,
            clean_selection="random",
            seed=seed,
        ).clean_case_ids
        config = config.model_copy(update={"clean_selection": "random", "seed": seed})
        assert config.draw_clean_cases() == random_draw
    # the 'noisy' set differs from truth on c0/c2/c4: a clean stream reading it would fail above
    assert not np.array_equal(store["full"]["c0"]["truth"], store["full"]["c0"]["noisy"])

    no_clean = make_train_loaders(store["url"], label_set="truth", patch_size=PATCH, batch_size=2)
    assert no_clean.clean is None and no_clean.noisy_case_ids == store["ids"]


def test_make_train_loaders_with_workers(store: dict) -> None:
    loaders = make_train_loaders(
        store["url"],
        label_set="truth",
        patch_size=PATCH,
        batch_size=2,
        clean_fraction=0.3,
        num_workers=2,
        seed=1,
    )
    batch = next(iter(loaders.noisy))
    assert batch["image"].shape == (2, 2, *PATCH)
    batch = next(iter(loaders.clean))
    assert batch["label"].shape == (2, 1, *PATCH)


def test_bad_input(store: dict) -> None:
    with pytest.raises(NoisysegInputError, match="'missing' not found"):
        make_train_loaders(store["url"], label_set="missing", patch_size=PATCH, batch_size=2)
    with pytest.raises(NoisysegInputError, match="spatial axes"):
        make_train_loaders(store["url"], label_set="truth", patch_size=(8, 8), batch_size=2)
    with pytest.raises(NoisysegInputError, match="foreground_fraction"):
        PatchDataset(store["url"], ["c0"], patch_size=PATCH, foreground_fraction=1.5)
    with pytest.raises(NoisysegInputError, match="at least one case"):
        PatchDataset(store["url"], [], patch_size=PATCH)
    with pytest.raises(NoisysegInputError, match="case not in store"):
        take(PatchDataset(store["url"], ["nope"], patch_size=PATCH), 1)


def test_clean_only_subset_and_stream_seed(tmp_path) -> None:
    """train_subset='clean' streams only the clean cases; stream_seed moves patches, not the subset."""
    from noisyseg.storage.store import VolumeStore

    url = str(tmp_path / "s.zarr")
    store = VolumeStore.create(url, spatial_dims=3, channel_names=["t1"])
    rng = np.random.default_rng(0)
    for i in range(8):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:8, 4:8, 4:8] = 1
        store.write_case(
            f"c{i}",
            rng.normal(size=(1, 16, 16, 16)).astype(np.float32),
            {"truth": label},
            spacing=(1.0, 1.0, 1.0),
            split="train",
            clean=i < 4,
        )
    store.compact()
    expected = select_clean_cases(url, count=2, seed=3)
    common = dict(label_set="truth", patch_size=(8, 8, 8), batch_size=2, clean_count=2, seed=3)
    only = make_train_loaders(url, train_subset="clean", **common)
    assert only.noisy_case_ids == expected and only.clean is None
    seen = {cid for _, batch in zip(range(10), only.noisy) for cid in batch["case_id"]}
    assert seen <= set(expected)
    with pytest.raises(NoisysegInputError, match="train_subset"):
        make_train_loaders(
            url, train_subset="clean", label_set="truth", patch_size=(8, 8, 8), batch_size=2
        )
    a = make_train_loaders(url, stream_seed=100, **common)
    b = make_train_loaders(url, stream_seed=101, **common)
    assert a.clean_case_ids == b.clean_case_ids == expected
    first_a, first_b = next(iter(a.noisy)), next(iter(b.noisy))
    assert not torch.equal(first_a["image"], first_b["image"])


def test_train_config_clean_stream_fields() -> None:
    """The TrainConfig fields default to the loader's defaults and refuse what meta cannot do."""
    from noisyseg.distributed.config import make_config
    from noisyseg.storage import clean_subset, patches

    config = make_config({"store": "/s.zarr", "reweight": "meta", "clean_fraction": 0.05})
    assert config.clean_min_cases == patches.DEFAULT_CLEAN_MIN_CASES
    assert config.clean_foreground_fraction == patches.DEFAULT_CLEAN_FOREGROUND_FRACTION
    assert config.clean_foreground_sampling == patches.DEFAULT_CLEAN_FOREGROUND_SAMPLING
    assert config.clean_batch_size is None and config.class_balanced_clean is False
    assert config.clean_selection == clean_subset.DEFAULT_CLEAN_SELECTION
    with pytest.raises(NoisysegInputError, match="voxel-separable"):
        make_config({"store": "/s.zarr", "reweight": "meta", "clean_count": 1, "loss": "dicebce"})
    with pytest.raises(NoisysegInputError, match="clean_batch_size"):
        make_config(
            {
                "store": "/s.zarr",
                "reweight": "meta",
                "clean_count": 1,
                "batch_size": 4,
                "clean_batch_size": 2,
            }
        )
