"""Segment a volume with a trained student: preprocess, embed (cached), decode blockwise, invert.

Every output is written on the input's grid (shape, spacing, origin, direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .models.encoders import EmbeddingCache, SliceEncoder
from .models.student import SlicingSAM3D
from .preprocess import PreprocessConfig, invert, preprocess
from .volume import Volume


@dataclass
class Segmentation:
    """Results on the input's grid: label map (uint8), foreground probability, uncertainty."""

    label: Volume
    probability: Volume
    uncertainty: Optional[Volume] = None


def _foreground(probs: torch.Tensor) -> torch.Tensor:
    """(K', D, H, W) -> foreground probability (D, H, W)."""
    return probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]


def segment_volume(
    volume: Volume,
    student: SlicingSAM3D,
    encoder: SliceEncoder,
    preprocess_config: Optional[PreprocessConfig] = None,
    cache: Optional[EmbeddingCache] = None,
    uncertainty: bool = False,
    device: str = "cpu",
    largest_component: bool = False,
    tta: bool = False,
) -> Segmentation:
    """One-click segmentation of ``volume``.

    Args:
        uncertainty: also return the per-voxel variance of the foreground probability over
            test-time flips (depth, rows, columns) of the stacked embeddings. Depth flips are
            exact for a per-slice encoder; in-plane flips perturb the decoder only.
        largest_component: keep only the largest connected component of each structure (for
            structures that are one piece, e.g. an organ; students record it when trained so).
        tta: average the probabilities over the same flips (test-time augmentation; the
            decoder was trained with these flips of its embeddings). Four decoder passes.
    """
    if student.config.encoder != encoder.name:
        raise ValueError(f"the student was trained on '{student.config.encoder}' embeddings, not '{encoder.name}'")
    if student.config.encoder_id and student.config.encoder_id != encoder.weights_id:
        raise ValueError(
            f"the student was trained on embeddings of other '{encoder.name}' weights "
            f"({student.config.encoder_id}, given {encoder.weights_id}); pass the encoder checkpoint it was trained with"
        )
    cache = cache or EmbeddingCache()
    pre, record = preprocess(volume, preprocess_config or PreprocessConfig())
    emb = cache.embed(pre.array, encoder).float().permute(1, 0, 2, 3)  # (C, D, G, G)
    size = pre.shape[1:]
    probs = student.infer(emb, size, device)
    views = [probs]
    if tta or uncertainty:
        for dims in ((1,), (2,), (3,)):  # depth, rows, columns of (C, D, G, G) and of (K', D, H, W)
            views.append(torch.flip(student.infer(torch.flip(emb, dims), size, device), dims))
    if tta:
        probs = torch.stack(views).mean(dim=0)
    if probs.shape[0] == 1:
        label = (probs[0] > 0.5).to(torch.uint8)
    else:
        label = probs.argmax(0).to(torch.uint8)
    if largest_component:
        label = torch.from_numpy(keep_largest_component(label.numpy()))
    fg = _foreground(probs)
    result = Segmentation(
        label=invert(record, label.numpy(), "label"),
        probability=invert(record, fg.numpy(), "probability"),
    )
    if uncertainty:
        var = torch.stack([_foreground(v) for v in views]).var(dim=0, unbiased=False)
        result.uncertainty = invert(record, var.numpy().astype(np.float32), "probability")
    return result


def keep_largest_component(label: np.ndarray) -> np.ndarray:
    """Each structure 1..K reduced to its largest 26-connected component (others become 0)."""
    from scipy import ndimage

    out = np.zeros_like(label)
    for k in np.unique(label[label > 0]):
        parts, n = ndimage.label(label == k, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes = np.bincount(parts.ravel())[1:]
            out[parts == int(np.argmax(sizes)) + 1] = k
    return out
