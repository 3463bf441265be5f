"""Exporting segmentations: label volumes (``.nii.gz``, ``.nrrd``, ...) and DICOM SEG.

DICOM SEG is written with ``highdicom`` against the DICOM series the image came from: every
frame refers to its source slice, so a PACS shows the segmentation over the original images.
The label array must lie on the series' own grid (which is what ``semisam segment`` and the
Slicer module produce: every output is written on the input's grid).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError, OutputError
from .volume import Volume, write_volume

#: Default colours of structures 1..8 (RGB 0..255), the order Slicer's generic anatomy colours use.
DEFAULT_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210),
    (216, 101, 79), (221, 130, 101), (144, 238, 144), (192, 104, 88),
)


def label_color(label: int) -> Tuple[int, int, int]:
    """The default display colour of structure ``label`` (1..K)."""
    return DEFAULT_COLORS[(int(label) - 1) % len(DEFAULT_COLORS)]


def write_label_file(label: Volume, path: os.PathLike | str) -> Path:
    """A label map as a file (format from the extension: ``.nii.gz``, ``.nrrd``, ``.mha`` ...)."""
    if label.array.dtype.kind not in "iub":
        raise ValueError(f"a label map must hold integers, got {label.array.dtype}")
    return write_volume(label.with_array(label.array.astype(np.uint8)), path)


def _source_datasets(files: Sequence[os.PathLike | str]):
    import pydicom

    if not files:
        raise InputError("DICOM source", "no source files given", "export DICOM SEG only for images read from a DICOM series")
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f)))
        except Exception as exc:  # pydicom raises several types for damaged files
            raise InputError(f, f"is not a readable DICOM file ({exc})", "point at the series the image was read from") from None
    return datasets


def _frame_order(datasets, label: Volume) -> List[int]:
    """Index of the source dataset holding each slice z of ``label`` (matched by position)."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = []
    tol = 0.01 + 0.05 * float(label.spacing[2])
    for z in range(label.shape[0]):
        p = label.index_to_physical([0.0, 0.0, float(z)])
        dist = np.linalg.norm(positions - p, axis=1)
        i = int(np.argmin(dist))
        if dist[i] > tol:
            raise InputError(
                "DICOM source", f"no source slice at the position of slice {z} ({p.round(3).tolist()} mm; nearest {dist[i]:.3f} mm away)",
                "the segmentation must lie on the DICOM series' own grid (segment the series itself, not a resampled copy)",
            )
        order.append(i)
    if len(set(order)) != len(order):
        raise InputError("DICOM source", "two slices of the segmentation map to the same DICOM file", "check the series for duplicates")
    return order


def write_dicom_seg(
    label: Volume,
    source_files: Sequence[os.PathLike | str],
    path: os.PathLike | str,
    names: Optional[Mapping[int, str]] = None,
    colors: Optional[Mapping[int, Tuple[int, int, int]]] = None,
    algorithm: str = "SemiSAM",
    version: str = "",
    series_description: str = "SemiSAM segmentation",
) -> Path:
    """A DICOM SEG (binary, one segment per structure 1..K present) over its source series.

    Args:
        label: uint8 label map on the grid of the series in ``source_files``.
        source_files: the series' single-frame DICOM files (``Volume.meta["dicom_files"]`` of
            an image read from a DICOM folder; a Slicer volume's ``DICOM.instanceUIDs`` files).
        names, colors: per-structure segment labels and display colours (RGB 0..255).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    path = Path(path)
    if path.suffix.lower() != ".dcm":
        raise OutputError(path, "a DICOM SEG file name must end in .dcm", "name the output like segmentation.dcm")
    datasets = _source_datasets(source_files)
    order = _frame_order(datasets, label)
    sources = [datasets[i] for i in order]
    array = np.asarray(label.array)
    values = [int(v) for v in np.unique(array) if v > 0]
    if not values:
        raise ValueError("the segmentation is empty: there is nothing to export as DICOM SEG")
    names = dict(names or {})
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version or __version__)
    descriptions, planes = [], []
    for n, v in enumerate(values, start=1):
        rgb = (colors or {}).get(v, label_color(v))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=str(names.get(v, f"structure {v}"))[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        ))
        planes.append(array == v)
    pixel = np.stack(planes, axis=-1).astype(np.uint8)  # (frames, rows, cols, segments)
    now = datetime.datetime.now()
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="SemiSAM", manufacturer_model_name=algorithm,
        software_versions=version or __version__, device_serial_number="0", series_description=series_description,
        content_date=now.date(), content_time=now.time(), omit_empty_frames=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    seg.save_as(str(tmp))
    os.replace(tmp, path)
    return path


def read_dicom_seg(path: os.PathLike | str) -> Dict[str, object]:
    """The segments of a DICOM SEG: ``{"labels": {n: label}, "frames": [SOP UIDs], "array": (frames, rows, cols) uint8}``
    where ``array`` holds segment numbers (for checking an export)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    labels = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    uids = [uid for _, _, uid in seg.get_source_image_uids()]
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True)
    return {"labels": labels, "frames": uids, "array": np.asarray(arr, dtype=np.uint8)}
