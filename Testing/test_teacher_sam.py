"""SAM / MedSAM ViT-B teacher on a small random configuration of the real architecture."""

from __future__ import annotations

import numpy as np
import pytest

from semisam.models.encoders import EmbeddingCache, build_sam_vit
from semisam.models.prompts import Prompts, Teacher
from semisam.models.teacher_sam import SAMTeacher


@pytest.fixture(scope="module")
def teacher():
    return SAMTeacher(build_sam_vit(small=True, seed=1), name="medsam-vit-b")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((5, 48, 40)).astype(np.float32)


def test_protocol_and_shapes(teacher, image):
    assert isinstance(teacher, Teacher) and teacher.name == "medsam-vit-b"
    out = teacher.predict(teacher.prepare(image), Prompts(boxes2d=[[2, 5, 5, 30, 30]]))
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[[0, 1, 3, 4]].max() == 0.0 and out[2].max() > 0.0


def test_clicks_are_used_as_clicks(teacher, image):
    state = teacher.prepare(image)
    prompts = Prompts(points=[[1, 20, 20]], point_labels=[1])
    assert teacher.slice_boxes(prompts, image.shape) == {}  # no box invented from a click
    out = teacher.predict(state, prompts)
    assert out[1].max() > 0 and out[[0, 2, 3, 4]].max() == 0
    with_negative = teacher.predict(state, Prompts(points=[[1, 20, 20], [1, 5, 5]], point_labels=[1, 0]))
    assert not np.allclose(with_negative[1], out[1])
    with pytest.raises(ValueError, match="needs a box, a mask or a positive click"):
        teacher.predict(state, Prompts(points=[[1, 5, 5]], point_labels=[0]))


def test_mask_prompt_is_dense_input_and_boxes(teacher, image):
    state = teacher.prepare(image)
    mask = np.zeros(image.shape, np.float32)
    mask[3, 10:30, 8:25] = 1
    box_only = teacher.predict(state, Prompts(boxes2d=[[3, 10, 8, 29, 24]]))
    with_mask = teacher.predict(state, Prompts(mask=mask))
    assert with_mask[3].max() > 0 and not np.allclose(with_mask[3], box_only[3])
    assert with_mask[[0, 1, 2, 4]].max() == 0


def test_deterministic_and_cached(image):
    cache = EmbeddingCache()
    a = SAMTeacher(build_sam_vit(small=True, seed=3), cache=cache)
    b = SAMTeacher(build_sam_vit(small=True, seed=3))
    p = Prompts(box3d=(1, 4, 4, 3, 40, 30))
    np.testing.assert_array_equal(a.predict(a.prepare(image), p), b.predict(b.prepare(image), p))
    a.predict(a.prepare(image), p)
    assert cache.encoded_slices == 3  # slices 1..3, once
