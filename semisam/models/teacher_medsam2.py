"""MedSAM2 teacher: Meta's ``sam2`` video predictor run slice by slice through a volume.

MedSAM2 (Ma et al., 2025) is SAM2.1 hiera-tiny fine-tuned on 3D medical images at an input
size of 512 instead of 1024. Its checkpoints have exactly the parameter keys and shapes of
SAM2.1 hiera-tiny (``{"model": state_dict}``); only the input size and the RoPE feature size
of the memory attention (32x32 instead of 64x64) differ, and neither is a parameter. The model
is therefore built from the ``sam2`` package's own ``sam2.1_hiera_t.yaml`` with those values
overridden in Python (no config file of ours, no Hydra search path, nothing downloaded).

The (z, y, x) volume is treated as a video whose frames are its z slices. Frames are fed from
memory: the inference state that ``SAM2VideoPredictor.init_state`` would build from a JPEG
folder is built here from the array, with a lazy frame sequence in place of the image tensor,
so no file is written and image embeddings are computed only when a frame is visited.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import load_state_dict, load_strict, require_file
from .prompts import Prompts

MODEL = "medsam2"
OBTAIN = "https://huggingface.co/wanglab/MedSAM2 (e.g. MedSAM2_latest.pt)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OBJ_ID = 1

# Values the MedSAM2 inference config (sam2.1_hiera_t512.yaml) changes in sam2.1_hiera_t.yaml,
# plus those build_sam2_video_predictor adds. fill_hole_area is 0: hole filling needs sam2's
# CUDA extension and is skipped (with a warning per frame) without it.
_VIDEO_OVERRIDES: Dict[str, Any] = {
    "_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 0,
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
}

# A much smaller configuration of the same architecture (same classes, smaller widths and
# depths) for tests only: its random weights segment nothing meaningful.
_SMALL_OVERRIDES: Dict[str, Any] = {
    "image_encoder": {
        "trunk": {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "window_spec": [8, 4, 4, 2]},
        "neck": {"d_model": 64, "backbone_channel_list": [128, 64, 32, 16], "position_encoding": {"num_pos_feats": 64}},
    },
    "memory_attention": {
        "d_model": 64,
        "num_layers": 1,
        "layer": {
            "d_model": 64,
            "dim_feedforward": 128,
            "self_attention": {"embedding_dim": 64},
            "cross_attention": {"embedding_dim": 64, "kv_in_dim": 32},
        },
    },
    "memory_encoder": {
        "out_dim": 32,
        "in_dim": 64,
        "position_encoding": {"num_pos_feats": 32},
        "mask_downsampler": {"embed_dim": 64},
        "fuser": {"num_layers": 1, "layer": {"dim": 64}},
    },
}


def medsam2_config(image_size: int = 512, small: bool = False) -> Any:
    """The OmegaConf model config of the MedSAM2 video predictor.

    Args:
        image_size: square input size of the model (512 for MedSAM2; a multiple of 32).
        small: a reduced configuration of the same architecture, for tests only.

    Returns:
        The resolved ``model`` node, ready for ``hydra.utils.instantiate``.
    """
    import sam2
    from omegaconf import OmegaConf

    if image_size % 32 or image_size < 64:
        raise ValueError(f"image_size must be a multiple of 32 and at least 64, got {image_size}")
    base = OmegaConf.load(os.path.join(sam2.__path__[0], "configs", "sam2.1", "sam2.1_hiera_t.yaml"))
    feat = image_size // 16
    rope = {"feat_sizes": [feat, feat]}
    overrides: Dict[str, Any] = {
        "image_size": image_size,
        "memory_attention": {"layer": {"self_attention": dict(rope), "cross_attention": dict(rope)}},
        **_VIDEO_OVERRIDES,
    }
    cfg = OmegaConf.merge(base.model, overrides, _SMALL_OVERRIDES if small else {})
    OmegaConf.resolve(cfg)
    return cfg


class _Frames:
    """The slices of a volume as sam2 frames, made on access: ``frames[t]`` is the (3, S, S)
    ImageNet-normalised tensor sam2's ``init_state`` would have loaded from ``<t>.jpg``."""

    def __init__(self, resized: torch.Tensor) -> None:
        self.resized = resized  # (T, S, S) in [0, 1]
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.resized)

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.resized[index][None].expand(3, -1, -1) - self.mean) / self.std


@dataclass
class MedSAM2State:
    """What :meth:`MedSAM2Teacher.prepare` returns: the sam2 inference state of one volume.

    Attributes:
        inference: the ``SAM2VideoPredictor`` inference state (frames, caches, prompts).
        shape: the (z, y, x) shape of the volume.
        scale: (sy, sx), frame pixels per voxel along y and x.
    """

    inference: Dict[str, Any]
    shape: Tuple[int, int, int]
    scale: Tuple[float, float]


class MedSAM2Teacher:
    """MedSAM2 (SAM2.1 hiera-tiny at 512x512) as a promptable 3D teacher.

    Args:
        checkpoint: a MedSAM2 / SAM2.1 hiera-tiny checkpoint (``{"model": state_dict}``),
            loaded strictly and without running code.
        device: torch device to run on.
        image_size: model input size; ``None`` means 512 (128 with ``small``).
        small: build the reduced test configuration (see :func:`medsam2_config`).
        random_init: allow random weights for the full architecture when no checkpoint is
            given (benchmarks only; ``small`` always allows them).
        seed: seed of the random initialisation (the global torch RNG is left untouched).

    Raises:
        CheckpointError: no checkpoint for the full model, or one that is unsafe or does not fit.
    """

    name = MODEL

    def __init__(self, checkpoint: Optional[os.PathLike | str] = None, device: str | torch.device = "cpu", image_size: Optional[int] = None, small: bool = False, random_init: bool = False, seed: int = 0) -> None:
        from hydra.utils import instantiate

        path = None
        if checkpoint is not None or not (small or random_init):
            path = require_file(checkpoint, MODEL, OBTAIN)
        self.image_size = int(image_size or (128 if small else 512))
        self.device = torch.device(device)
        cfg = medsam2_config(self.image_size, small)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            predictor = instantiate(cfg, _recursive_=True)
        if path is not None:
            load_strict(predictor, load_state_dict(path), path, MODEL)
        self.predictor = predictor.to(self.device).eval()

    def prepare(self, image: np.ndarray) -> MedSAM2State:
        """Turn every z slice into a sam2 frame and start an inference state.

        Slices are resized bilinearly to ``image_size`` squared (intensities clipped to
        [0, 1]), replicated to 3 channels and normalised with ImageNet mean and std, as
        MedSAM2 does after windowing. No embedding is computed here: sam2 encodes a frame
        when it is visited.

        Args:
            image: (z, y, x) volume with values in [0, 1].

        Returns:
            The state to pass to :meth:`predict` (reusable for many prompts).
        """
        vol = np.asarray(image)
        if vol.ndim != 3 or min(vol.shape) < 1:
            raise ValueError(f"MedSAM2 needs a (z, y, x) volume, got shape {vol.shape}")
        vol = vol.astype(np.float32)
        if not np.isfinite(vol).all():
            raise ValueError("the volume holds NaN or infinite values")
        depth, height, width = vol.shape
        size = self.image_size
        slices = torch.from_numpy(np.clip(vol, 0.0, 1.0))[:, None]
        resized = F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]
        inference: Dict[str, Any] = {
            "images": _Frames(resized.contiguous()),
            "num_frames": depth,
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": height,
            "video_width": width,
            "device": self.device,
            "storage_device": self.device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        return MedSAM2State(inference, (depth, height, width), (size / height, size / width))

    def predict(self, state: MedSAM2State, prompts: Prompts) -> np.ndarray:
        """Segment the volume from prompts, propagating forward and backward from the key slice.

        Each prompted slice becomes a conditioning frame: its 2D box (the enclosing box when a
        slice has several) together with its points, or the mask prompt on the mask's largest
        slice (where it also serves as dense prompt for points/box on that slice). A 3D box is
        used as a 2D box on its middle slice when there are no 2D boxes. Tracking starts at the
        key slice (first 2D box, else first positive point, else the mask's largest slice) and
        runs to the last slice, then from the key slice back to the first with the forward
        results cleared (as MedSAM2's inference does with a reset).

        Args:
            state: from :meth:`prepare`.
            prompts: in voxel coordinates of the prepared volume.

        Returns:
            (z, y, x) float32 foreground probabilities in [0, 1].
        """
        if not isinstance(state, MedSAM2State):
            raise TypeError(f"predict needs the state returned by prepare, got {type(state).__name__}")
        prompts.validate(state.shape)
        frames, mask_frame, key = _plan(prompts, state.shape)
        depth, height, width = state.shape
        inf, pred = state.inference, self.predictor
        logits: Dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            pred.reset_state(inf)
            try:
                if mask_frame is not None:
                    pred.add_new_mask(inf, mask_frame, _OBJ_ID, torch.from_numpy(prompts.mask[mask_frame] > 0.5))
                for z, (box, points, labels) in sorted(frames.items()):
                    has_points = len(points) > 0
                    pred.add_new_points_or_box(
                        inf, z, _OBJ_ID,
                        points=torch.from_numpy(points / [width, height]).float() if has_points else None,
                        labels=torch.from_numpy(labels).int() if has_points else None,
                        box=None if box is None else torch.tensor(box / [width, height, width, height], dtype=torch.float32),
                        normalize_coords=False,  # coordinates are already divided by (W, H)
                    )
                pred.propagate_in_video_preflight(inf)
                self._track(inf, key, range(key, depth), False, logits)
                inf["output_dict_per_obj"][0]["non_cond_frame_outputs"].clear()
                self._track(inf, key, range(key, -1, -1), True, logits)
            finally:
                pred.reset_state(inf)
                inf["cached_features"] = {}
        low = torch.cat([logits[t] for t in range(depth)]).float()
        up = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(up)[:, 0].numpy().astype(np.float32)

    def _track(self, inf: Dict[str, Any], key: int, order: range, reverse: bool, logits: Dict[int, torch.Tensor]) -> None:
        """Track the object over ``order`` (the loop of ``propagate_in_video``, without its
        progress bar or per-frame upsampling), storing each frame's low-res mask logits."""
        out_dict = inf["output_dict_per_obj"][0]
        for t in order:
            if t in out_dict["cond_frame_outputs"]:
                masks = out_dict["cond_frame_outputs"][t]["pred_masks"]
            else:
                out, masks = self.predictor._run_single_frame_inference(
                    inference_state=inf, output_dict=out_dict, frame_idx=t, batch_size=1, is_init_cond_frame=False,
                    point_inputs=None, mask_inputs=None, reverse=reverse, run_mem_encoder=True,
                )
                out_dict["non_cond_frame_outputs"][t] = out
            inf["frames_tracked_per_obj"][0][t] = {"reverse": reverse}
            logits[t] = masks.detach().to("cpu")


def _plan(prompts: Prompts, shape: Tuple[int, int, int]) -> Tuple[Dict[int, Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]], Optional[int], int]:
    """Group prompts per slice.

    Returns:
        ``{z: (box (x0, y0, x1, y1) or None, points (n, 2) as (x, y), labels)}``, the slice of
        the mask prompt (or None) and the key slice.
    """
    if prompts.empty:
        raise ValueError("MedSAM2 needs a prompt: a 2D/3D box, a point or a non-empty mask; got none")
    boxes = prompts.boxes2d
    if not len(boxes) and prompts.box3d is not None:
        z0, y0, x0, z1, y1, x1 = prompts.box3d
        if not (0 <= z0 <= z1 < shape[0]) or y0 > y1 or x0 > x1:
            raise ValueError(f"the 3D box {prompts.box3d} is empty or outside the volume {tuple(shape)}")
        boxes = np.asarray([[round((z0 + z1) / 2), y0, x0, y1, x1]], np.float32)
    per_slice: Dict[int, Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]] = {}
    for z in np.unique(boxes[:, 0].astype(int)):
        b = boxes[boxes[:, 0].astype(int) == z]
        enclosing = np.array([b[:, 2].min(), b[:, 1].min(), b[:, 4].max(), b[:, 3].max()], np.float32)
        per_slice[int(z)] = (enclosing, np.zeros((0, 2), np.float32), np.zeros((0,), np.int64))
    point_z = np.round(prompts.points[:, 0]).astype(int)
    for z in np.unique(point_z):
        sel = point_z == z
        box = per_slice.get(int(z), (None,))[0]
        per_slice[int(z)] = (box, prompts.points[sel][:, [2, 1]].astype(np.float32), prompts.point_labels[sel])
    mask_frame = None
    if prompts.mask is not None and (prompts.mask > 0.5).any():
        mask_frame = int(np.argmax((prompts.mask > 0.5).sum(axis=(1, 2))))
    positive = point_z[prompts.point_labels == 1]
    if len(boxes):
        key = int(boxes[0, 0])
    elif len(positive):
        key = int(positive[0])
    elif mask_frame is not None:
        key = mask_frame
    else:
        raise ValueError("negative points alone cannot prompt MedSAM2 (nor a mask with no value above 0.5): add a positive point, a box or a mask")
    return per_slice, mask_frame, key


__all__ = ["MedSAM2Teacher", "MedSAM2State", "medsam2_config"]
