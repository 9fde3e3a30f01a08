"""noisyseg.storage: the Zarr volume store, ingest, phantoms, Dask label-noise jobs, patch loader.

One module per idea: ``layout`` (paths, chunking, OME metadata), ``index`` (case index, journal,
lesion tables, label-set registry), ``writer`` (cases, label sets, predictions), ``atomic`` (the
build-beside-then-switch commit), ``integrity`` (chunk manifests), ``verify`` (whole-store check),
``reader`` (cached case arrays, fast patch reads), ``normalise``, ``clean_subset``, ``store``
(:class:`VolumeStore`, the front).
Heavy submodules (phantoms, corrupt, patches) are not imported here; import them directly.
"""

from noisyseg.storage.layout import TRUTH
from noisyseg.storage.store import VolumeStore

__all__ = ["TRUTH", "VolumeStore"]
