"""Preprocessing then inverting gives back the input's voxels and geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from conftest import blob_label, load_npy_gz, oblique, shared_dataset
from semisam.phantom import make_phantom
from semisam.preprocess import PreprocessConfig, PreprocessRecord, apply_to_label, envelope_log, invert, normalise, preprocess
from semisam.volume import Volume, read_volume

GEOM_TOL = 1e-6

CASES = [
    # shape (z, y, x), spacing (x, y, z) >= target, direction angles, origin
    ((40, 50, 60), (0.7, 0.55, 1.3), (17, -23, 31), (-10.5, 20.25, 3.125)),
    ((24, 90, 70), (0.5, 0.5, 2.0), (0, 0, 90), (100.0, -50.0, 7.0)),
    ((30, 30, 30), (0.9, 0.6, 0.75), (-40, 12, 5), (0.0, 0.0, 0.0)),
    ((20, 200, 180), (0.51, 0.8, 1.1), (3, 3, -60), (-1.0, 2.0, -3.0)),  # larger than the crop
]


def _volumes(shape, spacing, angles, origin, two=False):
    rng = np.random.default_rng(1)
    image = Volume(rng.random(shape).astype(np.float32) * 200 + 10, spacing, origin, oblique(angles))
    # keep the label inside the 64 mm crop around the centre
    label = blob_label(shape, spacing=spacing, radius=min(20.0, 0.3 * min(n * s for n, s in zip(shape, spacing[::-1]))), two=two)
    return image, image.with_array(label)


def assert_same_geometry(a: Volume, b: Volume, tol=GEOM_TOL):
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol, rtol=0)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol, rtol=0)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol, rtol=0)


@pytest.mark.parametrize("shape,spacing,angles,origin", CASES)
def test_label_round_trip_is_exact(shape, spacing, angles, origin):
    image, label = _volumes(shape, spacing, angles, origin, two=True)
    pre, record = preprocess(image)
    assert pre.shape == (128, 128, 128)
    np.testing.assert_allclose(pre.spacing, (0.5, 0.5, 0.5))
    np.testing.assert_allclose(pre.direction, image.direction)  # the input's axes are kept
    moved = apply_to_label(record, label)
    assert set(np.unique(moved.array)) == {0, 1, 2}
    back = invert(record, moved.array)
    assert_same_geometry(back, image)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, label.array)


def test_downsampling_round_trip_keeps_geometry_and_shape():
    # Finer than 0.5 mm: detail is lost on the way, but the grid comes back exactly.
    image, label = _volumes((60, 80, 80), (0.3, 0.25, 0.4), (10, 20, 30), (5.0, 6.0, 7.0))
    pre, record = preprocess(image)
    back = invert(record, apply_to_label(record, label).array)
    assert_same_geometry(back, image)
    a, b = back.array > 0, label.array > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95


def test_preprocessed_voxels_sit_where_the_input_voxels_are():
    # A smooth image: the value at any physical point must agree before and after.
    shape, spacing = (30, 40, 50), (0.8, 0.6, 1.2)
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    smooth = (np.sin(xx * spacing[0] / 7.0) + np.cos(yy * spacing[1] / 9.0) + zz * spacing[2] / 40.0).astype(np.float32)
    image = Volume(smooth, spacing, (1.0, 2.0, 3.0), oblique((25, -10, 40)))
    pre, record = preprocess(image, PreprocessConfig(percentiles=(0.0, 100.0)))
    lo, hi = record.intensity_range
    rng = np.random.default_rng(0)
    for _ in range(50):
        k, j, i = (rng.integers(3, n - 3) for n in shape)
        p = image.index_to_physical([i, j, k])
        pi, pj, pk = np.round(pre.physical_to_index(p)).astype(int)
        q = pre.index_to_physical([pi, pj, pk])
        ii, jj, kk = image.physical_to_index(q)
        # trilinear value of the original at q, normalised
        value = map_coordinates(smooth.astype(np.float64), [[kk], [jj], [ii]], order=1)[0]
        assert abs(pre.array[pk, pj, pi] - (value - lo) / (hi - lo)) < 1e-4


def test_fov_crop_centres_the_ultrasound_sector():
    case = make_phantom(5, (40, 160, 200))  # a field of view wider than the 64 mm crop
    pre, record = preprocess(case.image)
    nz = np.argwhere(case.image.array > 0)
    centre_in = case.image.index_to_physical(((nz.min(0) + nz.max(0)) / 2.0)[::-1])
    centre_out = pre.index_to_physical((np.array(pre.shape[::-1]) - 1) / 2.0)
    assert np.linalg.norm(centre_in - centre_out) <= np.sqrt(3) * 0.5 / 2 + 1e-9
    centred = preprocess(case.image, PreprocessConfig(crop="center"))[1]
    assert centred.crop_offset != record.crop_offset


def test_probability_maps_invert_linearly_and_channels_work():
    image, label = _volumes((20, 30, 40), (0.9, 0.8, 1.5), (0, 30, 0), (0.0, 0.0, 0.0))
    pre, record = preprocess(image)
    prob = np.full(pre.shape, 0.25, np.float32)
    back = invert(record, prob)
    assert back.array.dtype == np.float32
    # interior voxels (away from the crop border) keep the value exactly
    np.testing.assert_allclose(back.array[2:-2, 2:-2, 2:-2], 0.25, atol=1e-6)
    stack = np.stack([prob, 1 - prob])
    chans = invert(record, stack)
    assert len(chans) == 2 and all(c.shape == image.shape for c in chans)
    np.testing.assert_allclose(chans[1].array[2:-2, 2:-2, 2:-2], 0.75, atol=1e-6)
    with pytest.raises(ValueError, match="does not match the preprocessed grid"):
        invert(record, prob[:-1])


def test_record_survives_json():
    image, label = _volumes(*CASES[0])
    pre, record = preprocess(image)
    again = PreprocessRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    moved = apply_to_label(record, label).array
    np.testing.assert_array_equal(invert(again, moved).array, label.array)
    assert again.config == record.config


def test_one_slice_images_stay_one_slice():
    rng = np.random.default_rng(0)
    image = Volume(rng.random((1, 100, 120)).astype(np.float32), (0.6, 0.6, 1.0))
    label = image.with_array(blob_label((1, 100, 120), centre=[0, 50, 60], radius=20.0, spacing=(0.6, 0.6, 1.0)))
    pre, record = preprocess(image)
    assert pre.shape == (1, 128, 128)
    back = invert(record, apply_to_label(record, label).array)
    np.testing.assert_array_equal(back.array, label.array)


def test_normalise_uses_robust_percentiles():
    arr = np.linspace(0, 100, 10001, dtype=np.float32)
    arr[0] = -1e6  # one outlier must not squash the range
    out, (lo, hi) = normalise(arr, (1.0, 99.0))
    assert out.min() == 0.0 and out.max() == 1.0
    assert abs(lo - 1.0) < 0.02 and abs(hi - 99.0) < 0.02
    assert abs(out[5000] - (50 - lo) / (hi - lo)) < 1e-6


def test_envelope_of_a_pulse():
    # A Gaussian-windowed carrier along the beam axis: the envelope peaks where the window does.
    t = np.arange(256)
    pulse = np.exp(-0.5 * ((t - 100) / 12.0) ** 2) * np.cos(2 * np.pi * 0.2 * t)
    rf = np.broadcast_to(pulse[None, :, None], (2, 256, 3))
    env = envelope_log(rf, beam_axis=1, dynamic_range_db=60.0)
    assert env.shape == rf.shape and env.max() <= 1.0 and env.min() >= 0.0
    assert int(np.argmax(env[0, :, 0])) == 100
    # the envelope is smooth: no carrier ripple left at -6 dB of the peak
    db = env[0, 80:121, 0] * 60 - 60
    expected = 20 * np.log10(np.exp(-0.5 * ((t[80:121] - 100) / 12.0) ** 2))
    np.testing.assert_allclose(db, expected, atol=0.3)


def test_rf_phantom_envelope_matches_its_bmode():
    case = make_phantom(11, (24, 64, 48), rf=True)
    pre_rf, _ = preprocess(case.rf, PreprocessConfig(envelope=True, beam_axis=1, dynamic_range_db=40.0))
    pre_b, _ = preprocess(case.image)
    fov = pre_b.array > 0
    r = np.corrcoef(pre_rf.array[fov], pre_b.array[fov])[0, 1]
    assert r > 0.85, r


@pytest.mark.realdata
def test_real_prostate_mr_round_trip():
    root = shared_dataset("promise12")
    for n in ("00", "07", "21"):
        image = load_npy_gz(root / f"image_train{n}.npy.gz").astype(np.float32)
        label = load_npy_gz(root / f"label_train{n}.npy.gz").astype(np.uint8)
        # No geometry survives in this source: give it a plausible oblique one (>= 0.5 mm).
        vol = Volume(image, (0.6, 0.6, 2.2), (-40.0, -35.0, 12.0), oblique((8, -5, 20)))
        pre, record = preprocess(vol)
        back = invert(record, apply_to_label(record, vol.with_array(label)).array)
        assert_same_geometry(back, vol)
        np.testing.assert_array_equal(back.array, label)


@pytest.mark.realdata
def test_real_fetal_head_ultrasound_as_one_slice_volumes():
    root = shared_dataset("hc18-dev")
    rows = [ln.split(",") for ln in (root / "pixel_size_and_HC.csv").read_text().splitlines()[1:4]]
    for name, pixel_mm, *_ in rows:
        image = read_volume(root / name)
        label = read_volume(root / name.replace(".png", "_Annotation.png"), "label")
        assert image.shape[0] == 1 and label.shape == image.shape
        mm = float(pixel_mm)
        image = Volume(image.array, (mm, mm, 1.0))
        mask = (label.array > 0).astype(np.uint8)
        pre, record = preprocess(image)
        assert pre.shape == (1, 128, 128)
        back = invert(record, apply_to_label(record, image.with_array(mask)).array)
        assert back.shape == image.shape
        inter = (back.array & mask).sum()
        assert 2 * inter / (back.array.sum() + mask.sum()) > 0.95
