"""The model side of the SemiSAM effect (Qt-free; lives on the effect's worker thread).

:class:`Refiner` owns an :class:`semisam.interactive.InteractiveSession` (LiteMedSAM, shipped:
embed each slice once, then every click or box is a cheap mask-decoder call) and, when a
MedSAM2 checkpoint is configured, a MedSAM2 teacher for 3D propagation. Without MedSAM2,
propagation runs LiteMedSAM slice by slice from the previous slice's mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

#: Slices on each side of the shown one that the idle worker embeds ahead of a click.
PREFETCH_RADIUS = 2


def prefetch_order(index: int, count: int, radius: int = PREFETCH_RADIUS) -> List[int]:
    """The slices to embed ahead, nearest first: ``index``, ``index + 1``, ``index - 1``,
    ``index + 2`` ... up to ``radius`` away, within ``0 .. count - 1``."""
    order = [index]
    for d in range(1, radius + 1):
        order += [index + d, index - d]
    return [i for i in order if 0 <= i < count]


def medsam2_checkpoint() -> Optional[Path]:
    """The configured MedSAM2 checkpoint (models folder), or None."""
    from semisam.models.registry import catalogue, checkpoint_path

    entry = catalogue().get("medsam2")
    return checkpoint_path(entry) if entry is not None else None


class Refiner:
    """Clicks, boxes and propagation on one source volume.

    Args:
        device: torch device for the models.
        session: an InteractiveSession to use (default: the shipped LiteMedSAM).
        medsam2: a MedSAM2 teacher object, ``"auto"`` (the models folder's checkpoint when
            present) or None (LiteMedSAM propagation only).
        backend: the encoder's runtime (``auto``, ``openvino``, ``onnxruntime``, ``torch``);
            one that is missing or fails to load is replaced by torch with one log line.
    """

    def __init__(self, device: str = "cpu", session=None, medsam2="auto", backend: str = "auto"):
        self.device = device
        if session is None:
            from semisam.interactive import InteractiveSession

            from .logic import log_fallback

            session = InteractiveSession(device=device, backend=backend, fallback=log_fallback)
        self.session = session
        if medsam2 == "auto":
            path = medsam2_checkpoint()
            if path is not None:
                from semisam.models.teacher_medsam2 import MedSAM2Teacher

                medsam2 = MedSAM2Teacher(path, device=device)
            else:
                medsam2 = None
        self.medsam2 = medsam2
        self.image: Optional[np.ndarray] = None
        self.key: Optional[object] = None

    @property
    def propagator(self) -> str:
        """Which model propagates: "medsam2" or "litemedsam"."""
        return "medsam2" if self.medsam2 is not None else "litemedsam"

    def set_volume(self, array: np.ndarray, spacing: Sequence[float], key: object = None) -> None:
        """Use this source volume (``(z, y, x)`` raw intensities, spacing (x, y, z) mm). Calling
        again with the same ``key`` keeps the cached slice embeddings."""
        if key is not None and key == self.key and self.image is not None:
            return
        self.image = np.asarray(array, np.float32)
        self.session.set_image(self.image, spacing)
        self.key = key

    def predict(self, axis: int, index: int, clicks, box=None, previous=None) -> np.ndarray:
        """The mask of one slice for the plane's prompts (see ``InteractiveSession.predict``)."""
        if self.image is None:
            raise ValueError("no source volume yet: select a source volume in the Segment Editor")
        return self.session.predict(axis, index, clicks, box=box, previous=previous)

    def prefetch(self, axis: int, index: int, cancel: Optional[Callable[[], bool]] = None, radius: int = PREFETCH_RADIUS) -> int:
        """Embed the slice ``index`` along ``axis`` and its neighbours (:func:`prefetch_order`)
        ahead of a click; stops when ``cancel()`` is True. Returns how many it embedded (0
        without a volume)."""
        if self.image is None:
            return 0
        order = prefetch_order(int(index), self.image.shape[int(axis)], radius)
        return self.session.prefetch(axis, order, cancel=cancel)

    def propagate(self, axis: int, index: int, mask: np.ndarray, slices: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
        """A 3D mask grown from ``mask`` on slice ``index`` along ``axis``: ``slices`` neighbours
        each way (None: the whole volume). Returns ``(z, y, x)`` bool."""
        if self.image is None:
            raise ValueError("no source volume yet: select a source volume in the Segment Editor")
        mask = np.asarray(mask, bool)
        if not mask.any():
            raise ValueError("nothing to propagate: the slice's mask is empty (click or draw a box first)")
        if self.medsam2 is None:
            return self.session.propagate(axis, index, mask, direction="both", max_slices=slices, progress=progress, cancel=cancel)
        return self._propagate_medsam2(axis, index, mask, slices, progress, cancel)

    def _propagate_medsam2(self, axis, index, mask, slices, progress, cancel) -> np.ndarray:
        from semisam.models.prompts import Prompts

        volume = np.moveaxis(self.image, axis, 0)  # MedSAM2 tracks along the first axis
        lo, hi = 0, volume.shape[0] - 1
        if slices is not None:
            lo, hi = max(0, index - slices), min(volume.shape[0] - 1, index + slices)
        sub = volume[lo : hi + 1]
        key_mask = np.zeros(sub.shape, bool)
        key_mask[index - lo] = mask
        if cancel is not None and cancel():
            from semisam.inference import Cancelled

            raise Cancelled("propagation cancelled")
        state = self.medsam2.prepare(_unit(sub))
        if progress is not None:
            progress(0, sub.shape[0])
        prob = self.medsam2.predict(state, Prompts(mask=key_mask))
        if progress is not None:
            progress(sub.shape[0], sub.shape[0])
        out = np.zeros(volume.shape, bool)
        out[lo : hi + 1] = prob > 0.5
        out[index] |= mask
        return np.moveaxis(out, 0, axis)


def _unit(array: np.ndarray) -> np.ndarray:
    """Robust [0, 1] intensities (what the teachers expect), with semisam's own normaliser."""
    from semisam.preprocess import normalise

    return normalise(array)[0]
