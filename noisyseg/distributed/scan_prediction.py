"""Predict new scans: probability map, mask, lesion instances and lesion table per case, in the
scan's own geometry, in parallel over cases with Ray Data.

Per case (:meth:`ScanPredictor.predict_case`), under ``<output>/<case_id>/``:

* ``probability.nii.gz`` — float32 lesion probability in ``[0, 1]``;
* ``mask.nii.gz`` — uint8, 1 where the probability is at least the threshold;
* ``lesions.nii.gz`` — lesion instances: connected components of the mask (26-connectivity),
  numbered 1..K by their first voxel in NIfTI ``(i, j, k)`` order; uint16 (int32 above 65535);
* ``lesions.csv`` (or ``.parquet``) — one row per lesion, see :func:`lesion_table`.

All three maps have exactly the input file's shape and affine (its header is copied). The run's
``summary.csv`` (or ``.parquet``) has one row per case: status, lesion count, total lesion
volume, highest probability, seconds, the error line of a failed case.

A raw volume becomes network input by :mod:`noisyseg.distributed.scan_inputs`
(:func:`predict_raw_volume`); the registered MLflow model
(:mod:`noisyseg.distributed.registry`) calls the same function, so both give the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from noisyseg.distributed.checkpoints import model_from_checkpoint
from noisyseg.distributed.prediction_io import case_affine
from noisyseg.distributed.scan_inputs import (
    LoadedScan,
    Preprocessing,
    ScanCase,
    load_scan,
    spacing_grid,
    to_canonical,
    zscore,
)
from noisyseg.distributed.sliding_window import normalize_image, predict_volume
from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import label_lesions
from noisyseg.storage import geometry as G
from noisyseg.storage.normalise import case_stats
from noisyseg.storage.store import VolumeStore

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

TABLE_FORMATS = ("csv", "parquet")
SUMMARY_NAME = "summary"
LESION_COLUMNS = [
    "lesion_id",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
    "center_of_mass_x_mm",
    "center_of_mass_y_mm",
    "center_of_mass_z_mm",
    "voxel_i",
    "voxel_j",
    "voxel_k",
    "n_voxels",
    "volume_mm3",
    "max_probability",
    "mean_probability",
]


# ----------------------------------------------------------------------------------------------
# One volume through the network


def predict_raw_volume(
    model: nn.Module,
    volume: np.ndarray,
    preprocessing: Preprocessing,
    *,
    spacing: Sequence[float] | None = None,
    device: str = "cpu",
    amp: str = "none",
) -> np.ndarray:
    """Lesion probability of a raw-intensity volume already in the model's voxel orientation.

    Args:
        model: the trained U-Net (one logit channel).
        volume: ``(C, Z, Y, X)`` raw intensities, C = the model's channels.
        preprocessing: the model's :class:`Preprocessing`.
        spacing: the volume's voxel size in mm, ``(z, y, x)``; when given and the model has a
            target spacing, the volume is resampled to it (as ingest resampled the
            training images: linear, or B-spline when ``extra["image_interpolation"]`` says so;
            :func:`noisyseg.storage.geometry.resample`) and the probabilities back.
        device, amp: torch device and autocast of the forward passes.

    Returns:
        ``(Z, Y, X)`` float32 probabilities in ``[0, 1]`` on the volume's own grid.
    """
    data = np.asarray(volume, dtype=np.float32)
    dims = preprocessing.spatial_dims
    if data.ndim != dims + 1 or data.shape[0] != preprocessing.in_channels:
        axes = ", ".join("ZYX"[-dims:])
        raise NoisysegInputError(
            f"model expects a ({preprocessing.in_channels}, {axes}) volume, got shape {data.shape}"
        )
    target = preprocessing.target_spacing
    if target is None or spacing is None or dims != 3:
        return network_probability(model, data, preprocessing, device=device, amp=amp)
    source = spacing_grid(data.shape[:0:-1], tuple(float(s) for s in spacing)[::-1])
    grid = G.resampled_grid(source, target)
    # images as ingest resampled the training cases (linear, or B-spline: extra["image_interpolation"])
    interpolation = preprocessing.extra.get("image_interpolation") or G.DEFAULT_IMAGE_INTERPOLATION
    order = G.interpolation_order(interpolation)
    resampled = G.resample(
        data.transpose(3, 2, 1, 0), source, grid, order=order, channels_last=True
    )
    probability = network_probability(
        model, resampled.transpose(3, 2, 1, 0), preprocessing, device=device, amp=amp
    )
    back = G.resample(probability.transpose(2, 1, 0), grid, source, order=1)
    return np.clip(back.transpose(2, 1, 0), 0.0, 1.0).astype(np.float32)


def network_probability(
    model: nn.Module,
    volume: np.ndarray,
    preprocessing: Preprocessing,
    *,
    device: str = "cpu",
    amp: str = "none",
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Sliding-window probability of a ``(C, *S)`` volume on the model's grid, z-scored by
    :func:`zscore` (or with the given per-channel ``stats``, e.g. a stored case's). -> ``(*S)``."""
    data = zscore(volume) if stats is None else normalize_image(volume, stats)
    return predict_volume(
        model,
        data,
        roi_size=preprocessing.roi_size,
        overlap=preprocessing.overlap,
        sw_batch_size=preprocessing.sw_batch_size,
        device=device,
        amp=amp,  # type: ignore[arg-type]
        normalize=False,
    )


def scan_probability(
    model: nn.Module,
    scan: LoadedScan,
    preprocessing: Preprocessing,
    *,
    device: str = "cpu",
    amp: str = "none",
) -> np.ndarray:
    """Probability map of a scan read from its files, on the files' own grid ``(I, J, K)``:
    reoriented (when the model's cases were) and resampled as ingest did, predicted, and taken
    back with :func:`noisyseg.storage.geometry.to_original`."""
    image, canonical = to_canonical(scan, preprocessing.orientation)
    volume = np.ascontiguousarray(image.transpose(3, 2, 1, 0))  # (C, Z, Y, X)
    probability = predict_raw_volume(
        model, volume, preprocessing, spacing=canonical.spacing[::-1], device=device, amp=amp
    )
    if preprocessing.orientation is None:
        return np.ascontiguousarray(probability.transpose(2, 1, 0))
    return G.to_original(probability, G.Geometry(scan.grid, canonical), order=1)


# ----------------------------------------------------------------------------------------------
# Lesions


def label_instances(mask: np.ndarray) -> np.ndarray:
    """Lesion instances of a binary mask: :func:`noisyseg.lesions.label_lesions` (26-connectivity
    in 3D, numbered 1..K in raster order of their first voxel), as uint16, or int32 above 65535
    lesions."""
    labels, count = label_lesions(mask)
    dtype = np.uint16 if count <= np.iinfo(np.uint16).max else np.int32
    return labels.astype(dtype, copy=False)


def lesion_table(
    probability: np.ndarray, instances: np.ndarray, affine: np.ndarray
) -> pd.DataFrame:
    """One row per lesion of an instance map (NIfTI voxel order ``(i, j, k)``).

    Columns (:data:`LESION_COLUMNS`): ``lesion_id``; ``centroid_{x,y,z}_mm`` — the lesion voxel
    nearest its centre of mass, in world mm (the affine's frame, RAS+ for NIfTI), so it lies
    inside the lesion even when the lesion is ring- or C-shaped; ``center_of_mass_{x,y,z}_mm``
    — the mean of the lesion's voxel centres in world mm (may fall outside a non-convex lesion);
    ``voxel_{i,j,k}`` — the centroid voxel; ``n_voxels``; ``volume_mm3`` = voxels x
    ``|det(affine[:3, :3])|``; ``max_probability`` and ``mean_probability`` over the lesion.
    """
    count = int(instances.max(initial=0))
    if count == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in LESION_COLUMNS})
    ids = np.arange(1, count + 1)
    voxel_volume = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    sizes = ndimage.sum_labels(np.ones_like(probability, dtype=np.float64), instances, ids)
    maxima = ndimage.maximum(probability, instances, ids)
    means = ndimage.mean(probability, instances, ids)
    centres = np.asarray(ndimage.center_of_mass(np.ones(instances.shape), instances, ids))
    centres = centres.reshape(count, instances.ndim)
    inside = np.zeros_like(centres, dtype=np.int64)
    for index, box in enumerate(ndimage.find_objects(instances, max_label=count)):
        if box is None:
            continue
        voxels = np.argwhere(instances[box] == index + 1) + [s.start for s in box]
        nearest = np.argmin(((voxels - centres[index]) ** 2).sum(axis=1))
        inside[index] = voxels[nearest]
    homogeneous = np.ones((count, 4))
    homogeneous[:, : instances.ndim] = centres
    world_com = homogeneous @ np.asarray(affine, dtype=np.float64).T
    homogeneous[:, : instances.ndim] = inside
    world_in = homogeneous @ np.asarray(affine, dtype=np.float64).T
    table = pd.DataFrame({"lesion_id": ids})
    for axis, name in enumerate("xyz"):
        table[f"centroid_{name}_mm"] = world_in[:, axis]
    for axis, name in enumerate("xyz"):
        table[f"center_of_mass_{name}_mm"] = world_com[:, axis]
    for axis, name in enumerate("ijk"[: instances.ndim]):
        table[f"voxel_{name}"] = inside[:, axis]
    table["n_voxels"] = sizes.astype(np.int64)
    table["volume_mm3"] = sizes * voxel_volume
    table["max_probability"] = np.asarray(maxima, dtype=np.float64)
    table["mean_probability"] = np.asarray(means, dtype=np.float64)
    return table


def write_table(table: pd.DataFrame, path_without_suffix: Path, table_format: str) -> Path:
    """Write ``table`` as ``<path>.csv`` or ``<path>.parquet``; returns the file."""
    path = path_without_suffix.with_name(f"{path_without_suffix.name}.{table_format}")
    if table_format == "parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path


def write_map(path: Path, data: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Save a map ``(I, J, K)`` with the input's affine (and header, data type replaced)."""
    header = nib.Nifti1Header() if header is None else header.copy()
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, affine, header=header)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# One case, end to end


class ScanPredictor:
    """One model, predicting cases one at a time and writing their outputs.

    Used in-process and as the Ray Data UDF (``map_batches(ScanPredictor, batch_size=1,
    fn_constructor_kwargs=...)`` on an actor pool, see
    :func:`noisyseg.distributed.ray_utils.stream_actor_pool`): one model per actor, built once.
    """

    def __init__(
        self,
        checkpoint: dict[str, Any],
        preprocessing: dict[str, Any],
        output_dir: str,
        *,
        threshold: float = 0.5,
        table_format: str = "csv",
        device: str = "cpu",
        amp: str = "none",
        num_threads: int | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, _ = model_from_checkpoint(checkpoint)
        self.model.to(device)
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.output_dir = Path(output_dir)
        self.threshold = float(threshold)
        self.table_format = table_format
        self.device = device
        self.amp = amp
        self._stores: dict[str, VolumeStore] = {}

    def probability(self, case: ScanCase) -> tuple[np.ndarray, np.ndarray, Any]:
        """``(probability (I, J, K) float32 on the input's grid, its affine, NIfTI header)``."""
        if case.store_url:
            return self._store_probability(case)
        scan = load_scan(case, in_channels=self.preprocessing.in_channels)
        probability = scan_probability(
            self.model, scan, self.preprocessing, device=self.device, amp=self.amp
        )
        return probability, scan.grid.affine, scan.header

    def _store_probability(self, case: ScanCase) -> tuple[np.ndarray, np.ndarray, Any]:
        """A store case: the stored image (already on the model's grid) with the case's recorded
        statistics (the training loader's rule), taken back to its source file's grid when
        ingest recorded it (``geometry``), else written on the stored grid."""
        assert case.store_url is not None
        if case.store_url not in self._stores:
            self._stores[case.store_url] = VolumeStore.open(case.store_url)
        store = self._stores[case.store_url]
        if store.spatial_dims != 3:
            raise NoisysegInputError("NIfTI output needs a 3D store", path=case.store_url)
        image = np.asarray(store.image(case.case_id)[...], dtype=np.float32)
        probability = network_probability(
            self.model,
            image,
            self.preprocessing,
            device=self.device,
            amp=self.amp,
            stats=case_stats(store, case.case_id),
        )
        recorded = store.case_attrs(case.case_id).get("geometry")
        if recorded:
            geometry = G.Geometry.from_json(recorded)
            back = G.to_original(probability, geometry, order=1)
            return np.clip(back, 0.0, 1.0), geometry.original.affine, None
        affine = case_affine(store, case.case_id)
        return np.ascontiguousarray(probability.transpose(2, 1, 0)), affine, None

    def predict_case(self, case: ScanCase) -> dict[str, Any]:
        """Predict and write one case; returns its summary row (``status`` ``ok`` or ``failed``
        with the one-line ``error``; a failed case writes nothing)."""
        start = time.perf_counter()
        row: dict[str, Any] = {
            "case_id": case.case_id,
            "status": "ok",
            "error": "",
            "input": case.files[0] if case.files else (case.store_url or ""),
            "n_lesions": 0,
            "lesion_volume_mm3": 0.0,
            "max_probability": float("nan"),
            "output": "",
            "seconds": 0.0,
        }
        try:
            probability, affine, header = self.probability(case)
        except NoisysegInputError as error:
            row.update(status="failed", error=str(error), seconds=time.perf_counter() - start)
            return row
        mask = (probability >= self.threshold).astype(np.uint8)
        instances = label_instances(mask)
        table = lesion_table(probability, instances, affine)
        folder = self.output_dir / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        write_map(folder / "probability.nii.gz", probability.astype(np.float32), affine, header)
        write_map(folder / "mask.nii.gz", mask, affine, header)
        write_map(folder / "lesions.nii.gz", instances, affine, header)
        write_table(table, folder / "lesions", self.table_format)
        row.update(
            n_lesions=len(table),
            lesion_volume_mm3=float(table["volume_mm3"].sum()) if len(table) else 0.0,
            max_probability=float(probability.max()),
            output=str(folder),
            seconds=time.perf_counter() - start,
        )
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data batch (columns ``case_id``, ``files`` (``"\\n"``-joined), ``problem``,
        ``problem_path``) -> summary rows as columns."""
        rows = []
        for index, case_id in enumerate(batch["case_id"]):
            files = [f for f in str(batch["files"][index]).split("\n") if f]
            case = ScanCase(
                str(case_id),
                files,
                problem=str(batch["problem"][index]) or None,
                problem_path=str(batch["problem_path"][index]) or None,
                store_url=str(batch["store_url"][index]) or None,
            )
            rows.append(self.predict_case(case))
        return {key: np.asarray([r[key] for r in rows]) for key in rows[0]}


# ----------------------------------------------------------------------------------------------
# Many cases


def _case_items(cases: Sequence[ScanCase]) -> list[dict[str, str]]:
    return [
        {
            "case_id": c.case_id,
            "files": "\n".join(c.files),
            "problem": c.problem or "",
            "problem_path": c.problem_path or "",
            "store_url": c.store_url or "",
        }
        for c in cases
    ]


def predict_scans(
    cases: Sequence[ScanCase],
    checkpoint: dict[str, Any],
    preprocessing: Preprocessing,
    output_dir: str,
    *,
    threshold: float = 0.5,
    table_format: str = "csv",
    device: str = "cpu",
    amp: str = "none",
    workers: int = 1,
    gpu: bool = False,
    use_ray: bool = False,
    progress: Callable[[dict[str, Any], int, int], None] | None = None,
) -> pd.DataFrame:
    """Predict every case and write its outputs plus ``<output_dir>/summary.<format>``.

    In-process (one model) or with Ray Data: ``ray.data.from_items(cases).map_batches(
    ScanPredictor, batch_size=1, num_gpus=1 if gpu else 0)`` on an actor pool of up to
    ``workers`` models (:func:`noisyseg.distributed.ray_utils.stream_actor_pool`), results
    streamed back as cases finish (``progress`` is called for each). Ray is started when not
    running (and shut down at the end).

    Returns:
        The summary table, one row per case in ``cases`` order.
    """
    if table_format not in TABLE_FORMATS:
        raise NoisysegInputError(f"table format must be csv or parquet, got {table_format!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {
        "checkpoint": checkpoint,
        "preprocessing": preprocessing.to_dict(),
        "output_dir": str(out.resolve()),
        "threshold": threshold,
        "table_format": table_format,
        "device": "cuda" if gpu else device,
        "amp": amp,
    }
    rows: dict[str, dict[str, Any]] = {}
    results = (
        _ray_rows(cases, kwargs, workers=workers, gpu=gpu)
        if use_ray
        else (ScanPredictor(**kwargs).predict_case(c) for c in cases)
    )
    for row in results:
        rows[row["case_id"]] = row
        if progress is not None:
            progress(row, len(rows), len(cases))
    summary = pd.DataFrame([rows[c.case_id] for c in cases])
    write_table(summary, out / SUMMARY_NAME, table_format)
    return summary


def _ray_rows(
    cases: Sequence[ScanCase], kwargs: dict[str, Any], *, workers: int, gpu: bool
) -> Iterator[dict[str, Any]]:
    """Summary rows from a Ray Data actor pool of ``workers`` models, yielded as cases finish."""
    from noisyseg.distributed.ray_utils import stream_actor_pool  # heavy (Ray): only on Ray

    return stream_actor_pool(_case_items(cases), ScanPredictor, kwargs, workers=workers, gpu=gpu)
