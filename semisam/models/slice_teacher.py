"""SAM-family 2D promptable models run slice by slice through a volume (shared machinery).

Prompts are in voxel coordinates of the (preprocessed) volume; each prompted slice is
embedded once through :class:`~semisam.models.encoders.EmbeddingCache` (shared with the
student) and decoded with its prompts scaled to the model's input frame.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import EmbeddingCache, SliceEncoder
from .prompts import Prompts


def prompt_encoder_for(prompt_encoder: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """SAM's prompt encoder for an image encoder run at another input side (same weights).

    The prompt encoder normalises prompt coordinates by its input side, gives the dense
    positional encoding on its embedding grid and expects mask prompts at four times that
    grid. For another side, a shallow copy (sharing every weight) with those three sizes scaled.
    """
    native = int(prompt_encoder.input_image_size[0])
    if int(input_size) == native:
        return prompt_encoder
    grid = int(prompt_encoder.image_embedding_size[0]) * int(input_size) // native
    view = copy.copy(prompt_encoder)
    view.input_image_size = (int(input_size), int(input_size))
    view.image_embedding_size = (grid, grid)
    view.mask_input_size = (4 * grid, 4 * grid)
    return view


class SliceSAMTeacher:
    """A SAM-family 2D model (prompt encoder + mask decoder over a frozen slice encoder) run
    on the prompted slices of a volume (implements ``Teacher``).

    Subclasses choose how prompts are used: ``boxes_from_clicks`` turns clicks on a slice
    without a box into a box (for box-trained models); ``mask_as_dense`` feeds the mask prompt
    to the prompt encoder as its dense (low-resolution logit) input, else the mask only
    gives boxes.
    """

    name = "slice-sam"
    boxes_from_clicks = False
    mask_as_dense = True

    def __init__(self, net: torch.nn.Module, encoder: SliceEncoder, cache: Optional[EmbeddingCache] = None, device: str = "cpu", click_box_fraction: float = 0.15, box_margin: float = 0.0):
        self.net = net
        self.encoder = encoder
        self.cache = cache if cache is not None else EmbeddingCache()
        self.device = torch.device(device)
        self.click_box_fraction = float(click_box_fraction)
        self.box_margin = float(box_margin)
        self.size = encoder.input_size  # the encoder's input side: prompts are given in this frame
        self.prompt_encoder = prompt_encoder_for(net.prompt_encoder, self.size)

    @property
    def margin_px(self) -> float:
        """``box_margin`` is in pixels of the model's native frame: the same share of this frame."""
        return self.box_margin * self.size / float(self.net.prompt_encoder.input_image_size[0])

    def prepare(self, image: np.ndarray) -> Dict[str, Any]:
        """Remember the volume; slices are embedded (once, cached) when a prompt needs them."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {image.shape}")
        return {"image": image}

    def slice_boxes(self, prompts: Prompts, shape) -> Dict[int, np.ndarray]:
        """The (y0, x0, y1, x1) box used on each slice: a 2D box as given, else the mask's
        bounding box on that slice, else the 3D box, else (``boxes_from_clicks``) a box of
        ``click_box_fraction`` of the slice around the positive clicks."""
        depth, h, w = shape
        boxes: Dict[int, np.ndarray] = {}
        for z, y0, x0, y1, x1 in prompts.boxes2d:
            boxes[int(z)] = np.array([y0, x0, y1, x1], np.float32)
        if prompts.mask is not None:
            m = prompts.mask > 0.5
            for z in np.flatnonzero(m.any(axis=(1, 2))):
                if int(z) in boxes:
                    continue
                ys, xs = np.nonzero(m[z])
                boxes[int(z)] = np.array([ys.min(), xs.min(), ys.max(), xs.max()], np.float32)
        if prompts.box3d is not None:
            z0, y0, x0, z1, y1, x1 = prompts.box3d
            for z in range(max(int(round(z0)), 0), min(int(round(z1)), depth - 1) + 1):
                boxes.setdefault(z, np.array([y0, x0, y1, x1], np.float32))
        if not self.boxes_from_clicks:
            return boxes
        pos = prompts.points[prompts.point_labels == 1]
        half = np.array([h, w], np.float32) * self.click_box_fraction
        for z in np.unique(np.round(pos[:, 0]).astype(int)) if len(pos) else []:
            if int(z) in boxes:
                continue
            yx = pos[np.round(pos[:, 0]).astype(int) == z][:, 1:]
            lo = np.maximum(yx.min(axis=0) - half, 0)
            hi = np.minimum(yx.max(axis=0) + half, [h - 1, w - 1])
            boxes[int(z)] = np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)
        return boxes

    @torch.inference_mode()
    def predict(self, state: Dict[str, Any], prompts: Prompts) -> np.ndarray:
        """Foreground probability ``(z, y, x)``; slices without a prompt stay 0."""
        image = state["image"]
        prompts.validate(image.shape)
        boxes = self.slice_boxes(prompts, image.shape)
        point_slices = set(np.round(prompts.points[prompts.point_labels == 1, 0]).astype(int).tolist())
        zs = sorted(set(boxes) | (set() if self.boxes_from_clicks else point_slices))
        if not zs:
            raise ValueError(f"{self.name} needs a box, a mask or a positive click on some slice")
        depth, h, w = image.shape
        emb = self.cache.embed(image, self.encoder, slices=zs)
        scale = np.array([self.size / h, self.size / w], np.float32)
        out = np.zeros(image.shape, np.float32)
        pe = self.prompt_encoder.get_dense_pe()
        low_res = 4 * emb.shape[-1]  # SAM's mask input side: four times the embedding grid
        for z in zs:
            box = None
            if z in boxes:
                y0, x0, y1, x1 = (boxes[z] + 0.5) * np.tile(scale, 2) - 0.5
                m, top = self.margin_px, self.size - 1
                y0, x0, y1, x1 = max(y0 - m, 0), max(x0 - m, 0), min(y1 + m, top), min(x1 + m, top)
                box = torch.tensor([[[x0, y0, x1, y1]]], dtype=torch.float32, device=self.device)
            dense_mask = None
            if self.mask_as_dense and prompts.mask is not None and prompts.mask[z].any():
                m = torch.from_numpy(prompts.mask[z])[None, None].float()
                m = F.interpolate(m, size=(low_res, low_res), mode="bilinear", align_corners=False)
                dense_mask = ((m - 0.5) * 20.0).to(self.device)  # as logits, like SAM's own feedback
            on_slice = np.round(prompts.points[:, 0]).astype(int) == z
            points = None
            if on_slice.any():
                yx = (prompts.points[on_slice][:, 1:] + 0.5) * scale - 0.5
                coords = torch.tensor(yx[:, ::-1].copy()[None], dtype=torch.float32, device=self.device)  # (x, y)
                labels = torch.tensor(prompts.point_labels[on_slice][None], dtype=torch.int64, device=self.device)
                points = (coords, labels)
            sparse, dense = self.prompt_encoder(points=points, boxes=box, masks=dense_mask)
            logits, _ = self.net.mask_decoder(
                image_embeddings=emb[z : z + 1].float().to(self.device), image_pe=pe,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
            out[z] = torch.sigmoid(logits)[0, 0].cpu().numpy()
        return out
