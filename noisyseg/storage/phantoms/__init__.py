"""Phantom data for when no scans are at hand: 3D brain-metastasis MRI and 2D dermoscopy images.

Two generators, both deterministic given ``seed`` (only ``np.random.default_rng(seed)`` is used):

- :func:`brain_mets_case` builds a skull-stripped 4-sequence brain MRI (T1, T1c, T2, FLAIR) on the
  real MNI152 2009a anatomy that ships inside nilearn's wheel (T1 template plus grey- and
  white-matter probability maps; no download). Per case the anatomy is warped (small random affine
  plus a smooth random displacement field), tissue fractions drive the four contrasts, and 3-15
  irregular metastases with a long-tailed diameter distribution are placed in the parenchyma
  (preferring the grey-white junction). Lesions enhance on T1c (ring enhancement around a necrotic
  core for the larger ones, solid for small ones) and carry vasogenic oedema that is bright on
  FLAIR/T2. Partial volume is modelled by super-sampling each lesion, then a smooth bias field,
  Rician noise and a per-case intensity scale are applied, so the smallest lesions have a low
  contrast-to-noise ratio.
- :func:`skin_case` builds an RGB dermoscopy-like image with one irregular pigmented lesion, hairs,
  skin texture, vignetting and noise.

Modules: :mod:`.brain`, :mod:`.skin` (generators), :mod:`.anatomy` (MNI template),
:mod:`.common` (case record, smooth fields), :mod:`.synth` (:func:`synth_store`, a store of
phantom cases). See ``docs/phantoms.md`` for the measured lesion-size distribution and contrast-to-noise figures.
"""

from noisyseg.storage.phantoms.brain import (
    BRAIN_CHANNELS,
    BRAIN_FOV_MM,
    TISSUE_CLASSES,
    brain_mets_case,
    default_brain_shape,
)
from noisyseg.storage.phantoms.common import PhantomCase
from noisyseg.storage.phantoms.skin import SKIN_CHANNELS, skin_case
from noisyseg.storage.phantoms.synth import (
    SEED_STRIDE,
    SYNTH_KINDS,
    SYNTH_META,
    assign_splits,
    synth_store,
)

__all__ = [
    "BRAIN_CHANNELS",
    "BRAIN_FOV_MM",
    "SEED_STRIDE",
    "SKIN_CHANNELS",
    "SYNTH_KINDS",
    "SYNTH_META",
    "TISSUE_CLASSES",
    "PhantomCase",
    "assign_splits",
    "brain_mets_case",
    "default_brain_shape",
    "skin_case",
    "synth_store",
]
