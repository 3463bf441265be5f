"""The model catalogue (``Resources/models.json``) and ``build_model``.

The catalogue is data: name, roles, the checkpoint file expected, its sha256 where known and
where users obtain it. User checkpoints are looked up in the models folder
(``$SEMISAM_MODELS``, default ``~/.semisam/models``) unless a path is given. Nothing is ever
downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import SemiSAMError
from .checkpoints import require_file

CATALOGUE = Path(__file__).resolve().parents[2] / "Resources" / "models.json"


@dataclass
class ModelEntry:
    name: str
    title: str
    roles: List[str]
    checkpoint: str
    obtain: str
    sha256: Optional[str] = None
    shipped: bool = False
    default: bool = False
    prompts: List[str] = field(default_factory=list)


def models_folder() -> Path:
    return Path(os.environ.get("SEMISAM_MODELS", Path.home() / ".semisam" / "models")).expanduser()


def catalogue(path: Optional[os.PathLike | str] = None) -> Dict[str, ModelEntry]:
    path = Path(path or os.environ.get("SEMISAM_CATALOGUE", CATALOGUE))
    if not path.is_file():
        raise SemiSAMError(f"{path}: model catalogue not found (run from a SemiSAM checkout or set SEMISAM_CATALOGUE)")
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {m["name"]: ModelEntry(**m) for m in doc["models"]}


def checkpoint_path(entry: ModelEntry) -> Optional[Path]:
    """Where the entry's checkpoint is (shipped asset or models folder), or None if absent."""
    if entry.shipped and entry.name == "litemedsam":
        from .encoders import litemedsam_checkpoint

        return litemedsam_checkpoint()
    candidate = models_folder() / entry.checkpoint
    return candidate if candidate.is_file() else None


def status() -> List[Dict[str, Any]]:
    """The catalogue with, for each model, whether its checkpoint is present and where."""
    rows = []
    for entry in catalogue().values():
        problem = None
        try:
            path = checkpoint_path(entry)
        except SemiSAMError as exc:  # e.g. the shipped file fails its sha256 check
            path, problem = None, str(exc)
        expected = str(models_folder() / entry.checkpoint) if not entry.shipped else problem
        rows.append({**entry.__dict__, "present": path is not None, "path": str(path) if path else None, "expected_at": expected})
    return rows


def build_model(name: str, checkpoint: Optional[os.PathLike | str] = None, device: str = "cpu"):
    """Build a catalogued model with its weights (strictly checked).

    Returns the ``nn.Module`` for ``litemedsam`` / ``medsam-vit-b`` / ``sam-vit-b``, a
    teacher object for ``sam-med3d`` / ``sam-med3d-turbo`` / ``medsam2``, and
    ``(student, extra)`` for ``student`` (a checkpoint path is required).
    """
    if name == "student":
        from .student import load_student

        if checkpoint is None:
            raise SemiSAMError("a student needs its checkpoint: pass the .pt written by `semisam train`")
        return load_student(checkpoint, device)
    entries = catalogue()
    if name not in entries:
        raise SemiSAMError(f"unknown model '{name}'; known: {', '.join(sorted(entries))} and 'student'")
    entry = entries[name]
    path = Path(checkpoint) if checkpoint is not None else checkpoint_path(entry)
    if not entry.shipped:
        path = require_file(path if path is not None else models_folder() / entry.checkpoint, name, entry.obtain, entry.sha256)
    if name == "litemedsam":
        from .encoders import build_litemedsam

        return build_litemedsam(checkpoint, device)
    if name in ("medsam-vit-b", "sam-vit-b"):
        from .encoders import build_sam_vit

        return build_sam_vit(path, device, name=name)
    if name in ("sam-med3d", "sam-med3d-turbo"):
        from .teacher_sammed3d import SAMMed3DTeacher

        return SAMMed3DTeacher(checkpoint=path, device=device)
    if name == "medsam2":
        from .teacher_medsam2 import MedSAM2Teacher

        return MedSAM2Teacher(checkpoint=path, device=device)
    raise SemiSAMError(f"model '{name}' is catalogued but has no builder")  # pragma: no cover
