"""The store root as an OME-Zarr 0.5 image collection (the ``bioformats2raw.layout``).

OME-Zarr 0.5 has one way to declare that a Zarr hierarchy holds several separate images: the
transitional ``bioformats2raw.layout`` (NGFF 0.5, section "bf2raw"). A noisyseg store uses it::

    <root>/zarr.json        attributes["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    <root>/OME/zarr.json    attributes["ome"] = {"version": "0.5",
                                                 "series": ["cases/<id>", ...]}

``series`` lists the path of every case image (the spec allows any group path there; without
it the images would have to be groups ``0/``, ``1/``...). Readers that follow ``series`` open the
root and list every case, each an OME image with its ``scale`` and ``translation``
(:func:`noisyseg.storage.layout.multiscales`). The spec's optional ``OME/METADATA.ome.xml``
(SHOULD) is not written: the series list alone is the index; the spec lets readers ignore the
store's other groups (``index/`` is not Zarr at all).

The series list follows the case index: :meth:`~noisyseg.storage.index.CaseIndex.compact`
(driver-side, after case writes; a case dropped from the index is dropped from the list)
rewrites ``OME/zarr.json`` with :func:`update_collection` when the list changed, in one atomic
write (:func:`noisyseg.storage.atomic.write_file_atomic` through
:class:`~noisyseg.storage.files.StoreFiles`). Parallel case writers never touch it, so they do not
race on it. The root attributes are written when the store is created; an older store gets them
at its next compaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from noisyseg.storage.files import StoreFiles
from noisyseg.storage.layout import OME_VERSION, case_rel

#: Group of the collection metadata (``series``), the name the bioformats2raw layout fixes.
OME_GROUP = "OME"
#: The only layout version the spec defines.
BF2RAW_LAYOUT = 3


def root_ome_attrs() -> dict[str, Any]:
    """``attributes["ome"]`` of the store's root group: an OME-Zarr 0.5 image collection."""
    return {"version": OME_VERSION, "bioformats2raw.layout": BF2RAW_LAYOUT}


def series_paths(case_ids: Iterable[str]) -> list[str]:
    """The ``series`` list of a store holding ``case_ids``: their image groups, sorted by id."""
    return [case_rel(cid) for cid in sorted(str(c) for c in case_ids)]


def series_doc(case_ids: Iterable[str]) -> dict[str, Any]:
    """The whole ``OME/zarr.json`` (a Zarr v3 group) listing the images of ``case_ids``."""
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {"ome": {"version": OME_VERSION, "series": series_paths(case_ids)}},
    }


def read_series(files: StoreFiles) -> list[str] | None:
    """The ``series`` list in ``OME/zarr.json``; None when the store has none (yet)."""
    try:
        doc = files.read_json(f"{OME_GROUP}/zarr.json")
    except FileNotFoundError:
        return None
    series = ((doc.get("attributes") or {}).get("ome") or {}).get("series")
    return list(series) if isinstance(series, list) else None


def _ensure_root_attrs(files: StoreFiles) -> bool:
    """Add :func:`root_ome_attrs` to the root ``zarr.json`` when missing (stores created before
    the collection metadata); one atomic rewrite. True when it wrote."""
    try:
        doc = files.read_json("zarr.json")
    except FileNotFoundError:
        return False
    attrs = doc.setdefault("attributes", {})
    if attrs.get("ome") == root_ome_attrs():
        return False
    attrs["ome"] = root_ome_attrs()
    files.write_json("zarr.json", doc)
    return True


def update_collection(files: StoreFiles, case_ids: Iterable[str]) -> bool:
    """Make the root list exactly the images of ``case_ids`` (driver-side).

    Writes ``OME/zarr.json`` (one atomic write) only when its ``series`` differs, and the root
    attributes when missing. Returns True when anything was written.
    """
    wrote = _ensure_root_attrs(files)
    ids = list(case_ids)
    if read_series(files) != series_paths(ids):
        files.write_json(f"{OME_GROUP}/zarr.json", series_doc(ids))
        wrote = True
    return wrote
