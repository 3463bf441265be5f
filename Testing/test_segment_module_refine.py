"""The SemiSAM effect's model side (SemiSAMSegmentLib.refine.Refiner) on real models: the shipped
LiteMedSAM for clicks and slice-by-slice propagation, and MedSAM2's real architecture (small,
random weights) for the 3D propagation path along any axis."""

from __future__ import annotations

import numpy as np
import pytest

import slicer_app  # noqa: F401  (puts SemiSAMSegment/ on sys.path)
from SemiSAMSegmentLib.refine import Refiner, prefetch_order
from SemiSAMSegmentLib.worker import ModelWorker
from semisam.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11, (24, 48, 48))


@pytest.fixture(scope="module")
def refiner():
    return Refiner("cpu", medsam2=None)


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_a_box_on_a_target_slice_gives_its_mask_and_reuses_the_embedding(refiner, phantom):
    label = phantom.label.array > 0
    z = int(np.argmax(label.sum(axis=(1, 2))))
    refiner.set_volume(phantom.image.array, phantom.image.spacing, key="p")
    rows, cols = np.nonzero(label[z])
    box = (int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))
    mask = refiner.predict(0, z, [], box=box)
    assert mask.shape == label[z].shape and _dice(mask, label[z]) > 0.6
    encoded = refiner.session.encoded_slices
    refiner.predict(0, z, [(int(rows.mean()), int(cols.mean()), True)], box=box)
    assert refiner.session.encoded_slices == encoded  # the slice was embedded once
    refiner.set_volume(phantom.image.array, phantom.image.spacing, key="p")  # same key: cache kept
    assert refiner.session.is_cached(0, z)


def test_litemedsam_propagation_from_the_true_slice(refiner, phantom):
    label = phantom.label.array > 0
    z = int(np.argmax(label.sum(axis=(1, 2))))
    refiner.set_volume(phantom.image.array, phantom.image.spacing, key="p")
    out = refiner.propagate(0, z, label[z], slices=3)
    assert out.shape == label.shape and out[z].sum() > 0
    touched = np.nonzero(out.any(axis=(1, 2)))[0]
    assert touched.min() >= z - 3 and touched.max() <= z + 3
    with pytest.raises(ValueError, match="nothing to propagate"):
        refiner.propagate(0, z, np.zeros_like(label[z]))


def test_medsam2_path_propagates_along_the_chosen_axis(phantom):
    from semisam.models.teacher_medsam2 import MedSAM2Teacher

    small = MedSAM2Teacher(small=True, random_init=True, image_size=64)

    class NoSession:  # MedSAM2 propagation needs no LiteMedSAM
        def set_image(self, array, spacing):
            self.shape = array.shape

    r = Refiner("cpu", session=NoSession(), medsam2=small)
    assert r.propagator == "medsam2"
    r.set_volume(phantom.image.array, phantom.image.spacing)
    key = np.zeros((24, 48), bool)
    key[8:14, 20:30] = True
    seen = []
    out = r.propagate(2, 30, key, slices=4, progress=lambda d, t: seen.append((d, t)))
    assert out.shape == phantom.image.shape
    np.testing.assert_array_equal(out[:, :, 30] | key, out[:, :, 30])  # the key slice keeps the user's mask
    assert not out[:, :, :26].any() and not out[:, :, 35:].any()  # only 4 slices each way
    assert seen[-1] == (9, 9)


def test_refiner_lives_on_the_worker_thread(phantom):
    worker = ModelWorker(lambda: Refiner("cpu", medsam2=None))
    try:
        with pytest.raises(ValueError, match="no source volume"):
            worker.submit(lambda r, c: r.predict(0, 0, [(1, 1, True)])).result(timeout=120)
        label = phantom.label.array > 0
        z = int(np.argmax(label.sum(axis=(1, 2))))
        r0, c0 = np.argwhere(label[z]).mean(axis=0).astype(int)
        job = lambda r, c: (r.set_volume(phantom.image.array, phantom.image.spacing, key=1), r.predict(0, z, [(int(r0), int(c0), True)]))[1]
        mask = worker.submit(job, key="predict").result(timeout=120)
        assert mask[r0, c0]  # a + click's pixel is foreground
    finally:
        worker.shutdown()


def test_prefetch_order_is_nearest_first_within_the_volume():
    assert prefetch_order(5, 20) == [5, 6, 4, 7, 3]
    assert prefetch_order(0, 3) == [0, 1, 2]
    assert prefetch_order(2, 3, radius=1) == [2, 1]


def test_prefetched_neighbours_make_a_cached_click(refiner, phantom):
    label = phantom.label.array > 0
    z = int(np.argmax(label.sum(axis=(1, 2))))
    refiner.set_volume(phantom.image.array * 1.0001, phantom.image.spacing, key="prefetch")  # a new volume: nothing cached
    worker = ModelWorker(lambda: refiner)
    try:
        assert worker.submit_idle(lambda r, c: r.prefetch(0, z, cancel=c.is_set)).result(timeout=120) == 5
        assert all(refiner.session.is_cached(0, i) for i in (z - 2, z - 1, z, z + 1, z + 2))
        rows, cols = np.nonzero(label[z + 1])
        worker.submit(lambda r, c: r.predict(0, z + 1, [(int(rows.mean()), int(cols.mean()), True)])).result(timeout=60)
        assert refiner.session.last_info["encoded"] is False  # the click on the neighbour found its embedding
    finally:
        worker.shutdown()


def test_a_click_interrupts_a_running_prefetch(refiner, phantom, monkeypatch):
    import threading

    from semisam.errors import Cancelled

    refiner.set_volume(phantom.image.array * 0.9999, phantom.image.spacing, key="interrupt")
    runner = getattr(refiner.session.encoder.module, "runner", None)
    if runner is None or refiner.session.encoder.module.backend != "openvino":
        pytest.skip("the encoder does not run on OpenVINO here (only it can stop a running inference)")
    started, outcomes = threading.Event(), []
    original = runner.run

    def run(x, cancel=None):
        started.set()
        try:
            out = original(x, cancel)
        except Cancelled:
            outcomes.append("cancelled")
            raise
        outcomes.append("finished")
        return out

    monkeypatch.setattr(runner, "run", run)
    label = phantom.label.array > 0
    z = int(np.argmax(label.sum(axis=(1, 2))))
    rows, cols = np.nonzero(label[z])
    worker = ModelWorker(lambda: refiner)
    try:
        prefetch = worker.submit_idle(lambda r, c: r.prefetch(0, 3, cancel=c.is_set))
        assert started.wait(60)
        click = worker.submit(lambda r, c: r.predict(0, z, [(int(rows.mean()), int(cols.mean()), True)]))
        assert prefetch.result(timeout=60) == 0  # stopped inside its first slice
        assert outcomes[0] == "cancelled"  # the running inference was abandoned, not waited for
        mask = click.result(timeout=60)
        assert mask.shape == label[z].shape and mask[int(rows.mean()), int(cols.mean())]
        assert outcomes[1:] == ["finished"] and not refiner.session.is_cached(0, 3)
    finally:
        worker.shutdown()
