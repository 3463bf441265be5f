"""SAM-Med3D (and SAM-Med3D-turbo) as a promptable teacher, built from ``medim``'s own classes.

The network is ``medim.models.sam_med3d.build_sam3D_vit_b_ori`` called with
``pretrained=False`` (so medim never reads or downloads anything): a 3D ViT-B image encoder
(128^3 input, 16^3 patches, 8^3 x 384 embedding), a prompt encoder for 3D points and a
low-resolution mask (32^3, a quarter of the crop) and a mask decoder giving 32^3 logits.
Weights come only from a local file, read by :mod:`semisam.models.checkpoints` (no code
execution, strict keys and shapes). The state dict is medim's, e.g. ``image_encoder.pos_embed``
(1, 8, 8, 8, 768), ``image_encoder.blocks.{0..11}.attn.rel_pos_{d,h,w}``,
``prompt_encoder.point_embeddings.{0,1}.weight``, ``prompt_encoder.mask_downscaling.*``,
``mask_decoder.transformer.*``; the official files wrap it in ``model_state_dict``.

Like SAM-Med3D's own inference (``medim_infer.py``), every prediction works on one cubic crop
around the prompt, z-score normalised over its non-zero voxels, with the axes in array order
(z, y, x) and point coordinates in the same order.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from medim.models.sam_med3d import SAM_Med3D, build_sam3D_vit_b_ori

from .checkpoints import load_state_dict, load_strict, require_file
from .prompts import Prompts

OBTAIN = "https://huggingface.co/blueyo0/SAM-Med3D (sam_med3d_turbo.pth or sam_med3d.pth)"


@dataclass(frozen=True)
class SAMMed3DConfig:
    """Architecture hyper-parameters, as named by medim's builder. The defaults are the
    released SAM-Med3D / SAM-Med3D-turbo; smaller values are for tests only."""

    image_size: int = 128
    vit_patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    prompt_embed_dim: int = 384

    @classmethod
    def small(cls) -> "SAMMed3DConfig":
        """A tiny configuration of the same architecture (32^3 crop), for tests only."""
        return cls(image_size=32, vit_patch_size=8, encoder_embed_dim=48, encoder_depth=2,
                   encoder_num_heads=4, encoder_global_attn_indexes=(0, 1), prompt_embed_dim=48)


def build_network(config: SAMMed3DConfig) -> SAM_Med3D:
    """medim's SAM-Med3D network for ``config``, randomly initialised; nothing is downloaded."""
    kwargs = asdict(config)
    kwargs["encoder_global_attn_indexes"] = list(config.encoder_global_attn_indexes)
    return build_sam3D_vit_b_ori(pretrained=False, checkpoint_path="", **kwargs)


@dataclass
class SAMMed3DState:
    """What :meth:`SAMMed3DTeacher.prepare` keeps: the volume and the embedding of the last crop."""

    image: np.ndarray
    cache: Dict[Tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    encodes: int = 0  # how many times the image encoder ran (for diagnostics and tests)


class SAMMed3DTeacher:
    """SAM-Med3D as a :class:`~semisam.models.prompts.Teacher`.

    Args:
        checkpoint: local SAM-Med3D(-turbo) checkpoint; it is loaded strictly into the
            full-size network (or into ``config`` when one is given).
        device: torch device to run on.
        config: architecture; defaults to the released one. With ``checkpoint=None`` a
            ``config`` must be given and the network keeps random weights: for tests only.
        seed: seed of the random initialisation (``torch.manual_seed`` in a forked RNG state).

    Raises:
        CheckpointError: no checkpoint and no config, or a file that is missing, unsafe or
            made for another network.
    """

    name = "sam-med3d"

    def __init__(self, checkpoint: Optional[os.PathLike | str] = None, device: str | torch.device = "cpu",
                 config: Optional[SAMMed3DConfig] = None, seed: int = 0) -> None:
        # Random weights only when asked for explicitly (a config and no checkpoint): tests.
        random_weights = checkpoint is None and config is not None
        path = None if random_weights else require_file(checkpoint, self.name, OBTAIN)
        self.config = config or SAMMed3DConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_network(self.config)
        if path is not None:
            # The official files also store the training arguments as an argparse.Namespace,
            # a plain attribute container that runs no code when unpickled.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = load_state_dict(path)
            load_strict(self.model, state, path, self.name)
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    @classmethod
    def small_random(cls, seed: int = 0, device: str | torch.device = "cpu") -> "SAMMed3DTeacher":
        """A tiny randomly initialised teacher (:meth:`SAMMed3DConfig.small`), for tests only."""
        return cls(None, device=device, config=SAMMed3DConfig.small(), seed=seed)

    @property
    def crop_size(self) -> int:
        return self.config.image_size

    @property
    def low_res_shape(self) -> Tuple[int, int, int]:
        """Size of the mask prompt input and of the decoder's logits: 4x the embedding grid
        (32^3 for the released model)."""
        return (4 * (self.config.image_size // self.config.vit_patch_size),) * 3

    def prepare(self, image: np.ndarray) -> SAMMed3DState:
        """Keep the (z, y, x) volume; crops are encoded lazily by :meth:`predict`."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"SAM-Med3D needs a (z, y, x) volume, got shape {image.shape}")
        if not np.isfinite(image).all():
            raise ValueError("the volume contains NaN or infinite values")
        return SAMMed3DState(image=image)

    def predict(self, state: SAMMed3DState, prompts: Prompts) -> np.ndarray:
        """Foreground probability of the whole volume: the crop around the prompt, zeros elsewhere.

        The crop (``config.image_size`` cubed, 128^3 for the released model) is centred on the
        mean of the positive points (of all points when none is positive), shifted to stay
        inside the volume along axes longer than the crop and zero-padded along shorter ones.
        Its image embedding is kept in ``state`` until a prompt needs another crop.

        SAM-Med3D has no box prompt: every 2D box becomes a positive point at its centre (on its
        slice) and a 3D box a positive point at its centre. A mask prompt is cropped, resized to
        the low-resolution mask input (nearest, as SAM-Med3D's inference does) and, when no point
        is given, a positive point is put on the mask voxel nearest its centroid. Points that
        fall outside the crop are left out.

        Raises:
            ValueError: empty prompts, or prompts outside the volume.
        """
        shape = state.image.shape
        if prompts.empty:
            raise ValueError("SAM-Med3D needs a prompt: give at least one point, a box or a non-empty mask")
        prompts.validate(shape)
        points, labels = self._points(prompts)
        positive = points[labels == 1]
        centre = (positive if len(positive) else points).mean(axis=0)
        size = self.crop_size
        start = tuple(int(np.clip(round(c) - size // 2, min(0, n - size), max(0, n - size))) for c, n in zip(centre, shape))
        src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, shape))
        dst = tuple(slice(r.start - s, r.stop - s) for r, s in zip(src, start))

        local = points - np.asarray(start, np.float32)
        inside = np.all((local >= 0) & (local <= size - 1), axis=1)
        with torch.inference_mode():
            embedding = self._embedding(state, start, src, dst)
            coords = torch.as_tensor(local[inside], device=self.device).reshape(1, -1, 3)
            point_labels = torch.as_tensor(labels[inside], device=self.device).reshape(1, -1)
            mask_in = None
            if prompts.mask is not None:
                crop = torch.zeros((size,) * 3, device=self.device)
                crop[dst] = torch.as_tensor(prompts.mask[src], device=self.device)
                mask_in = F.interpolate(crop[None, None], size=self.low_res_shape, mode="nearest")
            encoder = self.model.prompt_encoder
            sparse, dense = encoder(points=(coords, point_labels) if coords.shape[1] else None, boxes=None, masks=mask_in)
            low_res, _ = self.model.mask_decoder(image_embeddings=embedding, image_pe=encoder.get_dense_pe(),
                                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                 multimask_output=False)
            logits = F.interpolate(low_res, size=(size,) * 3, mode="trilinear", align_corners=False)
            prob = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
        out = np.zeros(shape, np.float32)
        out[src] = prob[dst]
        return out

    @staticmethod
    def _points(prompts: Prompts) -> Tuple[np.ndarray, np.ndarray]:
        """All point prompts (z, y, x) with labels, boxes and (if needed) the mask turned into points."""
        pts, labels = [prompts.points], [prompts.point_labels]
        b = prompts.boxes2d
        if len(b):
            pts.append(np.stack([b[:, 0], (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2], axis=1))
            labels.append(np.ones(len(b), np.int64))
        if prompts.box3d is not None:
            lo, hi = np.asarray(prompts.box3d[:3]), np.asarray(prompts.box3d[3:])
            pts.append(((lo + hi) / 2).reshape(1, 3))
            labels.append(np.ones(1, np.int64))
        points, labels_ = np.concatenate(pts).astype(np.float32), np.concatenate(labels)
        if not len(points):  # a mask alone: one positive click on it, next to its centroid
            voxels = np.argwhere(prompts.mask > 0.5) if (prompts.mask > 0.5).any() else np.argwhere(prompts.mask > 0)
            nearest = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
            points, labels_ = nearest.reshape(1, 3).astype(np.float32), np.ones(1, np.int64)
        return points, labels_

    def _embedding(self, state: SAMMed3DState, start: Tuple[int, int, int], src: tuple, dst: tuple) -> torch.Tensor:
        """The image embedding of the crop at ``start``, from the cache when it was the last one."""
        if start in state.cache:
            return state.cache[start]
        size = self.crop_size
        crop = torch.zeros((size,) * 3)
        crop[dst] = torch.from_numpy(state.image[src])
        # torchio's ZNormalization(masking_method=lambda x: x > 0), as in SAM-Med3D: statistics
        # over the non-zero voxels, applied to the whole crop (padding included).
        values = crop[crop > 0] if (crop > 0).any() else crop.reshape(-1)
        std = float(values.std()) if values.numel() > 1 else 0.0
        crop = (crop - values.mean()) / (std if std > 1e-8 else 1.0)
        embedding = self.model.image_encoder(crop[None, None].to(self.device))
        state.cache.clear()
        state.cache[start] = embedding
        state.encodes += 1
        return embedding
