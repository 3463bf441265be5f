"""Volumes: a voxel array plus its exact place in patient space, and their file I/O.

Conventions (the same as SimpleITK / ITK):

* ``Volume.array`` is indexed ``[z, y, x]`` (slice, row, column).
* ``spacing``, ``origin`` and the columns of ``direction`` are given in ITK order: the first
  entry belongs to the x (column) index axis, the last to the z (slice) index axis.
* Physical coordinates are LPS millimetres:
  ``p = origin + direction @ (spacing * (i, j, k))`` for the voxel ``array[k, j, i]``.

Readers and writers cover NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``), DICOM series (a folder; written when the output path has no extension)
and PNG (a 2D image is a one-slice volume). Writes are atomic: a file either appears
complete or not at all.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

Vec3 = Tuple[float, float, float]

#: File name endings we read and write, longest first so ``.nii.gz`` wins over ``.gz``.
FORMATS: Dict[str, str] = {
    ".nii.gz": "NIfTI",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".png": "PNG",
}
DICOM = "DICOM series"
SUPPORTED = ", ".join(list(FORMATS) + ["a DICOM series folder"])


def format_of(path: os.PathLike | str) -> Tuple[str, str]:
    """Return ``(suffix, format name)`` for a path; a path without a suffix is a DICOM folder.

    Raises:
        InputError: the path ends in an extension we do not know.
    """
    name = Path(path).name.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return suffix, fmt
    suffix = "".join(Path(name).suffixes)
    if not suffix or Path(path).is_dir():
        return "", DICOM
    raise InputError(path, f"unknown file extension '{suffix}'", f"use one of: {SUPPORTED}")


def strip_suffix(path: os.PathLike | str) -> str:
    """File name without its volume extension (``case_01.nii.gz`` -> ``case_01``)."""
    name = Path(path).name
    for suffix in FORMATS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Volume:
    """A 3D voxel array with its geometry.

    Attributes:
        array: voxels indexed ``[z, y, x]``; images are float32, label maps uint8.
        spacing: voxel size in mm along the (x, y, z) index axes.
        origin: LPS position (mm) of the centre of voxel ``array[0, 0, 0]``.
        direction: 3x3 matrix whose columns are the LPS directions of the x, y, z index axes.
        meta: provenance (source path, format, DICOM file list); not geometry.
    """

    array: np.ndarray
    spacing: Vec3 = (1.0, 1.0, 1.0)
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (z, y, x), got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin need three values (x, y, z)")
        if min(self.spacing) <= 0 or not all(math.isfinite(s) for s in self.spacing):
            raise ValueError(f"spacing must be positive and finite, got {self.spacing}")
        if abs(np.linalg.det(self.direction)) < 1e-6:
            raise ValueError(f"direction matrix is singular: {self.direction.tolist()}")

    # -- geometry ---------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def size_xyz(self) -> Tuple[int, int, int]:
        """Grid size in ITK order (x, y, z)."""
        z, y, x = self.shape
        return (x, y, z)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous index (i, j, k, 1) = (x, y, z, 1) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def index_to_physical(self, ijk: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous index (x, y, z order; shape (..., 3)) to LPS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, points: Sequence[float] | np.ndarray) -> np.ndarray:
        """LPS mm (shape (..., 3)) to continuous index in (x, y, z) order."""
        points = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        m = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return points @ m.T

    def geometry(self) -> Dict[str, Any]:
        """Shape and geometry as plain Python values (JSON-friendly)."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
        }

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when both volumes sample the same voxel centres (within ``tol`` mm / cosines)."""
        return not grid_differences(self, other, tol)

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A new volume on the same grid holding ``array`` (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), dict(meta))

    # -- SimpleITK bridge -------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        array = self.array
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if array.dtype == bool:
            array = array.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: Optional[Dict[str, Any]] = None) -> "Volume":
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.asarray(image.GetDirection()).reshape(3, 3),
            dict(meta or {}),
        )


def grid_differences(a: Volume, b: Volume, tol: float = 1e-4, names: Tuple[str, str] = ("", "")) -> list[str]:
    """Human-readable list of how two grids differ (empty when they match).

    ``tol`` applies to spacing and direction cosines; origins may differ by ``10 * tol`` mm.
    ``names`` label the two sides in the messages, e.g. ``("label", "image")``.
    """
    na, nb = (f" ({n})" if n else "" for n in names)
    out = []
    if a.shape != b.shape:
        out.append(f"shape {list(a.shape)}{na} vs {list(b.shape)}{nb}")
    if not np.allclose(a.spacing, b.spacing, atol=tol, rtol=0):
        out.append(f"spacing {_fmt(a.spacing)}{na} vs {_fmt(b.spacing)}{nb}")
    if not np.allclose(a.origin, b.origin, atol=tol * 10, rtol=0):
        out.append(f"origin {_fmt(a.origin)}{na} vs {_fmt(b.origin)}{nb}")
    if not np.allclose(a.direction, b.direction, atol=tol, rtol=0):
        out.append(f"direction {_fmt(a.direction.ravel())}{na} vs {_fmt(b.direction.ravel())}{nb}")
    return out


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_volume(
    path: os.PathLike | str,
    kind: str = "image",
    require_3d: bool = False,
    series_uid: Optional[str] = None,
) -> Volume:
    """Read an image or label volume with its geometry.

    Args:
        path: a file with a supported extension, or a folder holding one DICOM series.
        kind: ``"image"`` (float32, finite values required) or ``"label"`` (uint8; the values
            must be whole numbers 0..255).
        require_3d: refuse 2D images and one-slice volumes.
        series_uid: which series to read when a DICOM folder holds several.

    Raises:
        InputError: the file is missing, empty, unreadable, of an unknown type, not 2D/3D
            scalar, or has values its kind does not allow.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist", "check the path")
    _, fmt = format_of(path)
    if fmt == DICOM:
        if not path.is_dir():
            raise InputError(path, "unknown file type (no extension)", f"use one of: {SUPPORTED}")
        image, meta = _read_dicom_series(path, series_uid)
    else:
        if path.is_dir():
            raise InputError(path, f"is a folder, but its name ends like a {fmt} file")
        if path.stat().st_size == 0:
            raise InputError(path, "is empty (0 bytes)", "the export or copy failed; export it again")
        if fmt == "NIfTI":
            _check_nifti(path)
        image = _sitk_read(path, fmt)
        meta = {"source": str(path), "format": fmt}
    volume = _to_scalar_3d(image, path, fmt, meta)
    if require_3d and volume.shape[0] < 2:
        what = "a 2D image" if meta.get("was_2d") else "a one-slice volume"
        raise InputError(
            path,
            f"is {what} ({volume.shape[1]}x{volume.shape[2]}); a 3D volume is required here",
            "pass a 3D volume, or use a command that accepts 2D images",
        )
    if kind == "image":
        volume.array = _checked_image_array(volume.array, path)
    else:
        volume.array = _checked_label_array(volume.array, path)
    return volume


@dataclass
class VolumeHeader:
    """A volume's grid without its voxels (what :func:`read_header` returns).

    ``shape`` is ``(z, y, x)``; a 2D image is ``(1, y, x)`` with ``was_2d`` set, spacing 1 mm
    along z, as :func:`read_volume` makes it. ``components`` > 1: a colour or vector image.
    """

    shape: Tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: np.ndarray
    was_2d: bool = False
    components: int = 1
    meta: Dict[str, Any] = field(default_factory=dict)


def read_header(path: os.PathLike | str, series_uid: Optional[str] = None) -> VolumeHeader:
    """Shape and geometry of an image without reading its voxels where the format allows it.

    Files (NIfTI, NRRD, MetaImage, PNG) are read with SimpleITK's
    ``ImageFileReader.ReadImageInformation`` (the header only); a DICOM series folder is read
    whole (its geometry needs every slice's position). Nothing about the voxels is checked:
    :func:`read_volume` does that.

    Raises:
        InputError: missing or empty file, unknown type, unreadable header, not 2D/3D.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist", "check the path")
    _, fmt = format_of(path)
    if fmt == DICOM:
        volume = read_volume(path, series_uid=series_uid)
        return VolumeHeader(volume.shape, volume.spacing, volume.origin, volume.direction, False, 1, dict(volume.meta))
    if path.is_dir():
        raise InputError(path, f"is a folder, but its name ends like a {fmt} file")
    if path.stat().st_size == 0:
        raise InputError(path, "is empty (0 bytes)", "the export or copy failed; export it again")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as {fmt}: {_itk_message(exc)}", "the file is probably truncated or corrupt") from None
    dim = reader.GetDimension()
    size = tuple(int(n) for n in reader.GetSize())
    if dim not in (2, 3):
        raise InputError(path, f"has {dim} dimensions ({'x'.join(map(str, size))}); a 3D volume or a 2D image is required")
    meta = {"source": str(path), "format": fmt}
    comps = int(reader.GetNumberOfComponents())
    if dim == 2:
        direction = np.eye(3)
        direction[:2, :2] = np.asarray(reader.GetDirection()).reshape(2, 2)
        sx, sy = reader.GetSpacing()
        ox, oy = reader.GetOrigin()
        return VolumeHeader((1, size[1], size[0]), (sx, sy, 1.0), (ox, oy, 0.0), direction, True, comps, meta)
    return VolumeHeader(
        (size[2], size[1], size[0]),
        tuple(float(v) for v in reader.GetSpacing()),
        tuple(float(v) for v in reader.GetOrigin()),
        np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3),
        False,
        comps,
        meta,
    )


def _sitk_read(path: Path, fmt: str) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            path,
            f"cannot be read as {fmt}: {_itk_message(exc)}",
            "the file is probably truncated or corrupt; export or copy it again",
        ) from None


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader lets through: truncated files (the missing voxels become
    garbage) and NaN voxels (silently read as 0). Read the voxels once with nibabel to check."""
    import nibabel as nib

    try:
        image = nib.load(str(path))  # the header only
        offset = int(image.dataobj.offset)  # vox_offset, or 352 where a writer left it 0
    except Exception as exc:  # nibabel raises several types for a bad header
        raise InputError(path, f"is not a valid NIfTI file ({exc})", "export it again") from None
    header = image.header
    expected = offset + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if not path.name.lower().endswith(".gz") and path.stat().st_size < expected:
        raise InputError(path, f"is truncated: {path.stat().st_size} of {expected} bytes", "export or copy it again")
    try:
        raw = np.asanyarray(image.dataobj)
    except Exception:  # EOFError, zlib.error, OSError ... depending on where the stream ends
        raise InputError(path, "is truncated or corrupt (the voxel data ends early)", "export or copy it again") from None
    if raw.dtype.kind == "f":
        _check_finite(raw.T, path)  # nibabel's axes are (x, y, z); report (z, y, x)


def _itk_message(exc: Exception) -> str:
    """The useful line of an ITK exception (ITK prefixes its messages with source locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if low.startswith(("description:", "itk::error")) or "error" in low:
            text = ln.split(":", 1)[1].strip() if low.startswith("description:") else ln
            text = text.split("): ", 1)[-1] if "): " in text else text
            return text[:300]
    return (lines[-1] if lines else str(exc))[:300]


def _read_dicom_series(folder: Path, series_uid: Optional[str]) -> Tuple[sitk.Image, Dict[str, Any]]:
    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)) or ())
    if not uids:
        raise InputError(folder, "holds no DICOM series", "point at the folder with the .dcm files")
    if series_uid is None:
        if len(uids) > 1:
            raise InputError(
                folder,
                f"holds {len(uids)} DICOM series: {', '.join(uids)}",
                "pass series_uid= (or put each series in its own folder)",
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputError(folder, f"has no series {series_uid}; it has {', '.join(uids)}")
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(folder, f"DICOM series cannot be read: {_itk_message(exc)}") from None
    meta = {"source": str(folder), "format": DICOM, "series_uid": series_uid, "dicom_files": files}
    return image, meta


def _to_scalar_3d(image: sitk.Image, path: Path, fmt: str, meta: Dict[str, Any]) -> Volume:
    dim = image.GetDimension()
    comps = image.GetNumberOfComponentsPerPixel()
    if dim not in (2, 3):
        size = "x".join(str(s) for s in image.GetSize())
        raise InputError(
            path,
            f"has {dim} dimensions ({size}); a 3D volume or a 2D image is required",
            "split time series or channels into separate 3D files",
        )
    if comps > 1:
        if dim == 2 and comps in (3, 4):
            # Colour screenshot of a B-mode image: use luminance (ITU-R BT.601), drop alpha.
            rgb = sitk.GetArrayFromImage(image).astype(np.float32)[..., :3]
            gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            grey_image = sitk.GetImageFromArray(gray)
            grey_image.CopyInformation(sitk.VectorIndexSelectionCast(image, 0))
            image = grey_image
            meta["converted_from_rgb"] = True
        else:
            raise InputError(
                path,
                f"has {comps} values per voxel; a scalar (grey-level) image is required",
                "save one channel per file",
            )
    if dim == 2:
        arr = sitk.GetArrayFromImage(image)[None]
        d2 = np.asarray(image.GetDirection()).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d2
        sx, sy = image.GetSpacing()
        ox, oy = image.GetOrigin()
        meta["was_2d"] = True
        return Volume(arr, (sx, sy, 1.0), (ox, oy, 0.0), direction, meta)
    return Volume.from_sitk(image, meta)


def _checked_image_array(array: np.ndarray, path: Path) -> np.ndarray:
    array = array.astype(np.float32, copy=False)
    _check_finite(array, path)
    return array


def _check_finite(array: np.ndarray, path: Path) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        n_nan = int(np.isnan(array).sum())
        n_inf = int(bad.shape[0] - n_nan)
        raise InputError(
            path,
            f"has {n_nan} NaN and {n_inf} infinite voxels (first at z,y,x = {tuple(int(v) for v in bad[0])})",
            "fix the export; SemiSAM does not guess values for them",
        )


def _checked_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputError(path, "label map has NaN or infinite values", "labels must be 0..K")
        if not np.array_equal(array, np.round(array)):
            raise InputError(
                path,
                "label map has fractional values",
                "labels must be whole numbers 0 (background) .. K; was it resampled linearly?",
            )
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > 255:
        raise InputError(path, f"label values span {lo}..{hi}; labels must be 0..255")
    return array.astype(np.uint8)


def check_not_constant(volume: Volume, path: Optional[os.PathLike | str] = None) -> None:
    """Raise when an image holds a single value: there is nothing to segment or normalise."""
    arr = volume.array
    if arr.size == 0 or float(arr.max()) == float(arr.min()):
        value = float(arr.flat[0]) if arr.size else float("nan")
        raise InputError(
            path if path is not None else volume.meta.get("source"),
            f"image is constant (every voxel is {value:g})",
            "the export is probably blank; check the source data",
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def prepare_output_folder(folder: os.PathLike | str) -> Path:
    """Create ``folder`` if needed and prove it is writable, or raise OutputError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "exists and is not a folder", "choose another output location")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".semisam-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            folder,
            f"cannot write here ({exc.strerror or exc})",
            "choose another output folder or fix its permissions",
        ) from None
    return folder


def write_volume(volume: Volume, path: os.PathLike | str, compress: bool = True) -> Path:
    """Write a volume atomically; the format follows the extension of ``path``.

    A path without an extension is written as a DICOM series folder. Integer arrays are
    written as integers (label maps as uint8), float arrays as float32. PNG takes one-slice
    volumes with whole-number values 0..65535 only (it cannot hold the rest).

    Raises:
        InputError: unknown extension, or data the format cannot hold.
        OutputError: the destination cannot be written (nothing is written then).
    """
    path = Path(path)
    _, fmt = format_of(path)
    if fmt == "PNG":
        _check_png_writable(volume, path)
    if fmt == DICOM and path.exists() and any(path.iterdir()):
        raise OutputError(path, "DICOM output folder exists and is not empty", "choose a new folder")
    if path.is_dir() and fmt != DICOM:
        raise OutputError(path, "is a folder", "give a file name")
    parent = prepare_output_folder(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        if fmt == DICOM:
            target = staging / "series"
            target.mkdir()
            _write_dicom_series(volume, target)
            if path.exists():
                path.rmdir()
            os.replace(target, path)
        else:
            tmp = staging / path.name
            _write_file(volume, tmp, fmt, compress)
            # A header/data pair (.mhd/.raw, .nhdr/.raw.gz) moves data first, header last.
            for extra in sorted(staging.iterdir()):
                if extra != tmp:
                    os.replace(extra, parent / extra.name)
            os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(path, f"writing failed ({exc.strerror or exc})", "check free disk space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _storage_array(volume: Volume) -> np.ndarray:
    arr = volume.array
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    return arr.astype(np.float32, copy=False)


def _write_file(volume: Volume, path: Path, fmt: str, compress: bool) -> None:
    if fmt == "PNG":
        arr = volume.array[0]
        dtype = np.uint8 if arr.max() <= 255 else np.uint16
        image = sitk.GetImageFromArray(arr.astype(dtype))
        image.SetSpacing(volume.spacing[:2])
        image.SetOrigin(volume.origin[:2])
        sitk.WriteImage(image, str(path))
        return
    image = Volume(_storage_array(volume), volume.spacing, volume.origin, volume.direction).to_sitk()
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(compress and not path.name.endswith(".nii"))
    writer.Execute(image)


def _check_png_writable(volume: Volume, path: Path) -> None:
    arr = volume.array
    if arr.shape[0] != 1:
        raise InputError(path, f"PNG holds one slice; this volume has {arr.shape[0]}", "write .nii.gz or .nrrd")
    if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)) or arr.min() < 0 or arr.max() > 65535:
        raise InputError(
            path,
            f"PNG holds whole numbers 0..65535; this volume has values in [{arr.min():g}, {arr.max():g}]",
            "write .nii.gz or .nrrd to keep them",
        )


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) holding ``value`` as exactly as it can."""
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(value)


def _write_dicom_series(volume: Volume, folder: Path) -> None:
    """One single-frame file per slice, with position, orientation and spacing tags."""
    arr = volume.array
    pixel_tags: Dict[str, str] = {}
    if arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() <= 65535:
        stored = arr.astype(np.uint16)
    elif arr.dtype.kind in "iu" and arr.min() >= -32768 and arr.max() <= 32767:
        stored = arr.astype(np.int16)
    else:
        # Real values: GDCM stores round((v - intercept) / slope) as signed 16-bit integers.
        lo, hi = float(arr.min()), float(arr.max())
        slope = float(_ds((hi - lo) / 65000.0)) if hi > lo else 1.0
        stored = arr.astype(np.float64)
        pixel_tags = {
            "0028|1052": _ds((lo + hi) / 2.0),
            "0028|1053": _ds(slope),
            "0028|0100": "16",
            "0028|0101": "16",
            "0028|0102": "15",
            "0028|0103": "1",
        }
    study_uid = "2.25." + str(uuid.uuid4().int)
    series_uid = "2.25." + str(uuid.uuid4().int)
    frame_uid = "2.25." + str(uuid.uuid4().int)
    d = volume.direction
    row_dir, col_dir = d[:, 0], d[:, 1]
    orientation = "\\".join(_ds(v) for v in (*row_dir, *col_dir))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(stored[k])
        sl.SetSpacing(volume.spacing[:2])  # GDCM takes PixelSpacing from the image itself
        position = volume.index_to_physical([0.0, 0.0, float(k)])
        tags = {
            "0008|0060": "OT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": frame_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(_ds(v) for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{_ds(volume.spacing[1])}\\{_ds(volume.spacing[0])}",
            "0018|0050": _ds(volume.spacing[2]),
            "0008|103e": "SemiSAM",
            **pixel_tags,
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(sl)
