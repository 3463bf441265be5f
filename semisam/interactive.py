"""Interactive 2D segmentation on the slices of a volume: embed once, predict many.

This is the Qt-free, Slicer-free core of the Segment Editor effect. An
:class:`InteractiveSession` holds one volume and the LiteMedSAM model (its TinyViT slice
encoder, prompt encoder and mask decoder):

* :meth:`InteractiveSession.set_image` takes the raw ``(z, y, x)`` intensities and the voxel
  spacing, normalises them robustly to [0, 1] with :func:`semisam.preprocess.normalise` and
  forgets everything about the previous volume.
* :meth:`InteractiveSession.predict` segments one 2D slice (``axis`` 0, 1 or 2 of the array,
  ``index`` along it) from the user's clicks ``(row, col, positive)`` and/or a box
  ``(row0, col0, row1, col1)`` (inclusive) in that slice's own pixel coordinates. A slice
  is embedded the first time it is touched and kept (least recently used dropped beyond
  ``max_slices``); every later click on it only runs the mask decoder.
* :meth:`InteractiveSession.propagate` carries a 2D mask slice by slice through the
  volume, each slice prompted with the bounding box of the previous slice's mask.

Geometry. A slice is resampled to square pixels (its physical aspect ratio) with the longer
side at the model's 256 pixels, and padded to 256 x 256, like LiteMedSAM's own
preprocessing; prompts go through the same mapping and masks come back on the slice's grid.
Measured with true boxes: HC18 (800 x 540 images) median Dice 0.953 against 0.913 when
stretched to 256 x 256; phantom slices (anisotropic voxels) 0.754 against 0.780, within
their noise (12 slices). The square frame stays: it is what the model was trained on.

Clicks. LiteMedSAM was trained on box prompts only and ignores lone points (Dice 0.00 for
a click given as a point, with each of its four mask outputs, on 16 HC18 images and 12
phantom slices). A click therefore edits a box, and the mask locally
(``ClickPolicy``; every rule was measured with ``scripts/bench_interactive.py --compare``):

* the first positive click on a slice with no box and no previous mask: eight square
  candidate boxes centred on the click (half-sides 8 % to 36 % of the model frame) go
  through the mask decoder in one batch; the winner is the *consensus* mask, the one with
  the highest mean IoU with the other candidates' masks (the object recurs over several box
  sizes; a speckle blob or a box-filling guess does not); the decoder's own predicted IoU
  picks much worse. Its box is re-fitted once to the mask's bounding box plus a margin;
* a positive click outside the box grows the box past it, by the click's distance to the
  mask (a user clicks the middle of what is missing) plus a margin, and decodes again;
* a negative click on the part of the mask holding the positive clicks moves the nearest
  box side inwards past it (to where the object's edge probably is) and decodes again,
  unless that would keep less than half of the box;
* a negative click on a part holding no positive click removes that part;
* every click also constrains the mask around itself after every decode: a positive click
  outside the mask adds the connected region around it whose logit is at least the click's,
  plus a disk as wide as the click's distance to the mask's edge when it was made (within
  ``local_radius``); a negative click removes the same on its side. These edits follow a
  re-decoded box, since they are thresholds at the click's own logit;
* the final mask honours every click: a positive click's pixel is foreground, a negative
  click's pixel background (the last click on a pixel wins).

A user box goes to LiteMedSAM as it is (grown by ``box_margin``: LiteMedSAM was trained on
loose boxes); later clicks edit it with the same rules. A ``previous`` mask the session did
not produce (edited elsewhere, or from the student) is the starting point as it is: its box
is the starting box and its signed distance stands in for logits, so clicks that do not move
the box edit it locally and geometrically, and those that do hand over to LiteMedSAM.

Masks are thresholded at logit -1, not 0: LiteMedSAM draws edges slightly inside
(ultrasound phantoms, README); it changes nothing with true boxes on HC18 (median Dice
0.953 either way) and lowers the clicks needed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import Cancelled
from .models.encoders import SliceEncoder, bf16_supported, build_litemedsam, litemedsam_encoder
from .preprocess import normalise

AXIS_NAMES = ("z", "y", "x")

Click = Tuple[float, float, bool]
Box = Tuple[float, float, float, float]


@dataclass(frozen=True)
class ClickPolicy:
    """How clicks become box prompts and mask edits (defaults measured, see the module doc).

    Attributes:
        scales: half-sides of the first click's candidate boxes, as fractions of the model
            frame (256 px, the slice's longer physical side).
        select: how the first click's candidate is chosen: ``"consensus"`` (the mask that
            agrees best, by mean IoU, with the other candidates' masks: the object recurs over
            several box sizes, a speckle blob or a box-filling guess does not), ``"iou"`` (the
            decoder's predicted IoU) or ``"consensus*iou"``.
        refine: re-fit the box to the chosen mask's bounding box (plus ``margin``) and decode
            again, this many times, after the first click.
        margin: frame pixels added around a mask's bounding box or a click when a box is
            made from them.
        box_margin: frame pixels added around a box given by the user.
        threshold: the logit above which a pixel is foreground.
        adaptive: a positive click outside the box grows the box past the click by the
            click's distance to the mask (the click marks the centre of what is missing);
            a negative click shrinks the box to its distance to the mask's edge before it.
            Else by ``margin`` / to 1 px past the click.
        pos_inside: a positive click inside the box but outside the mask changes the box:
            ``"push"`` moves the nearest side outwards past the click; ``"none"`` leaves it
            (the click's local constraint adds the region around it).
        neg_inside: a negative click on the part of the mask holding the positive clicks:
            ``"shrink"`` moves the nearest box side inwards past it (unless that keeps less
            than ``min_keep`` of the box); ``"none"`` leaves the box.
        remove_parts: a negative click on a part of the mask with no positive click removes
            that connected part.
        constrain: which clicks edit the mask around themselves after every decode:
            ``"all"`` (each positive click not in the mask adds the connected region around it
            whose logit is at least the click's; each negative click in the mask removes the
            region whose logit is at most the click's; within ``local_radius``), ``"inside"``
            (only clicks that did not change the box) or ``"pixel"`` (only the click pixels).
        local_radius: radius (frame pixels) of those local edits.
        core: a local edit also takes the disk around the click whose radius is the click's
            distance to the mask's edge when it was made (at most half ``local_radius``): the
            user clicks the middle of what is wrong, so that much around it is wrong too.
        min_keep: the fraction of the box's side a shrink must keep.
        click_radius: pixels (slice grid) around each click forced to its label (0: the pixel).
        propagation_margins: :meth:`InteractiveSession.propagate` decodes each slice with the
            previous slice's mask box grown by each of these margins (frame pixels) and
            averages the logits. One box ratchets: LiteMedSAM fills loose boxes, so with a
            6-px margin the masks stop shrinking with the object, with 0-3 px they shrink too
            fast (mean 3D Dice on 4 phantoms, threshold -1: 6 px 0.667, 3 px 0.742,
            (2, 4, 6) px 0.774).
    """

    scales: Tuple[float, ...] = (0.08, 0.1, 0.125, 0.155, 0.19, 0.235, 0.29, 0.36)
    select: str = "consensus"
    refine: int = 1
    margin: float = 6.0
    box_margin: float = 6.0
    threshold: float = -1.0
    adaptive: bool = True
    pos_inside: str = "none"
    neg_inside: str = "shrink"
    remove_parts: bool = True
    constrain: str = "all"
    local_radius: float = 32.0
    core: bool = True
    min_keep: float = 0.5
    click_radius: int = 0
    propagation_margins: Tuple[float, ...] = (2.0, 4.0, 6.0)

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive fractions of the frame, got {self.scales}")
        choices = {
            "select": ("consensus", "iou", "consensus*iou"),
            "pos_inside": ("push", "none"),
            "neg_inside": ("shrink", "none"),
            "constrain": ("all", "inside", "pixel"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass
class _Frame:
    """Where a slice of shape ``(h, w)`` sits in the model's square input (top-left corner)."""

    h: int
    w: int
    fh: int  # rows of the frame the slice occupies
    fw: int  # columns

    @property
    def ky(self) -> float:
        return self.fh / self.h

    @property
    def kx(self) -> float:
        return self.fw / self.w

    def to_frame(self, row: float, col: float) -> Tuple[float, float]:
        """Slice pixel (row, col) -> frame (x, y), pixel centres mapped onto pixel centres."""
        return (col + 0.5) * self.kx - 0.5, (row + 0.5) * self.ky - 0.5

    def box_to_frame(self, box: Box) -> np.ndarray:
        """Inclusive slice box (row0, col0, row1, col1) -> frame (x0, y0, x1, y1)."""
        x0, y0 = self.to_frame(box[0], box[1])
        x1, y1 = self.to_frame(box[2], box[3])
        return np.array([x0, y0, x1, y1], np.float64)

    def box_to_slice(self, fbox: np.ndarray) -> Box:
        """Frame (x0, y0, x1, y1) -> slice (row0, col0, row1, col1), clipped to the slice."""
        x0, y0, x1, y1 = fbox
        r0 = (y0 + 0.5) / self.ky - 0.5
        r1 = (y1 + 0.5) / self.ky - 0.5
        c0 = (x0 + 0.5) / self.kx - 0.5
        c1 = (x1 + 0.5) / self.kx - 0.5
        return (
            float(np.clip(r0, 0, self.h - 1)), float(np.clip(c0, 0, self.w - 1)),
            float(np.clip(r1, 0, self.h - 1)), float(np.clip(c1, 0, self.w - 1)),
        )

    def clip(self, fbox: np.ndarray) -> np.ndarray:
        """A frame box clipped to the part of the frame the slice occupies."""
        x0, y0, x1, y1 = fbox
        return np.array([np.clip(x0, 0, self.fw - 1), np.clip(y0, 0, self.fh - 1), np.clip(x1, 0, self.fw - 1), np.clip(y1, 0, self.fh - 1)])


@dataclass
class _SliceState:
    """What the session remembers about the interaction on one slice."""

    clicks: List[Click] = field(default_factory=list)
    user_box: Optional[Box] = None
    box: Optional[np.ndarray] = None  # frame (x0, y0, x1, y1)
    logits: Optional[np.ndarray] = None  # (h, w) float32 logits of the last decode, slice grid
    iou: float = float("nan")
    local: List[Optional[float]] = field(default_factory=list)  # per click: None, or the core radius of its local edit
    mask: Optional[np.ndarray] = None  # the last mask returned


class _BoxDecoder:
    """LiteMedSAM's prompt encoder + mask decoder for box prompts, with the prompt-independent
    image side computed once per slice.

    With a box prompt (and no mask prompt) the decoder's dense input is a constant, so the
    keys entering the two-way transformer, and in its first block the image-side
    projections (keys and values of the token-to-image attention, queries of the
    image-to-token attention), depend on the slice only. :meth:`prepare` computes them once;
    :meth:`__call__` runs the rest for K boxes at once, sharing them instead of repeating the
    image K times. The result equals ``mask_decoder(..., multimask_output=False)`` (tested).
    """

    def __init__(self, net: torch.nn.Module):
        self.prompt_encoder = net.prompt_encoder
        self.decoder = net.mask_decoder
        self.transformer = self.decoder.transformer
        with torch.inference_mode():
            pe = self.prompt_encoder.get_dense_pe()  # (1, C, H, W)
            self.grid = tuple(pe.shape[-2:])
            self.key_pe = pe.flatten(2).transpose(1, 2).contiguous()  # (1, HW, C)
            self.no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, 1, -1)
            self.output_tokens = torch.cat([self.decoder.iou_token.weight, self.decoder.mask_tokens.weight], dim=0)

    @staticmethod
    def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, c = x.shape
        return x.reshape(b, t, n, c // n).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, n, t, c = x.shape
        return x.transpose(1, 2).reshape(b, t, n * c)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        return attn @ v

    @torch.inference_mode()
    def prepare(self, embedding: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The slice's (1, C, H, W) embedding -> the prompt-independent tensors."""
        keys = embedding.flatten(2).transpose(1, 2) + self.no_mask  # (1, HW, C)
        block = self.transformer.layers[0]
        k_in = keys + self.key_pe
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        return (
            keys,
            self._heads(t2i.k_proj(k_in), t2i.num_heads),
            self._heads(t2i.v_proj(keys), t2i.num_heads),
            self._heads(i2t.q_proj(k_in), i2t.num_heads),
        )

    @torch.inference_mode()
    def __call__(self, prepared: Tuple[torch.Tensor, ...], boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, 4) boxes (x0, y0, x1, y1) in the model frame -> (K, 4H, 4W) logits, (K,) IoU."""
        keys0, t2i_k, t2i_v, i2t_q = prepared
        k = boxes.shape[0]
        sparse = self.prompt_encoder._embed_boxes(boxes.reshape(k, 1, 4))  # (K, 2, C)
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(k, -1, -1), sparse], dim=1)
        tr = self.transformer
        block = tr.layers[0]  # skip_first_layer_pe: self-attention without the positional term
        q = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        out = self._attend(self._heads(t2i.q_proj(q + tokens), t2i.num_heads), t2i_k, t2i_v)
        q = block.norm2(q + t2i.out_proj(self._merge(out)))
        q = block.norm3(q + block.mlp(q))
        qt = q + tokens
        out = self._attend(i2t_q, self._heads(i2t.k_proj(qt), i2t.num_heads), self._heads(i2t.v_proj(q), i2t.num_heads))
        keys = block.norm4(keys0 + i2t.out_proj(self._merge(out)))
        for block in tr.layers[1:]:
            q, keys = block(queries=q, keys=keys, query_pe=tokens, key_pe=self.key_pe)
        q = tr.norm_final_attn(q + tr.final_attn_token_to_image(q=q + tokens, k=keys + self.key_pe, v=keys))
        h, w = self.grid
        up = self.decoder.output_upscaling(keys.transpose(1, 2).reshape(k, -1, h, w))  # (K, C/8, 4H, 4W)
        hyper = self.decoder.output_hypernetworks_mlps[0](q[:, 1])  # the single-mask token
        logits = (hyper.unsqueeze(1) @ up.flatten(2)).reshape(k, up.shape[-2], up.shape[-1])
        iou = self.decoder.iou_prediction_head(q[:, 0])[:, 0]
        return logits, iou


class InteractiveSession:
    """LiteMedSAM on the slices of one volume: embed each slice once, then predict many times.

    Args:
        net: the full LiteMedSAM (``image_encoder``, ``prompt_encoder``, ``mask_decoder``);
            default :func:`~semisam.models.encoders.build_litemedsam` (the shipped weights).
        encoder: the slice encoder; default the net's TinyViT on ``backend`` (the same
            encoder the student and the teacher use).
        device: where the model runs.
        max_slices: embeddings kept (about 2 MB each, fp16), least recently used dropped.
        policy: the click rules (:class:`ClickPolicy`).
        square_pixels: resample each slice to square pixels before encoding (else it is
            stretched to 256 x 256).
        encode_batch: slices encoded together while propagating (about 1.6 times faster per
            slice than one at a time on two cores).
        precision: the mask decoder's matrix products: ``"bf16"`` (autocast; about twice as
            fast on CPUs with native bf16, masks within IoU 0.985 of fp32), ``"fp32"``, or
            ``"auto"`` (bf16 where the device has it natively).
        backend: the encoder's runtime when ``encoder`` is not given: ``"auto"`` (OpenVINO on
            a CPU when installed, else torch), ``"torch"``, ``"openvino"``, ``"onnxruntime"``
            (:mod:`semisam.models.backends`; the converted encoder is kept in ``model_cache``,
            default ``~/.semisam/cache/encoders``).
        fallback: when given, a runtime that is missing or fails to load is replaced by torch
            and ``fallback`` gets one sentence saying so; else that is an error.

    Attributes:
        encoded_slices: how many slices this session had the encoder compute.
        decoded_boxes: how many box prompts went through the mask decoder.
        last_info: what the last :meth:`predict` did (box in slice coordinates, predicted IoU,
            whether the slice had to be encoded, how many boxes were decoded, seconds), or
            :meth:`propagate` (slices propagated, whether it was cancelled).
    """

    def __init__(
        self,
        net: Optional[torch.nn.Module] = None,
        encoder: Optional[SliceEncoder] = None,
        device: str = "cpu",
        max_slices: int = 256,
        policy: Optional[ClickPolicy] = None,
        square_pixels: bool = True,
        encode_batch: int = 4,
        precision: str = "auto",
        backend: str = "auto",
        model_cache: Optional[str] = None,
        fallback: Optional[Callable[[str], None]] = None,
    ):
        from .models.backends import accelerated_encoder

        self.device = torch.device(device)
        self.net = (net if net is not None else build_litemedsam(device=str(self.device))).eval()
        if encoder is None:
            encoder = accelerated_encoder(litemedsam_encoder(self.net), backend, root=model_cache, fallback=fallback)
        self.encoder = encoder
        self.size = int(self.encoder.input_size)
        native = int(self.net.prompt_encoder.input_image_size[0])
        if self.size != native:
            raise ValueError(f"interactive refinement runs LiteMedSAM at its native {native} px frame; this encoder takes {self.size} px slices "
                             f"(leave encoder out to get the native one)")
        self.max_slices = int(max_slices)
        if self.max_slices < 1:
            raise ValueError("max_slices must be at least 1")
        self.policy = policy or ClickPolicy()
        self.square_pixels = bool(square_pixels)
        self.encode_batch = max(int(encode_batch), 1)
        self.encoded_slices = 0
        self.decoded_boxes = 0
        self.last_info: Dict[str, object] = {}
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
        if precision == "auto":
            native = torch.cuda.is_bf16_supported() if self.device.type == "cuda" else bf16_supported()
            precision = "bf16" if native else "fp32"
        self.precision = precision
        self._decoder = _BoxDecoder(self.net)
        self._image: Optional[np.ndarray] = None
        self._spacing = (1.0, 1.0, 1.0)
        self._embeddings: "OrderedDict[Tuple[int, int], torch.Tensor]" = OrderedDict()
        self._prepared: "OrderedDict[Tuple[int, int], Tuple[torch.Tensor, ...]]" = OrderedDict()
        self._states: Dict[Tuple[int, int], _SliceState] = {}

    # ----------------------------------------------------------------------------------------
    # Image
    # ----------------------------------------------------------------------------------------

    def set_image(self, array: np.ndarray, spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        """Use a new volume: raw ``(z, y, x)`` intensities and spacing (x, y, z) in mm.

        Intensities are mapped to [0, 1] between robust percentiles
        (:func:`semisam.preprocess.normalise`, as for training). Every embedding and every
        slice's interaction state is forgotten.
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"image must be a (z, y, x) array, got shape {array.shape}")
        if min(array.shape) < 1:
            raise ValueError(f"image is empty, shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise ValueError("image must hold finite numbers (no NaN or Inf)")
        spacing = tuple(float(s) for s in spacing_xyz)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing_xyz needs three positive sizes in mm (x, y, z), got {tuple(spacing_xyz)}")
        image, _ = normalise(array.astype(np.float32, copy=False))
        self._image = image
        self._spacing = spacing
        self._embeddings.clear()
        self._prepared.clear()
        self._states.clear()
        self.last_info = {}

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The (z, y, x) shape of the current volume."""
        return tuple(self._require_image().shape)  # type: ignore[return-value]

    def slice_shape(self, axis: int) -> Tuple[int, int]:
        """(rows, cols) of the slices along ``axis``."""
        shape = self.shape
        self._check_axis(axis)
        return tuple(n for a, n in enumerate(shape) if a != axis)  # type: ignore[return-value]

    def slice_spacing(self, axis: int) -> Tuple[float, float]:
        """(row, col) pixel size in mm of the slices along ``axis``."""
        sx, sy, sz = self._spacing
        self._check_axis(axis)
        return {0: (sy, sx), 1: (sz, sx), 2: (sz, sy)}[axis]

    def reset(self, axis: Optional[int] = None, index: Optional[int] = None) -> None:
        """Forget the interaction state (clicks, boxes) of one slice, or of all slices. The
        embeddings are kept."""
        if axis is None:
            self._states.clear()
        else:
            self._states.pop(self._check_slice(axis, index), None)

    def is_cached(self, axis: int, index: int) -> bool:
        """Whether the embedding of that slice is in memory (a click on it costs the decoder only)."""
        return (int(axis), int(index)) in self._embeddings

    def prefetch(self, axis: int, indices: Sequence[int], cancel: Optional[Callable[[], bool]] = None) -> int:
        """Embed, one at a time and in the order given, the slices among ``indices`` (along
        ``axis``; those outside the volume are skipped) that are not cached yet, so that a
        later click on them costs the decoder only. ``cancel()`` is polled before each slice
        and while one is encoded (an OpenVINO inference stops within milliseconds; other
        runtimes finish the slice): when it returns True the prefetch stops, keeping the
        slices already done. Returns how many slices it embedded."""
        axis = self._check_axis(axis)
        n = self.shape[axis]
        done = 0
        for i in indices:
            i = int(i)
            if not 0 <= i < n or self.is_cached(axis, i):
                continue
            if cancel is not None and cancel():
                break
            try:
                self._embed_many(axis, [i], cancel=cancel)
            except Cancelled:
                break
            done += 1
        return done

    # ----------------------------------------------------------------------------------------
    # Prediction
    # ----------------------------------------------------------------------------------------

    def predict(
        self,
        axis: int,
        index: int,
        clicks: Sequence[Click] = (),
        box: Optional[Box] = None,
        previous: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The mask (bool, the slice's shape) of slice ``index`` along array ``axis``.

        Args:
            axis: 0 (z), 1 (y) or 2 (x) of the (z, y, x) array; the slice's rows and columns
                are the two remaining axes in order.
            index: the slice along ``axis``.
            clicks: every click on this slice so far, in order: ``(row, col, positive)``.
                When the list extends the one of the previous call on this slice (and
                ``previous`` is that call's result or None), only the new clicks are applied;
                otherwise (an undo, another box, an edited mask) the clicks are applied again
                from the start. After an undo pass the mask from before the undone clicks, or
                None.
            box: an optional box ``(row0, col0, row1, col1)``, inclusive.
            previous: the slice's current mask (bool). When it is not this session's last
                result for the slice (edited elsewhere, from the student) and no ``box`` is
                given, it is the starting point as it is (see the module doc).

        Raises:
            ValueError: no image set, a wrong axis or index, a click or box outside the
                slice, a ``previous`` of the wrong shape, or nothing to segment from.
        """
        t0 = time.perf_counter()
        axis, index = self._check_slice(axis, index)
        frame = self._frame(axis)
        clicks = self._check_clicks(clicks, frame, axis, index)
        box = self._check_box(box, frame, axis, index)
        prev = None
        if previous is not None:
            prev = np.asarray(previous).astype(bool)
            if prev.shape != (frame.h, frame.w):
                raise ValueError(f"previous mask has shape {prev.shape}, slice {AXIS_NAMES[axis]}={index} has shape {(frame.h, frame.w)}")
            if not prev.any():
                prev = None
        if not clicks and box is None and prev is None:
            raise ValueError("predict needs a click, a box or a previous mask")
        encoded_before, decoded_before = self.encoded_slices, self.decoded_boxes
        emb = self._embedding(axis, index)

        key = (axis, index)
        state = self._states.get(key)
        same_prompts = state is not None and state.user_box == box and state.clicks == clicks[: len(state.clicks)]
        same_mask = prev is None or (state is not None and state.mask is not None and np.array_equal(prev, state.mask))
        if not (same_prompts and same_mask):
            state = _SliceState(user_box=box)
            if box is not None:
                fbox = frame.box_to_frame(box)
                m = self.policy.box_margin
                state.box = frame.clip(fbox + np.array([-m, -m, m, m]))
                self._decode_into(state, emb, frame)
            elif prev is not None:  # start from the user's mask as it is
                state.box = self._mask_box(prev, frame)
                state.logits = self._pseudo_logits(prev, frame)
            new = clicks
        else:
            new = clicks[len(state.clicks) :]
        for click in new:
            self._apply_click(state, emb, frame, click)
            state.clicks.append(click)
        if state.logits is None:
            raise ValueError("predict needs a positive click, a box or a previous mask to start from")
        mask = self._final_mask(state, frame)
        state.mask = mask
        self._states[key] = state
        self.last_info = {
            "box": frame.box_to_slice(state.box) if state.box is not None else None,
            "iou": state.iou,
            "encoded": self.encoded_slices > encoded_before,
            "decoded": self.decoded_boxes - decoded_before,
            "seconds": time.perf_counter() - t0,
        }
        return mask.copy()

    # ----------------------------------------------------------------------------------------
    # Propagation
    # ----------------------------------------------------------------------------------------

    def propagate(
        self,
        axis: int,
        index: int,
        mask: np.ndarray,
        direction: str = "both",
        max_slices: Optional[int] = None,
        stop_when_empty: bool = True,
        progress: Optional[Callable[[int, int], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
        min_area_fraction: float = 0.05,
        min_iou: float = 0.5,
        min_contrast: float = 0.1,
    ) -> np.ndarray:
        """Carry a 2D mask through the volume along ``axis``; returns a (z, y, x) bool volume.

        Starting from ``mask`` on slice ``index``, each next slice is segmented with the
        bounding box of the previous slice's mask (grown by ``policy.propagation_margins``,
        the logits averaged); only
        the parts overlapping the previous slice's mask are kept. A slice counts as empty when
        its mask is smaller than ``min_area_fraction`` of the starting mask (or 4 pixels), when
        the decoder's predicted IoU is below ``min_iou``, or when the mask no longer stands
        out of the image: the contrast between the mask and a ring around it (mean difference
        over the pooled standard deviation, see :meth:`_contrast`) below ``min_contrast`` times the
        starting slice's. (LiteMedSAM finds a blob of about the box's size in any box, even on
        pure noise, so the mask alone does not vanish where an object ends abruptly; where it
        tapers the area rule stops it.) With ``stop_when_empty`` the propagation stops at the
        first empty slice in that direction (which stays empty), else it goes on with the last
        non-empty mask's box.

        Args:
            direction: ``"both"``, ``"forward"`` (increasing index) or ``"backward"``.
            max_slices: at most this many slices in each direction (None: to the volume's end).
            progress: called as ``progress(done, total)`` after each slice (total is the most
                slices that can be visited).
            cancel: called between slices; when it returns True the propagation stops and
                what was segmented so far is returned.
        """
        axis, index = self._check_slice(axis, index)
        frame = self._frame(axis)
        seed = np.asarray(mask).astype(bool)
        if seed.shape != (frame.h, frame.w):
            raise ValueError(f"mask has shape {seed.shape}, slice {AXIS_NAMES[axis]}={index} has shape {(frame.h, frame.w)}")
        if not seed.any():
            raise ValueError("cannot propagate an empty mask")
        if direction not in ("both", "forward", "backward"):
            raise ValueError(f"direction must be 'both', 'forward' or 'backward', got {direction!r}")
        if max_slices is not None and int(max_slices) < 0:
            raise ValueError("max_slices must be >= 0")
        n = self.shape[axis]
        steps = {"forward": [1], "backward": [-1], "both": [1, -1]}[direction]
        plans = []
        for step in steps:
            count = (n - 1 - index) if step > 0 else index
            if max_slices is not None:
                count = min(count, int(max_slices))
            plans.append((step, count))
        total = sum(c for _, c in plans)
        out = np.zeros(self.shape, bool)
        self._put(out, axis, index, seed)
        min_area = max(4, int(math.ceil(min_area_fraction * int(seed.sum()))))
        ref_contrast = self._contrast(self._slice(axis, index), seed)
        done = 0
        self.last_info = {"propagated": 0, "cancelled": False}
        for step, count in plans:
            prev = seed
            for k in range(1, count + 1):
                if cancel is not None and cancel():
                    self.last_info["cancelled"] = True
                    return out
                i = index + step * k
                if not self.is_cached(axis, i):  # encode a few slices ahead together
                    self._embed_many(axis, [index + step * j for j in range(k, min(k + self.encode_batch, count + 1))])
                boxes = np.stack([self._mask_box(prev, frame, m) for m in self.policy.propagation_margins])
                logits, iou = self._decode(self._embedding(axis, i), boxes)
                iou = iou.mean(0, keepdim=True)
                m = self._to_slice(logits.mean(0), frame) > self.policy.threshold
                labels, _ = ndimage.label(m)
                keep = np.unique(labels[prev & m])  # the parts that continue the previous mask
                m = np.isin(labels, keep[keep > 0])
                done += 1
                alive = (
                    int(m.sum()) >= min_area and float(iou[0]) >= min_iou
                    and self._contrast(self._slice(axis, i), m) >= min_contrast * ref_contrast
                )
                if alive:
                    self._put(out, axis, i, m)
                    self.last_info["propagated"] = int(self.last_info["propagated"]) + 1
                    prev = m
                elif stop_when_empty:
                    done += count - k  # the rest of this direction is skipped
                if progress is not None:
                    progress(done, total)
                if not alive and stop_when_empty:
                    break
        return out

    @staticmethod
    def _contrast(image: np.ndarray, mask: np.ndarray) -> float:
        """|mean inside - mean of a ring outside| / pooled standard deviation; two pixels on
        either side of the mask's edge are left out, so a slightly wrong edge matters little."""
        inner = ndimage.binary_erosion(mask, iterations=2)
        inner = inner if inner.any() else mask
        near = ndimage.binary_dilation(mask, iterations=2)
        ring = ndimage.binary_dilation(near, iterations=3) & ~near
        if not inner.any() or not ring.any():
            return 0.0
        a, b = image[inner], image[ring]
        return float(abs(a.mean() - b.mean()) / math.sqrt(0.5 * (a.var() + b.var()) + 1e-12))

    # ----------------------------------------------------------------------------------------
    # Click rules
    # ----------------------------------------------------------------------------------------

    def _apply_click(self, state: _SliceState, emb: Tuple[torch.Tensor, ...], frame: _Frame, click: Click) -> None:
        """Update the box of ``state`` for one new click (see the module doc); the click's
        local constraint is applied by :meth:`_final_mask`."""
        p = self.policy
        row, col, positive = click
        r, c = int(round(row)), int(round(col))
        fx, fy = frame.to_frame(row, col)
        if state.logits is None:
            if positive:  # a negative click alone gives nothing to segment (honoured at the end)
                self._first_click(state, emb, frame, fx, fy)
            state.local.append(None)
            return
        current = self._final_mask(state, frame)
        boxed = False
        core = 0.0
        if current[r, c] != positive:
            if p.core:  # the click marks the middle of what is wrong: that far from the mask's edge
                core = min(self._distance_to(current, r, c, frame, inside=not positive), 0.5 * p.local_radius)
            x0, y0, x1, y1 = state.box
            in_box = x0 <= fx <= x1 and y0 <= fy <= y1
            if positive and not in_box:
                e = p.margin + (self._distance_to(current, r, c, frame, inside=False) if p.adaptive else 0.0)
                state.box = frame.clip(np.array([min(x0, fx - e), min(y0, fy - e), max(x1, fx + e), max(y1, fy + e)]))
                boxed = True
            elif positive and p.pos_inside == "push":
                d = self._distance_to(current, r, c, frame, inside=False) if p.adaptive else 0.0
                state.box = self._push(state.box, fx, fy, d, frame)
                boxed = True
            elif not positive and p.neg_inside == "shrink" and self._holds_positive(current, r, c, state.clicks):
                d = self._distance_to(current, r, c, frame, inside=True) if p.adaptive else 0.0
                shrunk = self._shrink(state.box, fx, fy, d)
                if shrunk is not None:
                    state.box = frame.clip(shrunk)
                    boxed = True
            if boxed:
                self._decode_into(state, emb, frame)
        state.local.append(core if p.constrain == "all" or (p.constrain == "inside" and not boxed) else None)

    def _first_click(self, state: _SliceState, emb: Tuple[torch.Tensor, ...], frame: _Frame, fx: float, fy: float) -> None:
        """Candidate boxes centred on the click, chosen by the decoder's own scores, refined."""
        p = self.policy
        halves = np.asarray(p.scales, np.float64) * self.size
        boxes = np.stack([frame.clip(np.array([fx - h, fy - h, fx + h, fy + h])) for h in halves])
        logits, iou = self._decode(emb, boxes)
        best = int(np.argmax(self._select_scores(logits, iou, frame)))
        state.box = boxes[best]
        lg, state.iou = logits[best], float(iou[best])
        for _ in range(p.refine):
            fm = (lg > p.threshold)[: frame.fh, : frame.fw]
            if not bool(fm.any()):
                break
            state.box = self._frame_mask_box(fm.cpu().numpy(), frame)
            out, iou2 = self._decode(emb, state.box[None])
            lg, state.iou = out[0], float(iou2[0])
        state.logits = self._to_slice(lg, frame)

    def _select_scores(self, logits: torch.Tensor, iou: torch.Tensor, frame: _Frame) -> np.ndarray:
        """A score per first-click candidate (the highest wins), see ``ClickPolicy.select``."""
        sel = self.policy.select
        iou = iou.cpu().numpy()
        if sel == "iou":
            return iou
        masks = (logits[:, : frame.fh, : frame.fw] > self.policy.threshold).flatten(1).float()
        inter = masks @ masks.T
        area = masks.sum(1)
        agree = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1)).cpu().numpy()
        consensus = (agree.sum(1) - 1.0) / max(len(iou) - 1, 1)
        return consensus if sel == "consensus" else consensus * iou

    @staticmethod
    def _holds_positive(mask: np.ndarray, r: int, c: int, clicks: Sequence[Click]) -> bool:
        """Whether the connected part of ``mask`` at (r, c) is anchored (see :meth:`_anchored`)."""
        labels, _ = ndimage.label(mask)
        return bool(labels[r, c]) and labels[r, c] in InteractiveSession._anchored(labels, [(int(round(rr)), int(round(cc))) for rr, cc, pos in clicks if pos])

    @staticmethod
    def _anchored(labels: np.ndarray, positives: Sequence[Tuple[int, int]]) -> set:
        """The labels of the mask's parts a negative click must not remove whole: those holding
        a positive click or, while there is none (a mask given as ``previous``), the largest."""
        if positives:
            return {int(labels[r, c]) for r, c in positives} - {0}
        sizes = np.bincount(labels.ravel())
        return {int(np.argmax(sizes[1:])) + 1} if len(sizes) > 1 else set()

    @staticmethod
    def _pseudo_logits(mask: np.ndarray, frame: _Frame) -> np.ndarray:
        """Logit-like values for a mask the model did not make: the signed distance to its
        edge in frame pixels, at least 1 in magnitude (so any threshold in (-1, 1) gives the
        mask back and the local edits grow or shrink it geometrically)."""
        sampling = (frame.ky, frame.kx)  # one slice pixel spans this many frame pixels
        inside = ndimage.distance_transform_edt(mask, sampling=sampling)
        outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
        return np.where(mask, np.maximum(inside, 1.0), -np.maximum(outside, 1.0)).astype(np.float32)

    @staticmethod
    def _distance_to(mask: np.ndarray, r: int, c: int, frame: _Frame, inside: bool) -> float:
        """Frame-pixel distance from (r, c) to the nearest mask pixel (``inside=False``) or,
        for a pixel inside the mask, to the nearest background pixel (``inside=True``)."""
        target = ~mask if inside else mask
        edge = target & ~ndimage.binary_erosion(target, border_value=1)
        rows, cols = np.nonzero(edge)
        if not len(rows):
            return 0.0
        return float(np.sqrt((((rows - r) * frame.ky) ** 2 + ((cols - c) * frame.kx) ** 2).min()))

    def _push(self, box: np.ndarray, fx: float, fy: float, d: float, frame: _Frame) -> np.ndarray:
        """Move the box side nearest to (fx, fy) outwards to ``d`` + margin past the click."""
        x0, y0, x1, y1 = box
        gap = [fx - x0, fy - y0, x1 - fx, y1 - fy]
        side = int(np.argmin(gap))
        box = box.copy()
        box[side] += (-1 if side < 2 else 1) * (d + self.policy.margin - gap[side])
        return frame.clip(box)

    def _shrink(self, box: np.ndarray, fx: float, fy: float, d: float) -> Optional[np.ndarray]:
        """The box with its side nearest to (fx, fy) moved inwards past the click: to where the
        object's edge probably is (``d`` before the click, plus the margin), at least 1 px past
        it. None when that would keep less than ``min_keep`` of the box along that side."""
        x0, y0, x1, y1 = box
        gap = [fx - x0, fy - y0, x1 - fx, y1 - fy]
        side = int(np.argmin(gap))
        extent = (x1 - x0) if side in (0, 2) else (y1 - y0)
        move = gap[side] + max(1.0, d - self.policy.margin)
        if extent <= 0 or 1.0 - move / extent < self.policy.min_keep:
            return None
        box = box.copy()
        box[side] += move if side < 2 else -move
        return box

    def _final_mask(self, state: _SliceState, frame: _Frame) -> np.ndarray:
        """Threshold the logits, apply the clicks' local constraints (at each click's own
        logit, so they follow a re-decoded box), then force every click's label.

        Positive clicks first add their regions; then negative clicks remove the connected
        part they lie on when it holds no positive click (``remove_parts``), else their
        region; finally every click pixel gets its label, in click order."""
        p = self.policy
        lg = state.logits
        mask = lg > p.threshold
        clicks = [(int(round(row)), int(round(col)), pos, local) for (row, col, pos), local in zip(state.clicks, state.local)]
        for r, c, pos, local in clicks:
            if pos and local is not None and not mask[r, c]:
                mask |= self._local(lg >= lg[r, c], r, c, p.local_radius, local, frame)
        negatives = [(r, c, local) for r, c, pos, local in clicks if not pos and mask[r, c]]
        if negatives:
            labels, _ = ndimage.label(mask)
            positive_parts = self._anchored(labels, [(r, c) for r, c, pos, _ in clicks if pos])
            cut = np.zeros_like(mask)
            for r, c, local in negatives:
                if p.remove_parts and labels[r, c] not in positive_parts:
                    cut |= labels == labels[r, c]
                elif local is not None:
                    cut |= self._local(lg <= lg[r, c], r, c, p.local_radius, local, frame)
            mask &= ~cut
        rad = p.click_radius
        for r, c, pos, _ in clicks:
            mask[max(r - rad, 0) : r + rad + 1, max(c - rad, 0) : c + rad + 1] = pos
        return mask

    @staticmethod
    def _local(candidates: np.ndarray, r: int, c: int, radius: float, core: float, frame: _Frame) -> np.ndarray:
        """The connected part of ``candidates`` plus the disk of radius ``core`` around (r, c)
        that holds (r, c), within ``radius`` (frame pixels)."""
        h, w = candidates.shape
        ry, rx = int(math.ceil(radius / frame.ky)), int(math.ceil(radius / frame.kx))
        r0, r1, c0, c1 = max(r - ry, 0), min(r + ry + 1, h), max(c - rx, 0), min(c + rx + 1, w)
        yy, xx = np.ogrid[r0:r1, c0:c1]
        d2 = ((yy - r) * frame.ky) ** 2 + ((xx - c) * frame.kx) ** 2
        window = (candidates[r0:r1, c0:c1] | (d2 <= core**2)) & (d2 <= radius**2)
        window[r - r0, c - c0] = True
        labels, _ = ndimage.label(window)
        out = np.zeros((h, w), bool)
        out[r0:r1, c0:c1] = labels == labels[r - r0, c - c0]
        return out

    # ----------------------------------------------------------------------------------------
    # Model
    # ----------------------------------------------------------------------------------------

    def _decode_into(self, state: _SliceState, emb: Tuple[torch.Tensor, ...], frame: _Frame) -> None:
        logits, iou = self._decode(emb, state.box[None])
        state.logits = self._to_slice(logits[0], frame)
        state.iou = float(iou[0])

    def _decode(self, prepared: Tuple[torch.Tensor, ...], boxes: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Frame boxes (K, 4) xyxy -> (K, 256, 256) logits in the frame and (K,) predicted IoU,
        in one mask-decoder call."""
        b = torch.as_tensor(np.asarray(boxes, np.float32), device=self.device).reshape(-1, 4)
        self.decoded_boxes += b.shape[0]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits, iou = self._decoder(prepared, b)
        return logits.float(), iou.float()

    @torch.inference_mode()
    def _to_slice(self, frame_logits: torch.Tensor, frame: _Frame) -> np.ndarray:
        """(256, 256) frame logits -> (h, w) float32 logits on the slice grid."""
        crop = frame_logits[: frame.fh, : frame.fw][None, None]
        if (frame.fh, frame.fw) != (frame.h, frame.w):
            crop = F.interpolate(crop, size=(frame.h, frame.w), mode="bilinear", align_corners=False)
        return crop[0, 0].cpu().numpy().astype(np.float32)

    def _mask_box(self, mask: np.ndarray, frame: _Frame, margin: Optional[float] = None) -> np.ndarray:
        """Frame box around a slice mask, grown by ``margin`` (default the policy's)."""
        rows, cols = np.nonzero(mask)
        fbox = frame.box_to_frame((rows.min(), cols.min(), rows.max(), cols.max()))
        m = self.policy.margin if margin is None else margin
        return frame.clip(fbox + np.array([-m, -m, m, m]))

    def _frame_mask_box(self, fmask: np.ndarray, frame: _Frame) -> np.ndarray:
        ys, xs = np.nonzero(fmask)
        m = self.policy.margin
        return frame.clip(np.array([xs.min() - m, ys.min() - m, xs.max() + m, ys.max() + m], np.float64))

    def _frame(self, axis: int) -> _Frame:
        h, w = self.slice_shape(axis)
        if not self.square_pixels:
            return _Frame(h, w, self.size, self.size)
        sr, sc = self.slice_spacing(axis)
        scale = self.size / max(h * sr, w * sc)
        return _Frame(h, w, max(1, min(self.size, int(round(h * sr * scale)))), max(1, min(self.size, int(round(w * sc * scale)))))

    def _slice(self, axis: int, index: int) -> np.ndarray:
        return np.take(self._require_image(), index, axis=axis)

    def _frame_input(self, axis: int, index: int, frame: _Frame) -> torch.Tensor:
        """The slice resampled into the top-left of a zero 256 x 256 frame (bilinear,
        antialiased when shrinking, like LiteMedSAM's area resize)."""
        s = torch.from_numpy(np.ascontiguousarray(self._slice(axis, index)))[None, None]
        if (frame.fh, frame.fw) != (frame.h, frame.w):
            s = F.interpolate(s, size=(frame.fh, frame.fw), mode="bilinear", align_corners=False, antialias=True)
        out = torch.zeros((self.size, self.size), dtype=torch.float32)
        out[: frame.fh, : frame.fw] = s[0, 0].clamp(0, 1)
        return out

    def _embed_many(self, axis: int, indices: Sequence[int], cancel: Optional[Callable[[], bool]] = None) -> None:
        """Encode, in one batch, the slices among ``indices`` that are not cached yet."""
        todo = [i for i in indices if (axis, i) not in self._embeddings]
        if not todo:
            return
        frame = self._frame(axis)
        batch = torch.stack([self._frame_input(axis, i, frame) for i in todo])
        emb = self.encoder.encode(batch, batch_size=len(todo), cancel=cancel).to(torch.float16)
        self.encoded_slices += len(todo)
        for i, e in zip(todo, emb):
            self._embeddings[(axis, i)] = e[None]
            self._embeddings.move_to_end((axis, i))
        while len(self._embeddings) > self.max_slices:
            self._embeddings.popitem(last=False)

    def _embedding(self, axis: int, index: int) -> Tuple[torch.Tensor, ...]:
        """The slice's embedding (computed once, then cached), made ready for the decoder
        (:meth:`_BoxDecoder.prepare`, kept for the last few slices)."""
        key = (axis, index)
        if key not in self._embeddings:
            self._embed_many(axis, [index])
        self._embeddings.move_to_end(key)
        if key not in self._prepared:
            self._prepared[key] = self._decoder.prepare(self._embeddings[key].to(self.device, torch.float32))
            while len(self._prepared) > 4:
                self._prepared.popitem(last=False)
        self._prepared.move_to_end(key)
        return self._prepared[key]

    @staticmethod
    def _put(volume: np.ndarray, axis: int, index: int, mask: np.ndarray) -> None:
        sl = [slice(None)] * 3
        sl[axis] = index
        volume[tuple(sl)] = mask

    # ----------------------------------------------------------------------------------------
    # Checks
    # ----------------------------------------------------------------------------------------

    def _require_image(self) -> np.ndarray:
        if self._image is None:
            raise ValueError("no image set: call set_image(array, spacing_xyz) first")
        return self._image

    @staticmethod
    def _check_axis(axis) -> int:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or int(axis) not in (0, 1, 2):
            raise ValueError(f"axis must be 0 (z), 1 (y) or 2 (x) of the (z, y, x) array, got {axis!r}")
        return int(axis)

    def _check_slice(self, axis, index) -> Tuple[int, int]:
        shape = self.shape
        axis = self._check_axis(axis)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < shape[axis]:
            raise ValueError(f"slice index {index!r} is outside 0..{shape[axis] - 1} along axis {axis} ({AXIS_NAMES[axis]})")
        return axis, int(index)

    @staticmethod
    def _check_clicks(clicks, frame: _Frame, axis: int, index: int) -> List[Click]:
        out: List[Click] = []
        for i, click in enumerate(clicks or ()):
            try:
                row, col, positive = click
                row, col = float(row), float(col)
            except (TypeError, ValueError):
                raise ValueError(f"click {i} must be (row, col, positive), got {click!r}") from None
            if not (math.isfinite(row) and math.isfinite(col)) or not (-0.5 <= row < frame.h - 0.5 and -0.5 <= col < frame.w - 0.5):
                raise ValueError(f"click {i} at (row {row:g}, col {col:g}) lies outside slice {AXIS_NAMES[axis]}={index} of shape {(frame.h, frame.w)}")
            out.append((row, col, bool(positive)))
        return out

    @staticmethod
    def _check_box(box, frame: _Frame, axis: int, index: int) -> Optional[Box]:
        if box is None:
            return None
        try:
            r0, c0, r1, c1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"box must be (row0, col0, row1, col1), got {box!r}") from None
        if not all(math.isfinite(v) for v in (r0, c0, r1, c1)) or r0 > r1 or c0 > c1:
            raise ValueError(f"box {tuple(box)} must have row0 <= row1 and col0 <= col1")
        if r0 < 0 or c0 < 0 or r1 > frame.h - 1 or c1 > frame.w - 1:
            raise ValueError(f"box {tuple(box)} lies outside slice {AXIS_NAMES[axis]}={index} of shape {(frame.h, frame.w)}")
        return (r0, c0, r1, c1)

