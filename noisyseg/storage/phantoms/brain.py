"""3D brain-metastasis MRI phantoms (:func:`brain_mets_case`); see the package docstring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from noisyseg.storage.phantoms.anatomy import template_on_grid
from noisyseg.storage.phantoms.common import (
    PhantomCase,
    box_points,
    partial_volume,
    smooth_field,
    uniform_rotation,
    warp_coords,
)

#: Channel order of :func:`brain_mets_case` images: native T1, post-contrast T1, T2, T2-FLAIR.
BRAIN_CHANNELS: list[str] = ["t1", "t1c", "t2", "flair"]
#: Values of :attr:`PhantomCase.tissue` for brain phantoms (hard labels from the tissue fractions).
TISSUE_CLASSES: dict[int, str] = {0: "background", 1: "csf", 2: "gm", 3: "wm"}

# Relative tissue intensities per channel (white matter of native T1 = 1). Columns: CSF, GM, WM,
# enhancing lesion, necrotic core, oedema. Literature ordering: T1 WM > GM > CSF; T2 CSF > GM > WM;
# FLAIR suppresses CSF, GM > WM, oedema brightest; T1c = T1 plus gadolinium enhancement.
_TISSUE_INTENSITY = np.array(
    [
        # csf   gm    wm    enh   necr  oedema
        [0.30, 0.68, 1.00, 0.62, 0.42, 0.72],  # t1
        [0.32, 0.70, 1.00, 1.45, 0.40, 0.74],  # t1c (enh is the mean; drawn per lesion)
        [1.30, 0.62, 0.45, 0.68, 1.05, 0.90],  # t2
        [0.12, 0.68, 0.47, 0.74, 0.58, 1.00],  # flair
    ],
    dtype=np.float32,
)


# ---------------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------------


@dataclass
class _LesionShape:
    """An irregular star-shaped blob: r(u) = R exp(amp * g(u)) in a rotated, stretched frame."""

    centre_mm: np.ndarray  # (3,) in phantom mm (z, y, x)
    radius_mm: float
    rot: np.ndarray  # (3, 3)
    axes: np.ndarray  # (3,) stretch, geometric mean 1
    amp: float
    omegas: np.ndarray  # (K, 3) unit vectors
    freqs: np.ndarray  # (K,)
    phases: np.ndarray  # (K,)
    weights: np.ndarray  # (K,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, centre_mm: np.ndarray, radius_mm: float, diameter_vox: float
    ) -> _LesionShape:
        k = 6
        omegas = rng.standard_normal((k, 3))
        omegas /= np.linalg.norm(omegas, axis=1, keepdims=True)
        axes = np.exp(rng.normal(0.0, 0.12, size=3))
        axes /= np.exp(np.log(axes).mean())
        # Larger metastases are lobulated more; tiny ones are round at voxel scale anyway.
        amp = float(
            rng.uniform(0.06, 0.14) + min(diameter_vox, 20.0) / 20.0 * rng.uniform(0.0, 0.12)
        )
        return cls(
            centre_mm=np.asarray(centre_mm, dtype=np.float64),
            radius_mm=float(radius_mm),
            rot=uniform_rotation(rng),
            axes=axes,
            amp=amp,
            omegas=omegas,
            freqs=rng.uniform(1.0, 3.5, size=k),
            phases=rng.uniform(0.0, 2 * np.pi, size=k),
            weights=rng.standard_normal(k) / np.sqrt(k / 2.0),
        )

    @property
    def max_radius_mm(self) -> float:
        return float(
            self.radius_mm * self.axes.max() * np.exp(self.amp * np.abs(self.weights).sum())
        )

    def normalised_radius(self, pts_mm: np.ndarray) -> np.ndarray:
        """``|v| / r(u)`` for points (N, 3) in mm: < 1 inside the lesion, 1 on its surface."""
        f32 = np.float32
        v = (pts_mm.astype(f32) - self.centre_mm.astype(f32)) @ self.rot.astype(f32)  # lesion frame
        v /= self.axes.astype(f32)
        rho = np.sqrt((v * v).sum(axis=1))
        v /= np.maximum(rho, f32(1e-9))[:, None]
        arg = v @ self.omegas.T.astype(f32)
        arg *= self.freqs.astype(f32)
        arg += self.phases.astype(f32)
        g = np.sin(arg) @ self.weights.astype(f32)
        return rho / (f32(self.radius_mm) * np.exp(f32(self.amp) * g))


def _sample_diameters(
    rng: np.random.Generator, n: int, median: float, sigma: float, lo: float, hi: float
) -> np.ndarray:
    """Log-normal diameters (voxels), resampled until inside [lo, hi] (a truncated log-normal)."""
    out = np.empty(0)
    while out.size < n:
        d = median * np.exp(sigma * rng.standard_normal(2 * n + 4))
        out = np.concatenate([out, d[(d >= lo) & (d <= hi)]])
    return out[:n]


#: Field of view (z, y, x) in mm that holds the whole warped MNI brain.
BRAIN_FOV_MM: tuple[float, float, float] = (160.0, 208.0, 160.0)


def default_brain_shape(spacing_mm: float) -> tuple[int, int, int]:
    """Grid (Z, Y, X) covering :data:`BRAIN_FOV_MM` at ``spacing_mm``, rounded up to multiples of 8."""
    return tuple(int(8 * np.ceil(f / spacing_mm / 8)) for f in BRAIN_FOV_MM)  # type: ignore[return-value]


def brain_mets_case(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: float = 2.0,
    n_lesions: tuple[int, int] = (3, 15),
    diameter_vox: tuple[float, float] = (1.0, 30.0),
    median_diameter_vox: float = 3.0,
    diameter_log_sigma: float = 0.8,
    min_gap_vox: int = 2,
    noise: tuple[float, float] = (0.03, 0.06),
    bias: float = 0.12,
    vessels: bool = True,
    psf_vox: tuple[float, float] = (0.35, 0.55),
) -> PhantomCase:
    """A 4-sequence brain MRI phantom with metastases.

    Args:
        seed: the case's random seed (the only source of randomness).
        shape: grid ``(Z, Y, X)``. ``None`` (default) gives the 160 x 208 x 160 mm field that holds
            the whole brain, rounded up to multiples of 8 voxels: ``(80, 104, 80)`` at 2 mm. A
            smaller grid crops around the brain centre.
        spacing_mm: isotropic voxel size in mm (default 2 mm keeps CPU training feasible).
        n_lesions: inclusive range of lesions drawn per case (fewer are kept only when no room is
            found; ``len(case.lesions)`` is what was placed).
        diameter_vox: clip range of nominal lesion diameters, in voxels.
        median_diameter_vox, diameter_log_sigma: the log-normal of nominal diameters (voxels):
            ``d = median * exp(sigma * N(0,1))`` truncated to ``diameter_vox``.
        min_gap_vox: lesions are at least this many voxels apart (Chebyshev), so every lesion is its
            own 26-connected component of the label.
        noise: range of the Rician noise sigma, as a fraction of the channel's mean GM/WM level.
        bias: standard deviation of the log bias field (multiplicative, smooth).
        vessels: add thin enhancing vessel-like structures in sulci on T1c (false-positive mimics).
        psf_vox: range of the in-plane Gaussian point-spread sigma in voxels (through-plane is 1.3x);
            ``(0, 0)`` turns the blur off.

    Returns:
        :class:`PhantomCase` with image float32 ``(4, Z, Y, X)`` (:data:`BRAIN_CHANNELS`), label
        uint8 ``(Z, Y, X)``, spacing ``(s, s, s)`` mm, RAS affine, the lesion list and the tissue map.
    """
    shape = _check_arguments(shape, spacing_mm, n_lesions)
    rng = np.random.default_rng(seed)
    s = float(spacing_mm)
    tpl = template_on_grid(shape, s)
    anat = _warped_anatomy(rng, shape, s, tpl)
    n_draw = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    diameters = np.sort(
        _sample_diameters(rng, n_draw, median_diameter_vox, diameter_log_sigma, *diameter_vox)
    )[::-1]
    # Tissue intensities of this case (scanner / subject variation).
    inten = _TISSUE_INTENSITY * np.exp(rng.normal(0.0, 0.04, size=_TISSUE_INTENSITY.shape)).astype(
        np.float32
    )
    les = _Lesions(shape)
    for d_vox in diameters:
        _place_lesion(rng, les, anat, float(d_vox), s, inten, min_gap_vox, tpl["affine"])
    image = _contrasts(rng, anat, les, inten, s, noise, bias, vessels, psf_vox)
    return PhantomCase(
        image=image,
        label=les.label,
        spacing=(s, s, s),
        channel_names=list(BRAIN_CHANNELS),
        affine=tpl["affine"].copy(),
        lesions=les.records,
        tissue=anat.tissue,
    )


def _check_arguments(
    shape: tuple[int, int, int] | None, spacing_mm: float, n_lesions: tuple[int, int]
) -> tuple[int, int, int]:
    """The grid shape (default :func:`default_brain_shape`), or ValueError for bad arguments."""
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    if shape is None:
        shape = default_brain_shape(spacing_mm)
    shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 ints >= 8, got {shape}")
    if n_lesions[0] < 0 or n_lesions[1] < n_lesions[0]:
        raise ValueError(f"n_lesions must be a range (lo <= hi), got {n_lesions}")
    return shape  # type: ignore[return-value]


@dataclass
class _Anatomy:
    """Tissue fractions of one warped brain, all ``(Z, Y, X)``: ``brain``, ``gm``, ``wm``,
    ``par`` (parenchyma), ``csf``; ``brain_mask`` (bool), ``tissue`` (uint8 classes), ``resid``
    (T1 residual not explained by the classes), and the lesion-placement fields ``weight`` and
    ``depth`` (mm from the brain surface), flattened."""

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    par: np.ndarray
    csf: np.ndarray
    brain_mask: np.ndarray
    tissue: np.ndarray
    resid: np.ndarray
    weight: np.ndarray
    depth: np.ndarray


def _warped_anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int], s: float, tpl: dict[str, np.ndarray]
) -> _Anatomy:
    """Warp the template (small affine + elastic field) and derive the tissue maps."""
    coords = warp_coords(
        rng, shape, s, rotate_deg=5.0, scale_range=0.05, shift_mm=3.0, elastic_mm=2.5
    )
    warped = {
        k: ndimage.map_coordinates(tpl[k], coords, order=1, mode="constant", cval=0.0)
        for k in ("t1", "gm", "wm", "brain")
    }
    del coords
    brain = np.clip(warped["brain"], 0.0, 1.0)
    gm = np.clip(warped["gm"], 0.0, 1.0)
    wm = np.clip(warped["wm"], 0.0, 1.0)
    par = np.minimum(gm + wm, brain)  # parenchyma fraction
    csf = np.clip(brain - par, 0.0, 1.0)
    brain_mask = brain > 0.5
    tissue = np.where(brain_mask, np.argmax(np.stack([csf, gm, wm]), axis=0) + 1, 0).astype(
        np.uint8
    )
    # Residual anatomy (deep grey nuclei, etc.) not explained by the three classes, in T1 units.
    t1_cls = (
        csf * _TISSUE_INTENSITY[0, 0] + gm * _TISSUE_INTENSITY[0, 1] + wm * _TISSUE_INTENSITY[0, 2]
    )
    resid = np.where(brain > 0.5, warped["t1"] - t1_cls, 0.0).astype(np.float32)
    resid = np.clip(resid, -0.25, 0.25)
    depth_mm = ndimage.distance_transform_edt(brain_mask) * s
    junction = ndimage.gaussian_filter(4.0 * gm * wm, 1.0)  # 1 where GM and WM meet 50/50
    weight = np.where(par > 0.5, 0.15 + junction, 0.0).ravel()
    return _Anatomy(brain, gm, wm, par, csf, brain_mask, tissue, resid, weight, depth_mm.ravel())


class _Lesions:
    """The lesions placed so far: ``label`` (uint8), ``frac`` (partial-volume fraction),
    ``sums`` ``(4, Z, Y, X)`` (fraction × intensity, summed over lesions), ``oedema`` fraction,
    and one record per lesion."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = np.array(shape)
        self.label = np.zeros(shape, dtype=np.uint8)
        self.frac = np.zeros(shape, dtype=np.float32)
        self.sums = np.zeros((4,) + shape, dtype=np.float32)
        self.oedema = np.zeros(shape, dtype=np.float32)
        self.records: list[dict] = []


def _lesion_look(
    rng: np.random.Generator, d_vox: float, s: float, inten: np.ndarray
) -> tuple[bool, float, float, float, np.ndarray]:
    """Draw a lesion's appearance: ``(ring, core_ratio, oedema_mm, enhancement, intensities)``;
    enhancement relative to the case's T1c white matter, intensities ``(channel, [enhancing,
    necrotic])``."""
    radius_mm = d_vox * s / 2.0
    # Necrotic core (ring enhancement) in lesions >= 1 cm, near-certain from ~3 cm.
    ring = bool(
        d_vox * s >= 10.0 and rng.random() < 0.5 + 0.5 * min((d_vox * s - 10.0) / 20.0, 1.0)
    )
    core_ratio = float(rng.uniform(0.35, 0.7)) if ring else 0.0
    p_oed = 0.25 + 0.7 * min(d_vox / 10.0, 1.0)
    oedema_mm = float(min(radius_mm * rng.uniform(0.6, 2.0), 25.0)) if rng.random() < p_oed else 0.0
    # Enhancement relative to WM: 1.45 x exp(N(0, 0.15)), kept in [1.2, 1.9] x WM.
    enh = float(inten[1, 2] * np.clip(1.45 * np.exp(rng.normal(0.0, 0.15)), 1.2, 1.9))
    les_int = np.array(
        [
            [inten[0, 3] * np.exp(rng.normal(0, 0.05)), inten[0, 4]],
            [enh, inten[1, 4]],
            [inten[2, 3] * np.exp(rng.normal(0, 0.1)), inten[2, 4]],
            [inten[3, 3] * np.exp(rng.normal(0, 0.08)), inten[3, 4]],
        ],
        dtype=np.float32,
    )
    return ring, core_ratio, oedema_mm, float(enh / inten[1, 2]), les_int


def _place_lesion(
    rng: np.random.Generator,
    les: _Lesions,
    anat: _Anatomy,
    d_vox: float,
    s: float,
    inten: np.ndarray,
    min_gap_vox: int,
    affine: np.ndarray,
) -> None:
    """Draw one lesion of nominal diameter ``d_vox`` and place it (up to 40 tries; none when no
    room is found)."""
    radius_mm = d_vox * s / 2.0
    look = _lesion_look(rng, d_vox, s, inten)
    ss = 3 if d_vox < 4 else 2 if d_vox < 20 else 1  # sub-voxel samples per axis
    cand = np.flatnonzero(anat.weight * (anat.depth >= radius_mm + s))
    if cand.size == 0:
        return
    p = anat.weight[cand] / anat.weight[cand].sum()
    for _attempt in range(40):
        centre_vox = np.array(
            np.unravel_index(rng.choice(cand, p=p), tuple(les.shape)), dtype=np.float64
        )
        centre_vox += rng.uniform(-0.5, 0.5, size=3)
        shape = _LesionShape.random(rng, centre_vox * s, radius_mm, float(d_vox))
        if _try_lesion(rng, les, anat, shape, centre_vox, d_vox, s, ss, look, min_gap_vox, affine):
            return


def _try_lesion(
    rng: np.random.Generator,
    les: _Lesions,
    anat: _Anatomy,
    shape: _LesionShape,
    centre_vox: np.ndarray,
    d_vox: float,
    s: float,
    ss: int,
    look: tuple[bool, float, float, float, np.ndarray],
    min_gap_vox: int,
    affine: np.ndarray,
) -> bool:
    """Rasterise a candidate lesion; add it when it lies in parenchyma with a gap to the others."""
    ring, core_ratio, oedema_mm, enh, les_int = look
    radius_mm = d_vox * s / 2.0
    r_vox = shape.max_radius_mm / s
    lo = np.maximum(np.floor(centre_vox - r_vox).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(centre_vox + r_vox).astype(int) + 2, les.shape)
    pts, box = box_points(lo, hi, s, ss)
    nr = shape.normalised_radius(pts)
    f_in = partial_volume((nr <= 1.0).astype(np.float32), box, ss)
    if f_in.max() <= 0:
        return False
    mask = f_in >= 0.5
    if not mask.any():
        mask = f_in == f_in.max()
    comp, n_comp = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n_comp > 1:
        mask = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    if not _room_for(les, anat, mask, f_in, lo, hi, sl, min_gap_vox):
        return False
    if ring:  # an irregular, slightly off-centre necrotic core: the rim's thickness varies
        off = rng.normal(0.0, 0.12 * core_ratio * radius_mm, size=3)
        core = _LesionShape.random(rng, shape.centre_mm + off, core_ratio * radius_mm, float(d_vox))
        in_core = (core.normalised_radius(pts) <= 1.0) & (nr <= 0.8)
        f_core = partial_volume(in_core.astype(np.float32), box, ss)
    else:
        f_core = 0.0
    les.frac[sl] += f_in
    les.sums[(slice(None),) + sl] += (f_in - f_core) * les_int[:, 0, None, None, None]
    if ring:
        les.sums[(slice(None),) + sl] += f_core * les_int[:, 1, None, None, None]
    les.label[sl][mask] = 1
    if oedema_mm > 0:
        _add_oedema(shape, oedema_mm, s, les.shape, centre_vox, anat.wm, anat.par, les.oedema, rng)
    cz, cy, cx = centre_vox
    les.records.append(
        {
            "id": len(les.records) + 1,
            "center": [float(cz), float(cy), float(cx)],
            "center_mm": [float(v) for v in (affine @ np.r_[centre_vox, 1.0])[:3]],
            "radius_mm": float(radius_mm),
            "diameter_vox": float(d_vox),
            "voxels": int(mask.sum()),
            "ring": ring,
            "oedema_mm": float(oedema_mm),
            "enhancement": enh,
            "tissue": TISSUE_CLASSES[int(anat.tissue[tuple(np.round(centre_vox).astype(int))])],
        }
    )
    return True


def _room_for(
    les: _Lesions,
    anat: _Anatomy,
    mask: np.ndarray,
    f_in: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    sl: tuple[slice, ...],
    min_gap_vox: int,
) -> bool:
    """All label voxels in the brain, mostly in parenchyma; a gap to every other lesion; no
    partial-volume tail on other lesions' voxels."""
    if not anat.brain_mask[sl][mask].all() or (anat.par[sl][mask] > 0.5).mean() < 0.85:
        return False
    gap_struct = np.ones((2 * min_gap_vox + 1,) * 3, dtype=bool)
    glo = np.maximum(lo - min_gap_vox, 0)
    ghi = np.minimum(hi + min_gap_vox, les.shape)
    gsl = tuple(slice(a, b) for a, b in zip(glo, ghi, strict=True))
    big = np.zeros(tuple(ghi - glo), dtype=bool)
    big[tuple(slice(a - g, b - g) for a, b, g in zip(lo, hi, glo, strict=True))] = mask
    if (ndimage.binary_dilation(big, gap_struct) & (les.label[gsl] > 0)).any():
        return False
    return not (les.frac[sl][f_in > 0] > 0).any()


def _contrasts(
    rng: np.random.Generator,
    anat: _Anatomy,
    les: _Lesions,
    inten: np.ndarray,
    s: float,
    noise: tuple[float, float],
    bias: float,
    vessels: bool,
    psf_vox: tuple[float, float],
) -> np.ndarray:
    """The 4 sequences ``(4, Z, Y, X)`` float32: tissue mixture, lesions, oedema, vessels (T1c),
    texture, bias field, point-spread blur, Rician noise, per-case scale; 0 outside the brain."""
    shape = tuple(int(n) for n in les.shape)
    frac = np.minimum(les.frac, 1.0)
    oedema = np.minimum(les.oedema, 1.0) * (1.0 - frac)
    if vessels:
        vessel = _vessels(rng, shape, s, anat.csf + 0.5 * anat.gm, anat.brain_mask)
        vessel *= 1.0 - np.minimum(les.frac * 4.0, 1.0)
    image = np.empty((4,) + shape, dtype=np.float32)
    # Mild smooth heterogeneity of tissue (shared by the sequences: it is the same tissue).
    tissue_texture = 1.0 + smooth_field(rng, shape, tuple(max(4, n // 4) for n in shape), 0.03)
    les_texture = 1.0 + smooth_field(rng, shape, tuple(max(4, n // 3) for n in shape), 0.1)
    # Acquisition point-spread function (voxels; thicker through-plane): the main reason a lesion
    # of one or two voxels loses most of its contrast.
    psf_sigma = (rng.uniform(*psf_vox) * 1.3, rng.uniform(*psf_vox), rng.uniform(*psf_vox))
    shared_bias = smooth_field(rng, shape, 4, bias)
    for c in range(4):
        i_csf, i_gm, i_wm, _, _, i_oed = inten[c]
        k_resid = (i_wm - i_gm) / (_TISSUE_INTENSITY[0, 2] - _TISSUE_INTENSITY[0, 1])
        tissue_par = anat.gm * i_gm + anat.wm * i_wm
        base = (
            anat.csf * i_csf
            + (1.0 - oedema) * tissue_par
            + oedema * anat.par * i_oed
            + k_resid * anat.resid
        )
        if vessels and c == 1:
            base = base + vessel * (inten[1, 3] - i_csf)
        img = (1.0 - frac) * base + les.sums[c] * les_texture
        img *= tissue_texture
        img *= np.exp(shared_bias + smooth_field(rng, shape, 3, bias * 0.5))
        img = ndimage.gaussian_filter(img, psf_sigma, mode="nearest")
        sigma = float(rng.uniform(*noise)) * float(inten[c, 1:3].mean())
        img = np.sqrt(
            (img + sigma * rng.standard_normal(shape, dtype=np.float32)) ** 2
            + (sigma * rng.standard_normal(shape, dtype=np.float32)) ** 2
        )
        img[~anat.brain_mask] = 0.0  # skull-stripped, like BraTS-style preprocessing
        image[c] = img * np.float32(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
    return image


def _add_oedema(
    les: _LesionShape,
    oedema_mm: float,
    s: float,
    shape_arr: np.ndarray,
    centre_vox: np.ndarray,
    wm: np.ndarray,
    par: np.ndarray,
    oedema: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Vasogenic oedema around a lesion: Gaussian fall-off with distance, spreading along WM."""
    r_vox = (les.max_radius_mm + 2.0 * oedema_mm) / s
    lo = np.maximum(np.floor(centre_vox - r_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + r_vox).astype(int) + 1, shape_arr)
    pts, box = box_points(lo, hi, s, 1)
    nr = les.normalised_radius(pts).reshape(box)
    dist = np.maximum(nr - 1.0, 0.0) * les.radius_mm
    # Irregular extent: the oedema front is lobulated (finger-like along WM tracts).
    wobble = np.exp(0.3 * smooth_field(rng, box, tuple(max(2, b // 6) for b in box), 1.0))
    f = np.exp(-((dist / (oedema_mm * wobble)) ** 2))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    w_share = wm[sl] / np.maximum(par[sl], 1e-3)
    f *= np.clip(0.25 + 0.75 * w_share, 0.0, 1.0) * (par[sl] > 0.2)
    np.maximum(oedema[sl], f.astype(np.float32), out=oedema[sl])


def _vessels(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    s: float,
    where: np.ndarray,
    brain_mask: np.ndarray,
) -> np.ndarray:
    """Thin, smooth, tortuous tubes (enhancing cortical vessels) as a fraction map (Z, Y, X)."""
    density = np.zeros(shape, dtype=np.float32)
    cand = np.flatnonzero((where > 0.5) & brain_mask)
    if cand.size == 0:
        return density
    n = int(rng.integers(10, 25))
    step = 0.5  # voxels
    for start in rng.choice(cand, size=n):
        p = np.array(np.unravel_index(start, shape), dtype=np.float64)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        length = int(rng.uniform(10.0, 40.0) / s / step)
        pts = np.empty((length, 3))
        for i in range(length):
            d = d + 0.25 * rng.standard_normal(3)
            d /= np.linalg.norm(d)
            p = p + step * d
            pts[i] = p
        idx = np.round(pts).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        idx = idx[ok]
        np.add.at(density, tuple(idx.T), step)
    density = ndimage.gaussian_filter(density, 0.6)
    return np.clip(density * 2.0, 0.0, 0.7) * (where > 0.3)
