"""noisyseg.storage: the Zarr volume store, ingest, phantoms, Dask label-noise jobs, patch loader.

Heavy submodules (phantoms, corrupt, patches) are not imported here; import them directly.
"""

from noisyseg.storage.store import TRUTH, VolumeStore, lesion_records

__all__ = ["TRUTH", "VolumeStore", "lesion_records"]
