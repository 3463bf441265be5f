"""Safe checkpoint loading: no code execution, strict keys and shapes, clear refusals.

Every checkpoint in SemiSAM is read with ``torch.load(..., weights_only=True)`` (a pickle that
would run code is refused), its state dict is unwrapped from the usual containers
(``model``, ``state_dict``, ``module.`` prefixes), and it must match the model's keys and
tensor shapes exactly. Nothing is ever downloaded: a missing file is an error that names the
file expected and where users obtain it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import torch

from ..errors import InputError


class CheckpointError(InputError):
    """A checkpoint file that is missing, unsafe, corrupt or made for another model."""


def sha256_of(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_file(path: Optional[os.PathLike | str], model: str, obtain: str, sha256: Optional[str] = None) -> Path:
    """The checkpoint path, checked to exist (and to match ``sha256`` when one is known)."""
    if path is None:
        raise CheckpointError(None, f"model '{model}' needs a checkpoint file", f"get it from {obtain} and pass its path")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, f"checkpoint for '{model}' not found", f"get it from {obtain}")
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256:
            raise CheckpointError(path, f"sha256 {got[:12]}... differs from the expected {sha256[:12]}... for '{model}'", "the file is corrupt or another version; get it again")
    return path


def safe_torch_load(path: os.PathLike | str):
    """``torch.load(weights_only=True)`` on the CPU, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found", "check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe pickles, RuntimeError for corrupt zips
        text = str(exc)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise CheckpointError(path, "refused: the file holds Python objects other than tensors, which could run code when loaded", "SemiSAM only loads plain tensor checkpoints (torch.save(model.state_dict()))") from None
        raise CheckpointError(path, "is not a readable PyTorch checkpoint (corrupt, or a pickle of more than tensors)", "save weights with torch.save(model.state_dict())") from None


def load_state_dict(path: os.PathLike | str, keys: Iterable[str] = ("model", "state_dict", "model_state_dict", "module")) -> Dict[str, torch.Tensor]:
    """Read a checkpoint without running code and return its state dict (tensors only)."""
    path = Path(path)
    obj = safe_torch_load(path)
    for key in keys:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "holds no state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: os.PathLike | str, model: str, prefix: str = "") -> None:
    """Load ``state`` (keys under ``prefix``) into ``module``; any missing, unexpected or
    mis-shaped tensor refuses the checkpoint with a message listing them."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})")
        raise CheckpointError(path, f"does not fit model '{model}': " + "; ".join(parts), "is it the checkpoint of another model?")
    module.load_state_dict(state, strict=True)
