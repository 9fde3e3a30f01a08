"""``noisyseg audit``: review table, pictures, MLflow run, ``--accept`` (noisyseg.audit).

Unit tests use hand-made masks; the integration test runs the whole path on a phantom store with
a censored label set, a briefly trained model, a real MLflow server and real Zarr stores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from cluster_utils import make_ball_store

from noisyseg.audit.figures import display_channel, save_candidate_figure
from noisyseg.audit.run import (
    candidates_table,
    check_new_set,
    parse_ids,
    pick_accepted,
    review_list,
    table_columns,
)
from noisyseg.candidates import extract_candidates, ranking_key
from noisyseg.cli import main
from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import label_lesions


def _two_cases():
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    probability = np.zeros(labels.shape, np.float32)
    probability[1:3, 1:3, 3] = 0.9  # touches the labelled lesion
    probability[6:8, 6:9, 6:9] = 0.8  # suspected, 18 voxels
    probability[5, 1, 10] = 0.97  # suspected, 1 voxel, highest score
    found = {
        "a": extract_candidates(probability, labels, case_id="a", spacing=(2.0, 1.0, 1.0)),
        "b": extract_candidates(probability, np.zeros_like(labels), case_id="b"),
    }
    return labels, probability, found


def test_review_list_keeps_only_suspected_candidates_in_ranking_order() -> None:
    _, _, found = _two_cases()
    ranked = review_list(found)
    touching = [c.candidate_id for c in found["a"] if c.touches_label]
    assert len(touching) == 1 and touching[0] not in [c.candidate_id for c in ranked]
    assert len(ranked) == 2 + 3  # case a: 2 suspected; case b: all 3 (nothing labelled)
    assert [ranking_key(c) for c in ranked] == sorted(ranking_key(c) for c in ranked)
    assert ranked[0].max_probability == pytest.approx(0.97)
    table = candidates_table(ranked, 3)
    assert list(table.columns) == table_columns(3)
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]
    assert table["candidate_id"].tolist() == [c.candidate_id for c in ranked]
    assert {cid.split(":")[0] for cid in table["candidate_id"]} == {"a", "b"}
    assert all(f"{c.case_id}:{c.number}" == c.candidate_id for c in ranked)
    empty = candidates_table([], 2)
    assert list(empty.columns) == table_columns(2) and empty.empty


def _colour_pixels(png: Path) -> tuple[int, int]:
    """Counts of clearly red and clearly green pixels of a PNG."""
    rgb = mpimg.imread(png)[..., :3]
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    green = (rgb[..., 1] > 0.8) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    return int(red.sum()), int(green.sum())


def test_candidate_picture_outlines_candidate_and_labels(tmp_path: Path) -> None:
    labels, probability, found = _two_cases()
    image = np.random.default_rng(0).normal(size=(1, *labels.shape)).astype(np.float32)
    candidate = next(c for c in found["a"] if c.voxels == 18)
    near_label = np.zeros_like(labels)
    near_label[6:8, 2:4, 2:4] = 1  # a labelled lesion in the candidate's axial slices
    path = save_candidate_figure(
        tmp_path / "c.png",
        image,
        near_label,
        candidate.full_mask(labels.shape),
        candidate.centroid_voxel,
        (2.0, 1.0, 1.0),
        title="test",
    )
    red, green = _colour_pixels(path)
    # the same picture without labels and without a candidate: only the legend is coloured
    bare = save_candidate_figure(
        tmp_path / "bare.png",
        image,
        np.zeros_like(labels),
        np.zeros(labels.shape, bool),
        candidate.centroid_voxel,
        (2.0, 1.0, 1.0),
    )
    bare_red, bare_green = _colour_pixels(bare)
    assert red > bare_red + 20 and green > bare_green + 20


def test_pictures_show_the_contrast_enhanced_t1_when_there_is_one() -> None:
    assert display_channel(["t1", "t1c", "t2", "flair"]) == 1
    assert display_channel(["FLAIR", "T1Gd"]) == 1
    assert display_channel(["red", "green", "blue"]) == 0


def test_parse_ids_accepts_lists_and_refuses_bad_or_repeated_ids() -> None:
    assert parse_ids(["a:1,b:2", "a:3"]) == {"a": [1, 3], "b": [2]}
    with pytest.raises(NoisysegInputError, match="not of the form"):
        parse_ids(["a-1"])
    with pytest.raises(NoisysegInputError, match="given twice"):
        parse_ids(["a:1", "a:1"])
    with pytest.raises(NoisysegInputError, match="at least one"):
        parse_ids([","])


def test_pick_accepted_refuses_unknown_and_touching_candidates() -> None:
    _, _, found = _two_cases()
    touching = next(c for c in found["a"] if c.touches_label)
    suspected = next(c for c in found["a"] if not c.touches_label)
    chosen = pick_accepted({"a": [suspected.number]}, found, 0.5)
    assert chosen == {"a": [suspected]}
    with pytest.raises(NoisysegInputError, match=r"unknown candidate id a:99 \(the case has 3"):
        pick_accepted({"a": [99]}, found, 0.5)
    with pytest.raises(NoisysegInputError, match="touches a labelled lesion"):
        pick_accepted({"a": [touching.number]}, found, 0.5)


def test_new_set_name_rules(tmp_path: Path) -> None:
    from noisyseg.storage.store import VolumeStore

    store = VolumeStore.open(make_ball_store(tmp_path / "s.zarr", train=2, val=0, size=12))
    assert check_new_set(store, "noisy", "noisy-repaired", overwrite=False) == "noisy-repaired"
    for name, rule in (("truth", "new set"), ("noisy", "new set"), ("../x", "unsafe")):
        with pytest.raises(NoisysegInputError, match=rule):
            check_new_set(store, "noisy", name, overwrite=False)
    with pytest.raises(NoisysegInputError, match="already exists"):
        check_new_set(store, "other", "noisy", overwrite=False)
    assert check_new_set(store, "other", "noisy", overwrite=True) == "noisy"


def test_cli_refuses_bad_flags_in_one_line(tmp_path: Path, capsys) -> None:
    store = make_ball_store(tmp_path / "s.zarr", train=1, val=0, size=12)
    base = ["audit", "--model", str(tmp_path / "none.pt"), "--store", store, "--labels", "noisy"]
    cases = [
        (["--threshold", "0"], "--threshold must be in (0, 1]"),
        (["--top", "-1"], "--top must be >= 0"),
        (["--accept", "case000:1"], "--accept needs --name"),
        (["--name", "x"], "--name is only used with --accept"),
        (["--labels", "nope"], "label set 'nope' not in store"),
        (["--accept", "case000:1", "--name", "noisy"], "never truth or the audited set"),
        (["--labels", "truth", "--accept", "case000:1", "--name", "noisy"], "already exists"),
        (["--labels", "truth", "--accept", "case000", "--name", "new"], "not of the form"),
        ([], "checkpoint file not found"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


# ------------------------------------------------------------------------------ integration
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` for this module, with a start-up allowance for a loaded machine
    (it needed over 90 s with five test suites sharing two cores)."""
    from noisyseg.distributed.mlflow_server import LocalMlflowServer

    server = LocalMlflowServer.start(tmp_path_factory.mktemp("mlflow"), timeout=300.0)
    try:
        yield server
    finally:
        server.stop()


def _train_few_steps(store_url: str, label_set: str, root: Path) -> Path:
    """A few SGD steps in-process (LocalContext) from MONAI's init (p near 0.5, so candidates
    exist at a high quantile); returns the checkpoint file."""
    from noisyseg.distributed.config import check_against_store, make_config
    from noisyseg.distributed.train_loop import LocalContext, run_worker

    config = make_config(
        {
            "store": store_url,
            "labels": label_set,
            "loss": "lopsided",
            "steps": 4,
            "patch_size": 16,
            "batch_size": 2,
            "channels": [4, 8],
            "num_res_units": 0,
            "output_prior": 0,
            "val_cases": 0,
            "checkpoint_interval": 4,
            "log_interval": 100,
        }
    )
    loop = {
        "config": config.model_dump(mode="json"),
        "store_info": check_against_store(config).model_dump(),
        "mlflow": None,
    }
    run_worker(loop, LocalContext(checkpoint_root=root))
    return root / "checkpoint_0000004" / "state.pt"


@pytest.mark.integration
def test_audit_and_accept_two_candidates_end_to_end(tmp_path: Path, mlflow_server, monkeypatch):
    import mlflow
    from scipy import ndimage

    from noisyseg.distributed.checkpoints import model_from_checkpoint, read_state
    from noisyseg.distributed.sliding_window import case_normalization_stats, predict_volume
    from noisyseg.storage.corrupt import corrupt_store
    from noisyseg.storage.phantoms import synth_store
    from noisyseg.storage.store import VolumeStore

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(tmp_path)
    url = str(tmp_path / "brain.zarr")
    synth_store(
        url,
        kind="brain-mets",
        cases=5,
        seed=3,
        test_fraction=0.2,
        val_fraction=0.0,
        generator_opts={"shape": [32, 40, 32]},
        progress=False,
    )
    censored = corrupt_store(url, mode="random", rate=0.5, seed=0, progress=False).name
    state = _train_few_steps(url, censored, tmp_path / "ckpt")

    # the model as an MLflow run holding checkpoint/final.pt: MODEL is passed as its run id
    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment("audit-test-models")
    model_run = client.create_run(experiment).info.run_id
    final = tmp_path / "final.pt"
    shutil.copy(state, final)
    client.log_artifact(model_run, str(final), artifact_path="checkpoint")

    # candidates must exist: threshold at a high quantile of one case's probabilities
    store = VolumeStore.open(url)
    train = store.case_ids(split="train")
    model, _ = model_from_checkpoint(read_state(state))
    probabilities = {
        case: predict_volume(
            model,
            store.image(case),
            roi_size=(16, 16, 16),
            overlap=float(read_state(state)["config"].get("val_overlap", 0.25)),
            sw_batch_size=4,
            stats=case_normalization_stats(store, case),
        )
        for case in train
    }
    threshold = float(f"{np.quantile(probabilities[train[0]], 0.995):.6f}")
    out = tmp_path / "audit-out"
    argv = ["audit", "--model", model_run, "--store", url, "--labels", censored]
    argv += ["--threshold", str(threshold), "--top", "3", "--output", str(out)]
    assert main(argv) == 0

    table = pd.read_csv(out / "candidates.csv")
    parquet = pd.read_parquet(out / "candidates.parquet")
    assert list(parquet.columns) == list(table.columns)
    assert parquet["candidate_id"].tolist() == table["candidate_id"].tolist()
    np.testing.assert_allclose(parquet["world_x_mm"], table["world_x_mm"], rtol=1e-9)
    assert len(table) >= 3
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    assert (table["score"].diff().dropna() <= 0).all()
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        f"{r:03d}_{c.split(':')[0]}_{c.split(':')[1]}.png"
        for r, c in zip(table["rank"][:3], table["candidate_id"][:3])
    ]
    # every listed candidate is a component of p >= t (independent check on the probabilities)
    # that shares no voxel with, and does not touch, the audited labels
    for row in table.itertuples():
        case, number = row.candidate_id.split(":")
        comps, _ = label_lesions(probabilities[case] >= threshold)
        mask = comps == int(number)
        assert int(mask.sum()) == row.voxels
        assert float(probabilities[case][mask].max()) == pytest.approx(
            row.max_probability, abs=1e-6
        )
        old = np.asarray(store.labels(case, censored)[...]) != 0
        grown = ndimage.binary_dilation(old, structure=np.ones((3, 3, 3), bool))
        assert not (grown & mask).any()

    # the audit is an MLflow run of its own, a child of the model's run, holding the outputs
    audits = client.search_runs([experiment], filter_string="tags.`noisyseg.kind` = 'audit'")
    assert len(audits) == 1
    audit = audits[0]
    assert audit.data.tags["noisyseg.model_run_id"] == model_run
    assert audit.data.tags["mlflow.parentRunId"] == model_run
    assert audit.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(audit.info.run_id)}
    assert {"candidates.csv", "candidates.parquet", "figures"} <= names
    assert len(client.list_artifacts(audit.info.run_id, "figures")) == 3

    # accept the two best candidates into a new set
    accepted = table["candidate_id"][:2].tolist()
    truth_before = {c: np.asarray(store.labels(c, "truth")[...]).copy() for c in train}
    old_before = {c: np.asarray(store.labels(c, censored)[...]).copy() for c in train}
    info_before = store.label_set_info(censored)
    accept = argv[:7] + ["--threshold", str(threshold), "--accept", *accepted]
    assert main(accept + ["--name", "repaired"]) == 0
    store = VolumeStore.open(url)
    assert "repaired" in store.label_sets()
    for case in train:
        new = np.asarray(store.labels(case, "repaired")[...]) != 0
        old = old_before[case] != 0
        np.testing.assert_array_equal(
            np.asarray(store.labels(case, "truth")[...]), truth_before[case]
        )
        np.testing.assert_array_equal(
            np.asarray(store.labels(case, censored)[...]), old_before[case]
        )
        assert not (old & ~new).any(), "an old lesion voxel was lost"
        mine = [a for a in accepted if a.split(":")[0] == case]
        _, n_old = label_lesions(old)
        _, n_new = label_lesions(new)
        assert n_new == n_old + len(mine), case
        added = new & ~old
        expected = np.zeros_like(added)
        comps, _ = label_lesions(probabilities[case] >= threshold)
        for candidate_id in mine:
            expected |= comps == int(candidate_id.split(":")[1])
        np.testing.assert_array_equal(added, expected)
    assert store.label_set_info(censored) == info_before
    params = store.label_set_info("repaired")["params"]
    assert params["source"] == censored and params["model_run_id"] == model_run
    assert [c["candidate_id"] for c in params["candidates"]] == accepted

    # refusals: the name exists now; an unknown id; both one line, exit status 2
    assert main(accept + ["--name", "repaired"]) == 2
    case = accepted[0].split(":")[0]
    assert main(argv[:7] + ["--threshold", "0.5", "--accept", f"{case}:999", "--name", "x2"]) == 2
    assert "x2" not in VolumeStore.open(url).label_sets()
    assert main(accept + ["--name", "repaired", "--overwrite"]) == 0
