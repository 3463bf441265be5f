"""Phantoms are deterministic, ultrasound-like and labelled exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from semisam.data import load_dataset, validate_dataset
from semisam.phantom import make_phantom, write_cohort
from semisam.volume import read_volume

SHAPE = (48, 56, 56)


@pytest.fixture(scope="module")
def cases():
    return [make_phantom(seed, SHAPE, num_labels=1 + seed % 3) for seed in range(6)]


def test_same_seed_same_phantom():
    a, b = make_phantom(42, (24, 32, 32), rf=True), make_phantom(42, (24, 32, 32), rf=True)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    np.testing.assert_array_equal(a.rf.array, b.rf.array)
    assert a.image.geometry() == b.image.geometry()
    c = make_phantom(43, (24, 32, 32))
    assert not np.array_equal(a.image.array, c.image.array)
    assert a.image.spacing != c.image.spacing


def test_geometry_is_anisotropic_and_oblique(cases):
    for case in cases:
        sx, sy, sz = case.image.spacing
        assert sy < sx < sz  # depth finest, elevation coarsest
        d = case.image.direction
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(d) > 0
        assert np.degrees(np.arccos(np.clip((np.trace(d) - 1) / 2, -1, 1))) > 4  # oblique
        assert case.label.same_grid(case.image)


def test_labels_are_whole_targets_inside_the_sector(cases):
    for case in cases:
        lab, img = case.label.array, case.image.array
        k = int(lab.max())
        assert set(np.unique(lab)) == set(range(k + 1))
        for value in range(1, k + 1):
            comp, n = ndimage.label(lab == value)
            assert n == 1  # one connected organ per label
            assert (lab == value).sum() > 100
        assert np.all(img[lab > 0] > 0)  # inside the field of view
        border = np.zeros_like(lab, dtype=bool)
        border[[0, -1]], border[:, [0, -1]], border[:, :, [0, -1]] = True, True, True
        assert not np.any(lab[border])  # never cut by the volume's edge


def test_sector_field_of_view(cases):
    for case in cases:
        img = case.image.array
        fov = img > 0
        assert 0.15 < fov.mean() < 0.9
        # the fan widens with depth: more lit voxels in the deepest rows than near the skin
        rows = fov.sum(axis=(0, 2))
        first = int(np.argmax(rows > 0))
        assert rows[-1] > 1.5 * rows[first + 1]
        assert img.min() == 0.0 and img.max() <= 255.0 and img[fov].min() >= 1.0


def test_speckle_is_fully_developed(cases):
    # Log-compressed Rayleigh speckle has a standard deviation of 5.57 dB; tissue texture adds
    # a little. The grey levels span 40 dB over 255.
    stds = []
    for case in cases:
        img, lab = case.image.array, case.label.array
        tissue = (img > 0) & ~ndimage.binary_dilation(lab > 0, iterations=3)
        db = img[tissue] / 255.0 * 40.0
        db = db[(db > 0.5) & (db < 39.5)]  # leave out clipped voxels
        stds.append(db.std())
    assert 4.5 < float(np.median(stds)) < 8.5, stds


def test_targets_stand_out_from_their_surroundings(cases):
    # Hypo- or hyperechoic organs; a shadow or a bright layer nearby may weaken one of them.
    contrasts = []
    for case in cases:
        img, lab = case.image.array, case.label.array
        for value in range(1, int(lab.max()) + 1):
            inside = ndimage.binary_erosion(lab == value, iterations=1)
            ring = ndimage.binary_dilation(lab == value, iterations=5) & ~ndimage.binary_dilation(lab == value, iterations=2) & (img > 0) & (lab == 0)
            contrasts.append(abs(img[inside].mean() - img[ring].mean()) / 255 * 40)
    assert min(contrasts) > 1.5 and np.median(contrasts) > 5.0, contrasts


def test_shadows_darken_what_lies_behind_reflectors(cases):
    # Follow the ray from the probe's apex through each reflector: 2-6 mm behind it the image
    # must be darker than the rest of the sector at the same distance from the apex.
    contrasts = []
    for case in cases:
        img = case.image.array
        spacing = np.array(case.image.spacing)
        apex = np.array(case.image.meta["apex_mm"])
        zz, yy, xx = np.meshgrid(*(np.arange(n) for n in img.shape), indexing="ij")
        r = np.sqrt((xx * spacing[0] - apex[0]) ** 2 + (yy * spacing[1] - apex[1]) ** 2 + (zz * spacing[2] - apex[2]) ** 2)
        for refl in case.image.meta["reflectors"]:
            c = np.array(refl["centre_mm"])
            ray = (c - apex) / np.linalg.norm(c - apex)
            dist = np.linalg.norm(c - apex)
            pts = [apex + ray * (dist + refl["radius_mm"] + t) for t in np.linspace(2.0, 6.0, 9)]
            idx = [tuple(np.round(p / spacing).astype(int)[::-1]) for p in pts]
            if not all(0 <= i < n for p in idx for i, n in zip(p, img.shape)):
                continue  # the shadow leaves the volume
            behind = np.array([img[p] for p in idx])
            band = (r > dist + refl["radius_mm"] + 2.0) & (r < dist + refl["radius_mm"] + 6.0) & (img > 0)
            contrasts.append((img[band].mean() - behind.mean()) / 255 * 40)
    assert len(contrasts) >= 4
    assert np.median(contrasts) > 6.0, contrasts  # dB darker than the same depth elsewhere


def test_rf_output_carries_the_same_echoes():
    case = make_phantom(7, (16, 64, 32), rf=True)
    assert case.rf.same_grid(case.image)
    rf = case.rf.array
    assert rf.min() < 0 < rf.max()  # oscillating, not an envelope
    outside = case.image.array == 0
    assert outside.any() and np.all(rf[outside] == 0)
    assert np.all(case.image.array[case.label.array > 0] > 0)


def test_cohort_layout_and_manifest(tmp_path):
    out = write_cohort(tmp_path / "c", n=5, labeled=2, shape=(16, 24, 24), seed=9, num_labels=2)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert len(list((out / "imagesUnlabeled").iterdir())) == 3
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["labels"] == {"0": "background", "1": "structure_1", "2": "structure_2"}
    assert doc["image_type"] == "bmode" and len(doc["training"]) == 2 and len(doc["unlabeled"]) == 3
    spec = load_dataset(out)
    assert [p for p in validate_dataset(spec) if p.severity == "error"] == []
    # the written cohort is the generator's output, bit for bit
    again = write_cohort(tmp_path / "d", n=5, labeled=2, shape=(16, 24, 24), seed=9, num_labels=2)
    for rel in ("imagesTr/case_001.nii.gz", "labelsTr/case_001.nii.gz", "imagesUnlabeled/case_004.nii.gz"):
        np.testing.assert_array_equal(read_volume(out / rel).array, read_volume(again / rel).array)


def test_rf_cohort_is_marked_as_rf(tmp_path):
    out = write_cohort(tmp_path / "rf", n=2, labeled=1, shape=(12, 32, 16), rf=True)
    spec = load_dataset(out)
    assert spec.image_type == "rf" and spec.preprocess_config().envelope
    assert read_volume(out / "imagesTr" / "case_000.nii.gz").array.min() < 0
