"""Training configuration: nested dataclasses <-> YAML, validated, with comments.

``semisam init-config OUT.yaml`` writes :func:`default_yaml` (every setting with its default
and a comment); ``semisam train --config CFG.yaml`` reads it with :func:`load_config`. Unknown
keys, wrong types and impossible values are refused with one line per problem naming the
key (``phases.semi.lr: must be > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, get_args, get_origin, get_type_hints

import yaml

from .errors import SemiSAMError


class ConfigError(SemiSAMError):
    """A configuration file or value is wrong; the message lists every problem."""

    def __init__(self, problems: List[str], source: Optional[str] = None):
        self.problems = list(problems)
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.problems) + " (run `semisam init-config NEW.yaml` for a commented example)")


# ------------------------------------------------------------------------------------------
# Sections. Comments after each field are written into the YAML by ``default_yaml``.
# ------------------------------------------------------------------------------------------


@dataclass
class PreprocessSection:
    target_spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # voxel size of the training grid, mm, (x, y, z)
    target_shape: Tuple[int, int, int] = (64, 128, 128)  # (z, y, x): in-plane tile the student decodes (y, x) and the least grid depth (z); with crop fov/center the whole training grid
    crop: str = "whole"  # "whole": the grid covers each volume's whole field of view, tiled in-plane by target_shape[1:]; "fov": crop to target_shape around the ultrasound field of view; "center": around the volume's centre
    tile_overlap: float = 0.25  # fraction of a tile shared with its neighbour when a grid is wider than one tile (training and inference)


@dataclass
class EncoderSection:
    name: str = "litemedsam"  # frozen slice encoder: litemedsam (ships) | medsam-vit-b | sam-vit-b
    checkpoint: Optional[str] = None  # weights for medsam-vit-b / sam-vit-b (default: the models folder)
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 where the CPU/GPU runs it natively)
    compile: bool = False  # torch.compile the encoder (~1 min the first time, then ~2x faster per slice)
    # The encoder's runtime in training: torch | openvino | onnxruntime | auto (auto: openvino on a CPU when installed,
    # else torch; torch on CUDA). Training's default stays torch, the path every benchmark in BENCHMARKS.md measured;
    # `semisam segment` and the Slicer modules default to auto. Embeddings of different runtimes are cached apart.
    backend: str = "torch"
    batch_size: int = 8  # slices per encoder call
    input_size: int = 0  # side slices are resized to before encoding: 0 = native (LiteMedSAM 256); litemedsam also runs at multiples of 32 from 64 to 512, cost ~ side^2


@dataclass
class StudentSection:
    channels: Tuple[int, ...] = (64, 32, 16)  # decoder widths; each stage after the first upsamples x2 in-plane
    block_depth: int = 16  # D_s: slices per training block and per inference block
    block_overlap: float = 0.5  # overlap of inference blocks (fraction of D_s)
    context: int = 0  # dilated in-plane blocks after the stem (dilation 2, 4, ...: a wider field of view)
    image_channels: int = 0  # width of a full-resolution image branch joined before the head (0: embeddings only)


@dataclass
class DataSection:
    batch_size: int = 2  # depth blocks per iteration (per process)
    labeled_fraction: float = 0.5  # share of labeled blocks in a batch (Semi-SAM+: 1:1)
    validation: float = 0.2  # when the dataset lists no validation cases: this fraction of the labeled cases (at least 1 when >= 2 labeled)
    cache_dir: Optional[str] = None  # slice embeddings on disk (default: <output>/cache); shared between runs with the same encoder
    max_memory_gb: float = 8.0  # embeddings kept in memory


@dataclass
class AugmentSection:
    depth_flip: bool = True  # flip blocks along depth (exact for a per-slice encoder)
    inplane_flip: bool = True  # flip/transpose embeddings and targets in-plane together
    feature_noise: float = 0.1  # std of multiplicative Gaussian noise on the student's embeddings
    feature_dropout: float = 0.1  # dropout probability on the student's embeddings
    inplane_crop: int = 0  # > 0: train on random in-plane crops of about this many embedding tokens per side (0 = whole slices): cheaper steps, shifted views


@dataclass
class TeacherSection:
    name: str = "litemedsam"  # litemedsam | medsam-vit-b | sam-vit-b | sam-med3d | sam-med3d-turbo | medsam2
    checkpoint: Optional[str] = None  # user-supplied weights (default: the models folder); litemedsam ships
    input_size: Optional[int] = None  # litemedsam: side its own encoder runs at (0 = native 256); None = share the student's encoder and embeddings


@dataclass
class PseudoSection:
    teachers: List[TeacherSection] = field(default_factory=lambda: [TeacherSection()])  # SAM-family teachers (Algorithm 2)
    views: int = 2  # N geometric views per unlabeled volume (the first is the identity)
    points: int = 1  # positive points sampled inside the coarse mask (3D teachers; slice teachers get one per slice)
    u_th: float = 0.1  # confidence threshold: a voxel counts where the teachers' variance < u_th
    refresh_every: int = 5  # recompute pseudo-labels every this many epochs of phase 1 (0: only once)
    inplane_views: bool = True  # views may flip/transpose in-plane (new slices to encode once per volume)
    prompt_growth: Optional[float] = None  # mm the coarse mask is grown (< 0: shrunk) before it prompts the teachers; null = chosen on the validation cases at every refresh


@dataclass
class LossSection:
    lambda_max: float = 1.0  # weight of L_con (student vs EMA teacher), reached after ramp_up epochs
    beta_max: float = 1.0  # weight of L_rs-con (student vs confident pseudo-labels) at the start of phase 1
    pseudo_loss: str = "dice_ce"  # L_rs-con: dice_ce (Dice + CE on confident voxels, the scale of L_sup) | mse (the handbook's MSE of probabilities)
    ramp_up: float = 10.0  # T_r, epochs: lambda(t) = lambda_max * exp(-5 (1 - t/T_r)^2) for t < T_r
    ramp_down: float = 40.0  # T_d, epochs: beta(t) = beta_max * exp(-t / T_d)
    ema_decay: float = 0.99  # EMA teacher: theta' <- decay * theta' + (1 - decay) * theta after every iteration
    dice_weight: float = 1.0  # L_sup = dice_weight * Dice + ce_weight * CE
    ce_weight: float = 1.0


@dataclass
class PhaseSection:
    epochs: int = 0
    lr: float = 1e-3


@dataclass
class PhasesSection:
    warmup: PhaseSection = field(default_factory=lambda: PhaseSection(50, 2e-3))  # phase 0: labeled only
    semi: PhaseSection = field(default_factory=lambda: PhaseSection(100, 1e-3))  # phase 1: + consistency + pseudo-labels
    finetune: PhaseSection = field(default_factory=lambda: PhaseSection(50, 5e-4))  # phase 2: teachers frozen (last pseudo-labels), student only


@dataclass
class OptimSection:
    weight_decay: float = 1e-4  # AdamW
    poly_power: float = 0.9  # lr(i) = lr * (1 - i / steps_in_phase) ** poly_power
    grad_accumulation: int = 1  # micro-batches per optimizer step
    grad_clip: float = 5.0  # max gradient norm (0: off)
    amp: str = "auto"  # auto (CUDA: fp16 + GradScaler; CPU: fp32) | fp16 | bf16 | off


@dataclass
class ValidationSection:
    every: int = 1  # validate every this many epochs (and always at a phase's end)
    hd95: bool = True  # also compute the 95% Hausdorff distance (mm)
    largest_component: bool = False  # score (and later segment) each structure as its largest connected piece; for one-piece organs
    calibrate_threshold: bool = False  # one structure: best.pt records the foreground threshold (0.30..0.60) with the best validation Dice; segment uses it
    refine: bool = True  # after training: if the teachers, prompted by best.pt's grown masks, beat it on the validation cases, best.pt records that refinement and segment applies it (litemedsam teacher only)


@dataclass
class TrainConfig:
    dataset: str = ""  # dataset folder or dataset.json (see `semisam validate`)
    output: str = "semisam_run"  # run folder: checkpoints, metrics.jsonl, curves.png, caches
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: each process uses its LOCAL_RANK GPU)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    pseudo: PseudoSection = field(default_factory=PseudoSection)
    loss: LossSection = field(default_factory=LossSection)
    phases: PhasesSection = field(default_factory=PhasesSection)
    optim: OptimSection = field(default_factory=OptimSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def phase_list(self) -> List[Tuple[int, str, PhaseSection]]:
        return [(0, "warmup", self.phases.warmup), (1, "semi", self.phases.semi), (2, "finetune", self.phases.finetune)]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------
# Reading: dict -> dataclasses with type checks
# ------------------------------------------------------------------------------------------


def _build(cls, data: Any, where: str, problems: List[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: must be a mapping, got {type(data).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{where + '.' if where else ''}{key}: unknown setting (known: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{where}.{f.name}" if where else f.name
        values[f.name] = _convert(hints[f.name], data[f.name], key, problems)
    try:
        return cls(**{k: v for k, v in values.items() if v is not _BAD})
    except (TypeError, ValueError) as exc:  # pragma: no cover - conversion already checked
        problems.append(f"{where or 'config'}: {exc}")
        return cls()


_BAD = object()


def _convert(tp, value: Any, key: str, problems: List[str]):
    origin = get_origin(tp)
    args = get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if origin is type(Optional[int]) or (origin is not None and type(None) in args):  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(inner, value, key, problems)
    if origin in (list, List):
        if not isinstance(value, list):
            problems.append(f"{key}: must be a list, got {value!r}")
            return _BAD
        out = [_convert(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in out) else out
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: must be a list, got {value!r}")
            return _BAD
        if len(args) == 2 and args[1] is Ellipsis:
            items = [(args[0], v) for v in value]
        else:
            if len(value) != len(args):
                problems.append(f"{key}: needs {len(args)} values, got {len(value)}")
                return _BAD
            items = list(zip(args, value))
        out = [_convert(a, v, f"{key}[{i}]", problems) for i, (a, v) in enumerate(items)]
        return _BAD if any(v is _BAD for v in out) else tuple(out)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: must be true or false, got {value!r}")
            return _BAD
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: must be a whole number, got {value!r}")
            return _BAD
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: must be a number, got {value!r}")
            return _BAD
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: must be text, got {value!r}")
            return _BAD
        return value
    return value  # pragma: no cover


#: LiteMedSAM's native input side (its TinyViT was trained on 256 x 256 slices).
LITEMEDSAM_INPUT = 256


def check_input_size(name: str, input_size: int) -> int:
    """The encoder input side to use: 0 means the model's native one. Only LiteMedSAM's
    TinyViT (windowed attention, no absolute position embedding) runs at other sides:
    multiples of 32 from 64 to 512."""
    size = int(input_size)
    if size == 0:
        return LITEMEDSAM_INPUT if name == "litemedsam" else 0
    if name != "litemedsam":
        raise ValueError(f"encoder input_size {size}: only litemedsam runs at another input size; use 0 (the native size) for {name}")
    if size % 32 or not 64 <= size <= 512:
        raise ValueError(f"encoder input_size {size}: use a multiple of 32 from 64 to 512 (LiteMedSAM's native size is {LITEMEDSAM_INPUT}), or 0")
    return size



def _check(cfg: TrainConfig, problems: List[str]) -> None:
    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            problems.append(f"{key}: {what}, got {value!r}")

    from .models.registry import catalogue

    p = cfg.preprocess
    need(all(s > 0 for s in p.target_spacing), "preprocess.target_spacing", "must be positive", list(p.target_spacing))
    need(all(n >= 1 for n in p.target_shape), "preprocess.target_shape", "sizes must be >= 1", list(p.target_shape))
    need(p.crop in ("whole", "fov", "center"), "preprocess.crop", "must be 'whole', 'fov' or 'center'", p.crop)
    need(0.0 <= p.tile_overlap < 0.9, "preprocess.tile_overlap", "must lie in [0, 0.9)", p.tile_overlap)
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device", "must be auto, cpu, cuda or cuda:N", cfg.device)
    encoders = ("litemedsam", "medsam-vit-b", "sam-vit-b")
    need(cfg.encoder.name in encoders, "encoder.name", f"must be one of {', '.join(encoders)}", cfg.encoder.name)
    need(cfg.encoder.precision in ("auto", "bf16", "fp32"), "encoder.precision", "must be auto, bf16 or fp32", cfg.encoder.precision)
    need(cfg.encoder.batch_size >= 1, "encoder.batch_size", "must be >= 1", cfg.encoder.batch_size)
    need(cfg.encoder.backend in ("auto", "torch", "openvino", "onnxruntime"), "encoder.backend", "must be auto, torch, openvino or onnxruntime", cfg.encoder.backend)
    need(not (cfg.encoder.compile and cfg.encoder.backend in ("openvino", "onnxruntime")), "encoder.compile",
         "compiles the torch backend only; set encoder.backend to torch (or auto) or compile to false", cfg.encoder.compile)
    if cfg.encoder.name in encoders:
        try:
            check_input_size(cfg.encoder.name, cfg.encoder.input_size)
        except (TypeError, ValueError) as exc:
            problems.append(f"encoder.input_size: {exc}".replace("encoder input_size ", "got "))
    s = cfg.student
    need(len(s.channels) >= 1 and all(c >= 1 for c in s.channels), "student.channels", "needs one or more positive widths", list(s.channels))
    need(s.block_depth >= 1, "student.block_depth", "must be >= 1", s.block_depth)
    need(0 <= s.block_overlap < 1, "student.block_overlap", "must be in [0, 1)", s.block_overlap)
    need(s.context >= 0, "student.context", "must be >= 0", s.context)
    need(s.image_channels >= 0, "student.image_channels", "must be >= 0", s.image_channels)
    d = cfg.data
    need(d.batch_size >= 1, "data.batch_size", "must be >= 1", d.batch_size)
    need(0 < d.labeled_fraction <= 1, "data.labeled_fraction", "must be in (0, 1]", d.labeled_fraction)
    need(0 <= d.validation < 1, "data.validation", "must be in [0, 1)", d.validation)
    need(d.max_memory_gb > 0, "data.max_memory_gb", "must be > 0", d.max_memory_gb)
    a = cfg.augment
    need(a.feature_noise >= 0, "augment.feature_noise", "must be >= 0", a.feature_noise)
    need(0 <= a.feature_dropout < 1, "augment.feature_dropout", "must be in [0, 1)", a.feature_dropout)
    need(a.inplane_crop >= 0, "augment.inplane_crop", "must be an integer >= 0 (embedding tokens per side; 0 = whole slices)", a.inplane_crop)
    known = set(catalogue())
    teachers = {"litemedsam", "medsam-vit-b", "sam-vit-b", "sam-med3d", "sam-med3d-turbo", "medsam2"} & (known | {"litemedsam"})
    for i, t in enumerate(cfg.pseudo.teachers):
        need(t.name in teachers, f"pseudo.teachers[{i}].name", f"must be one of {', '.join(sorted(teachers))}", t.name)
        if t.input_size is not None:
            try:
                check_input_size(t.name, t.input_size)
            except ValueError as exc:
                problems.append(f"pseudo.teachers[{i}].input_size: {exc}")
    ps = cfg.pseudo
    need(ps.views >= 1, "pseudo.views", "must be >= 1", ps.views)
    need(ps.points >= 1, "pseudo.points", "must be >= 1", ps.points)
    need(0 < ps.u_th <= 0.25, "pseudo.u_th", "must be in (0, 0.25] (the variance of values in [0, 1] is at most 0.25)", ps.u_th)
    need(ps.refresh_every >= 0, "pseudo.refresh_every", "must be >= 0", ps.refresh_every)
    lo = cfg.loss
    for key in ("lambda_max", "beta_max", "dice_weight", "ce_weight"):
        need(getattr(lo, key) >= 0, f"loss.{key}", "must be >= 0", getattr(lo, key))
    need(lo.dice_weight + lo.ce_weight > 0, "loss.dice_weight", "dice_weight + ce_weight must be > 0", lo.dice_weight)
    need(lo.ramp_up >= 0, "loss.ramp_up", "must be >= 0", lo.ramp_up)
    need(lo.ramp_down > 0, "loss.ramp_down", "must be > 0", lo.ramp_down)
    need(lo.pseudo_loss in ("dice_ce", "mse"), "loss.pseudo_loss", "must be dice_ce or mse", lo.pseudo_loss)
    need(0 <= lo.ema_decay < 1, "loss.ema_decay", "must be in [0, 1)", lo.ema_decay)
    for _, name, ph in cfg.phase_list():
        need(ph.epochs >= 0, f"phases.{name}.epochs", "must be >= 0", ph.epochs)
        need(ph.lr > 0, f"phases.{name}.lr", "must be > 0", ph.lr)
    need(sum(ph.epochs for _, _, ph in cfg.phase_list()) > 0, "phases", "at least one phase needs epochs > 0", 0)
    o = cfg.optim
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    need(o.poly_power >= 0, "optim.poly_power", "must be >= 0", o.poly_power)
    need(o.grad_accumulation >= 1, "optim.grad_accumulation", "must be >= 1", o.grad_accumulation)
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0", o.grad_clip)
    need(o.amp in ("auto", "fp16", "bf16", "off"), "optim.amp", "must be auto, fp16, bf16 or off", o.amp)
    need(cfg.validation.every >= 1, "validation.every", "must be >= 1", cfg.validation.every)


def config_from_dict(data: Dict[str, Any], source: Optional[str] = None, require_dataset: bool = True) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a (YAML) mapping; raises :class:`ConfigError`."""
    problems: List[str] = []
    cfg = _build(TrainConfig, data, "", problems)
    if not problems:
        _check(cfg, problems)
    if require_dataset and not problems and not cfg.dataset:
        problems.append("dataset: is required (a dataset folder or dataset.json)")
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: os.PathLike | str, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Read a YAML config. Relative ``dataset``/``output``/``cache_dir``/checkpoint paths are
    taken relative to the config file's folder. ``overrides`` are dotted keys
    (``{"phases.semi.epochs": 3}``) applied before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such file"], None)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}".replace("\n", " ")], str(path)) from None
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([f"must be a mapping of settings, got {type(data).__name__}"], str(path))
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    cfg = config_from_dict(data, str(path))
    base = path.resolve().parent

    def rel(p: Optional[str]) -> Optional[str]:
        return None if p is None else str((base / os.path.expanduser(p)).resolve()) if not os.path.isabs(os.path.expanduser(p)) else os.path.expanduser(p)

    cfg.dataset = rel(cfg.dataset)
    if not Path(cfg.dataset).exists():
        raise ConfigError([f"dataset: {cfg.dataset} does not exist (give a dataset folder or dataset.json)"], str(path))
    cfg.output = rel(cfg.output)
    cfg.data.cache_dir = rel(cfg.data.cache_dir)
    cfg.encoder.checkpoint = rel(cfg.encoder.checkpoint)
    for t in cfg.pseudo.teachers:
        t.checkpoint = rel(t.checkpoint)
    return cfg


def parse_overrides(pairs: Optional[List[str]]) -> Dict[str, Any]:
    """``["phases.semi.epochs=3"]`` -> ``{"phases.semi.epochs": 3}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SemiSAMError(f"--set needs KEY=VALUE (e.g. phases.semi.epochs=3), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(cfg: TrainConfig, overrides: Dict[str, Any]) -> TrainConfig:
    """A new, validated config: ``cfg`` with dotted-key ``overrides`` applied."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return config_from_dict(data, "overrides")


def set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "phases.semi.epochs", 3)`` (creates missing levels)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------
# Writing: YAML with comments
# ------------------------------------------------------------------------------------------

_HEADER = """\
# SemiSAM training configuration (Semi-SAM+). Every setting is shown with its default.
# Run:  semisam train --config THIS.yaml            (add --resume to continue a stopped run)
#       torchrun --nproc_per_node=N -m semisam.cli train --config THIS.yaml
# Relative paths are relative to this file.
"""


def _comments(cls) -> Dict[str, str]:
    """Field comments from the dataclass source (the ``# ...`` after each field)."""
    import inspect

    out: Dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # pragma: no cover - source unavailable (frozen app)
        return out
    for line in lines:
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", "def ", "class ")):
            name = stripped.split(":", 1)[0].strip()
            out[name] = stripped.split("#", 1)[1].strip()
    return out


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _emit(obj: Any, indent: int, lines: List[str]) -> None:
    comments = _comments(type(obj))
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{note}")
            _emit(value, indent + 1, lines)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            lines.append(f"{pad}{f.name}:{note}")
            for item in value:
                sub: List[str] = []
                _emit(item, indent + 2, sub)
                sub[0] = f"{pad}  - " + sub[0].lstrip()
                lines.extend(sub)
        else:
            plain = list(value) if isinstance(value, tuple) else value
            lines.append(f"{pad}{f.name}: {_yaml_scalar(plain)}{note}")
        if indent == 0 and dataclasses.is_dataclass(value):
            lines.append("")


def default_yaml(cfg: Optional[TrainConfig] = None) -> str:
    """The configuration as commented YAML (defaults when ``cfg`` is None)."""
    lines: List[str] = [_HEADER]
    _emit(cfg or TrainConfig(), 0, lines)
    return "\n".join(lines).rstrip() + "\n"


def write_config(path: os.PathLike | str, cfg: Optional[TrainConfig] = None, overwrite: bool = False) -> Path:
    """Write commented YAML atomically; refuses to replace a file unless ``overwrite``."""
    import tempfile

    path = Path(path)
    if path.exists() and not overwrite:
        raise SemiSAMError(f"{path} exists; choose another name or pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(default_yaml(cfg))
    os.replace(tmp, path)
    return path
