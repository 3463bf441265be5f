"""Every format reads and writes with geometry intact; writes are atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import blob_label, oblique
from semisam import volume as volume_mod
from semisam.errors import InputError, OutputError
from semisam.volume import Volume, read_volume, write_volume

# Geometry tolerance (mm / direction cosines) each format can hold: NIfTI stores float32.
FORMATS = [(".nii.gz", 2e-5), (".nii", 2e-5), (".nrrd", 1e-9), (".nhdr", 1e-9), (".mha", 1e-9), (".mhd", 1e-9), ("", 1e-9)]


def _path(tmp_path, suffix, stem="vol"):
    return tmp_path / (stem + suffix if suffix else stem + "_dicom")


def assert_geometry(a: Volume, b: Volume, tol: float) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol, rtol=0)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol * 100, rtol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol, rtol=0)


@pytest.mark.parametrize("suffix,tol", FORMATS)
def test_image_round_trip_keeps_geometry(tmp_path, make_volume, suffix, tol):
    vol = make_volume(origin=(-101.123456789, 55.5432109876, 12.3456789))
    path = write_volume(vol, _path(tmp_path, suffix))
    back = read_volume(path)
    assert back.array.dtype == np.float32
    assert_geometry(back, vol, tol)
    # DICOM holds 16-bit integers with a rescale slope of range/65000; the rest are exact.
    atol = (vol.array.max() - vol.array.min()) / 65000 if suffix == "" else 0
    np.testing.assert_allclose(back.array, vol.array, atol=atol * 0.51 + 1e-6, rtol=0)


@pytest.mark.parametrize("suffix,tol", FORMATS)
def test_label_round_trip_is_exact(tmp_path, suffix, tol):
    spacing = (0.4, 0.6, 0.9)
    label = blob_label((10, 12, 14), spacing=spacing, two=True)
    vol = Volume(label, spacing, (3.0, -4.0, 5.5), oblique((5, 10, -40)))
    back = read_volume(write_volume(vol, _path(tmp_path, suffix, "lab")), kind="label")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, label)
    assert_geometry(back, vol, tol)


def test_index_to_physical_matches_simpleitk(make_volume):
    vol = make_volume()
    image = vol.to_sitk()
    idx = np.array([[0, 0, 0], [3.5, 2.0, 7.25], [15, 13, 11]])
    ours = vol.index_to_physical(idx)
    theirs = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(vol.physical_to_index(ours), idx, atol=1e-9)
    homogeneous = np.c_[idx, np.ones(len(idx))] @ vol.affine.T
    np.testing.assert_allclose(homogeneous[:, :3], theirs, atol=1e-9)


def test_png_is_a_one_slice_volume(tmp_path):
    arr = (np.arange(20 * 30) % 256).reshape(20, 30).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "b.png"))
    vol = read_volume(tmp_path / "b.png")
    assert vol.shape == (1, 20, 30) and vol.meta["was_2d"]
    np.testing.assert_array_equal(vol.array[0], arr)
    # and back: whole numbers 0..255 fit
    back = read_volume(write_volume(vol, tmp_path / "c.png"))
    np.testing.assert_array_equal(back.array, vol.array)


def test_rgb_png_becomes_luminance(tmp_path):
    rgb = np.zeros((8, 9, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 50, 200
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    vol = read_volume(tmp_path / "rgb.png")
    np.testing.assert_allclose(vol.array, 0.299 * 100 + 0.587 * 50 + 0.114 * 200, rtol=1e-5)


def test_png_refuses_what_it_cannot_hold(tmp_path, make_volume):
    with pytest.raises(InputError, match="one slice"):
        write_volume(make_volume(), tmp_path / "x.png")
    with pytest.raises(InputError, match="whole numbers"):
        write_volume(Volume(np.full((1, 4, 4), 0.5, np.float32)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_non_ascii_paths_work(tmp_path, make_volume):
    vol = make_volume()
    for suffix in (".nii.gz", ".nrrd", ""):
        path = tmp_path / "données échographie" / ("фантом_超声" + (suffix or "_dcm"))
        back = read_volume(write_volume(vol, path))
        assert_geometry(back, vol, 2e-5)


def test_failed_write_leaves_nothing(tmp_path, make_volume, monkeypatch):
    vol = make_volume()
    target = tmp_path / "out.nii.gz"
    write_volume(vol, target)
    before = target.read_bytes()

    def broken(volume, path, fmt, compress):
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_mod, "_write_file", broken)
    with pytest.raises(OutputError, match="No space left"):
        write_volume(make_volume(seed=1), target)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temporary left over


def test_header_and_data_pairs_move_together(tmp_path, make_volume):
    vol = make_volume()
    write_volume(vol, tmp_path / "a.mhd")
    write_volume(vol, tmp_path / "b.nhdr")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.mhd", "a.zraw", "b.nhdr", "b.raw.gz"]
    np.testing.assert_array_equal(read_volume(tmp_path / "a.mhd").array, vol.array)
    np.testing.assert_array_equal(read_volume(tmp_path / "b.nhdr").array, vol.array)


def test_dicom_folder_with_two_series_needs_a_choice(tmp_path, make_volume):
    a, b = tmp_path / "a", tmp_path / "b"
    write_volume(make_volume(), a)
    write_volume(make_volume(seed=2), b)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in (a, b):
        for f in src.iterdir():
            os.link(f, mixed / f"{src.name}_{f.name}")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_volume(mixed)
    uid = read_volume(a).meta["series_uid"]
    np.testing.assert_allclose(read_volume(mixed, series_uid=uid).array, read_volume(a).array)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path / "empty")


def test_dicom_output_must_be_new(tmp_path, make_volume):
    out = tmp_path / "series"
    write_volume(make_volume(), out)
    with pytest.raises(OutputError, match="not empty"):
        write_volume(make_volume(), out)
