"""In-plane tiles of a whole-field-of-view grid: the lattice, per-tile embeddings and blending.

A student decodes stacks of slice embeddings of one in-plane size, the tile it was trained on
(``preprocess.target_shape[1:]``). A grid that covers a whole field of view
(``preprocess.crop: whole``) is usually wider than that, so it is cut into overlapping tiles:
each tile's slices are embedded on their own (the encoder resizes a tile, not the whole slice,
to its input side, so every pixel keeps the resolution the student was trained at), decoded
blockwise over depth (:meth:`~semisam.models.student.SlicingSAM3D.infer`), and the tiles'
probabilities are blended with Gaussian weights (MONAI's importance map, as
``sliding_window_inference`` does). Training cuts the same tiles, so the embedding cache keys
(the bytes of each tile's stack) are shared between training, validation and ``segment`` and no
slice-tile is encoded twice.

The lattice is deterministic: along an axis of ``n`` voxels, ``ceil((n - t) / (t (1 - overlap))) + 1``
tiles of ``t`` voxels start evenly from 0 to ``n - t`` (one tile when ``n <= t``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch


def tile_starts(n: int, tile: int, overlap: float) -> List[int]:
    """Start offsets of tiles of ``tile`` voxels covering ``n`` voxels (adjacent tiles share at
    least ``overlap`` of a tile)."""
    n, tile = int(n), int(tile)
    if tile < 1 or n < 1:
        raise ValueError(f"tile and axis sizes must be >= 1, got tile {tile}, axis {n}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if n <= tile:
        return [0]
    step = tile * (1.0 - overlap)
    count = int(math.ceil((n - tile) / step - 1e-9)) + 1
    return [int(round(i * (n - tile) / (count - 1))) for i in range(count)]


@dataclass(frozen=True)
class Tile:
    """One in-plane window ``[y0:y0 + h, x0:x0 + w]`` of a grid (all slices)."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def window(self) -> Tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)


def tiles(grid_hw: Sequence[int], tile_hw: Sequence[int], overlap: float) -> List[Tile]:
    """The tile lattice of an in-plane grid ``(H, W)``: tiles of ``min(tile, grid)`` per axis."""
    h, w = (int(v) for v in grid_hw)
    th, tw = min(int(tile_hw[0]), h), min(int(tile_hw[1]), w)
    return [Tile(y, x, th, tw) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]


def tile_stack(image: np.ndarray, tile: Tile) -> np.ndarray:
    """The contiguous ``(D, h, w)`` stack of one tile (its bytes key the embedding cache)."""
    return np.ascontiguousarray(image[(slice(None), *tile.window)])


def blend_weights(h: int, w: int) -> torch.Tensor:
    """Gaussian importance map of a tile (MONAI, sigma 1/8 of the tile; never below ~1e-3 so
    every pixel a single tile covers keeps a weight)."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map((int(h), int(w)), mode="gaussian", sigma_scale=0.125, device="cpu").float()


def blend(
    grid_shape: Sequence[int],
    parts: Sequence[Tuple[Tile, Callable[[], torch.Tensor]]],
    cancel: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Blend per-tile predictions ``(K, D, h, w)`` into ``(K, D, H, W)``.

    ``parts`` pairs each tile with a function computing its prediction (called one at a time, so
    only one tile's embeddings and outputs need to be alive). One tile covering the whole grid
    is returned as it is (no weights: bit-identical to decoding the grid directly)."""
    d, h, w = (int(v) for v in grid_shape)
    if len(parts) == 1 and (parts[0][0].h, parts[0][0].w) == (h, w):
        return parts[0][1]()
    out = norm = None
    for tile, compute in parts:
        if cancel is not None and cancel():
            from .errors import Cancelled

            raise Cancelled("cancelled")
        pred = compute()
        if out is None:
            out = torch.zeros((pred.shape[0], d, h, w), dtype=torch.float32)
            norm = torch.zeros((h, w), dtype=torch.float32)
        weight = blend_weights(tile.h, tile.w)
        out[(slice(None), slice(None), *tile.window)] += pred.float() * weight
        norm[tile.window] += weight
    if out is None:
        raise ValueError("no tiles to blend")
    return out / norm
