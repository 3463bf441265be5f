"""Pictures for people: orthogonal mid-slices of volumes with label outlines (PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .volume import Volume, prepare_output_folder

# Ultrasound names of the array axes (z, y, x): elevation, depth, lateral.
PLANES = (
    ("B-mode plane (depth x lateral)", 0),
    ("elevation plane (depth x elevation)", 2),
    ("C-plane (elevation x lateral)", 1),
)
COLOURS = ("#00e5ff", "#ffb300", "#76ff03", "#ff4081", "#d500f9", "#ff3d00", "#ffee58", "#1de9b6")


def _plane(volume: Volume, axis: int, index: int) -> Tuple[np.ndarray, Tuple[float, float, float, float]]:
    """Slice through ``axis`` at ``index`` oriented for display, and its extent in mm."""
    sx, sy, sz = volume.spacing
    arr = volume.array
    if axis == 0:  # rows = depth (y), columns = lateral (x)
        img, (h, w) = arr[index], (arr.shape[1] * sy, arr.shape[2] * sx)
    elif axis == 2:  # rows = depth (y), columns = elevation (z)
        img, (h, w) = arr[:, :, index].T, (arr.shape[1] * sy, arr.shape[0] * sz)
    else:  # rows = elevation (z), columns = lateral (x)
        img, (h, w) = arr[:, index, :], (arr.shape[0] * sz, arr.shape[2] * sx)
    return img, (0.0, w, h, 0.0)


def _centre(label: Optional[Volume], image: Volume) -> Tuple[int, int, int]:
    if label is not None and label.array.any():
        nz = np.argwhere(label.array > 0)
        return tuple(int(v) for v in np.round(nz.mean(axis=0)))  # type: ignore[return-value]
    return tuple(n // 2 for n in image.shape)  # type: ignore[return-value]


def save_mid_slices(
    images: Sequence[Volume],
    path: os.PathLike | str,
    labels: Optional[Sequence[Optional[Volume]]] = None,
    titles: Optional[Sequence[str]] = None,
    predictions: Optional[Sequence[Optional[Volume]]] = None,
) -> Path:
    """One row per volume, three orthogonal planes through the label's centre.

    Labels are drawn as solid outlines, predictions (if given) as dashed outlines. Planes
    are drawn in millimetres, so anisotropic spacing shows true proportions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    prepare_output_folder(path.parent)
    labels = list(labels) if labels is not None else [None] * len(images)
    predictions = list(predictions) if predictions is not None else [None] * len(images)
    fig, axes = plt.subplots(len(images), 3, figsize=(12, 3.6 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        centre = _centre(labels[row], image)
        for col, (plane_name, axis) in enumerate(PLANES):
            ax = axes[row, col]
            img, extent = _plane(image, axis, centre[axis])
            vmax = float(image.array.max()) or 1.0
            ax.imshow(img, cmap="gray", extent=extent, interpolation="nearest", vmin=0.0, vmax=vmax)
            for overlay, style in ((labels[row], "solid"), (predictions[row], "dashed")):
                if overlay is None:
                    continue
                lab, _ = _plane(overlay, axis, centre[axis])
                ys = np.linspace(extent[3], extent[2], lab.shape[0], endpoint=False) + (extent[2] - extent[3]) / lab.shape[0] / 2
                xs = np.linspace(extent[0], extent[1], lab.shape[1], endpoint=False) + (extent[1] - extent[0]) / lab.shape[1] / 2
                for k in np.unique(lab[lab > 0]):
                    ax.contour(xs, ys, (lab == k).astype(float), levels=[0.5], colors=COLOURS[(int(k) - 1) % len(COLOURS)], linewidths=1.2, linestyles=style)
            title = plane_name if titles is None else f"{titles[row]} - {plane_name}"
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("mm", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
