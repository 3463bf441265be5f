"""Semi-SAM+ training: three phases over cached slice embeddings, EMA teacher, SAM-family
pseudo-labels with a variance filter, atomic checkpoints, resume, DistributedDataParallel.

The frozen encoder makes the student cheap to train: every volume is embedded once (slice by
slice, cached on disk), and each iteration only runs the small 3D decoder on depth blocks of
those embeddings. The student's strong augmentation therefore acts on embeddings, never on
voxels (nothing is re-encoded):

* a random depth block of ``D_s`` slices (Algorithm 1's blocks), flipped along depth (exact:
  the encoder works per slice);
* in-plane flips and transposes of the embedding grid together with the targets (the decoder
  is convolutional; this teaches it the symmetry, it does not pretend to be an image flip);
* feature perturbation: per (channel, slice) multiplicative Gaussian gain and channel dropout
  on the student's input only; the EMA teacher sees the clean block.

Phases (all numbers from the config):

0. warm-up: labeled blocks only, L_sup;
1. semi-supervised: labeled + unlabeled blocks 1:1, L_sup + λ(t) L_con + β(t) L_rs-con;
   pseudo-labels from the SAM teachers (:mod:`semisam.pseudo_labels`), prompted by the
   student's coarse mask, refreshed every ``pseudo.refresh_every`` epochs;
2. fine-tune: as phase 1 with the teachers frozen: the last pseudo-labels are kept.

The encoder is frozen in every phase, so "decoder only" (phase 0) holds throughout.

Outputs in ``cfg.output``: ``best.pt`` (EMA weights with the best validation Dice, a student
checkpoint for ``semisam segment``), ``last.pt`` (everything needed to resume, written
atomically after every epoch), ``metrics.jsonl``, ``curves.png``, ``config.yaml``,
``pseudo_labels/`` and ``cache/`` (embeddings).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import TrainConfig, check_input_size, write_config
from .data import Case, DatasetSpec, MixedBatchSampler, load_dataset, validate_dataset
from .ema import EMATeacher
from .inference import keep_largest_component, whole_fov
from .errors import SemiSAMError
from .losses import SupervisedLoss, consistency_loss, consistency_weight, pseudo_label_loss, pseudo_weight
from .models.encoders import EmbeddingCache, SliceEncoder
from .models.student import SlicingSAM3D, StudentConfig
from .preprocess import PreprocessConfig, apply_to_label, preprocess
from .progress import MetricsLog, Progress, plot_curves
from .pseudo_labels import grow_mask, growth_candidates
from .runlock import RunLock
from .tiling import Tile, blend, tile_stack, tiles
from .volume import read_volume

STATE_VERSION = 1
WARMUP_SNAPSHOT = "warmup_end"  # run sub-folder: last.pt + best.pt as they were when the warm-up ended


# ------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return Dist(rank, world, local)


def resolve_device(name: str) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SemiSAMError(f"device '{name}' asked for, but no CUDA GPU is usable here; set device: cpu (or auto)")
        if name == "cuda":
            name = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One preprocessed case with the slice embeddings of each of its in-plane tiles.

    A grid no wider than one tile (``preprocess.crop: fov``/``center``, or a small field of
    view) has one tile covering it; a whole field of view wider than the student's tile is cut
    into the overlapping tiles of :func:`semisam.tiling.tiles`, each embedded on its own."""

    id: str
    role: str  # "labeled" | "unlabeled" | "validation"
    image: np.ndarray  # (z, y, x) float32 in [0, 1], the training grid
    spacing: Tuple[float, float, float]  # (x, y, z) mm of the training grid
    label: Optional[np.ndarray] = None  # (z, y, x) uint8
    reference: Optional[np.ndarray] = None  # true label of an unlabeled case (evaluation only)
    emb: Optional[torch.Tensor] = None  # (z, C, G, G) float16 of the first tile (the only one of a one-tile grid)
    tiles: List[Tile] = field(default_factory=list)  # in-plane tiles; empty = one tile covering the grid
    embs: List[torch.Tensor] = field(default_factory=list)  # per tile (z, C, G, G) float16; embs[0] is emb

    def tile_list(self) -> List[Tile]:
        return self.tiles or [Tile(0, 0, int(self.image.shape[1]), int(self.image.shape[2]))]

    def tile_embs(self) -> List[torch.Tensor]:
        return self.embs or ([self.emb] if self.emb is not None else [])

    def tile_view(self, t: int) -> "Item":
        """This case restricted to its tile ``t``: image, label and embeddings of that window."""
        tiles = self.tile_list()
        if len(tiles) == 1:
            return self
        win = (slice(None), *tiles[t].window)
        return Item(self.id, self.role, self.image[win], self.spacing, None if self.label is None else self.label[win],
                    None if self.reference is None else self.reference[win], self.tile_embs()[t])


def split_validation(spec: DatasetSpec, fraction: float, seed: int) -> Tuple[List[Case], List[Case]]:
    """(training, validation) labeled cases: the dataset's own validation list, else a seeded
    ``fraction`` of the labeled cases (at least one when there are two or more)."""
    if spec.validation:
        return list(spec.labeled), list(spec.validation)
    n = len(spec.labeled)
    if fraction <= 0 or n < 2:
        return list(spec.labeled), []
    k = min(n - 1, max(1, int(round(fraction * n))))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(order[:k].tolist())
    return [c for i, c in enumerate(spec.labeled) if i not in val], [spec.labeled[i] for i in val]


def load_item(case: Case, role: str, config: PreprocessConfig) -> Item:
    pre, record = preprocess(read_volume(case.image, "image"), config)
    label = reference = None
    if case.label is not None and role != "unlabeled":
        label = apply_to_label(record, read_volume(case.label, "label")).array.astype(np.uint8)
    if role == "unlabeled" and case.reference is not None and Path(case.reference).exists():
        reference = apply_to_label(record, read_volume(case.reference, "label")).array.astype(np.uint8)
    return Item(case.id, role, np.ascontiguousarray(pre.array, dtype=np.float32), tuple(pre.spacing), label, reference)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def _accelerate(cfg: TrainConfig, base: SliceEncoder, model_cache: Optional[Path]) -> SliceEncoder:
    """``base`` on the configured runtime (``encoder.backend``; ``compile`` means the torch one).
    A runtime that is missing or fails to load is an error that says what to install or choose."""
    from .models.backends import accelerated_encoder

    e = cfg.encoder
    return accelerated_encoder(base, e.backend, precision=e.precision, compile=e.compile, batch_size=e.batch_size, root=model_cache)


def build_encoder(cfg: TrainConfig, device: torch.device, model_cache: Optional[Path] = None):
    """(fast slice encoder, the full LiteMedSAM net or None) as configured; converted encoders
    of a runtime backend are kept in ``model_cache`` (default: ``~/.semisam/cache/encoders``)."""
    from .models.encoders import build_litemedsam, build_sam_vit, litemedsam_encoder, sam_encoder
    from .models.registry import catalogue, checkpoint_path

    e = cfg.encoder
    if e.name == "litemedsam":
        net = build_litemedsam(e.checkpoint, device=str(device))
        base = litemedsam_encoder(net, input_size=e.input_size)
    else:
        weights = e.checkpoint or checkpoint_path(catalogue()[e.name])
        net = None
        base = sam_encoder(build_sam_vit(weights, str(device), name=e.name), e.name)
    return _accelerate(cfg, base, model_cache), net


def build_teachers(cfg: TrainConfig, encoder: SliceEncoder, litemedsam_net, cache: EmbeddingCache, device: torch.device) -> list:
    """The configured SAM-family teachers. Slice teachers on the student's encoder share its
    embeddings (one encoding per slice for everyone)."""
    from .models.backends import model_cache_dir
    from .models.encoders import build_litemedsam, build_sam_vit, litemedsam_encoder, sam_encoder
    from .models.registry import build_model, catalogue, checkpoint_path

    model_cache = model_cache_dir(cache.cache_dir)

    teachers = []
    for t in cfg.pseudo.teachers:
        if t.name == "litemedsam":
            from .models.teacher_litemedsam import LiteMedSAMTeacher

            own_side = t.input_size is not None and check_input_size("litemedsam", t.input_size) != encoder.input_size
            if encoder.name == "litemedsam" and litemedsam_net is not None and not t.checkpoint and not own_side:
                teachers.append(LiteMedSAMTeacher(net=litemedsam_net, encoder=encoder, cache=cache, device=str(device)))
            else:  # its own encoder (another checkpoint, or another input side): embeddings cached apart
                net = litemedsam_net if (litemedsam_net is not None and not t.checkpoint) else build_litemedsam(t.checkpoint, device=str(device))
                side = t.input_size if t.input_size is not None else 0
                enc = _accelerate(cfg, litemedsam_encoder(net, input_size=side), model_cache)
                teachers.append(LiteMedSAMTeacher(net=net, encoder=enc, cache=cache, device=str(device)))
        elif t.name in ("medsam-vit-b", "sam-vit-b"):
            from .models.teacher_sam import SAMTeacher

            weights = t.checkpoint or checkpoint_path(catalogue()[t.name])
            sam = build_sam_vit(weights, str(device), name=t.name)
            enc = encoder if encoder.name == t.name and not t.checkpoint and not cfg.encoder.checkpoint else _accelerate(cfg, sam_encoder(sam, t.name), model_cache)
            teachers.append(SAMTeacher(sam, encoder=enc, cache=cache, device=str(device), name=t.name))
        else:
            teachers.append(build_model(t.name, t.checkpoint, str(device)))
    return teachers


def amp_settings(mode: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, use a GradScaler). auto: CUDA fp16 + GradScaler (Volta has no
    bf16); CPU fp32. bf16 on the CPU (``optim.amp: bf16``) is ~1.5x faster for the decoder on
    AMX CPUs, but oneDNN's bf16 conv3d backward gave NaN losses (and hung) there for an
    8-channel last stage, so it is opt-in, not the default."""
    if mode == "off":
        return None, False
    if mode == "auto":
        if device.type == "cuda":
            return torch.float16, True
        return None, False
    if mode == "fp16":
        return torch.float16, device.type == "cuda"
    return torch.bfloat16, False


# ------------------------------------------------------------------------------------------
# Augmentation on embeddings
# ------------------------------------------------------------------------------------------


@dataclass
class BlockGeometry:
    start: int
    depth_flip: bool
    flip_y: bool
    flip_x: bool
    transpose: bool
    tokens: Optional[Tuple[int, int, int, int]] = None  # in-plane crop (y0, y1, x0, x1) on the embedding grid
    pixels: Optional[Tuple[int, int, int, int]] = None  # the same window on the image/target grid


def crop_windows(grid: Tuple[int, int], size: Tuple[int, int], crop: int) -> List[Optional[Tuple[int, int]]]:
    """Per in-plane axis, ``(step, tokens)`` of a random crop of about ``crop`` embedding tokens
    whose pixel window on the ``size`` grid is exact, or None where the axis is not cropped.

    A token covers ``size / grid`` pixels (the encoder resizes each slice to its square input), so
    token offsets and the crop's width are multiples of that ratio's denominator (96 px over 64
    tokens: multiples of 2 tokens = 3 px). An axis is left whole when the crop would not be
    smaller than the grid."""
    from fractions import Fraction

    out: List[Optional[Tuple[int, int]]] = []
    for g, n in zip(grid, size):
        q = Fraction(int(n), int(g)).denominator
        c = (min(int(crop), int(g)) // q) * q
        out.append((q, c) if 0 < c < g else None)
    return out


def draw_geometry(rng: np.random.Generator, depth: int, block: int, cfg: TrainConfig, square: bool,
                  grid: Optional[Tuple[int, int]] = None, size: Optional[Tuple[int, int]] = None) -> BlockGeometry:
    """A random depth block with flips and, when ``cfg.augment.inplane_crop`` > 0 (and the
    embedding ``grid`` and pixel ``size`` are given), a random in-plane crop."""
    a = cfg.augment
    start = int(rng.integers(0, depth - block + 1))
    flips = rng.random(4) < 0.5
    tokens = pixels = None  # a square grid and slice get the same window width on both axes: transposes stay valid
    windows = crop_windows(grid, size, a.inplane_crop) if a.inplane_crop > 0 and grid is not None and size is not None else []
    if any(w is not None for w in windows):
        t, px = [], []
        for w, g, n in zip(windows, grid, size):
            q, c = w or (1, g)
            t0 = int(rng.integers(0, (g - c) // q + 1)) * q if w else 0
            t += [t0, t0 + c]
            px += [t0 * n // g, (t0 + c) * n // g]
        tokens, pixels = tuple(t), tuple(px)
    return BlockGeometry(
        start, bool(a.depth_flip and flips[0]), bool(a.inplane_flip and flips[1]),
        bool(a.inplane_flip and flips[2]), bool(a.inplane_flip and square and flips[3]), tokens, pixels,
    )


def apply_geometry(x: torch.Tensor, g: BlockGeometry, block: int, channels_first: bool) -> torch.Tensor:
    """Crop + flip a (z, C, G, G) embedding stack -> (C, D, G', G'), or a (z, H, W) target -> (D, H', W')."""
    x = x[g.start : g.start + block]
    window = g.tokens if channels_first else g.pixels
    if window is not None:
        x = x[..., window[0] : window[1], window[2] : window[3]]
    if channels_first:
        x = x.permute(1, 0, 2, 3)
    off = 1 if channels_first else 0
    dims = [d for d, on in ((off, g.depth_flip), (off + 1, g.flip_y), (off + 2, g.flip_x)) if on]
    if dims:
        x = torch.flip(x, dims)
    if g.transpose:
        x = x.transpose(off + 1, off + 2)
    return x


@dataclass
class BlockSample:
    """One training block: embeddings ``x`` (C, D, G', G'), the image block for an image branch
    (1, D, H', W') or None, and its targets on the block's pixel grid, all under one geometry."""

    x: torch.Tensor
    image: Optional[torch.Tensor]
    labeled: bool
    has_pseudo: bool
    label: torch.Tensor  # (D, H', W') uint8; zeros for an unlabeled block
    pseudo: torch.Tensor  # (K, D, H', W') the pseudo-label p_f; zeros where none
    conf: torch.Tensor  # (K, D, H', W') M_conf; zeros where none (nothing is trained on)


def block_sample(item: "Item", targets: Dict[str, torch.Tensor], geo: BlockGeometry, block: int, num_labels: int, with_image: bool) -> BlockSample:
    """Cut one block out of a case: embeddings, image, label (labeled cases) and pseudo-label +
    confidence (unlabeled cases that have one) all get the same depth block, in-plane crop,
    flips and transpose. A labeled case never carries a pseudo-label target."""
    full = tuple(item.image.shape[1:])
    out_size = full if geo.pixels is None else (geo.pixels[1] - geo.pixels[0], geo.pixels[3] - geo.pixels[2])
    x = apply_geometry(item.emb, geo, block, True).float()
    image = apply_geometry(torch.from_numpy(item.image), geo, block, False)[None] if with_image else None
    labeled = item.role == "labeled"
    label = apply_geometry(targets["label"], geo, block, False) if labeled else torch.zeros((block, *out_size), dtype=torch.uint8)
    has_pseudo = (not labeled) and "pseudo" in targets
    if has_pseudo:
        pseudo = torch.stack([apply_geometry(p, geo, block, False) for p in targets["pseudo"]])
        conf = torch.stack([apply_geometry(c, geo, block, False) for c in targets["conf"]])
    else:
        pseudo = conf = torch.zeros((num_labels, block, *out_size))
    return BlockSample(x, image, labeled, has_pseudo, label, pseudo, conf)


def perturb(x: torch.Tensor, noise: float, dropout: float, gen: torch.Generator) -> torch.Tensor:
    """Feature perturbation of a (B, C, D, G, G) block: a Gaussian gain per (sample, channel,
    slice) and channel dropout; one broadcast multiply (cheap next to the decoder)."""
    b, c, d = x.shape[:3]
    gain = torch.ones((b, c, d, 1, 1))
    if noise > 0:
        gain = gain + noise * torch.randn((b, c, d, 1, 1), generator=gen)
    if dropout > 0:
        keep = (torch.rand((b, c, 1, 1, 1), generator=gen) >= dropout).float() / (1.0 - dropout)
        gain = gain * keep
    return x * gain.to(x.device, x.dtype)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def dice_hd95(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float], num_labels: int, hd95: bool = True) -> Tuple[float, Optional[float]]:
    """Mean Dice over structures 1..K and mean HD95 (mm) of label maps, with MONAI's metrics.
    Dice of an empty prediction against an empty truth is 1; HD95 is None where undefined."""
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_labels + 1)
    t = one_hot(torch.as_tensor(truth, dtype=torch.long)[None, None], num_labels + 1)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)
    d = float(torch.nanmean(dice))
    hd = None
    if hd95 and bool(p[:, 1:].any()) and bool(t[:, 1:].any()):
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
            warnings.simplefilter("ignore", FutureWarning)
            h = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=list(spacing_zyx))
        h = h[torch.isfinite(h)]
        hd = float(h.mean()) if h.numel() else None
    return d, hd


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------


class Trainer:
    """Runs a configured training (see the module docstring). ``run()`` returns a summary."""

    def __init__(self, cfg: TrainConfig, progress: str = "auto", resume: bool = False, stream=None):
        self.cfg = cfg
        self.resume = resume
        self.progress_mode = progress
        self.stream = stream
        self.out = Path(cfg.output)
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        self.amp_dtype, use_scaler = amp_settings(cfg.optim.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    # -------------------------------------------------------------- set-up

    def _log(self, text: str, level: str = "info") -> None:
        if self.dist.main and getattr(self, "progress", None) is not None:
            self.progress.message(text, level)

    def _check_output(self) -> None:
        last = self.out / "last.pt"
        if last.exists() and not self.resume:
            raise SemiSAMError(f"{self.out} already holds a training run (last.pt); pass --resume to continue it, or choose another output folder")
        if self.out.exists() and not self.out.is_dir():
            raise SemiSAMError(f"output {self.out} exists and is not a folder")

    def _load_data(self) -> None:
        cfg = self.cfg
        spec = load_dataset(cfg.dataset)
        errors = [p for p in validate_dataset(spec, read=False) if p.severity == "error"]
        if errors:
            raise SemiSAMError(f"dataset {cfg.dataset} is not usable: " + "; ".join(str(p) for p in errors[:5]) + (" ..." if len(errors) > 5 else "") + " (run `semisam validate` for the full list)")
        self.spec = spec
        p = cfg.preprocess
        self.pre_config = spec.preprocess_config(target_spacing=p.target_spacing, target_shape=p.target_shape, crop=p.crop,
                                                 tile_overlap=p.tile_overlap)
        train, val = split_validation(spec, cfg.data.validation, cfg.seed)
        labels = spec.labels or {0: "background", 1: "target"}
        self.num_labels = max(labels) if spec.labels else None
        t0 = time.time()
        self.labeled = [load_item(c, "labeled", self.pre_config) for c in train]
        self.unlabeled = [load_item(c, "unlabeled", self.pre_config) for c in spec.unlabeled]
        # Validation scores what `semisam segment` would give: the whole field of view, tiled.
        self.validation = [load_item(c, "validation", whole_fov(self.pre_config)) for c in val]
        for it in self.labeled + self.unlabeled + self.validation:
            it.tiles = tiles(it.image.shape[1:], self.pre_config.target_shape[1:], self.pre_config.tile_overlap)
        if self.num_labels is None:  # folder datasets: the highest label value present
            self.num_labels = max(1, max(int(it.label.max()) for it in self.labeled + self.validation))
        self.label_names = {int(k): v for k, v in labels.items()} if spec.labels else {0: "background", **{k: f"structure {k}" for k in range(1, self.num_labels + 1)}}
        self._log(
            f"data: {len(self.labeled)} labeled, {len(self.unlabeled)} unlabeled, {len(self.validation)} validation case(s), "
            f"training grid {self.pre_config.target_shape} (z, y, x) at {self.pre_config.target_spacing} mm (x, y, z); {time.time() - t0:.1f} s"
        )
        if self.pre_config.crop == "whole":
            items = self.labeled + self.unlabeled + self.validation
            grids = sorted({tuple(int(n) for n in it.image.shape) for it in items})
            n_tiles = sum(len(it.tiles) * it.image.shape[0] for it in items)
            self._log(f"whole fields of view: grids {grids[0]}..{grids[-1]} (z, y, x), cut into in-plane tiles of "
                      f"{tuple(self.pre_config.target_shape[1:])}: {n_tiles} slice-tiles to embed")

    def _embed_all(self) -> None:
        """Embed every case once (each rank a share, written to the shared disk cache)."""
        cfg = self.cfg
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.out / "cache"
        self.cache = EmbeddingCache(cache_dir, max_memory_bytes=int(cfg.data.max_memory_gb * (1 << 30)))
        from .models.backends import model_cache_dir

        self.encoder, self.litemedsam_net = build_encoder(cfg, self.device, model_cache_dir(cache_dir))
        items = self.labeled + self.unlabeled + self.validation
        t0 = time.time()

        def embed(it: Item) -> None:  # each tile's stack on its own: the keys segment uses too
            it.embs = [self.cache.embed(tile_stack(it.image, t), self.encoder, batch_size=cfg.encoder.batch_size) for t in it.tile_list()]
            it.emb = it.embs[0]

        for i, it in enumerate(items):
            if i % self.dist.world == self.dist.rank:
                embed(it)
        self.dist.barrier()
        for it in items:
            if not it.embs:
                embed(it)
        encoded = self.cache.encoded_slices
        if encoded:
            self._log(f"embedded {encoded} slices in {time.time() - t0:.1f} s ({(time.time() - t0) / encoded:.2f} s/slice); cached in {cache_dir}")
        else:
            self._log(f"all {sum(it.image.shape[0] * len(it.tile_list()) for it in items)} slice embeddings found in the cache {cache_dir}")

    def _build_student(self) -> None:
        cfg = self.cfg
        s = cfg.student
        torch.manual_seed(cfg.seed)
        scfg = StudentConfig(
            embed_dim=int(self.labeled[0].tile_embs()[0].shape[1]), channels=tuple(s.channels), num_labels=self.num_labels,
            block_depth=s.block_depth, block_overlap=s.block_overlap, context=s.context, image_channels=s.image_channels, encoder=self.encoder.name, encoder_id=self.encoder.weights_id,
            encoder_input_size=self.encoder.input_size,
        )
        self.student = SlicingSAM3D(scfg).to(self.device)
        self.ema = EMATeacher(self.student, cfg.loss.ema_decay)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.phases.warmup.lr, weight_decay=cfg.optim.weight_decay)
        self.model = self.student
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None, gradient_as_bucket_view=True)
        self.sup_loss = SupervisedLoss(scfg.out_channels, cfg.loss.dice_weight, cfg.loss.ce_weight)

    # -------------------------------------------------------------- state

    def _state(self, phase: int, epochs_done: int, global_epoch: int, opt_steps: int) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "student": self.student.state_dict(),
            "student_config": self.student.config.to_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "phase": phase, "epochs_done": epochs_done, "global_epoch": global_epoch, "opt_steps": opt_steps,
            "best": dict(self.best), "config": self.cfg.to_dict(), "world_size": self.dist.world,
        }

    def _save_state(self, state: Dict[str, Any]) -> None:
        _atomic_torch_save(state, self.out / "last.pt")

    def _load_state(self) -> Optional[Dict[str, Any]]:
        from .models.checkpoints import safe_torch_load

        path = self.out / "last.pt"
        if not path.exists():
            return None
        state = safe_torch_load(path)
        if state.get("version") != STATE_VERSION:
            raise SemiSAMError(f"{path} was written by another SemiSAM version; start a new run in another folder")
        if state["student_config"] != self.student.config.to_dict():
            raise SemiSAMError(f"{path} holds a student of another shape ({state['student_config']}); the config changed since: use the run's config.yaml or a new output folder")
        self.student.load_state_dict(state["student"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state["best"])
        return state

    def _snapshot_warmup(self) -> None:
        """Copy ``last.pt`` and ``best.pt`` as they are when the warm-up ends to ``warmup_end/``.
        A new run folder seeded with them (and ``--resume``) continues into phase 1 with other
        settings without repeating the warm-up; ``scripts/bench_ssl.py`` branches its variants
        that way (a resumed run equals an uninterrupted one, see the kill/resume test)."""
        import shutil

        snap = self.out / WARMUP_SNAPSHOT
        snap.mkdir(exist_ok=True)
        for name in ("last.pt", "best.pt"):
            if (self.out / name).exists():
                shutil.copyfile(self.out / name, snap / f".{name}.tmp")
                os.replace(snap / f".{name}.tmp", snap / name)

    def _save_best(self, dice: Optional[float], phase: int, global_epoch: int) -> None:
        postprocess: Dict[str, Any] = {"largest_component": bool(self.cfg.validation.largest_component)}
        threshold, calibrated = (calibrate_threshold(self._val_probs, self.cfg.validation.largest_component)
                                 if dice is not None and self._val_probs else (None, None))
        if threshold is not None:
            postprocess["threshold"] = threshold
            postprocess["val_dice_at_threshold"] = calibrated
        extra = {
            "preprocess": self.pre_config.to_dict(),
            "postprocess": postprocess,
            "labels": {str(k): v for k, v in self.label_names.items()},
            "val_dice": dice, "phase": phase, "global_epoch": global_epoch,
            "dataset": str(self.cfg.dataset), "trained": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        self.ema.model.save(self.out / "best.pt", extra=extra)

    def _plot(self, metrics: MetricsLog) -> None:
        self._last_plot = time.time()
        try:
            plot_curves(metrics.read(), self.out / "curves.png", title=f"SemiSAM training: {self.out.name}")
        except Exception as exc:  # a picture must never stop training
            self.progress.message(f"could not draw curves.png: {exc}", "warning")

    # -------------------------------------------------------------- pseudo-labels

    def _coarse(self, item: Item) -> np.ndarray:
        """The coarse label map M_c that prompts the teachers, on a whole volume (blockwise,
        Algorithm 1): from the EMA teacher (the averaged student, the one validation keeps),
        post-processed as validation is (largest component when configured)."""
        probs = self._infer(self.ema.model, item)
        label = probs_to_label(probs)
        if self.cfg.validation.largest_component:
            label = keep_largest_component(label)
        return label

    def _infer(self, model: SlicingSAM3D, item: Item) -> torch.Tensor:
        """Probabilities (K', D, H, W) of ``model`` on a whole case: each tile decoded blockwise
        over depth, the tiles blended (:func:`semisam.tiling.blend`), as ``segment`` does."""
        def part(t: int):
            view = item.tile_view(t)
            return lambda: model.infer(view.emb.float().permute(1, 0, 2, 3), view.image.shape[1:], self.device, self._image(view))

        return blend(item.image.shape, [(tile, part(t)) for t, tile in enumerate(item.tile_list())])

    def _image(self, item: Item) -> Optional[torch.Tensor]:
        """The training-grid image for a student with an image branch, else None."""
        return torch.from_numpy(item.image) if self.student.uses_image else None

    def _refresh_pseudo(self, t_epoch: int, force: bool) -> Optional[Dict[str, Any]]:
        """Recompute due pseudo-labels (each rank a share, results gathered by everyone)."""

        if not self.unlabeled:
            return None
        every = self.cfg.pseudo.refresh_every
        due = [i for i, it in enumerate(self.unlabeled) if force or it.id not in self.pseudo or self.store.due(f"{it.id}:1", t_epoch, every)]
        if self.dist.enabled:  # only rank 0's store knows when each case was refreshed
            due = self.dist.gather(due)[0]
        if not due:
            return None
        self._ensure_labeler()
        t0 = time.time()
        growth, calibration = self._prompt_growth()
        mine = {}
        for n, i in enumerate(due):
            if n % self.dist.world != self.dist.rank:
                continue
            it = self.unlabeled[i]
            coarse = self._coarse(it)
            per_label = []
            for k in range(1, self.num_labels + 1):
                prompt = grow_mask(coarse == k, growth, self._spacing_zyx(it))
                pl = self.labeler(it.image, prompt, key=f"{it.id}:{k}")
                per_label.append(pl.as_stored() if pl is not None else None)
            mine[it.id] = (per_label, self._pseudo_stats(it, per_label, coarse))
        results: Dict[str, tuple] = {}
        for part in self.dist.gather(mine):
            results.update(part)
        stats = []
        for cid, (per_label, _) in results.items():
            self.pseudo[cid] = per_label
            if self.dist.main:
                for k, pl in enumerate(per_label, start=1):
                    self.store.put(f"{cid}:{k}", pl, t_epoch)
        for it in self.unlabeled:
            if it.id in results:
                stats.append(results[it.id][1])
        return {
            "refreshed": len(results), "seconds": round(time.time() - t0, 1), **calibration,
            "empty": sum(s["empty"] for s in stats),
            "confident_fraction": _mean([s["confident_fraction"] for s in stats]),
            "confident_fraction_in_union": _mean([s["confident_fraction_in_union"] for s in stats]),
            "dice_vs_reference": _mean([s["dice"] for s in stats if s["dice"] is not None]),
            "coarse_dice_vs_reference": _mean([s["coarse_dice"] for s in stats if s["coarse_dice"] is not None]),
        }

    def _ensure_labeler(self) -> None:
        from .pseudo_labels import PseudoLabeler

        if self.teachers is None:
            self.teachers = build_teachers(self.cfg, self.encoder, self.litemedsam_net, self.cache, self.device)
            self.labeler = PseudoLabeler(
                self.teachers, n_views=self.cfg.pseudo.views, u_th=self.cfg.pseudo.u_th, points=self.cfg.pseudo.points,
                inplane=self.cfg.pseudo.inplane_views, seed=self.cfg.seed,
            )

    def _calibrate_refinement(self) -> Optional[Dict[str, Any]]:
        """Whether the teachers should refine ``best.pt``'s masks at inference, decided on the
        validation cases and recorded in ``best.pt`` (``postprocess.refine``).

        ``best.pt``'s own label map of each validation case (its threshold and largest component,
        as ``segment`` makes it), grown by each of the prompt-growth candidates, prompts the
        teachers as a coarse mask does for a pseudo-label; the growth with the best mean Dice
        wins (ties: the smallest change), and the refinement is used when that Dice is above
        the student's own. A student trained on few labels tends to stop inside the boundary
        where a SAM-family teacher, given a box and the mask, finds it; on a data set where it
        does not, the student's mask is kept. Nothing is recorded without validation cases or
        teachers (the supervised-only variant)."""
        from .inference import REFINE_TEACHERS, recorded_threshold
        from .models.student import load_student

        v = self.cfg.validation
        names = [t.name for t in self.cfg.pseudo.teachers]
        path = self.out / "best.pt"
        if not v.refine or not self.validation or not names or not path.exists():
            return None
        if any(n not in REFINE_TEACHERS for n in names) or len(names) != 1:
            self._log(f"validation.refine: only the {'/'.join(REFINE_TEACHERS)} teacher alone can refine masks at inference; "
                      f"this run's teachers are {names}: best.pt segments with the student alone")
            return None
        t0 = time.time()
        self._ensure_labeler()
        student, extra = load_student(path, str(self.device))
        threshold = recorded_threshold(extra)
        candidates = growth_candidates(self._spacing_zyx(self.validation[0]))
        own: List[float] = []
        refined: Dict[float, List[float]] = {g: [] for g in candidates}
        for it in self.validation:
            probs = self._infer(student, it)
            label = (probs[0] > threshold).numpy().astype(np.uint8) if probs.shape[0] == 1 else probs.argmax(0).numpy().astype(np.uint8)
            if v.largest_component:
                label = keep_largest_component(label)
            spacing = self._spacing_zyx(it)
            own.append(dice_hd95(label, it.label, spacing, self.num_labels, hd95=False)[0])
            for g in candidates:
                per_label = [self.labeler(it.image, grow_mask(label == k, g, spacing), key=f"refine:{it.id}:{k}") if (label == k).any() else None
                             for k in range(1, self.num_labels + 1)]
                pred = self._pseudo_label_map(per_label, it.image.shape)
                if v.largest_component:
                    pred = keep_largest_component(pred)
                refined[g].append(dice_hd95(pred, it.label, spacing, self.num_labels, hd95=False)[0])
        scores = {g: float(np.mean(d)) for g, d in refined.items()}
        best = max(scores, key=lambda g: (scores[g], -abs(g)))
        student_dice = float(np.mean(own))
        teacher = self.teachers[0]
        record = {
            "use": bool(scores[best] > student_dice), "teacher": names[0], "growth_mm": best,
            "input_size": int(getattr(getattr(teacher, "encoder", None), "input_size", 0) or 0),
            "views": int(self.cfg.pseudo.views), "u_th": float(self.cfg.pseudo.u_th), "inplane_views": bool(self.cfg.pseudo.inplane_views),
            "seed": int(self.cfg.seed), "val_dice_student": round(student_dice, 4), "val_dice_refined": round(scores[best], 4),
            "growth_scores": {f"{g:g}": round(d, 4) for g, d in scores.items()}, "validation_cases": len(self.validation),
            "seconds": round(time.time() - t0, 1),
        }
        extra.setdefault("postprocess", {})["refine"] = record
        student.save(path, extra=extra)
        verdict = ("segment applies it" if record["use"] else "not better: segment uses the student alone")
        self._log(f"refinement by the {names[0]} teacher on {len(self.validation)} validation case(s): student {student_dice:.3f}, "
                  f"refined (mask grown {best:g} mm) {scores[best]:.3f}: {verdict} ({record['seconds']:.0f} s)")
        return record

    @staticmethod
    def _pseudo_label_map(per_label: list, shape: Tuple[int, ...]) -> np.ndarray:
        """The label map of per-structure pseudo-labels: structure k where its teachers' mean > 0.5."""
        pred = np.zeros(shape, np.uint8)
        for k, pl in enumerate(per_label, start=1):
            if pl is not None:
                pred[pl.mean > 0.5] = k
        return pred

    def _teacher_dice(self, it: Item, coarse: np.ndarray, growth: float, key: str) -> float:
        """Dice against ``it.label`` of the teachers' pseudo-label prompted by the coarse mask
        grown by ``growth`` mm."""
        per_label = [self.labeler(it.image, grow_mask(coarse == k, growth, self._spacing_zyx(it)), key=f"{key}:{k}")
                     for k in range(1, self.num_labels + 1)]
        pred = self._pseudo_label_map(per_label, it.image.shape)
        return dice_hd95(pred, it.label, self._spacing_zyx(it), self.num_labels, hd95=False)[0]

    def _prompt_growth(self) -> Tuple[float, Dict[str, Any]]:
        """How far (mm) the coarse mask is grown before it prompts the teachers, and the numbers
        behind the choice.

        ``pseudo.prompt_growth`` when set. Otherwise it is chosen on the validation cases at
        every refresh: the same EMA student's coarse mask of each validation case, grown by each
        of :func:`~semisam.pseudo_labels.growth_candidates`, prompts the teachers as an
        unlabeled case's would, and the growth whose pseudo-labels score the best mean Dice
        against the validation labels wins (ties: the smallest change). A student trained on few
        labels tends to stop inside the boundary; a box from such a mask cuts the structure
        off, and the teachers cannot give back what their prompt excludes. The student's bias is
        measured on cases it was not trained on, so the rule adapts to the data set and to the
        student as it improves, instead of a margin fitted to one data set.
        """
        fixed = self.cfg.pseudo.prompt_growth
        if fixed is not None:
            return float(fixed), {"prompt_growth_mm": float(fixed)}
        if not self.validation:
            if not self._warned_growth:
                self._warned_growth = True
                self.progress.message("pseudo.prompt_growth is chosen on validation cases and there are none: the coarse mask "
                                      "prompts the teachers as it is (set pseudo.prompt_growth in mm, or add validation cases)", "warning")
            return 0.0, {"prompt_growth_mm": 0.0}
        t0 = time.time()
        coarse = [self._coarse(it) for it in self.validation]
        coarse_dice = float(np.mean([dice_hd95(c.astype(np.uint8), it.label, self._spacing_zyx(it), self.num_labels, hd95=False)[0]
                                     for it, c in zip(self.validation, coarse)]))
        candidates = growth_candidates(self._spacing_zyx(self.validation[0]))
        tasks = [(g, i) for g in candidates for i in range(len(self.validation))]
        mine = {}
        for n, (g, i) in enumerate(tasks):  # each rank a share of the teacher runs, as for the unlabeled cases
            if n % self.dist.world == self.dist.rank:
                it = self.validation[i]
                mine[(g, i)] = self._teacher_dice(it, coarse[i], g, f"validation:{it.id}")
        dice: Dict[Tuple[float, int], float] = {}
        for part in self.dist.gather(mine):
            dice.update(part)
        scores = {g: float(np.mean([dice[(g, i)] for i in range(len(self.validation))])) for g in candidates}
        best = max(scores, key=lambda g: (scores[g], -abs(g)))  # candidates come smallest change first
        return best, {
            "prompt_growth_mm": best, "val_coarse_dice": round(coarse_dice, 4), "val_pseudo_dice": round(scores[best], 4),
            "val_pseudo_dice_ungrown": round(scores.get(0.0, float("nan")), 4),
            "growth_scores": {f"{g:g}": round(v, 4) for g, v in scores.items()}, "growth_seconds": round(time.time() - t0, 1),
        }

    def _pseudo_stats(self, it: Item, per_label: list, coarse: np.ndarray) -> Dict[str, Any]:
        """Per unlabeled case: how many structures got no pseudo-label, the confident fraction
        over the volume and inside the union of the coarse mask and the pseudo-label (where the
        teachers have something to say; outside it every prediction is 0 and trivially agreed),
        and, when the case has a reference label, the Dice of the pseudo-label (the teachers'
        mean > 0.5) and of the coarse mask that prompted them."""
        empty = sum(pl is None for pl in per_label)
        conf = [float(pl.confidence.mean()) for pl in per_label if pl is not None]
        inside = []
        pred = self._pseudo_label_map(per_label, it.image.shape)
        for k, pl in enumerate(per_label, start=1):
            if pl is None:
                continue
            union = (pl.mean > 0.5) | (coarse == k)
            if union.any():
                inside.append(float(pl.confidence[union].mean()))
        dice = coarse_dice = None
        if it.reference is not None:
            spacing = self._spacing_zyx(it)
            dice = dice_hd95(pred, it.reference, spacing, self.num_labels, hd95=False)[0]
            coarse_dice = dice_hd95(coarse.astype(np.uint8), it.reference, spacing, self.num_labels, hd95=False)[0]
        return {"empty": empty, "confident_fraction": _mean(conf), "confident_fraction_in_union": _mean(inside),
                "dice": dice, "coarse_dice": coarse_dice}

    def _load_stored_pseudo(self) -> None:
        for it in self.unlabeled:
            try:
                self.pseudo[it.id] = [self.store.get(f"{it.id}:{k}")[0] for k in range(1, self.num_labels + 1)]
            except KeyError:
                continue

    # -------------------------------------------------------------- training

    def _targets(self, item: Item) -> Dict[str, torch.Tensor]:
        """Per-case target tensors on the training grid (cached)."""
        cache = self._target_cache.get(item.id)
        if cache is not None and cache.get("pseudo_epoch") == self._pseudo_version.get(item.id):
            return cache
        out: Dict[str, torch.Tensor] = {"pseudo_epoch": self._pseudo_version.get(item.id)}  # type: ignore[dict-item]
        if item.label is not None:
            out["label"] = torch.from_numpy(item.label)
        per_label = self.pseudo.get(item.id)
        if per_label is not None and any(pl is not None for pl in per_label):
            shape = (len(per_label), *item.image.shape)
            prob, conf = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            for k, pl in enumerate(per_label):
                if pl is not None:
                    prob[k], conf[k] = pl.probability, pl.confidence
            out["pseudo"], out["conf"] = torch.from_numpy(prob), torch.from_numpy(conf)
        self._target_cache[item.id] = out
        return out

    def _tile(self, item: Item, rng: np.random.Generator) -> Tuple[Item, Dict[str, torch.Tensor]]:
        """One in-plane tile of a case with its targets: a third of the draws (nnU-Net's rule)
        among the tiles holding foreground (a labeled case's label, an unlabeled case's
        pseudo-label), the rest uniformly. A one-tile case is returned whole."""
        targets = self._targets(item)
        lattice = item.tile_list()
        if len(lattice) == 1:
            return item, targets
        fg = self._fg_tiles.get(item.id)
        if fg is None or fg[0] != targets.get("pseudo_epoch"):
            mask = targets["label"] > 0 if "label" in targets else (targets["pseudo"] > 0.5).any(0) if "pseudo" in targets else None
            fg = (targets.get("pseudo_epoch"), [t for t, tile in enumerate(lattice) if mask is not None and bool(mask[(slice(None), *tile.window)].any())])
            self._fg_tiles[item.id] = fg
        t = int(rng.choice(fg[1])) if fg[1] and rng.random() < 1.0 / 3.0 else int(rng.integers(len(lattice)))
        win = (Ellipsis, *lattice[t].window)
        return item.tile_view(t), {k: (v[win] if isinstance(v, torch.Tensor) else v) for k, v in targets.items()}

    def _run_epoch(self, phase: int, epoch: int, global_epoch: int, lr0: float, opt_steps: int, total_opt_steps: int, semi_start: int) -> Tuple[Dict[str, float], int, float, float]:
        cfg = self.cfg
        items = self.labeled + (self.unlabeled if phase > 0 else [])
        n_u = len(self.unlabeled) if phase > 0 else 0
        sampler = MixedBatchSampler(len(self.labeled), n_u, cfg.data.batch_size, cfg.data.labeled_fraction, cfg.seed, self.dist.rank, self.dist.world)
        sampler.set_epoch(global_epoch)
        rng = np.random.default_rng([cfg.seed, global_epoch, self.dist.rank])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        block = min([cfg.student.block_depth] + [it.image.shape[0] for it in items])
        first = self.labeled[0].tile_view(0)  # every tile has the student's in-plane size
        full_size = tuple(first.image.shape[1:])
        grid = tuple(int(v) for v in first.emb.shape[-2:])
        square = full_size[0] == full_size[1] and grid[0] == grid[1]
        accum = cfg.optim.grad_accumulation
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        lam = beta = 0.0
        self.student.train()
        batches = list(sampler)
        for step, batch in enumerate(batches):
            self._seen.append((global_epoch, [items[idx].id for idx in batch]))
            t_semi = (global_epoch - 1 - semi_start) + step / max(len(batches), 1)  # epochs since phase 1 began
            lam = consistency_weight(t_semi, cfg.loss.lambda_max, cfg.loss.ramp_up) if phase > 0 else 0.0
            beta = pseudo_weight(t_semi, cfg.loss.beta_max, cfg.loss.ramp_down) if phase > 0 else 0.0
            xs, imgs, labels, pseudo, conf, is_lab, has_pseudo = [], [], [], [], [], [], []
            for idx in batch:
                it, targets = self._tile(items[idx], rng)
                geo = draw_geometry(rng, it.image.shape[0], block, cfg, square, grid, full_size)
                sample = block_sample(it, targets, geo, block, self.student.config.num_labels, self.student.uses_image)
                xs.append(sample.x)
                if sample.image is not None:
                    imgs.append(sample.image)
                is_lab.append(sample.labeled)
                has_pseudo.append(sample.has_pseudo)
                labels.append(sample.label)
                pseudo.append(sample.pseudo)
                conf.append(sample.conf)
                out_size = tuple(sample.label.shape[1:])  # crops of one size: the same for every block
            x = torch.stack(xs).to(self.device)
            x_s = perturb(x, cfg.augment.feature_noise, cfg.augment.feature_dropout, gen)
            img = torch.stack(imgs).to(self.device) if imgs else None
            micro = step % accum
            last_micro = micro == accum - 1 or step == len(batches) - 1
            sync = self.model.no_sync() if (self.dist.enabled and not last_micro) else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    logits = self.model(x_s, out_size, img)
                logits = logits.float()
                probs = self.student.probabilities(logits)
                lab_mask = torch.tensor(is_lab)
                terms: Dict[str, torch.Tensor] = {}
                if lab_mask.any():
                    y = torch.stack(labels)[:, None].to(self.device)
                    terms["sup"] = self.sup_loss(logits[lab_mask.to(self.device)], y[lab_mask.to(self.device)])
                if phase > 0 and cfg.loss.lambda_max > 0:
                    with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                        p_t = self.student.probabilities(self.ema.model(x, out_size, img).float())
                    terms["con"] = consistency_loss(probs, p_t)
                if phase > 0:
                    hp = torch.tensor(has_pseudo)
                    if hp.any():
                        fg = _structure_probs(probs)[hp.to(self.device)]
                        rs = pseudo_label_loss(fg, torch.stack(pseudo)[hp].to(self.device), torch.stack(conf)[hp].to(self.device),
                                               cfg.loss.pseudo_loss, cfg.loss.dice_weight, cfg.loss.ce_weight)
                        if rs is not None:
                            terms["rs_con"] = rs
                zero = logits.sum() * 0.0  # keeps every parameter in the graph (DDP)
                total = terms.get("sup", zero) + lam * terms.get("con", zero) + beta * terms.get("rs_con", zero)
                if not bool(torch.isfinite(total)):
                    bad = ", ".join(f"{k} {float(v)}" for k, v in terms.items() if not bool(torch.isfinite(v))) or f"logits {float(logits.abs().max())}"
                    raise SemiSAMError(
                        f"the loss is not finite in {cfg.phase_list()[phase][1]} epoch {epoch + 1}, step {step + 1} ({bad}); training stopped "
                        f"and {self.out / 'last.pt'} keeps the last finished epoch. Try a lower phases.{cfg.phase_list()[phase][1]}.lr, "
                        f"optim.amp: off, or a training grid with at least student.block_depth ({cfg.student.block_depth}) slices "
                        f"(preprocess.target_shape, now {tuple(cfg.preprocess.target_shape)})")
                loss = total / accum
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            if last_micro:
                lr = lr0 * (1.0 - min(opt_steps, total_opt_steps - 1) / max(total_opt_steps, 1)) ** cfg.optim.poly_power
                for grp in self.optimizer.param_groups:
                    grp["lr"] = lr
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.grad_clip)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.student)
                opt_steps += 1
            values = {"total": float(total.detach())}
            values.update({k: float(v.detach()) for k, v in terms.items()})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if self.dist.main:
                self.progress.step(phase, epoch, step, values, lam, beta, self.optimizer.param_groups[0]["lr"])
        means = {k: sums[k] / counts[k] for k in sums}
        if self.dist.enabled:  # average the epoch's loss terms over ranks (for the log)
            keys = sorted(set().union(*[set(m) for m in self.dist.gather(means)]))
            t = torch.tensor([means.get(k, float("nan")) for k in keys], dtype=torch.float64)
            parts = self.dist.gather(t)
            stacked = torch.stack(parts)
            means = {k: float(torch.nanmean(stacked[:, i])) for i, k in enumerate(keys)}
        return means, opt_steps, lam, beta

    def _validate(self) -> Tuple[Optional[float], Optional[float]]:
        if not self.validation:
            return None, None
        dices, hds = [], []
        self._val_probs = []
        for it in self.validation:
            probs = self._infer(self.ema.model, it)
            if self.cfg.validation.calibrate_threshold and probs.shape[0] == 1:
                self._val_probs.append((probs[0].numpy(), it.label))
            pred = probs_to_label(probs)
            if self.cfg.validation.largest_component:
                pred = keep_largest_component(pred)
            d, h = dice_hd95(pred, it.label, self._spacing_zyx(it), self.num_labels, self.cfg.validation.hd95)
            dices.append(d)
            if h is not None:
                hds.append(h)
        return float(np.mean(dices)), (float(np.mean(hds)) if hds else None)

    @staticmethod
    def _spacing_zyx(it: Item) -> Tuple[float, float, float]:
        return tuple(float(s) for s in it.spacing[::-1])

    def steps_per_epoch(self, phase: int) -> int:
        n_u = len(self.unlabeled) if phase > 0 else 0
        return len(MixedBatchSampler(len(self.labeled), n_u, self.cfg.data.batch_size, self.cfg.data.labeled_fraction, self.cfg.seed, self.dist.rank, self.dist.world))

    def run(self) -> Dict[str, Any]:
        if self.out.exists() and not self.out.is_dir():
            raise SemiSAMError(f"output {self.out} exists and is not a folder")
        self.progress = Progress(self.progress_mode if self.dist.main else "none", stream=self.stream)
        with self.progress:  # an exception escaping set-up or training ends with a "failed" line
            lock = RunLock(self.out).acquire() if self.dist.main else None  # one live run per folder
            try:
                if lock is not None and lock.previous:
                    self._log(f"took over the run lock left by a run that is no longer running ({lock.previous})")
                return self._run()
            finally:
                if lock is not None:
                    lock.release()

    def _run(self) -> Dict[str, Any]:
        self._check_output()
        self.dist.barrier()
        self._load_data()
        if not self.labeled:
            raise SemiSAMError("no labeled training cases (all went to validation?): add labeled cases or set data.validation: 0")
        self._embed_all()
        self._build_student()
        self.best: Dict[str, Any] = {"dice": None, "global_epoch": 0}
        self._val_probs: List[Tuple[np.ndarray, np.ndarray]] = []  # (probability, label) per validation case, last validation
        self.teachers = None
        self._warned_growth = False
        self.pseudo: Dict[str, list] = {}
        self._pseudo_version: Dict[str, int] = {}
        self._target_cache: Dict[str, Dict[str, torch.Tensor]] = {}
        self._fg_tiles: Dict[str, Tuple[Any, List[int]]] = {}  # per case: (pseudo-label version, tiles holding foreground)
        self._seen: List[Tuple[int, List[str]]] = []  # (global epoch, case ids) per batch, this process
        from .pseudo_labels import PseudoLabelStore

        self.store = PseudoLabelStore(self.out / "pseudo_labels")
        state = self._load_state() if self.resume else None
        if self.resume and state is None:
            self._log(f"nothing to resume in {self.out} (no last.pt): starting from the beginning", "warning")
        self.progress.set_plan([(p, name, ph.epochs, self.steps_per_epoch(p)) for p, name, ph in self.cfg.phase_list()])
        return self._train(state)

    def _train(self, state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        cfg = self.cfg
        metrics = MetricsLog(self.out / "metrics.jsonl")
        start_phase, start_epoch, global_epoch, opt_steps = 0, 0, 0, 0
        resumed_message = None
        if state is not None:
            start_phase, start_epoch, global_epoch, opt_steps = state["phase"], state["epochs_done"], state["global_epoch"], state["opt_steps"]
            if self.dist.main:
                dropped = metrics.truncate(lambda r: int(r.get("global_epoch", 0)) <= global_epoch)
                resumed_message = f"resumed after epoch {global_epoch} (phase {start_phase}, {start_epoch} epoch(s) done); dropped {dropped} record(s) of the unfinished epoch"
            self._load_stored_pseudo()
        elif self.dist.main:
            metrics.truncate(lambda r: False)
            write_config(self.out / "config.yaml", cfg, overwrite=True)
        semi_start = sum(ph.epochs for _, _, ph in cfg.phase_list()[:1])
        self._last_plot = 0.0
        self._best_later: Optional[float] = None
        if self.unlabeled and cfg.loss.lambda_max > 0 and 0 < cfg.phases.semi.epochs < cfg.loss.ramp_up:
            self._log(f"loss.ramp_up ({cfg.loss.ramp_up:g} epochs) is longer than phase 1 ({cfg.phases.semi.epochs} epochs): "
                      f"lambda reaches only {consistency_weight(cfg.phases.semi.epochs, cfg.loss.lambda_max, cfg.loss.ramp_up):.3g} "
                      f"of lambda_max {cfg.loss.lambda_max:g} there; shorten loss.ramp_up or lengthen phases.semi.epochs", "warning")
        t_start = time.time()
        if self.dist.main:
            self.progress.start(output=str(self.out), world_size=self.dist.world, device=str(self.device), resumed=state is not None)
            if resumed_message:
                self.progress.message(resumed_message)
        for phase, _name, ph in cfg.phase_list():
            if phase < start_phase or ph.epochs == 0:
                continue
            first = start_epoch if phase == start_phase else 0
            if first >= ph.epochs:
                continue
            if phase != start_phase:
                opt_steps = 0  # optimizer steps count within a phase (poly schedule)
            if self.dist.main:
                self.progress.phase_start(phase, first)
            steps = self.steps_per_epoch(phase)
            total_opt = ph.epochs * math.ceil(steps / cfg.optim.grad_accumulation)
            for epoch in range(first, ph.epochs):
                t0 = time.time()
                global_epoch += 1
                pseudo_info = None
                if phase >= 1 and self.unlabeled and self.cfg.pseudo.teachers and self.cfg.loss.beta_max > 0:
                    t_epoch = global_epoch - 1 - semi_start
                    if phase == 1:
                        pseudo_info = self._refresh_pseudo(t_epoch, force=False)
                    elif not self.pseudo:  # phase 2 without a phase 1: compute them once
                        pseudo_info = self._refresh_pseudo(t_epoch, force=True)
                    if pseudo_info:
                        for cid in self.pseudo:
                            self._pseudo_version[cid] = global_epoch
                losses, opt_steps, lam, beta = self._run_epoch(phase, epoch, global_epoch, ph.lr, opt_steps, total_opt, semi_start)
                record: Dict[str, Any] = {"phase": phase, "epoch": epoch, "global_epoch": global_epoch, "losses": losses,
                                          "lambda": lam, "beta": beta, "lr": self.optimizer.param_groups[0]["lr"]}
                if pseudo_info:
                    record["pseudo"] = pseudo_info
                if self.dist.main:
                    validate = (epoch + 1) % cfg.validation.every == 0 or epoch == ph.epochs - 1
                    if validate:
                        dice, hd = self._validate()
                        record["val_dice"], record["val_hd95"] = dice, hd
                        if phase > 0 and dice is not None:
                            self._best_later = max(self._best_later or 0.0, dice)
                        better = dice is None or self.best["dice"] is None or dice > self.best["dice"]
                        if better:
                            self.best = {"dice": dice, "global_epoch": global_epoch, "phase": phase}
                            self._save_best(dice, phase, global_epoch)
                    record["time_s"] = round(time.time() - t0, 2)
                    # last.pt first: a Stop that arrives once the epoch's line is out loses nothing
                    self._save_state(self._state(phase, epoch + 1, global_epoch, opt_steps))
                    record = self.progress.epoch(record)
                    metrics.append(record)
                    if epoch == ph.epochs - 1 or time.time() - self._last_plot > 30.0:  # drawing costs ~0.5 s
                        self._plot(metrics)
                self.dist.barrier()
            if self.dist.main:
                self.progress.phase_end(phase)
                if phase == 0:
                    self._snapshot_warmup()
        summary = {
            "best_checkpoint": str(self.out / "best.pt"), "best_val_dice": self.best.get("dice"),
            "best_global_epoch": self.best.get("global_epoch"), "epochs": global_epoch,
            "seconds": round(time.time() - t_start, 1), "output": str(self.out),
        }
        if self.dist.main:
            if not (self.out / "best.pt").exists():
                self._save_best(None, start_phase, global_epoch)
            refine = self._calibrate_refinement()
            if refine is not None:
                summary["refine"] = {k: refine[k] for k in ("use", "growth_mm", "val_dice_student", "val_dice_refined")}
            if self.best.get("phase") == 0 and self._best_later is not None and self.best.get("dice") is not None:
                self._log(f"best.pt is the warm-up checkpoint (epoch {self.best['global_epoch']}, validation Dice {self.best['dice']:.3f}): "
                          f"no later epoch beat it on validation (best later {self._best_later:.3f}); the unlabeled data did not help this run", "warning")
            summary["best_phase"] = self.best.get("phase")
            self.progress.final("finished", **summary)
        dump = os.environ.get("SEMISAM_DEBUG_DUMP")
        if dump:  # for tests: what this process saw and the weights it ended with
            _atomic_torch_save({"student": self.student.state_dict(), "ema": self.ema.model.state_dict(), "seen": self._seen},
                               Path(dump) / f"rank{self.dist.rank}.pt")
        self.dist.barrier()
        return summary


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(7))  # 0.30 .. 0.60


def calibrate_threshold(cases: Sequence[Tuple[np.ndarray, np.ndarray]], largest_component: bool = False,
                        thresholds: Sequence[float] = THRESHOLDS) -> Tuple[float, float]:
    """The foreground threshold with the best mean Dice over ``cases`` ((probability, label)
    pairs of one structure on one grid) and that Dice. Ties go to the threshold nearest 0.5,
    so a flat optimum keeps the usual one."""
    if not cases:
        raise ValueError("calibrate_threshold needs at least one (probability, label) case")
    best: Optional[Tuple[float, float]] = None
    for th in sorted(thresholds, key=lambda t: (abs(t - 0.5), t)):
        scores = []
        for prob, label in cases:
            pred = (np.asarray(prob) > th).astype(np.uint8)
            if largest_component:
                pred = keep_largest_component(pred)
            scores.append(dice_hd95(pred, (np.asarray(label) > 0).astype(np.uint8), (1.0, 1.0, 1.0), 1, hd95=False)[0])
        mean = float(np.mean(scores))
        if best is None or mean > best[1] + 1e-9:
            best = (float(th), mean)
    return best


def probs_to_label(probs: torch.Tensor) -> np.ndarray:
    """(K', D, H, W) probabilities -> uint8 label map (threshold 0.5 for one structure, argmax else)."""
    if probs.shape[0] == 1:
        return (probs[0] > 0.5).numpy().astype(np.uint8)
    return probs.argmax(0).numpy().astype(np.uint8)


def _structure_probs(probs: torch.Tensor) -> torch.Tensor:
    """(B, K', ...) -> per-structure foreground probabilities (B, K, ...)."""
    return probs if probs.shape[1] == 1 else probs[:, 1:]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def train(cfg: TrainConfig, progress: str = "auto", resume: bool = False, stream=None) -> Dict[str, Any]:
    """Run a training as configured (see :class:`Trainer`)."""
    return Trainer(cfg, progress, resume, stream).run()
