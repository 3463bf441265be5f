"""Every kind of bad input gets an error that names the file and the problem; nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from semisam.cli import main as cli_main
from semisam.data import load_dataset, validate_dataset
from semisam.errors import InputError, OutputError
from semisam.phantom import write_cohort
from semisam.preprocess import preprocess
from semisam.volume import Volume, read_volume, write_volume


def problems_of(path, **kw):
    return [str(p) for p in validate_dataset(load_dataset(path), **kw) if p.severity == "error"]


@pytest.fixture
def cohort(tmp_path):
    return write_cohort(tmp_path / "cohort", n=4, labeled=2, shape=(16, 20, 20), seed=3)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(InputError, match=r"empty\.nii\.gz: is empty \(0 bytes\)"):
        read_volume(path)


def test_truncated_nifti(tmp_path, make_volume):
    path = write_volume(make_volume(shape=(20, 20, 20)), tmp_path / "whole.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: is truncated or corrupt \(the voxel data ends early\)"):
        read_volume(cut)
    # uncompressed NIfTI: the voxel data is shorter than the header says
    plain = write_volume(make_volume(shape=(20, 20, 20)), tmp_path / "plain.nii")
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"plain\.nii: is truncated: 32252 of 32352 bytes"):
        read_volume(plain)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_truncated_other_formats(tmp_path, make_volume, suffix):
    path = write_volume(make_volume(shape=(20, 20, 20)), tmp_path / f"v{suffix}")
    data_file = next(p for p in tmp_path.iterdir() if p != path) if suffix in (".mhd", ".nhdr") else path
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_volume(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"data")
    with pytest.raises(InputError, match=r"scan\.xyz: unknown file extension '\.xyz'.*\.nii\.gz"):
        read_volume(path)
    with pytest.raises(InputError, match="unknown file extension"):
        write_volume(Volume(np.zeros((2, 2, 2))), tmp_path / "out.xyz")


def test_four_dimensional_image(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False)  # 4D: t, z, y, x
    sitk.WriteImage(image, str(tmp_path / "cine.nii.gz"))
    with pytest.raises(InputError, match=r"cine\.nii\.gz: has 4 dimensions \(6x5x4x3\)"):
        read_volume(tmp_path / "cine.nii.gz")


def test_2d_image_where_3d_is_required(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), str(tmp_path / "slice.png"))
    assert read_volume(tmp_path / "slice.png").shape == (1, 8, 8)  # fine where 2D is allowed
    with pytest.raises(InputError, match=r"slice\.png: is a 2D image \(8x8\); a 3D volume is required"):
        read_volume(tmp_path / "slice.png", require_3d=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 8, 8), np.float32)), str(tmp_path / "one.nrrd"))
    with pytest.raises(InputError, match="one-slice volume"):
        read_volume(tmp_path / "one.nrrd", require_3d=True)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels(tmp_path, bad, suffix):
    # ITK's NIfTI reader turns NaN into 0 silently; we must still refuse the file.
    arr = np.ones((4, 5, 6), np.float32)
    arr[1, 2, 3] = bad
    path = tmp_path / f"bad{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    kind = "1 NaN and 0 infinite" if np.isnan(bad) else "0 NaN and 1 infinite"
    with pytest.raises(InputError, match=rf"bad{suffix}: has {kind} voxels \(first at z,y,x = \(1, 2, 3\)\)"):
        read_volume(path)


def test_constant_image(tmp_path, cohort):
    vol = Volume(np.full((8, 8, 8), 7.0, np.float32), meta={"source": "flat.nii.gz"})
    with pytest.raises(InputError, match=r"flat\.nii\.gz: image is constant \(every voxel is 7\)"):
        preprocess(vol)
    flat = cohort / "imagesUnlabeled" / "case_003.nii.gz"
    write_volume(Volume(np.zeros((16, 20, 20), np.float32)), flat)
    assert problems_of(cohort) == [f"{flat}: image is constant (every voxel is 0)"]


def test_label_on_a_different_grid(cohort):
    label_path = cohort / "labelsTr" / "case_001.nii.gz"
    label = read_volume(label_path, "label")
    shifted = Volume(label.array, label.spacing, tuple(o + 2.0 for o in label.origin), label.direction)
    write_volume(shifted, label_path)
    (problem,) = problems_of(cohort)
    assert problem.startswith(f"{label_path}: label grid differs from its image: origin (")
    assert "(label) vs (" in problem and "(image)" in problem
    write_volume(Volume(label.array[:-1], label.spacing, label.origin, label.direction), label_path)
    assert "shape [15, 20, 20] (label) vs [16, 20, 20] (image)" in problems_of(cohort)[0]


def test_label_values_outside_range(cohort):
    label_path = cohort / "labelsTr" / "case_000.nii.gz"
    label = read_volume(label_path, "label")
    arr = label.array.copy()
    arr[0, 0, 0] = 3
    write_volume(label.with_array(arr), label_path)
    assert problems_of(cohort) == [f"{label_path}: label values [3] outside 0..1 (the dataset declares 1 structure(s))"]
    assert problems_of(cohort, num_labels=3) == []
    frac = label.with_array(label.array.astype(np.float32) * 0.5)
    write_volume(frac, label_path)
    assert "label map has fractional values" in problems_of(cohort)[0]


def test_duplicate_case_ids(cohort):
    doc = json.loads((cohort / "dataset.json").read_text())
    doc["unlabeled"][0]["id"] = doc["training"][0]["id"]
    (cohort / "dataset.json").write_text(json.dumps(doc))
    (problem,) = problems_of(cohort)
    assert "duplicate case id 'case_000'" in problem and "case_002.nii.gz" in problem


def test_missing_label_for_a_listed_case(cohort):
    label_path = cohort / "labelsTr" / "case_001.nii.gz"
    label_path.unlink()
    assert problems_of(cohort) == [f"{label_path}: does not exist (check the path)"]
    # folder layout: the image without a label is named
    (cohort / "dataset.json").unlink()
    assert problems_of(cohort) == [f"{cohort / 'imagesTr' / 'case_001.nii.gz'}: no label for case 'case_001' in labelsTr/"]
    # JSON entry without a label key
    doc = {"training": [{"image": "imagesTr/case_000.nii.gz"}]}
    (cohort / "dataset.json").write_text(json.dumps(doc))
    assert any("training[0] (case 'case_000'): no 'label' given" in p for p in problems_of(cohort))


def test_non_ascii_dataset_paths(tmp_path):
    root = write_cohort(tmp_path / "échographies_胎儿", n=3, labeled=1, shape=(12, 16, 16), seed=1)
    assert problems_of(root) == []


def test_unwritable_output_folder(tmp_path, make_volume):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="a_file: exists and is not a folder"):
        write_volume(make_volume(), blocker / "out.nii.gz")
    with pytest.raises(OutputError, match="a_file"):
        write_cohort(blocker / "cohort", n=2)
    assert blocker.read_text() == "not a folder"


def _unwritable_folder(tmp_path):
    """A folder this process cannot write: a read-only one (non-root), else sysfs/procfs."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    for folder in (ro, Path("/sys"), Path("/proc")):
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder on this machine")


def test_read_only_output_folder(tmp_path, make_volume):
    folder = _unwritable_folder(tmp_path)
    try:
        with pytest.raises(OutputError, match=rf"{folder}: cannot write here \(.+\) \(choose another output folder"):
            write_volume(make_volume(), folder / "out.nii.gz")
        with pytest.raises(OutputError, match="cannot write here"):
            write_cohort(folder / "cohort", n=2)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_existing_cohort_is_not_overwritten(tmp_path):
    out = write_cohort(tmp_path / "c", n=2, labeled=1, shape=(12, 12, 12))
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(OutputError, match="exists and is not an empty folder"):
        write_cohort(out, n=3, labeled=1, shape=(12, 12, 12))
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no staging folder left


def test_validate_command_lists_every_problem(cohort, capsys):
    (cohort / "labelsTr" / "case_000.nii.gz").write_bytes(b"")
    arr = np.ones((4, 4, 4), np.float32)
    arr[0, 0, 0] = np.nan
    write_volume(Volume(arr), cohort / "imagesUnlabeled" / "case_002.nii.gz")
    assert cli_main(["validate", str(cohort)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{cohort / 'labelsTr' / 'case_000.nii.gz'}: is empty (0 bytes) (the export or copy failed; export it again)"
    assert err[1].startswith(f"{cohort / 'imagesUnlabeled' / 'case_002.nii.gz'}: has 1 NaN")
    assert err[2].startswith("dataset NOT usable: 2 problem(s)")


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "semisam.cli", "phantom", "--n", "2", "--out", str(tmp_path / "f" / "x")],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr
    (tmp_path / "g").write_text("")
    run = subprocess.run(
        [sys.executable, "-m", "semisam.cli", "phantom", "--n", "2", "--out", str(tmp_path / "g" / "x")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip() == f"semisam phantom: error: {tmp_path / 'g'}: exists and is not a folder (choose another output location)"
