"""2D dermoscopy-like phantoms (:func:`skin_case`); see the package docstring."""

from __future__ import annotations

import numpy as np
from scipy import ndimage, special

from noisyseg.storage.phantoms.common import PhantomCase, smooth_field

#: Channel order of :func:`skin_case` images.
SKIN_CHANNELS: list[str] = ["r", "g", "b"]

# ---------------------------------------------------------------------------------------------
# Skin
# ---------------------------------------------------------------------------------------------

# Dermoscopy skin tones (RGB, linear-ish 0..1), light to dark; a case interpolates between two.
_SKIN_TONES = np.array(
    [[0.95, 0.78, 0.72], [0.88, 0.66, 0.58], [0.76, 0.54, 0.43], [0.58, 0.40, 0.30]],
    dtype=np.float32,
)


def skin_case(
    seed: int,
    *,
    size: int = 128,
    area_fraction: tuple[float, float] = (0.10, 0.40),
    n_hairs: tuple[int, int] = (0, 12),
    field_mm: float = 20.0,
) -> PhantomCase:
    """A dermoscopy-like RGB image with one irregular pigmented lesion.

    Args:
        seed: the case's random seed.
        size: image height = width in pixels.
        area_fraction: range of the lesion's share of the image area.
        n_hairs: inclusive range of the number of hairs.
        field_mm: field of view in mm (sets ``spacing``).

    Returns:
        :class:`PhantomCase` with image float32 ``(3, size, size)`` RGB in [0, 1], label uint8
        ``(size, size)`` (one 8-connected lesion, holes filled), spacing ``(mm, mm)``, no affine.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng(seed)
    hw = (size, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tone, skin = _skin(rng, hw)
    alpha, label, radius, r0 = _lesion_shape(rng, size, area_fraction, yy, xx)
    lesion = _lesion_colour(rng, hw, tone, radius, r0)
    image = skin * (1.0 - alpha[None]) + lesion * alpha[None]
    hair = _hairs(rng, size, n_hairs)
    hair_rgb = np.array([0.12, 0.08, 0.06], dtype=np.float32) * rng.uniform(0.5, 1.5)
    image = image * (1.0 - hair[None]) + hair_rgb[:, None, None] * hair[None]
    image = _optics(rng, image, size, yy, xx)
    sp = field_mm / size
    ly, lx = np.nonzero(label)
    return PhantomCase(
        image=image,
        label=label.astype(np.uint8),
        spacing=(sp, sp),
        channel_names=list(SKIN_CHANNELS),
        affine=None,
        lesions=[
            {
                "id": 1,
                "center": [float(ly.mean()), float(lx.mean())],
                "size": int(label.sum()),
                "voxels": int(label.sum()),
                "area_fraction": float(label.mean()),
            }
        ],
        tissue=None,
    )


def _skin(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Skin: ``(tone (3,), image (3, H, W))`` with blotchy redness and fine skin lines."""
    t = rng.uniform(0.0, len(_SKIN_TONES) - 1.0)
    i0 = min(int(t), len(_SKIN_TONES) - 2)
    tone = _SKIN_TONES[i0] * (1 - (t - i0)) + _SKIN_TONES[i0 + 1] * (t - i0)
    skin = np.broadcast_to(tone[:, None, None], (3,) + hw).copy()
    skin *= 1.0 + smooth_field(rng, hw, 4, 0.04)[None]
    red = np.clip(smooth_field(rng, hw, 5, 1.0), 0, None) * rng.uniform(0.0, 0.08)
    skin[0] += red
    skin[1] -= 0.6 * red
    skin[2] -= 0.4 * red
    sig = (rng.uniform(0.6, 1.2), rng.uniform(2.0, 5.0))
    lines = ndimage.gaussian_filter(
        rng.standard_normal(hw), sig if rng.random() < 0.5 else sig[::-1]
    )
    skin *= 1.0 + rng.uniform(0.005, 0.025) * lines[None] / max(lines.std(), 1e-6)
    return tone, skin


def _lesion_shape(
    rng: np.random.Generator,
    size: int,
    area_fraction: tuple[float, float],
    yy: np.ndarray,
    xx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Lesion boundary ``r(θ) = R0 exp(Σ a_k cos(kθ + φ_k))`` rescaled to the target area.

    Returns ``(alpha (H, W) soft coverage, label (H, W) bool, radius (H, W) pixels from the
    centre, R0)``."""
    target = rng.uniform(*area_fraction) * size * size
    # Oval overall (k = 2), a few broad lobes (k = 3..5), fine border irregularity (k up to 24).
    ks = np.arange(2, 25)
    amps = rng.normal(0.0, 1.0, size=ks.size) * rng.uniform(0.1, 0.25) / ks**1.3
    amps[0] = rng.uniform(0.05, 0.25)
    phis = rng.uniform(0, 2 * np.pi, size=ks.size)
    theta_s = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    rel = np.exp((amps[:, None] * np.cos(ks[:, None] * theta_s[None] + phis[:, None])).sum(0))
    r0 = np.sqrt(2 * target / (np.mean(rel**2) * 2 * np.pi))
    rmax = r0 * rel.max()
    margin = max(size / 2 - rmax - 2, 0)
    cy, cx = size / 2 - 0.5 + rng.uniform(-1, 1, size=2) * min(margin, 0.12 * size)
    theta = np.arctan2(yy - cy, xx - cx)
    radius = np.hypot(yy - cy, xx - cx)
    r_t = r0 * np.exp(
        (amps[:, None, None] * np.cos(ks[:, None, None] * theta[None] + phis[:, None, None])).sum(0)
    )
    width = rng.uniform(0.8, 3.0) * np.exp(0.6 * smooth_field(rng, (size, size), 4, 1.0))
    alpha = special.expit((r_t - radius) / width)  # fuzzy border
    label = alpha >= 0.5
    comp, n_comp = ndimage.label(label, structure=np.ones((3, 3)))
    if n_comp > 1:
        label = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    return alpha, ndimage.binary_fill_holes(label), radius, r0


def _lesion_colour(
    rng: np.random.Generator, hw: tuple[int, int], tone: np.ndarray, radius: np.ndarray, r0: float
) -> np.ndarray:
    """Lesion colour ``(3, H, W)``: a darker, browner skin tone with mottling, a darker centre,
    a pigment network and sometimes a blue-white veil."""
    dark = rng.uniform(0.35, 0.7)
    tint = np.array([1.0, 0.80, 0.68], dtype=np.float32) * rng.uniform(0.9, 1.05, size=3).astype(
        np.float32
    )
    base = tone * dark * tint
    mottle = smooth_field(rng, hw, int(rng.integers(4, 9)), 1.0)
    centre_dark = np.exp(-((radius / max(r0, 1.0)) ** 2)) * rng.uniform(0.0, 0.35)
    lesion = base[:, None, None] * (1.0 + 0.18 * mottle[None] - centre_dark[None])
    network = ndimage.gaussian_filter(rng.standard_normal(hw), 1.2)
    network = (network > 0.15).astype(np.float32)
    lesion *= 1.0 - rng.uniform(0.0, 0.2) * network[None]
    if rng.random() < 0.3:  # blue-white veil
        veil = np.clip(smooth_field(rng, hw, 4, 1.0) - 0.3, 0, 1)[None] * 0.6
        lesion = (
            lesion * (1 - veil)
            + veil * np.array([0.42, 0.44, 0.52], dtype=np.float32)[:, None, None] * dark * 1.4
        )
    return lesion


def _hairs(rng: np.random.Generator, size: int, n_hairs: tuple[int, int]) -> np.ndarray:
    """Hair coverage ``(H, W)`` in [0, 0.9]: dark smooth random curves (none in 30 % of cases)."""
    hw = (size, size)
    hair = np.zeros(hw, dtype=np.float32)
    for _ in range(int(rng.integers(n_hairs[0], n_hairs[1] + 1)) if rng.random() > 0.3 else 0):
        p = rng.uniform(0, size, size=2)
        ang = rng.uniform(0, 2 * np.pi)
        curv = rng.normal(0.0, 0.002)
        n_pts = int(rng.uniform(0.3, 1.2) * size / 0.4)
        pts = np.empty((n_pts, 2))
        for i in range(n_pts):
            ang += curv + rng.normal(0.0, 0.004)
            p = p + 0.4 * np.array([np.sin(ang), np.cos(ang)])
            pts[i] = p
        idx = np.round(pts).astype(int)
        idx = idx[np.all((idx >= 0) & (idx < size), axis=1)]
        h = np.zeros(hw, dtype=np.float32)
        np.add.at(h, tuple(idx.T), 0.4)
        thick = rng.uniform(0.5, 1.1)
        h = ndimage.gaussian_filter(h, thick) * thick * 4.0
        np.maximum(hair, np.clip(h, 0, 0.9), out=hair)
    return hair


def _optics(
    rng: np.random.Generator, image: np.ndarray, size: int, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Vignetting, sometimes the dermoscope's dark circular rim, noise; clipped float32."""
    rr = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) / (size / 2)
    image *= (1.0 - rng.uniform(0.1, 0.35) * rr**2)[None]
    if rng.random() < 0.3:
        rc = rng.uniform(1.05, 1.3)
        image *= (0.03 + 0.97 * special.expit((rc - rr) / 0.03))[None]
    image += rng.normal(0.0, rng.uniform(0.005, 0.025), size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)
