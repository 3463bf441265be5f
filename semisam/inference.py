"""Segment a volume with a trained student: preprocess, embed (cached), decode blockwise, invert.

Every output is written on the input's grid (shape, spacing, origin, direction).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

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


def _foreground(probs: torch.Tensor) -> torch.Tensor:
    """(K', D, H, W) -> foreground probability (D, H, W)."""
    return probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]


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
) -> Segmentation:
    """One-click segmentation of ``volume``.

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
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if student.config.encoder != encoder.name:
        raise ValueError(f"the student was trained on '{student.config.encoder}' embeddings, not '{encoder.name}'")
    if student.config.encoder_id and student.config.encoder_id != encoder.weights_id:
        raise ValueError(
            f"the student was trained on embeddings of other '{encoder.name}' weights "
            f"({student.config.encoder_id}, given {encoder.weights_id}); pass the encoder checkpoint it was trained with"
        )
    cache = cache or EmbeddingCache()
    pre, record = preprocess(volume, preprocess_config or PreprocessConfig())
    emb = cache.embed(pre.array, encoder).float().permute(1, 0, 2, 3)  # (C, D, G, G)
    size = pre.shape[1:]
    image = torch.from_numpy(np.ascontiguousarray(pre.array, dtype=np.float32)) if student.uses_image else None
    probs = student.infer(emb, size, device, image)
    views = [probs]
    if tta or uncertainty:
        for dims in ((1,), (2,), (3,)):  # depth, rows, columns of (C, D, G, G) and of (K', D, H, W)
            flipped = None if image is None else torch.flip(image, (dims[0] - 1,))  # the same axis of (D, H, W)
            views.append(torch.flip(student.infer(torch.flip(emb, dims), size, device, flipped), dims))
    if tta:
        probs = torch.stack(views).mean(dim=0)
    # Probabilities go back to the input grid (linear) and are thresholded there: smoother
    # boundaries than resampling a label map with nearest neighbours (worth +0.005..0.08 Dice
    # on phantoms whose elevation spacing is finer than the training grid's).
    fg = invert(record, _foreground(probs).numpy(), "probability")
    if probs.shape[0] == 1:
        label = (fg.array > float(threshold)).astype(np.uint8)
    else:
        channels = invert(record, probs.numpy(), "probability")
        label = np.stack([c.array for c in channels]).argmax(0).astype(np.uint8)
    if largest_component:
        label = keep_largest_component(label)
    result = Segmentation(label=fg.with_array(label), probability=fg)
    if uncertainty:
        var = torch.stack([_foreground(v) for v in views]).var(dim=0, unbiased=False)
        result.uncertainty = invert(record, var.numpy().astype(np.float32), "probability")
    return result


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
                 backend: str = "auto", fallback: Optional[Callable[[str], None]] = None):
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

    @property
    def labels(self) -> Dict[int, str]:
        """Structure names 1..K recorded at training (``{1: "structure 1"}``-style when none were)."""
        names = {int(k): str(v) for k, v in dict(self.extra.get("labels", {})).items() if int(k) > 0}
        for k in range(1, self.student.config.num_labels + 1):
            names.setdefault(k, f"structure {k}")
        return names

    def crop_warning(self, volume: Volume) -> Optional[str]:
        """A sentence when the input is larger than the crop the model sees, else None."""
        config = self.preprocess_config
        extent = [n * sp for n, sp in zip(volume.size_xyz, volume.spacing)]
        crop = [n * sp for n, sp in zip(config.target_shape[::-1], config.target_spacing)]
        if any(e > c + 1e-6 for e, c in zip(extent, crop)) and volume.shape[0] > 1:
            return (f"the input spans {' x '.join(f'{e:.0f}' for e in extent)} mm but the model sees a "
                    f"{' x '.join(f'{c:.0f}' for c in crop)} mm crop around the field of view; outside it the output is background")
        return None

    def segment(self, volume: Volume, uncertainty: bool = False, largest_component: Optional[bool] = None, tta: bool = False,
                progress: Optional[Callable[[int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None,
                chunk: int = 8) -> Segmentation:
        """Segment ``volume`` (outputs on its grid). ``progress(done, total)`` counts encoded
        slices; ``cancel()`` is polled between chunks of slices and raises :class:`Cancelled`."""
        warning = self.crop_warning(volume)
        if warning:
            self.warn(warning)
        pre, _ = preprocess(volume, self.preprocess_config)
        depth = pre.shape[0]
        for start in range(0, depth, chunk):  # embed chunk by chunk: progress and a chance to cancel
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            self.cache.embed(pre.array, self.encoder, slices=range(start, min(depth, start + chunk)))
            if progress is not None:
                progress(min(depth, start + chunk), depth)
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        largest = self.largest_component if largest_component is None else largest_component
        return segment_volume(volume, self.student, self.encoder, self.preprocess_config, self.cache, uncertainty=uncertainty,
                              device=self.device, largest_component=largest, tta=tta, threshold=self.threshold)
