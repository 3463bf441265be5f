"""SemiSAMSegment's logic against real MRML (slicer-core): one-click segmentation into a
segmentation node and an uncertainty volume, export to label files and DICOM SEG."""

from __future__ import annotations

import numpy as np
import pytest

from semisam.models.student import SlicingSAM3D, StudentConfig
from semisam.phantom import make_phantom
from semisam.preprocess import PreprocessConfig
from semisam.volume import read_volume, write_volume

slicer = pytest.importorskip("slicer")

from SemiSAMSegmentLib import mrml  # noqa: E402  (slicer_app puts the module folder on sys.path)
from SemiSAMSegmentLib.logic import SegmentResult, SemiSAMSegmentLogic  # noqa: E402


STUDENT_GRID = dict(target_shape=(4, 64, 64), target_spacing=(1.5, 1.5, 3.0))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """An untrained two-structure student on the real LiteMedSAM encoder (plumbing, not quality)."""
    path = tmp_path_factory.mktemp("student") / "student.pt"
    config = PreprocessConfig(**STUDENT_GRID)
    model = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=4, num_labels=2))
    model.save(path, extra={"preprocess": config.to_dict(), "labels": {"0": "background", "1": "kidney", "2": "cyst"}})
    return path


@pytest.fixture
def phantom_node(slicer_scene):
    case = make_phantom(5, (16, 40, 44), num_labels=2)
    return case, mrml.node_from_volume(case.image, "phantom")


def test_one_click_writes_named_segments_and_uncertainty_on_the_volume_grid(slicer_scene, phantom_node, student):
    case, node = phantom_node
    logic = SemiSAMSegmentLogic()
    progress = []
    result = logic.segment_arrays(mrml.volume_from_node(node), student, "cpu", uncertainty=True, progress=lambda d, t: progress.append((d, t)))
    from semisam.inference import whole_fov
    from semisam.preprocess import preprocess
    from semisam.tiling import tiles

    pre = whole_fov(PreprocessConfig(**STUDENT_GRID))
    grid, _ = preprocess(mrml.volume_from_node(node), pre)  # the whole field of view at the student's spacing
    n_tiles = grid.shape[0] * len(tiles(grid.shape[1:], pre.target_shape[1:], pre.tile_overlap))
    assert grid.shape[0] > pre.target_shape[0]  # more than the training grid's 4 slices: nothing is cropped
    assert progress and progress[-1][0] == progress[-1][1] == n_tiles  # every slice-tile of the field of view embedded
    assert result.label.shape == case.image.shape and result.uncertainty.shape == case.image.shape
    assert result.names == {1: "kidney", 2: "cyst"}
    assert result.refined == ""  # this student records no refinement by the teachers
    # the real labels through the same apply(): exact on the grid, named, coloured
    seg, unc = logic.apply(SegmentResult(case.label.array, result.uncertainty, result.names, 0.0), node)
    s = seg.GetSegmentation()
    assert [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())] == ["kidney", "cyst"]
    for k in (1, 2):
        np.testing.assert_array_equal(mrml.segment_array(seg, s.GetSegmentIdBySegmentName(["", "kidney", "cyst"][k]), node) > 0, case.label.array == k)
    back = mrml.volume_from_node(unc)
    assert back.same_grid(case.image, tol=1e-6)
    np.testing.assert_array_equal(back.array, result.uncertainty)
    # a second run into the same nodes replaces, never duplicates
    seg2, unc2 = logic.apply(SegmentResult(case.label.array, result.uncertainty, result.names, 0.0), node, seg, unc)
    assert seg2 is seg and unc2 is unc and seg.GetSegmentation().GetNumberOfSegments() == 2


def test_process_runs_end_to_end_and_reuses_the_segmenter(slicer_scene, phantom_node, student):
    _, node = phantom_node
    logic = SemiSAMSegmentLogic()
    seg, unc = logic.process(node, student, "cpu", uncertainty=False)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2 and unc is None
    assert len(logic._segmenters) == 1
    logic.process(node, student, "cpu", uncertainty=False, segmentation_node=seg)
    assert len(logic._segmenters) == 1  # encoder and embeddings kept between runs


def test_cancel_stops_before_decoding(slicer_scene, phantom_node, student):
    from semisam.inference import Cancelled

    _, node = phantom_node
    with pytest.raises(Cancelled):
        SemiSAMSegmentLogic().segment_arrays(mrml.volume_from_node(node), student, "cpu", cancel=lambda: True)


def test_a_missing_encoder_backend_falls_back_to_torch_with_one_log_line(slicer_scene, phantom_node, student, monkeypatch, caplog):
    import logging
    import sys

    _, node = phantom_node
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    logic = SemiSAMSegmentLogic()
    with caplog.at_level(logging.WARNING):
        result = logic.segment_arrays(mrml.volume_from_node(node), student, "cpu", uncertainty=False, backend="openvino")
        logic.segment_arrays(mrml.volume_from_node(node), student, "cpu", uncertainty=False, backend="openvino")  # the segmenter is kept
    lines = [r.getMessage() for r in caplog.records if "SemiSAM" in r.getMessage()]
    assert len(lines) == 1 and "openvino unavailable" in lines[0] and "using torch" in lines[0], lines
    (segmenter,) = logic._segmenters.values()
    assert ":fast-openvino" not in segmenter.encoder.cache_id and result.label.shape == node.GetImageData().GetDimensions()[::-1]


@pytest.mark.parametrize("checkpoint, device, message", [
    ("", "cpu", "student checkpoint \\(none\\) not found"),
    ("/nope/best.pt", "cpu", "not found: choose a trained student"),
    (None, "cuda:0", "no CUDA GPU") if not __import__("torch").cuda.is_available() else (None, "tpu", "device must be"),
    (None, "tpu", "device must be"),
])
def test_bad_model_choices_are_explained(slicer_scene, phantom_node, student, checkpoint, device, message):
    _, node = phantom_node
    with pytest.raises(ValueError, match=message):
        SemiSAMSegmentLogic().segment_arrays(mrml.volume_from_node(node), student if checkpoint is None else checkpoint, device)


def test_export_label_files(slicer_scene, phantom_node, tmp_path):
    case, node = phantom_node
    logic = SemiSAMSegmentLogic()
    seg, _ = logic.apply(SegmentResult(case.label.array, None, {1: "a", 2: "b"}, 0.0), node)
    for name in ("out.nii.gz", "out.nrrd"):
        back = read_volume(logic.export(seg, node, tmp_path / name), "label")
        np.testing.assert_array_equal(back.array, case.label.array)
        assert back.same_grid(case.image, tol=1e-5)
    with pytest.raises(ValueError, match="cannot tell the format"):
        logic.export(seg, node, tmp_path / "out.png")
    with pytest.raises(ValueError, match="not loaded from DICOM"):
        logic.export(seg, node, tmp_path / "out.dcm")
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(ValueError, match="no segments"):
        logic.export(empty, node, tmp_path / "e.nrrd")


def test_export_dicom_seg_for_a_volume_from_dicom(slicer_scene, tmp_path):
    import pydicom

    from semisam.export import read_dicom_seg

    case = make_phantom(6, (10, 24, 28))
    write_volume(case.image, tmp_path / "series")
    image = read_volume(tmp_path / "series")
    node = mrml.node_from_volume(image, "from DICOM")
    files = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in image.meta["dicom_files"]}
    node.SetAttribute("DICOM.instanceUIDs", " ".join(files))
    logic = SemiSAMSegmentLogic()
    seg, _ = logic.apply(SegmentResult(case.label.array, None, {1: "target"}, 0.0), node)
    with pytest.raises(ValueError, match="no DICOM database"):
        logic.export(seg, node, tmp_path / "seg.dcm")
    out = logic.export(seg, node, tmp_path / "seg.dcm", files.get)
    read = read_dicom_seg(out)
    assert read["labels"] == {1: "target"}
    z_of = {uid: int(round(image.physical_to_index(np.array([[float(v) for v in pydicom.dcmread(f).ImagePositionPatient]]))[0][2])) for uid, f in files.items()}
    for frame, uid in zip(read["array"], read["frames"]):
        np.testing.assert_array_equal(frame > 0, case.label.array[z_of[uid]] > 0)
    with pytest.raises(ValueError, match="no longer in the DICOM database"):
        logic.export(seg, node, tmp_path / "seg2.dcm", lambda uid: None)
