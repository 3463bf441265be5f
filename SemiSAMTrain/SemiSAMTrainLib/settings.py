"""GUI values ⇄ training config, and the dataset check shown before a run (Qt-free).

Everything goes through ``semisam.config`` (defaults, validation, commented YAML) and
``semisam.data`` (dataset listing and validation): the module adds only the mapping between
its widgets and the config's dotted keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Parameter-node field -> the config's dotted key. These are the settings the GUI shows; the
#: rest keep their defaults (or the values of a base config the user picks).
GUI_SETTINGS: Dict[str, str] = {
    "warmupEpochs": "phases.warmup.epochs",
    "warmupLr": "phases.warmup.lr",
    "semiEpochs": "phases.semi.epochs",
    "semiLr": "phases.semi.lr",
    "finetuneEpochs": "phases.finetune.epochs",
    "finetuneLr": "phases.finetune.lr",
    "lambdaMax": "loss.lambda_max",
    "betaMax": "loss.beta_max",
    "rampUp": "loss.ramp_up",
    "rampDown": "loss.ramp_down",
    "emaDecay": "loss.ema_decay",
    "uTh": "pseudo.u_th",
    "views": "pseudo.views",
    "refreshEvery": "pseudo.refresh_every",
    "batchSize": "data.batch_size",
    "validationEvery": "validation.every",
    "seed": "seed",
    "device": "device",
}

#: The file the module writes its config to, inside the run folder.
CONFIG_NAME = "slicer_train.yaml"


def get_dotted(data: Mapping[str, Any], key: str) -> Any:
    """``get_dotted(d, "phases.semi.epochs")``; raises ``KeyError`` naming the key."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def gui_values(cfg=None) -> Dict[str, Any]:
    """The GUI fields' values from a :class:`semisam.config.TrainConfig` (default: the defaults)."""
    from semisam.config import TrainConfig

    data = (cfg or TrainConfig()).to_dict()
    return {name: get_dotted(data, key) for name, key in GUI_SETTINGS.items()}


def overrides_from_gui(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """GUI field values -> ``{dotted key: value}`` (unknown field names are refused)."""
    unknown = sorted(set(fields) - set(GUI_SETTINGS))
    if unknown:
        raise KeyError(f"not GUI settings: {', '.join(unknown)}")
    return {GUI_SETTINGS[name]: value for name, value in fields.items()}


def teacher_names() -> List[str]:
    """The catalogue's models that can teach (role ``teacher-*``), in catalogue order."""
    from semisam.models.registry import catalogue

    return [name for name, entry in catalogue().items() if any(r.startswith("teacher") for r in entry.roles)]


def read_base_config(path: PathLike):
    """A user's YAML as a validated config without requiring its dataset (for the GUI to show)."""
    import yaml

    from semisam.config import ConfigError, config_from_dict

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"cannot read: {exc}".replace("\n", " ")], str(path)) from None
    return config_from_dict(data, str(path), require_dataset=False)


def write_training_config(path: PathLike, dataset: PathLike, output: PathLike, overrides: Optional[Mapping[str, Any]] = None,
                          teachers: Optional[Sequence[Tuple[str, Optional[str]]]] = None, base: Optional[PathLike] = None):
    """Write the config a training from the GUI uses, and return it as training will read it.

    Starts from the defaults (or from ``base``, a YAML whose relative paths are taken relative
    to it), sets ``dataset`` and ``output``, applies ``overrides`` (dotted keys, e.g.
    ``{"phases.semi.epochs": 20}``) and ``teachers`` (``(name, checkpoint or None)`` pairs),
    validates with ``semisam.config`` (a :class:`~semisam.config.ConfigError` lists every
    problem), writes commented YAML to ``path`` and reads it back with ``load_config``.
    """
    from semisam.config import TrainConfig, config_from_dict, load_config, set_dotted, write_config

    dataset = os.path.abspath(os.path.expanduser(os.fspath(dataset)))
    if base:
        data = load_config(base, {"dataset": dataset}).to_dict()  # relative paths resolved against the base file
    else:
        data = TrainConfig().to_dict()
    data["dataset"] = dataset
    data["output"] = os.path.abspath(os.path.expanduser(os.fspath(output)))
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    if teachers is not None:
        data["pseudo"]["teachers"] = [{"name": name, "checkpoint": checkpoint or None} for name, checkpoint in teachers]
    cfg = config_from_dict(data, str(path))
    write_config(path, cfg, overwrite=True)
    return load_config(path)


@dataclass
class DatasetCheck:
    """What ``semisam validate`` says about a dataset: one message per problem, then the verdict."""

    ok: bool
    messages: List[str] = field(default_factory=list)
    errors: int = 0
    warnings: int = 0
    labeled: int = 0
    unlabeled: int = 0
    validation: int = 0


def check_dataset(path: PathLike, read: bool = True) -> DatasetCheck:
    """Validate a dataset folder or ``dataset.json`` like ``semisam validate`` does (same
    messages). ``read=False`` checks the listing only (fast); the default reads every file."""
    from semisam.data import load_dataset, validate_dataset
    from semisam.errors import SemiSAMError

    try:
        spec = load_dataset(path)
    except SemiSAMError as exc:
        return DatasetCheck(False, [str(exc), "dataset NOT usable: 1 problem(s)"], errors=1)
    problems = validate_dataset(spec, read=read)
    errors = [p for p in problems if p.severity == "error"]
    messages = [f"format: {spec.format_description}"] + [str(p) for p in problems]
    split = "".join(f", {len(cases)} {name}" for name, cases in (("validation", spec.validation), ("test", spec.test)) if cases)
    summary = f"{len(spec.labeled)} labeled, {len(spec.unlabeled)} unlabeled{split} case(s) ({spec.source}: {spec.root})"  # as semisam validate
    messages.append(f"dataset NOT usable: {len(errors)} problem(s); {summary}" if errors else f"dataset OK: {summary}")
    return DatasetCheck(not errors, messages, len(errors), len(problems) - len(errors), len(spec.labeled), len(spec.unlabeled), len(spec.validation))


def history_with(path: str, history: Any, size: int = 5) -> List[str]:
    """A ctkPathLineEdit history (what ``QSettings`` holds under its ``settingKey``) with
    ``path`` first, without duplicates, at most ``size`` entries. ``history`` may be None, a
    string or a list (``QSettings.value`` returns any of them)."""
    if history is None:
        items: List[str] = []
    elif isinstance(history, str):
        items = [history] if history else []
    else:
        items = [str(h) for h in history if h]
    return ([path] + [h for h in items if h != path])[:size]
