"""noisyseg: lesion segmentation that stays sensitive under noisy annotations.

Pure core (no Ray, Zarr or MLflow imports): :mod:`noisyseg.losses`, :mod:`noisyseg.reweight`,
:mod:`noisyseg.noise`, :mod:`noisyseg.metrics`, :mod:`noisyseg.models`.
Infrastructure: :mod:`noisyseg.storage` (Zarr), :mod:`noisyseg.distributed` (Ray Train + MLflow),
:mod:`noisyseg.tuning` (Ray Tune).
"""

__version__ = "0.1.0"
