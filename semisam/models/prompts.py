"""Prompts for promptable (teacher) models, in voxel coordinates of the volume they segment.

All coordinates are array indices of the (preprocessed) volume ``[z, y, x]``:

* points: ``(N, 3)`` float array of (z, y, x), with labels 1 (positive / foreground click)
  or 0 (negative / background click). A point lies on slice ``round(z)``.
* 2D boxes: ``(M, 5)`` array of (z, y0, x0, y1, x1), inclusive pixel bounds on slice z.
* a 3D box: (z0, y0, x0, z1, y1, x1), inclusive.
* a mask: ``(z, y, x)`` array in [0, 1] (a coarse segmentation to refine).

Prompts can be derived from a coarse mask (:meth:`Prompts.from_mask`), as Semi-SAM+ does
with the student's coarse mask for unlabeled volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Tuple, Any, runtime_checkable

import numpy as np


@dataclass
class Prompts:
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    boxes2d: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))
    box3d: Optional[Tuple[float, float, float, float, float, float]] = None
    mask: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 3)
        self.point_labels = np.asarray(self.point_labels, dtype=np.int64).reshape(-1)
        self.boxes2d = np.asarray(self.boxes2d, dtype=np.float32).reshape(-1, 5)
        if len(self.points) != len(self.point_labels):
            raise ValueError(f"{len(self.points)} points but {len(self.point_labels)} point labels")
        if len(self.point_labels) and not set(np.unique(self.point_labels)) <= {0, 1}:
            raise ValueError("point labels must be 1 (positive) or 0 (negative)")
        if self.box3d is not None:
            self.box3d = tuple(float(v) for v in self.box3d)  # type: ignore[assignment]
            if len(self.box3d) != 6:
                raise ValueError("box3d needs (z0, y0, x0, z1, y1, x1)")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, dtype=np.float32)
            if self.mask.ndim != 3:
                raise ValueError(f"mask prompt must be (z, y, x), got shape {self.mask.shape}")

    @property
    def empty(self) -> bool:
        return not len(self.points) and not len(self.boxes2d) and self.box3d is None and (self.mask is None or not self.mask.any())

    def slices(self) -> np.ndarray:
        """The slice indices any point or 2D box prompt lies on (sorted, unique)."""
        zs = [np.round(self.points[:, 0]).astype(int), self.boxes2d[:, 0].astype(int)]
        return np.unique(np.concatenate(zs)) if any(len(z) for z in zs) else np.zeros((0,), int)

    def validate(self, shape: Tuple[int, int, int]) -> None:
        """Raise ValueError when a prompt lies outside a volume of ``shape`` (z, y, x)."""
        upper = np.asarray(shape, dtype=np.float32) - 1
        if len(self.points) and (np.any(self.points < 0) or np.any(self.points > upper)):
            raise ValueError(f"a point lies outside the volume {tuple(shape)}")
        if len(self.boxes2d):
            b = self.boxes2d
            lo, hi = np.zeros(3, np.float32), upper
            corners = np.concatenate([b[:, [0, 1, 2]], b[:, [0, 3, 4]]])
            if np.any(corners < lo) or np.any(corners > hi):
                raise ValueError(f"a 2D box (z, y0, x0, y1, x1) lies outside the volume {tuple(shape)}")
            if np.any(b[:, 1:3] > b[:, 3:5]):
                raise ValueError("a 2D box has y0 > y1 or x0 > x1")
        if self.box3d is not None:
            b3 = np.asarray(self.box3d, np.float32)
            if np.any(b3[:3] > b3[3:]) or np.any(b3[:3] < 0) or np.any(b3[3:] > upper):
                raise ValueError(f"the 3D box (z0, y0, x0, z1, y1, x1) = {self.box3d} lies outside the volume {tuple(shape)} or is inverted")
        if self.mask is not None and self.mask.shape != tuple(shape):
            raise ValueError(f"mask prompt shape {self.mask.shape} differs from the volume {tuple(shape)}")

    @classmethod
    def from_mask(cls, mask: np.ndarray, n_points: int = 1, rng: Optional[np.random.Generator] = None, margin: int = 0, include_mask: bool = True) -> "Prompts":
        """Prompts derived from a coarse binary mask (Semi-SAM+ Algorithm 2).

        Positive points are sampled inside the mask (preferring voxels far from its border),
        a 2D box is taken on every slice the mask touches (grown by ``margin`` pixels), the 3D
        box around everything, and the mask itself. An empty mask gives empty prompts.
        """
        from scipy import ndimage

        rng = rng or np.random.default_rng(0)
        mask = np.asarray(mask) > 0.5
        if not mask.any():
            return cls()
        depth = ndimage.distance_transform_edt(mask)
        candidates = np.argwhere(depth >= max(1.0, 0.5 * depth.max()))
        picks = candidates[rng.choice(len(candidates), size=min(n_points, len(candidates)), replace=False)]
        boxes = []
        for z in np.flatnonzero(mask.any(axis=(1, 2))):
            ys, xs = np.nonzero(mask[z])
            y0, x0 = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
            y1, x1 = min(ys.max() + margin, mask.shape[1] - 1), min(xs.max() + margin, mask.shape[2] - 1)
            boxes.append((z, y0, x0, y1, x1))
        nz = np.argwhere(mask)
        lo, hi = nz.min(axis=0), nz.max(axis=0)
        return cls(
            points=picks.astype(np.float32),
            point_labels=np.ones(len(picks), np.int64),
            boxes2d=np.asarray(boxes, np.float32),
            box3d=(*lo.tolist(), *hi.tolist()),
            mask=mask.astype(np.float32) if include_mask else None,
        )


@runtime_checkable
class Teacher(Protocol):
    """A promptable segmenter. ``prepare`` does the expensive, prompt-free part once
    (image embeddings, cached); ``predict`` is cheap and may be called many times.

    Both take volumes as ``(z, y, x)`` float32 arrays in [0, 1] (preprocessed) and return a
    foreground probability volume of the same shape (float32 in [0, 1]).
    """

    name: str

    def prepare(self, image: np.ndarray) -> Any: ...

    def predict(self, state: Any, prompts: Prompts) -> np.ndarray: ...
