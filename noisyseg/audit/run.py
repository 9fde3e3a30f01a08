"""Audit a labelled set with a trained model; repair it from accepted candidates.

Steps of ``noisyseg audit`` (each a function here):

1. :func:`load_model` — the checkpoint (registered model, MLflow run id, ``.pt`` file or Ray
   checkpoint directory, as ``noisyseg predict`` takes it) and the MLflow run it came from.
2. :func:`find_candidates` — sliding-window prediction of every case (in-process, or in parallel
   on Ray through :func:`noisyseg.distributed.inference.map_cases`) and the candidates of each
   case against the audited label set (:func:`noisyseg.candidates.extract_candidates`).
3. :func:`review_list` — the suspected missed lesions, ranked (:mod:`noisyseg.candidates` says by
   which rule and why); :func:`candidates_table` — one row each.
4. :func:`write_outputs` — ``candidates.csv``, ``candidates.parquet`` and, for the top K, one PNG
   per candidate under ``figures/`` (:mod:`noisyseg.audit.figures`).
5. :func:`log_audit` — an MLflow run of its own holding table and pictures, tagged with the
   model's run id (``noisyseg.model_run_id``) and, when the model's run is on the same tracking
   server, created in its experiment as its child (``mlflow.parentRunId``).

:func:`accept_candidates` writes a new label set = the audited set plus the voxels of accepted
candidates, for every case of the set, with provenance (model, candidates, source set, threshold,
sliding-window settings) in the set's metadata. The candidates are recomputed from the model (the
ids are stable for the same model, case, window settings and threshold), so accepting needs no
state from an earlier audit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from noisyseg.audit import DEFAULT_THRESHOLD
from noisyseg.audit.figures import display_channel, save_candidate_figure
from noisyseg.candidates import (
    Candidate,
    add_candidates,
    extract_candidates,
    parse_candidate_id,
    rank_candidates,
    suspected_missed,
)
from noisyseg.distributed.inference import InferenceSettings, map_cases
from noisyseg.distributed.prediction_io import case_affine
from noisyseg.distributed.registry import resolve_model
from noisyseg.distributed.tracking import finish_run, open_run, resolve_tracking_uri
from noisyseg.errors import NoisysegInputError
from noisyseg.storage.layout import TRUTH
from noisyseg.storage.store import VolumeStore
from noisyseg.storage.validate import check_label_set_name

#: Experiment of audit runs whose model run is not on the tracking server.
AUDIT_EXPERIMENT = "noisyseg-audit"
MODEL_RUN_TAG = "noisyseg.model_run_id"


@dataclass(frozen=True)
class ModelRef:
    """A trained model as the audit uses it: the checkpoint dict and where it came from."""

    source: str
    checkpoint: dict[str, Any] = field(repr=False)
    run_id: str | None


def load_model(source: str) -> ModelRef:
    """Load MODEL as ``noisyseg predict`` does (:func:`noisyseg.distributed.registry.
    resolve_model`: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/...``, a run
    id, a ``.pt`` file or a Ray checkpoint directory) and name its MLflow run (the run the
    reference names, else the ``mlflow_run_id`` a Ray checkpoint records, else ``None``)."""
    resolved = resolve_model(str(source))
    run_id = resolved.run_id or resolved.checkpoint.get("mlflow_run_id") or None
    return ModelRef(str(source), resolved.checkpoint, run_id)


# --------------------------------------------------------------------------------- candidates
def case_candidates(
    store: VolumeStore, case_id: str, probability: np.ndarray, label_set: str, threshold: float
) -> list[Candidate]:
    """All candidates of one case against ``label_set`` (spacing and affine from the store)."""
    labels = np.asarray(store.labels(case_id, label_set)[...])
    return extract_candidates(
        probability,
        labels,
        case_id=case_id,
        threshold=threshold,
        spacing=store.spacing(case_id),
        affine=case_affine(store, case_id),
    )


def find_candidates(
    checkpoint: dict[str, Any],
    store_url: str,
    case_ids: Sequence[str],
    settings: InferenceSettings,
    *,
    label_set: str,
    threshold: float = DEFAULT_THRESHOLD,
    workers: int = 1,
    use_ray: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, list[Candidate]]:
    """Predict ``case_ids`` and return every candidate per case (suspected or not).

    Probabilities are computed case by case (on Ray workers when ``workers > 1``) and dropped once
    the case's candidates are extracted, so memory holds one map at a time on the driver.
    """
    store = VolumeStore.open(store_url)
    found: dict[str, list[Candidate]] = {}
    maps = map_cases(
        checkpoint,
        store_url,
        case_ids,
        settings,
        method="probability",
        workers=workers,
        use_ray=use_ray,
        write=False,
    )
    for done, (case_id, probability) in enumerate(maps, start=1):
        found[case_id] = case_candidates(store, case_id, probability, label_set, threshold)
        if progress is not None:
            progress(case_id, done, len(case_ids))
    return {case_id: found[case_id] for case_id in case_ids}


def review_list(candidates_by_case: Mapping[str, Iterable[Candidate]]) -> list[Candidate]:
    """The suspected missed lesions of all cases, in review order."""
    every = [c for candidates in candidates_by_case.values() for c in candidates]
    return rank_candidates(suspected_missed(every))


def table_columns(spatial_dims: int) -> list[str]:
    """Columns of the review table, in order."""
    axes = ("z", "y", "x")[-spatial_dims:]
    return (
        ["rank", "case_id", "candidate_id", "number"]
        + [f"centroid_{a}" for a in axes]
        + ["world_x_mm", "world_y_mm", "world_z_mm", "voxels", "volume_mm3", "score"]
        + ["max_probability", "mean_probability", "distance_mm"]
    )


def candidates_table(ranked: Sequence[Candidate], spatial_dims: int) -> pd.DataFrame:
    """One row per suspected missed lesion, ``rank`` 1 = first to review."""
    rows = [{"rank": rank, **c.record()} for rank, c in enumerate(ranked, start=1)]
    return pd.DataFrame.from_records(rows, columns=table_columns(spatial_dims))


# ------------------------------------------------------------------------------------ outputs
def figure_title(rank: int, candidate: Candidate) -> str:
    x, y, z = candidate.centroid_world
    return (
        f"#{rank} {candidate.candidate_id}  p_max {candidate.max_probability:.3f}  "
        f"{candidate.volume_mm3:.0f} mm³  at ({x:.1f}, {y:.1f}, {z:.1f}) mm"
    )


def write_figures(
    store: VolumeStore, ranked: Sequence[Candidate], label_set: str, directory: Path
) -> list[Path]:
    """One PNG per candidate of ``ranked`` (``<rank>_<case>_<number>.png``); each case's image and
    labels are read once."""
    paths: list[Path] = []
    channel = display_channel(store.channel_names)
    cached: tuple[str, np.ndarray, np.ndarray] | None = None
    order = sorted(range(len(ranked)), key=lambda i: (ranked[i].case_id, i))
    for i in order:
        candidate = ranked[i]
        if cached is None or cached[0] != candidate.case_id:
            image = np.asarray(store.image(candidate.case_id)[...])
            labels = np.asarray(store.labels(candidate.case_id, label_set)[...])
            cached = (candidate.case_id, image, labels)
        _, image, labels = cached
        path = directory / f"{i + 1:03d}_{candidate.case_id}_{candidate.number}.png"
        save_candidate_figure(
            path,
            image,
            labels,
            candidate.full_mask(labels.shape),
            candidate.centroid_voxel,
            store.spacing(candidate.case_id),
            title=figure_title(i + 1, candidate),
            channel=channel,
        )
        paths.append(path)
    return sorted(paths)


@dataclass
class AuditOutputs:
    """Files an audit wrote."""

    directory: Path
    csv: Path
    parquet: Path
    figures: list[Path]


def write_outputs(
    store: VolumeStore,
    ranked: Sequence[Candidate],
    table: pd.DataFrame,
    *,
    label_set: str,
    directory: str | Path,
    top: int,
) -> AuditOutputs:
    """``candidates.csv``, ``candidates.parquet`` and the top-``top`` figures under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv, parquet = directory / "candidates.csv", directory / "candidates.parquet"
    table.to_csv(csv, index=False)
    table.to_parquet(parquet, index=False)
    figures = write_figures(store, ranked[: max(0, top)], label_set, directory / "figures")
    return AuditOutputs(directory, csv, parquet, figures)


# ------------------------------------------------------------------------------------- MLflow
def _model_experiment(client: mlflow.MlflowClient, run_id: str | None) -> str | None:
    """Name of the experiment holding ``run_id`` on this server, or None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return client.get_experiment(run.info.experiment_id).name


def log_audit(
    model: ModelRef,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    outputs: AuditOutputs,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> str:
    """Log an audit as its own MLflow run; returns the run id.

    The run goes to ``experiment`` if given, else the model run's experiment (as its child,
    ``mlflow.parentRunId``) when that run is on this tracking server, else
    :data:`AUDIT_EXPERIMENT`. It is tagged ``noisyseg.model_run_id`` whenever the model names a
    run, and holds ``candidates.csv``, ``candidates.parquet`` and ``figures/*.png``.
    """
    uri = tracking_uri or resolve_tracking_uri()
    client = mlflow.MlflowClient(uri)
    model_experiment = _model_experiment(client, model.run_id)
    name = experiment or model_experiment or AUDIT_EXPERIMENT
    stamp = time.strftime("%Y%m%d-%H%M%S")
    handle = open_run(uri, name, f"audit-{params.get('label_set', '')}-{stamp}", dict(params))
    status = "FAILED"
    try:
        tags = {"noisyseg.kind": "audit"}
        if model.run_id:
            tags[MODEL_RUN_TAG] = model.run_id
        if model_experiment is not None and name == model_experiment:
            tags["mlflow.parentRunId"] = str(model.run_id)
        for key, value in tags.items():
            client.set_tag(handle.run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(handle.run_id, key, float(value))
        client.log_artifact(handle.run_id, str(outputs.csv))
        client.log_artifact(handle.run_id, str(outputs.parquet))
        for path in outputs.figures:
            client.log_artifact(handle.run_id, str(path), artifact_path="figures")
        status = "FINISHED"
    finally:
        finish_run(uri, handle.run_id, status)
    return handle.run_id


# ------------------------------------------------------------------------------------- accept
def check_new_set(store: VolumeStore, source: str, name: str, *, overwrite: bool) -> str:
    """The new set's name must be safe, not ``truth``, not the source, and new unless
    ``overwrite``."""
    check_label_set_name(name)
    if name in (TRUTH, source):
        raise NoisysegInputError(
            f"--name {name!r}: the accepted labels go to a new set (never {TRUTH} or the "
            "audited set itself)",
            path=store.url,
        )
    if name in store.label_sets() and not overwrite:
        raise NoisysegInputError(
            f"label set {name!r} already exists (pass --overwrite to replace it)", path=store.url
        )
    return name


def parse_ids(candidate_ids: Iterable[str]) -> dict[str, list[int]]:
    """``{case: [numbers]}`` from ``<case>:<n>`` ids (comma-separated lists allowed).

    Raises:
        NoisysegInputError: a malformed or repeated id.
    """
    wanted: dict[str, list[int]] = {}
    for item in candidate_ids:
        for text in filter(None, (part.strip() for part in str(item).split(","))):
            try:
                case_id, number = parse_candidate_id(text)
            except ValueError as error:
                raise NoisysegInputError(str(error)) from None
            if number in wanted.get(case_id, []):
                raise NoisysegInputError(f"candidate id {text!r} given twice")
            wanted.setdefault(case_id, []).append(number)
    if not wanted:
        raise NoisysegInputError("--accept needs at least one candidate id")
    return wanted


def pick_accepted(
    wanted: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[Candidate]], threshold: float
) -> dict[str, list[Candidate]]:
    """The candidates named by ``wanted`` among those recomputed; refuses unknown ids and
    candidates that touch a labelled lesion (they are not suspected missed lesions)."""
    accepted: dict[str, list[Candidate]] = {}
    for case_id, numbers in wanted.items():
        by_number = {c.number: c for c in found[case_id]}
        for number in numbers:
            candidate = by_number.get(number)
            if candidate is None:
                raise NoisysegInputError(
                    f"unknown candidate id {case_id}:{number} (the case has {len(by_number)} "
                    f"candidates at threshold {threshold:g})",
                    case=case_id,
                )
            if not candidate.suspected_missed:
                raise NoisysegInputError(
                    f"candidate {candidate.candidate_id} touches a labelled lesion: it is not a "
                    "suspected missed lesion",
                    case=case_id,
                )
            accepted.setdefault(case_id, []).append(candidate)
    return accepted


def _provenance_row(candidate: Candidate) -> dict[str, Any]:
    """A candidate's table row as plain JSON (an infinite distance becomes ``None``)."""
    row = {k: v for k, v in candidate.record().items() if k != "number"}
    if not np.isfinite(row["distance_mm"]):
        row["distance_mm"] = None
    return row


def accept_candidates(
    model: ModelRef,
    store_url: str,
    settings: InferenceSettings,
    *,
    label_set: str,
    new_name: str,
    candidate_ids: Iterable[str],
    threshold: float = DEFAULT_THRESHOLD,
    overwrite: bool = False,
    workers: int = 1,
    use_ray: bool | None = None,
) -> dict[str, Any]:
    """Write label set ``new_name`` = ``label_set`` plus the accepted candidates' voxels.

    Everything is checked before anything is written: the new name, the ids' form, their cases,
    then (after predicting only those cases) that each id exists and is a suspected missed lesion.
    Every case holding ``label_set`` gets the new set; ``truth`` and ``label_set`` are untouched.

    Returns:
        the provenance stored with the set (``index/labelsets/<new_name>.json`` ``params``).
    """
    store = VolumeStore.open(store_url, "r+")
    if label_set not in store.label_sets():
        raise NoisysegInputError(f"label set {label_set!r} not in store", path=store.url)
    check_new_set(store, label_set, new_name, overwrite=overwrite)
    wanted = parse_ids(candidate_ids)
    for case_id in wanted:
        if not store.has_case(case_id):
            raise NoisysegInputError("case of a candidate id is not in the store", case=case_id)
        if label_set not in store.case_label_sets(case_id):
            raise NoisysegInputError(f"case has no label set {label_set!r}", case=case_id)
    found = find_candidates(
        model.checkpoint,
        store_url,
        list(wanted),
        settings,
        label_set=label_set,
        threshold=threshold,
        workers=workers,
        use_ray=use_ray,
    )
    accepted = pick_accepted(wanted, found, threshold)
    provenance = {
        "mode": "audit-accept",
        "source": label_set,
        "model": model.source,
        "model_run_id": model.run_id,
        "threshold": float(threshold),
        "inference": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()
        },
        "candidates": [_provenance_row(c) for cases in accepted.values() for c in cases],
    }
    records = {}
    for case_id in store.case_ids():
        if label_set not in store.case_label_sets(case_id):
            continue
        labels = np.asarray(store.labels(case_id, label_set)[...])
        merged = add_candidates(labels, accepted.get(case_id, []))
        records[case_id] = store.write_label_set(case_id, new_name, merged, overwrite=overwrite)
    store.register_label_set(new_name, records, provenance)
    return provenance
