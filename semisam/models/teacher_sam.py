"""SAM / MedSAM ViT-B (``segment-anything``) as a slice-by-slice promptable teacher.

Unlike LiteMedSAM these models were trained with points, boxes and mask feedback, so clicks
are used as clicks (no box is invented) and a mask prompt goes in as SAM's dense
low-resolution input (with its per-slice bounding box). Weights are user-supplied
(``medsam-vit-b``, ``sam-vit-b`` in the catalogue).
"""

from __future__ import annotations

from typing import Optional

import torch

from .encoders import EmbeddingCache, SliceEncoder, sam_encoder
from .slice_teacher import SliceSAMTeacher


class SAMTeacher(SliceSAMTeacher):
    """SAM or MedSAM ViT-B over the slices of a volume (implements ``Teacher``)."""

    boxes_from_clicks = False
    mask_as_dense = True

    def __init__(self, net: torch.nn.Module, encoder: Optional[SliceEncoder] = None, cache: Optional[EmbeddingCache] = None, device: str = "cpu", name: str = "medsam-vit-b"):
        self.name = name
        super().__init__(net, encoder if encoder is not None else sam_encoder(net, name), cache, device)
