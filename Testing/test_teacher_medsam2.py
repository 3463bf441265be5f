"""The MedSAM2 teacher: Meta's sam2 video predictor fed from numpy, prompts, propagation,
checkpoints. Runs on CPU with the small random configuration (the full one only where noted)."""

from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import blob_label
from semisam.models.checkpoints import CheckpointError
from semisam.models.prompts import Prompts, Teacher
from semisam.models.teacher_medsam2 import MedSAM2State, MedSAM2Teacher

SHAPE = (8, 64, 64)
BOX = Prompts(boxes2d=[[3, 18, 20, 45, 44]])


def phantom(shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    label = blob_label(shape, radius=14.0)
    return np.clip(0.2 + 0.6 * label + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32)


def make_teacher(seed: int = 0, **kwargs) -> MedSAM2Teacher:
    return MedSAM2Teacher(small=True, seed=seed, **kwargs)


def force_objects(teacher: MedSAM2Teacher) -> None:
    """Random weights usually score 'no object' (all-zero masks); bias the object-score head
    so that every frame keeps its mask and propagation has something to show."""
    with torch.no_grad():
        teacher.predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(20.0)


def count_calls(module: torch.nn.Module) -> Counter:
    calls: Counter = Counter()
    module.register_forward_hook(lambda *_: calls.update(["n"]))
    return calls


@pytest.fixture(scope="module")
def teacher() -> MedSAM2Teacher:
    return make_teacher()


@pytest.fixture(scope="module")
def state(teacher) -> MedSAM2State:
    return teacher.prepare(phantom())


def check_probabilities(prob: np.ndarray) -> None:
    assert prob.shape == SHAPE and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0


def test_is_a_teacher_and_prepare_is_lazy(teacher):
    assert isinstance(teacher, Teacher) and teacher.name == "medsam2"
    encodes = count_calls(teacher.predictor.image_encoder)
    st = teacher.prepare(phantom())
    assert encodes["n"] == 0  # no embedding is computed before a frame is visited
    assert st.shape == SHAPE and st.scale == (128 / 64, 128 / 64)
    frame = st.inference["images"][0]
    assert frame.shape == (3, 128, 128) and st.inference["num_frames"] == SHAPE[0]
    # ImageNet normalisation of a grey frame: the three channels differ only by mean/std
    grey = frame * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[0], grey[2], atol=1e-5)


def test_box_output_is_a_deterministic_probability_volume(teacher, state):
    first = teacher.predict(state, BOX)
    check_probabilities(first)
    again = teacher.predict(state, BOX)  # calls are independent: the predictor state is reset
    np.testing.assert_array_equal(first, again)
    other = make_teacher()  # same seed, new model, new state
    np.testing.assert_array_equal(first, other.predict(other.prepare(phantom()), BOX))


@pytest.mark.parametrize(
    "prompts",
    [
        Prompts(points=[[4, 32, 32]], point_labels=[1]),
        Prompts(points=[[4, 32, 32], [4, 2, 2], [6, 30, 31]], point_labels=[1, 0, 1]),
        Prompts(mask=blob_label(SHAPE, radius=14.0).astype(np.float32)),
        Prompts(box3d=(1, 18, 20, 6, 45, 44)),
        Prompts.from_mask(blob_label(SHAPE, radius=14.0), n_points=2),  # boxes, points, mask, 3D box
    ],
    ids=["point", "points-neg", "mask", "box3d", "mixed"],
)
def test_prompt_kinds(teacher, state, prompts):
    check_probabilities(teacher.predict(state, prompts))


def test_propagation_visits_every_slice_forward_and_backward():
    t = make_teacher()
    force_objects(t)
    encodes, memory = count_calls(t.predictor.image_encoder), count_calls(t.predictor.memory_attention)
    prob = t.predict(t.prepare(phantom()), BOX)
    assert encodes["n"] == SHAPE[0]  # every slice encoded exactly once
    assert memory["n"] == SHAPE[0] - 1  # every slice but the key one tracked from memory
    per_slice = prob.reshape(SHAPE[0], -1)
    assert (per_slice.max(axis=1) > 0.01).all()  # outputs before and after the key slice
    assert not np.allclose(per_slice[0], per_slice[3]) and not np.allclose(per_slice[7], per_slice[3])


def test_prompts_on_several_slices_are_all_conditioning_frames():
    t = make_teacher()
    memory = count_calls(t.predictor.memory_attention)
    prompts = Prompts(boxes2d=[[5, 18, 20, 45, 44], [2, 20, 20, 40, 40]], points=[[6, 30, 30]], point_labels=[1])
    check_probabilities(t.predict(t.prepare(phantom()), prompts))
    assert memory["n"] == SHAPE[0] - 3


def test_prompt_coordinates_reach_sam2_as_scaled_xy(teacher, state):
    seen = []

    def grab(_module, _args, kwargs):
        coords, labels = kwargs["points"]
        seen.append((coords[0].tolist(), labels[0].tolist()))

    handle = teacher.predictor.sam_prompt_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        teacher.predict(state, Prompts(boxes2d=[[3, 10, 12, 40, 44]], points=[[3, 30, 50]], point_labels=[0]))
        teacher.predict(teacher.prepare(np.zeros((4, 32, 64), np.float32)), Prompts(points=[[1, 10, 16]], point_labels=[1]))
    finally:
        handle.remove()
    prompted = [entry for entry in seen if entry[1] != [-1]]  # tracked frames get a padding point -1
    assert len(prompted) == 2
    coords, labels = prompted[0]  # the key slice: box corners (x0, y0), (x1, y1), then the point (x, y)
    assert labels == [2, 3, 0]
    np.testing.assert_allclose(coords, [[24, 20], [88, 80], [100, 60]])  # 64 -> 128 frames
    coords, labels = prompted[1]  # a 32 x 64 (y, x) slice stretched to 128 x 128
    assert labels == [1]
    np.testing.assert_allclose(coords, [[32, 40]])


def test_mask_prompt_is_kept_on_its_slice():
    t = make_teacher()
    force_objects(t)
    label = blob_label(SHAPE, radius=14.0)
    key = int(np.argmax(label.sum(axis=(1, 2))))
    prob = t.predict(t.prepare(phantom()), Prompts(mask=label.astype(np.float32)))
    got = prob[key] > 0.5
    iou = (got & (label[key] > 0)).sum() / (got | (label[key] > 0)).sum()
    assert iou > 0.9


def test_bad_prompts_and_inputs_are_refused(teacher, state):
    with pytest.raises(ValueError, match="needs a prompt"):
        teacher.predict(state, Prompts())
    with pytest.raises(ValueError, match="negative points alone"):
        teacher.predict(state, Prompts(points=[[3, 5, 5]], point_labels=[0]))
    with pytest.raises(ValueError, match="outside the volume"):
        teacher.predict(state, Prompts(points=[[3, 70, 5]], point_labels=[1]))
    with pytest.raises(ValueError, match="differs from the volume"):
        teacher.predict(state, Prompts(mask=np.ones((8, 32, 32), np.float32)))
    with pytest.raises(TypeError, match="state returned by prepare"):
        teacher.predict({"images": None}, BOX)
    with pytest.raises(ValueError, match=r"\(z, y, x\) volume"):
        teacher.prepare(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        teacher.prepare(np.full(SHAPE, np.nan, np.float32))


def test_no_files_are_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = make_teacher()
    t.predict(t.prepare(phantom()), Prompts.from_mask(blob_label(SHAPE, radius=14.0)))
    assert os.listdir(tmp_path) == []


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, teacher, state):
    path = tmp_path / "medsam2_small.pt"
    torch.save({"model": teacher.predictor.state_dict()}, path)
    loaded = make_teacher(seed=123, checkpoint=path)  # other random init, overwritten by the file
    np.testing.assert_array_equal(teacher.predict(state, BOX), loaded.predict(loaded.prepare(phantom()), BOX))


class Payload:  # a pickled object that weights_only loading must refuse
    pass


def test_checkpoint_refusals(tmp_path, teacher):
    sd = teacher.predictor.state_dict()
    missing = {k: v for k, v in sd.items() if k != "no_mem_embed"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="1 missing .*no_mem_embed"):
        make_teacher(checkpoint=tmp_path / "missing.pt")
    wrong = dict(sd, maskmem_tpos_enc=torch.zeros(3, 1, 1, 32))
    torch.save({"model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="other shapes .*maskmem_tpos_enc"):
        make_teacher(checkpoint=tmp_path / "wrong.pt")
    torch.save({"model": sd, "extra": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        make_teacher(checkpoint=tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="not found"):
        make_teacher(checkpoint=tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        MedSAM2Teacher()  # the full model never runs on random weights by accident
    with pytest.raises(CheckpointError, match="does not fit"):  # a small checkpoint for the full model
        MedSAM2Teacher(checkpoint=tmp_path / "missing.pt")


def test_full_architecture_has_the_sam21_hiera_tiny_layout():
    """MedSAM2 checkpoints are SAM2.1 hiera-tiny state dicts: the 512 model must have exactly
    the keys and shapes of sam2's own 1024 hiera-tiny build."""
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    full = MedSAM2Teacher(random_init=True)
    assert full.image_size == 512 and full.predictor.image_size == 512
    attn = full.predictor.memory_attention.layers[0].self_attn
    assert len(full.predictor.memory_attention.layers) == 4 and attn.freqs_cis.shape[0] == 32 * 32
    base = OmegaConf.load(os.path.join(sam2.__path__[0], "configs", "sam2.1", "sam2.1_hiera_t.yaml"))
    ref = instantiate(base.model, _recursive_=True).state_dict()
    own = full.predictor.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert len(own) == 471 and sum(p.numel() for p in full.predictor.parameters()) == 38_962_498


@pytest.mark.skipif(os.environ.get("SEMISAM_BENCHMARK") != "1", reason="benchmark: set SEMISAM_BENCHMARK=1")
def test_benchmark_full_size_propagation(capsys):
    """Time per slice of the full hiera-tiny 512 model (random weights) on this machine."""
    full = MedSAM2Teacher(random_init=True)
    st = full.prepare(phantom((6, 64, 64)))
    full.predict(st, Prompts(boxes2d=[[2, 18, 20, 45, 44]]))  # warm-up
    start = time.perf_counter()
    full.predict(st, Prompts(boxes2d=[[2, 18, 20, 45, 44]]))
    per_slice = (time.perf_counter() - start) / 6
    with capsys.disabled():
        print(f"\nMedSAM2 full hiera-tiny 512, {torch.get_num_threads()} threads: {per_slice:.2f} s per slice")
