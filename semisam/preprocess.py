"""Invertible preprocessing of ultrasound volumes (handbook §1.2).

``preprocess(volume, config)`` runs, in order:

1. RF -> envelope (optional): magnitude of the analytic signal along the beam axis, then log
   compression to a fixed dynamic range (dB) mapped to [0, 1].
2. Intensity normalisation to [0, 1] between robust percentiles.
3. Resampling to the target spacing (default 0.5 mm isotropic) **and** crop/pad to the target
   shape (default 128³) in one interpolation: the output grid keeps the input's axes
   (direction), sits on the lattice of the resampled field of view, and is centred on the
   ultrasound field of view (the bounding box of non-zero voxels) or on the volume.

It returns the preprocessed :class:`~semisam.volume.Volume` (a real grid in patient space) and
a :class:`PreprocessRecord`. ``invert(record, prediction)`` maps a label map (nearest
neighbour) or probability map (linear) from the preprocessed grid back onto the original grid:
same shape, spacing, origin and direction. A one-slice volume (a 2D image) stays one slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy.signal import hilbert

from .errors import InputError
from .volume import Volume, check_not_constant

@dataclass
class PreprocessConfig:
    """Settings of :func:`preprocess` (all have the handbook's defaults).

    Attributes:
        target_spacing: output voxel size in mm, ITK order (x, y, z).
        target_shape: output grid size, array order (z, y, x).
        envelope: the input is RF data: detect the envelope and log-compress it first.
        beam_axis: numpy axis (0 = z, 1 = y, 2 = x) along which RF lines run (depth).
        dynamic_range_db: log-compression range for the envelope.
        percentiles: intensities at these percentiles map to 0 and 1 (clipped outside).
        crop: ``"whole"`` makes the grid cover the whole field of view (the bounding box of the
            non-zero voxels, else the whole volume), at least ``target_shape`` in each axis and
            centred on it: nothing is cropped, and ``target_shape[1:]`` is the in-plane tile a
            student decodes (:mod:`semisam.tiling`). ``"fov"`` crops/pads to exactly
            ``target_shape`` centred on the field of view, ``"center"`` centred on the volume.
        tile_overlap: fraction of a tile shared with its neighbour when a grid is wider than
            one tile (:func:`semisam.tiling.tile_starts`).
    """

    target_spacing: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    target_shape: Tuple[int, int, int] = (128, 128, 128)
    envelope: bool = False
    beam_axis: int = 1
    dynamic_range_db: float = 60.0
    percentiles: Tuple[float, float] = (0.5, 99.5)
    crop: str = "fov"
    tile_overlap: float = 0.25

    def __post_init__(self) -> None:
        self.target_spacing = tuple(float(s) for s in self.target_spacing)  # type: ignore[assignment]
        self.target_shape = tuple(int(n) for n in self.target_shape)  # type: ignore[assignment]
        self.percentiles = tuple(float(p) for p in self.percentiles)  # type: ignore[assignment]
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing needs three positive values, got {self.target_spacing}")
        if len(self.target_shape) != 3 or min(self.target_shape) < 1:
            raise ValueError(f"target_shape needs three positive sizes, got {self.target_shape}")
        if self.beam_axis not in (0, 1, 2):
            raise ValueError(f"beam_axis must be 0, 1 or 2 (numpy axis), got {self.beam_axis}")
        if self.dynamic_range_db <= 0:
            raise ValueError("dynamic_range_db must be positive")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.crop not in ("whole", "fov", "center"):
            raise ValueError(f"crop must be 'whole', 'fov' or 'center', got {self.crop!r}")
        self.tile_overlap = float(self.tile_overlap)
        if not 0.0 <= self.tile_overlap < 0.9:
            raise ValueError(f"tile_overlap must lie in [0, 0.9), got {self.tile_overlap}")

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Grid:
    """A voxel grid in patient space (what a Volume has besides its voxels)."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # 9 values, row-major

    @classmethod
    def of(cls, volume: Volume) -> "Grid":
        return cls(volume.shape, tuple(volume.spacing), tuple(volume.origin), tuple(volume.direction.ravel()))

    def reference(self) -> sitk.Image:
        """An empty SimpleITK image carrying this grid (for resampling onto it)."""
        z, y, x = self.shape
        image = sitk.Image([x, y, z], sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def volume(self, array: np.ndarray) -> Volume:
        return Volume(array, self.spacing, self.origin, np.reshape(self.direction, (3, 3)))

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Grid":
        return cls(tuple(d["shape"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))


@dataclass
class PreprocessRecord:
    """Everything needed to map results from the preprocessed grid back to the input's."""

    original: Grid
    output: Grid
    config: PreprocessConfig
    intensity_range: Tuple[float, float]
    crop_offset: Tuple[int, int, int]  # (z, y, x) voxel offset of the crop on the resampled lattice

    def to_dict(self) -> Dict[str, Any]:
        return {
            "original": self.original.to_dict(),
            "output": self.output.to_dict(),
            "config": self.config.to_dict(),
            "intensity_range": list(self.intensity_range),
            "crop_offset": list(self.crop_offset),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PreprocessRecord":
        return cls(
            Grid.from_dict(d["original"]),
            Grid.from_dict(d["output"]),
            PreprocessConfig(**d["config"]),
            tuple(d["intensity_range"]),
            tuple(d["crop_offset"]),
        )


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def envelope_log(rf: np.ndarray, beam_axis: int = 1, dynamic_range_db: float = 60.0) -> np.ndarray:
    """RF lines -> log-compressed envelope in [0, 1].

    The envelope is the magnitude of the analytic signal (Hilbert transform) along
    ``beam_axis``; it is shown in decibels relative to its maximum over ``dynamic_range_db``.
    """
    env = np.abs(hilbert(np.asarray(rf, dtype=np.float64), axis=beam_axis))
    peak = float(env.max())
    if peak <= 0:
        return np.zeros(env.shape, dtype=np.float32)
    db = 20.0 * np.log10(np.maximum(env / peak, 1e-12))
    return ((np.clip(db, -dynamic_range_db, 0.0) + dynamic_range_db) / dynamic_range_db).astype(np.float32)


def normalise(array: np.ndarray, percentiles: Tuple[float, float] = (0.5, 99.5)) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Map intensities linearly so the given percentiles become 0 and 1, clipping outside."""
    lo, hi = (float(v) for v in np.percentile(array, percentiles))
    if hi <= lo:  # very sparse images: fall back to the full range
        lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        raise ValueError("cannot normalise a constant image")
    out = np.clip((array.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return out.astype(np.float32), (lo, hi)


def _target_grid(volume: Volume, config: PreprocessConfig) -> Tuple[Grid, Tuple[int, int, int]]:
    """The output grid: the input's axes, target spacing, cropped/padded to the target shape
    (``crop="whole"``: grown to cover the whole field of view)."""
    spacing_in = np.asarray(volume.spacing)  # x, y, z
    size_in = np.asarray(volume.size_xyz, dtype=np.float64)
    spacing_out = np.asarray(config.target_spacing, dtype=np.float64)
    shape_out = np.asarray(config.target_shape[::-1])  # x, y, z
    if volume.shape[0] == 1:  # a 2D image stays one slice at its own thickness
        spacing_out[2] = spacing_in[2]
        shape_out[2] = 1
    # The resampled lattice starts at the field of view's edge (unbounded: beyond the input
    # it is padding).
    lattice_origin_idx = (-0.5 * spacing_in + 0.5 * spacing_out) / spacing_in  # in input index units
    # Crop centre (input continuous index, x y z): the field of view or the grid centre.
    lo, hi = np.zeros(3), size_in - 1
    if config.crop in ("fov", "whole"):
        lo, hi = _fov_box(volume.array, lo, hi)
    centre_in = (lo + hi) / 2.0 if config.crop != "center" else (size_in - 1) / 2.0
    if config.crop == "whole":  # every voxel of the field of view lands on the grid
        need = np.ceil((hi - lo + 1) * spacing_in / spacing_out - 1e-6).astype(int)
        shape_out = np.maximum(shape_out, need)
    # Same centre on the lattice (in lattice voxel units), then the integer crop start.
    centre_lattice = (centre_in - lattice_origin_idx) * spacing_in / spacing_out
    start = np.round(centre_lattice - (shape_out - 1) / 2.0).astype(int)
    if volume.shape[0] == 1:
        start[2] = 0
    origin_idx = lattice_origin_idx + start * spacing_out / spacing_in
    origin = volume.index_to_physical(origin_idx)
    grid = Grid(
        tuple(int(n) for n in shape_out[::-1]),
        tuple(float(s) for s in spacing_out),
        tuple(float(o) for o in origin),
        tuple(volume.direction.ravel()),
    )
    return grid, tuple(int(s) for s in start[::-1])


def _fov_box(array: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Bounding box (x, y, z input indices, inclusive) of the non-zero voxels (an ultrasound
    sector's field of view), else (``lo``, ``hi``) for an image without zeros or all zeros."""
    if not np.any(array != 0):
        return lo, hi
    hits = [np.flatnonzero(np.any(array != 0, axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    return np.array([h[0] for h in hits], dtype=np.float64), np.array([h[-1] for h in hits], dtype=np.float64)


def resample_to_grid(volume: Volume, grid: Grid, interpolation: str = "linear", default: float = 0.0) -> np.ndarray:
    """Sample ``volume`` onto ``grid`` (voxels outside the input take ``default``)."""
    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in interpolators:
        raise ValueError(f"interpolation must be one of {sorted(interpolators)}")
    image = volume.to_sitk()
    out = sitk.Resample(image, grid.reference(), sitk.Transform(), interpolators[interpolation], float(default), image.GetPixelID())
    return sitk.GetArrayFromImage(out)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def preprocess(volume: Volume, config: Optional[PreprocessConfig] = None) -> Tuple[Volume, PreprocessRecord]:
    """Envelope (optional), normalise, resample and crop/pad; see the module docstring.

    Raises:
        InputError: the image holds NaN/Inf or a single value.
    """
    config = config or PreprocessConfig()
    source = volume.meta.get("source")
    if not np.isfinite(volume.array).all():
        raise InputError(source, "image has NaN or infinite voxels", "fix the export")
    check_not_constant(volume, source)
    array = volume.array
    if config.envelope:
        array = envelope_log(array, config.beam_axis, config.dynamic_range_db)
    array, intensity_range = normalise(array, config.percentiles)
    normalised = volume.with_array(array)
    grid, offset = _target_grid(normalised, config)
    out = resample_to_grid(normalised, grid, "linear").astype(np.float32)
    record = PreprocessRecord(Grid.of(volume), grid, config, intensity_range, offset)
    result = grid.volume(np.clip(out, 0.0, 1.0))
    result.meta = {"source": source, "preprocessed": True}
    return result, record


def apply_to_label(record: PreprocessRecord, label: Volume) -> Volume:
    """Map a label map given on the original grid onto the preprocessed grid (nearest)."""
    if label.shape != tuple(record.original.shape):
        raise InputError(
            label.meta.get("source"),
            f"label grid {list(label.shape)} differs from its image's {list(record.original.shape)}",
        )
    arr = resample_to_grid(label, record.output, "nearest")
    return record.output.volume(arr.astype(label.array.dtype))


def invert(record: PreprocessRecord, prediction: np.ndarray, kind: str = "auto") -> Union[Volume, List[Volume]]:
    """Map a prediction on the preprocessed grid back onto the original grid.

    Args:
        record: from :func:`preprocess`.
        prediction: ``(z, y, x)`` label map / probability map, or ``(C, z, y, x)`` channels.
        kind: ``"label"`` (nearest neighbour), ``"probability"`` (linear) or ``"auto"``
            (integer/bool arrays are labels, floats are probabilities).

    Returns:
        A Volume with the original shape, spacing, origin and direction (a list of them, one
        per channel, for a 4D prediction). Voxels outside the crop are 0.
    """
    prediction = np.asarray(prediction)
    if kind == "auto":
        kind = "label" if prediction.dtype.kind in "biu" else "probability"
    if kind not in ("label", "probability"):
        raise ValueError(f"kind must be 'label', 'probability' or 'auto', got {kind!r}")
    out_shape = tuple(record.output.shape)
    if prediction.shape[-3:] != out_shape or prediction.ndim not in (3, 4):
        raise ValueError(f"prediction shape {prediction.shape} does not match the preprocessed grid {out_shape}")
    interpolation = "nearest" if kind == "label" else "linear"
    if prediction.dtype == bool:
        prediction = prediction.astype(np.uint8)
    if kind == "probability":
        prediction = prediction.astype(np.float32)
    channels = prediction[None] if prediction.ndim == 3 else prediction
    back = [
        record.original.volume(resample_to_grid(record.output.volume(c), record.original, interpolation))
        for c in channels
    ]
    return back[0] if prediction.ndim == 3 else back
