"""Segment a volume with a trained student: preprocess, embed (cached), decode blockwise, invert.

Every output is written on the input's grid (shape, spacing, origin, direction).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .errors import Cancelled, SemiSAMError
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
    grid: Optional[Tuple[int, int, int]] = None  # the preprocessed grid (z, y, x) the student decoded
    tiles: int = 1  # in-plane tiles per slice of that grid
    refined: bool = False  # the teachers refined the student's mask (Refiner)
    student_label: Optional[Volume] = None  # when refined: the student's own label map on the input grid


def _foreground(probs: torch.Tensor) -> torch.Tensor:
    """(K', D, H, W) -> foreground probability (D, H, W)."""
    return probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]


def whole_fov(config: PreprocessConfig) -> PreprocessConfig:
    """The inference grid of a student trained with ``config``: the same spacing, grown to cover
    the input's whole field of view (``crop="whole"``), tiled in-plane by the trained tile
    ``config.target_shape[1:]``."""
    return replace(config, crop="whole")


def _check_student(student: SlicingSAM3D, encoder: SliceEncoder) -> None:
    if student.config.encoder != encoder.name:
        raise ValueError(f"the student was trained on '{student.config.encoder}' embeddings, not '{encoder.name}'")
    if student.config.encoder_id and student.config.encoder_id != encoder.weights_id:
        raise ValueError(
            f"the student was trained on embeddings of other '{encoder.name}' weights "
            f"({student.config.encoder_id}, given {encoder.weights_id}); pass the encoder checkpoint it was trained with"
        )


def tiled_probabilities(
    image: np.ndarray,
    student: SlicingSAM3D,
    encoder: SliceEncoder,
    cache: EmbeddingCache,
    tile_hw: Tuple[int, int],
    overlap: float,
    device: str = "cpu",
    flips: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Student probabilities ``(V, K', D, H, W)`` on a preprocessed grid ``image`` (D, H, W):
    each in-plane tile (:func:`semisam.tiling.tiles`) is embedded (cached, ``chunk`` slices at a
    time: ``progress(done, total)`` counts slice-tiles, ``cancel()`` is polled between chunks),
    decoded blockwise over depth and blended. V = 1, or 4 with ``flips`` (the plain view, then
    depth, rows and columns flipped and flipped back)."""
    from .tiling import blend, tile_stack, tiles

    lattice = tiles(image.shape[1:], tile_hw, overlap)
    depth = int(image.shape[0])
    total = depth * len(lattice)
    done = [0]

    def compute(tile) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            stack = tile_stack(image, tile)
            for start in range(0, depth, chunk):  # embed chunk by chunk: progress and a chance to cancel
                if cancel is not None and cancel():
                    raise Cancelled("segmentation cancelled")
                cache.embed(stack, encoder, slices=range(start, min(depth, start + chunk)))
                done[0] += min(depth, start + chunk) - start
                if progress is not None:
                    progress(done[0], total)
            emb = cache.embed(stack, encoder).float().permute(1, 0, 2, 3)  # (C, D, G, G)
            size = stack.shape[1:]
            img = torch.from_numpy(stack) if student.uses_image else None
            views = [student.infer(emb, size, device, img)]
            if flips:
                for dims in ((1,), (2,), (3,)):  # depth, rows, columns of (C, D, G, G) and of (K', D, H, W)
                    flipped = None if img is None else torch.flip(img, (dims[0] - 1,))  # the same axis of (D, H, W)
                    views.append(torch.flip(student.infer(torch.flip(emb, dims), size, device, flipped), dims))
            return torch.cat(views)  # (V * K', D, h, w)
        return run

    out = blend(image.shape, [(t, compute(t)) for t in lattice], cancel)
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    return out.reshape(4 if flips else 1, -1, *out.shape[1:])


#: Teachers that can refine a student's masks at inference (the shipped LiteMedSAM; others need
#: user-supplied weights at training and at inference alike, and are not wired here).
REFINE_TEACHERS = ("litemedsam",)


def recorded_refinement(extra: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The refinement a student checkpoint records as chosen (``postprocess.refine`` with
    ``use: true``), else None."""
    record = dict(extra.get("postprocess") or {}).get("refine")
    return dict(record) if isinstance(record, dict) and record.get("use") else None


class Refiner:
    """The teachers refining a student's masks, as training chose on its validation cases
    (``postprocess.refine`` in ``best.pt``): each structure's mask on the preprocessed grid,
    grown by ``growth_mm``, prompts the teachers exactly as a coarse mask prompts them for a
    pseudo-label (Algorithm 2: the same views, prompt sets and seed), and the teachers' mean
    probability replaces the student's. Structures with an empty mask stay empty."""

    def __init__(self, labeler: Any, growth_mm: float, record: Optional[Dict[str, Any]] = None):
        self.labeler, self.growth_mm, self.record = labeler, float(growth_mm), dict(record or {})

    @classmethod
    def from_record(cls, record: Dict[str, Any], encoder: SliceEncoder, cache: EmbeddingCache, device: str = "cpu") -> "Refiner":
        """The refiner a checkpoint's ``postprocess.refine`` describes. The LiteMedSAM teacher
        shares ``encoder``'s embeddings when it is LiteMedSAM at the recorded input side."""
        from .models.encoders import build_litemedsam, check_input_size, litemedsam_encoder
        from .models.teacher_litemedsam import LiteMedSAMTeacher
        from .pseudo_labels import PseudoLabeler

        name = record.get("teacher")
        if name not in REFINE_TEACHERS:
            raise SemiSAMError(f"the checkpoint asks for refinement by '{name}', which SemiSAM cannot run at inference "
                               f"(only {', '.join(REFINE_TEACHERS)}); segment with --no-refine")
        side = check_input_size("litemedsam", int(record.get("input_size") or 0)) or 256
        net = build_litemedsam(device=device)
        shared = encoder.name == "litemedsam" and int(encoder.input_size) == side
        enc = encoder if shared else litemedsam_encoder(net, input_size=side)
        teacher = LiteMedSAMTeacher(net=net, encoder=enc, cache=cache, device=device)
        labeler = PseudoLabeler([teacher], n_views=int(record.get("views", 2)), u_th=float(record.get("u_th", 0.1)),
                                inplane=bool(record.get("inplane_views", False)), seed=int(record.get("seed", 0)))
        return cls(labeler, float(record.get("growth_mm", 0.0)), record)

    def __call__(self, image: np.ndarray, label: np.ndarray, spacing_zyx: Tuple[float, float, float], num_labels: int,
                 key: str = "segment") -> np.ndarray:
        """Per-structure teacher probabilities ``(K, D, H, W)`` for the label map ``label`` of
        the preprocessed ``image`` (both ``(D, H, W)``)."""
        from .pseudo_labels import grow_mask

        out = np.zeros((num_labels, *image.shape), np.float32)
        for k in range(1, num_labels + 1):
            mask = label == k
            if not mask.any():
                continue
            pl = self.labeler(image, grow_mask(mask, self.growth_mm, spacing_zyx), key=f"{key}:{k}")
            if pl is not None:
                out[k - 1] = pl.mean
        return out

    def describe(self) -> str:
        r = self.record
        numbers = ""
        if r.get("val_dice_student") is not None and r.get("val_dice_refined") is not None:
            numbers = f" (validation Dice {r['val_dice_student']:.3f} -> {r['val_dice_refined']:.3f})"
        return f"the {r.get('teacher', 'teacher')} teacher refines the student's mask grown by {self.growth_mm:g} mm{numbers}"


def segment_volume(
    volume: Volume,
    student: SlicingSAM3D,
    encoder: SliceEncoder,
    preprocess_config: Optional[PreprocessConfig] = None,
    cache: Optional[EmbeddingCache] = None,
    uncertainty: bool = False,
    device: str = "cpu",
    largest_component: bool = False,
    tta: bool = False,
    threshold: float = 0.5,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    chunk: int = 8,
    refiner: Optional[Refiner] = None,
) -> Segmentation:
    """One-click segmentation of ``volume`` over its whole field of view.

    The volume is resampled to the student's spacing on a grid that covers its whole field of
    view (:func:`whole_fov`), cut into the in-plane tiles the student was trained on
    (``preprocess_config.target_shape[1:]``, overlapping by ``tile_overlap``), and the tiles'
    probabilities are blended (:func:`tiled_probabilities`). Nothing is cropped.

    Args:
        uncertainty: also return the per-voxel variance of the foreground probability over
            test-time flips (depth, rows, columns) of the stacked embeddings. Depth flips are
            exact for a per-slice encoder; in-plane flips perturb the decoder only.
        largest_component: keep only the largest connected component of each structure (for
            structures that are one piece, e.g. an organ; students record it when trained so).
        tta: average the probabilities over the same flips (test-time augmentation; the
            decoder was trained with these flips of its embeddings). Four decoder passes.
        threshold: foreground probability threshold for one structure (students trained with
            ``validation.calibrate_threshold`` record theirs: :func:`recorded_threshold`).
        progress, cancel, chunk: see :func:`tiled_probabilities`.
        refiner: the teachers refine the student's mask (:class:`Refiner`; training records
            whether they do better on its validation cases, :func:`recorded_refinement`). The
            student's label map on the grid (threshold, largest component) prompts them; their
            mean probability is then thresholded at 0.5 instead of the student's.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    _check_student(student, encoder)
    cache = cache or EmbeddingCache()
    config = preprocess_config or PreprocessConfig()
    pre, record = preprocess(volume, whole_fov(config))
    views = tiled_probabilities(pre.array, student, encoder, cache, config.target_shape[1:], config.tile_overlap, device,
                                flips=tta or uncertainty, progress=progress, cancel=cancel, chunk=chunk)
    probs = views.mean(dim=0) if tta else views[0]
    student_label = None
    if refiner is not None:
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        k = probs.shape[0] if probs.shape[0] == 1 else probs.shape[0] - 1  # structures
        grid_label = (probs[0] > float(threshold)).numpy().astype(np.uint8) if probs.shape[0] == 1 else probs.argmax(0).numpy().astype(np.uint8)
        if largest_component:
            grid_label = keep_largest_component(grid_label)
        means = torch.from_numpy(refiner(pre.array, grid_label, tuple(float(v) for v in pre.spacing[::-1]), k))
        student_label = _to_input_grid(record, probs, threshold, largest_component)[0]
        if probs.shape[0] == 1:
            probs = means
        else:  # structure k where its teachers' mean is the largest and > 0.5
            probs = torch.cat([torch.full_like(means[:1], 0.5), means])
            probs = probs / probs.sum(0, keepdim=True).clamp_min(1e-6)
        threshold = 0.5
    label, fg = _to_input_grid(record, probs, threshold, largest_component)
    result = Segmentation(label=label, probability=fg, grid=tuple(int(n) for n in pre.shape),
                          tiles=len(tiles_of(pre.shape, config)), refined=refiner is not None, student_label=student_label)
    if uncertainty:
        var = torch.stack([_foreground(v) for v in views]).var(dim=0, unbiased=False)
        result.uncertainty = invert(record, var.numpy().astype(np.float32), "probability")
    return result


def _to_input_grid(record, probs: torch.Tensor, threshold: float, largest_component: bool) -> Tuple[Volume, Volume]:
    """(label map, foreground probability) on the input's grid from (K', D, H, W) grid probabilities.

    Probabilities go back to the input grid (linear) and are thresholded there: smoother
    boundaries than resampling a label map with nearest neighbours (worth +0.005..0.08 Dice on
    phantoms whose elevation spacing is finer than the training grid's)."""
    fg = invert(record, _foreground(probs).numpy(), "probability")
    if probs.shape[0] == 1:
        label = (fg.array > float(threshold)).astype(np.uint8)
    else:
        channels = invert(record, probs.numpy(), "probability")
        label = np.stack([c.array for c in channels]).argmax(0).astype(np.uint8)
    if largest_component:
        label = keep_largest_component(label)
    return fg.with_array(label), fg


def available_memory() -> Optional[int]:
    """Bytes of memory available now (Linux ``MemAvailable``; else the physical memory from
    ``os.sysconf``), or None where neither can be read."""
    import os

    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def tiles_of(grid_shape: Tuple[int, ...], config: PreprocessConfig) -> list:
    """The in-plane tiles of a preprocessed grid for a student trained with ``config``."""
    from .tiling import tiles

    return tiles(grid_shape[1:], config.target_shape[1:], config.tile_overlap)


def recorded_threshold(extra: Dict[str, Any]) -> float:
    """The foreground threshold a student checkpoint records (``postprocess.threshold``), else 0.5."""
    value = dict(extra.get("postprocess") or {}).get("threshold")
    return 0.5 if value is None else float(value)


def keep_largest_component(label: np.ndarray) -> np.ndarray:
    """Each structure 1..K reduced to its largest 26-connected component (others become 0)."""
    from scipy import ndimage

    out = np.zeros_like(label)
    for k in np.unique(label[label > 0]):
        parts, n = ndimage.label(label == k, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes = np.bincount(parts.ravel())[1:]
            out[parts == int(np.argmax(sizes)) + 1] = k
    return out


def student_encoder(student: SlicingSAM3D, device: str = "cpu", encoder_checkpoint: Optional[str] = None, compile: bool = False,
                    backend: str = "auto", model_cache: Optional[str | Path] = None, fallback: Optional[Callable[[str], None]] = None) -> SliceEncoder:
    """The frozen slice encoder a student was trained on: the shipped LiteMedSAM, or SAM/MedSAM
    ViT-B weights (``encoder_checkpoint`` or the models folder), on ``backend``
    (:func:`semisam.models.backends.accelerated_encoder`; converted encoders kept in ``model_cache``)."""
    from .models.backends import accelerated_encoder
    from .models.encoders import build_sam_vit, litemedsam_encoder, sam_encoder
    from .models.registry import catalogue, checkpoint_path, models_folder

    name = student.config.encoder
    size = student.config.encoder_input_size

    def accelerate(plain: SliceEncoder) -> SliceEncoder:
        return accelerated_encoder(plain, backend, compile=compile, root=model_cache, fallback=fallback)

    if name == "litemedsam" and encoder_checkpoint is None:
        return accelerate(litemedsam_encoder(device=device, input_size=size))
    weights = encoder_checkpoint
    entries = catalogue()
    if weights is None and name in entries:
        weights = checkpoint_path(entries[name])  # the models folder
    if weights is None:
        raise SemiSAMError(f"the student was trained on '{name}' embeddings: pass that encoder's weights (--encoder-checkpoint) or put them in {models_folder()}")
    if name == "litemedsam":
        from .models.encoders import build_litemedsam

        return accelerate(litemedsam_encoder(build_litemedsam(weights, device=device), input_size=size))
    return accelerate(sam_encoder(build_sam_vit(weights, device, name=name), name))


class Segmenter:
    """A loaded student with its encoder, preprocessing and embedding cache: ``segment(volume)``
    many times (the Slicer module keeps one per checkpoint; the CLI makes one per call).

    Args:
        checkpoint: a student checkpoint written by training (``best.pt``).
        encoder_checkpoint: weights of the encoder when the student was not trained on the shipped LiteMedSAM.
        backend: the encoder's runtime: ``auto``, ``torch``, ``openvino`` or ``onnxruntime``
            (:mod:`semisam.models.backends`); its converted model is kept beside the embedding
            cache (:func:`~semisam.models.backends.model_cache_dir`).
        fallback: when given, a runtime that is missing or fails to load is replaced by torch
            and ``fallback`` gets one sentence saying so; else that is an error.
    """

    def __init__(self, checkpoint, device: str = "cpu", encoder_checkpoint: Optional[str] = None, compile: bool = False,
                 cache: Optional[EmbeddingCache] = None, warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr),
                 backend: str = "auto", fallback: Optional[Callable[[str], None]] = None, refine: bool = True):
        from .models.backends import model_cache_dir
        from .models.student import load_student

        self.checkpoint = Path(checkpoint)
        self.device = device
        self.student, self.extra = load_student(self.checkpoint, device)
        cache = cache or EmbeddingCache()
        self.encoder = student_encoder(self.student, device, encoder_checkpoint, compile, backend, model_cache_dir(cache.cache_dir), fallback)
        recorded = self.extra.get("preprocess")
        if isinstance(recorded, dict):
            self.preprocess_config = PreprocessConfig(**recorded)
        else:
            self.preprocess_config = PreprocessConfig()
            warn(f"{checkpoint} records no preprocessing settings; using the defaults")
        self.largest_component = bool(self.extra.get("postprocess", {}).get("largest_component"))
        self.threshold = recorded_threshold(self.extra)
        self.cache = cache
        self.warn = warn
        # the teachers' refinement training chose on its validation cases (``refine=False``: the student alone)
        self.refinement = recorded_refinement(self.extra) if refine else None
        self._refiner: Optional[Refiner] = None

    @property
    def refiner(self) -> Optional[Refiner]:
        """The recorded refinement, built on first use (None when not recorded or turned off)."""
        if self.refinement is not None and self._refiner is None:
            self._refiner = Refiner.from_record(self.refinement, self.encoder, self.cache, self.device)
        return self._refiner

    @property
    def labels(self) -> Dict[int, str]:
        """Structure names 1..K recorded at training (``{1: "structure 1"}``-style when none were)."""
        names = {int(k): str(v) for k, v in dict(self.extra.get("labels", {})).items() if int(k) > 0}
        for k in range(1, self.student.config.num_labels + 1):
            names.setdefault(k, f"structure {k}")
        return names

    def plan(self, volume: Volume) -> Tuple[Tuple[int, int, int], int]:
        """(preprocessed grid (z, y, x), in-plane tiles) a ``segment(volume)`` would decode,
        without reading more than the volume's field of view."""
        from .preprocess import _target_grid

        grid, _ = _target_grid(volume, whole_fov(self.preprocess_config))
        return tuple(grid.shape), len(tiles_of(grid.shape, self.preprocess_config))

    def memory_estimate(self, volume: Volume, uncertainty: bool = False, tta: bool = False) -> Dict[str, Any]:
        """Peak memory (bytes) a ``segment(volume)`` needs, estimated before reading anything more:
        the input and its resampled copies, the grid, every tile's embeddings held by the cache
        (up to its limit), one tile's decoder pass and the blended probabilities."""
        grid, n_tiles = self.plan(volume)
        d, h, w = grid
        th, tw = (min(a, b) for a, b in zip(self.preprocess_config.target_shape[1:], (h, w)))
        g = self.student.config.encoder_input_size or 256
        g = g // 4 if self.student.config.encoder == "litemedsam" else 64
        c = self.student.config.embed_dim
        k = self.student.config.out_channels
        views = 4 if (uncertainty or tta) else 1
        n_in = int(np.prod(volume.shape))
        n_grid = d * h * w
        embeddings = min(d * n_tiles * c * g * g * 2, self.cache.max_memory_bytes)
        parts = {
            "input": 6 * n_in * 4,  # the volume, its normalised copy, SimpleITK's, the probabilities and label back on it
            "grid": 3 * n_grid * 4,
            "embeddings": embeddings + d * c * g * g * 4,  # the cache's fp16 tiles + one tile in float32
            "decoder": views * k * d * th * tw * 4 * 4 + self.student.config.block_depth * max(self.student.config.channels) * th * tw * 4 * 8,
            "probabilities": (views * k + 1) * n_grid * 4,
        }
        return {"bytes": int(sum(parts.values())), "parts": parts, "grid": grid, "tiles": n_tiles}

    def check_memory(self, volume: Volume, uncertainty: bool = False, tta: bool = False) -> None:
        """Refuse, before any work, a volume whose whole field of view would not fit in the
        memory available now (the estimate, the grid and what to change are in the message)."""
        available = available_memory()
        if available is None:
            return
        est = self.memory_estimate(volume, uncertainty, tta)
        if est["bytes"] > available:
            gb = 1 << 30
            raise SemiSAMError(
                f"segmenting this volume whole needs about {est['bytes'] / gb:.1f} GB (input {list(volume.shape)}, grid {list(est['grid'])} "
                f"(z, y, x) at {self.preprocess_config.target_spacing} mm in {est['tiles']} tile(s) per slice) but {available / gb:.1f} GB "
                f"are available. Free memory, crop the volume to the region of interest, or use a student trained at a coarser "
                f"preprocess.target_spacing; nothing was written")

    def segment(self, volume: Volume, uncertainty: bool = False, largest_component: Optional[bool] = None, tta: bool = False,
                progress: Optional[Callable[[int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None,
                chunk: int = 8) -> Segmentation:
        """Segment ``volume`` over its whole field of view (outputs on its grid).
        ``progress(done, total)`` counts encoded slice-tiles; ``cancel()`` is polled between
        chunks of slices and raises :class:`Cancelled`."""
        self.check_memory(volume, uncertainty, tta)
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        largest = self.largest_component if largest_component is None else largest_component
        return segment_volume(volume, self.student, self.encoder, self.preprocess_config, self.cache, uncertainty=uncertainty,
                              device=self.device, largest_component=largest, tta=tta, threshold=self.threshold,
                              progress=progress, cancel=cancel, chunk=chunk, refiner=self.refiner)
