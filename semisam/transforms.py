"""MONAI transforms of SemiSAM (this module imports MONAI; ``semisam.data`` does so lazily)."""

from __future__ import annotations

import json
from typing import Any, Dict

import numpy as np
import torch
from monai.transforms import Transform

from . import volume
from .preprocess import PreprocessConfig, apply_to_label, preprocess


class LoadCased(Transform):
    """MONAI-style dictionary transform: read, preprocess and map the label of one case.

    Output keys: ``image`` (1, z, y, x) float32 tensor in [0, 1]; ``label`` (1, z, y, x) uint8
    tensor (zeros for unlabeled cases, see ``has_label``); ``record`` the preprocessing
    record as JSON (it survives batch collation), so predictions can be mapped back onto the
    original grid with ``PreprocessRecord.from_dict(json.loads(...))``.
    """

    def __call__(self, item: Dict[str, Any]) -> Dict[str, Any]:
        config = PreprocessConfig(**json.loads(item["preprocess"]))
        image = volume.read_volume(item["image_path"], "image")
        pre, record = preprocess(image, config)
        if item["has_label"]:
            label = apply_to_label(record, volume.read_volume(item["label_path"], "label")).array
        else:
            label = np.zeros(pre.shape, dtype=np.uint8)
        out = dict(item)
        out["image"] = torch.from_numpy(pre.array[None].copy())
        out["label"] = torch.from_numpy(label[None].copy())
        out["record"] = json.dumps(record.to_dict())
        return out
