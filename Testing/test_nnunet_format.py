"""nnU-Net v2 raw data sets are read as they are: dataset.json (channel_names, labels name -> value,
file_ending, numTraining) + imagesTr/<case>_0000<ending> + labelsTr/<case><ending>."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_npy_gz, shared_dataset
from semisam.cli import main
from semisam.data import NNUNET_V2, load_dataset, make_dataset, validate_dataset
from semisam.phantom import make_phantom
from semisam.preprocess import PreprocessConfig
from semisam.volume import Volume, read_volume, write_volume

SHAPE = (32, 32, 32)


def errors(problems):
    return [str(p) for p in problems if p.severity == "error"]


def warnings(problems):
    return [str(p) for p in problems if p.severity == "warning"]


def write_case(folder: Path, name: str, seed: int, ending: str = ".nii.gz", label_folder: Path = None, num_labels: int = 1):
    case = make_phantom(seed, SHAPE, num_labels=num_labels)
    write_volume(case.image, folder / f"{name}_0000{ending}")
    if label_folder is not None:
        write_volume(case.label, label_folder / f"{name}{ending}")
    return case


def nnunet_dataset(root: Path, n_train=3, n_test=1, test_labels=True, n_unlabeled=2, ending=".nii.gz", num_labels=1, **doc_overrides) -> Path:
    """An nnU-Net v2 raw data set of 32^3 phantoms, as nnU-Net's generate_dataset_json writes it."""
    labels = {"background": 0, **{f"structure_{k}": k for k in range(1, num_labels + 1)}} if num_labels > 1 else {"background": 0, "target": 1}
    for i in range(n_train):
        write_case(root / "imagesTr", f"us_{i:03d}", i, ending, root / "labelsTr", num_labels)
    for i in range(n_test):
        write_case(root / "imagesTs", f"ts_{i:03d}", 100 + i, ending, root / "labelsTs" if test_labels else None, num_labels)
    for i in range(n_unlabeled):
        write_case(root / "imagesUnlabeled", f"un_{i:03d}", 200 + i, ending)
    doc = {"channel_names": {"0": "US"}, "labels": labels, "numTraining": n_train, "file_ending": ending, "name": "Dataset501_Phantom"}
    doc.update(doc_overrides)
    (root / "dataset.json").write_text(json.dumps(doc, indent=2))
    return root


def rewrite(root: Path, **changes) -> None:
    doc = json.loads((root / "dataset.json").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (root / "dataset.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    return nnunet_dataset(tmp_path_factory.mktemp("nnunet") / "Dataset501_Phantom")


@pytest.fixture
def fresh(tmp_path, phantom_set):
    """A copy of the phantom data set to break."""
    return Path(shutil.copytree(phantom_set, tmp_path / "Dataset501_Phantom"))


def test_nnunet_v2_raw_is_read_as_it_is(phantom_set):
    for given in (phantom_set, phantom_set / "dataset.json"):
        spec = load_dataset(given)
        assert spec.source == NNUNET_V2 == "nnunet-v2"
        assert spec.channel_names == {"0": "US"} and spec.file_ending == ".nii.gz"
        assert spec.labels == {0: "background", 1: "target"} and spec.num_labels == 1
        assert [c.id for c in spec.labeled] == ["us_000", "us_001", "us_002"]
        assert [c.image.name for c in spec.labeled] == ["us_000_0000.nii.gz", "us_001_0000.nii.gz", "us_002_0000.nii.gz"]
        assert [c.label.relative_to(phantom_set).as_posix() for c in spec.labeled] == [f"labelsTr/us_00{i}.nii.gz" for i in range(3)]
        assert [(c.id, c.label.name) for c in spec.test] == [("ts_000", "ts_000.nii.gz")]
        assert [(c.id, c.label) for c in spec.unlabeled] == [("un_000", None), ("un_001", None)]
        assert spec.validation == [] and spec.image_type == "bmode"
    assert validate_dataset(spec) == []  # not even a warning
    assert spec.format_description == 'nnU-Net v2 raw (dataset.json with channel_names {"0": "US"}, file_ending .nii.gz)'


def test_nnunet_cases_load_with_their_labels(phantom_set):
    spec = load_dataset(phantom_set)
    ds = make_dataset(spec, PreprocessConfig(target_shape=(16, 16, 16), target_spacing=(2.0, 2.0, 2.0)), cache="none")
    assert len(ds) == 5  # 3 labeled, then 2 unlabeled
    first, last = ds[0], ds[4]
    assert first["id"] == "us_000" and first["has_label"] and int(first["label"].max()) == 1
    assert last["id"] == "un_001" and not last["has_label"]
    truth = make_phantom(0, SHAPE).label.array
    np.testing.assert_array_equal(read_volume(spec.labeled[0].label, "label").array, truth)


def test_label_values_are_checked_against_the_declared_labels(fresh):
    label = read_volume(fresh / "labelsTr" / "us_001.nii.gz", "label")
    write_volume(label.with_array(label.array * 2), fresh / "labelsTr" / "us_001.nii.gz")
    found = errors(validate_dataset(load_dataset(fresh)))
    assert found == [f"{fresh / 'labelsTr' / 'us_001.nii.gz'}: label values [2] outside 0..1 (the dataset declares 1 structure(s))"]


def test_several_structures(tmp_path):
    root = nnunet_dataset(tmp_path / "multi", n_train=2, n_test=0, n_unlabeled=0, num_labels=2)
    spec = load_dataset(root)
    assert spec.labels == {0: "background", 1: "structure_1", 2: "structure_2"} and spec.num_labels == 2
    assert errors(validate_dataset(spec)) == []


def test_other_file_endings(tmp_path):
    root = nnunet_dataset(tmp_path / "nrrd", n_train=2, n_test=0, n_unlabeled=0, ending=".nrrd")
    spec = load_dataset(root)
    assert spec.file_ending == ".nrrd" and [c.label.name for c in spec.labeled] == ["us_000.nrrd", "us_001.nrrd"]
    assert validate_dataset(spec) == []


def test_images_ts_without_labels_is_listed_with_a_warning(fresh):
    shutil.rmtree(fresh / "labelsTs")
    spec = load_dataset(fresh)
    assert spec.test == []
    problems = validate_dataset(spec)
    assert errors(problems) == []
    assert warnings(problems) == [f"{fresh / 'imagesTs'}: warning: no labelsTs/ beside it (nnU-Net keeps no test labels): not used as a "
                                  "test split; put their labels in labelsTs/<case>.nii.gz to score on them"]


def test_validation_folders_beside_nnunet_folders(fresh):
    write_case(fresh / "imagesVal", "va_000", 300, label_folder=fresh / "labelsVal")
    spec = load_dataset(fresh)
    assert [(c.id, c.label.name) for c in spec.validation] == [("va_000", "va_000.nii.gz")]
    assert errors(validate_dataset(spec)) == []


def test_unlabeled_folder_named_in_dataset_json(fresh):
    write_case(fresh / "moreUS", "extra_a", 301)
    write_case(fresh / "moreUS", "extra_b", 302)
    write_case(fresh / "single", "lone", 303)
    rewrite(fresh, unlabeled="moreUS")
    spec = load_dataset(fresh)
    assert [c.id for c in spec.unlabeled] == ["extra_a", "extra_b"]
    problems = validate_dataset(spec)
    assert errors(problems) == []
    assert warnings(problems) == [f"{fresh / 'imagesUnlabeled'}: warning: not read: dataset.json's 'unlabeled' names other images; "
                                  "add \"imagesUnlabeled\" to it to use these too"]
    rewrite(fresh, unlabeled=["moreUS", "imagesUnlabeled", "single/lone_0000.nii.gz"])
    spec = load_dataset(fresh)
    assert [c.id for c in spec.unlabeled] == ["extra_a", "extra_b", "un_000", "un_001", "lone"]
    assert validate_dataset(spec) == []
    rewrite(fresh, unlabeled=["moreUS", "nowhere"])
    assert errors(load_dataset(fresh).problems) == [
        f"{fresh / 'dataset.json'}: 'unlabeled' names nowhere, which does not exist: give a folder of unlabeled images "
        "(e.g. \"imagesUnlabeled\") or image files, relative to dataset.json"]


def test_unlabeled_folder_keeps_channel_zero_only(fresh):
    write_case(fresh / "imagesUnlabeled", "un_000", 200)  # rewrite: same file
    shutil.copy(fresh / "imagesUnlabeled" / "un_000_0000.nii.gz", fresh / "imagesUnlabeled" / "un_000_0001.nii.gz")
    spec = load_dataset(fresh)
    assert [c.image.name for c in spec.unlabeled] == ["un_000_0000.nii.gz", "un_001_0000.nii.gz"]
    assert [m for m in errors(spec.problems)] == [
        f"{fresh / 'imagesUnlabeled'}: holds other channels than _0000 (un_000_0001.nii.gz); SemiSAM segments single-channel "
        "images: keep one channel per case and move the other files out"]


def test_num_training_must_match(fresh):
    rewrite(fresh, numTraining=5)
    assert errors(validate_dataset(load_dataset(fresh))) == [
        f"{fresh / 'dataset.json'}: 'numTraining' is 5 but imagesTr/ holds 3 training case(s): set numTraining to 3, "
        "or add the missing cases (image and label)"]
    rewrite(fresh, numTraining=None)
    problems = validate_dataset(load_dataset(fresh))
    assert errors(problems) == [] and any("without 'numTraining'" in w and "\"numTraining\": 3" in w for w in warnings(problems))


@pytest.mark.parametrize("channels", [{"0": "US", "1": "Doppler"}, {"0": "T2", "1": "ADC", "2": "DWI"}])
def test_several_channels_are_refused_once(fresh, channels):
    for case in ("us_000", "us_001", "us_002"):
        shutil.copy(fresh / "imagesTr" / f"{case}_0000.nii.gz", fresh / "imagesTr" / f"{case}_0001.nii.gz")
    rewrite(fresh, channel_names=channels)
    found = errors(validate_dataset(load_dataset(fresh)))
    assert len(found) == 1, found
    assert f"'channel_names' declares {len(channels)} channels" in found[0] and "SemiSAM segments single-channel images" in found[0]


def test_channel_files_without_channel_names_are_refused(fresh):
    shutil.copy(fresh / "imagesTr" / "us_001_0000.nii.gz", fresh / "imagesTr" / "us_001_0001.nii.gz")
    assert errors(validate_dataset(load_dataset(fresh))) == [
        f"{fresh / 'imagesTr'}: holds other channels than _0000 (_0001: us_001_0001.nii.gz); SemiSAM segments single-channel "
        "images: keep the one channel to segment as <case>_0000.nii.gz and move the other channels' files out"]


@pytest.mark.parametrize("name", ["CT", "MRI", "ultrasound"])
def test_channel_names_are_only_recorded(fresh, name):
    rewrite(fresh, channel_names={"0": name})
    spec = load_dataset(fresh)
    assert spec.channel_names == {"0": name} and spec.image_type == "bmode" and validate_dataset(spec) == []


def test_missing_channel_names_is_a_warning(fresh):
    rewrite(fresh, channel_names=None)
    spec = load_dataset(fresh)
    assert spec.source == NNUNET_V2 and errors(validate_dataset(spec)) == []
    assert any("without 'channel_names'" in w for w in warnings(spec.problems))
    assert spec.format_description == "nnU-Net v2 raw (dataset.json with file_ending .nii.gz)"


@pytest.mark.parametrize("labels,expected", [
    ({"background": 0, "prostate": 2}, "'labels' values must be 0 (background) and 1..K without gaps, got [0, 2]: renumber the "
                                       "label maps to 0..1 and 'labels' to match"),
    ({"background": 0, "whole": [1, 2], "core": 2}, "'labels' 'whole': regions (lists of values, nnU-Net's region-based training); "
                                                    "SemiSAM needs plain integer labels"),
    ({"0": "background", "1": "target"}, "'labels' maps values to names (the MSD / nnU-Net v1 direction); nnU-Net v2 maps names to "
                                         "values: write \"labels\": {\"background\": 0, \"target\": 1}"),
    ({"background": 0, "target": 1, "ignore": 2}, "'labels' has nnU-Net's 'ignore' label (value 2"),
    ({"background": 0, "a": 1, "b": 1}, "'labels': 'a' and 'b' have the same value 1"),
    ({"background": 0}, "'labels' values must be 0 (background) and 1..K without gaps, got [0]: name the background 0 and at "
                        "least one structure"),
    ({"target": 1}, "'labels' values must be 0 (background) and 1..K without gaps, got [1]: name the background 0"),
])
def test_bad_labels_are_one_clear_problem(fresh, labels, expected):
    rewrite(fresh, labels=labels)
    found = errors(validate_dataset(load_dataset(fresh), read=False))
    assert len(found) == 1 and found[0].startswith(f"{fresh / 'dataset.json'}: {expected}"), found


def test_missing_file_ending_says_which_to_add(fresh):
    rewrite(fresh, file_ending=None)
    spec = load_dataset(fresh)
    assert [c.id for c in spec.labeled] == ["us_000", "us_001", "us_002"]  # still listed (the ending is guessed) so the rest is checked
    assert errors(validate_dataset(spec)) == [
        f"{fresh / 'dataset.json'}: nnU-Net v2 dataset.json without 'file_ending': add \"file_ending\": \".nii.gz\" "
        "(what the images in imagesTr/ end with)"]
    rewrite(fresh, file_ending=".tif")
    found = errors(validate_dataset(load_dataset(fresh)))
    assert found[0].startswith(f"{fresh / 'dataset.json'}: file_ending '.tif': SemiSAM does not read this format; convert")


def test_mixed_file_formats_in_one_folder(fresh):
    image = read_volume(fresh / "imagesTr" / "us_002_0000.nii.gz")
    label = read_volume(fresh / "labelsTr" / "us_002.nii.gz", "label")
    (fresh / "imagesTr" / "us_002_0000.nii.gz").unlink()
    (fresh / "labelsTr" / "us_002.nii.gz").unlink()
    write_volume(image, fresh / "imagesTr" / "us_002_0000.nrrd")
    write_volume(label, fresh / "labelsTr" / "us_002.nrrd")
    (fresh / "imagesTr" / "notes.txt").write_text("scanner settings")
    rewrite(fresh, numTraining=2)
    problems = validate_dataset(load_dataset(fresh))
    assert errors(problems) == [
        f"{fresh / 'imagesTr'}: 1 file(s) do not end with file_ending '.nii.gz' and are not read (us_002_0000.nrrd): a data set "
        "has one format (nnU-Net's rule); convert them to .nii.gz or remove them",
        f"{fresh / 'labelsTr'}: 1 file(s) do not end with file_ending '.nii.gz' and are not read (us_002.nrrd): a data set "
        "has one format (nnU-Net's rule); convert them to .nii.gz or remove them"]
    assert warnings(problems) == [f"{fresh / 'imagesTr'}: warning: 1 file(s) that are not .nii.gz volumes are ignored (notes.txt)"]


def test_mixed_dataset_json_formats(fresh):
    same = [{"image": f"./imagesTr/us_00{i}.nii.gz", "label": f"./labelsTr/us_00{i}.nii.gz"} for i in range(3)]
    rewrite(fresh, training=same)  # an MSD / nnU-Net v1 list left beside the v2 keys: harmless
    problems = validate_dataset(load_dataset(fresh), read=False)
    assert errors(problems) == [] and any("names the same cases as imagesTr/ and is not read" in w for w in warnings(problems))
    rewrite(fresh, training=same[:1])
    assert errors(validate_dataset(load_dataset(fresh), read=False)) == [
        f"{fresh / 'dataset.json'}: mixes two formats: nnU-Net v2 (channel_names, file_ending) and a 'training' list naming other "
        "cases (1 listed, 3 in imagesTr/); nnU-Net v2 reads imagesTr/ + labelsTr/: remove the 'training' list, or remove "
        "channel_names, file_ending to train on the list"]
    rewrite(fresh, training=None, test=[{"image": "imagesTs/ts_000_0000.nii.gz", "label": "labelsTs/ts_000.nii.gz"}])
    found = errors(validate_dataset(load_dataset(fresh), read=False))
    assert len(found) == 1 and "SemiSAM's 'test' list, which is not read here: put those cases in imagesTs/ + labelsTs/" in found[0]


def test_unpaired_and_misnamed_files(fresh):
    (fresh / "labelsTr" / "us_001.nii.gz").unlink()
    shutil.copy(fresh / "labelsTr" / "us_000.nii.gz", fresh / "labelsTr" / "us_009.nii.gz")
    shutil.copy(fresh / "imagesUnlabeled" / "un_000_0000.nii.gz", fresh / "imagesTr" / "plain.nii.gz")
    found = errors(validate_dataset(load_dataset(fresh), read=False))
    assert found == [
        f"{fresh / 'imagesTr'}: 1 image(s) without nnU-Net's channel suffix (plain.nii.gz): name them <case>_0000.nii.gz",
        f"{fresh / 'imagesTr' / 'us_001_0000.nii.gz'}: no label for case 'us_001': expected labelsTr/us_001.nii.gz",
        f"{fresh / 'labelsTr' / 'us_009.nii.gz'}: label without an image: no imagesTr/us_009_0000.nii.gz",
    ]


def test_cases_listed_in_dataset_key(fresh):
    listed = {f"us_00{i}": {"images": [f"imagesTr/us_00{i}_0000.nii.gz"], "label": f"labelsTr/us_00{i}.nii.gz"} for i in (0, 2)}
    rewrite(fresh, dataset=listed, numTraining=2)
    spec = load_dataset(fresh)
    assert [(c.id, c.label.name) for c in spec.labeled] == [("us_000", "us_000.nii.gz"), ("us_002", "us_002.nii.gz")]
    assert validate_dataset(spec) == []
    listed["us_000"]["images"].append("imagesTr/us_001_0000.nii.gz")
    rewrite(fresh, dataset=listed, numTraining=3)
    assert errors(validate_dataset(load_dataset(fresh), read=False)) == [
        f"{fresh / 'dataset.json'}: 'dataset' lists several images (channels) for 1 case(s) (us_000); SemiSAM segments "
        "single-channel images: list one image per case",
        f"{fresh / 'dataset.json'}: 'numTraining' is 3 but 'dataset' holds 2 training case(s): set numTraining to 2, or add the "
        "missing cases (image and label)"]


def test_semisam_json_with_nnunet_style_labels_says_why(tmp_path, phantom_set):
    doc = {"labels": {"background": 0, "target": 1},
           "training": [{"image": str(phantom_set / "imagesTr/us_000_0000.nii.gz"), "label": str(phantom_set / "labelsTr/us_000.nii.gz")}]}
    (tmp_path / "d.json").write_text(json.dumps(doc))
    spec = load_dataset(tmp_path / "d.json")
    assert spec.source == "json"
    assert [str(p) for p in spec.problems] == [
        f"{tmp_path / 'd.json'}: 'labels' must map label values (0..K) to names (it maps names to values, as nnU-Net v2 does: an "
        "nnU-Net v2 dataset.json also has 'channel_names' and 'file_ending' and no 'training' list; add those, or write "
        "{\"0\": \"background\", \"1\": \"target\"} here)"]


def test_validate_command_names_the_format(phantom_set, fresh, capsys):
    assert main(["validate", str(phantom_set)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ['format: nnU-Net v2 raw (dataset.json with channel_names {"0": "US"}, file_ending .nii.gz)',
                   f"dataset OK: 3 labeled, 2 unlabeled, 1 test case(s) (nnunet-v2: {phantom_set})"]
    rewrite(fresh, numTraining=4)
    assert main(["validate", str(fresh / "dataset.json")]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("format: nnU-Net v2 raw")
    assert captured.err.splitlines() == [
        f"{fresh / 'dataset.json'}: 'numTraining' is 4 but imagesTr/ holds 3 training case(s): set numTraining to 3, or add the "
        "missing cases (image and label)",
        f"dataset NOT usable: 1 problem(s); 3 labeled, 2 unlabeled, 1 test case(s) (nnunet-v2: {fresh})"]


@pytest.mark.realdata
def test_real_promise12_converted_to_nnunet_v2_validates(tmp_path, capsys):
    """Four real PROMISE12 prostate MR volumes written as an nnU-Net v2 raw data set (three for
    training, one test case without labels) and one more as an unlabeled image."""
    source = shared_dataset("promise12")
    root = tmp_path / "Dataset502_Promise12"
    spacing = (0.625, 0.625, 3.6)  # the source kept no geometry: a plausible prostate MR spacing (x, y, z)
    truth = {}
    for i, (n, folder) in enumerate([("00", "Tr"), ("07", "Tr"), ("21", "Tr"), ("33", "Ts"), ("45", "Unlabeled")]):
        image = load_npy_gz(source / f"image_train{n}.npy.gz").astype(np.float32)
        label = load_npy_gz(source / f"label_train{n}.npy.gz").astype(np.uint8)
        case = f"prostate_{n}"
        write_volume(Volume(image, spacing), root / f"images{folder}" / f"{case}_0000.nii.gz")
        if folder == "Tr":
            write_volume(Volume(label, spacing), root / "labelsTr" / f"{case}.nii.gz")
            truth[case] = label
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1},
                                                   "numTraining": 3, "file_ending": ".nii.gz"}))
    spec = load_dataset(root)
    assert [c.id for c in spec.labeled] == ["prostate_00", "prostate_07", "prostate_21"]
    assert [c.id for c in spec.unlabeled] == ["prostate_45"] and spec.test == []
    assert spec.labels == {0: "background", 1: "prostate"} and spec.channel_names == {"0": "T2"}
    problems = validate_dataset(spec)
    assert errors(problems) == [] and len(warnings(problems)) == 1 and "no labelsTs/" in warnings(problems)[0]
    for case in spec.labeled:
        label = read_volume(case.label, "label")
        np.testing.assert_array_equal(label.array, truth[case.id])
        assert label.shape == (32, 128, 128) and 0 < int(label.array.sum()) < label.array.size
    assert main(["validate", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'format: nnU-Net v2 raw (dataset.json with channel_names {"0": "T2"}, file_ending .nii.gz)'
    assert out[-1] == f"dataset OK: 3 labeled, 1 unlabeled case(s) (nnunet-v2: {root})"
