"""Compiler-free runtimes for the frozen slice encoder: OpenVINO and ONNX Runtime.

Slicer's Python on Windows and macOS has no C++ compiler, so ``torch.compile`` is not an
option there; these runtimes ship prebuilt kernels in their wheels. The encoder's graph is
exported once per (weights, input side, normalisation, runtime) and kept on disk
(:func:`model_cache_dir`: ``<embedding cache>/encoders``, else ``$SEMISAM_CACHE/encoders``,
else ``~/.semisam/cache/encoders``); later processes only load it (about a second).

* ``openvino``: the torch module exported to ONNX (``torch.onnx.export``, TorchScript
  exporter), converted by ``openvino.convert_model`` and saved as IR (fp32 weights); the
  precision is chosen when it is compiled for the CPU. ``fp32`` (the default, ``auto``):
  embeddings at cosine >= 0.99999 to eager PyTorch fp32. ``bf16`` (opt-in, CPUs with native
  bf16): LiteMedSAM's first stage stays fp32 (see :func:`_parts`), the rest runs in bf16;
  1.3-1.8x faster than fp32 (BENCHMARKS.md) but measured at cosine 0.9988-0.9992 to fp32 on phantom and HC18 slices
  (``scripts/bench_encoder.py``), below the 0.999 kept for caches and students, so it is never
  chosen by itself. A running inference can be cancelled (:meth:`_OpenVINORunner.run`), which
  the Segment Editor's prefetch uses so that a click never waits for it.
* ``onnxruntime``: ``torch.onnx.export`` (TorchScript exporter) and an ONNX Runtime CPU
  session, fp32 only.
* ``torch``: :func:`~semisam.models.encoders.fast_encoder` (eager PyTorch, optionally
  ``torch.compile``).

Slices go through the runtime one at a time (static 1-slice graphs: no shape-dependent
recompilation, and each slice can be abandoned on its own).

Embeddings of a runtime get their own cache id (``<weights id>:fast-<backend>-<precision>``),
so an :class:`~semisam.models.encoders.EmbeddingCache` never mixes them with another path's;
the weights id before ``:fast-`` is unchanged, so students trained on one path run on another
(tolerance: cosine similarity >= 0.999 to eager fp32 PyTorch, tested).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import Cancelled, SemiSAMError
from .encoders import SliceEncoder, fast_encoder

#: Every backend, and the choices of ``encoder.backend`` / ``--backend``.
BACKENDS = ("torch", "openvino", "onnxruntime")
CHOICES = ("auto",) + BACKENDS
#: What ``auto`` takes on a CPU: the first of these that is installed, else torch. Measured on
#: 2 Zen 4 cores (BENCHMARKS.md): OpenVINO fp32 the fastest within the tolerance; ONNX Runtime
#: (fp32) no faster than torch's own path, so auto never picks it.
AUTO_ORDER = ("openvino",)
#: Bumped whenever the export changes (graph, inputs, file layout): old exports are not reused.
EXPORT_VERSION = "x2"
#: Packages each runtime needs, with the pip line to install them.
PACKAGES = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx")}
INSTALL = {"openvino": "pip install openvino==2026.4.1 onnx==1.23.2", "onnxruntime": "pip install onnxruntime==1.31.1 onnx==1.23.2"}
#: Milliseconds between checks of ``cancel()`` while OpenVINO runs a slice.
POLL_MS = 5


class BackendError(SemiSAMError):
    """A backend that cannot be used here (not installed, failed to export or load, or an
    unsupported precision)."""


def installed(backend: str) -> bool:
    """Whether the backend's packages import here (torch always does)."""
    if backend == "torch":
        return True
    if backend not in PACKAGES:
        raise ValueError(f"unknown encoder backend {backend!r}; choose one of {', '.join(CHOICES)}")
    try:
        for name in PACKAGES[backend]:
            importlib.import_module(name)
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def resolve(backend: str, device: str | torch.device = "cpu") -> str:
    """The backend ``backend`` means on ``device``: ``auto`` is torch on CUDA, else the first
    installed of :data:`AUTO_ORDER`, else torch. Other names are returned as they are."""
    if backend not in CHOICES:
        raise ValueError(f"encoder backend must be one of {', '.join(CHOICES)}, got {backend!r}")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cpu":
        return "torch"
    return next((b for b in AUTO_ORDER if installed(b)), "torch")


def model_cache_dir(embedding_cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """Where converted encoders are kept: beside the embedding cache when it is on disk, else
    ``$SEMISAM_CACHE/encoders`` (default ``~/.semisam/cache/encoders``)."""
    if embedding_cache_dir is not None:
        return Path(embedding_cache_dir) / "encoders"
    root = os.environ.get("SEMISAM_CACHE") or Path.home() / ".semisam" / "cache"
    return Path(root).expanduser() / "encoders"


def export_dir(encoder: SliceEncoder, backend: str, root: os.PathLike | str) -> Path:
    """The folder of one export: weights + normalisation + input side (all in the encoder's
    cache id, plus the side itself), the backend and :data:`EXPORT_VERSION`."""
    key = hashlib.sha256(f"{encoder.cache_id}|{encoder.input_size}|{backend}|{EXPORT_VERSION}".encode()).hexdigest()[:16]
    return Path(root) / f"{encoder.name}-{encoder.input_size}-{backend}-{key}"


# --------------------------------------------------------------------------------------------
# Export (once) and load
# --------------------------------------------------------------------------------------------


class _TinyViTHead(torch.nn.Module):
    """LiteMedSAM's TinyViT up to its first stage: patch embedding (two stride-2 convolutions)
    and the MBConv stage, on full-resolution feature maps."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.layers[0](self.vit.patch_embed(x))


class _TinyViTTail(torch.nn.Module):
    """The rest of LiteMedSAM's TinyViT: the attention stages and the neck (as ``forward_features``)."""

    def __init__(self, vit: torch.nn.Module, grid: int):
        super().__init__()
        self.vit, self.grid = vit, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.vit.layers[1:]:
            x = layer(x)
        b, _, c = x.shape
        return self.vit.neck(x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2))


def _parts(encoder: SliceEncoder):
    """The graphs an encoder is exported as: ``[(name, module, always fp32)]``.

    LiteMedSAM's TinyViT is split after its first stage. Its patch embedding and MBConv stage
    (15 % of the FLOPs) are the part whose bf16 rounding moved the embeddings most when each
    stage was tried alone in bf16 during development, so ``bf16`` runs the first part in fp32
    always (``scripts/bench_encoder.py`` reports the resulting cosine)."""
    vit = getattr(encoder.module, "vit", encoder.module)
    if all(hasattr(vit, a) for a in ("patch_embed", "layers", "neck")) and len(vit.layers) > 1:
        # eval(): torch.onnx.export restores a wrapper's training flag on all its children
        # afterwards, and BatchNorm in training mode would rewrite its statistics
        return [("head", _TinyViTHead(vit).eval(), True), ("tail", _TinyViTTail(vit, encoder.input_size // 4).eval(), False)]
    return [("model", encoder.module, False)]


def _export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the encoder's Python-side shape checks
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)


def _export(encoder: SliceEncoder, backend: str, folder: Path) -> list:
    """Write the graphs (``<part>.onnx``; for openvino converted to ``<part>.xml`` + ``.bin``);
    returns ``[[part, always fp32], ...]``. The TorchScript ONNX exporter is used for both
    runtimes (OpenVINO converts the ONNX file: about 3x faster than converting the torch module)."""
    parts = _parts(encoder) if backend == "openvino" else [("model", encoder.module, False)]
    x = torch.zeros((1, 3, encoder.input_size, encoder.input_size), dtype=torch.float32)
    out = []
    for name, module, fp32 in parts:
        _export_onnx(module, x, folder / f"{name}.onnx")
        if backend == "openvino":
            import openvino as ov

            ov.save_model(ov.convert_model(str(folder / f"{name}.onnx")), str(folder / f"{name}.xml"), compress_to_fp16=False)  # fp32 weights
            (folder / f"{name}.onnx").unlink()
        with torch.no_grad():
            x = module(x)
        out.append([name, fp32])
    return out


def export(encoder: SliceEncoder, backend: str, root: os.PathLike | str) -> Path:
    """Export ``encoder`` for ``backend`` under ``root`` unless it is already there; returns
    the export's folder. The folder is written under a temporary name and renamed when
    complete, so a crash or a concurrent process never leaves a half-written export."""
    if encoder.device.type != "cpu":
        raise BackendError(f"the {backend} backend runs on the CPU; export the encoder from a CPU copy (device 'cpu')")
    folder = export_dir(encoder, backend, root)
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        parts = _export(encoder, backend, tmp)
        meta = {"encoder": encoder.name, "cache_id": encoder.cache_id, "input_size": encoder.input_size, "backend": backend,
                "parts": parts, "export_version": EXPORT_VERSION, "torch": torch.__version__}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same export first: use theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


class _OpenVINORunner:
    """The compiled OpenVINO graphs of one export, run one after the other, with one inference
    request each (used from one thread)."""

    def __init__(self, folder: Path, precision: str, threads: int):
        import openvino as ov

        core = ov.Core()
        if precision == "auto":  # bf16 misses the 0.999 cosine tolerance on real images (module doc)
            precision = "fp32"
        if precision not in ("bf16", "fp32"):
            raise BackendError(f"the openvino backend runs in 'bf16' or 'fp32' (or 'auto'), not {precision!r}")
        self.requests, kinds = [], []
        for name, always_fp32 in _meta(folder)["parts"]:
            hint = "f32" if precision == "fp32" or always_fp32 else "bf16"
            config = {
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": int(threads),
                "CACHE_DIR": str(folder / "compiled"),  # the CPU plugin's compiled blobs: faster later loads
            }
            compiled = core.compile_model(str(folder / f"{name}.xml"), "CPU", config)
            actual = compiled.get_property("INFERENCE_PRECISION_HINT")
            if hint == "bf16" and actual != ov.Type.bf16:
                raise BackendError("this CPU has no native bf16: OpenVINO runs the encoder in fp32 here; choose precision fp32 or auto")
            kinds.append(hint)
            self.requests.append(compiled.create_infer_request())
        # what really runs: "bf16" (one graph), "bf16-mixed" (the first part in fp32), or "fp32"
        self.precision = "fp32" if "bf16" not in kinds else ("bf16" if "f32" not in kinds else "bf16-mixed")

    def run(self, x: np.ndarray, cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
        """One (1, 3, S, S) input -> its embedding. With ``cancel``, each graph runs
        asynchronously and is stopped within :data:`POLL_MS` ms once ``cancel()`` is True."""
        for request in self.requests:
            if cancel is None:
                x = request.infer({0: x}, share_inputs=False)[0].copy()
                continue
            request.start_async({0: x}, share_inputs=False)
            while not request.wait_for(POLL_MS):
                if cancel():
                    request.cancel()
                    try:
                        request.wait()
                    except RuntimeError:  # "Infer Request was canceled"
                        pass
                    raise Cancelled("encoding cancelled")
            x = request.get_output_tensor(0).data.copy()
        return x


class _OnnxRuntimeRunner:
    """An ONNX Runtime CPU session (fp32)."""

    def __init__(self, folder: Path, precision: str, threads: int):
        import onnxruntime as ort

        if precision not in ("auto", "fp32"):
            raise BackendError(f"the onnxruntime backend runs the encoder in fp32 only, not {precision!r}; choose precision fp32 or "
                               "auto, or the openvino backend for bf16")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.precision = "fp32"

    def run(self, x: np.ndarray, cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]


class RuntimeModule(torch.nn.Module):
    """A runtime model behind the ``nn.Module`` interface :class:`SliceEncoder` uses:
    (B, 3, S, S) float32 -> (B, C, G, G) float32, one slice at a time through the runtime."""

    def __init__(self, runner, backend: str):
        super().__init__()
        self.runner, self.backend = runner, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cancellable(x, None)

    def forward_cancellable(self, x: torch.Tensor, cancel: Optional[Callable[[], bool]]) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        outs = []
        for i in range(a.shape[0]):
            if cancel is not None and cancel():
                raise Cancelled("encoding cancelled")
            outs.append(self.runner.run(a[i : i + 1], cancel))
        return torch.from_numpy(np.concatenate(outs))


def runtime_encoder(encoder: SliceEncoder, backend: str, precision: str = "auto", root: Optional[os.PathLike | str] = None,
                    threads: Optional[int] = None) -> SliceEncoder:
    """``encoder`` (a plain :class:`SliceEncoder` on the CPU) run by ``backend`` (``openvino`` or
    ``onnxruntime``): exported under ``root`` (default :func:`model_cache_dir`) the first time,
    loaded afterwards. ``threads``: the runtime's threads (default torch's).

    Raises:
        BackendError: the backend is not installed, the precision is not supported, or the
            export cannot be made or loaded.
    """
    if backend not in PACKAGES:
        raise ValueError(f"runtime backend must be one of {', '.join(PACKAGES)}, got {backend!r}")
    if not installed(backend):
        raise BackendError(f"the {backend} backend is not installed ({INSTALL[backend]}), or choose the torch backend")
    root = Path(root) if root is not None else model_cache_dir()
    threads = int(threads or torch.get_num_threads())
    runner_class = _OpenVINORunner if backend == "openvino" else _OnnxRuntimeRunner
    folder = export(encoder, backend, root)
    try:
        runner = runner_class(folder, precision, threads)
    except BackendError:
        raise
    except Exception as exc:  # a damaged export: made again once, never trusted
        shutil.rmtree(folder, ignore_errors=True)
        folder = export(encoder, backend, root)
        try:
            runner = runner_class(folder, precision, threads)
        except BackendError:
            raise
        except Exception as exc2:
            raise BackendError(f"the {backend} backend could not load the encoder exported to {folder}: {exc2}") from exc
    return SliceEncoder(encoder.name, RuntimeModule(runner, backend), encoder.input_size, f"{encoder.cache_id}:fast-{backend}-{runner.precision}",
                        encoder.pixel_mean, encoder.pixel_std)


def accelerated_encoder(encoder: SliceEncoder, backend: str = "auto", precision: str = "auto", compile: bool = False, batch_size: int = 8,
                        root: Optional[os.PathLike | str] = None, fallback: Optional[Callable[[str], None]] = None) -> SliceEncoder:
    """The inference copy of a plain frozen encoder on the chosen backend.

    ``backend``: ``auto`` (:func:`resolve`), ``torch`` (:func:`fast_encoder`, with ``compile``,
    ``precision`` and ``batch_size``), ``openvino`` or ``onnxruntime`` (:func:`runtime_encoder`).
    ``compile`` means torch: with ``auto`` it picks torch, with a named runtime it is an error.

    ``fallback``: when given, a runtime that is missing or fails to export or load is replaced
    by the torch path and ``fallback`` receives one sentence saying so; without it such a
    failure raises :class:`BackendError` (``auto`` falls back to torch silently only when no
    runtime is installed).
    """
    if compile and backend in PACKAGES:
        raise BackendError(f"compile is torch.compile of the torch backend; choose backend torch or auto, not {backend}")
    name = "torch" if compile else resolve(backend, encoder.device)  # compiling means torch
    if name == "torch":
        return fast_encoder(encoder, precision=precision, compile=compile, batch_size=batch_size)
    try:
        return runtime_encoder(encoder, name, precision, root)
    except Exception as exc:
        if fallback is None:
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"the {name} backend failed to prepare the encoder: {exc}") from exc
        fallback(f"encoder backend {name} unavailable ({exc}); using torch")
        return fast_encoder(encoder, precision=precision, compile=compile, batch_size=batch_size)
