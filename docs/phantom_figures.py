"""Regenerate docs/phantom_brain.png, docs/phantom_skin.png and the figures in docs/phantoms.md.

Run: ``.venv/bin/python docs/phantom_figures.py [--stats N]`` from the repository root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

from noisyseg.storage.phantoms import BRAIN_CHANNELS, brain_mets_case, skin_case

DOCS = Path(__file__).resolve().parent


def brain_figure(seed: int, path: Path) -> None:
    case = brain_mets_case(seed)
    by_size = sorted(case.lesions, key=lambda d: -d["voxels"])
    picks = [
        by_size[i] for i in sorted({0, 1, len(by_size) // 2, len(by_size) - 1}) if i < len(by_size)
    ]
    zs = sorted({round(les["center"][0]) for les in picks})
    fig, axes = plt.subplots(len(zs), 5, figsize=(15, 3.3 * len(zs)))
    axes = np.atleast_2d(axes)
    for r, z in enumerate(zs):
        for c in range(4):
            sl = case.image[c, z]
            vmax = np.percentile(case.image[c][case.tissue > 0], 99.5)
            ax = axes[r, c]
            ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            if r == 0:
                ax.set_title(BRAIN_CHANNELS[c])
            ax.axis("off")
        ax = axes[r, 4]
        ax.imshow(
            case.image[1, z],
            cmap="gray",
            origin="lower",
            vmin=0,
            vmax=np.percentile(case.image[1][case.tissue > 0], 99.5),
        )
        if case.label[z].any():
            ax.contour(case.label[z], levels=[0.5], colors="r", linewidths=0.8, origin="lower")
        if r == 0:
            ax.set_title("t1c + label contour")
        sizes = [les["voxels"] for les in case.lesions if round(les["center"][0]) == z]
        ax.text(2, 2, f"z={z}, lesion voxels {sizes}", color="y", fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"brain_mets_case(seed={seed}): {len(case.lesions)} lesions, "
        f"diameters (vox) {[round(d['diameter_vox'], 1) for d in case.lesions]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def skin_figure(path: Path, n: int = 8) -> None:
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6))
    for i in range(n):
        case = skin_case(i)
        axes[0, i].imshow(np.moveaxis(case.image, 0, -1))
        axes[0, i].set_title(f"seed {i}", fontsize=8)
        axes[1, i].imshow(np.moveaxis(case.image, 0, -1))
        axes[1, i].contour(case.label, levels=[0.5], colors="c", linewidths=0.8)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ring(mask: np.ndarray, inner: int = 1, outer: int = 3) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(
        mask, iterations=inner
    )


def brain_stats(n_cases: int) -> str:
    """Markdown tables: lesion count/size distribution and contrast-to-noise over n_cases cases.

    CNR of a lesion in channel c = (mean over the lesion's label voxels - mean over a 1-3 voxel
    parenchyma shell around it, other lesions excluded) / sigma_c, with sigma_c the std of
    (noisy - noise-free twin) inside the brain: the twin has the same seed and noise=(0, 0).
    """
    import cc3d

    rows, counts, flair_ratio = [], [], []
    for seed in range(n_cases):
        case = brain_mets_case(seed)
        clean = brain_mets_case(seed, noise=(0.0, 0.0))
        brain = case.tissue > 0
        sigma = [(case.image[c] - clean.image[c])[brain].std() for c in range(4)]
        cc = cc3d.connected_components(case.label, connectivity=26)
        par = np.isin(case.tissue, (2, 3)) & (case.label == 0)
        far = par & ~ndimage.binary_dilation(case.label > 0, iterations=10)
        counts.append(len(case.lesions))
        for les in case.lesions:
            z, y, x = np.round(les["center"]).astype(int)
            k = cc[z, y, x]
            if k == 0:  # tiny off-centre lesion: its component is the one nearest the centre
                ids = np.unique(
                    cc[max(z - 2, 0) : z + 3, max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3]
                )
                k = ids[ids > 0][0]
            m = cc == k
            ring = _ring(m) & par
            cnr = [
                (case.image[c][m].mean() - case.image[c][ring].mean()) / sigma[c] for c in range(4)
            ]
            rows.append((les["diameter_vox"], int(m.sum()), *cnr))
            if les["oedema_mm"] > 0 and m.sum() >= 8:
                shell = _ring(m, 1, 2) & par
                flair_ratio.append(case.image[3][shell].mean() / case.image[3][far].mean())
    r = np.array(rows)
    d = r[:, 0]
    out = [f"Measured over seeds 0..{n_cases - 1} at the defaults ({len(r)} lesions).", ""]
    c = np.array(counts)
    out.append(
        f"Lesions per case: min {c.min()}, median {np.median(c):.0f}, mean {c.mean():.1f}, max {c.max()}."
    )
    q = np.percentile(d, [10, 25, 50, 75, 90, 99])
    out.append(
        "Nominal diameter (voxels) quantiles 10/25/50/75/90/99 %: "
        + ", ".join(f"{v:.1f}" for v in q)
        + f"; mean {d.mean():.2f}."
    )
    qv = np.percentile(r[:, 1], [10, 50, 90, 99])
    out.append(
        "Label voxels per lesion quantiles 10/50/90/99 %: "
        + ", ".join(f"{v:.0f}" for v in qv)
        + f"; mean {r[:, 1].mean():.1f}."
    )
    out += [
        "",
        (
            "| diameter (voxels) | diameter (mm at 2 mm) | lesions | share | median voxels "
            "| CNR t1 | CNR t1c | CNR t2 | CNR flair |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lo, hi in [(1, 2), (2, 3), (3, 5), (5, 10), (10, 20), (20, 30.01)]:
        sel = (d >= lo) & (d < hi)
        if not sel.any():
            out.append(f"| {lo}-{hi:.0f} | {2 * lo}-{2 * hi:.0f} | 0 | 0 % | - | - | - | - | - |")
            continue
        med = np.median(r[sel, 2:], axis=0)
        out.append(
            f"| {lo}-{hi:.0f} | {2 * lo}-{2 * hi:.0f} | {sel.sum()} | {100 * sel.mean():.0f} % "
            f"| {np.median(r[sel, 1]):.0f} | " + " | ".join(f"{v:+.1f}" for v in med) + " |"
        )
    out += ["", "CNR columns are medians within the bin.", ""]
    fr = np.array(flair_ratio)
    out.append(
        f"FLAIR: mean of the 1-2 voxel shell around a lesion with oedema (>= 8 voxels) / mean "
        f"of parenchyma >= 10 voxels from any lesion: median {np.median(fr):.2f}, "
        f"10 % quantile {np.percentile(fr, 10):.2f} ({len(fr)} lesions)."
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--brain-seed", type=int, default=5)
    parser.add_argument("--stats", type=int, default=0, help="print the tables of docs/phantoms.md")
    args = parser.parse_args()
    if args.stats:
        print(brain_stats(args.stats))
        return
    brain_figure(args.brain_seed, DOCS / "phantom_brain.png")
    skin_figure(DOCS / "phantom_skin.png")


if __name__ == "__main__":
    main()
