"""SemiSAMSegment's logic (Qt-free): one-click segmentation into MRML nodes, uncertainty, export.

Works on real MRML nodes (``slicer.mrmlScene``) through :mod:`SemiSAMSegmentLib.mrml` and calls
``semisam`` for everything else; it never touches Qt, so pytest runs it against the
``slicer-core`` wheel and Slicer runs it on the model worker thread (only :meth:`segment_arrays`
runs there; creating nodes happens on the GUI thread in :meth:`apply`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import mrml

#: File types :meth:`SemiSAMSegmentLogic.export` writes, by how the name ends.
EXPORT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".dcm")


def resolve_device(name: str) -> str:
    """auto → cuda when a GPU is usable, else cpu; a CUDA request without a GPU is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but no CUDA GPU is usable here: choose cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return name


#: Choices of the encoder backend setting (SemiSAM Segment and its Segment Editor effect).
BACKENDS = ("auto", "openvino", "onnxruntime", "torch")


def log_fallback(message: str) -> None:
    """The one log line when the chosen encoder backend cannot be used and torch runs instead."""
    import logging

    logging.warning(f"SemiSAM: {message}")


def student_checkpoints(folder: Optional[os.PathLike | str] = None) -> List[Path]:
    """Student checkpoints offered in the model list: ``<models folder>/students/*.pt``, newest first."""
    from semisam.models.registry import models_folder

    root = Path(folder) if folder else models_folder() / "students"
    if not root.is_dir():
        return []
    return sorted(root.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)


@dataclass
class SegmentResult:
    """What :meth:`SemiSAMSegmentLogic.segment_arrays` computes (arrays on the input grid)."""

    label: np.ndarray  # (z, y, x) uint8
    uncertainty: Optional[np.ndarray]  # (z, y, x) float32 or None
    names: Dict[int, str]
    seconds: float
    refined: str = ""  # how the teachers refined the student's mask (as training chose on validation), "" when they did not


@dataclass
class OneClickJob:
    """What a one-click segmentation belongs to, fixed when it is submitted: the volume node,
    its voxels (read on the GUI thread), the output nodes chosen then and the scene. The result
    goes to these nodes, whatever the module selects meanwhile; :meth:`usable` says when it
    cannot (the scene was closed, the volume was deleted)."""

    volume_node: object
    volume: object  # semisam Volume
    segmentation_node: object = None
    uncertainty_node: object = None
    scene: object = None
    volume_name: str = ""

    @classmethod
    def submit(cls, volume_node, segmentation_node=None, uncertainty_node=None) -> "OneClickJob":
        if volume_node is None:
            raise ValueError("choose an input volume first")
        scene = volume_node.GetScene()
        if scene is None:
            raise ValueError(f"volume '{volume_node.GetName()}' is not in a scene")
        return cls(volume_node, mrml.volume_from_node(volume_node), segmentation_node, uncertainty_node, scene, volume_node.GetName())

    def usable(self) -> bool:
        """True while the submitted volume is still in the scene it was submitted from."""
        node = self.volume_node
        return node is not None and node.GetScene() is self.scene and self.scene.GetNodeByID(node.GetID()) is node

    def dropped_reason(self) -> str:
        return (f"The result for '{self.volume_name}' was dropped: the volume left the scene (the scene was closed "
                "or the volume deleted) while SemiSAM was segmenting it. Segment it again.")

    def output_nodes(self):
        """The chosen output nodes that are still in the job's scene (None: create new ones)."""
        return tuple(n if n is not None and n.GetScene() is self.scene else None for n in (self.segmentation_node, self.uncertainty_node))


class SemiSAMSegmentLogic:
    """One-click segmentation with a trained student, without any GUI.

    ``process()`` does everything on the calling thread (scripts, tests); the widget splits it
    into :meth:`segment_arrays` (on the model worker thread) and :meth:`apply` (GUI thread).
    """

    def __init__(self) -> None:
        self._segmenters: Dict[Tuple[str, str, Optional[str], str], object] = {}

    def segmenter(self, checkpoint: os.PathLike | str, device: str = "auto", encoder_checkpoint: Optional[str] = None, backend: str = "auto"):
        """A cached :class:`semisam.inference.Segmenter` per (checkpoint, device, backend): the
        encoder and the slice embeddings are kept between runs on the same volume.

        ``backend``: the encoder's runtime (``auto``, ``openvino``, ``onnxruntime``, ``torch``).
        One that is missing or fails to load is replaced by torch, with one line in the log
        (:func:`log_fallback`)."""
        from semisam.inference import Segmenter

        if not checkpoint or not Path(checkpoint).is_file():
            raise ValueError(
                f"student checkpoint {checkpoint or '(none)'} not found: choose a trained student (.pt from SemiSAMTrain, "
                "`semisam train` or `semisam demo`, e.g. demo_output/run/best.pt)"
            )
        dev = resolve_device(device)
        key = (str(Path(checkpoint).resolve()), dev, encoder_checkpoint, backend)
        if key not in self._segmenters:
            self._segmenters[key] = Segmenter(checkpoint, dev, encoder_checkpoint, warn=lambda m: None, backend=backend, fallback=log_fallback)
        return self._segmenters[key]

    def segment_arrays(self, volume, checkpoint, device: str = "auto", uncertainty: bool = True,
                       progress: Optional[Callable[[int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None,
                       backend: str = "auto") -> SegmentResult:
        """The student's labels (and uncertainty) for a ``semisam`` Volume, on its grid."""
        import time

        t0 = time.time()
        seg = self.segmenter(checkpoint, device, backend=backend)
        result = seg.segment(volume, uncertainty=uncertainty, progress=progress, cancel=cancel)
        unc = result.uncertainty.array.astype(np.float32) if result.uncertainty is not None else None
        refined = seg.refiner.describe() if result.refined else ""
        return SegmentResult(result.label.array.astype(np.uint8), unc, seg.labels, time.time() - t0, refined)

    def apply(self, result: SegmentResult, volume_node, segmentation_node=None, uncertainty_node=None):
        """Write a result into the scene: a segmentation node (one segment per structure, named and
        coloured) on the volume's grid, and the uncertainty as a scalar volume. Returns both nodes."""
        from semisam.export import label_color

        name = volume_node.GetName()
        segmentation_node = mrml.write_labels_to_segmentation(
            result.label, volume_node, segmentation_node, names=result.names,
            colors={k: tuple(c / 255.0 for c in label_color(k)) for k in result.names},
        )
        if segmentation_node.GetName() in ("", None) or segmentation_node.GetName().startswith("Segmentation"):
            segmentation_node.SetName(f"{name} SemiSAM")
        if result.uncertainty is not None:
            reference = mrml.volume_from_node(volume_node)
            uncertainty_node = mrml.node_from_volume(reference.with_array(result.uncertainty), f"{name} SemiSAM uncertainty", node=uncertainty_node)
        return segmentation_node, uncertainty_node

    def apply_job(self, result: SegmentResult, job: OneClickJob):
        """:meth:`apply` for the nodes of a submitted job; None (nothing written) when the job's
        volume is no longer in its scene (:meth:`OneClickJob.dropped_reason` says so)."""
        if not job.usable():
            return None
        segmentation_node, uncertainty_node = job.output_nodes()
        return self.apply(result, job.volume_node, segmentation_node, uncertainty_node)

    def process(self, volume_node, checkpoint, device: str = "auto", uncertainty: bool = True, segmentation_node=None, uncertainty_node=None,
                progress=None, cancel=None, backend: str = "auto"):
        """Segment ``volume_node`` and write the nodes (see :meth:`apply`)."""
        result = self.segment_arrays(mrml.volume_from_node(volume_node), checkpoint, device, uncertainty, progress, cancel, backend)
        return self.apply(result, volume_node, segmentation_node, uncertainty_node)

    # -------------------------------------------------------------- export

    @staticmethod
    def label_map(segmentation_node, volume_node, segment_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        """The segments as one uint8 label map on the volume's grid (segment i → label i+1; a
        later segment wins where segments overlap)."""
        segmentation = segmentation_node.GetSegmentation()
        ids = list(segment_ids) if segment_ids is not None else [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if not ids:
            raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")
        if len(ids) > 255:
            raise ValueError("more than 255 segments cannot be written as one label map")
        labels = None
        for value, sid in enumerate(ids, start=1):
            mask = mrml.segment_array(segmentation_node, sid, volume_node) > 0
            labels = np.zeros(mask.shape, np.uint8) if labels is None else labels
            labels[mask] = value
        return labels

    @staticmethod
    def dicom_files(volume_node, file_for_instance: Optional[Callable[[str], str]] = None) -> List[str]:
        """The DICOM files a volume was loaded from (its ``DICOM.instanceUIDs`` attribute, resolved
        by ``file_for_instance``, in Slicer ``slicer.dicomDatabase.fileForInstance``); [] when the
        volume did not come from DICOM."""
        uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids:
            return []
        if file_for_instance is None:
            raise ValueError("the volume came from DICOM but no DICOM database was given to find its files")
        files = [file_for_instance(uid) for uid in uids]
        missing = [uid for uid, f in zip(uids, files) if not f or not Path(f).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} DICOM file(s) of '{volume_node.GetName()}' are no longer in the DICOM database (e.g. {missing[0]}); re-import the series")
        return files

    def export(self, segmentation_node, volume_node, path: os.PathLike | str, file_for_instance: Optional[Callable[[str], str]] = None) -> Path:
        """Write the segmentation as a label file (``.nii.gz``, ``.nrrd``, ``.mha``) or, for a
        volume loaded from DICOM, as DICOM SEG (``.dcm``) referencing the source series."""
        from semisam.export import write_dicom_seg, write_label_file

        path = Path(path)
        name = path.name.lower()
        if not any(name.endswith(s) for s in EXPORT_SUFFIXES):
            raise ValueError(f"{path.name}: cannot tell the format; name the file .nii.gz, .nrrd, .mha or .dcm (DICOM SEG)")
        labels = self.label_map(segmentation_node, volume_node)
        reference = mrml.volume_from_node(volume_node).with_array(labels)
        segmentation = segmentation_node.GetSegmentation()
        names = {i + 1: segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
        colors = {i + 1: tuple(int(round(255 * c)) for c in segmentation.GetNthSegment(i).GetColor()) for i in range(segmentation.GetNumberOfSegments())}
        if name.endswith(".dcm"):
            files = self.dicom_files(volume_node, file_for_instance)
            if not files:
                raise ValueError(f"'{volume_node.GetName()}' was not loaded from DICOM, so there is no series for a DICOM SEG to refer to: export .nii.gz or .nrrd instead")
            return write_dicom_seg(reference, files, path, names=names, colors=colors)
        return write_label_file(reference, path)
