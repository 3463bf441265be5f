"""Experiment planning: a data set's fingerprint -> training grid, tiles and encoder side.

``semisam plan DATASET`` (and ``semisam init-config --dataset DATASET``) runs, like nnU-Net's
fingerprint -> plan (Isensee et al., Nature Methods 2021):

1. :func:`fingerprint`: every image of the labeled, unlabeled and validation cases, one at a
   time: shape, spacing, direction, orientation code, and the bounding box of its non-zero
   voxels (the ultrasound sector: what ``crop: whole`` has to cover). The voxels are read to
   find that box (one volume in memory at a time, scanned in slabs); ``voxels=False`` reads
   headers only and takes the whole grid as the field of view.
2. :func:`make_plan`: the target spacing (median per axis; an anisotropic coarsest axis takes
   its 10th percentile, nnU-Net's rule), the encoder's input side (128 px on a CPU, 256 on
   CUDA), the in-plane tile (a multiple of the encoder's token grid) and the depth block, the
   tiling of the median volume, and the costs: encoder time over the data set, embedding
   memory, decoder training time. When a ``budget_minutes`` for the embedding is given and not
   met, the plan coarsens (the encoder side on CUDA, then in-plane spacing, then slice
   spacing) and says what it gave up. A single volume whose embeddings and voxels do not fit
   ``memory_gb`` is an error naming it, with the estimate and what changes it.
3. :func:`apply_plan` / :func:`update_config_file`: the planned keys into a
   :class:`~semisam.config.TrainConfig` or a YAML file (other settings kept).

Array axes are ``(z, y, x)``; the encoder sees ``(y, x)`` slices and the student's depth
blocks run along ``z``. Spacings are in ITK order ``(x, y, z)``. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import yaml

from .config import TrainConfig, _yaml_scalar, config_from_dict, default_yaml, set_dotted
from .data import DatasetSpec, load_dataset
from .errors import InputError, SemiSAMError
from .volume import DICOM, format_of, read_header, read_volume

# ------------------------------------------------------------------------------------------
# Cost model. Every constant names its source; change them when a benchmark says otherwise.
# ------------------------------------------------------------------------------------------

#: Seconds per encoded slice-tile of the frozen LiteMedSAM TinyViT on ``CPU_REFERENCE_CORES``
#: CPU cores, by input side: the torch fast path (training's default backend: folded
#: BatchNorm, channels-last, bf16 autocast where native, batches of 8), BENCHMARKS.md,
#: ``scripts/bench_encoder.py``, 2026-12-03, 2 cores of an AMD EPYC (Zen 4). Eager fp32 was
#: 0.295 / 1.422 s, OpenVINO fp32 0.139 / 0.589 s. Other sides scale with side² (the
#: encoder's cost is ~ side², config.EncoderSection.input_size).
CPU_SECONDS_PER_TILE: Dict[int, float] = {128: 0.180, 256: 0.875}
CPU_REFERENCE_CORES = 2
#: A GPU is taken as this many times faster than the 2-core CPU above. An assumption (no GPU
#: measurement in BENCHMARKS.md), printed as such.
GPU_SPEEDUP = 100.0
#: One slice-tile's embedding: 256 channels x (side/4)^2 tokens, fp16 (models.encoders.EmbeddingCache).
EMBED_CHANNELS = 256
EMBED_BYTES = 2
#: Decoder training, seconds per block voxel on 2 CPU cores: ``scripts/bench_cache.py`` (README,
#: Training): a phase-1 epoch of the demo's configuration (student + EMA teacher, all losses,
#: 16-slice blocks of 96 x 96 at 128 px, 3 context blocks, Zen 3, fp32) took 5.4 s for 192
#: block slices with the embedding cache. Pseudo-label refreshes and validation not included.
TRAIN_SECONDS_PER_VOXEL = 5.4 / (192 * 96 * 96)
#: nnU-Net's anisotropy threshold (ExperimentPlanner.anisotropy_threshold).
ANISOTROPY = 3.0
#: A case whose spacing or field of view differs from the median by more than this factor is named.
OUTLIER_RATIO = 2.0
#: Budget ladder: in-plane spacing factors first (fewer tiles per slice), then slice spacing.
INPLANE_STEPS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)  # x the data set's in-plane spacing
DEPTH_STEPS = (1.5, 2.0, 3.0, 4.0)  # x its slice spacing
BLOCK_DEPTH = 16
TILE_OVERLAP = 0.25
AXES = ("x", "y", "z")


class PlanError(SemiSAMError):
    """The data set cannot be planned as given (2D images, unreadable files, a volume too big)."""


# ------------------------------------------------------------------------------------------
# Fingerprint
# ------------------------------------------------------------------------------------------


@dataclass
class CaseRecord:
    """What the plan needs of one image.

    ``shape`` is ``(z, y, x)``; ``spacing`` ``(x, y, z)`` mm; ``direction`` 9 values, row-major
    (columns: the x, y, z index axes in LPS); ``fov_box`` the first and last non-zero index per
    array axis ``(z, y, x)``, None when the voxels were not read or are all zero.
    """

    id: str
    role: str  # labeled | unlabeled | validation
    path: str
    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]
    orientation: str
    was_2d: bool = False
    fov_box: Optional[Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]] = None
    voxels_read: bool = False

    @property
    def is_2d(self) -> bool:
        return self.was_2d or self.shape[0] == 1

    @property
    def fov_voxels(self) -> Tuple[int, int, int]:
        """Extent of the field of view in voxels, (z, y, x): the non-zero box, else the grid."""
        if self.fov_box is None:
            return self.shape
        return tuple(hi - lo + 1 for lo, hi in self.fov_box)  # type: ignore[return-value]

    @property
    def fov_mm(self) -> Tuple[float, float, float]:
        """Extent of the field of view in mm, (x, y, z)."""
        z, y, x = self.fov_voxels
        return (x * self.spacing[0], y * self.spacing[1], z * self.spacing[2])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "id": self.id, "role": self.role, "path": self.path, "shape": list(self.shape),
            "spacing": list(self.spacing), "direction": list(self.direction), "orientation": self.orientation,
            "was_2d": self.was_2d, "fov_box": None if self.fov_box is None else [list(b) for b in self.fov_box],
            "fov_mm": [round(v, 3) for v in self.fov_mm], "voxels_read": self.voxels_read,
        }


def orientation_code(direction: Sequence[float]) -> str:
    """The closest axis-aligned orientation, e.g. ``LPS`` (DICOM convention, as SimpleITK names it)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in np.ravel(direction)])


def nonzero_box(array: np.ndarray, slab_voxels: int = 8 << 20) -> Optional[Tuple[Tuple[int, int], ...]]:
    """First and last index of non-zero voxels along each axis of a ``(z, y, x[, c])`` array,
    scanned in slabs of about ``slab_voxels`` (the mask of the whole volume is never made);
    None when every voxel is zero."""
    nz, ny, nx = array.shape[:3]
    any_z = np.zeros(nz, bool)
    any_y = np.zeros(ny, bool)
    any_x = np.zeros(nx, bool)
    step = max(1, slab_voxels // max(1, ny * nx))
    for z0 in range(0, nz, step):
        mask = array[z0:z0 + step] != 0
        if mask.ndim == 4:  # vector pixels: a voxel counts when any component is non-zero
            mask = mask.any(axis=-1)
        any_z[z0:z0 + step] = mask.any(axis=(1, 2))
        any_y |= mask.any(axis=(0, 2))
        any_x |= mask.any(axis=(0, 1))
    if not any_z.any():
        return None

    def span(a: np.ndarray) -> Tuple[int, int]:
        idx = np.flatnonzero(a)
        return int(idx[0]), int(idx[-1])

    return span(any_z), span(any_y), span(any_x)


def _read_box(path: Path, was_2d: bool) -> Optional[Tuple[Tuple[int, int], ...]]:
    _, fmt = format_of(path)
    if fmt == DICOM:
        return nonzero_box(read_volume(path).array)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"voxels cannot be read ({str(exc).strip().splitlines()[-1][:200]})", "the file is probably truncated") from None
    view = sitk.GetArrayViewFromImage(image)
    if was_2d:
        view = view[None]
    box = nonzero_box(view)
    del view, image
    return box


def fingerprint(dataset: Union[str, os.PathLike, DatasetSpec], voxels: bool = True,
                progress: Optional[Callable[[int, int, str], None]] = None) -> List[CaseRecord]:
    """One :class:`CaseRecord` per image of the labeled, unlabeled and validation cases (the
    test split is never looked at). ``voxels``: also read each image (one at a time) for the
    bounding box of its non-zero voxels. ``progress(i, n, case_id)`` after each case.

    Raises:
        PlanError: no cases, or images that cannot be read (all of them named).
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else load_dataset(dataset)
    cases = [(c, "labeled") for c in spec.labeled] + [(c, "unlabeled") for c in spec.unlabeled] + [(c, "validation") for c in spec.validation]
    if not cases:
        raise PlanError(f"{spec.root}: no images to plan from (no labeled, unlabeled or validation cases)")
    records: List[CaseRecord] = []
    problems: List[str] = []
    for i, (case, role) in enumerate(cases):
        try:
            header = read_header(case.image)
            box = _read_box(Path(case.image), header.was_2d) if voxels else None
        except InputError as exc:
            problems.append(f"{case.id}: {exc}")
        else:
            records.append(CaseRecord(
                case.id, role, str(case.image), tuple(int(n) for n in header.shape),
                tuple(float(s) for s in header.spacing), tuple(float(v) for v in np.ravel(header.direction)),
                orientation_code(header.direction), header.was_2d, box, voxels,
            ))
        if progress is not None:
            progress(i + 1, len(cases), case.id)
    if problems:
        raise PlanError(f"{len(problems)} of {len(cases)} image(s) cannot be read: " + "; ".join(problems)
                        + " (`semisam validate` lists every problem)")
    return records


# ------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A planned training configuration with a one-line reason per planned key."""

    device: str
    cores: int
    counts: Dict[str, int]
    target_spacing: Tuple[float, float, float]  # x, y, z mm
    input_size: int
    tile: int  # in-plane tile side, voxels
    block_depth: int
    tile_overlap: float
    median_shape: Tuple[int, int, int]  # the median volume's field of view at the target spacing, (z, y, x)
    tiles_per_slice: Tuple[int, int]  # (y, x) tiles of the median volume
    slice_tiles_per_volume: int  # encoded slice-tiles of the median volume
    slice_tiles_total: int  # encodings over the data set (student + in-plane teacher views)
    seconds_per_tile: float
    embedding_seconds: float
    embedding_gb: float  # fp16 embeddings of the data set (student views)
    largest_case: str
    largest_gb: float
    memory_gb: float
    budget_minutes: Optional[float]
    fits_budget: bool
    training_seconds: Optional[float]
    training_steps: int
    data_spacing: Tuple[float, float, float]  # the data set's own (before any coarsening)
    reasons: Dict[str, str] = field(default_factory=dict)
    costs: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    given_up: List[str] = field(default_factory=list)
    outliers: Dict[str, List[str]] = field(default_factory=dict)
    crop: str = "whole"

    @property
    def target_shape(self) -> Tuple[int, int, int]:
        return (self.block_depth, self.tile, self.tile)

    def settings(self) -> Dict[str, Any]:
        """The planned keys, dotted, with plain values (what goes into a config)."""
        return {
            "preprocess.target_spacing": [float(s) for s in self.target_spacing],
            "encoder.input_size": int(self.input_size),
            "preprocess.target_shape": [int(n) for n in self.target_shape],
            "student.block_depth": int(self.block_depth),
            "preprocess.tile_overlap": float(self.tile_overlap),
            "preprocess.crop": self.crop,
        }

    def lines(self) -> List[str]:
        """The plan for people: each planned key with its reason, the costs, what was given up."""
        n = sum(self.counts.values())
        parts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        out = [f"plan from {n} volume{'s' if n != 1 else ''} ({parts}) for {self.device}" + (f" ({self.cores} cores)" if self.device == "cpu" else "") + ":"]
        for key, value in self.settings().items():
            out.append(f"  {key}: {_yaml_scalar(value)}  -- {self.reasons[key]}")
        out.append("costs:")
        out.extend(f"  {line}" for line in self.costs)
        if self.given_up:
            out.append("given up to fit the budget:")
            out.extend(f"  {line}" for line in self.given_up)
        if self.notes:
            out.append("notes:")
            out.extend(f"  {line}" for line in self.notes)
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {
            "device": self.device, "cores": self.cores, "cases": dict(self.counts),
            "settings": self.settings(), "reasons": dict(self.reasons),
            "data_spacing": [round(s, 6) for s in self.data_spacing],
            "median_shape": list(self.median_shape), "tiles_per_slice": list(self.tiles_per_slice),
            "slice_tiles_per_volume": self.slice_tiles_per_volume, "slice_tiles_total": self.slice_tiles_total,
            "seconds_per_tile": self.seconds_per_tile, "embedding_seconds": round(self.embedding_seconds, 1),
            "segment_seconds_per_volume": round(self.slice_tiles_per_volume * self.seconds_per_tile, 2),
            "embedding_gb": round(self.embedding_gb, 4), "largest_case": self.largest_case,
            "largest_gb": round(self.largest_gb, 4), "memory_gb": round(self.memory_gb, 3),
            "budget_minutes": self.budget_minutes, "fits_budget": self.fits_budget,
            "training_seconds": None if self.training_seconds is None else round(self.training_seconds, 1),
            "training_steps": self.training_steps, "given_up": list(self.given_up), "notes": list(self.notes),
            "outliers": {k: list(v) for k, v in self.outliers.items()}, "costs": list(self.costs),
        }


def default_memory_gb() -> float:
    """75 % of this machine's RAM (psutil when installed, else sysconf; 8 GB when unknown)."""
    total = None
    try:
        import psutil  # type: ignore

        total = float(psutil.virtual_memory().total)
    except Exception:
        try:
            total = float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            total = None
    return 0.75 * total / (1 << 30) if total else 8.0


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def seconds_per_tile(input_size: int, device: str, cores: int) -> float:
    """Encoder seconds per slice-tile at ``input_size`` px (see :data:`CPU_SECONDS_PER_TILE`)."""
    ref = 128 if input_size <= 192 else 256
    two_core = CPU_SECONDS_PER_TILE[ref] * (input_size / ref) ** 2
    if device == "cuda":
        return two_core / GPU_SPEEDUP
    return two_core * CPU_REFERENCE_CORES / max(1, cores)


def tiles_along(n: int, tile: int, overlap: float) -> int:
    """Tiles of side ``tile`` overlapping by ``overlap`` that cover ``n`` voxels: the lattice
    training and ``segment`` use (:func:`semisam.tiling.tile_starts`)."""
    from .tiling import tile_starts

    return len(tile_starts(max(1, int(n)), min(int(tile), max(1, int(n))), overlap))


def embedding_bytes(input_size: int) -> int:
    """One slice-tile's fp16 embedding: 256 channels x (side/4)^2 tokens x 2 bytes."""
    return EMBED_CHANNELS * (input_size // 4) ** 2 * EMBED_BYTES


def _grid(rec: CaseRecord, spacing: Sequence[float]) -> Tuple[int, int, int]:
    """The field of view of a case at ``spacing``, in voxels (z, y, x)."""
    x, y, z = (max(1, int(math.ceil(mm / s - 0.05))) for mm, s in zip(rec.fov_mm, spacing))  # a 5 % sliver of a voxel is not one more
    return (z, y, x)


def _median_int(values: Sequence[float]) -> int:
    return int(math.ceil(float(np.median(values)) - 1e-9))


def pick_tile(input_size: int, need: int) -> int:
    """In-plane tile side: a multiple of the token grid (input/4) from input/2 to input; the
    smallest that holds ``need`` voxels in one tile, else the input side itself (one voxel per
    encoder pixel; a larger grid is tiled)."""
    grid = input_size // 4
    if need <= input_size:
        return max(input_size // 2, grid * int(math.ceil(need / grid)))
    return input_size


@dataclass
class _Layout:
    input_size: int
    spacing: Tuple[float, float, float]
    tile: int
    block_depth: int
    median_shape: Tuple[int, int, int]
    tiles_per_slice: Tuple[int, int]
    per_case_tiles: List[int]
    per_case_grid: List[Tuple[int, int, int]]
    encodings: int
    seconds: float


def _layout(records: List[CaseRecord], spacing: Tuple[float, float, float], input_size: int, overlap: float,
            device: str, cores: int, extra_views: int) -> _Layout:
    grids = [_grid(r, spacing) for r in records]
    median = tuple(_median_int([g[a] for g in grids]) for a in range(3))
    tile = pick_tile(input_size, max(median[1], median[2]))
    depth = max(1, min(BLOCK_DEPTH, median[0]))
    per_case = [g[0] * tiles_along(g[1], tile, overlap) * tiles_along(g[2], tile, overlap) for g in grids]
    encodings = sum(t * (1 + (extra_views if r.role == "unlabeled" else 0)) for t, r in zip(per_case, records))
    tps = (tiles_along(median[1], tile, overlap), tiles_along(median[2], tile, overlap))
    return _Layout(input_size, spacing, tile, depth, median, tps, per_case, grids, encodings,
                   encodings * seconds_per_tile(input_size, device, cores))


def _fmt_mm(v: float) -> str:
    return f"{v:.3g}"


def _names(ids: Sequence[str], limit: int = 8) -> str:
    ids = list(ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_3d(records: List[CaseRecord]) -> None:
    flat = [r for r in records if r.is_2d]
    if not flat:
        return
    if len(flat) == len(records):
        raise PlanError(f"the plan is for 3D volumes: all {len(records)} images of this data set are 2D (one slice each); "
                        "the student segments 3D volumes (2D images go to the interactive Segment Editor effect)")
    what = ", ".join(f"{r.id} ({r.shape[1]}x{r.shape[2]}, {'a 2D image' if r.was_2d else 'one slice'})" for r in flat[:8])
    more = f" and {len(flat) - 8} more" if len(flat) > 8 else ""
    raise PlanError(f"{len(flat)} of {len(records)} images are 2D, not 3D volumes: {what}{more}; "
                    "remove them from the data set or replace them by their 3D volumes")


def _outliers(records: List[CaseRecord], notes: List[str]) -> Dict[str, List[str]]:
    """Name cases whose orientation, spacing or field of view differ from the rest."""
    found: Dict[str, List[str]] = {}
    codes = Counter(r.orientation for r in records)
    main, count = codes.most_common(1)[0]
    if len(codes) > 1:
        groups = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
        axes_main = tuple(groups[c] for c in main)
        odd = [r for r in records if r.orientation != main]
        found["orientation"] = [r.id for r in odd]
        desc = []
        for r in odd:
            permuted = tuple(groups[c] for c in r.orientation) != axes_main
            desc.append(f"{r.id} ({r.orientation}{': other axes' if permuted else ': flipped'})")
        notes.append(f"orientation: {count} of {len(records)} volumes are {main}; differently oriented: {_names(desc)}. "
                     "Spacing and tiles are planned per array axis (z = slices); where the axes are permuted, the slices "
                     "of those volumes cut the anatomy another way: check them (or reorient them) before training")
    spacings = np.array([r.spacing for r in records])
    med = np.median(spacings, axis=0)
    odd_ids: List[str] = []
    desc = []
    for r, s in zip(records, spacings):
        ratio = s / med
        bad = [AXES[a] for a in range(3) if ratio[a] > OUTLIER_RATIO or ratio[a] < 1.0 / OUTLIER_RATIO]
        if bad:
            odd_ids.append(r.id)
            desc.append(f"{r.id} ({' x '.join(_fmt_mm(v) for v in s)} mm)")
    if odd_ids:
        found["spacing"] = odd_ids
        notes.append(f"spacing outliers (more than {OUTLIER_RATIO:g}x from the median {' x '.join(_fmt_mm(v) for v in med)} mm "
                     f"on some axis): {_names(desc)}; the medians ignore them, but they are resampled far from their own grid")
    fovs = np.array([r.fov_mm for r in records])
    fmed = np.median(fovs, axis=0)
    odd_ids, desc = [], []
    for r, f in zip(records, fovs):
        ratio = f / fmed
        if np.any(ratio > OUTLIER_RATIO) or np.any(ratio < 1.0 / OUTLIER_RATIO):
            odd_ids.append(r.id)
            desc.append(f"{r.id} ({' x '.join(f'{v:.0f}' for v in f)} mm)")
    if odd_ids:
        found["field_of_view"] = odd_ids
        notes.append(f"field-of-view outliers (more than {OUTLIER_RATIO:g}x from the median {' x '.join(f'{v:.0f}' for v in fmed)} mm): "
                     f"{_names(desc)}; they take more (or fewer) tiles than the median volume")
    empty = [r.id for r in records if r.voxels_read and r.fov_box is None]
    if empty:
        found["all_zero"] = empty
        notes.append(f"images with no non-zero voxel (the whole grid is taken as their field of view): {_names(empty)}")
    return found


def _target_spacing(records: List[CaseRecord]) -> Tuple[Tuple[float, float, float], str]:
    """Median spacing per axis; nnU-Net's anisotropy rule for the coarsest axis. Returns the
    spacing (x, y, z) and the reason."""
    spacings = np.array([r.spacing for r in records], dtype=np.float64)
    sizes = np.array([r.fov_voxels[::-1] for r in records], dtype=np.float64)  # x, y, z
    n = len(records)
    vols = f"{n} volume{'s' if n != 1 else ''}"
    target = np.median(spacings, axis=0)
    median_size = np.median(sizes, axis=0)
    worst = 2 - int(np.argmax(np.round(target, 4)[::-1]))  # the coarsest axis; z (the slices) on a tie
    others = [a for a in range(3) if a != worst]
    coarsest_other = max(target[a] for a in others)
    aniso_spacing = target[worst] > ANISOTROPY * coarsest_other
    aniso_voxels = median_size[worst] * ANISOTROPY < min(median_size[a] for a in others)
    in_plane = " and ".join(f"{AXES[a]} {_fmt_mm(target[a])} mm" for a in others)
    head = f"{in_plane}: median{'s' if len(others) > 1 else ''} of {vols}; "
    ax = AXES[worst]
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        chosen = max(p10, coarsest_other)
        than = "(= the median here)" if p10 == target[worst] else f"not the median {_fmt_mm(target[worst])} mm,"
        why = (f"{ax} {_fmt_mm(chosen)} mm: the 10th percentile of {vols} {than} "
               f"because {ax} is anisotropic (median spacing > {ANISOTROPY:g}x {_fmt_mm(coarsest_other)} mm and "
               f"{median_size[worst]:.0f} voxels < 1/{ANISOTROPY:g} of {min(median_size[a] for a in others):.0f}: nnU-Net's rule, "
               "finer slices against interpolation artefacts)")
        if chosen > p10:
            why += f", raised from {_fmt_mm(p10)} to the coarsest other axis"
        target[worst] = chosen
    elif aniso_spacing:
        why = (f"{ax} {_fmt_mm(target[worst])} mm: median of {vols} (> {ANISOTROPY:g}x the other axes, but with "
               f"{median_size[worst]:.0f} voxels not fewer than 1/{ANISOTROPY:g} of theirs: nnU-Net keeps the median then)")
    else:
        why = f"{ax} {_fmt_mm(target[worst])} mm: median of {vols} (not anisotropic: <= {ANISOTROPY:g}x {_fmt_mm(coarsest_other)} mm)"
    return tuple(float(round(v, 4)) for v in target), head + why  # type: ignore[return-value]


def _training_estimate(records: List[CaseRecord], layout: _Layout, device: str, cores: int,
                       cfg: TrainConfig) -> Tuple[Optional[float], int, str]:
    """Decoder seconds over the configured epochs (CPU only), optimizer steps, and the line."""
    from .data import MixedBatchSampler  # the training's own batch count

    labeled = sum(r.role == "labeled" for r in records)
    unlabeled = sum(r.role == "unlabeled" for r in records)
    if not any(r.role == "validation" for r in records) and labeled >= 2 and cfg.data.validation > 0:
        labeled -= min(labeled - 1, max(1, int(round(cfg.data.validation * labeled))))
    if labeled < 1:
        return None, 0, "training: no labeled cases to train on (the estimate needs at least one)"
    b, f = cfg.data.batch_size, cfg.data.labeled_fraction
    steps = 0
    epochs = []
    for _, name, ph in cfg.phase_list():
        n_u = unlabeled if name != "warmup" else 0
        steps += ph.epochs * len(MixedBatchSampler(labeled, n_u, b, f))
        epochs.append(str(ph.epochs))
    voxels = layout.block_depth * layout.tile * layout.tile
    what = f"{steps} steps of {b} block(s) of {layout.block_depth}x{layout.tile}x{layout.tile} for {' + '.join(epochs)} epochs"
    if device == "cuda":
        return None, steps, f"training: {what}; time not estimated on a GPU (no GPU measurement of the decoder in BENCHMARKS.md)"
    seconds = steps * b * voxels * TRAIN_SECONDS_PER_VOXEL * CPU_REFERENCE_CORES / max(1, cores)
    return seconds, steps, (f"training: ~{_duration(seconds)} of decoder steps ({what}; scripts/bench_cache.py's 2-core rate, "
                            "pseudo-label refreshes and validation not counted)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _volume_bytes(rec: CaseRecord, grid: Tuple[int, int, int], tiles: int, input_size: int) -> float:
    """Peak memory of one volume: its slice-tile embeddings (fp16), its voxels as float32, and
    the resampled grid twice (the image and a probability map, float32)."""
    return tiles * embedding_bytes(input_size) + 4.0 * float(np.prod(rec.shape)) + 8.0 * float(np.prod(grid))


def make_plan(records: List[CaseRecord], device: str = "cpu", budget_minutes: Optional[float] = None,
              memory_gb: Optional[float] = None, config: Optional[TrainConfig] = None,
              cores: Optional[int] = None) -> Plan:
    """Plan the training grid from :func:`fingerprint` records (see the module docstring).

    Args:
        device: ``cpu`` or ``cuda`` (the encoder side and the speed of the cost model).
        budget_minutes: encoder time allowed to embed the data set once; None: not limited.
        memory_gb: memory one volume may take (default 75 % of this machine's RAM).
        config: the training settings the estimates use (epochs, batch, teacher views);
            default :class:`~semisam.config.TrainConfig`'s.
        cores: CPU cores the encoder gets (default: those this process may run on).

    Raises:
        PlanError: 2D images; a volume that does not fit ``memory_gb`` at the planned grid.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if budget_minutes is not None and budget_minutes <= 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}")
    if memory_gb is not None and memory_gb <= 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    if not records:
        raise PlanError("no images to plan from")
    _check_3d(records)
    cfg = config or TrainConfig()
    cores = int(cores or cpu_cores())
    memory = float(memory_gb) if memory_gb is not None else default_memory_gb()
    overlap = float(cfg.preprocess.tile_overlap)  # the config's (a user's choice is kept), default 0.25
    extra_views = (cfg.pseudo.views - 1) if cfg.pseudo.inplane_views else 0
    notes: List[str] = []
    outliers = _outliers(records, notes)
    base_spacing, spacing_reason = _target_spacing(records)

    # Candidates from the finest: every in-plane factor (and, on CUDA, 256 then 128 px) at the
    # data set's slice spacing first, then the same at each coarser slice spacing. The first that
    # fits wins: in-plane spacing is given up before slices, and never where it saves nothing
    # (a field of view already in one tile costs the same at a coarser in-plane spacing).
    sides = (256, 128) if device == "cuda" else (128,)
    ladder: List[Tuple[int, float, float]] = [(s, f, d) for d in (1.0,) + DEPTH_STEPS for f in INPLANE_STEPS for s in sides]

    def at(step: Tuple[int, float, float]) -> _Layout:
        side, f, d = step
        sp = (round(base_spacing[0] * f, 4), round(base_spacing[1] * f, 4), round(base_spacing[2] * d, 4))
        return _layout(records, sp, side, overlap, device, cores, extra_views)

    first = at(ladder[0])
    chosen, step = first, ladder[0]
    budget_s = None if budget_minutes is None else 60.0 * float(budget_minutes)
    fits = True
    if budget_s is not None and first.seconds > budget_s:
        layouts = [(candidate, at(candidate)) for candidate in ladder]
        fitting = [(c, lay) for c, lay in layouts if lay.seconds <= budget_s]
        if fitting:
            step, chosen = fitting[0]
        else:  # the cheapest (the finest among equals), and say so
            fits = False
            step, chosen = min(layouts, key=lambda cl: cl[1].seconds)
    given_up: List[str] = []
    if chosen is not first:
        target = f"to fit {budget_minutes:g} minutes of embedding (estimated {_duration(first.seconds)} at the data set's own grid)"
        if step[0] != first.input_size:
            given_up.append(f"encoder.input_size {first.input_size} -> {step[0]} px {target}")
        if step[1] != 1.0:
            given_up.append(f"in-plane spacing {_fmt_mm(first.spacing[0])} x {_fmt_mm(first.spacing[1])} -> "
                            f"{_fmt_mm(chosen.spacing[0])} x {_fmt_mm(chosen.spacing[1])} mm (x{step[1]:g}) {target}")
        if step[2] != 1.0:
            given_up.append(f"slice spacing {_fmt_mm(first.spacing[2])} -> {_fmt_mm(chosen.spacing[2])} mm (x{step[2]:g}) {target}")
        if not fits:
            given_up.append(f"still {_duration(chosen.seconds)} > {budget_minutes:g} min at the cheapest plan the planner makes: "
                            "raise --budget-minutes, plan on a GPU, or use fewer volumes")

    # One volume must fit in memory: its embeddings, its voxels, its resampled grid.
    per_volume = [_volume_bytes(r, g, t, chosen.input_size) for r, g, t in zip(records, chosen.per_case_grid, chosen.per_case_tiles)]
    worst = int(np.argmax(per_volume))
    largest_gb = per_volume[worst] / (1 << 30)
    if largest_gb > memory:
        rec, grid = records[worst], chosen.per_case_grid[worst]
        hint = ""
        for candidate in ladder[ladder.index(step):]:
            if candidate[0] > chosen.input_size:
                continue
            lay = at(candidate)
            need = _volume_bytes(rec, lay.per_case_grid[worst], lay.per_case_tiles[worst], lay.input_size) / (1 << 30)
            if need <= memory:
                hint = (f", or coarsen the grid: preprocess.target_spacing {list(lay.spacing)} mm fits (about {need:.2f} GB; "
                        "set it in a config written with `semisam init-config --no-plan`)")
                break
        raise PlanError(
            f"case {rec.id} ({'x'.join(map(str, rec.shape))} voxels) needs about {largest_gb:.2f} GB at the planned grid "
            f"({'x'.join(map(str, grid))} voxels at {list(chosen.spacing)} mm, {chosen.per_case_tiles[worst]} slice-tiles of "
            f"{embedding_bytes(chosen.input_size) / (1 << 20):.2f} MB embeddings at {chosen.input_size} px, plus its voxels), "
            f"more than the {memory:.3g} GB allowed: raise --memory-gb (at least {math.ceil(largest_gb * 100) / 100:.2f}){hint}; "
            "nothing was written"
        )

    # Reasons, one line per planned key.
    counts = {role: sum(r.role == role for r in records) for role in ("labeled", "unlabeled", "validation")}
    n = len(records)
    reasons: Dict[str, str] = {}
    coarse = ""
    if chosen is not first:
        coarse = f"; coarsened to {' x '.join(_fmt_mm(v) for v in chosen.spacing)} mm for the budget (below)"
    reasons["preprocess.target_spacing"] = spacing_reason + coarse
    fov_kind = "the box of its non-zero voxels" if all(r.voxels_read for r in records) else "its whole grid: headers only"
    reasons["preprocess.crop"] = (f"the grid covers each volume's whole field of view ({fov_kind}; median "
                                  f"{' x '.join(str(v) for v in chosen.median_shape[::-1])} voxels x, y, z at the target spacing), "
                                  "tiled in-plane")
    if device == "cuda":
        side_reason = ("CUDA: the encoder's native 256 px" if chosen.input_size == 256
                       else "CUDA, but 128 px (a quarter of the native cost per tile) to fit the budget")
    else:
        side_reason = "CPU: 128 px, a quarter of the native 256 px cost per slice-tile"
    reasons["encoder.input_size"] = side_reason
    grid_tokens = chosen.input_size // 4
    need = max(chosen.median_shape[1], chosen.median_shape[2])
    if need <= chosen.input_size:
        tile_why = (f"tile {chosen.tile} = {chosen.tile // grid_tokens} x the {grid_tokens}-token grid: the smallest from "
                    f"{chosen.input_size // 2} that holds the median field of view ({chosen.median_shape[1]} x "
                    f"{chosen.median_shape[2]} voxels y, x) in one tile")
    else:
        tile_why = (f"tile {chosen.tile} = the {chosen.input_size} px input (one voxel per encoder pixel): the median field of "
                    f"view {chosen.median_shape[1]} x {chosen.median_shape[2]} voxels (y, x) takes "
                    f"{chosen.tiles_per_slice[0]} x {chosen.tiles_per_slice[1]} tiles")
    reasons["preprocess.target_shape"] = f"{tile_why}; depth {chosen.block_depth} = student.block_depth"
    if chosen.median_shape[0] >= BLOCK_DEPTH:
        reasons["student.block_depth"] = f"{BLOCK_DEPTH} slices per block (median depth {chosen.median_shape[0]} slices)"
    else:
        reasons["student.block_depth"] = f"{chosen.block_depth}: the median depth in slices (less than {BLOCK_DEPTH})"
    per_volume_tiles = chosen.median_shape[0] * chosen.tiles_per_slice[0] * chosen.tiles_per_slice[1]
    source = "the default" if overlap == TILE_OVERLAP else "kept from the config"
    reasons["preprocess.tile_overlap"] = (f"{overlap:g} ({source}): the median volume takes {chosen.tiles_per_slice[0]} x {chosen.tiles_per_slice[1]} "
                                          f"tiles per slice, {per_volume_tiles} encoded slice-tiles per volume")

    # Costs.
    spt = seconds_per_tile(chosen.input_size, device, cores)
    speed = (f"{spt:.3g} s each at {chosen.input_size} px on {cores} CPU core(s) (BENCHMARKS.md, torch fast path, 2 cores, "
             "scaled by cores)" if device == "cpu"
             else f"{spt:.3g} s each at {chosen.input_size} px on a GPU (assumed {GPU_SPEEDUP:g}x the 2-core CPU; not measured)")
    student_tiles = sum(chosen.per_case_tiles)
    views = (f" ({student_tiles} + {chosen.encodings - student_tiles} for {extra_views} in-plane teacher view(s) of each unlabeled volume)"
             if chosen.encodings > student_tiles else "")
    budget_text = ("no --budget-minutes: not limited" if budget_minutes is None
                   else f"{'within' if chosen.seconds <= budget_s else 'OVER'} the budget of {budget_minutes:g} min")
    emb_gb = student_tiles * embedding_bytes(chosen.input_size) / (1 << 30)
    costs = [
        f"embedding: {chosen.encodings} slice-tiles{views} x {speed} = {_duration(chosen.seconds)} ({budget_text})",
        f"segmenting a volume: the median volume's {per_volume_tiles} slice-tiles take ~{_duration(per_volume_tiles * spt)} "
        "of encoding before the decoder runs",
        f"memory: {emb_gb:.2f} GB of fp16 embeddings for the data set ({embedding_bytes(chosen.input_size) / (1 << 20):.2f} MB per slice-tile; "
        f"beyond data.max_memory_gb {cfg.data.max_memory_gb:g} they are read from the disk cache); the largest volume, "
        f"{records[worst].id}, needs about {largest_gb:.2f} GB of the {memory:.1f} GB allowed "
        f"({'--memory-gb' if memory_gb is not None else '75% of RAM'})",
    ]
    train_s, steps, train_line = _training_estimate(records, chosen, device, cores, cfg)
    costs.append(train_line)
    return Plan(
        device=device, cores=cores, counts=counts, target_spacing=chosen.spacing, input_size=chosen.input_size,
        tile=chosen.tile, block_depth=chosen.block_depth, tile_overlap=overlap, median_shape=chosen.median_shape,
        tiles_per_slice=chosen.tiles_per_slice, slice_tiles_per_volume=per_volume_tiles,
        slice_tiles_total=chosen.encodings, seconds_per_tile=spt, embedding_seconds=chosen.seconds, embedding_gb=emb_gb,
        largest_case=records[worst].id, largest_gb=largest_gb, memory_gb=memory, budget_minutes=budget_minutes,
        fits_budget=fits, training_seconds=train_s, training_steps=steps, data_spacing=base_spacing, reasons=reasons,
        costs=costs, notes=notes, given_up=given_up, outliers=outliers,
    )


# ------------------------------------------------------------------------------------------
# Into a configuration
# ------------------------------------------------------------------------------------------


def apply_plan(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """A new, validated config: ``cfg`` with the planned keys set."""
    data = cfg.to_dict()
    for key, value in plan.settings().items():
        set_dotted(data, key, value)
    return config_from_dict(data, "plan", require_dataset=False)


def _edit_yaml(text: str, key: str, value: Any) -> Optional[str]:
    """``text`` with the two-level block key ``section.name`` set to ``value`` in place (its
    comment kept), inserted when missing; None when the layout is not plain block YAML."""
    section, name = key.split(".")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    scalar = _yaml_scalar(value)
    tops = [i for i, ln in enumerate(lines) if re.match(rf"^{re.escape(section)}\s*:", ln)]
    head = next((i for i in tops if re.match(rf"^{re.escape(section)}:\s*(#.*)?$", lines[i].rstrip("\n"))), None)
    if tops and (head is None or len(tops) > 1):
        return None  # a flow mapping ({...}) or a repeated key: not edited in place
    if head is None:
        return "".join(lines) + f"\n{section}:\n  {name}: {scalar}\n"
    end = head + 1
    indent = None
    last_child = head
    while end < len(lines):
        ln = lines[end].rstrip("\n")
        if ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith((" ", "\t")):
            break
        if ln.strip() and not ln.lstrip().startswith("#"):
            here = len(ln) - len(ln.lstrip(" "))
            indent = here if indent is None else indent
            last_child = end
        end += 1
    pad = " " * (indent or 2)
    for i in range(head + 1, end):
        m = re.match(rf"^{pad}{re.escape(name)}:(\s*)(.*?)(\s+#.*)?$", lines[i].rstrip("\n"))
        if m:
            if not m.group(2):
                return None  # a block value on the following lines
            lines[i] = f"{pad}{name}: {scalar}{m.group(3) or ''}\n"
            return "".join(lines)
    lines.insert(last_child + 1, f"{pad}{name}: {scalar}\n")
    return "".join(lines)


def update_config_file(path: Union[str, os.PathLike], plan: Plan, dataset: Union[str, os.PathLike, None] = None) -> Tuple[Path, bool]:
    """Write the planned keys into the YAML config at ``path``: a new file holds the defaults
    plus the plan (and ``dataset``, relative to the file); an existing one keeps every other
    setting and its comments (its ``dataset`` is filled in only when empty). The result is
    validated before anything is written, and written atomically. Returns (path, created)."""
    path = Path(path)
    rel = None
    if dataset is not None:
        rel = os.path.relpath(os.path.abspath(dataset), os.path.abspath(path.parent))
    if not path.exists():
        cfg = TrainConfig()
        if rel is not None:
            cfg.dataset = rel
        text = default_yaml(apply_plan(cfg, plan))
        created = True
    else:
        from .config import ConfigError

        original = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(original)
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}".replace("\n", " ")], str(path)) from None
        raw = raw if raw is not None else {}
        if not isinstance(raw, dict):
            raise ConfigError([f"must be a mapping of settings, got {type(raw).__name__}"], str(path))
        updates = dict(plan.settings())
        if rel is not None and not raw.get("dataset"):
            updates = {"dataset": rel, **updates}
        merged = yaml.safe_load(original) or {}
        for key, value in updates.items():
            set_dotted(merged, key, value)
        config_from_dict(merged, str(path), require_dataset=False)  # refuse before writing
        text: Optional[str] = original
        for key, value in updates.items():
            if text is None:
                break
            if "." not in key:  # top-level scalar: dataset
                m = re.search(rf"^{key}:[^\n#]*(#[^\n]*)?$", text, flags=re.M)
                line = f"{key}: {_yaml_scalar(value)}" + (f"  {m.group(1)}" if m and m.group(1) else "")
                text = text[:m.start()] + line + text[m.end():] if m else f"{key}: {_yaml_scalar(value)}\n" + text
            else:
                text = _edit_yaml(text, key, value)
        if text is None or yaml.safe_load(text) != merged:  # not plain block YAML: rewrite it whole
            text = default_yaml(config_from_dict(merged, str(path), require_dataset=False))
        created = False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path, created
