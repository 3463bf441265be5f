"""Label files and DICOM SEG export (highdicom) against a real DICOM series."""

import numpy as np
import pytest

from semisam.errors import InputError, OutputError
from semisam.export import read_dicom_seg, write_dicom_seg, write_label_file
from semisam.phantom import make_phantom
from semisam.volume import read_volume, write_volume


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("dicom")
    ph = make_phantom(3, (12, 24, 28), num_labels=2)
    write_volume(ph.image, d / "series")
    image = read_volume(d / "series")
    return image, image.with_array(ph.label.array), d


def test_dicom_seg_round_trip_frame_by_frame(dicom_case, tmp_path):
    image, label, _ = dicom_case
    out = write_dicom_seg(label, image.meta["dicom_files"], tmp_path / "seg.dcm", names={1: "liver", 2: "lesion"})
    seg = read_dicom_seg(out)
    assert seg["labels"] == {1: "liver", 2: "lesion"}
    # each frame refers to the source slice at the same position: compare slice by slice
    import pydicom

    z_of_uid = {}
    for f in image.meta["dicom_files"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        z = int(round(image.physical_to_index(pos[None])[0][2]))
        z_of_uid[ds.SOPInstanceUID] = z
    assert sorted(z_of_uid[u] for u in seg["frames"]) == list(range(label.shape[0]))
    for frame, uid in zip(seg["array"], seg["frames"]):
        np.testing.assert_array_equal(frame, label.array[z_of_uid[uid]])


def test_dicom_seg_refuses_wrong_grid_and_empty(dicom_case, tmp_path):
    image, label, _ = dicom_case
    shifted = label.with_array(label.array)
    shifted.origin = tuple(np.asarray(label.origin) + np.asarray(label.direction) @ np.array([0, 0, 0.5 * label.spacing[2]]))
    with pytest.raises(InputError, match="no source slice"):
        write_dicom_seg(shifted, image.meta["dicom_files"], tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="empty"):
        write_dicom_seg(label.with_array(np.zeros_like(label.array)), image.meta["dicom_files"], tmp_path / "b.dcm")
    with pytest.raises(OutputError, match=".dcm"):
        write_dicom_seg(label, image.meta["dicom_files"], tmp_path / "c.nii.gz")
    with pytest.raises(InputError, match="no source files"):
        write_dicom_seg(label, [], tmp_path / "d.dcm")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_label_file_round_trip(dicom_case, tmp_path):
    _, label, _ = dicom_case
    for name in ("seg.nii.gz", "seg.nrrd"):
        back = read_volume(write_label_file(label, tmp_path / name), "label")
        np.testing.assert_array_equal(back.array, label.array)
        assert back.same_grid(label, tol=1e-5)
    with pytest.raises(ValueError, match="integers"):
        write_label_file(label.with_array(label.array.astype(np.float32) + 0.5), tmp_path / "x.nrrd")
