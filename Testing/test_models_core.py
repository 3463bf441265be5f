"""Checkpoints, encoders and their cache, the Slicing-SAM3D student, `semisam segment`."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from semisam.cli import main
from semisam.inference import segment_volume
from semisam.models.checkpoints import CheckpointError, load_state_dict, load_strict, require_file
from semisam.models.encoders import EmbeddingCache, build_sam_vit, litemedsam_checkpoint, sam_encoder
from semisam.models.student import SlicingSAM3D, StudentConfig, load_student
from semisam.phantom import make_phantom
from semisam.preprocess import PreprocessConfig, apply_to_label, preprocess
from semisam.volume import read_volume, write_volume


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/semisam_pwned",))


@pytest.fixture(scope="module")
def small_sam():
    return sam_encoder(build_sam_vit(small=True, seed=0), "sam-small")


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_refusals(tmp_path):
    model = SlicingSAM3D(StudentConfig(channels=(8, 4)))
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    load_strict(SlicingSAM3D(StudentConfig(channels=(8, 4))), load_state_dict(good), good, "student")
    state = model.state_dict()
    missing = dict(state)
    missing.pop("head.weight")
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: does not fit model 'student': 1 missing \(e\.g\. head\.weight\)"):
        load_strict(model, load_state_dict(tmp_path / "missing.pt"), tmp_path / "missing.pt", "student")
    wrong = dict(state)
    wrong["head.weight"] = torch.zeros(3, 4, 1, 1, 1)
    torch.save({"model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"other shapes \(e\.g\. head\.weight: file \(3, 4, 1, 1, 1\), model \(1, 4, 1, 1, 1\)\)"):
        load_strict(model, load_state_dict(tmp_path / "wrong.pt"), tmp_path / "wrong.pt", "student")
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"model": RunsCode()}, fh)
    torch.save({"model": {"x": RunsCode()}}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="evil2.pt: refused: the file holds Python objects other than tensors, which could run code"):
        load_state_dict(tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="evil.pt: is not a readable PyTorch checkpoint"):  # a bare pickle
        load_state_dict(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_student(tmp_path / "evil2.pt")
    assert not os.path.exists("/tmp/semisam_pwned")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt: is not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint for 'sam-med3d' not found .get it from the SAM-Med3D"):
        require_file(tmp_path / "nope.pth", "sam-med3d", "the SAM-Med3D release")
    with pytest.raises(CheckpointError, match="sha256 .* differs"):
        require_file(good, "x", "y", sha256="0" * 64)


def test_shipped_litemedsam_is_sha256_checked():
    path = litemedsam_checkpoint()
    assert path.name == "lite_medsam.pth" and path.stat().st_size > 30_000_000


def test_student_checkpoint_round_trip_and_refusal(tmp_path):
    model = SlicingSAM3D(StudentConfig(channels=(8, 4), num_labels=2, encoder="sam-small"))
    model.save(tmp_path / "s.pt", extra={"preprocess": PreprocessConfig().to_dict(), "best_dice": np.float64(0.91), "curve": np.arange(3)})
    again, extra = load_student(tmp_path / "s.pt")
    assert again.config == model.config and "preprocess" in extra
    assert extra["best_dice"] == 0.91 and extra["curve"] == [0, 1, 2]  # numpy values stored as plain ones
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a SemiSAM student checkpoint"):
        load_student(tmp_path / "plain.pt")


# -- encoders and cache -------------------------------------------------------------------------


def test_cache_embeds_each_slice_once(small_sam, tmp_path):
    image = np.random.default_rng(0).random((6, 40, 40)).astype(np.float32)
    cache = EmbeddingCache(tmp_path / "cache")
    part = cache.embed(image, small_sam, slices=[1, 3])
    assert cache.encoded_slices == 2 and part.dtype == torch.float16 and part.shape == (6, 256, 16, 16)
    full = cache.embed(image, small_sam)
    assert cache.encoded_slices == 6  # only the 4 missing slices were added
    cache.embed(image, small_sam)
    assert cache.encoded_slices == 6
    direct = small_sam.encode(image)
    torch.testing.assert_close(full.float(), direct, atol=2e-2, rtol=1e-2)  # fp16 storage
    # a new cache over the same folder reads the disk copy, encodes nothing
    other = EmbeddingCache(tmp_path / "cache")
    torch.testing.assert_close(other.embed(image, small_sam), full)
    assert other.encoded_slices == 0
    # other voxels, other key
    other.embed(image[:, ::-1].copy(), small_sam)
    assert other.encoded_slices == 6


def test_encoder_normalises_like_sam(small_sam):
    x = torch.full((1, 40, 40), 0.5)
    inp = small_sam.to_input(x)
    assert inp.shape == (1, 3, 256, 256)
    expected = (127.5 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(inp[0, :, 0, 0], expected)


# -- student --------------------------------------------------------------------------------


def test_student_upsamples_in_plane_only():
    model = SlicingSAM3D(StudentConfig(channels=(16, 8, 4)))
    emb = torch.randn(2, 256, 7, 16, 16)
    assert model(emb, (64, 64)).shape == (2, 1, 7, 64, 64)
    assert model(emb, (50, 30)).shape == (2, 1, 7, 50, 30)
    # each output slice depends only on a few neighbouring input slices (no depth resampling)
    emb2 = emb.clone()
    emb2[:, :, 0] += 5.0
    diff = (model(emb2, (32, 32)) - model(emb, (32, 32))).abs().amax(dim=(0, 1, 3, 4))
    assert diff[0] > 0 and torch.all(diff[4:] == 0)  # 3 conv layers of kernel 3 reach 3 slices


def test_blockwise_inference_matches_one_block():
    torch.manual_seed(0)
    model = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=64))
    emb = torch.randn(256, 12, 16, 16)
    whole = model.infer(emb, (32, 32))
    with torch.no_grad():
        direct = torch.sigmoid(model(emb[None], (32, 32)))[0]
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=1e-5)
    model.config.block_depth = 8  # overlapping blocks, blended along depth only
    blocks = model.infer(emb, (32, 32))
    assert blocks.shape == whole.shape
    assert float((blocks - whole).abs().mean()) < 2e-3 and float((blocks - whole).abs().max()) < 0.05


def test_image_branch_reads_the_image_at_full_resolution():
    torch.manual_seed(0)
    model = SlicingSAM3D(StudentConfig(embed_dim=16, channels=(8, 4), block_depth=64, image_channels=4)).eval()
    emb = torch.randn(16, 12, 8, 8)
    image = torch.rand(12, 24, 24)
    whole = model.infer(emb, (24, 24), image=image)
    with torch.no_grad():
        direct = torch.sigmoid(model(emb[None], None, image[None, None]))[0]
        assert direct.shape == (1, 12, 24, 24)  # out_size defaults to the image's
        # one changed pixel changes the output around it, at full resolution
        image2 = image.clone()
        image2[5, 10, 10] += 1.0
        diff = (torch.sigmoid(model(emb[None], (24, 24), image2[None, None]))[0] - direct).abs()[0]
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=1e-5)
    changed = torch.nonzero(diff > 0)
    assert len(changed) > 0 and changed[:, 1].min() >= 10 - 3 and changed[:, 1].max() <= 10 + 3
    model.config.block_depth = 6  # blocks cut the image along depth like the embeddings
    blocks = model.infer(emb, (24, 24), image=image)
    assert float((blocks - whole).abs().mean()) < 2e-3
    # tell the caller what is missing or mismatched
    with pytest.raises(ValueError, match="image branch"):
        model.infer(emb, (24, 24))
    with pytest.raises(ValueError, match="does not match"):
        model.infer(emb, (24, 24), image=torch.rand(11, 24, 24))
    with pytest.raises(ValueError, match="out_size"):
        model(emb[None], (32, 32), image[None, None])
    with pytest.raises(ValueError, match="image_channels"):
        StudentConfig(image_channels=-1)


def test_image_branch_student_round_trips(tmp_path):
    model = SlicingSAM3D(StudentConfig(embed_dim=16, channels=(8, 4), image_channels=4))
    model.save(tmp_path / "s.pt")
    again, _ = load_student(tmp_path / "s.pt")
    assert again.uses_image and again.config.image_channels == 4
    emb, image = torch.randn(16, 5, 8, 8), torch.rand(5, 16, 16)
    torch.testing.assert_close(again.infer(emb, (16, 16), image=image), model.infer(emb, (16, 16), image=image))


def test_student_trains_on_a_phantom(small_sam):
    case = make_phantom(3, (64, 64, 64))
    config = PreprocessConfig(target_shape=(24, 64, 64), target_spacing=(0.8, 0.8, 0.8))
    pre, record = preprocess(case.image, config)
    label = torch.from_numpy(apply_to_label(record, case.label).array > 0).float()[None, None]
    emb = EmbeddingCache().embed(pre.array, small_sam).float().permute(1, 0, 2, 3)[None]
    torch.manual_seed(0)
    model = SlicingSAM3D(StudentConfig(channels=(32, 16, 8), encoder="sam-small"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=True)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(emb, pre.shape[1:]), label)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3]), losses  # Dice + CE keeps falling


def test_segment_volume_writes_on_the_input_grid(small_sam, tmp_path):
    case = make_phantom(4, (32, 40, 40))
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=8, encoder="sam-small"))
    config = PreprocessConfig(target_shape=(16, 48, 48), target_spacing=(1.0, 1.0, 1.0))
    result = segment_volume(case.image, student, small_sam, config, uncertainty=True)
    for vol in (result.label, result.probability, result.uncertainty):
        assert vol.same_grid(case.image, tol=1e-9)
    assert result.label.array.dtype == np.uint8
    assert float(result.uncertainty.array.max()) > 0.0
    with pytest.raises(ValueError, match="trained on 'litemedsam' embeddings"):
        segment_volume(case.image, SlicingSAM3D(), small_sam, config)



def test_segment_volume_applies_the_students_threshold(small_sam):
    from semisam.inference import recorded_threshold

    case = make_phantom(4, (32, 40, 40))
    torch.manual_seed(0)
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=8, encoder="sam-small"))
    config = PreprocessConfig(target_shape=(16, 48, 48), target_spacing=(1.0, 1.0, 1.0))
    half = segment_volume(case.image, student, small_sam, config)
    prob = half.probability.array
    assert np.array_equal(half.label.array, (prob > 0.5).astype(np.uint8))
    lo, hi = (float(q) for q in np.quantile(prob[prob > 0], [0.3, 0.7]))  # cuts through this model's probabilities
    assert 0.0 < lo < hi < 1.0
    at_lo = segment_volume(case.image, student, small_sam, config, threshold=lo)
    at_hi = segment_volume(case.image, student, small_sam, config, threshold=hi)
    assert np.array_equal(at_lo.label.array, (prob > lo).astype(np.uint8))
    assert np.array_equal(at_hi.label.array, (prob > hi).astype(np.uint8))
    assert at_lo.label.array.sum() > at_hi.label.array.sum()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            segment_volume(case.image, student, small_sam, config, threshold=bad)
    assert recorded_threshold({}) == 0.5
    assert recorded_threshold({"postprocess": {"largest_component": True}}) == 0.5
    assert recorded_threshold({"postprocess": {"threshold": 0.35}}) == 0.35


@pytest.mark.slow
def test_segment_command_with_the_real_encoder(tmp_path, capsys):
    # A student on the real LiteMedSAM encoder (few slices to keep the CPU time small).
    case = make_phantom(8, (24, 48, 48))
    write_volume(case.image, tmp_path / "in.nrrd")
    config = PreprocessConfig(target_shape=(4, 64, 64), target_spacing=(1.2, 1.2, 1.2))
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=4))
    student.save(tmp_path / "student.pt", extra={"preprocess": config.to_dict()})
    args = ["segment", str(tmp_path / "in.nrrd"), str(tmp_path / "out.nii.gz"), "--checkpoint", str(tmp_path / "student.pt"), "--uncertainty", str(tmp_path / "unc.nrrd")]
    assert main(args) == 0
    assert "foreground voxels" in capsys.readouterr().out
    out = read_volume(tmp_path / "out.nii.gz", "label")
    assert out.same_grid(case.image)
    assert read_volume(tmp_path / "unc.nrrd").same_grid(case.image)
    assert main(["segment", str(tmp_path / "in.nrrd"), str(tmp_path / "o.xyz"), "--checkpoint", str(tmp_path / "student.pt")]) == 2
    assert "unknown file extension" in capsys.readouterr().err


def test_models_command(capsys):
    assert main(["models", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in doc["models"]}
    assert names["litemedsam"]["present"] and names["litemedsam"]["sha256"]
    for name in ("medsam-vit-b", "sam-med3d", "medsam2"):
        assert name in names and names[name]["obtain"]
    assert main(["models"]) == 0
    assert "litemedsam" in capsys.readouterr().out


def test_build_model_finds_or_refuses_user_checkpoints(tmp_path, monkeypatch):
    from semisam.errors import SemiSAMError
    from semisam.models.registry import build_model
    from semisam.models.teacher_medsam2 import MedSAM2Teacher

    monkeypatch.setenv("SEMISAM_MODELS", str(tmp_path))
    for name, file in (("sam-med3d", "sam_med3d.pth"), ("medsam2", "MedSAM2_latest.pt"), ("medsam-vit-b", "medsam_vit_b.pth")):
        with pytest.raises(CheckpointError, match=rf"{file}: checkpoint for '{name}' not found \(get it from"):
            build_model(name)
    with pytest.raises(SemiSAMError, match="unknown model 'nope'"):
        build_model("nope")
    # a file in the models folder is found and checked against the real architecture
    small = MedSAM2Teacher(small=True)
    torch.save({"model": small.predictor.state_dict()}, tmp_path / "MedSAM2_latest.pt")
    with pytest.raises(CheckpointError, match="MedSAM2_latest.pt: does not fit model 'medsam2'"):
        build_model("medsam2")


def test_fast_encoder_matches_the_plain_one():
    from semisam.models.encoders import fast_encoder, litemedsam_encoder

    plain = litemedsam_encoder()
    fast = fast_encoder(plain)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.module.modules())  # folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.module.modules())  # original untouched
    assert fast.cache_id != plain.cache_id
    slices = np.random.default_rng(0).random((2, 96, 96)).astype(np.float32)
    a, b = plain.encode(slices).flatten(1), fast.encode(slices, batch_size=2).flatten(1)
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.99
    exact = fast_encoder(plain, precision="fp32")  # folding alone changes only rounding
    torch.testing.assert_close(exact.encode(slices), plain.encode(slices), atol=2e-3, rtol=1e-3)


def test_fixed_batch_padding_keeps_results(small_sam):
    # compiled encoders see one batch shape only; the padding must not change any embedding
    from dataclasses import replace

    padded = replace(small_sam, fixed_batch=4)
    slices = np.random.default_rng(2).random((6, 32, 32)).astype(np.float32)
    torch.testing.assert_close(padded.encode(slices, batch_size=2), small_sam.encode(slices, batch_size=6), atol=1e-4, rtol=1e-4)


def test_medsam_gets_unit_inputs_and_sam_gets_its_normalisation():
    net = build_sam_vit(small=True, seed=0)
    medsam, sam = sam_encoder(net, "medsam-vit-b"), sam_encoder(net, "sam-vit-b")
    x = torch.full((1, 40, 40), 0.25)
    assert torch.allclose(medsam.to_input(x), torch.full((1, 3, 256, 256), 0.25))  # MedSAM: [0, 1] as is
    assert not torch.allclose(sam.to_input(x), medsam.to_input(x))
    assert medsam.cache_id != sam.cache_id  # cached embeddings never mix


def test_student_refuses_embeddings_of_other_weights(small_sam):
    other = sam_encoder(build_sam_vit(small=True, seed=5), "sam-small")
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), encoder="sam-small", encoder_id=small_sam.weights_id))
    case = make_phantom(4, (16, 24, 24))
    config = PreprocessConfig(target_shape=(8, 32, 32), target_spacing=(1.0, 1.0, 1.0))
    segment_volume(case.image, student, small_sam, config)  # the right weights: fine
    with pytest.raises(ValueError, match="embeddings of other 'sam-small' weights"):
        segment_volume(case.image, student, other, config)


def test_prompts_outside_the_volume_are_refused():
    from semisam.models.prompts import Prompts

    with pytest.raises(ValueError, match="2D box .* lies outside the volume"):
        Prompts(boxes2d=[[1, 0, 0, 50, 10]]).validate((4, 32, 32))
    with pytest.raises(ValueError, match="3D box"):
        Prompts(box3d=(0, 0, 0, 40, 5, 5)).validate((4, 32, 32))  # x, y, z order by mistake
    Prompts(boxes2d=[[3, 0, 0, 31, 31]], box3d=(0, 0, 0, 3, 31, 31)).validate((4, 32, 32))


def test_litemedsam_runs_at_another_input_size_with_the_same_weights():
    from semisam.models.encoders import _tinyvit_at, build_litemedsam, litemedsam_encoder

    net = build_litemedsam()
    slices = np.random.default_rng(1).random((2, 96, 96)).astype(np.float32)
    native = litemedsam_encoder(net)
    # the rebuilt TinyViT reproduces the vendored forward exactly at the native side
    x = native.to_input(torch.from_numpy(slices))
    with torch.inference_mode():
        torch.testing.assert_close(_tinyvit_at(net.image_encoder, 256)(x), net.image_encoder(x), atol=0, rtol=0)
    small = litemedsam_encoder(net, input_size=128)
    assert small.input_size == 128 and small.module.vit is not net.image_encoder
    assert small.cache_id == native.cache_id + "-in128" and small.weights_id != native.weights_id
    for k, v in net.image_encoder.state_dict().items():  # same weights, copied
        torch.testing.assert_close(small.module.vit.state_dict()[k], v, atol=0, rtol=0)
    emb = small.encode(slices)
    assert emb.shape == (2, 256, 32, 32) and torch.isfinite(emb).all()
    # the embedding of a downsized slice is the embedding of the same picture, not noise:
    # pooled to 32 x 32, the native embedding points the same way
    pooled = torch.nn.functional.avg_pool2d(native.encode(slices), 2)
    cos = torch.nn.functional.cosine_similarity(emb.flatten(2), pooled.flatten(2), dim=1)
    assert float(cos.mean()) > 0.5, float(cos.mean())
    for bad in (100, 32, 1024):
        with pytest.raises(ValueError, match="multiple of 32"):
            litemedsam_encoder(net, input_size=bad)


def test_a_student_trained_at_another_input_size_gets_that_encoder_back(tmp_path):
    from semisam.inference import Segmenter, student_encoder
    from semisam.models.encoders import litemedsam_encoder

    enc = litemedsam_encoder(input_size=128)
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=4, encoder_id=enc.weights_id, encoder_input_size=128))
    config = PreprocessConfig(target_shape=(4, 48, 48), target_spacing=(1.2, 1.2, 1.2))
    student.save(tmp_path / "student.pt", extra={"preprocess": config.to_dict()})
    loaded, _ = load_student(tmp_path / "student.pt")
    assert loaded.config.encoder_input_size == 128
    assert student_encoder(loaded).input_size == 128
    case = make_phantom(9, (16, 40, 40))
    seg = Segmenter(tmp_path / "student.pt").segment(case.image)
    assert seg.label.same_grid(case.image)
    with pytest.raises(ValueError, match="other 'litemedsam' weights"):  # a 256 encoder is refused
        segment_volume(case.image, loaded, litemedsam_encoder(), config)
