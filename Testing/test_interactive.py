"""The interactive core with the real LiteMedSAM weights: embed once, clicks as box edits,
propagation, bad inputs."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import shared_dataset
from semisam.interactive import ClickPolicy, InteractiveSession, _BoxDecoder
from semisam.models.encoders import build_litemedsam, fast_encoder, litemedsam_encoder
from semisam.phantom import make_phantom
from semisam.volume import read_volume


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def centre_click(region):
    """(row, col) of the maximum of the distance transform (the simulated user's click)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    return np.unravel_index(int(np.argmax(dist)), dist.shape)


def next_click(pred, truth):
    """The simulated user: centre of the largest error region, positive for a miss."""
    best = None
    for positive, error in ((True, truth & ~pred), (False, pred & ~truth)):
        labels, n = ndimage.label(error)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            k = int(np.argmax(sizes)) + 1
            if best is None or sizes[k - 1] > best[0]:
                best = (sizes[k - 1], positive, labels == k)
    r, c = centre_click(best[2])
    return (int(r), int(c), best[1])


def disks(depth=8, size=64, seed=0):
    """A dark volume with a bright disk on slices 2..5 (radius 12) and, on slice 3, a second
    bright disk far from the first: (image, truth of the first disk)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = 20 + 5 * rng.standard_normal((depth, size, size))
    truth = np.zeros((depth, size, size), bool)
    for z in range(2, 6):
        truth[z] = (yy - 24) ** 2 + (xx - 24) ** 2 <= 12**2
    image[truth] += 150
    image[3][(yy - 48) ** 2 + (xx - 50) ** 2 <= 7**2] += 150
    return image.astype(np.float32), truth


@pytest.fixture(scope="module")
def model():
    net = build_litemedsam()
    return net, fast_encoder(litemedsam_encoder(net))


@pytest.fixture(scope="module")
def disk_session(model):
    net, encoder = model
    session = InteractiveSession(net=net, encoder=encoder)
    image, truth = disks()
    session.set_image(image, (0.8, 0.8, 2.0))
    return session, truth


def test_fast_box_decoder_equals_the_mask_decoder(model):
    net, _ = model
    torch.manual_seed(0)
    emb = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[50.0, 50.0, 150.0, 150.0], [30, 40, 200, 180], [100, 100, 120, 130]])
    with torch.inference_mode():
        sparse, dense = net.prompt_encoder(points=None, boxes=boxes[:, None], masks=None)
        ref, ref_iou = net.mask_decoder(emb, net.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
        decoder = _BoxDecoder(net)
        logits, iou = decoder(decoder.prepare(emb), boxes)
    assert torch.allclose(logits, ref[:, 0], atol=1e-3) and torch.allclose(iou, ref_iou[:, 0], atol=1e-4)


def test_each_slice_is_embedded_once_and_clicks_are_honoured(disk_session):
    session, truth = disk_session
    before = session.encoded_slices
    t = time.perf_counter()
    mask = session.predict(0, 2, [(24, 24, True)])
    first = time.perf_counter() - t
    assert session.encoded_slices == before + 1 and session.last_info["encoded"]
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert dice(mask, truth[2]) > 0.85, dice(mask, truth[2])
    # more clicks on the same slice: decoder only, and every click's pixel has its label
    clicks = [(24, 24, True), (24, 40, False), (5, 5, True), (30, 30, False)]
    for k in range(2, len(clicks) + 1):
        t = time.perf_counter()
        mask = session.predict(0, 2, clicks[:k], previous=mask)
        assert time.perf_counter() - t < first
        for r, c, positive in clicks[:k]:
            assert mask[r, c] == positive
    assert session.encoded_slices == before + 1 and not session.last_info["encoded"]
    # a box on a slice along another axis is a new slice: one more encoding, once
    session.predict(1, 24, box=(2, 12, 5, 36))
    session.predict(1, 24, [(3, 24, True)], box=(2, 12, 5, 36))
    assert session.encoded_slices == before + 2 and session.is_cached(1, 24)


def test_a_negative_click_removes_a_wrong_region(disk_session):
    session, truth = disk_session
    box = (8, 8, 60, 60)  # covers both disks of slice 3
    mask = session.predict(0, 3, box=box)
    second = np.zeros_like(mask)
    yy, xx = np.mgrid[:64, :64]
    second[(yy - 48) ** 2 + (xx - 50) ** 2 <= 5**2] = True
    assert mask[second].mean() > 0.9, "the box should catch the second disk"
    before = mask.sum()
    mask = session.predict(0, 3, [(24, 24, True), (48, 50, False)], box=box, previous=mask)
    assert not mask[second].any()  # LiteMedSAM joined the two disks: the box was cut back
    assert mask[truth[3]].mean() > 0.9 and mask.sum() < before - second.sum()
    # a mask edited elsewhere (``previous``) is the starting point: a negative click on a part
    # of it that holds no positive click removes that part, the rest stays as it was
    edited = truth[2].copy()
    edited[45:56, 45:56] = True
    mask = session.predict(0, 2, [(24, 24, True), (50, 50, False)], previous=edited)
    assert np.array_equal(mask, truth[2])
    # without any positive click the largest part is kept
    mask = session.predict(0, 2, [(50, 50, False)], previous=edited)
    assert np.array_equal(mask, truth[2])


def test_propagation_stops_when_the_mask_vanishes(disk_session):
    session, truth = disk_session
    calls = []
    volume = session.propagate(0, 3, truth[3], progress=lambda done, total: calls.append((done, total)))
    zs = np.flatnonzero(volume.any(axis=(1, 2)))
    assert zs.tolist() == [2, 3, 4, 5], zs
    assert dice(volume, truth) > 0.85
    assert calls and calls[-1][0] == calls[-1][1] == 7  # every slice accounted for
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_propagation_can_be_cancelled(disk_session):
    session, truth = disk_session
    seen = []
    volume = session.propagate(0, 3, truth[3], direction="forward", cancel=lambda: len(seen) >= 1, progress=lambda d, t: seen.append(d))
    assert session.last_info["cancelled"]
    assert np.flatnonzero(volume.any(axis=(1, 2))).tolist() == [3, 4]
    only = session.propagate(0, 3, truth[3], direction="backward", max_slices=1, stop_when_empty=False)
    assert np.flatnonzero(only.any(axis=(1, 2))).tolist() == [2, 3]


def test_a_click_on_a_phantom_target(model):
    net, encoder = model
    case = make_phantom(3, (32, 80, 80))
    label = case.label.array > 0
    session = InteractiveSession(net=net, encoder=encoder)
    session.set_image(case.image.array, case.image.spacing)
    z = int(np.argmax(label.sum(axis=(1, 2))))
    r, c = centre_click(label[z])
    mask = session.predict(0, z, [(r, c, True)])
    first = dice(mask, label[z])
    clicks = [(r, c, True)]
    for _ in range(2):
        clicks.append(next_click(mask, label[z]))
        mask = session.predict(0, z, clicks, previous=mask)
    third = dice(mask, label[z])
    print(f"phantom target slice: Dice {first:.3f} after one click, {third:.3f} after three")
    # LiteMedSAM reaches only ~0.75 on these phantoms even with the true box, and the embeddings
    # differ by CPU (bf16 on AMX, fp32 elsewhere): three clicks gave 0.697 on a Zen 3 in fp32, so
    # the bar is a usable mask after the corrections, not a gain over the first click
    assert first > 0.6 and third > 0.6
    assert session.encoded_slices == 1


@pytest.mark.realdata
def test_clicks_on_real_fetal_heads(model):
    net, encoder = model
    root = shared_dataset("hc18-dev")
    rows = list(csv.reader((root / "pixel_size_and_HC.csv").open()))[1:4]
    session = InteractiveSession(net=net, encoder=encoder)
    one, three, box = [], [], []
    for name, pixel, _ in rows:
        image = read_volume(root / name).array
        truth = read_volume(root / name.replace(".png", "_Annotation.png"), "label").array[0] > 0
        session.set_image(image, (float(pixel), float(pixel), 1.0))
        clicks, mask = [], np.zeros_like(truth)
        for k in range(3):
            clicks.append(next_click(mask, truth))
            mask = session.predict(0, 0, clicks, previous=mask if mask.any() else None)
            if k == 0:
                one.append(dice(mask, truth))
        three.append(dice(mask, truth))
        rr, cc = np.nonzero(truth)
        session.reset()
        box.append(dice(session.predict(0, 0, box=(rr.min(), cc.min(), rr.max(), cc.max())), truth))
    print(f"HC18 median Dice: one click {np.median(one):.3f}, three clicks {np.median(three):.3f}, box {np.median(box):.3f}")
    assert np.median(one) > 0.8 and np.median(three) > 0.9 and np.median(box) > 0.9


def test_bad_inputs_are_refused_with_a_message(model):
    net, encoder = model
    with pytest.raises(ValueError, match="native 256 px frame; this encoder takes 128 px"):
        InteractiveSession(net=net, encoder=litemedsam_encoder(net, input_size=128))
    session = InteractiveSession(net=net, encoder=encoder)
    with pytest.raises(ValueError, match="no image set"):
        session.predict(0, 0, [(1, 1, True)])
    with pytest.raises(ValueError, match="no image set"):
        session.propagate(0, 0, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        session.set_image(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="finite"):
        session.set_image(np.full((2, 4, 4), np.nan), (1, 1, 1))
    with pytest.raises(ValueError, match="constant"):
        session.set_image(np.ones((2, 4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        session.set_image(np.arange(32.0).reshape(2, 4, 4), (1, 0, 1))
    session.set_image(np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8), (1, 1, 1))
    for axis in (3, -1, 1.0, True, "z"):
        with pytest.raises(ValueError, match="axis must be 0"):
            session.predict(axis, 0, [(1, 1, True)])
    with pytest.raises(ValueError, match="slice index 2 is outside 0..1 along axis 0"):
        session.predict(0, 2, [(1, 1, True)])
    with pytest.raises(ValueError, match=r"click 1 at \(row 6, col 0\) lies outside slice z=0 of shape \(6, 8\)"):
        session.predict(0, 0, [(1, 1, True), (6, 0, True)])
    with pytest.raises(ValueError, match="lies outside slice x=7"):
        session.predict(2, 7, [(0, -1, False)])  # axis 2: slices are (z, y) = (2, 6)
    with pytest.raises(ValueError, match=r"must be \(row, col, positive\)"):
        session.predict(0, 0, [(1, 1)])
    with pytest.raises(ValueError, match="row0 <= row1"):
        session.predict(0, 0, box=(4, 1, 2, 3))
    with pytest.raises(ValueError, match="box .* lies outside"):
        session.predict(0, 0, box=(0, 0, 5, 8))
    with pytest.raises(ValueError, match=r"previous mask has shape \(3, 3\)"):
        session.predict(0, 0, [(1, 1, True)], previous=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="needs a click, a box or a previous mask"):
        session.predict(0, 0, [])
    with pytest.raises(ValueError, match="cannot propagate an empty mask"):
        session.propagate(0, 0, np.zeros((6, 8), bool))
    with pytest.raises(ValueError, match="direction"):
        session.propagate(0, 0, np.ones((6, 8), bool), direction="up")
    with pytest.raises(ValueError, match="select must be one of"):
        ClickPolicy(select="best")
    assert session.encoded_slices == 0  # nothing above reached the encoder


def test_slices_keep_their_physical_aspect_and_old_embeddings_are_dropped(model):
    net, encoder = model
    image, truth = disks()
    session = InteractiveSession(net=net, encoder=encoder, max_slices=2)
    session.set_image(image, (0.8, 0.8, 2.0))
    # axis 1: (z, x) slices of 8 x 64 pixels, 16 x 51.2 mm -> 80 x 256 of the model frame
    frame = session._frame(1)
    assert (frame.h, frame.w, frame.fh, frame.fw) == (8, 64, 80, 256)
    assert session.slice_shape(2) == (8, 64) and session.slice_spacing(2) == (2.0, 0.8)
    for z in (2, 3, 4):
        session.predict(0, z, [(24, 24, True)])
    assert session.encoded_slices == 3 and not session.is_cached(0, 2) and session.is_cached(0, 4)
    session.predict(0, 2, [(24, 24, True), (40, 40, False)])  # evicted: encoded again
    assert session.encoded_slices == 4
