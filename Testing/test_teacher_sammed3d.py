"""The SAM-Med3D teacher: medim's network, crops around prompts, prompt handling, safe checkpoints.

All tests but the opt-in full-size one use a tiny randomly initialised network of the same
architecture (32^3 crop, 8^3 patches). Set SEMISAM_SLOW_TESTS=1 to also run the full-size
network (128^3 crop) once on random weights and print its time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pytest
import torch

from semisam.models.checkpoints import CheckpointError
from semisam.models.prompts import Prompts, Teacher
from semisam.models.teacher_sammed3d import SAMMed3DConfig, SAMMed3DTeacher, build_network

SHAPE = (48, 40, 56)
CENTRE = (24.0, 20.0, 28.0)  # with the 32^3 test crop: crop [8:40, 4:36, 12:44]


def point(z, y, x, label=1) -> Prompts:
    return Prompts(points=[[z, y, x]], point_labels=[label])


@pytest.fixture(scope="module")
def teacher() -> SAMMed3DTeacher:
    return SAMMed3DTeacher.small_random(seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE).astype(np.float32)


def test_is_a_teacher_with_a_name(teacher):
    assert isinstance(teacher, Teacher)
    assert teacher.name == "sam-med3d"
    assert teacher.crop_size == 32 and teacher.low_res_shape == (16, 16, 16)


def test_output_shape_dtype_range_and_zeros_outside_the_crop(teacher, image):
    out = teacher.predict(teacher.prepare(image), point(*CENTRE))
    assert out.shape == SHAPE and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    inside = np.zeros(SHAPE, bool)
    inside[8:40, 4:36, 12:44] = True
    assert np.all(out[inside] > 0)  # a sigmoid is never exactly 0
    assert np.all(out[~inside] == 0)


def test_volume_smaller_than_the_crop_is_padded(teacher):
    small = np.random.default_rng(1).random((10, 20, 30)).astype(np.float32)
    out = teacher.predict(teacher.prepare(small), point(5, 10, 15))
    assert out.shape == small.shape and np.all(out > 0) and out.max() <= 1


def test_same_seed_same_output_other_seed_other_output(image):
    a = SAMMed3DTeacher.small_random(seed=3)
    b = SAMMed3DTeacher.small_random(seed=3)
    c = SAMMed3DTeacher.small_random(seed=4)
    prompts = point(*CENTRE)
    out_a = a.predict(a.prepare(image), prompts)
    np.testing.assert_array_equal(out_a, b.predict(b.prepare(image), prompts))
    assert np.abs(out_a - c.predict(c.prepare(image), prompts)).max() > 1e-4


def test_every_prompt_type_runs_and_changes_the_output(teacher, image):
    state = teacher.prepare(image)
    base = teacher.predict(state, point(*CENTRE))
    mask = np.zeros(SHAPE, np.float32)
    mask[18:30, 14:26, 22:34] = 1
    variants = {
        "positive+negative points": Prompts(points=[CENTRE, (30, 26, 36)], point_labels=[1, 0]),
        "points+mask": Prompts(points=[CENTRE], point_labels=[1], mask=mask),
        "mask alone": Prompts(mask=mask),
        "3D box": Prompts(box3d=(20, 16, 24, 30, 26, 34)),
        "2D boxes": Prompts(boxes2d=[(22, 14, 20, 26, 30), (26, 14, 22, 26, 34)]),
        "negative point": point(24, 20, 28, label=0),
    }
    for what, prompts in variants.items():
        out = teacher.predict(state, prompts)
        assert out.shape == SHAPE and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1, what
        assert np.abs(out - base).max() > 1e-5, f"{what} gave the same output as one positive point"


def test_boxes_become_positive_points_at_their_centres(teacher, image):
    state = teacher.prepare(image)
    np.testing.assert_array_equal(
        teacher.predict(state, Prompts(box3d=(20, 16, 24, 30, 26, 34))), teacher.predict(state, point(25, 21, 29)))
    np.testing.assert_array_equal(
        teacher.predict(state, Prompts(boxes2d=[(22, 14, 20, 26, 30), (26, 14, 22, 26, 34)])),
        teacher.predict(state, Prompts(points=[(22, 20, 25), (26, 20, 28)], point_labels=[1, 1])))


@pytest.mark.parametrize("where, start", [
    ((20, 18, 15), (4, 2, 0)),  # near x = 0: the crop is shifted back inside the volume
    ((20, 18, 100), (4, 2, 84)),  # far along x: the crop moves with it
    ((5, 30, 60), (0, 4, 44)),
])
def test_the_crop_follows_the_prompt_along_z_y_x(teacher, where, start):
    image = np.random.default_rng(2).random((40, 36, 120)).astype(np.float32)
    out = teacher.predict(teacher.prepare(image), point(*where))
    nz = np.argwhere(out > 0)
    assert tuple(nz.min(axis=0)) == start
    assert tuple(nz.max(axis=0)) == tuple(s + 31 for s in start)
    assert len(nz) == 32**3


def test_mask_prompt_is_cropped_with_the_image(teacher):
    image = np.random.default_rng(2).random((40, 36, 120)).astype(np.float32)
    state = teacher.prepare(image)
    near, far = np.zeros(image.shape, np.float32), np.zeros(image.shape, np.float32)
    near[10:30, 8:28, 10:20] = 1  # inside the crop [4:36, 2:34, 0:32] of the point below
    far[10:30, 8:28, 90:100] = 1  # outside it: the crop of the mask prompt is empty
    with_mask = lambda m: teacher.predict(state, Prompts(points=[(20, 18, 15)], point_labels=[1], mask=m))
    np.testing.assert_array_equal(with_mask(far), with_mask(np.zeros_like(far)))
    assert np.abs(with_mask(near) - with_mask(far)).max() > 1e-5


def test_crop_is_z_score_normalised(teacher, image):
    """SAM-Med3D's z-score over non-zero voxels makes a positive intensity scale irrelevant."""
    prompts = point(*CENTRE)
    out = teacher.predict(teacher.prepare(image), prompts)
    np.testing.assert_allclose(teacher.predict(teacher.prepare(image * 7.0), prompts), out, atol=1e-5)


def test_embedding_of_the_last_crop_is_cached(teacher, image):
    state = teacher.prepare(image)
    first = teacher.predict(state, point(*CENTRE))
    teacher.predict(state, Prompts(points=[CENTRE, (30, 26, 36)], point_labels=[1, 0]))
    assert state.encodes == 1
    teacher.predict(state, point(30, 20, 28))  # another crop
    assert state.encodes == 2
    again = teacher.predict(state, point(*CENTRE))
    assert state.encodes == 3
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("prompts, message", [
    (Prompts(), "needs a prompt"),
    (Prompts(mask=np.zeros(SHAPE, np.float32)), "needs a prompt"),
    (point(60, 1, 1), "outside the volume"),
    (Prompts(mask=np.ones((4, 4, 4), np.float32)), "differs from the volume"),
])
def test_bad_prompts_are_refused(teacher, image, prompts, message):
    with pytest.raises(ValueError, match=message):
        teacher.predict(teacher.prepare(image), prompts)


def test_bad_images_are_refused(teacher):
    with pytest.raises(ValueError, match="volume"):
        teacher.prepare(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        teacher.prepare(np.full((4, 4, 4), np.nan, np.float32))


def test_no_checkpoint_and_no_config_is_refused():
    with pytest.raises(CheckpointError, match="needs a checkpoint file"):
        SAMMed3DTeacher()
    with pytest.raises(CheckpointError, match="not found"):
        SAMMed3DTeacher("/nonexistent/sam_med3d_turbo.pth")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, image):
    source = SAMMed3DTeacher.small_random(seed=7)
    # Laid out like the released files: the weights under model_state_dict, plus the arguments.
    path = tmp_path / "small.pth"
    torch.save({"model_state_dict": source.model.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, path)
    loaded = SAMMed3DTeacher(path, config=SAMMed3DConfig.small(), seed=123)
    prompts = Prompts(points=[CENTRE, (30, 26, 36)], point_labels=[1, 0])
    expected = source.predict(source.prepare(image), prompts)
    np.testing.assert_array_equal(expected, loaded.predict(loaded.prepare(image), prompts))
    fresh = SAMMed3DTeacher.small_random(seed=123)
    assert np.abs(expected - fresh.predict(fresh.prepare(image), prompts)).max() > 1e-4


def _saved(tmp_path, edit) -> str:
    state = SAMMed3DTeacher.small_random().model.state_dict()
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return str(path)


def test_checkpoint_with_a_missing_key_is_refused(tmp_path):
    path = _saved(tmp_path, lambda s: s.pop("mask_decoder.iou_token.weight"))
    missing = r"does not fit model 'sam-med3d': 1 missing \(e.g. mask_decoder.iou_token.weight\)"
    with pytest.raises(CheckpointError, match=missing):
        SAMMed3DTeacher(path, config=SAMMed3DConfig.small())


def test_checkpoint_with_a_wrong_shape_or_extra_key_is_refused(tmp_path):
    path = _saved(tmp_path, lambda s: s.update({"image_encoder.pos_embed": torch.zeros(1, 8, 8, 8, 768)}))
    shapes = r"1 with other shapes \(e.g. image_encoder.pos_embed: file \(1, 8, 8, 8, 768\), model \(1, 4, 4, 4, 48\)\)"
    with pytest.raises(CheckpointError, match=shapes):
        SAMMed3DTeacher(path, config=SAMMed3DConfig.small())
    path = _saved(tmp_path, lambda s: s.update({"prompt_encoder.point_embeddings.2.weight": torch.zeros(1, 48)}))
    with pytest.raises(CheckpointError, match="1 unexpected"):
        SAMMed3DTeacher(path, config=SAMMed3DConfig.small())


def test_small_checkpoint_does_not_fit_the_full_network(tmp_path):
    path = _saved(tmp_path, lambda s: None)
    with pytest.raises(CheckpointError, match="does not fit model 'sam-med3d'"):
        SAMMed3DTeacher(path)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": SAMMed3DTeacher.small_random().model.state_dict(), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused: the file holds Python objects other than tensors, which could run code"):
        SAMMed3DTeacher(path, config=SAMMed3DConfig.small())
    assert not marker.exists()


def test_full_size_architecture_matches_the_released_checkpoints():
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        state = build_network(SAMMed3DConfig()).state_dict()
    assert len(state) == 324 and sum(v.numel() for v in state.values()) == 100_509_616
    shapes = {
        "image_encoder.patch_embed.proj.weight": (768, 1, 16, 16, 16),
        "image_encoder.pos_embed": (1, 8, 8, 8, 768),
        "image_encoder.blocks.0.attn.rel_pos_d": (27, 64),  # windowed block (window 14)
        "image_encoder.blocks.2.attn.rel_pos_d": (15, 64),  # global block on the 8^3 grid
        "image_encoder.neck.2.weight": (384, 384, 3, 3, 3),
        "prompt_encoder.point_embeddings.1.weight": (1, 384),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2, 2),
        "mask_decoder.mask_tokens.weight": (4, 384),
        "mask_decoder.output_upscaling.3.weight": (96, 48, 2, 2, 2),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("pixel_mean", "pixel_std")) for k in state)


@pytest.mark.skipif(os.environ.get("SEMISAM_SLOW_TESTS") != "1", reason="set SEMISAM_SLOW_TESTS=1 to run the full-size network")
def test_full_size_forward_on_random_weights():
    teacher = SAMMed3DTeacher(config=SAMMed3DConfig())
    image = np.random.default_rng(0).random((140, 130, 120)).astype(np.float32)
    state = teacher.prepare(image)
    start = time.perf_counter()
    out = teacher.predict(state, point(70, 65, 60))
    print(f"\nfull-size SAM-Med3D, one 128^3 crop (encode + decode): {time.perf_counter() - start:.1f} s")
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert np.count_nonzero(out) == 128 * 128 * 120  # x (120) is shorter than the crop: padded
