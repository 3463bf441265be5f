"""A real field of view end to end: a 288 x 256 x 256 phantom whose targets lie far from the
centre, segmented whole by a student trained on the tiny schedule."""

from __future__ import annotations

import numpy as np
import pytest

from semisam.phantom import central_window, make_phantom, target_offsets


@pytest.mark.slow
def test_a_student_finds_targets_far_from_the_centre_of_a_whole_field_of_view(tmp_path):
    from semisam.demo import demo_config
    from semisam.inference import Segmenter
    from semisam.phantom import write_cohort
    from semisam.training import Trainer

    cohort = tmp_path / "cohort"
    write_cohort(cohort, n=6, labeled=4, seed=3, validation=1)
    cfg = demo_config(cohort, tmp_path / "run", tmp_path / "cache", seed=0, schedule="tiny")
    # The tiny schedule at 1 mm in-plane (its 1.5 mm tiles of 32 px, upsampled 4x for the
    # encoder, learned nothing in 40 epochs: probability 0.08 everywhere), 48 px tiles for the
    # encoder at 64 px, and 100 warm-up epochs (200 steps, ~20 s): a student that finds things.
    cfg.preprocess.target_spacing, cfg.preprocess.target_shape, cfg.encoder.input_size = (1.0, 1.0, 3.0), (8, 48, 48), 64
    cfg.phases.warmup.epochs = 100
    cfg.validation.every = 10
    # the student's own coverage of the field of view; the teachers' refinement (chosen on the
    # one validation case, Testing/test_refine.py) would grow its masks and is off here
    cfg.validation.refine = False
    Trainer(cfg, progress="none").run()

    case = make_phantom(7, (288, 256, 256), num_labels=2, placement="anywhere", far_from_centre=True)
    offsets = target_offsets(case.label)
    assert not offsets[1]["touches_central_window"]  # target 1 lies wholly outside the central half
    seg = Segmenter(tmp_path / "run" / "best.pt", backend="torch", cache=None).segment(case.image, largest_component=False)
    assert seg.tiles > 1  # the field of view is wider than the student's 32 x 32 tile
    pred = seg.label.array > 0
    truth = case.label.array
    for k in (1, 2):
        target = truth == k
        dice = 2.0 * float((pred & target).sum()) / float(pred.sum() + target.sum())
        assert dice > 0.0, f"target {k} ({offsets[k]['offset_mm']:.0f} mm from the centre) was not found"
    # no straight cut at the old crop's edge: the mask reaches beyond the central window
    outside = np.ones(truth.shape, bool)
    outside[central_window(truth.shape)] = False
    assert (pred & outside & (truth == 1)).any()
    sector = case.image.array > 0
    assert pred.sum() < 0.1 * sector.sum()  # found, not painted over the whole sector
