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
) -> Segmentation:
    """One-click segmentation of ``volume``.

    Args:
        uncertainty: also return the per-voxel variance of the foreground probability over
            test-time flips (depth, rows, columns) of the stacked embeddings. Depth flips are
            exact for a per-slice encoder; in-plane flips perturb the decoder only.
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
    if probs.shape[0] == 1:
        label = (probs[0] > 0.5).to(torch.uint8)
    else:
        label = probs.argmax(0).to(torch.uint8)
    fg = _foreground(probs)
    result = Segmentation(
        label=invert(record, label.numpy(), "label"),
        probability=invert(record, fg.numpy(), "probability"),
    )
    if uncertainty:
        views = [fg]
        for dims in ((1,), (2,), (3,)):  # depth, rows, columns of (C, D, G, G)
            flipped = student.infer(torch.flip(emb, dims), size, device)
            views.append(torch.flip(_foreground(flipped), (dims[0] - 1,)))
        var = torch.stack(views).var(dim=0, unbiased=False)
        result.uncertainty = invert(record, var.numpy().astype(np.float32), "probability")
    return result
