"""Synthetic 3D ultrasound phantoms with exact labels.

A phantom is built in the scanner's frame and then given a patient-space pose:

* **Anatomy**: 1..K smooth, irregular organ-like targets (perturbed ellipsoids with a random
  pose), a tissue background with slow echogenicity variation and a few bright fascia-like
  layers, and strong point reflectors (calcification-like).
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


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field smoothed by ``sigma_vox`` (per axis)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _random_spacing(rng: np.random.Generator) -> Tuple[float, float, float]:
    """(x, y, z) = (lateral, depth, elevation) spacing in mm, anisotropic as real probes are."""
    return (
        float(rng.uniform(0.75, 1.0)),  # lateral
        float(rng.uniform(0.55, 0.7)),  # depth (axial resolution is the finest)
        float(rng.uniform(1.05, 1.4)),  # elevation (sweep) is the coarsest
    )


def _sector(coords: np.ndarray, apex: np.ndarray, half_lat: float, half_ele: float, r_min: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Polar coordinates of every voxel around the apex and the fan mask.

    Returns (r, theta_lat, theta_ele, inside) with angles measured from the beam (depth) axis.
    """
    rel = coords - apex  # (..., 3) in mm, order (x, y, z)
    r = np.linalg.norm(rel, axis=-1)
    depth = np.maximum(rel[..., 1], 1e-6)
    th_lat = np.arctan2(rel[..., 0], depth)
    th_ele = np.arctan2(rel[..., 2], depth)
    inside = (np.abs(th_lat) < half_lat) & (np.abs(th_ele) < half_ele) & (r > r_min) & (rel[..., 1] > 0)
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


def make_phantom(
    seed: int,
    shape: Sequence[int] = (64, 64, 64),
    num_labels: int = 1,
    rf: bool = False,
    dynamic_range_db: float = 40.0,
    gain_db: float = -12.0,
) -> PhantomCase:
    """Generate one phantom case (see the module docstring). Deterministic for a given seed."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes >= 8 (z, y, x), got {shape}")
    if not 1 <= num_labels <= 8:
        raise ValueError(f"num_labels must be 1..8, got {num_labels}")
    rng = np.random.default_rng(seed)
    spacing = np.array(_random_spacing(rng))  # x, y, z
    nz, ny, nx = shape
    extent = np.array([nx, ny, nz]) * spacing  # mm, x y z
    # Voxel centres in the scanner frame (mm), (z, y, x, 3) with last axis (x, y, z).
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    coords = np.stack([xx * spacing[0], yy * spacing[1], zz * spacing[2]], axis=-1)

    # Fan: apex above the skin line, centred laterally and in elevation.
    apex = np.array([extent[0] / 2, -rng.uniform(0.15, 0.4) * extent[1], extent[2] / 2])
    half_lat = np.deg2rad(rng.uniform(32, 42))
    half_ele = np.deg2rad(rng.uniform(26, 36))
    r_min = -apex[1] + rng.uniform(0.02, 0.06) * extent[1]
    r, th_lat, th_ele, fov = _sector(coords, apex, half_lat, half_ele, r_min)
    r_max = float(r[fov].max())

    # Tissue echogenicity: slow variation and a couple of bright, undulating fascia layers.
    echo = 1.0 + 0.25 * _smooth_noise(rng, shape, 6.0 / spacing[::-1])
    for _ in range(int(rng.integers(1, 3))):
        depth_mm = rng.uniform(0.08, 0.25) * extent[1] + 2.0 * _smooth_noise(rng, shape, 8.0 / spacing[::-1])
        layer = np.exp(-0.5 * ((coords[..., 1] - depth_mm) / 0.6) ** 2)
        echo += 1.5 * layer

    # Targets: placed inside the fan, at mid depth, not overlapping.
    label = np.zeros(shape, dtype=np.uint8)
    centres: List[Tuple[np.ndarray, float]] = []
    for k in range(1, num_labels + 1):
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
            touches_edge = any(np.take(whole, i, axis=a).any() for a in range(3) for i in (0, -1))
            if blob.sum() >= 0.95 * whole.sum() and not touches_edge:  # whole, in the sector, apart
                break
        if blob is None or not blob.any():
            raise ValueError(f"cannot fit {num_labels} targets into a {shape} phantom; use a larger shape")
        centres.append((centre, float(radii.max())))
        label[blob] = k
        # Organs are hypo- or hyperechoic with their own texture and a bright capsule.
        contrast = rng.choice([rng.uniform(0.05, 0.12), rng.uniform(4.0, 7.0)])
        echo[blob] = contrast * (1.0 + 0.15 * _smooth_noise(rng, shape, 3.0 / spacing[::-1])[blob])
        capsule = blob & ~ndimage.binary_erosion(blob, iterations=1)
        echo[capsule] *= 3.0

    # Strong reflectors with acoustic shadows along the rays behind them.
    shadow = np.ones(shape, dtype=np.float32)
    reflectors = []
    for _ in range(int(rng.integers(1, 4))):
        rr = rng.uniform(r_min + 0.15 * (r_max - r_min), r_min + 0.55 * (r_max - r_min))
        tl = rng.uniform(-0.8, 0.8) * half_lat
        te = rng.uniform(-0.7, 0.7) * half_ele
        rad = rng.uniform(0.9, 1.8)  # mm
        d = np.array([np.tan(tl), 1.0, np.tan(te)])
        c = apex + rr * d / np.linalg.norm(d)
        blob = np.linalg.norm(coords - c, axis=-1) < rad
        echo[blob] = 12.0
        ang = np.sqrt((th_lat - np.arctan2(c[0] - apex[0], c[1] - apex[1])) ** 2 + (th_ele - np.arctan2(c[2] - apex[2], c[1] - apex[1])) ** 2)
        half_width = rad / rr
        behind = r > rr + 0.5 * rad
        soft = np.clip((ang - half_width) / (0.5 * half_width), 0.0, 1.0)
        shadow *= np.where(behind, 0.12 + 0.88 * soft, 1.0).astype(np.float32)
        reflectors.append({"centre_mm": [float(v) for v in c], "radius_mm": float(rad)})

    # Speckle: complex scatterers filtered by the PSF (sigma in mm: depth, lateral, elevation).
    psf_mm = np.array([rng.uniform(0.7, 1.0), rng.uniform(0.35, 0.5), rng.uniform(1.0, 1.5)])  # x, y, z
    psf_vox = psf_mm / spacing
    if rf:  # the echoes must be band-limited below the carrier (a quarter of the axial rate)
        psf_vox[1] = max(psf_vox[1], 1.3)
    psf_zyx = psf_vox[::-1]
    scatter = np.sqrt(np.clip(echo, 0, None)) * shadow
    iq = ndimage.gaussian_filter(scatter * rng.standard_normal(shape), psf_zyx) + 1j * ndimage.gaussian_filter(
        scatter * rng.standard_normal(shape), psf_zyx
    )
    # Depth attenuation (after partial time-gain compensation), amplitude.
    alpha = rng.uniform(0.01, 0.025)  # 1/mm
    iq *= np.exp(-alpha * np.maximum(r - r_min, 0.0))
    iq[~fov] = 0.0
    envelope = np.abs(iq)
    ref = float(np.percentile(envelope[fov], 99.9))
    db = 20.0 * np.log10(np.maximum(envelope / ref, 1e-12)) + gain_db
    # Grey levels 1..255 inside the sector (a scanner's floor), exactly 0 outside it.
    bmode = 1.0 + (np.clip(db, -dynamic_range_db, 0.0) + dynamic_range_db) / dynamic_range_db * 254.0
    bmode[~fov] = 0.0

    axis = rng.normal(size=3)
    direction = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(8, 30))).as_matrix()
    origin = tuple(float(v) for v in rng.uniform(-80.0, 80.0, size=3))
    meta = {
        "generator": "semisam.phantom",
        "seed": seed,
        "apex_mm": [float(v) for v in apex],  # scanner frame: (lateral, depth, elevation) mm from voxel 0
        "reflectors": reflectors,
    }
    image = Volume(bmode.astype(np.float32), tuple(spacing), origin, direction, meta)
    label_volume = image.with_array(label)
    rf_volume = None
    if rf:
        carrier = np.exp(2j * np.pi * 0.25 * np.arange(ny))[None, :, None]
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
) -> Path:
    """Write a phantom cohort as a dataset folder and ``dataset.json``.

    Layout: ``imagesTr/`` + ``labelsTr/`` (the first ``labeled`` cases), ``imagesUnlabeled/``
    (the rest), and ``referenceUnlabeled/`` holding the unlabeled cases' true labels for
    evaluating pseudo-labels (never used for training). ``validation`` extra labeled cases go
    to ``imagesVal/`` + ``labelsVal/`` (dataset.json ``validation``). Images are B-mode, or RF
    when ``rf``.

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
            case = make_phantom(int(seeds[i].generate_state(1)[0]), shape, num_labels, rf)
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
            "generator": {"seed": seed, "n": n, "validation": validation, "shape": list(shape), "rf": rf},
        }
        (staging / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
