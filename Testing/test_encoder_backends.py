"""The compiler-free encoder runtimes (semisam.models.backends): export once, load, agree with
eager PyTorch within the stated tolerance, keep their embeddings apart in the cache, and fall
back to torch when a runtime is absent or broken. Small random-weight LiteMedSAM at 64 px."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from semisam.errors import Cancelled
from semisam.models import backends
from semisam.models.backends import BackendError, accelerated_encoder, resolve, runtime_encoder
from semisam.models.encoders import EmbeddingCache, bf16_supported, build_litemedsam, fast_encoder, litemedsam_encoder

RUNTIMES = [b for b in ("openvino", "onnxruntime") if backends.installed(b)]


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return litemedsam_encoder(build_litemedsam(pretrained=False), input_size=64)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(1)
    base = rng.random((3, 40, 52)).astype(np.float32)
    base[:, 10:30, 15:40] += 0.5  # some structure, not only noise
    return np.clip(base, 0, 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double())


@pytest.mark.parametrize("backend", RUNTIMES)
def test_export_load_and_fp32_agreement(plain, root, slices, backend, monkeypatch):
    ref = plain.encode(slices)
    enc = runtime_encoder(plain, backend, "fp32", root)
    assert torch.equal(plain.encode(slices), ref)  # exporting left the torch module as it was
    assert enc.cache_id == f"{plain.cache_id}:fast-{backend}-fp32" and enc.weights_id == plain.weights_id
    out = enc.encode(slices, batch_size=2)  # batches of 2 go through the 1-slice graph one by one
    assert out.shape == ref.shape
    assert float(cosine(out, ref).min()) >= 0.9999
    assert float((out - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    # A second load reuses the export on disk: exporting again would fail here.
    monkeypatch.setattr(backends, "_export", lambda *a: pytest.fail("exported twice"))
    again = runtime_encoder(plain, backend, "fp32", root)
    assert torch.equal(again.encode(slices[:1]), out[:1])


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="openvino is not installed")
def test_openvino_precisions(plain, root, slices):
    assert runtime_encoder(plain, "openvino", "auto", root).cache_id.endswith(":fast-openvino-fp32")  # auto stays within tolerance
    if not bf16_supported():
        with pytest.raises(BackendError, match="no native bf16"):
            runtime_encoder(plain, "openvino", "bf16", root)
        return
    enc = runtime_encoder(plain, "openvino", "bf16", root)
    assert enc.cache_id.endswith(":fast-openvino-bf16-mixed")  # TinyViT's first stage in fp32, the rest bf16
    ref = plain.encode(slices)
    cos = float(cosine(enc.encode(slices), ref).min())
    assert 0.995 <= cos < 0.99999  # bf16 rounding shows; it is opt-in for that reason


def test_embeddings_of_different_backends_and_precisions_never_mix(plain, root, slices, tmp_path):
    encoders = [fast_encoder(plain, precision="fp32"), fast_encoder(plain, precision="bf16")]
    encoders += [runtime_encoder(plain, b, "fp32", root) for b in RUNTIMES]
    if "openvino" in RUNTIMES and bf16_supported():
        encoders.append(runtime_encoder(plain, "openvino", "bf16", root))  # same export, another precision
    image = slices[:2]
    keys = {EmbeddingCache.key(image, e) for e in encoders}
    assert len(keys) == len(encoders), [e.cache_id for e in encoders]
    assert {e.weights_id for e in encoders} == {plain.weights_id}  # one student runs on any of them
    cache = EmbeddingCache(tmp_path)
    first = {e.cache_id: cache.embed(image, e).clone() for e in encoders}
    assert cache.encoded_slices == 2 * len(encoders)  # nothing reused across paths
    reread = EmbeddingCache(tmp_path)
    for e in encoders:  # each one's own entry comes back from disk, untouched by the others
        assert torch.equal(reread.embed(image, e), first[e.cache_id])
    assert reread.encoded_slices == 0


def test_absent_runtime_auto_is_torch_and_named_runtime_falls_back_or_fails(plain, root, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert not backends.installed("openvino") and not backends.installed("onnxruntime")
    assert resolve("auto", "cpu") == "torch"
    assert ":fast-openvino" not in accelerated_encoder(plain, "auto", root=root).cache_id
    with pytest.raises(BackendError, match=r"pip install openvino==.*or choose the torch backend"):
        accelerated_encoder(plain, "openvino", root=root)
    said = []
    enc = accelerated_encoder(plain, "openvino", precision="fp32", root=root, fallback=said.append)
    assert enc.cache_id == f"{plain.cache_id}:fast-fp32"  # the torch path
    assert len(said) == 1 and "openvino unavailable" in said[0] and "using torch" in said[0]


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="onnxruntime is not installed")
def test_a_runtime_that_fails_to_load_falls_back_with_one_message(plain, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated: the runtime failed to load")

    monkeypatch.setattr(backends._OnnxRuntimeRunner, "__init__", broken)
    said = []
    enc = accelerated_encoder(plain, "onnxruntime", precision="fp32", root=tmp_path, fallback=said.append)
    assert enc.cache_id == f"{plain.cache_id}:fast-fp32"
    assert len(said) == 1 and "simulated" in said[0] and "using torch" in said[0]
    with pytest.raises(BackendError, match="could not load"):
        accelerated_encoder(plain, "onnxruntime", root=tmp_path)


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="onnxruntime is not installed")
def test_a_damaged_export_is_made_again(plain, tmp_path, slices):
    enc = runtime_encoder(plain, "onnxruntime", "fp32", tmp_path)
    folder = backends.export_dir(plain, "onnxruntime", tmp_path)
    (folder / "model.onnx").write_bytes(b"not a model")
    again = runtime_encoder(plain, "onnxruntime", "fp32", tmp_path)
    assert (folder / "model.onnx").stat().st_size > 1000
    assert torch.allclose(again.encode(slices[:1]), enc.encode(slices[:1]))


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="openvino is not installed")
def test_a_running_openvino_inference_is_cancelled(plain, root, slices):
    enc = runtime_encoder(plain, "openvino", "fp32", root)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # not before the first slice starts, then at the first poll

    with pytest.raises(Cancelled):
        enc.encode(slices, cancel=cancel)
    assert torch.allclose(enc.encode(slices[:1]), plain.encode(slices[:1]), atol=1e-3)  # the request is usable again


def test_bad_choices_are_refused_with_a_message(plain, root):
    with pytest.raises(ValueError, match="must be one of auto, torch, openvino, onnxruntime"):
        resolve("tensorrt")
    if "onnxruntime" in RUNTIMES:
        with pytest.raises(BackendError, match="fp32 only"):
            runtime_encoder(plain, "onnxruntime", "bf16", root)
    assert resolve("auto", "cuda") == "torch"


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="OpenVINO is not installed")
def test_training_follows_encoder_backend(tmp_path, slices):
    """encoder.backend in a training config: the student's encoder and a teacher's own encoder
    run on that runtime (converted beside the embedding cache), their embeddings agree with the
    torch path's, and encoder.compile means torch. The default stays torch."""
    from semisam.config import TeacherSection, TrainConfig
    from semisam.models.backends import model_cache_dir
    from semisam.training import build_encoder, build_teachers

    cfg = TrainConfig(dataset="unused")
    assert cfg.encoder.backend == "torch"
    cfg.encoder.input_size, cfg.encoder.precision = 64, "fp32"
    torch_encoder, _ = build_encoder(cfg, torch.device("cpu"))
    assert torch_encoder.cache_id.endswith(":fast-fp32")  # torch's own fast path
    cfg.encoder.backend = "openvino"
    cache = EmbeddingCache(tmp_path / "cache")
    encoder, net = build_encoder(cfg, torch.device("cpu"), model_cache_dir(cache.cache_dir))
    assert encoder.cache_id.endswith(":fast-openvino-fp32")
    assert any((tmp_path / "cache" / "encoders").glob("litemedsam-64-openvino-*/meta.json"))
    c = cosine(encoder.encode(slices), torch_encoder.encode(slices))
    assert float(c.min()) >= 0.999, c
    cfg.pseudo.teachers = [TeacherSection(), TeacherSection(input_size=128)]
    shared, own = build_teachers(cfg, encoder, net, cache, torch.device("cpu"))
    assert shared.encoder is encoder
    assert own.encoder.input_size == 128 and own.encoder.cache_id.endswith(":fast-openvino-fp32")
    cfg.encoder.compile = True  # compiling is torch's: with auto the runtime is not used (nothing is compiled until a call)
    with pytest.raises(BackendError, match="choose backend torch or auto"):
        build_encoder(cfg, torch.device("cpu"))  # a named runtime: refused
    cfg.encoder.backend = "auto"
    compiled, _ = build_encoder(cfg, torch.device("cpu"))
    assert "openvino" not in compiled.cache_id and compiled.cache_id.endswith(":fast-fp32")
