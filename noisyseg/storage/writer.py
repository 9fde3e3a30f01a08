"""Writing arrays into a store: cases, label sets (with internal versions) and probability maps.

Every array goes through :func:`write_array`: created with the store's layout, filled, then its
integrity manifest recorded. Every group is built under a staging name and published with
:func:`noisyseg.storage.atomic.publish_dir` on local stores; object stores write in place and
rely on a commit record written last (the case's index entry, the set's registry entry).
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import zarr

from noisyseg.errors import NoisysegInputError
from noisyseg.lesions import lesion_table_rows
from noisyseg.storage import validate as V
from noisyseg.storage.atomic import (
    OLD_PREFIX,
    TMP_PREFIX,
    is_local,
    publish_dir,
    recover_dir,
    token,
)
from noisyseg.storage.collection import OME_GROUP, root_ome_attrs, series_doc
from noisyseg.storage.integrity import RecordingStore, integrity_attrs, write_manifest
from noisyseg.storage.layout import (
    CASES_DIR,
    OME_VERSION,
    PREDICTIONS_GROUP,
    STAGING_DIR,
    TRUTH,
    VERSION_SEP,
    create_array,
    image_attrs,
    label_attrs,
    label_group_name,
    prediction_attrs,
    zarr_store,
)
from noisyseg.storage.normalise import channel_stats

if TYPE_CHECKING:
    from noisyseg.storage.store import VolumeStore

#: Test hook: seconds a case or label-set writer sleeps between writing its arrays and
#: publishing them, so a test can kill a writer in the middle of a case.
PAUSE_ENV = "NOISYSEG_TEST_PAUSE_BEFORE_COMMIT"


def _test_pause() -> None:
    """Sleep :data:`PAUSE_ENV` seconds when set (tests only)."""
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def write_array(
    store: VolumeStore,
    group_rel: str,
    data: np.ndarray,
    *,
    channel_axis: bool,
    layout_itemsize: int | None = None,
) -> None:
    """Array ``<group_rel>/0`` holding ``data`` (dtype kept), with its integrity manifest.

    Args:
        data: ``(C, *S)`` when ``channel_axis`` else ``(*S)``.
        layout_itemsize: bytes per voxel for the chunk layout (default ``data``'s itemsize).
    """
    group = zarr.open_group(store=store.zstore, path=group_rel, mode="r+")
    create_array(
        group,
        data.shape,
        data.dtype,
        channel_axis=channel_axis,
        meta=store.meta,
        layout_itemsize=layout_itemsize,
        attributes=integrity_attrs(),
    )
    rel = f"{group_rel}/0"
    recorder = RecordingStore(store.zstore, rel)
    zarr.open_array(store=recorder, path=rel, mode="r+")[...] = data
    write_manifest(store.files, rel, recorder.recorded)


def write_label_group(
    store: VolumeStore,
    parent_rel: str,
    group_name: str,
    label: np.ndarray,
    *,
    display_name: str,
    spacing: Sequence[float],
    affine: Any = None,
    classes: Mapping[int, str] | None = None,
) -> None:
    """One OME image-label group ``<parent_rel>/<group_name>`` with array ``0`` = ``label``
    (dtype kept: uint8 binary sets, uint8/uint16 multi-class maps); ``display_name`` is its
    OME ``multiscales`` name."""
    parent = zarr.open_group(store=store.zstore, path=parent_rel, mode="r+")
    parent.create_group(
        group_name,
        attributes=label_attrs(display_name, spacing, classes=classes, affine=affine),
        overwrite=True,
    )
    write_array(store, f"{parent_rel}/{group_name}", label, channel_axis=False)


# ---- the store root ------------------------------------------------------------------------


def clear_for_create(
    fs: fsspec.AbstractFileSystem,
    root: str,
    url: str,
    overwrite: bool,
    open_existing: Callable[[], object],
) -> None:
    """Make way for a new store at ``root``: refuse a location that holds something other than
    a noisyseg store (``open_existing`` raises there; never deleted, even with ``overwrite``),
    refuse an existing store without ``overwrite``, remove it with ``overwrite``."""
    if not fs.exists(root):
        return
    existing = fs.ls(root, detail=False) if fs.isdir(root) else [root]
    if not existing:
        return
    try:
        open_existing()
    except NoisysegInputError:
        raise NoisysegInputError(
            "path exists and is not a noisyseg store (refusing to overwrite)", path=url
        ) from None
    if not overwrite:
        raise NoisysegInputError("store already exists (pass overwrite to replace it)", path=url)
    fs.rm(root, recursive=True)


def create_root(
    fs: fsspec.AbstractFileSystem,
    root: str,
    url: str,
    meta: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None,
) -> None:
    """Write the root group (``attributes["noisyseg"] = meta``, ``["ome"]`` an OME image
    collection, :mod:`noisyseg.storage.collection`), the empty ``cases`` group and ``OME``."""
    if is_local(fs):
        fs.makedirs(root, exist_ok=True)
    zstore = zarr_store(fs, root, url, storage_options)
    group = zarr.open_group(
        store=zstore,
        mode="w",
        zarr_format=3,
        attributes={"noisyseg": dict(meta), "ome": root_ome_attrs()},
    )
    group.create_group(CASES_DIR)
    group.create_group(OME_GROUP, attributes=series_doc([])["attributes"])


def remove_staging(store: VolumeStore) -> int:
    """Remove every entry under ``.staging`` (leftovers of interrupted case writes)."""
    try:
        entries = store.fs.ls(store.files.path(STAGING_DIR), detail=False)
    except FileNotFoundError:
        return 0
    leftovers = [e for e in entries if posixpath.basename(str(e).rstrip("/")) != "zarr.json"]
    for e in leftovers:
        store.fs.rm(e, recursive=True)
    return len(leftovers)


# ---- cases ---------------------------------------------------------------------------------


def check_case_inputs(
    store: VolumeStore,
    case_id: str,
    image: Any,
    labels: Mapping[str, Any],
    spacing: Sequence[float],
    affine: Any,
    split: str,
    label_maps: Mapping[str, tuple[Any, Mapping[int, str]]] | None,
) -> tuple:
    """Validated ``(case_id, image, spacing, affine, labels, label maps)`` of a case."""
    cid = V.check_case_id(case_id)
    V.check_split(split, case=cid)
    img = V.check_image(
        image, n_channels=len(store.channel_names), spatial_dims=store.spatial_dims, case=cid
    )
    sp = V.check_spacing(spacing, store.spatial_dims, case=cid)
    aff = V.check_affine(affine, case=cid)
    if TRUTH not in labels and split != V.UNLABELED:
        raise NoisysegInputError("labels must include the 'truth' label set", case=cid)
    checked = {}
    for name, lab in labels.items():
        V.check_label_set_name(name)
        checked[name] = V.check_label(
            lab, shape=img.shape[1:], case=cid, name=f"label set {name!r}"
        )
    maps = {}
    for name, (lab, classes) in (label_maps or {}).items():
        V.check_label_set_name(name)
        if name in checked:
            raise NoisysegInputError(f"label map {name!r} clashes with a label set", case=cid)
        arr = V.check_label_map(lab, shape=img.shape[1:], case=cid, name=f"label map {name!r}")
        maps[name] = (arr, {int(k): str(v) for k, v in classes.items()})
    return cid, img, sp, aff, checked, maps


def case_attributes(
    store: VolumeStore,
    case_id: str,
    image: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray | None,
    source: str | None,
    extra: Mapping[str, Any] | None,
) -> dict:
    """Attributes of a case group: OME image metadata and the ``noisyseg`` case attributes
    (spacing, shape, channel names, affine, source, z-score statistics, ``extra``)."""
    noisyseg_attrs = {
        "case_id": case_id,
        "spacing": list(spacing),
        "shape": [int(s) for s in image.shape[1:]],
        "channel_names": list(store.channel_names),
        "affine": affine.tolist() if affine is not None else None,
        "source": source or "",
        # z-score statistics over the whole image (the patch loader and inference use them);
        # statistics the caller passes in ``extra`` (e.g. dataset-wide ones) take precedence
        **channel_stats(image),
        **dict(extra or {}),
    }
    ome = image_attrs(case_id, image, spacing, store.channel_names, affine=affine)
    return {"ome": ome, "noisyseg": noisyseg_attrs}


def write_case_tree(
    store: VolumeStore,
    rel: str,
    attrs: Mapping[str, Any],
    image: np.ndarray,
    labels: Mapping[str, np.ndarray],
    maps: Mapping[str, tuple[np.ndarray, Mapping[int, str]]],
    spacing: Sequence[float],
    affine: np.ndarray | None,
) -> None:
    """The whole group of a case at ``rel``: image array, ``labels`` group with every binary
    set and multi-class map."""
    group = zarr.open_group(store=store.zstore, path=rel, mode="w", zarr_format=3, attributes=attrs)
    group.create_group(
        "labels", attributes={"ome": {"version": OME_VERSION, "labels": [*labels, *maps]}}
    )
    write_array(store, rel, image, channel_axis=True)
    for name, lab in labels.items():
        write_label_group(
            store, f"{rel}/labels", name, lab, display_name=name, spacing=spacing, affine=affine
        )
    for name, (lab, classes) in maps.items():
        write_label_group(
            store,
            f"{rel}/labels",
            name,
            lab,
            display_name=name,
            spacing=spacing,
            affine=affine,
            classes=classes,
        )


def stage_case(store: VolumeStore, case_id: str) -> str:
    """Where a case's group is built: ``.staging/<id>-<token>`` (local) or its final place."""
    if store.files.local:
        return f"{STAGING_DIR}/{case_id}-{token()}"
    return f"{CASES_DIR}/{case_id}"


def publish_case(store: VolumeStore, staged_rel: str, case_id: str) -> None:
    """Move a staged case group to ``cases/<id>`` (local; replaces an unindexed leftover or the
    case being overwritten). The test hook :data:`PAUSE_ENV` sleeps first."""
    _test_pause()
    final = f"{CASES_DIR}/{case_id}"
    if store.files.local and staged_rel != final:
        publish_dir(store.files.path(staged_rel), store.files.path(final))


def case_entry(
    case_id: str,
    image: np.ndarray,
    spacing: Sequence[float],
    split: str,
    clean: bool,
    source: str | None,
    lesions: Mapping[str, list[dict]],
) -> dict:
    """The index entry that commits a case (see :mod:`noisyseg.storage.index`)."""
    return {
        "case": {
            "case_id": case_id,
            "split": split,
            "clean": bool(clean),
            "n_channels": int(image.shape[0]),
            "shape": [int(s) for s in image.shape[1:]],
            "spacing": list(spacing),
            "source": source or "",
            "n_lesions": {name: len(recs) for name, recs in lesions.items()},
        },
        "lesions": dict(lesions),
    }


# ---- label sets ----------------------------------------------------------------------------


def _set_ome_labels(store: VolumeStore, case_id: str, add: str | None, drop: str | None) -> None:
    """Add/remove a group name in the case's OME ``labels`` list (per-case, task-safe; the
    group's ``zarr.json`` is replaced atomically, so a kill never truncates it)."""
    rel = f"{CASES_DIR}/{case_id}/labels/zarr.json"
    doc = store.files.read_json(rel)
    ome = dict(doc.get("attributes", {}).get("ome", {"version": OME_VERSION}))
    names = [n for n in ome.get("labels", []) if n != drop]
    if add is not None and add not in names:
        names.append(add)
    ome["labels"] = names
    doc.setdefault("attributes", {})["ome"] = ome
    store.files.write_json(rel, doc)


def write_label_version(
    store: VolumeStore,
    case_id: str,
    name: str,
    label: np.ndarray,
    version: str | None,
    info: Mapping[str, Any],
) -> None:
    """Write the group of set ``name`` at ``version`` for one case, replacing one there."""
    labels_rel = f"{CASES_DIR}/{case_id}/labels"
    group = label_group_name(name, version)
    spacing, affine = info["spacing"], info.get("affine")
    if store.files.local:
        final = store.files.path(f"{labels_rel}/{group}")
        recover_dir(final)
        staged = f"{TMP_PREFIX}{group}-{token()}"
        write_label_group(
            store, labels_rel, staged, label, display_name=name, spacing=spacing, affine=affine
        )
        _test_pause()
        publish_dir(store.files.path(f"{labels_rel}/{staged}"), final)
    else:
        write_label_group(
            store, labels_rel, group, label, display_name=name, spacing=spacing, affine=affine
        )
    _set_ome_labels(store, case_id, add=group, drop=None)


def write_label_set(
    store: VolumeStore,
    case_id: str,
    name: str,
    array: Any,
    *,
    records: list[dict] | None = None,
    overwrite: bool = False,
    version: str | None = None,
) -> list[dict]:
    """Write a derived label set of one case next to its truth (safe in parallel tasks of
    different cases). Never writes ``truth``.

    Without ``version`` the set's own group is written (refused when it exists, unless
    ``overwrite``). With a ``version`` (:meth:`VolumeStore.new_label_version`) the group
    ``<name>~<version>`` is written beside the registered one, which readers keep using until
    :func:`register_label_set` switches to it.

    Args:
        array: ``(*S)`` binary label. records: lesion-table rows
            (:func:`noisyseg.lesions.lesion_table_rows`; may include ``status``
            "removed"/"changed" rows); computed from ``array`` when None.

    Returns:
        the records, each with ``case_id`` and ``label_set`` filled in. Pass them (grouped by
        case) to :func:`register_label_set` on the driver to index the set.
    """
    cid = V.check_case_id(case_id)
    check_truth_name(name, cid)
    store.catalog.require_case(cid)
    info = store.case_attrs(cid)
    lab = V.check_label(array, shape=info["shape"], case=cid, name=f"label set {name!r}")
    if version is None and not overwrite and name in label_groups_of(store, cid, name):
        raise NoisysegInputError(f"label set {name!r} already exists (never overwritten)", case=cid)
    write_label_version(store, cid, name, lab, version, info)
    store.forget(cid)
    if records is None:
        records = lesion_table_rows(lab, info["spacing"])
    return [{**r, "case_id": cid, "label_set": name} for r in records]


def register_label_set(
    store: VolumeStore,
    name: str,
    records_by_case: Mapping[str, Sequence[Mapping[str, Any]]],
    params: Mapping[str, Any] | None,
    version: str | None,
) -> None:
    """Index a derived label set (driver-side, after all :func:`write_label_set` calls).

    Without ``version``: rows of the given cases replace theirs in the set's lesion table, the
    ``n_lesions_<name>`` index column is updated and the registry entry
    ``index/labelsets/<name>.json`` (``params``: mode, rate, seed, source, ...) written. With
    ``version``: the set becomes exactly that version, switched by one atomic write of the
    registry entry (lesion table and counts included); then every other version of the set
    (masks and lesion table) is removed (:func:`cleanup_label_versions`).
    """
    check_truth_name(name)
    for cid in records_by_case:
        store.catalog.require_case(cid)
    store.catalog.register_label_set(name, records_by_case, params, version)
    if version is not None:
        cleanup_label_versions(store, name)


def cleanup_label_versions(store: VolumeStore, name: str) -> int:
    """Remove every version of set ``name`` other than the registered one: masks and lesion
    tables left by a replaced version or an interrupted overwrite, and staging leftovers
    (driver-side, no writer of the set running). The unversioned group and table (original
    layout) are removed only once a version is registered. Returns how many case groups were
    removed."""
    if name == TRUTH:
        return 0
    version = store.catalog.version(name)
    current = label_group_name(name, version)
    removed = 0
    for cid in case_dirs(store):
        if store.files.local:  # a publish killed between its renames: put the old group back
            recover_dir(store.files.path(f"{CASES_DIR}/{cid}/labels/{current}"))
        for group in label_groups_of(store, cid, name, hidden=True):
            stale = VERSION_SEP in group or version is not None or group.startswith(".")
            if group != current and stale:
                remove_label_group(store, cid, group)
                removed += 1
    for rel in store.catalog.stale_lesion_tables(name):
        if VERSION_SEP in rel or version is not None:
            store.files.remove(rel)
    return removed


def case_dirs(store: VolumeStore) -> list[str]:
    """Case groups present under ``cases/`` (indexed or not)."""
    return [n for n in store.files.list_names(CASES_DIR) if n != "zarr.json"]


def _group_of(name: str, group: str) -> bool:
    return group == name or group.startswith(f"{name}{VERSION_SEP}")


def label_groups_of(store: VolumeStore, case_id: str, name: str, hidden: bool = False) -> list[str]:
    """Groups of set ``name`` (any version) in a case's ``labels`` folder; with ``hidden``
    also staging leftovers (``.tmp-<group>-<token>``, ``.old-<group>-<token>``)."""
    rel = f"{CASES_DIR}/{case_id}/labels"
    if not hidden:
        return [g for g in store.files.list_names(rel) if _group_of(name, g)]
    try:
        entries = store.fs.ls(store.files.path(rel), detail=False)
    except FileNotFoundError:
        return []
    out = []
    for g in sorted(posixpath.basename(str(e).rstrip("/")) for e in entries):
        if g.startswith((TMP_PREFIX, OLD_PREFIX)):
            if _group_of(name, g.split("-", 1)[1].rsplit("-", 1)[0]):
                out.append(g)
        elif _group_of(name, g):
            out.append(g)
    return out


def remove_label_group(store: VolumeStore, case_id: str, group: str) -> None:
    """Delete one label group of a case and its OME ``labels`` entry. Locally the group is
    first renamed to a hidden ``.old-`` name, so a kill during the deletion leaves no
    half-deleted group under a visible name (the next cleanup removes the hidden one)."""
    rel = f"{CASES_DIR}/{case_id}/labels/{group}"
    if store.files.local and not group.startswith("."):
        hidden = f"{CASES_DIR}/{case_id}/labels/{OLD_PREFIX}{group}-{token()}"
        os.rename(store.files.path(rel), store.files.path(hidden))
        _set_ome_labels(store, case_id, add=None, drop=group)
        store.files.remove(hidden)
        return
    store.files.remove(rel)
    _set_ome_labels(store, case_id, add=None, drop=group)


# ---- predictions ---------------------------------------------------------------------------


def check_prediction(name: str, data: Any, shape: tuple[int, ...], case_id: str) -> np.ndarray:
    """A probability map as float32 ``(*S)``, or NoisysegInputError (shape, dtype, NaN/Inf)."""
    data = np.asarray(data)
    if data.shape != shape:
        raise NoisysegInputError(
            f"prediction {name!r} has shape {data.shape}, the case's image {shape}", case=case_id
        )
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise NoisysegInputError(
            f"prediction {name!r} is not real-valued ({data.dtype})", case=case_id
        )
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise NoisysegInputError(f"prediction {name!r} has NaN/Inf values", case=case_id)
    return data


def write_prediction_group(
    store: VolumeStore,
    case_id: str,
    name: str,
    data: np.ndarray,
    info: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
) -> str:
    """Write map ``name`` of a case (staged + published locally); returns the array path."""
    rel = f"{CASES_DIR}/{case_id}/{PREDICTIONS_GROUP}"
    zarr.open_group(store=store.zstore, path=rel, mode="a", zarr_format=3)
    write_name = f"{TMP_PREFIX}{name}-{token()}" if store.files.local else name
    attrs = prediction_attrs(case_id, name, info["spacing"], affine=info.get("affine"))
    attrs["noisyseg"].update(dict(metadata or {}))
    group = zarr.open_group(store=store.zstore, path=rel, mode="r+")
    group.create_group(write_name, attributes=attrs, overwrite=True)
    # chunked and sharded like the labels (layout_itemsize=1), so the two align
    write_array(store, f"{rel}/{write_name}", data, channel_axis=False, layout_itemsize=1)
    if store.files.local:
        publish_dir(store.files.path(f"{rel}/{write_name}"), store.files.path(f"{rel}/{name}"))
    return f"{rel}/{name}/0"


def write_prediction(
    store: VolumeStore,
    case_id: str,
    name: str,
    array: Any,
    *,
    overwrite: bool,
    metadata: Mapping[str, Any] | None,
) -> str:
    """Write a probability map of a case to ``cases/<id>/predictions/<name>/0``.

    Layout: group ``predictions/<name>`` with ``attributes["ome"]`` (OME ``multiscales``,
    ``scale`` = the case's spacing in mm) and ``attributes["noisyseg"]`` = ``{"kind":
    "probability", "case_id": ..., **metadata}`` (e.g. ``run_id``, ``model``, ``threshold``);
    one float32 array ``"0"`` of shape ``(*S)``, chunked like the labels, with its integrity
    manifest. An existing map of that name is refused unless ``overwrite``; on local stores the
    new map is built under a hidden name and swapped in (:func:`publish_dir`), so a reader never
    sees a half-written map.

    Args:
        array: ``(*S)`` probabilities (any real dtype, stored as float32), finite.
        metadata: JSON-able provenance kept in the group's attributes.

    Returns:
        the array's path inside the store, ``cases/<id>/predictions/<name>/0``.

    Raises:
        NoisysegInputError: unsafe name, unknown case, existing name without ``overwrite``,
            wrong shape, non-finite values.
    """
    V.check_label_set_name(name)
    cid = V.check_case_id(case_id)
    store.catalog.require_case(cid)
    info = store.case_attrs(cid)
    data = check_prediction(name, array, tuple(int(s) for s in info["shape"]), cid)
    if not overwrite and name in store.prediction_names(cid):
        raise NoisysegInputError(
            f"prediction {name!r} already exists (choose another name or pass --overwrite)",
            case=cid,
            path=store.url,
        )
    return write_prediction_group(store, cid, name, data, info, metadata)


def check_truth_name(name: str, case_id: str | None = None) -> None:
    """Refuse writes to the ``truth`` set."""
    V.check_label_set_name(name)
    if name == TRUTH:
        raise NoisysegInputError("the 'truth' label set is never overwritten", case=case_id)
