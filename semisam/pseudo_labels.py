"""Semi-SAM+ pseudo-labels (handbook Algorithm 2): SAM-family teachers prompted with the
student's coarse mask under several invertible views, filtered by their variance.

For an unlabeled volume ``x`` (``(z, y, x)`` float32 in [0, 1]) and the student's coarse mask
``M_c`` (bool, same shape), :class:`PseudoLabeler` runs, for every view ``T_j``
(``j = 1..N``, the first one the identity) and every teacher:

* ``img_j = weak_aug(T_j(x))`` (a gamma, only for views that change the in-plane geometry),
  ``M_j = T_j(M_c)``;
* prompt set A, the mask itself: ``Prompts(mask=M_j)``;
* prompt set B, positive points sampled inside ``M_j`` far from its border;
* both predictions mapped back with ``T_j^-1``.

Over the ``2 N`` predictions per teacher: ``Var(v)`` per voxel (population variance),
``M_conf = 1[Var < u_th]``, ``Pseudo = mean * M_conf``. An empty coarse mask (fewer than
``min_voxels`` voxels) gives no prompt and no pseudo-label (``None``); no teacher is called.
Predictions are the teachers' probabilities (``binarize=True`` thresholds them at 0.5 first,
the literal ``M-hat`` of the handbook).

What each teacher receives (all coordinates in the view's frame)
-------------------------------------------------------------------
Per-slice teachers (:class:`~semisam.models.slice_teacher.SliceSAMTeacher`: LiteMedSAM, SAM /
MedSAM ViT-B) decode, and embed, only the slices that carry a prompt; other slices stay 0.

* ``LiteMedSAMTeacher`` (box-trained, ``boxes_from_clicks``, no dense mask input):
  A -> on every slice the mask touches, the mask's bounding box on that slice (grown by the
  teacher's ``box_margin``, 6 px of its 256 frame); B -> "boxes for box-trained teachers"
  (the issue's wording): the same per-slice boxes with every side jittered by up to 10 % of
  the box (:func:`slice_boxes`). A click turned into a box was measured far worse on the
  phantoms' training grid (Dice 0.12-0.53 against 0.31-0.64 for the mask's boxes).
* ``SAMTeacher`` (MedSAM / SAM ViT-B): A -> the per-slice bounding box of the mask plus the
  slice's mask as SAM's dense low-resolution logit input; B -> one positive click per mask
  slice, used as a click (no box is invented).

3D teachers get ``points`` positive points (an int, or ``(lo, hi)`` for a random count per
view) sampled among interior voxels of the 3D mask for prompt set B:

* ``SAMMed3DTeacher``: A -> the mask, cropped and resized (nearest) to the low-resolution
  dense mask input, plus the one positive point the teacher itself puts on the mask voxel
  nearest the mask's centroid (the crop is centred there); B -> the points (all positive);
  the crop is centred on their mean and points falling outside the crop are dropped. Its
  output is 0 outside the crop (the whole volume for 128^3 volumes and the released model).
* ``MedSAM2Teacher``: A -> the mask on its largest slice only (``add_new_mask``), propagated
  forward and backward from there (the mask's other slices are not used); B -> every slice
  holding a point becomes a conditioning frame with its lone positive click(s); tracking
  starts from the first point's slice.

CPU budget: embeddings and views
--------------------------------
Slice embeddings are the expensive part and :class:`~semisam.models.encoders.EmbeddingCache`
keys them on voxel content. Therefore:

* A per-slice teacher is exactly equivariant to depth flips (each slice is predicted from
  that slice and its own prompts only), so for those teachers only the view's in-plane part
  (:meth:`ViewTransform.inplane`) is applied to the image and the prompts, and the depth flip
  is applied to the prediction (``slice_shortcut=True``; the result equals running the full
  view, see the tests). No depth-flipped volume is ever encoded.
* A view whose in-plane part is the identity hands a per-slice teacher the very array it was
  given (same object, same bytes), so the embeddings the student already computed are reused.
* Views are drawn once per ``(seed, key)`` (:meth:`PseudoLabeler.views_for`), not at every
  refresh, so the embeddings of augmented views stay valid (and cached) across refreshes. The
  points of prompt set B are drawn from ``(seed, key, coarse mask)``: the whole computation is
  a deterministic function of its inputs.
* :func:`draw_views` prefers views whose in-plane parts differ: a view that differs from
  another one only by a depth flip gives a per-slice teacher the same prediction again.

Pseudo-labels are kept by :class:`PseudoLabelStore` (memory, and one ``.npz`` per case plus a
JSON index on disk) so a resumed training run finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .models.prompts import Prompts
from .models.slice_teacher import SliceSAMTeacher

__all__ = [
    "ViewTransform",
    "view_group",
    "draw_views",
    "slice_boxes",
    "slice_points",
    "volume_points",
    "is_slice_teacher",
    "PseudoLabel",
    "PseudoLabeler",
    "PseudoLabelStore",
]


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewTransform:
    """An element of the flip/transpose group of a ``(z, y, x)`` volume plus a weak gamma.

    Attributes:
        flip: flip the (z, y, x) axes.
        transpose: swap y and x (after the flips); needs y size == x size.
        gamma: ``image ** gamma`` for images only (masks and predictions are never touched).
    """

    flip: Tuple[bool, bool, bool] = (False, False, False)
    transpose: bool = False
    gamma: float = 1.0

    def __post_init__(self) -> None:
        flip = tuple(bool(f) for f in self.flip)
        if len(flip) != 3:
            raise ValueError(f"flip needs three booleans (z, y, x), got {self.flip!r}")
        object.__setattr__(self, "flip", flip)
        object.__setattr__(self, "transpose", bool(self.transpose))
        gamma = float(self.gamma)
        if not np.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"gamma must be a positive number, got {self.gamma!r}")
        object.__setattr__(self, "gamma", gamma)

    # -- properties ----------------------------------------------------------------------
    @property
    def depth_flip(self) -> bool:
        return self.flip[0]

    @property
    def is_identity_geometry(self) -> bool:
        return not any(self.flip) and not self.transpose

    @property
    def is_identity_inplane(self) -> bool:
        """No y/x flip, no transpose and no gamma (a depth flip is allowed)."""
        return not self.flip[1] and not self.flip[2] and not self.transpose and self.gamma == 1.0

    @property
    def is_identity(self) -> bool:
        return self.is_identity_geometry and self.gamma == 1.0

    def inplane(self) -> "ViewTransform":
        """The same transform without its depth flip."""
        return replace(self, flip=(False, self.flip[1], self.flip[2]))

    def __str__(self) -> str:
        if self.is_identity:
            return "identity"
        parts = ["flip-" + "".join(a for a, f in zip("zyx", self.flip) if f)] if any(self.flip) else []
        parts += ["transpose"] if self.transpose else []
        parts += [f"gamma={self.gamma:.3f}"] if self.gamma != 1.0 else []
        return "+".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {"flip": list(self.flip), "transpose": self.transpose, "gamma": self.gamma}

    # -- arrays --------------------------------------------------------------------------
    def _check(self, arr: np.ndarray) -> None:
        if arr.ndim != 3:
            raise ValueError(f"a view transforms (z, y, x) arrays, got shape {arr.shape}")
        if self.transpose and arr.shape[1] != arr.shape[2]:
            raise ValueError(f"a transposing view needs y size == x size, got shape {arr.shape}")

    def apply(self, arr: np.ndarray, image: bool = False) -> np.ndarray:
        """Map ``arr`` into the view. ``image=True`` also applies the gamma (float32 out; values
        below 0 are clipped first). The identity returns ``arr`` itself, otherwise a new
        C-contiguous array."""
        arr = np.asarray(arr)
        self._check(arr)
        with_gamma = image and self.gamma != 1.0
        if self.is_identity_geometry and not with_gamma:
            return arr
        out = arr
        axes = tuple(i for i, f in enumerate(self.flip) if f)
        if axes:
            out = np.flip(out, axis=axes)
        if self.transpose:
            out = out.transpose(0, 2, 1)
        if with_gamma:
            out = np.power(np.maximum(out.astype(np.float32, copy=False), np.float32(0)), np.float32(self.gamma))
        return np.ascontiguousarray(out)

    def invert(self, arr: np.ndarray) -> np.ndarray:
        """Map an array of the view (a prediction) back: the exact inverse of the geometry
        (the gamma is not inverted: predictions and masks never had it)."""
        arr = np.asarray(arr)
        self._check(arr)
        if self.is_identity_geometry:
            return arr
        out = arr.transpose(0, 2, 1) if self.transpose else arr
        axes = tuple(i for i, f in enumerate(self.flip) if f)
        if axes:
            out = np.flip(out, axis=axes)
        return np.ascontiguousarray(out)

    # -- coordinates ---------------------------------------------------------------------
    def view_shape(self, shape: Sequence[int]) -> Tuple[int, int, int]:
        z, y, x = (int(s) for s in shape)
        return (z, x, y) if self.transpose else (z, y, x)

    def apply_points(self, points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Map ``(n, 3)`` (z, y, x) voxel coordinates of a volume of ``shape`` into the view."""
        p = np.array(points, dtype=np.float32).reshape(-1, 3)
        upper = np.asarray(shape, np.float32) - 1
        for axis, f in enumerate(self.flip):
            if f:
                p[:, axis] = upper[axis] - p[:, axis]
        if self.transpose:
            p = p[:, [0, 2, 1]]
        return p

    def apply_prompts(self, prompts: Prompts, shape: Sequence[int]) -> Prompts:
        """Map prompts given on a volume of ``shape`` into the view (points, boxes, mask)."""
        points = self.apply_points(prompts.points, shape)
        boxes = np.zeros((0, 5), np.float32)
        if len(prompts.boxes2d):
            b = prompts.boxes2d
            lo = self.apply_points(b[:, [0, 1, 2]], shape)
            hi = self.apply_points(b[:, [0, 3, 4]], shape)
            yx0, yx1 = np.minimum(lo[:, 1:], hi[:, 1:]), np.maximum(lo[:, 1:], hi[:, 1:])
            boxes = np.concatenate([lo[:, :1], yx0, yx1], axis=1)
        box3d = None
        if prompts.box3d is not None:
            b3 = np.asarray(prompts.box3d, np.float32)
            corners = self.apply_points(np.stack([b3[:3], b3[3:]]), shape)
            box3d = (*corners.min(axis=0).tolist(), *corners.max(axis=0).tolist())
        mask = None if prompts.mask is None else self.apply(prompts.mask)
        return Prompts(points=points, point_labels=prompts.point_labels.copy(), boxes2d=boxes, box3d=box3d, mask=mask)


def view_group(shape: Optional[Sequence[int]] = None, depth_flips: bool = True, inplane: bool = True) -> List[ViewTransform]:
    """All geometric views (gamma 1) allowed for a volume of ``shape``: 16 for y == x, 8 when
    y != x (no transpose); fewer without depth flips or in-plane changes. Identity first."""
    square = shape is None or int(shape[1]) == int(shape[2])
    out = []
    for fz, fy, fx, t in product((False, True), repeat=4):
        if (fz and not depth_flips) or ((fy or fx or t) and not inplane) or (t and not square):
            continue
        out.append(ViewTransform((fz, fy, fx), t))
    return out


def draw_views(n: int, shape: Sequence[int], rng: np.random.Generator, depth_flips: bool = True, inplane: bool = True,
               gamma_range: Optional[Tuple[float, float]] = (0.8, 1.25)) -> List[ViewTransform]:
    """``n`` distinct views of a volume of ``shape``: the identity first, then random group
    elements (transpose only when y == x). Distinct in-plane parts are used first (a per-slice
    teacher sees two views that differ only by a depth flip as the same view), each with a
    random depth flip when ``depth_flips``; the remaining group elements come after. Views that
    change the in-plane geometry get a gamma drawn log-uniformly in ``gamma_range``.

    Fewer than ``n`` views are returned when the allowed group is smaller than ``n``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if gamma_range is not None:
        lo, hi = (float(g) for g in gamma_range)
        if not 0 < lo <= hi:
            raise ValueError(f"gamma_range must be (lo, hi) with 0 < lo <= hi, got {gamma_range!r}")
    identity = ViewTransform()
    views = [identity]
    if n == 1:
        return views
    group = view_group(shape, depth_flips, inplane)
    inplane_parts = [v for v in group if not v.depth_flip and not v.is_identity]
    chosen: List[ViewTransform] = []
    for i in rng.permutation(len(inplane_parts)):
        v = inplane_parts[int(i)]
        if depth_flips and bool(rng.integers(2)):
            v = replace(v, flip=(True, v.flip[1], v.flip[2]))
        chosen.append(v)
    rest = [v for v in group if not v.is_identity and v not in chosen]
    chosen += [rest[int(i)] for i in rng.permutation(len(rest))]
    for v in chosen[: n - 1]:
        if not v.is_identity_inplane and gamma_range is not None and lo != hi:
            v = replace(v, gamma=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        elif not v.is_identity_inplane and gamma_range is not None:
            v = replace(v, gamma=lo)
        views.append(v)
    return views


# --------------------------------------------------------------------------------------------
# Prompt points
# --------------------------------------------------------------------------------------------


def _interior(mask: np.ndarray) -> np.ndarray:
    """Indices of the voxels of ``mask`` at least half its largest inside distance (and >= 1)
    from its border; the array edge counts as border."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[(slice(1, -1),) * mask.ndim]
    return np.argwhere(depth >= max(1.0, 0.5 * float(depth.max())))


def slice_points(mask: np.ndarray, rng: np.random.Generator) -> Prompts:
    """One positive point on every slice the mask touches, drawn among the interior pixels of
    the mask on that slice (2D distance to its border)."""
    mask = np.asarray(mask, dtype=bool)
    points = []
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        candidates = _interior(mask[z])
        y, x = candidates[int(rng.integers(len(candidates)))]
        points.append((z, y, x))
    return Prompts(points=np.asarray(points, np.float32).reshape(-1, 3), point_labels=np.ones(len(points), np.int64))


def slice_boxes(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> Prompts:
    """The mask's bounding box on every slice it touches, each side moved by up to ``jitter``
    of the box's size (uniform, independently): prompt set B for box-trained teachers, whose
    lone clicks are poor prompts (LiteMedSAM: Dice 0.55 from a click on HC18, 0.94 from a box)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape[1:]
    boxes = []
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.nonzero(mask[z])
        y0, x0, y1, x1 = float(ys.min()), float(xs.min()), float(ys.max()), float(xs.max())
        dy, dx = (y1 - y0 + 1) * jitter, (x1 - x0 + 1) * jitter
        j = rng.uniform(-1.0, 1.0, 4)
        y0, y1 = np.clip([y0 + j[0] * dy, y1 + j[1] * dy], 0, h - 1)
        x0, x1 = np.clip([x0 + j[2] * dx, x1 + j[3] * dx], 0, w - 1)
        boxes.append((z, min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)))
    return Prompts(boxes2d=np.asarray(boxes, np.float32).reshape(-1, 5))


def volume_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> Prompts:
    """``n`` distinct positive points among the interior voxels of the 3D mask (fewer when it
    has fewer interior voxels)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or n < 1:
        return Prompts()
    candidates = _interior(mask)
    picks = candidates[rng.choice(len(candidates), size=min(int(n), len(candidates)), replace=False)]
    return Prompts(points=picks.astype(np.float32), point_labels=np.ones(len(picks), np.int64))


def _ellipsoid(radii: Sequence[int]) -> np.ndarray:
    """A boolean ellipsoid with integer half-axes ``radii`` (0 = flat along that axis)."""
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radii], indexing="ij")
    dist = sum((g / r) ** 2 if r > 0 else np.where(g == 0, 0.0, np.inf) for g, r in zip(grids, radii))
    return dist <= 1.0


def growth_radii(growth_mm: float, spacing_zyx: Sequence[float]) -> Tuple[int, ...]:
    """Voxel half-axes of a ``|growth_mm|`` ellipsoid on a grid of ``spacing_zyx`` (rounded)."""
    return tuple(int(np.floor(abs(float(growth_mm)) / float(s) + 0.5)) for s in spacing_zyx)


def grow_mask(mask: np.ndarray, growth_mm: float, spacing_zyx: Sequence[float]) -> np.ndarray:
    """``mask`` dilated (``growth_mm`` > 0) or eroded (< 0) by an ellipsoid of ``|growth_mm|``
    millimetres on a grid of ``spacing_zyx``. An erosion that would empty the mask returns it
    unchanged (a prompt must not vanish); the array's edge does not erode the mask."""
    mask = np.asarray(mask, dtype=bool)
    radii = growth_radii(growth_mm, spacing_zyx)
    if not any(radii) or not mask.any():
        return mask.copy()
    structure = _ellipsoid(radii)
    if growth_mm > 0:
        return ndimage.binary_dilation(mask, structure=structure)
    out = ndimage.binary_erosion(mask, structure=structure, border_value=1)
    return out if out.any() else mask.copy()


#: Prompt growths tried when ``pseudo.prompt_growth`` is chosen on the validation cases, in
#: units of the grid's finest spacing (so the same rule holds on any grid).
GROWTH_STEPS = (-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0)


def growth_candidates(spacing_zyx: Sequence[float], steps: Sequence[float] = GROWTH_STEPS) -> List[float]:
    """Distinct growths (mm) for a grid: ``steps`` x its finest spacing, one per voxel footprint,
    ordered by size (the smallest change first)."""
    finest = float(min(spacing_zyx))
    seen, out = set(), []
    for g in sorted((float(s) * finest for s in steps), key=lambda v: (abs(v), v)):
        key = (np.sign(g), growth_radii(g, spacing_zyx))
        if key not in seen:
            seen.add(key)
            out.append(round(g, 4))
    return out


def is_slice_teacher(teacher: Any) -> bool:
    """Whether ``teacher`` predicts every slice from that slice alone (depth-flip equivariant):
    a :class:`SliceSAMTeacher`, or an object with ``per_slice = True``."""
    flag = getattr(teacher, "per_slice", None)
    return bool(flag) if flag is not None else isinstance(teacher, SliceSAMTeacher)


def _digest(data: Union[str, bytes]) -> int:
    """A stable (process-independent) 63-bit integer of ``data``, for seeding."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------------------------
# The pseudo-label
# --------------------------------------------------------------------------------------------

_FORMAT = "semisam-pseudo-label"


@dataclass
class PseudoLabel:
    """The filtered pseudo-label of one volume (arrays on the preprocessed grid, (z, y, x)).

    Attributes:
        probability: ``mean * confidence`` (float32), the target p_f of L_rs-con.
        confidence: M_conf, ``variance < u_th`` (bool).
        variance: per-voxel population variance of the predictions (float32).
        mean: per-voxel mean of the predictions (float32).
        n_predictions: how many predictions were combined (2 per view per teacher).
        coarse_voxels: voxels of the student's coarse mask.
        u_th: the threshold used.
        info: diagnostics (teachers, views, seconds, ...), JSON-serialisable.
    """

    probability: np.ndarray
    confidence: np.ndarray
    variance: np.ndarray
    mean: np.ndarray
    n_predictions: int
    coarse_voxels: int
    u_th: float = 0.1
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.probability = np.asarray(self.probability, dtype=np.float32)
        self.confidence = np.asarray(self.confidence, dtype=bool)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mean = np.asarray(self.mean, dtype=np.float32)
        shapes = {a.shape for a in (self.probability, self.confidence, self.variance, self.mean)}
        if len(shapes) != 1 or self.probability.ndim != 3:
            raise ValueError(f"pseudo-label arrays must share one (z, y, x) shape, got {sorted(shapes)}")
        self.n_predictions, self.coarse_voxels, self.u_th = int(self.n_predictions), int(self.coarse_voxels), float(self.u_th)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.probability.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.probability, self.confidence, self.variance, self.mean))

    @classmethod
    def from_statistics(cls, mean: np.ndarray, variance: np.ndarray, u_th: float, n_predictions: int, coarse_voxels: int,
                        info: Optional[Dict[str, Any]] = None) -> "PseudoLabel":
        """``M_conf = variance < u_th``, ``probability = mean * M_conf``."""
        mean = np.asarray(mean, np.float32)
        variance = np.asarray(variance, np.float32)
        confidence = variance < np.float32(u_th)
        return cls(mean * confidence, confidence, variance, mean, n_predictions, coarse_voxels, u_th, dict(info or {}))

    def summary(self) -> Dict[str, Any]:
        """Numbers for logs: confident fraction, foreground voxels, variances, timing."""
        n = max(self.confidence.size, 1)
        out = {
            "confident_fraction": float(self.confidence.sum()) / n,
            "foreground_voxels": int((self.probability > 0.5).sum()),
            "soft_foreground": float(self.probability.sum(dtype=np.float64)),
            "coarse_voxels": self.coarse_voxels,
            "mean_variance": float(self.variance.mean(dtype=np.float64)),
            "n_predictions": self.n_predictions,
            "u_th": self.u_th,
        }
        for key in ("mean_variance_in_coarse", "confident_fraction_in_coarse", "seconds", "encoded_slices"):
            if key in self.info:
                out[key] = self.info[key]
        return out

    # -- storage -------------------------------------------------------------------------
    def as_stored(self) -> "PseudoLabel":
        """This pseudo-label exactly as :meth:`save` + :meth:`load` give it back (float16 mean
        and variance): training uses this form, so a resumed run trains on the same numbers."""
        mean = self.mean.astype(np.float16).astype(np.float32)
        variance = self.variance.astype(np.float16).astype(np.float32)
        return type(self)(mean * self.confidence, self.confidence.copy(), variance, mean, self.n_predictions,
                          self.coarse_voxels, self.u_th, dict(self.info))

    def save(self, path: Union[str, os.PathLike], metadata: Optional[Dict[str, Any]] = None) -> Path:
        """Write a compressed ``.npz`` atomically (temporary file + ``os.replace``): mean and
        variance as float16, the confidence as packed bits; the probability is rebuilt from
        them on load (``mean * confidence``, within float16 rounding)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": _FORMAT, "version": 1, "n_predictions": self.n_predictions, "coarse_voxels": self.coarse_voxels,
                  "u_th": self.u_th, "info": self.info, "metadata": dict(metadata or {})}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(
                    fh,
                    header=np.array(json.dumps(header)),
                    shape=np.asarray(self.shape, np.int64),
                    mean=self.mean.astype(np.float16),
                    variance=self.variance.astype(np.float16),
                    confidence=np.packbits(self.confidence.reshape(-1)),
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @staticmethod
    def read_header(path: Union[str, os.PathLike]) -> Dict[str, Any]:
        """The JSON header of a saved pseudo-label (without reading its arrays)."""
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a SemiSAM pseudo-label file")
        return header

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PseudoLabel":
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            if header.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a SemiSAM pseudo-label file")
            shape = tuple(int(s) for s in z["shape"])
            mean = z["mean"].astype(np.float32)
            variance = z["variance"].astype(np.float32)
            confidence = np.unpackbits(z["confidence"], count=int(np.prod(shape))).astype(bool).reshape(shape)
        return cls(mean * confidence, confidence, variance, mean, header["n_predictions"], header["coarse_voxels"],
                   header["u_th"], header.get("info", {}))


# --------------------------------------------------------------------------------------------
# The labeler
# --------------------------------------------------------------------------------------------


class PseudoLabeler:
    """Algorithm 2 over a set of teachers (objects with ``prepare(image)`` and
    ``predict(state, prompts)``, see :class:`~semisam.models.prompts.Teacher`).

    Args:
        teachers: one teacher or a sequence of them.
        n_views: N, views per volume, the identity included.
        u_th: confidence threshold on the variance (variances of values in [0, 1] are <= 0.25).
        points: positive points per view for 3D teachers (an int, or ``(lo, hi)`` inclusive for a
            random count); per-slice teachers get one point per mask slice.
        depth_flips / inplane: which geometric changes views may make.
        seed: seed of the views and the points.
        min_voxels: coarse masks with fewer voxels give no pseudo-label.
        gamma_range: range of the weak gamma of views that change the in-plane geometry
            (``None``: no gamma).
        binarize: threshold every prediction at 0.5 before the statistics.
        slice_shortcut: run per-slice teachers on the in-plane part of a view and flip the
            prediction along depth (exactly equivalent; no depth-flipped volume is encoded).

    Diagnostics: ``last`` (the numbers of the last call) and ``totals`` (cumulative: calls,
    skipped, predictions, seconds, per-teacher seconds, encoded slices).
    """

    def __init__(self, teachers: Any, n_views: int = 2, u_th: float = 0.1, points: Union[int, Tuple[int, int]] = 1,
                 depth_flips: bool = True, inplane: bool = True, seed: int = 0, min_voxels: int = 1,
                 gamma_range: Optional[Tuple[float, float]] = (0.8, 1.25), binarize: bool = False, slice_shortcut: bool = True):
        self.teachers = list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]
        if not self.teachers:
            raise ValueError("PseudoLabeler needs at least one teacher")
        for t in self.teachers:
            if not (callable(getattr(t, "prepare", None)) and callable(getattr(t, "predict", None))):
                raise TypeError(f"a teacher needs prepare(image) and predict(state, prompts); got {type(t).__name__}")
        if int(n_views) < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if not 0 < float(u_th):
            raise ValueError(f"u_th must be > 0, got {u_th}")
        lo, hi = (points, points) if np.isscalar(points) else tuple(points)
        if not 1 <= int(lo) <= int(hi):
            raise ValueError(f"points must be >= 1 (or (lo, hi) with 1 <= lo <= hi), got {points!r}")
        self.points_range = (int(lo), int(hi))
        self.n_views, self.u_th, self.seed = int(n_views), float(u_th), int(seed)
        self.depth_flips, self.inplane, self.gamma_range = bool(depth_flips), bool(inplane), gamma_range
        self.min_voxels, self.binarize, self.slice_shortcut = max(int(min_voxels), 1), bool(binarize), bool(slice_shortcut)
        self._views: Dict[Tuple[str, Tuple[int, ...]], List[ViewTransform]] = {}
        self.last: Dict[str, Any] = {}
        self.totals: Dict[str, Any] = {"calls": 0, "skipped": 0, "predictions": 0, "seconds": 0.0, "teacher_seconds": {}, "encoded_slices": 0}

    @staticmethod
    def teacher_name(teacher: Any) -> str:
        return str(getattr(teacher, "name", type(teacher).__name__))

    def views_for(self, key: str, shape: Sequence[int]) -> List[ViewTransform]:
        """The views of the volume ``key``: a function of ``(seed, key, shape)`` only."""
        shape = tuple(int(s) for s in shape)
        memo = (str(key), shape)
        if memo not in self._views:
            rng = np.random.default_rng([self.seed, _digest(str(key))])
            self._views[memo] = draw_views(self.n_views, shape, rng, self.depth_flips, self.inplane, self.gamma_range)
        return self._views[memo]

    def _caches(self) -> List[Any]:
        seen: Dict[int, Any] = {}
        for t in self.teachers:
            cache = getattr(t, "cache", None)
            if cache is not None and hasattr(cache, "encoded_slices"):
                seen[id(cache)] = cache
        return list(seen.values())

    def __call__(self, image: np.ndarray, coarse_mask: np.ndarray, key: str,
                 views: Optional[Sequence[ViewTransform]] = None) -> Optional[PseudoLabel]:
        """The pseudo-label of ``image`` prompted by ``coarse_mask``; ``None`` when the mask has
        fewer than ``min_voxels`` voxels (then no teacher is called).

        ``key`` names the volume (its views are drawn once per key); ``views`` overrides them
        (experiments and tests).
        """
        start = time.perf_counter()
        image = np.asarray(image, dtype=np.float32)  # the same object when already float32
        if image.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {image.shape}")
        mask = np.asarray(coarse_mask)
        if mask.shape != image.shape:
            raise ValueError(f"coarse mask shape {mask.shape} differs from the image {image.shape}")
        mask = mask if mask.dtype == bool else mask > 0.5
        coarse_voxels = int(mask.sum())
        self.totals["calls"] += 1
        if coarse_voxels < self.min_voxels:
            self.totals["skipped"] += 1
            self.last = {"key": str(key), "skipped": True, "coarse_voxels": coarse_voxels, "predictions": 0, "seconds": time.perf_counter() - start}
            return None

        caches = self._caches()
        encoded_before = sum(c.encoded_slices for c in caches)
        views = list(views) if views is not None else self.views_for(key, image.shape)
        if not views:
            raise ValueError("at least one view is needed")
        base = [self.seed, _digest(str(key)), _digest(np.packbits(mask).tobytes())]
        total = np.zeros(image.shape, np.float64)
        total_sq = np.zeros(image.shape, np.float64)
        n_pred = 0
        teacher_seconds = {self.teacher_name(t): 0.0 for t in self.teachers}
        slice_states: Dict[Tuple[int, ViewTransform], Any] = {}
        to_depth = ViewTransform((True, False, False))

        for j, view in enumerate(views):
            ip = view.inplane()
            mask_ip = ip.apply(mask)
            shape_ip = mask_ip.shape
            set_a = Prompts(mask=mask_ip)
            sets_b: Dict[str, Prompts] = {}
            image_view: Optional[np.ndarray] = None
            for ti, teacher in enumerate(self.teachers):
                tic = time.perf_counter()
                per_slice = is_slice_teacher(teacher)
                box_trained = per_slice and bool(getattr(teacher, "boxes_from_clicks", False))
                kind = "slice-box" if box_trained else "slice" if per_slice else "volume"
                if kind not in sets_b:  # drawn in the in-plane frame, for every teacher of the kind alike
                    rng = np.random.default_rng(base + [j, {"slice": 0, "volume": 1, "slice-box": 2}[kind]])
                    if box_trained:
                        sets_b[kind] = slice_boxes(mask_ip, rng)
                    elif per_slice:
                        sets_b[kind] = slice_points(mask_ip, rng)
                    else:
                        lo, hi = self.points_range
                        sets_b[kind] = volume_points(mask_ip, int(rng.integers(lo, hi + 1)), rng)
                prompt_sets = [set_a, sets_b[kind]]
                if per_slice and self.slice_shortcut:
                    memo = (ti, ip)
                    if memo not in slice_states:
                        slice_states[memo] = teacher.prepare(image if ip.is_identity else ip.apply(image, image=True))
                    state, flip_output = slice_states[memo], view.depth_flip
                else:
                    if image_view is None:
                        image_view = image if view.is_identity else view.apply(image, image=True)
                    state, flip_output = teacher.prepare(image_view), False
                    if view.depth_flip:
                        prompt_sets = [to_depth.apply_prompts(p, shape_ip) for p in prompt_sets]
                for prompts in prompt_sets:
                    pred = np.asarray(teacher.predict(state, prompts), dtype=np.float32)
                    if pred.shape != shape_ip:
                        raise ValueError(f"teacher {self.teacher_name(teacher)} returned shape {pred.shape}, expected {shape_ip}")
                    if flip_output:
                        pred = pred[::-1]
                    pred = view.invert(pred)
                    if self.binarize:
                        pred = (pred > 0.5).astype(np.float32)
                    total += pred
                    total_sq += np.square(pred, dtype=np.float64)
                    n_pred += 1
                del state
                teacher_seconds[self.teacher_name(teacher)] += time.perf_counter() - tic
            slice_states = {k: v for k, v in slice_states.items() if any(k[1] == w.inplane() for w in views[j + 1 :])}

        mean = total / n_pred
        variance = np.maximum(total_sq / n_pred - mean * mean, 0.0)
        del total, total_sq
        seconds = time.perf_counter() - start
        encoded = sum(c.encoded_slices for c in caches) - encoded_before
        inside = variance[mask]
        info = {
            "key": str(key),
            "teachers": [self.teacher_name(t) for t in self.teachers],
            "views": [str(v) for v in views],
            "seconds": seconds,
            "teacher_seconds": teacher_seconds,
            "predictions": n_pred,
            "encoded_slices": encoded,
            "mean_variance_in_coarse": float(inside.mean()),
            "confident_fraction_in_coarse": float((inside < self.u_th).mean()),
        }
        self.last = {"skipped": False, "coarse_voxels": coarse_voxels, **info}
        self.totals["predictions"] += n_pred
        self.totals["seconds"] += seconds
        self.totals["encoded_slices"] += encoded
        for name, s in teacher_seconds.items():
            self.totals["teacher_seconds"][name] = self.totals["teacher_seconds"].get(name, 0.0) + s
        return PseudoLabel.from_statistics(mean, variance, self.u_th, n_pred, coarse_voxels, info)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

_INDEX = "index.json"
_INDEX_FORMAT = "semisam-pseudo-label-index"


def _file_name(case_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._")[:80] or "case"
    return f"{safe}-{hashlib.sha256(case_id.encode()).hexdigest()[:10]}.npz"


class PseudoLabelStore:
    """Pseudo-labels per case with the epoch they were computed at.

    In memory (an LRU of at most ``max_memory_bytes`` when a folder backs it; everything
    without a folder) and, with ``folder``, on disk: one ``.npz`` per case and ``index.json``
    (case -> epoch, empty, file), both written atomically. A new store on the same folder
    finds them (a missing or damaged index is rebuilt from the ``.npz`` files; cases whose
    pseudo-label was ``None`` are then forgotten, i.e. recomputed). ``None`` (an empty coarse
    mask) is remembered as such.

    One writer per folder: under DistributedDataParallel give each rank its own folder, or
    write from one rank only.
    """

    def __init__(self, folder: Optional[Union[str, os.PathLike]] = None, max_memory_bytes: int = 2 << 30, autoflush: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.max_memory_bytes = int(max_memory_bytes)
        self.autoflush = bool(autoflush)
        self._index: Dict[str, Dict[str, Any]] = {}
        self._memory: "OrderedDict[str, PseudoLabel]" = OrderedDict()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._index = self._read_index()

    # -- index ---------------------------------------------------------------------------
    def _read_index(self) -> Dict[str, Dict[str, Any]]:
        path = self.folder / _INDEX
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != _INDEX_FORMAT:
                raise ValueError("not an index")
            index = {str(k): {"epoch": int(v["epoch"]), "empty": bool(v["empty"]), "file": v.get("file")} for k, v in doc["cases"].items()}
            return {k: v for k, v in index.items() if v["empty"] or (v["file"] and (self.folder / v["file"]).is_file())}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return self._rebuild_index()

    def _rebuild_index(self) -> Dict[str, Dict[str, Any]]:
        index: Dict[str, Dict[str, Any]] = {}
        for path in sorted(self.folder.glob("*.npz")):
            try:
                meta = PseudoLabel.read_header(path).get("metadata", {})
                index[str(meta["case_id"])] = {"epoch": int(meta["epoch"]), "empty": False, "file": path.name}
            except Exception:  # a damaged or foreign file: ignored (recomputed)
                continue
        return index

    def flush(self) -> None:
        """Write ``index.json`` atomically (done by every ``put`` when ``autoflush``)."""
        if self.folder is None:
            return
        doc = {"format": _INDEX_FORMAT, "version": 1, "cases": self._index}
        fd, tmp = tempfile.mkstemp(prefix=f".{_INDEX}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            os.replace(tmp, self.folder / _INDEX)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- access --------------------------------------------------------------------------
    def __contains__(self, case_id: object) -> bool:
        return case_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def cases(self) -> List[str]:
        return list(self._index)

    def epoch_of(self, case_id: str) -> int:
        return self._index[case_id]["epoch"]

    def put(self, case_id: str, pseudo: Optional[PseudoLabel], epoch: int) -> None:
        """Remember ``pseudo`` (or ``None``: no pseudo-label for this case) computed at ``epoch``."""
        case_id, epoch = str(case_id), int(epoch)
        old = self._index.get(case_id)
        entry: Dict[str, Any] = {"epoch": epoch, "empty": pseudo is None, "file": None}
        self._memory.pop(case_id, None)
        if self.folder is not None:
            name = _file_name(case_id)
            if pseudo is not None:
                pseudo.save(self.folder / name, metadata={"case_id": case_id, "epoch": epoch})
                entry["file"] = name
            elif old is not None and old.get("file"):
                (self.folder / old["file"]).unlink(missing_ok=True)
        self._index[case_id] = entry
        if pseudo is not None:
            self._memory[case_id] = pseudo
            self._evict()
        if self.autoflush:
            self.flush()

    def get(self, case_id: str) -> Tuple[Optional[PseudoLabel], int]:
        """``(pseudo-label or None, epoch)``; ``KeyError`` when never computed."""
        entry = self._index[case_id]  # KeyError: never computed
        if entry["empty"]:
            return None, entry["epoch"]
        if case_id in self._memory:
            self._memory.move_to_end(case_id)
            return self._memory[case_id], entry["epoch"]
        if self.folder is None or not entry.get("file"):  # pragma: no cover - memory-only entries are never evicted
            raise KeyError(case_id)
        pseudo = PseudoLabel.load(self.folder / entry["file"])
        self._memory[case_id] = pseudo
        self._evict()
        return pseudo, entry["epoch"]

    def due(self, case_id: str, epoch: int, every: int) -> bool:
        """True when ``case_id`` was never computed, or computed ``every`` or more epochs before
        ``epoch``; ``every <= 0``: computed once, never refreshed."""
        entry = self._index.get(case_id)
        if entry is None:
            return True
        if every <= 0:
            return False
        return int(epoch) - entry["epoch"] >= int(every)

    def _evict(self) -> None:
        if self.folder is None:
            return
        while len(self._memory) > 1 and sum(p.nbytes for p in self._memory.values()) > self.max_memory_bytes:
            self._memory.popitem(last=False)

    def summary(self) -> Dict[str, Any]:
        """Counts for logs: cases known, cases without a pseudo-label, oldest/newest epoch."""
        epochs = [e["epoch"] for e in self._index.values()]
        return {"cases": len(self._index), "empty": sum(e["empty"] for e in self._index.values()),
                "oldest_epoch": min(epochs) if epochs else None, "newest_epoch": max(epochs) if epochs else None}
