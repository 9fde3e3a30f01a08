"""Regenerate docs/phantom_brain.png, docs/phantom_skin.png and the figures in docs/phantoms.md.

Run: ``.venv/bin/python docs/phantom_figures.py [--stats N]`` from the repository root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from noisyseg.storage.phantoms import BRAIN_CHANNELS, brain_mets_case, skin_case  # noqa: E402

DOCS = Path(__file__).resolve().parent


def brain_figure(seed: int, path: Path) -> None:
    case = brain_mets_case(seed)
    zs = sorted({int(round(les["center"][0])) for les in sorted(case.lesions, key=lambda d: -d["voxels"])[:4]})
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
        ax.imshow(case.image[1, z], cmap="gray", origin="lower", vmin=0,
                  vmax=np.percentile(case.image[1][case.tissue > 0], 99.5))
        if case.label[z].any():
            ax.contour(case.label[z], levels=[0.5], colors="r", linewidths=0.8, origin="lower")
        if r == 0:
            ax.set_title("t1c + label contour")
        ax.text(2, 2, f"z={z}", color="y", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"brain_mets_case(seed={seed}): {len(case.lesions)} lesions, "
                 f"diameters (vox) {[round(d['diameter_vox'], 1) for d in case.lesions]}", fontsize=10)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--brain-seed", type=int, default=3)
    args = parser.parse_args()
    brain_figure(args.brain_seed, DOCS / "phantom_brain.png")
    skin_figure(DOCS / "phantom_skin.png")


if __name__ == "__main__":
    main()
