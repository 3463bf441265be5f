"""Semi-SAM+ Algorithm 2: views, prompts, variance filtering, embedding reuse, the store.

Small random-weight models only (a reduced SAM ViT; SAM-Med3D and MedSAM2 in their small test
configurations); controlled fake teachers for the statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from semisam.models.encoders import EmbeddingCache, build_sam_vit, sam_encoder
from semisam.models.prompts import Prompts
from semisam.models.teacher_litemedsam import LiteMedSAMTeacher
from semisam.models.teacher_sam import SAMTeacher
from semisam.pseudo_labels import (
    PseudoLabel,
    PseudoLabeler,
    PseudoLabelStore,
    ViewTransform,
    draw_views,
    slice_points,
    view_group,
    volume_points,
)

SHAPE = (12, 32, 32)


def blob_mask(shape=SHAPE, zs=(4, 7), centre=(14, 11), radii=(6, 8)):
    """An off-centre ellipse on slices zs[0]..zs[1]-1: asymmetric under every flip/transpose."""
    mask = np.zeros(shape, bool)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    disc = ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1
    mask[zs[0] : zs[1]] = disc
    return mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run ~20x faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = 0.3 * rng.random(SHAPE).astype(np.float32)
    img[blob_mask()] += 0.6
    return img


@pytest.fixture(scope="module")
def sam():
    return build_sam_vit(small=True, seed=1)


@pytest.fixture(scope="module")
def encoder(sam):
    return sam_encoder(sam)


# --------------------------------------------------------------------------------------------
# ViewTransform
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,size", [((4, 5, 7), 8), ((5, 6, 6), 16)])
def test_invert_apply_is_identity_on_the_whole_group(shape, size):
    group = view_group(shape)
    assert len(group) == size and group[0].is_identity and len(set(group)) == size
    arr = np.random.default_rng(1).random(shape).astype(np.float32)
    seen = set()
    for v in group:
        out = v.apply(arr)
        assert out.shape == v.view_shape(shape)
        seen.add(out.tobytes())
        np.testing.assert_array_equal(v.invert(out), arr)
        np.testing.assert_array_equal(v.apply(v.invert(arr)) if shape[1] == shape[2] or not v.transpose else arr, arr)
        # gamma never enters invert(apply(.)) of a geometry; the image path differs only by it
        g = ViewTransform(v.flip, v.transpose, gamma=0.8)
        np.testing.assert_allclose(g.invert(g.apply(arr, image=True)), arr**0.8, rtol=1e-6)
        # points follow the arrays: a single voxel lands where apply_points says
        p = np.array([[1, 2, 3]], np.float32)
        dot = np.zeros(shape, np.float32)
        dot[1, 2, 3] = 1
        assert tuple(np.argwhere(v.apply(dot))[0]) == tuple(v.apply_points(p, shape)[0].astype(int))
    assert len(seen) == size  # all elements act differently
    if shape[1] != shape[2]:
        with pytest.raises(ValueError, match="y size == x size"):
            ViewTransform(transpose=True).apply(arr)


def test_prompts_follow_the_view():
    mask = blob_mask()
    for v in view_group(SHAPE):
        mapped = v.apply_prompts(Prompts.from_mask(mask, include_mask=True), SHAPE)
        direct = Prompts.from_mask(v.apply(mask), include_mask=True)
        assert sorted(map(tuple, mapped.boxes2d.tolist())) == sorted(map(tuple, direct.boxes2d.tolist()))
        assert mapped.box3d == direct.box3d
        np.testing.assert_array_equal(mapped.mask, direct.mask)


def test_gamma_applies_to_images_only():
    rng = np.random.default_rng(2)
    img = rng.random((3, 4, 4)).astype(np.float32)
    mask = rng.random((3, 4, 4)) > 0.5
    v = ViewTransform((False, True, False), transpose=True, gamma=0.5)
    np.testing.assert_allclose(v.apply(img, image=True), np.flip(img, 1).transpose(0, 2, 1) ** 0.5, rtol=1e-6)
    np.testing.assert_array_equal(v.apply(img), np.flip(img, 1).transpose(0, 2, 1))  # not an image: no gamma
    assert v.apply(mask).dtype == bool
    np.testing.assert_array_equal(v.apply(mask), np.flip(mask, 1).transpose(0, 2, 1))
    assert v.apply(img, image=True).dtype == np.float32
    ident = ViewTransform()
    assert ident.apply(img, image=True) is img and ident.invert(img) is img
    assert ViewTransform(gamma=2.0).apply(img, image=True) is not img
    assert not ViewTransform(gamma=2.0).is_identity_inplane and ViewTransform((True, False, False)).is_identity_inplane
    assert v.inplane() == ViewTransform((False, True, False), True, 0.5) and ViewTransform((True, True, False)).depth_flip


def test_draw_views():
    cube, flat = (6, 8, 8), (6, 8, 10)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        views = draw_views(4, cube, rng)
        assert views[0] == ViewTransform() and len(set(views)) == 4
        geometry = {(v.flip, v.transpose) for v in views}
        assert len(geometry) == 4
        assert len({v.inplane().flip + (v.inplane().transpose,) for v in views}) == 4  # distinct in-plane parts first
        for v in views[1:]:
            assert (v.gamma != 1.0) == (not ViewTransform(v.flip, v.transpose).is_identity_inplane)
            assert 0.8 <= v.gamma <= 1.25
        assert not any(v.transpose for v in draw_views(8, flat, rng))
    assert len(draw_views(16, cube, np.random.default_rng(0))) == 16
    assert len(draw_views(40, flat, np.random.default_rng(0))) == 8  # capped at the group
    assert all(not v.depth_flip for v in draw_views(8, cube, np.random.default_rng(0), depth_flips=False))
    only_depth = draw_views(5, cube, np.random.default_rng(0), inplane=False)
    assert only_depth == [ViewTransform(), ViewTransform((True, False, False))]
    assert all(v.gamma == 1.0 for v in draw_views(6, cube, np.random.default_rng(0), gamma_range=None))


def test_points_are_interior():
    mask = blob_mask()
    rng = np.random.default_rng(0)
    sp = slice_points(mask, rng)
    assert sorted(sp.points[:, 0].astype(int).tolist()) == [4, 5, 6] and (sp.point_labels == 1).all()
    from scipy import ndimage

    for z, y, x in sp.points.astype(int):
        d = ndimage.distance_transform_edt(np.pad(mask[z], 1))[1:-1, 1:-1]
        assert d[y, x] >= 0.5 * d.max()
    vp = volume_points(mask, 3, rng)
    assert len(vp.points) == 3 and all(mask[tuple(p)] for p in vp.points.astype(int))
    assert len(volume_points(np.zeros(SHAPE, bool), 2, rng).points) == 0


# --------------------------------------------------------------------------------------------
# Fake teachers: controlled predictions
# --------------------------------------------------------------------------------------------


class FakeTeacher:
    """Set A (mask prompt) -> the mask prompt times a[i]; set B (points) -> the constant b[i];
    i counts views. Records what it was given."""

    def __init__(self, a, b, name="fake", per_slice=False):
        self.a, self.b, self.name, self.per_slice = list(a), list(b), name, per_slice
        self.prepared, self.prompts = [], []
        self.calls_a = self.calls_b = 0

    def prepare(self, image):
        self.prepared.append(image)
        return {"image": image}

    def predict(self, state, prompts):
        self.prompts.append(prompts)
        if prompts.mask is not None:
            out = prompts.mask * self.a[self.calls_a]
            self.calls_a += 1
        else:
            assert len(prompts.points) and (prompts.point_labels == 1).all()
            out = np.full(state["image"].shape, self.b[self.calls_b], np.float32)
            self.calls_b += 1
        return out


def test_variance_and_confidence_maths(image):
    mask = blob_mask()
    a, b = [0.85, 0.95], [0.9, 0.8]
    teacher = FakeTeacher(a, b)
    views = [ViewTransform(), ViewTransform((True, True, False), True, gamma=0.9)]
    pl = PseudoLabeler(teacher, u_th=0.05)(image, mask, "case", views=views)
    inside, outside = np.array(a + b), np.array([0, 0] + b)
    assert pl.n_predictions == 4 and pl.coarse_voxels == mask.sum()
    np.testing.assert_allclose(pl.mean[mask], inside.mean(), atol=1e-6)
    np.testing.assert_allclose(pl.mean[~mask], outside.mean(), atol=1e-6)
    np.testing.assert_allclose(pl.variance[mask], inside.var(), atol=1e-6)
    np.testing.assert_allclose(pl.variance[~mask], outside.var(), atol=1e-6)
    assert inside.var() < 0.05 < outside.var()
    np.testing.assert_array_equal(pl.confidence, mask)
    np.testing.assert_allclose(pl.probability, np.where(mask, inside.mean(), 0), atol=1e-6)
    assert pl.probability.dtype == pl.mean.dtype == pl.variance.dtype == np.float32 and pl.confidence.dtype == bool
    s = pl.summary()
    assert s["confident_fraction"] == pytest.approx(mask.mean()) and s["foreground_voxels"] == mask.sum()
    assert s["mean_variance_in_coarse"] == pytest.approx(inside.var(), abs=1e-6) and s["n_predictions"] == 4
    # the (3D) teacher saw the full view: a depth-flipped, in-plane-changed image with its gamma,
    # and a mask prompt mapped the same way
    assert teacher.prepared[0] is image
    np.testing.assert_allclose(teacher.prepared[1], views[1].apply(image, image=True))
    np.testing.assert_array_equal(teacher.prompts[2].mask, views[1].apply(mask))
    assert all(views[1].apply(mask)[tuple(p)] for p in teacher.prompts[3].points.astype(int))
    # a higher threshold makes everything confident; binarize uses 0/1 predictions
    loose = PseudoLabeler(FakeTeacher(a, b), u_th=0.25)(image, mask, "case", views=views)
    assert loose.confidence.all()
    hard = PseudoLabeler(FakeTeacher([0.6, 0.4], [0.7, 0.2]), u_th=0.2, binarize=True)(image, mask, "case", views=views)
    np.testing.assert_allclose(hard.mean[mask], 0.5)
    np.testing.assert_allclose(hard.variance[mask], 0.25)
    assert not hard.confidence[mask].any()


def test_slice_teacher_sees_inplane_part_only(image):
    mask = blob_mask()
    teacher = FakeTeacher([1, 1, 1], [1, 1, 1], per_slice=True)
    views = [ViewTransform(), ViewTransform((True, False, False)), ViewTransform((True, False, True), gamma=1.1)]
    pl = PseudoLabeler(teacher)(image, mask, "case", views=views)
    assert pl.n_predictions == 6
    assert len(teacher.prepared) == 2  # the identity and the depth-flip views share one state
    assert teacher.prepared[0] is image
    np.testing.assert_allclose(teacher.prepared[1], ViewTransform((False, False, True), gamma=1.1).apply(image, image=True))
    np.testing.assert_allclose(pl.mean[mask], 1.0)
    np.testing.assert_allclose(pl.mean[~mask], 0.5)


def test_empty_mask_gives_none_and_no_teacher_call(image):
    teacher = FakeTeacher([1], [1])
    labeler = PseudoLabeler(teacher, min_voxels=5)
    assert labeler(image, np.zeros(SHAPE, bool), "empty") is None
    few = np.zeros(SHAPE, bool)
    few[5, 10, 10:14] = True
    assert labeler(image, few, "few") is None
    assert teacher.prepared == [] and teacher.prompts == []
    assert labeler.totals["skipped"] == 2 and labeler.last["skipped"]
    with pytest.raises(ValueError, match="differs"):
        labeler(image, np.zeros((2, 2, 2), bool), "bad")


def test_views_are_deterministic_per_key(image):
    mask = blob_mask(shape=(12, 32, 32))
    one, two = PseudoLabeler(FakeTeacher([1] * 3, [1] * 3), n_views=3, seed=7), PseudoLabeler(FakeTeacher([1] * 3, [1] * 3), n_views=3, seed=7)
    assert one.views_for("case-1", SHAPE) == two.views_for("case-1", SHAPE) == one.views_for("case-1", SHAPE)
    assert len({tuple(one.views_for(f"case-{i}", SHAPE)) for i in range(8)}) > 1
    assert one.views_for("case-1", SHAPE) != PseudoLabeler(FakeTeacher([1], [1]), n_views=3, seed=8).views_for("case-1", SHAPE)
    # the whole call is reproducible: the same images and the same points, twice
    t1, t2 = one.teachers[0], two.teachers[0]
    one(image, mask, "case-1")
    two(image, mask, "case-1")
    assert [p.tobytes() for p in t1.prepared] == [p.tobytes() for p in t2.prepared]
    assert all(np.array_equal(p.points, q.points) for p, q in zip(t1.prompts, t2.prompts))


# --------------------------------------------------------------------------------------------
# Real (small, random) SAM teachers: embedding reuse and the depth-flip shortcut
# --------------------------------------------------------------------------------------------


def test_identity_view_reuses_the_students_embeddings(sam, encoder, image):
    cache = EmbeddingCache()
    cache.embed(image, encoder)  # the student embedded the whole volume
    assert cache.encoded_slices == SHAPE[0]
    teacher = SAMTeacher(sam, encoder=encoder, cache=cache)
    given = []
    prepare = teacher.prepare
    teacher.prepare = lambda img: given.append(img) or prepare(img)
    labeler = PseudoLabeler(teacher, n_views=2, inplane=False)  # views: identity, depth flip
    assert labeler.views_for("v", SHAPE) == [ViewTransform(), ViewTransform((True, False, False))]
    pl = labeler(image, blob_mask(), "v")
    assert cache.encoded_slices == SHAPE[0]  # nothing new was encoded, not even for the flipped view
    assert len(given) == 1 and np.shares_memory(given[0], image) and given[0].tobytes() == image.tobytes()
    assert pl.n_predictions == 4 and pl.info["encoded_slices"] == 0


def test_depth_flip_shortcut_equals_running_the_flipped_view(sam, encoder, image):
    mask = blob_mask()
    views = [ViewTransform(), ViewTransform((True, True, False), gamma=0.9), ViewTransform((True, False, False))]
    results, caches = [], []
    for shortcut in (True, False):
        cache = EmbeddingCache()
        labeler = PseudoLabeler(SAMTeacher(sam, encoder=encoder, cache=cache), slice_shortcut=shortcut)
        results.append(labeler(image, mask, "flip", views=views))
        caches.append(cache)
    fast, direct = results
    n_slices = 3  # the mask's slices: only prompted slices are encoded
    assert caches[0].encoded_slices == 2 * n_slices  # identity (+ its depth flip, free) and flip-y
    assert caches[1].encoded_slices == 3 * n_slices  # the direct route encodes both depth-flipped volumes too
    for v in views[1:]:
        assert EmbeddingCache.key(v.apply(image, image=True), encoder) not in caches[0]._memory
        assert EmbeddingCache.key(v.apply(image, image=True), encoder) in caches[1]._memory
    assert EmbeddingCache.key(views[1].inplane().apply(image, image=True), encoder) in caches[0]._memory
    assert fast.n_predictions == direct.n_predictions == 6
    np.testing.assert_allclose(fast.mean, direct.mean, atol=1e-4)
    np.testing.assert_allclose(fast.variance, direct.variance, atol=1e-4)
    assert fast.mean[4:7].max() > 0 and fast.mean[[0, 1, 2, 3, 7, 8, 9, 10, 11]].max() == 0


def test_end_to_end_small_sam_and_litemedsam_prompting(sam, encoder, image):
    """SAM (clicks as clicks, dense mask) and the LiteMedSAM prompt logic (boxes from clicks,
    no dense mask) on the same small random SAM network, two views each, one shared cache."""
    cache = EmbeddingCache()
    teachers = [SAMTeacher(sam, encoder=encoder, cache=cache), LiteMedSAMTeacher(net=sam, encoder=encoder, cache=cache)]
    labeler = PseudoLabeler(teachers, n_views=2, u_th=0.1, seed=3)
    mask = blob_mask()
    pl = labeler(image, mask, "e2e")
    assert pl.shape == SHAPE and pl.n_predictions == 8
    assert 0 <= pl.probability.min() and pl.probability.max() <= 1 and np.isfinite(pl.variance).all()
    assert (pl.variance <= 0.25 + 1e-6).all()
    np.testing.assert_array_equal(pl.probability, pl.mean * pl.confidence)
    outside = np.ones(SHAPE[0], bool)
    outside[4:7] = False
    assert pl.mean[outside].max() == 0 and pl.confidence[outside].all()  # unprompted slices: confident background
    assert pl.mean[4:7].max() > 0
    assert cache.encoded_slices == pl.info["encoded_slices"] <= 2 * 3  # two views x three prompted slices
    s = pl.summary()
    assert set(s) >= {"confident_fraction", "foreground_voxels", "mean_variance", "mean_variance_in_coarse", "seconds"}
    assert labeler.totals["predictions"] == 8 and set(labeler.totals["teacher_seconds"]) == {"medsam-vit-b", "litemedsam"}
    json.dumps(pl.info)  # loggable


def test_end_to_end_litemedsam_network(image):
    """The real LiteMedSAM prompt encoder and mask decoder (random weights) behind a cheap
    random convolution in place of its TinyViT (which takes seconds per slice here)."""
    from semisam.models.encoders import SliceEncoder, build_litemedsam

    torch.manual_seed(0)
    conv = SliceEncoder("conv-test", torch.nn.Conv2d(3, 256, kernel_size=4, stride=4), 256, "conv-test:0")
    teacher = LiteMedSAMTeacher(net=build_litemedsam(pretrained=False), encoder=conv)
    labeler = PseudoLabeler(teacher, n_views=3, seed=5)
    pl = labeler(image, blob_mask(), "lite")
    assert pl.n_predictions == 6 and pl.mean[4:7].max() > 0 and pl.mean[:4].max() == 0
    assert teacher.cache.encoded_slices == pl.info["encoded_slices"] <= 3 * 3
    assert pl.info["views"][0] == "identity" and len(set(pl.info["views"])) == 3


def test_end_to_end_small_3d_teachers(image):
    """SAM-Med3D and MedSAM2 (small random configurations) get the full view, depth flips included."""
    from semisam.models.teacher_medsam2 import MedSAM2Teacher
    from semisam.models.teacher_sammed3d import SAMMed3DTeacher

    class Recorder:
        """The real teacher, with what it was given and what it returned."""

        def __init__(self, teacher):
            self.teacher, self.name, self.prepared, self.calls = teacher, teacher.name, [], []

        def prepare(self, img):
            self.prepared.append(np.array(img))
            return self.teacher.prepare(img)

        def predict(self, state, prompts):
            out = np.asarray(self.teacher.predict(state, prompts), np.float32)
            self.calls.append((len(self.prepared) - 1, prompts, out))
            return out

    teachers = [Recorder(SAMMed3DTeacher.small_random()), Recorder(MedSAM2Teacher(small=True))]
    labeler = PseudoLabeler(teachers, n_views=2, points=(1, 3), seed=1)
    views = [ViewTransform(), ViewTransform((True, False, True), True, gamma=1.1)]
    mask = blob_mask()
    pl = labeler(image, mask, "3d", views=views)
    assert pl.shape == SHAPE and pl.n_predictions == 8
    expected = []
    for t in teachers:
        # a 3D teacher is never given the shortcut: it sees the whole view, depth flip and gamma included
        assert len(t.prepared) == 2 and np.array_equal(t.prepared[0], image)
        np.testing.assert_allclose(t.prepared[1], views[1].apply(image, image=True), rtol=1e-6)
        assert len(t.calls) == 4
        for view_index, prompts, out in t.calls:
            v = views[view_index]
            if prompts.mask is not None:  # prompt set A: the coarse mask, mapped into the view
                np.testing.assert_array_equal(prompts.mask > 0.5, v.apply(mask))
            else:  # prompt set B: positive points inside the mapped mask
                assert len(prompts.points) >= 1 and all(v.apply(mask)[tuple(p)] for p in np.round(prompts.points).astype(int))
            expected.append(v.invert(out))  # and each prediction is mapped back before the statistics
    stack = np.stack(expected).astype(np.float64)
    np.testing.assert_allclose(pl.mean, stack.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(pl.variance, stack.var(axis=0), atol=1e-5)
    assert np.abs(stack[4] - stack[0]).max() > 0  # the two teachers really differ: the check above is not trivial


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def make_label(seed=0, shape=(4, 6, 8)):
    rng = np.random.default_rng(seed)
    return PseudoLabel.from_statistics(rng.random(shape), 0.2 * rng.random(shape), 0.1, 4, 17, {"seconds": 1.5, "views": ["identity"]})


def test_pseudo_label_save_load(tmp_path):
    pl = make_label()
    path = pl.save(tmp_path / "a.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temporary file left
    back = PseudoLabel.load(path)
    np.testing.assert_array_equal(back.confidence, pl.confidence)
    np.testing.assert_allclose(back.mean, pl.mean, atol=1e-3)
    np.testing.assert_allclose(back.variance, pl.variance, atol=1e-3)
    np.testing.assert_array_equal(back.probability, back.mean * back.confidence)
    assert (back.n_predictions, back.coarse_voxels, back.u_th, back.info) == (4, 17, 0.1, pl.info)
    big = PseudoLabel.from_statistics(np.where(blob_mask(), 0.9, 0.0), np.where(blob_mask(), 0.01, 0.0), 0.1, 4, int(blob_mask().sum()))
    assert big.save(tmp_path / "big.npz").stat().st_size < big.nbytes / 20  # compact (mostly background)
    np.savez(tmp_path / "other.npz", header=np.array("{}"))
    with pytest.raises(ValueError, match="not a SemiSAM pseudo-label"):
        PseudoLabel.load(tmp_path / "other.npz")


def test_store_round_trip_none_due_and_resume(tmp_path):
    store = PseudoLabelStore(tmp_path / "pl")
    with pytest.raises(KeyError):
        store.get("a")
    assert store.due("a", 0, 5)
    pa = make_label(1)
    store.put("a", pa, epoch=3)
    store.put("dir/b c", None, epoch=3)  # an empty coarse mask: remembered as no pseudo-label
    assert store.get("a")[0] is pa and store.get("a")[1] == 3
    assert store.get("dir/b c") == (None, 3)
    assert not store.due("a", 7, 5) and store.due("a", 8, 5) and store.due("a", 9, 5)
    assert not store.due("a", 100, 0) and not store.due("a", 100, -1) and store.due("new", 100, 0)

    again = PseudoLabelStore(tmp_path / "pl")  # a resumed run
    assert sorted(again.cases()) == ["a", "dir/b c"] and len(again) == 2
    got, epoch = again.get("a")
    assert epoch == 3 and np.array_equal(got.confidence, pa.confidence)
    np.testing.assert_allclose(got.mean, pa.mean, atol=1e-3)
    assert again.get("dir/b c") == (None, 3)
    # replacing a pseudo-label by None removes its file; a damaged index is rebuilt from the files
    again.put("a", None, epoch=9)
    assert not list((tmp_path / "pl").glob("*.npz"))
    again.put("c", make_label(2), epoch=10)
    (tmp_path / "pl" / "index.json").write_text("{broken")
    rebuilt = PseudoLabelStore(tmp_path / "pl")
    assert rebuilt.cases() == ["c"] and rebuilt.get("c")[1] == 10


def test_store_memory_bound_reloads_from_disk(tmp_path):
    labels = [make_label(i) for i in range(3)]
    store = PseudoLabelStore(tmp_path, max_memory_bytes=labels[0].nbytes + 1)
    for i, pl in enumerate(labels):
        store.put(f"c{i}", pl, epoch=i)
    assert len(store._memory) == 1
    got, epoch = store.get("c0")
    assert epoch == 0 and got is not labels[0] and np.array_equal(got.confidence, labels[0].confidence)
    memory_only = PseudoLabelStore(None)
    memory_only.put("x", labels[1], 2)
    assert memory_only.get("x") == (labels[1], 2)


def test_as_stored_equals_a_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.random((4, 6, 6)).astype(np.float32)
    pl = PseudoLabel.from_statistics(mean, rng.random((4, 6, 6)).astype(np.float32) * 0.2, 0.1, 4, 10)
    stored = pl.as_stored()
    loaded = PseudoLabel.load(pl.save(tmp_path / "p.npz"))
    for name in ("probability", "confidence", "variance", "mean"):
        assert np.array_equal(getattr(stored, name), getattr(loaded, name)), name


def test_slice_boxes_jitter_the_masks_boxes():
    from semisam.pseudo_labels import slice_boxes

    mask = np.zeros((6, 40, 40), bool)
    mask[1:4, 10:30, 5:25] = True
    boxes = slice_boxes(mask, np.random.default_rng(0), jitter=0.1).boxes2d
    assert boxes[:, 0].tolist() == [1, 2, 3]
    true = np.array([10, 5, 29, 24], np.float32)
    assert np.all(np.abs(boxes[:, 1:] - true) <= 0.1 * 20 + 1e-4) and np.any(boxes[:, 1:] != true)
    assert np.all(boxes[:, 1:3] <= boxes[:, 3:5]) and boxes.min() >= 0 and boxes[:, 3:].max() <= 39
    assert np.array_equal(slice_boxes(mask, np.random.default_rng(0), jitter=0.0).boxes2d[:, 1:], np.tile(true, (3, 1)))
