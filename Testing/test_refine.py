"""The teachers refining a student's masks at inference (``postprocess.refine``): the Refiner,
its wiring into segment_volume / Segmenter / `semisam segment`, and the choice made on the
validation cases at the end of training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semisam.inference import Refiner, Segmenter, recorded_refinement, segment_volume, tiled_probabilities, whole_fov
from semisam.models.encoders import EmbeddingCache
from semisam.models.student import SlicingSAM3D, StudentConfig, load_student
from semisam.preprocess import PreprocessConfig, preprocess
from semisam.pseudo_labels import PseudoLabel, grow_mask
from semisam.volume import Volume


class PromptLabeler:
    """A stand-in for Algorithm 2 whose teachers return their prompt (or ``fixed``), recording calls."""

    def __init__(self, fixed: np.ndarray | None = None):
        self.fixed, self.calls = fixed, []

    def __call__(self, image, mask, key, views=None):
        self.calls.append((np.array(image), np.array(mask), key))
        m = (np.asarray(mask) if self.fixed is None else self.fixed).astype(np.float32)
        return PseudoLabel.from_statistics(m, np.zeros_like(m), 0.1, 2, int(np.asarray(mask).sum()))


def test_the_refiner_prompts_each_structure_with_its_grown_mask():
    label = np.zeros((6, 20, 20), np.uint8)
    label[2:4, 5:9, 5:9] = 1
    labeler = PromptLabeler()
    spacing = (2.0, 1.0, 1.0)
    out = Refiner(labeler, 1.0)(np.ones(label.shape, np.float32), label, spacing, num_labels=2)
    assert out.shape == (2, *label.shape)
    assert np.array_equal(out[0] > 0.5, grow_mask(label == 1, 1.0, spacing))
    assert out[0].sum() > (label == 1).sum()  # grown
    assert not out[1].any() and len(labeler.calls) == 1  # structure 2 has no mask: no teacher call


@pytest.fixture(scope="module")
def small_sam():
    from semisam.models.encoders import build_sam_vit, sam_encoder

    return sam_encoder(build_sam_vit(small=True), "sam-small")


def test_segment_volume_replaces_the_students_mask_by_the_teachers(small_sam):
    rng = np.random.default_rng(0)
    array = np.zeros((10, 40, 48), np.float32)
    array[1:9, 3:37, 2:46] = rng.random((8, 34, 44)) * 200 + 10
    image = Volume(array, (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=8, encoder="sam-small"))
    config = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0), target_shape=(8, 32, 32), crop="fov")
    cache = EmbeddingCache()
    pre, _ = preprocess(image, whole_fov(config))
    probs = tiled_probabilities(pre.array, student, small_sam, cache, (32, 32), config.tile_overlap)[0]
    threshold = float(np.quantile(probs[0].numpy(), 0.7))  # an untrained student: cut its probabilities somewhere
    grid_label = (probs[0] > threshold).numpy()
    alone = segment_volume(image, student, small_sam, config, cache, threshold=threshold)
    assert not alone.refined
    assert grid_label.any() and not grid_label.all()  # a mask with an edge: growing it changes it
    box = np.zeros(pre.shape, np.float32)
    box[2:6, 10:20, 12:30] = 1.0  # what the teachers answer
    labeler = PromptLabeler(fixed=box)
    refined = segment_volume(image, student, small_sam, config, cache, threshold=threshold, refiner=Refiner(labeler, 2.0))
    assert refined.refined
    (seen_image, seen_mask, _), = labeler.calls
    assert np.array_equal(seen_image, pre.array)
    assert np.array_equal(seen_mask, grow_mask(grid_label, 2.0, (1.0, 1.0, 1.0)))  # the student's mask, grown, prompts them
    # the output is the teachers' answer on the input grid (the grid is the field of view at 1 mm)
    expected = np.zeros(image.shape, np.uint8)
    expected[1:9, 3:37, 2:46][2:6, 10:20, 12:30] = 1
    assert np.array_equal(refined.label.array, expected)
    assert not np.array_equal(alone.label.array, expected)
    assert np.array_equal(refined.student_label.array, alone.label.array)  # the student's own mask comes with it


def test_from_record_shares_the_students_litemedsam_embeddings_at_its_side():
    from semisam.models.encoders import litemedsam_encoder

    encoder = litemedsam_encoder(input_size=64)
    record = {"use": True, "teacher": "litemedsam", "growth_mm": 1.5, "input_size": 64, "views": 2, "u_th": 0.1,
              "inplane_views": False, "seed": 3}
    refiner = Refiner.from_record(record, encoder, EmbeddingCache())
    teacher = refiner.labeler.teachers[0]
    assert teacher.encoder is encoder and refiner.growth_mm == 1.5
    assert refiner.labeler.n_views == 2 and refiner.labeler.seed == 3 and not refiner.labeler.inplane
    other = Refiner.from_record({**record, "input_size": 128}, encoder, EmbeddingCache())
    assert other.labeler.teachers[0].encoder is not encoder and other.labeler.teachers[0].encoder.input_size == 128
    with pytest.raises(Exception, match="cannot run at inference.*--no-refine"):
        Refiner.from_record({**record, "teacher": "medsam2"}, encoder, EmbeddingCache())


def _student_with(path, refine):
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=4, encoder="litemedsam", encoder_input_size=64))
    config = PreprocessConfig(target_shape=(4, 32, 32), target_spacing=(1.5, 1.5, 3.0))
    post = {"largest_component": True, "threshold": 0.05}  # an untrained student: a mask that is not empty
    if refine is not None:
        post["refine"] = refine
    student.save(path, extra={"preprocess": config.to_dict(), "postprocess": post})
    return path


def test_segment_applies_a_recorded_refinement_unless_told_not_to(tmp_path, capsys):
    from semisam.cli import main
    from semisam.phantom import make_phantom
    from semisam.volume import read_volume, write_volume

    record = {"use": True, "teacher": "litemedsam", "growth_mm": 1.5, "input_size": 64, "views": 2, "u_th": 0.1,
              "inplane_views": False, "seed": 0, "val_dice_student": 0.80, "val_dice_refined": 0.85, "validation_cases": 2}
    ckpt = _student_with(tmp_path / "refined.pt", record)
    assert recorded_refinement(load_student(ckpt)[1]) == record
    assert recorded_refinement(load_student(_student_with(tmp_path / "no.pt", {**record, "use": False}))[1]) is None
    assert Segmenter(ckpt, backend="torch", refine=False).refinement is None

    image = tmp_path / "image.nii.gz"
    write_volume(make_phantom(5, (16, 40, 44)).image, image)
    cache = tmp_path / "cache"
    assert main(["segment", str(image), str(tmp_path / "a.nii.gz"), "--checkpoint", str(ckpt), "--backend", "torch", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "refined: the litemedsam teacher refines the student's mask grown by 1.5 mm (validation Dice 0.800 -> 0.850)" in out
    assert main(["segment", str(image), str(tmp_path / "b.nii.gz"), "--checkpoint", str(ckpt), "--backend", "torch", "--cache-dir", str(cache),
                 "--no-refine"]) == 0
    assert "refined:" not in capsys.readouterr().out
    a, b = read_volume(tmp_path / "a.nii.gz").array, read_volume(tmp_path / "b.nii.gz").array
    assert b.any() and not np.array_equal(a, b)  # the teacher changed the student's mask
