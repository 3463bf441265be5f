"""Synthetic 3D ultrasound phantoms with exact labels.

A phantom is built in the scanner's frame and then given a patient-space pose:

* **Anatomy**: 1..K smooth, irregular organ-like targets (perturbed ellipsoids with a random
  pose), a tissue background with slow echogenicity variation and a few bright fascia-like
  layers, and strong point reflectors (calcification-like). Targets go near the central ray
  and scale with the grid (``placement="central"``, a patch) or are organ-sized anywhere in
  the sector (``"anywhere"``, a whole field of view); see :func:`make_phantom`.
* **Acoustics**: scatterers of that echogenicity convolved with an anisotropic point-spread
  function (short axially, wider laterally, widest in elevation) give fully developed speckle
  (Rayleigh-distributed envelope, multiplicative). Amplitude decays with depth (partially
  compensated attenuation). Rays that pass a strong reflector are shadowed behind it.
* **Display**: a pyramidal sector (fan in lateral and elevation) from an apex above the skin;
  zero outside it. The envelope is log-compressed to a dynamic range and written as grey
  levels 1..255 inside the sector (0 marks outside).
* **Geometry**: anisotropic spacing drawn per case (depth finest, elevation coarsest), oblique
  direction and an arbitrary origin.
* **RF** (optional): the same echoes modulated on a carrier along the beam axis, so that
  envelope detection (:func:`semisam.preprocess.envelope_log`) recovers the B-mode. The carrier
  runs at a quarter of the axial sampling rate: real RF is sampled far finer, but this keeps
  the files small and the envelope exact enough to test the RF path. To stay band-limited
  below that carrier, RF phantoms use an axial point-spread function of at least 1.3 voxels.

Array axes: ``[z, y, x]`` = [elevation, depth (beam axis), lateral]. Everything is
deterministic given the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .errors import OutputError
from .volume import Volume, prepare_output_folder, write_volume

BEAM_AXIS = 1  # numpy axis of depth in phantom arrays


@dataclass
class PhantomCase:
    """One generated case: B-mode image, label map and (optionally) RF data, same grid."""

    image: Volume
    label: Volume
    rf: Optional[Volume] = None


PLACEMENTS = ("auto", "central", "anywhere")
FIELD_OF_VIEW_SIDE = 256  # in-plane voxels from which "auto" places targets anywhere (RESECT's slices are 256 x 256)
ORGAN_RADIUS_MM = (10.0, 20.0)  # mean radius of an "anywhere" target before the grid's own bound


WHOLE_FOV_MM = (90.0, 130.0)  # extent per axis of a placement="anywhere" phantom (real 3D ultrasound spans 80-200 mm)


def resolve_placement(placement: str, shape: Sequence[int]) -> str:
    """``auto`` -> ``anywhere`` for a whole field of view (a grid of at least 256 voxels along
    depth or lateral), else ``central``: every smaller grid (all cohorts of the demo, tests
    and benchmarks) keeps the placement its numbers were measured on, bit for bit."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement != "auto":
        return placement
    return "anywhere" if max(int(shape[1]), int(shape[2])) >= FIELD_OF_VIEW_SIDE else "central"


def central_window(shape: Sequence[int], fraction: float = 0.5) -> Tuple[slice, slice, slice]:
    """The central ``fraction`` of the grid in-plane (depth and lateral), every slice in
    elevation: index with it to ask whether a structure reaches the middle of the field of view.
    For a 288 x 256 x 256 phantom it is the central 128 x 128 window (70-90 mm deep, 96-128 mm
    wide): about the 64 mm crop around the sector that earlier versions segmented."""
    def middle(n: int) -> slice:
        m = int(round(n * fraction))
        lo = (n - m) // 2
        return slice(lo, lo + m)

    return slice(None), middle(int(shape[1])), middle(int(shape[2]))


def target_offsets(label: Volume) -> Dict[int, Dict[str, object]]:
    """Per structure 1..K of a label map: its centroid (voxel index, z y x), the centroid's
    offset from the grid's centre (voxels, z y x, and its length in mm), whether the centroid
    lies in :func:`central_window`, and whether any of its voxels do."""
    arr = np.asarray(label.array)
    centre = (np.array(arr.shape, dtype=np.float64) - 1.0) / 2.0
    spacing_zyx = np.array(label.spacing, dtype=np.float64)[::-1]
    window = np.zeros(arr.shape, dtype=bool)
    window[central_window(arr.shape)] = True
    out: Dict[int, Dict[str, object]] = {}
    for k in (int(v) for v in np.unique(arr) if v > 0):
        mask = arr == k
        centroid = np.array(ndimage.center_of_mass(mask))
        offset = centroid - centre
        out[k] = {
            "centroid": tuple(float(v) for v in centroid),
            "offset_voxels": tuple(float(v) for v in offset),
            "offset_mm": float(np.linalg.norm(offset * spacing_zyx)),
            "centroid_in_central_window": bool(window[tuple(int(round(v)) for v in centroid)]),
            "touches_central_window": bool(np.any(mask & window)),
        }
    return out


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float], dtype=np.float64) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field smoothed by ``sigma_vox`` (per axis)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=dtype), sigma_vox, mode="wrap")
    mean, std = field.mean(), field.std()
    field -= mean
    field /= std + 1e-12
    return field


def _random_spacing(rng: np.random.Generator) -> Tuple[float, float, float]:
    """(x, y, z) = (lateral, depth, elevation) spacing in mm, anisotropic as real probes are."""
    return (
        float(rng.uniform(0.75, 1.0)),  # lateral
        float(rng.uniform(0.55, 0.7)),  # depth (axial resolution is the finest)
        float(rng.uniform(1.05, 1.4)),  # elevation (sweep) is the coarsest
    )


def _axes(shape: Sequence[int], spacing: np.ndarray, dtype) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in mm along x, y and z, shaped to broadcast over a (z, y, x) grid."""
    nz, ny, nx = shape
    x, y, z = (np.arange(n, dtype=np.float32) * sp for n, sp in zip((nx, ny, nz), spacing))  # float64: exact
    return x.astype(dtype)[None, None, :], y.astype(dtype)[None, :, None], z.astype(dtype)[:, None, None]


def _grid_coords(spacing: np.ndarray, region: Sequence[slice], shape: Sequence[int]) -> np.ndarray:
    """Voxel centres of ``region`` of a ``shape`` grid in mm, (z, y, x, 3) with last axis (x, y, z)."""
    ranges = [np.arange(*sl.indices(n), dtype=np.float32) for sl, n in zip(region, shape)]
    zz, yy, xx = np.meshgrid(*ranges, indexing="ij")
    return np.stack([xx * spacing[0], yy * spacing[1], zz * spacing[2]], axis=-1)


def _sector(axes, apex: np.ndarray, half_lat: float, half_ele: float, r_min: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Polar coordinates of every voxel around the apex and the fan mask.

    Returns (r, theta_lat, theta_ele, inside) with angles measured from the beam (depth) axis;
    r and inside span the grid, the angles broadcast over it (each depends on two axes only).
    """
    x, y, z = axes
    cast = x.dtype.type
    rx, ry, rz = x - cast(apex[0]), y - cast(apex[1]), z - cast(apex[2])
    r = np.sqrt(rx * rx + ry * ry + rz * rz)
    depth = np.maximum(ry, cast(1e-6))
    th_lat = np.arctan2(rx, depth)
    th_ele = np.arctan2(rz, depth)
    inside = (np.abs(th_lat) < half_lat) & (np.abs(th_ele) < half_ele) & (r > r_min) & (ry > 0)
    return r, th_lat, th_ele, inside


def _target(rng: np.random.Generator, coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """A smooth irregular blob: a posed ellipsoid whose surface is perturbed by a smooth field."""
    rot = Rotation.random(random_state=rng).as_matrix()
    local = (coords - centre) @ rot  # (..., 3) in the blob's frame
    q = np.sqrt(np.sum((local / radii) ** 2, axis=-1))
    shape = coords.shape[:-1]
    # Perturbation smooth on the scale of a third of the blob: organ-like lobulation.
    sigma_vox = (float(radii.mean()) / 3.0) / spacing[::-1]  # numpy order z, y, x
    bump = _smooth_noise(rng, shape, sigma_vox)
    blob = q < 1.0 + 0.22 * bump
    lab, n = ndimage.label(blob)
    if n > 1:  # keep the main body only
        sizes = ndimage.sum(blob, lab, index=range(1, n + 1))
        blob = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(blob)


def _touches_faces(mask: np.ndarray) -> bool:
    return any(np.take(mask, i, axis=a).any() for a in range(3) for i in (0, -1))


def _place_central(rng, coords, num_labels, label, fov, apex, half_lat, half_ele, r_min, extent, spacing, centres):
    """A target at mid depth near the central ray, its size a fraction of the grid's (the
    placement of every phantom before whole fields of view; unchanged bit for bit)."""
    size = min(extent[0], extent[1], extent[2] * 1.6)
    scale = 0.25 if num_labels == 1 else 0.28 / np.sqrt(num_labels)
    radii = size * scale * rng.uniform(0.75, 1.2, size=3)
    r_bottom = extent[1] - apex[1]  # along the central ray
    blob = None
    for attempt in range(400):
        if attempt % 40 == 39:  # crowded: shrink the target a little and keep trying
            radii *= 0.9
        rr = rng.uniform(r_min + 0.25 * (r_bottom - r_min), r_min + 0.8 * (r_bottom - r_min))
        tl = rng.uniform(-0.7, 0.7) * half_lat
        te = rng.uniform(-0.6, 0.6) * half_ele
        d = np.array([np.tan(tl), 1.0, np.tan(te)])
        centre = apex + rr * d / np.linalg.norm(d)
        margin = 1.3 * radii.max()
        if not (np.all(centre > margin) and np.all(centre < extent - margin)):
            continue
        if not all(np.linalg.norm(centre - c) > 0.9 * (radii.max() + rc) for c, rc in centres):
            continue
        whole = _target(rng, coords, centre, radii, spacing)
        blob = whole & fov & (label == 0)
        if blob.sum() >= 0.95 * whole.sum() and not _touches_faces(whole):  # whole, in the sector, apart
            break
    if blob is None or not blob.any():
        raise ValueError(f"cannot fit {num_labels} targets into a {label.shape} phantom; use a larger shape")
    return (slice(None),) * 3, blob, centre, float(radii.max())


def _place_anywhere(rng, num_labels, label, fov, apex, half_lat, half_ele, r_min, extent, spacing, centres, far):
    """A target of organ size (mm) anywhere in the sector: its centre uniform over the sector's
    volume, the whole target inside the sector and the grid, apart from the others. With
    ``far`` it lies wholly outside :func:`central_window`. The target is drawn in a box around
    it, so that the cost does not grow with the field of view."""
    shape = label.shape
    size = min(extent[0], extent[1], extent[2] * 1.6)
    scale = 0.25 if num_labels == 1 else 0.28 / np.sqrt(num_labels)
    radii = min(size * scale, rng.uniform(*ORGAN_RADIUS_MM)) * rng.uniform(0.75, 1.2, size=3)
    _, ys, xs = central_window(shape)
    window_mm = {0: (xs.start * spacing[0], (xs.stop - 1) * spacing[0]), 1: (ys.start * spacing[1], (ys.stop - 1) * spacing[1])}
    sin_lat, cos_lat, sin_ele, cos_ele = np.sin(half_lat), np.cos(half_lat), np.sin(half_ele), np.cos(half_ele)

    def candidate(margin: float) -> Optional[np.ndarray]:
        """A centre uniform over the sector's volume where a sphere of ``margin`` fits (cheap)."""
        if np.any(extent <= 2 * margin):
            return None
        for _ in range(200):
            centre = rng.uniform(margin, extent - margin)  # x, y, z mm
            rel = centre - apex
            to_side = min(rel[1] * sin_lat - abs(rel[0]) * cos_lat, rel[1] * sin_ele - abs(rel[2]) * cos_ele)  # to the fan's planes
            if min(to_side, np.linalg.norm(rel) - r_min) <= margin:
                continue
            if far and not any(centre[a] + margin < lo or centre[a] - margin > hi for a, (lo, hi) in window_mm.items()):
                continue
            if all(np.linalg.norm(centre - c) > 0.9 * (radii.max() + rc) for c, rc in centres):
                return centre
        return None

    for attempt in range(120):
        if attempt % 12 == 11:  # crowded: shrink the target a little and keep trying
            radii *= 0.9
        centre = candidate(1.3 * radii.max())
        if centre is None:
            continue
        half = 1.8 * radii.max()  # the lobulated surface stays within ~1.7 radii; a target cut by the box is drawn again
        lo = np.clip(np.floor((centre - half) / spacing).astype(int), 0, None)
        hi = np.minimum(np.ceil((centre + half) / spacing).astype(int) + 1, np.array(shape[::-1]))
        region = tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))
        whole = _target(rng, _grid_coords(spacing, region, shape), centre, radii, spacing)
        ring = ndimage.binary_dilation(whole)  # the target and the voxels around it
        if _touches_faces(ring) or (ring & ~fov[region]).any() or (ring & (label[region] > 0)).any():
            continue  # cut by the box or the grid, not wholly inside the sector, or touching another target
        if far:
            window = np.zeros(shape[1:], dtype=bool)
            window[ys, xs] = True
            if (whole & window[region[1:]][None]).any():
                continue
        return region, whole, centre, float(radii.max())
    raise ValueError(f"cannot fit {num_labels} targets" + (" (the first far from the centre)" if far else "")
                     + f" into a {shape} phantom; use a larger shape")


def make_phantom(
    seed: int,
    shape: Sequence[int] = (64, 64, 64),
    num_labels: int = 1,
    rf: bool = False,
    dynamic_range_db: float = 40.0,
    gain_db: float = -12.0,
    placement: str = "auto",
    far_from_centre: bool = False,
) -> PhantomCase:
    """Generate one phantom case (see the module docstring). Deterministic for a given seed.

    Args:
        placement: where the targets go. ``central``: at mid depth near the central ray, sized
            as a fraction of the grid (a patch-sized phantom; the placement of every earlier
            version, bit for bit). ``anywhere``: organ-sized (a mean radius of 10-20 mm, less on
            small grids) anywhere in the sector, edges included; computed in float32 and in a
            box around each target, so that a 288 x 256 x 256 field of view stays cheap.
            ``auto`` (default): ``anywhere`` for grids of 256 or more voxels in depth or
            lateral, else ``central`` (:func:`resolve_placement`).
        far_from_centre: (``anywhere`` only) the first target lies wholly outside the central
            half of the grid in-plane (:func:`central_window`; see :func:`target_offsets`).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes >= 8 (z, y, x), got {shape}")
    if not 1 <= num_labels <= 8:
        raise ValueError(f"num_labels must be 1..8, got {num_labels}")
    placement = resolve_placement(placement, shape)
    if far_from_centre and placement != "anywhere":
        raise ValueError("far_from_centre needs placement='anywhere'")
    # The central placement keeps float64 throughout (earlier phantoms bit for bit); a whole
    # field of view is computed in float32 (19 M voxels: a quarter of the memory).
    dt = np.float64 if placement == "central" else np.float32
    rng = np.random.default_rng(seed)
    spacing = np.array(_random_spacing(rng))  # x, y, z
    nz, ny, nx = shape
    if placement == "anywhere":  # a real field of view: 90-130 mm per axis, whatever the voxel count (RESECT: 102 x 102 x 115 mm)
        spacing = rng.uniform(*WHOLE_FOV_MM, size=3) / np.array([nx, ny, nz], dtype=np.float64)
    extent = np.array([nx, ny, nz]) * spacing  # mm, x y z
    axes = _axes(shape, spacing, dt)  # voxel centres in the scanner frame (mm), x y z

    # Fan: apex above the skin line, centred laterally and in elevation.
    apex = np.array([extent[0] / 2, -rng.uniform(0.15, 0.4) * extent[1], extent[2] / 2])
    half_lat = float(np.deg2rad(rng.uniform(32, 42)))
    half_ele = float(np.deg2rad(rng.uniform(26, 36)))
    r_min = float(-apex[1] + rng.uniform(0.02, 0.06) * extent[1])
    r, th_lat, th_ele, fov = _sector(axes, apex, half_lat, half_ele, r_min)
    r_max = float(r[fov].max())

    # Tissue echogenicity: slow variation and a couple of bright, undulating fascia layers.
    echo = 1.0 + 0.25 * _smooth_noise(rng, shape, 6.0 / spacing[::-1], dt)
    for _ in range(int(rng.integers(1, 3))):
        depth_mm = float(rng.uniform(0.08, 0.25) * extent[1]) + 2.0 * _smooth_noise(rng, shape, 8.0 / spacing[::-1], dt)
        depth_mm -= axes[1]
        depth_mm /= 0.6
        echo += 1.5 * np.exp(-0.5 * depth_mm**2)
        del depth_mm

    # Targets: inside the fan, not overlapping.
    label = np.zeros(shape, dtype=np.uint8)
    coords = _grid_coords(spacing, (slice(None),) * 3, shape) if placement == "central" else None
    centres: List[Tuple[np.ndarray, float]] = []
    for k in range(1, num_labels + 1):
        if placement == "central":
            region, blob, centre, radius = _place_central(rng, coords, num_labels, label, fov, apex, half_lat, half_ele, r_min, extent, spacing, centres)
        else:
            region, blob, centre, radius = _place_anywhere(rng, num_labels, label, fov, apex, half_lat, half_ele, r_min, extent, spacing, centres,
                                                           far_from_centre and k == 1)
        centres.append((centre, radius))
        label[region][blob] = k
        # Organs are hypo- or hyperechoic with their own texture and a bright capsule.
        contrast = rng.choice([rng.uniform(0.05, 0.12), rng.uniform(4.0, 7.0)])
        local = echo[region]
        local[blob] = contrast * (1.0 + 0.15 * _smooth_noise(rng, blob.shape, 3.0 / spacing[::-1], dt)[blob])
        capsule = blob & ~ndimage.binary_erosion(blob, iterations=1)
        local[capsule] *= 3.0
    del coords

    # Strong reflectors with acoustic shadows along the rays behind them.
    cast = np.dtype(dt).type
    shadow = np.ones(shape, dtype=np.float32)
    reflectors = []
    for _ in range(int(rng.integers(1, 4))):
        rr = rng.uniform(r_min + 0.15 * (r_max - r_min), r_min + 0.55 * (r_max - r_min))
        tl = rng.uniform(-0.8, 0.8) * half_lat
        te = rng.uniform(-0.7, 0.7) * half_ele
        rad = rng.uniform(0.9, 1.8)  # mm
        d = np.array([np.tan(tl), 1.0, np.tan(te)])
        c = apex + rr * d / np.linalg.norm(d)
        dx, dy, dz = (a - cast(v) for a, v in zip(axes, c))
        blob = np.sqrt(dx * dx + dy * dy + dz * dz) < rad
        echo[blob] = 12.0
        ang = np.sqrt((th_lat - cast(np.arctan2(c[0] - apex[0], c[1] - apex[1]))) ** 2 + (th_ele - cast(np.arctan2(c[2] - apex[2], c[1] - apex[1]))) ** 2)
        half_width = rad / rr
        behind = r > rr + 0.5 * rad
        soft = np.clip((ang - half_width) / (0.5 * half_width), 0.0, 1.0)
        shadow *= np.where(behind, 0.12 + 0.88 * soft, 1.0).astype(np.float32)
        del blob, ang, behind, soft
        reflectors.append({"centre_mm": [float(v) for v in c], "radius_mm": float(rad)})

    # Speckle: complex scatterers filtered by the PSF (sigma in mm: depth, lateral, elevation).
    psf_mm = np.array([rng.uniform(0.7, 1.0), rng.uniform(0.35, 0.5), rng.uniform(1.0, 1.5)])  # x, y, z
    psf_vox = psf_mm / spacing
    if rf:  # the echoes must be band-limited below the carrier (a quarter of the axial rate)
        psf_vox[1] = max(psf_vox[1], 1.3)
    psf_zyx = psf_vox[::-1]
    np.clip(echo, 0, None, out=echo)
    scatter = np.sqrt(echo, out=echo) * shadow
    del echo, shadow
    iq = np.empty(shape, dtype=np.complex128 if dt == np.float64 else np.complex64)
    iq.real = ndimage.gaussian_filter(scatter * rng.standard_normal(shape, dtype=dt), psf_zyx)
    iq.imag = ndimage.gaussian_filter(scatter * rng.standard_normal(shape, dtype=dt), psf_zyx)
    del scatter
    # Depth attenuation (after partial time-gain compensation), amplitude.
    alpha = rng.uniform(0.01, 0.025)  # 1/mm
    r -= r_min
    np.maximum(r, 0.0, out=r)
    r *= -alpha
    iq *= np.exp(r, out=r)
    del r
    outside = ~fov
    iq[outside] = 0.0
    envelope = np.abs(iq)
    if not rf:
        del iq
    ref = float(np.percentile(envelope[fov], 99.9))
    envelope /= ref
    np.maximum(envelope, 1e-12, out=envelope)
    db = np.log10(envelope, out=envelope)
    db *= 20.0
    db += gain_db
    # Grey levels 1..255 inside the sector (a scanner's floor), exactly 0 outside it.
    np.clip(db, -dynamic_range_db, 0.0, out=db)
    db += dynamic_range_db
    db /= dynamic_range_db
    db *= 254.0
    bmode = db
    bmode += 1.0
    bmode[outside] = 0.0

    axis = rng.normal(size=3)
    direction = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(8, 30))).as_matrix()
    origin = tuple(float(v) for v in rng.uniform(-80.0, 80.0, size=3))
    meta = {
        "generator": "semisam.phantom",
        "seed": seed,
        "apex_mm": [float(v) for v in apex],  # scanner frame: (lateral, depth, elevation) mm from voxel 0
        "reflectors": reflectors,
    }
    if placement != "central":
        meta["placement"] = placement
    image = Volume(bmode.astype(np.float32, copy=False), tuple(spacing), origin, direction, meta)
    label_volume = image.with_array(label)
    rf_volume = None
    if rf:
        carrier = np.exp(2j * np.pi * 0.25 * np.arange(ny)).astype(iq.dtype)[None, :, None]
        rf_data = np.real(iq * carrier).astype(np.float32)
        rf_volume = image.with_array(rf_data / (np.abs(rf_data).max() + 1e-12) * 1000.0)
    return PhantomCase(image, label_volume, rf_volume)


def label_names(num_labels: int) -> Dict[str, str]:
    names = {"0": "background"}
    for k in range(1, num_labels + 1):
        names[str(k)] = "target" if num_labels == 1 else f"structure_{k}"
    return names


def write_cohort(
    out: os.PathLike | str,
    n: int,
    labeled: Optional[int] = None,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    rf: bool = False,
    num_labels: int = 1,
    overwrite: bool = False,
    progress=None,
    validation: int = 0,
    placement: str = "auto",
) -> Path:
    """Write a phantom cohort as a dataset folder and ``dataset.json``.

    Layout: ``imagesTr/`` + ``labelsTr/`` (the first ``labeled`` cases), ``imagesUnlabeled/``
    (the rest), and ``referenceUnlabeled/`` holding the unlabeled cases' true labels for
    evaluating pseudo-labels (never used for training). ``validation`` extra labeled cases go
    to ``imagesVal/`` + ``labelsVal/`` (dataset.json ``validation``). Images are B-mode, or RF
    when ``rf``. ``placement``: where the targets go (:func:`make_phantom`); dataset.json's
    ``generator`` records it when it is not ``central``.

    The cohort is built in a temporary folder beside ``out`` and moved into place at the end,
    so an interrupted run leaves nothing half-written.
    """
    out = Path(out)
    if n < 1:
        raise ValueError("n must be at least 1")
    labeled = (max(1, n // 4) if labeled is None else int(labeled))
    if not 0 <= labeled <= n:
        raise ValueError(f"labeled must be between 0 and n={n}, got {labeled}")
    if validation < 0:
        raise ValueError(f"validation must be >= 0, got {validation}")
    placement = resolve_placement(placement, shape)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputError(out, "exists and is not an empty folder", "choose a new folder or pass --overwrite")
    parent = prepare_output_folder(out.resolve().parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        seeds = np.random.SeedSequence(seed).spawn(n + validation)
        training, unlabeled, val = [], [], []
        for i in range(n + validation):
            case_id = f"case_{i:03d}"
            case = make_phantom(int(seeds[i].generate_state(1)[0]), shape, num_labels, rf, placement=placement)
            image = case.rf if rf else case.image
            name = f"{case_id}.nii.gz"
            if i >= n:
                write_volume(image, staging / "imagesVal" / name)
                write_volume(case.label, staging / "labelsVal" / name)
                val.append({"id": case_id, "image": f"imagesVal/{name}", "label": f"labelsVal/{name}"})
            elif i < labeled:
                write_volume(image, staging / "imagesTr" / name)
                write_volume(case.label, staging / "labelsTr" / name)
                training.append({"id": case_id, "image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
            else:
                write_volume(image, staging / "imagesUnlabeled" / name)
                write_volume(case.label, staging / "referenceUnlabeled" / name)
                unlabeled.append({"id": case_id, "image": f"imagesUnlabeled/{name}", "reference": f"referenceUnlabeled/{name}"})
            if progress is not None:
                progress(i + 1, n + validation)
        (staging / "imagesUnlabeled").mkdir(exist_ok=True)
        manifest = {
            "name": "semisam-phantom",
            "description": "Synthetic 3D ultrasound cohort (semisam.phantom)",
            "modality": "US",
            "image_type": "rf" if rf else "bmode",
            "beam_axis": BEAM_AXIS,
            "labels": label_names(num_labels),
            "training": training,
            "unlabeled": unlabeled,
            **({"validation": val} if val else {}),
            "generator": {"seed": seed, "n": n, "validation": validation, "shape": list(shape), "rf": rf,
                          **({"placement": placement} if placement != "central" else {})},
        }
        (staging / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
