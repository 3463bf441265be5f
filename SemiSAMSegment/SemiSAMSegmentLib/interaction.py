"""The SemiSAM Segment Editor effect's state, without Qt: prompts on a slice plane, the
proposal they produce, and what Apply writes into the segment.

The effect turns view events into calls here (through :mod:`SemiSAMSegmentLib.mrml` for the
xy → (axis, index, row, col) geometry), sends :meth:`SliceInteraction.request` to the model
worker, shows :attr:`SliceInteraction.proposal` as a preview and, on Apply, writes
:meth:`SliceInteraction.commit`'s mask into the selected segment with
``mrml.modify_segment(..., mode="replace", region=region)`` after saving the editor's undo state.

Geometry: ``axis`` is an array axis of the source volume's ``(z, y, x)`` voxels, ``index`` the
slice along it, ``(row, col)`` a pixel of ``array.take(index, axis)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

Region = Tuple[slice, slice, slice]


@dataclass
class Click:
    row: int
    col: int
    positive: bool


def plane_region(axis: int, index: int) -> Region:
    """The voxels of one slice plane, as a region for ``modify_segment``."""
    region = [slice(None)] * 3
    region[axis] = slice(index, index + 1)
    return tuple(region)  # type: ignore[return-value]


def slab_region(axis: int, first: int, last: int) -> Region:
    """Slices ``first..last`` (inclusive) along ``axis``."""
    region = [slice(None)] * 3
    region[axis] = slice(min(first, last), max(first, last) + 1)
    return tuple(region)  # type: ignore[return-value]


@dataclass
class SliceInteraction:
    """Prompts on the current plane and the pending proposal.

    Args:
        shape: the source volume's ``(z, y, x)`` shape.
    """

    shape: Tuple[int, int, int]
    axis: Optional[int] = None
    index: Optional[int] = None
    clicks: List[Click] = field(default_factory=list)
    box: Optional[Tuple[int, int, int, int]] = None
    previous: Optional[np.ndarray] = None  # the segment on this plane when its prompts began
    proposal: Optional[np.ndarray] = None  # (z, y, x) bool, pending Apply
    region: Optional[Region] = None  # where Apply replaces the segment with the proposal

    def __post_init__(self) -> None:
        self.shape = tuple(int(n) for n in self.shape)  # type: ignore[assignment]
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"the source volume must be 3D (z, y, x), got shape {self.shape}")

    # -------------------------------------------------------------- prompts

    def plane_shape(self, axis: int) -> Tuple[int, int]:
        return tuple(n for a, n in enumerate(self.shape) if a != axis)  # type: ignore[return-value]

    def _check(self, axis: int, index: int, points: Sequence[Tuple[int, int]]) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (z, y, x), got {axis}")
        if not 0 <= index < self.shape[axis]:
            raise ValueError(f"slice {index} is outside the volume (0..{self.shape[axis] - 1} along axis {axis})")
        rows, cols = self.plane_shape(axis)
        for r, c in points:
            if not (0 <= r < rows and 0 <= c < cols):
                raise ValueError(f"point ({r}, {c}) is outside the {rows} x {cols} slice: click inside the image")

    def _enter(self, axis: int, index: int, previous: Optional[np.ndarray]) -> bool:
        """Move to a plane; prompts of another plane are dropped. True when the plane changed."""
        if (axis, index) == (self.axis, self.index):
            return False
        self.axis, self.index = axis, index
        self.clicks, self.box = [], None
        self.previous = None if previous is None else np.asarray(previous, bool).copy()
        if self.previous is not None and self.previous.shape != self.plane_shape(axis):
            raise ValueError(f"previous mask {self.previous.shape} does not match the slice {self.plane_shape(axis)}")
        return True

    def add_click(self, axis: int, index: int, row: int, col: int, positive: bool, previous: Optional[np.ndarray] = None) -> bool:
        """A + (``positive``) or − click. ``previous``: the segment on that plane, used when
        the plane is new. Returns True when the click started a new plane."""
        self._check(axis, index, [(row, col)])
        new = self._enter(axis, index, previous)
        self.clicks.append(Click(int(row), int(col), bool(positive)))
        return new

    def set_box(self, axis: int, index: int, corner_a: Tuple[int, int], corner_b: Tuple[int, int], previous: Optional[np.ndarray] = None) -> bool:
        """A box dragged between two corners (any order) replaces the plane's box."""
        self._check(axis, index, [corner_a, corner_b])
        new = self._enter(axis, index, previous)
        (r0, c0), (r1, c1) = corner_a, corner_b
        self.box = (min(r0, r1), min(c0, c1), max(r0, r1), max(c0, c1))
        return new

    def undo_prompt(self) -> bool:
        """Drop the last click (or the box when there are no clicks); False when nothing is left."""
        if self.clicks:
            self.clicks.pop()
            return True
        if self.box is not None:
            self.box = None
            return True
        return False

    @property
    def has_prompts(self) -> bool:
        return bool(self.clicks) or self.box is not None

    def request(self) -> Dict[str, Any]:
        """Keyword arguments for ``InteractiveSession.predict`` on the current plane."""
        if self.axis is None or not self.has_prompts:
            raise ValueError("no prompt yet: click or drag a box on a slice view")
        return {
            "axis": self.axis, "index": self.index,
            "clicks": [(c.row, c.col, c.positive) for c in self.clicks],
            "box": self.box, "previous": self.previous,
        }

    # -------------------------------------------------------------- proposals

    def set_slice_proposal(self, mask: np.ndarray, axis: Optional[int] = None, index: Optional[int] = None) -> None:
        """The model's mask for a plane (default: the current one) becomes the pending proposal."""
        axis = self.axis if axis is None else axis
        index = self.index if index is None else index
        if axis is None or index is None:
            raise ValueError("no current slice plane")
        mask = np.asarray(mask, bool)
        if mask.shape != self.plane_shape(axis):
            raise ValueError(f"mask {mask.shape} does not match the slice {self.plane_shape(axis)}")
        volume = np.zeros(self.shape, bool)
        region = plane_region(axis, index)
        volume[region] = np.expand_dims(mask, axis)
        self.proposal, self.region = volume, region

    def set_volume_proposal(self, mask: np.ndarray, region: Optional[Region] = None) -> None:
        """A propagated 3D mask; ``region`` (default: the slab of slices it touches along the
        current axis, else the whole volume) is where Apply replaces the segment."""
        mask = np.asarray(mask, bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask {mask.shape} does not match the volume {self.shape}")
        if region is None:
            if self.axis is not None and mask.any():
                along = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != self.axis)))[0]
                region = slab_region(self.axis, int(along[0]), int(along[-1]))
            else:
                region = (slice(None),) * 3
        self.proposal, self.region = mask, region

    def commit(self) -> Tuple[np.ndarray, Region]:
        """(mask, region) to write with ``modify_segment(mode="replace", region=region)``; the
        plane's prompts stay (a next click refines what was applied), the proposal is cleared."""
        if self.proposal is None or self.region is None:
            raise ValueError("nothing to apply: there is no proposal")
        out = (self.proposal, self.region)
        if self.axis is not None and self.region == plane_region(self.axis, self.index):
            self.previous = self.proposal[self.region].reshape(self.plane_shape(self.axis)).copy()
        self.proposal, self.region = None, None
        return out

    def cancel(self) -> None:
        """Forget the proposal and the plane's prompts."""
        self.proposal = self.region = None
        self.axis = self.index = None
        self.clicks, self.box, self.previous = [], None, None
