"""The "Slicing SAM3D" student: frozen per-slice SAM embeddings + a small trainable 3D decoder.

Each slice of a preprocessed volume is encoded by a frozen 2D SAM-family encoder
(:mod:`semisam.models.encoders`); the ``C x G x G`` embeddings are stacked along depth into a
``(C, D, G, G)`` tensor and decoded by a 3D CNN that upsamples **in-plane only** (depth was
never downsampled, so it is never upsampled) to logits on the preprocessed grid.

Inference (handbook Algorithm 1) runs depth blocks of ``D_s`` slices with overlap through
MONAI's sliding-window inferer (Gaussian blending), so memory does not grow with depth.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class StudentConfig:
    """Decoder hyper-parameters (saved in every student checkpoint).

    Attributes:
        embed_dim: channels of the encoder's embeddings (256 for SAM-family encoders).
        channels: widths of the decoder stages; each stage after the first upsamples x2 in-plane.
        num_labels: K structures; 1 gives one sigmoid logit, K > 1 gives K+1 softmax logits.
        block_depth: D_s, slices per inference block.
        context: residual blocks with in-plane dilation 2, 4, ... at the embedding grid; they
            widen the decoder's in-plane field of view (5 -> 17 tokens with 2) at little cost.
        image_channels: width of an image branch (two 3x3x3 convolutions over the preprocessed
            image, on the output grid) concatenated with the last decoder stage and fused
            pointwise (1x1x1 convolution, norm, activation) before the head. A token of the
            embedding grid covers 4 input pixels (LiteMedSAM at 256^2); the branch gives the
            decoder the image's own edges. 0 = off: the student needs only embeddings.
        block_overlap: overlap of neighbouring blocks (fraction of D_s).
        encoder: name of the frozen encoder the student was trained on.
        encoder_id: identity of that encoder's weights and input normalisation; inference
            refuses an encoder with another identity.
        encoder_input_size: the side slices were resized to for the encoder (LiteMedSAM runs at
            other sides than its native 256); inference builds the encoder at that side.
    """

    embed_dim: int = 256
    channels: Tuple[int, ...] = (64, 32, 16)
    num_labels: int = 1
    block_depth: int = 16
    block_overlap: float = 0.5
    context: int = 0  # dilated in-plane residual blocks after the stem (dilation 2, 4, ...): a wider field of view
    image_channels: int = 0  # > 0: a full-resolution branch over the preprocessed image joins before the head
    encoder: str = "litemedsam"
    encoder_id: str = ""  # the encoder's weights id (SliceEncoder.weights_id); "" = not recorded
    encoder_input_size: int = 0  # the side slices were resized to for that encoder; 0 = its native size (older students)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.num_labels < 1:
            raise ValueError("num_labels must be >= 1")
        if self.context < 0:
            raise ValueError("context must be >= 0")
        if self.image_channels < 0:
            raise ValueError("image_channels must be >= 0")
        if self.block_depth < 1 or not 0 <= self.block_overlap < 1:
            raise ValueError("block_depth must be >= 1 and block_overlap in [0, 1)")

    @property
    def out_channels(self) -> int:
        return 1 if self.num_labels == 1 else self.num_labels + 1

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


class ChannelNorm(nn.Module):
    """Layer norm over channels at each voxel. Unlike instance/group norm it uses no
    statistics across slices, so a depth block's output does not depend on the block's
    other contents: blockwise inference equals whole-volume inference away from block edges."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class _Context(nn.Module):
    """Residual block: (1, 3, 3) convolution dilated in-plane, channel norm, LeakyReLU."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=(1, 3, 3), padding=(0, dilation, dilation), dilation=(1, dilation, dilation), bias=False)
        self.norm = ChannelNorm(channels)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.conv(x)))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False),
        ChannelNorm(cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


class SlicingSAM3D(nn.Module):
    """3D CNN decoder over stacked slice embeddings ``(B, C, D, G, G)`` -> logits ``(B, K', D, H, W)``.

    The output in-plane size ``(H, W)`` is passed to :meth:`forward` (the preprocessed grid):
    each stage doubles the in-plane size up to it, a last in-plane interpolation matches it
    exactly; depth is never resampled.
    """

    def __init__(self, config: Optional[StudentConfig] = None):
        super().__init__()
        self.config = config or StudentConfig()
        c = self.config.channels
        self.stem = nn.Sequential(
            nn.Conv3d(self.config.embed_dim, c[0], kernel_size=1), _block(c[0], c[0]),
            *[_Context(c[0], 2 ** (i + 1)) for i in range(self.config.context)],
        )
        self.stages = nn.ModuleList(_block(cin, cout) for cin, cout in zip(c[:-1], c[1:]))
        ci = self.config.image_channels
        if ci > 0:
            self.image_branch = nn.Sequential(_block(1, ci), _block(ci, ci))
            self.fuse = nn.Sequential(  # pointwise: the full-resolution grid is the costly one
                nn.Conv3d(c[-1] + ci, c[-1], kernel_size=1, bias=False), ChannelNorm(c[-1]), nn.LeakyReLU(0.01, inplace=True),
            )
        self.head = nn.Conv3d(c[-1], self.config.out_channels, kernel_size=1)
        with torch.no_grad():  # structures are rare: start near a small foreground prior (p = 0.05)
            if self.config.out_channels == 1:
                self.head.bias.fill_(-3.0)
            else:  # background logit ahead of the structures by the same margin
                self.head.bias.zero_()
                self.head.bias[0] = 3.0

    @property
    def uses_image(self) -> bool:
        """True when the decoder also reads the preprocessed image (``image_channels > 0``)."""
        return self.config.image_channels > 0

    def forward(self, embeddings: torch.Tensor, out_size: Optional[Tuple[int, int]] = None, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``embeddings`` (B, C, D, G, G); ``image`` (B, 1, D, H, W), the preprocessed slices the
        embeddings came from, required when the student has an image branch (then
        ``out_size`` defaults to its in-plane size)."""
        if embeddings.ndim != 5 or embeddings.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected (B, {self.config.embed_dim}, D, G, G) embeddings, got {tuple(embeddings.shape)}")
        if self.uses_image:
            if image is None:
                raise ValueError("this student has an image branch: pass the preprocessed image (B, 1, D, H, W) with its embeddings")
            if image.ndim != 5 or image.shape[1] != 1 or image.shape[0] != embeddings.shape[0] or image.shape[2] != embeddings.shape[2]:
                raise ValueError(f"image {tuple(image.shape)} does not match embeddings {tuple(embeddings.shape)}: expected (B, 1, D, H, W)")
            if out_size is None:
                out_size = tuple(image.shape[-2:])
            elif tuple(out_size) != tuple(image.shape[-2:]):
                raise ValueError(f"out_size {tuple(out_size)} differs from the image's in-plane size {tuple(image.shape[-2:])}")
        x = self.stem(embeddings.float())
        for stage in self.stages:
            # x2 in-plane per stage, but never beyond the output grid (depth is left alone)
            h, w = x.shape[-2:]
            th, tw = (2 * h, 2 * w) if out_size is None else (min(2 * h, max(h, out_size[0])), min(2 * w, max(w, out_size[1])))
            if (th, tw) != (h, w):
                x = F.interpolate(x, size=(x.shape[2], th, tw), mode="trilinear", align_corners=False)
            x = stage(x)
        if self.uses_image:
            if tuple(x.shape[-2:]) != tuple(out_size):
                x = F.interpolate(x, size=(x.shape[2], *out_size), mode="trilinear", align_corners=False)
            x = self.fuse(torch.cat([x, self.image_branch(image.to(x.dtype))], dim=1))
        x = self.head(x)
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=(x.shape[2], *out_size), mode="trilinear", align_corners=False)
        return x

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Foreground probability (K = 1) or per-class probabilities (K > 1)."""
        return torch.sigmoid(logits) if self.config.out_channels == 1 else torch.softmax(logits, dim=1)

    @torch.inference_mode()
    def infer(self, embeddings: torch.Tensor, out_size: Tuple[int, int], device: str | torch.device = "cpu", image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blockwise inference over depth (Algorithm 1) on ``(C, D, G, G)`` embeddings (and the
        ``(D, H, W)`` preprocessed image for a student with an image branch).

        Returns probabilities ``(K', D, H, W)`` (float32, CPU). Blocks of ``block_depth``
        slices overlap by ``block_overlap`` and are blended with Gaussian weights along depth.
        """
        from monai.inferers import sliding_window_inference

        self.eval()
        emb = embeddings.unsqueeze(0) if embeddings.ndim == 4 else embeddings
        d, g = emb.shape[2], emb.shape[-1]
        roi = (min(self.config.block_depth, d), emb.shape[-2], g)

        if self.uses_image:
            if image is None:
                raise ValueError("this student has an image branch: pass the preprocessed image (D, H, W) to infer()")
            img = torch.as_tensor(image).float()
            img = img.reshape(1, 1, *img.shape[-3:])
            if img.shape[2] != d or tuple(img.shape[-2:]) != tuple(out_size):
                raise ValueError(f"image {tuple(img.shape[-3:])} does not match {d} slices of {tuple(out_size)}")

        def predictor(x: torch.Tensor, coords=None) -> torch.Tensor:
            block = None
            if coords is not None:  # the window's depth range (MONAI's with_coord); in-plane is whole
                block = torch.cat([img[:, :, c[2]] for c in coords]).to(device)
            return self.probabilities(self(x.to(device), out_size, block))

        # The predictor's output is (H/G)x larger in-plane; MONAI scales the windows to match.
        for n_out, n_in in zip(out_size, emb.shape[-2:]):
            if int(n_in * (n_out / n_in)) != n_out:  # MONAI sizes the output as int(in * zoom)
                raise ValueError(f"in-plane size {n_out} is not reachable from a {n_in} embedding grid; use a multiple of it")
        # Gaussian weights along depth only (sigma 1/8 of a block): slices near a block's inner
        # edge, where the decoder sees less context, barely count; in-plane the weight is flat.
        probs = sliding_window_inference(
            emb.float(), roi_size=roi, sw_batch_size=1, predictor=predictor,
            overlap=self.config.block_overlap, mode="gaussian", sigma_scale=(0.125, 1e3, 1e3),
            sw_device=device, device="cpu", with_coord=self.uses_image,
        )
        return probs[0].float()

    def save(self, path, extra: Optional[Dict[str, Any]] = None) -> None:
        """Save weights + config atomically (loadable with ``weights_only=True``)."""
        def plain(value):  # numpy scalars/arrays -> Python values; anything else is refused
            if hasattr(value, "tolist"):
                return value.tolist()
            raise TypeError(f"checkpoint extra values must be JSON-like, got {type(value).__name__}")

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = json.loads(json.dumps(dict(extra or {}), default=plain))  # loadable with weights_only
        payload = {"model": self.state_dict(), "semisam_student": self.config.to_dict(), "extra": extra}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        torch.save(payload, tmp)
        os.replace(tmp, path)


def load_student(path, device: str = "cpu") -> Tuple[SlicingSAM3D, Dict[str, Any]]:
    """A student saved by :meth:`SlicingSAM3D.save`; refuses other files with a clear message."""
    from .checkpoints import CheckpointError, load_strict, safe_torch_load

    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or "semisam_student" not in payload or "model" not in payload:
        raise CheckpointError(path, "is not a SemiSAM student checkpoint (no 'semisam_student' config)", "pass a student checkpoint written by SemiSAM training")
    saved = dict(payload["semisam_student"])
    saved.setdefault("context", 0)  # students saved before the context blocks existed had none
    config = StudentConfig(**saved)
    model = SlicingSAM3D(config)
    load_strict(model, payload["model"], path, "slicing-sam3d student")
    return model.to(device).eval(), dict(payload.get("extra", {}))
