"""Where things live in a noisyseg store and how its arrays are laid out (OME-Zarr 0.5).

Layout (``<root>`` is any fsspec URL: a plain path, ``file://``, ``s3://``, ``gs://``)::

    <root>/zarr.json                     root group; attributes["noisyseg"] = store metadata;
                                         attributes["ome"] = {"version": "0.5",
                                         "bioformats2raw.layout": 3}: an OME image collection
    <root>/OME/zarr.json                 attributes["ome"]["series"] = ["cases/<case_id>", ...]
                                         (noisyseg.storage.collection; rewritten at compaction)
    <root>/cases/<case_id>/              one OME-Zarr 0.5 image per case
        zarr.json                        attributes["ome"] = {"version": "0.5", "multiscales": ...,
                                         "omero": ...}; attributes["noisyseg"] = spacing, affine,
                                         shape, channel names, source
        0/                               image array (C, Z, Y, X) or (C, Y, X), float32
        0/manifest.json                  integrity manifest of the array (chunk keys and hashes,
                                         see :mod:`noisyseg.storage.integrity`)
        labels/zarr.json                 attributes["ome"]["labels"] = ["truth", <group>, ...]
        labels/<group>/                  OME label image ("image-label" + its own "multiscales");
                                         <group> is the set name, or ``<name>~<version>`` for a
                                         set written as an internal version (atomic overwrite)
            0/                           (Z, Y, X) or (Y, X) uint8 in {0, 1}
        predictions/<name>/0/            probability map (*S) float32
    <root>/index/cases.parquet           compacted dataset index, one row per case
    <root>/index/journal/<case_id>.json  index entries of cases written since the last compaction
    <root>/index/lesions/<file>.parquet  lesion table of one label set (version)
    <root>/index/labelsets/<set>.json    label set registry entry (params, version, counts)
    <root>/.staging/                     hidden; cases being written (local stores)

Axis order is ``c, z, y, x`` (3D) or ``c, y, x`` (2D); spacing is in millimetres in the same
order and is the OME ``scale`` (``[1, *spacing]``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from noisyseg.errors import NoisysegInputError
from noisyseg.storage.atomic import is_local

if TYPE_CHECKING:  # pragma: no cover
    import fsspec

    from noisyseg.storage.files import StoreFiles

STORE_FORMAT = "noisyseg-volume-store"
#: 1: no integrity manifests; 2: every array written with a manifest (noisyseg.storage.integrity).
STORE_FORMAT_VERSION = 2
OME_VERSION = "0.5"
TRUTH = "truth"
#: Group, inside a case's group, that holds probability maps (``predictions/<name>/0``).
PREDICTIONS_GROUP = "predictions"
CASES_DIR = "cases"
STAGING_DIR = ".staging"
INDEX_DIR = "index"
CASES_PARQUET = f"{INDEX_DIR}/cases.parquet"
JOURNAL_DIR = f"{INDEX_DIR}/journal"
LESIONS_DIR = f"{INDEX_DIR}/lesions"
LABELSETS_DIR = f"{INDEX_DIR}/labelsets"
#: Separator of a label set's name and its internal version in group and file names; not a
#: character of safe names, so ``<name>~<version>`` never collides with another set's name.
VERSION_SEP = "~"
#: Target uncompressed chunk size (DESIGN.md: "chunks about 1 MB").
DEFAULT_CHUNK_BYTES = 1 << 20
#: Arrays larger than this are written with shards (``SHARD_FACTOR`` chunks per spatial axis).
DEFAULT_SHARD_THRESHOLD_BYTES = 256 << 20
SHARD_FACTOR = 4
SPATIAL_AXES = ("z", "y", "x")
LESION_STATUSES = ("present", "removed", "changed")

#: Blosc settings of the image arrays (float32): LZ4 with byte shuffle. Measured on 256³ float32
#: MRI-like volumes (benchmarks/RESULTS.md, "Patch loading"): decoding the chunks of a 96³ patch
#: costs 2.4 ms of CPU with LZ4 against 6.3 ms with Zstd level 1 (Zstd level 3: no faster), for
#: 10 % more bytes on disk (compression ratio 3.6 against 4.0). Patch reading is the hot path of
#: training, storage is cheap: LZ4. (DESIGN.md said Zstd; this is the measured trade-off.)
IMAGE_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
#: Blosc settings of the label arrays (uint8 in {0, 1}): LZ4, no shuffle. Bit-shuffle + Zstd
#: compressed sparse labels 4x better (ratio 175 against 45) but cost 3.0 ms of CPU per 96³ patch
#: to decode against 0.5 ms; labels are a small share of the store either way.
LABEL_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"}


def axis_names(spatial_dims: int) -> tuple[str, ...]:
    """Spatial axis names in store order: ``("z", "y", "x")`` or ``("y", "x")``."""
    if spatial_dims not in (2, 3):
        raise NoisysegInputError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return SPATIAL_AXES[-spatial_dims:]


def root_metadata(
    spatial_dims: int,
    channel_names: Sequence[str],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_threshold_bytes: int = DEFAULT_SHARD_THRESHOLD_BYTES,
    attrs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The root group's ``attributes["noisyseg"]`` of a new store."""
    return {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "spatial_dims": int(spatial_dims),
        "channel_names": [str(c) for c in channel_names],
        "axes": ["c", *axis_names(spatial_dims)],
        "chunk_bytes": int(chunk_bytes),
        "shard_threshold_bytes": int(shard_threshold_bytes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **dict(attrs or {}),
    }


def case_rel(case_id: str) -> str:
    """Path of a case's group inside the store."""
    return f"{CASES_DIR}/{case_id}"


def image_rel(case_id: str) -> str:
    """Path of a case's image array inside the store."""
    return f"{CASES_DIR}/{case_id}/0"


def label_group_name(name: str, version: str | None) -> str:
    """Group name, under a case's ``labels``, of label set ``name`` at ``version``
    (``None`` or ``""``: the unversioned group ``<name>``)."""
    return f"{name}{VERSION_SEP}{version}" if version else name


def label_rel(case_id: str, name: str, version: str | None = None) -> str:
    """Path of a case's label array of set ``name`` (at ``version``) inside the store."""
    return f"{CASES_DIR}/{case_id}/labels/{label_group_name(name, version)}/0"


def prediction_rel(case_id: str, name: str) -> str:
    """Path of a case's probability map ``name`` inside the store."""
    return f"{CASES_DIR}/{case_id}/{PREDICTIONS_GROUP}/{name}/0"


def lesions_rel(name: str, version: str | None = None) -> str:
    """Path of the lesion table of label set ``name`` (at ``version``)."""
    return f"{LESIONS_DIR}/{label_group_name(name, version)}.parquet"


def chunk_shape(
    shape: Sequence[int], itemsize: int, target_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, ...]:
    """Power-of-two chunk shape of about ``target_bytes`` (never more), clipped to ``shape``.

    Doubles axes round-robin from the last (fastest) one, so float32 3D gives ``64³`` (1 MiB),
    uint8 3D ``64×128×128`` (1 MiB), float32 2D ``512²``. An axis that reaches the array's extent
    stops growing and the budget goes to the others (thin anisotropic volumes still get ~1 MB).
    """
    chunk = [1] * len(shape)
    budget = max(1, target_bytes // max(1, itemsize))
    grew = True
    while grew:
        grew = False
        for ax in reversed(range(len(shape))):
            if chunk[ax] >= shape[ax]:
                continue
            new = min(chunk[ax] * 2, shape[ax])
            if math.prod(chunk) // chunk[ax] * new > budget:
                continue
            chunk[ax] = new
            grew = True
    return tuple(int(c) for c in chunk)


def codec_for(itemsize: int) -> BloscCodec:
    """The Blosc codec of new arrays: :data:`LABEL_BLOSC` for 1-byte items, else
    :data:`IMAGE_BLOSC`. Existing stores keep whatever codec their arrays were written with."""
    return BloscCodec(typesize=itemsize, **(LABEL_BLOSC if itemsize == 1 else IMAGE_BLOSC))


def array_layout(
    shape: Sequence[int], itemsize: int, channel_axis: bool, meta: Mapping[str, Any]
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(chunks, shards)`` of a new array; ``shards`` is None below the store's threshold.

    Args:
        shape: ``(C, *S)`` when ``channel_axis`` else ``S``.
        itemsize: bytes per voxel the chunk budget is computed for.
        meta: the store's root metadata (``chunk_bytes``, ``shard_threshold_bytes``).
    """
    spatial = tuple(shape[1:]) if channel_axis else tuple(shape)
    chunks = chunk_shape(spatial, itemsize, int(meta.get("chunk_bytes", DEFAULT_CHUNK_BYTES)))
    shards = None
    nbytes = math.prod(shape) * itemsize
    if nbytes > int(meta.get("shard_threshold_bytes", DEFAULT_SHARD_THRESHOLD_BYTES)):
        shards = tuple(min(s, c * SHARD_FACTOR) for s, c in zip(spatial, chunks))
        # shard extents must be multiples of the chunk extents
        shards = tuple(max(c, (s // c) * c) for s, c in zip(shards, chunks))
    if channel_axis:
        chunks = (1, *chunks)
        shards = (1, *shards) if shards else None
    return chunks, shards


def create_array(
    group: zarr.Group,
    shape: Sequence[int],
    dtype: Any,
    *,
    channel_axis: bool,
    meta: Mapping[str, Any],
    layout_itemsize: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Array ``"0"`` of an OME group: zero-filled, Blosc-compressed, chunked by
    :func:`array_layout` for ``layout_itemsize`` bytes a voxel (default: ``dtype``'s size).

    Args:
        shape: ``(C, *spatial)`` when ``channel_axis`` else ``spatial``.
        meta: the store's root metadata. attributes: the array's own attributes.
    """
    dt = np.dtype(dtype)
    chunks, shards = array_layout(shape, layout_itemsize or dt.itemsize, channel_axis, meta)
    spatial_names = list(axis_names(len(shape) - (1 if channel_axis else 0)))
    return group.create_array(
        "0",
        shape=tuple(shape),
        dtype=dt,
        chunks=chunks,
        shards=shards,
        compressors=[codec_for(dt.itemsize)],
        fill_value=0.0 if dt.kind == "f" else 0,
        dimension_names=["c", *spatial_names] if channel_axis else spatial_names,
        attributes=dict(attributes or {}),
    )


def ome_origin(affine: Any, spatial_dims: int) -> list[float] | None:
    """World position (mm) of voxel 0 in store axis order, the OME ``translation``: the NIfTI
    affine maps ``(x, y, z)``, so it is ``affine[:3, 3]`` reversed (3D only; None without an
    affine). Exact for axis-aligned affines (ingest reorients to RAS); an oblique affine's
    rotation is not expressible in OME-Zarr 0.5 and stays in the ``noisyseg`` attributes."""
    if affine is None or spatial_dims != 3:
        return None
    a = np.asarray(affine, dtype=np.float64)
    return [float(v) for v in a[:3, 3][::-1]]


def multiscales(
    name: str, spacing: Sequence[float], channel_axis: bool, affine: Any = None
) -> list[dict]:
    """OME 0.5 ``multiscales`` of a one-level image: axes (``c`` when ``channel_axis``, then
    space axes in mm), ``scale`` = ``[1, *spacing]`` / ``spacing``; with an affine also
    ``translation`` = the world position (mm) of voxel 0, store axis order (:func:`ome_origin`)."""
    axes = [{"name": "c", "type": "channel"}] if channel_axis else []
    axes += [{"name": a, "type": "space", "unit": "millimeter"} for a in axis_names(len(spacing))]
    lead = [0.0] if channel_axis else []
    transforms: list[dict] = [
        {"type": "scale", "scale": [1.0] * len(lead) + [float(s) for s in spacing]}
    ]
    origin = ome_origin(affine, len(spacing))
    if origin is not None:
        transforms.append({"type": "translation", "translation": lead + origin})
    return [
        {
            "name": name,
            "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": transforms}],
        }
    ]


def image_attrs(
    case_id: str,
    image: np.ndarray,
    spacing: Sequence[float],
    channel_names: Sequence[str],
    affine: Any = None,
) -> dict:
    """OME attributes of a case group: ``multiscales`` and ``omero`` channel windows.

    Args:
        image: ``(C, *S)`` float32; windows are each channel's min/max.
    """
    omero = {
        "channels": [
            {
                "label": name,
                "active": True,
                "color": "FFFFFF",
                "window": {
                    "min": float(image[c].min()),
                    "max": float(image[c].max()),
                    "start": float(image[c].min()),
                    "end": float(image[c].max()),
                },
            }
            for c, name in enumerate(channel_names)
        ]
    }
    return {
        "version": OME_VERSION,
        "multiscales": multiscales(case_id, spacing, True, affine=affine),
        "omero": omero,
    }


def label_attrs(
    name: str,
    spacing: Sequence[float],
    classes: Mapping[int, str] | None = None,
    affine: Any = None,
) -> dict:
    """Attributes of an OME label image group named ``name``; ``classes`` ({value: name},
    multi-class maps) sets its properties, default one class: lesion = 1."""
    classes = {1: "lesion"} if classes is None else classes
    values = sorted(v for v in classes if v != 0)
    return {
        "ome": {
            "version": OME_VERSION,
            "image-label": {
                "colors": [
                    {"label-value": v, "rgba": [255, (60 * i) % 256, 0, 255]}
                    for i, v in enumerate(values)
                ],
                "properties": [{"label-value": v, "class": classes[v]} for v in values],
                "source": {"image": "../../"},
            },
            "multiscales": multiscales(name, spacing, channel_axis=False, affine=affine),
        }
    }


def prediction_attrs(case_id: str, name: str, spacing: Sequence[float], affine: Any = None) -> dict:
    """Attributes of a probability-map group (OME ``multiscales`` + ``noisyseg`` kind)."""
    return {
        "ome": {
            "version": OME_VERSION,
            "multiscales": multiscales(name, spacing, channel_axis=False, affine=affine),
        },
        "noisyseg": {"kind": "probability", "case_id": case_id},
    }


def read_root_meta(files: StoreFiles) -> dict | None:
    """The root ``noisyseg`` metadata of a store; None when there is no store; StoreDamageError
    when the root ``zarr.json`` exists but is unreadable."""
    try:
        doc = files.read_json("zarr.json")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    meta = (doc.get("attributes") or {}).get("noisyseg") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        return None
    return meta


def zarr_store(
    fs: fsspec.AbstractFileSystem,
    root: str,
    url: str,
    storage_options: Mapping[str, Any] | None,
    *,
    read_only: bool = False,
) -> Any:
    """The Zarr store over a store's root: a ``LocalStore`` of ``root`` on the local file system,
    else an ``FsspecStore`` of ``url``."""
    if is_local(fs):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        url, storage_options=dict(storage_options or {}) or None, read_only=read_only
    )
