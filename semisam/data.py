"""Datasets: discovery, validation, a cached MONAI loader and a labeled/unlabeled batch sampler.

A dataset is either

* a folder with ``imagesTr/`` (labeled images), ``labelsTr/`` (their label maps, same case
  ids) and ``imagesUnlabeled/``. A case id is the file name without its extension and
  without an nnU-Net channel suffix (``case_01_0000.nii.gz`` -> ``case_01``). A sub-folder is
  read as a DICOM series. Optional ``imagesVal/`` + ``labelsVal/`` hold validation cases
  (used to pick the best checkpoint, never to train) and ``imagesTs/`` + ``labelsTs/`` a test
  split (never read by training; ``scripts/bench_ssl.py`` scores on it). Or
* a ``dataset.json`` (or a folder holding one)::

      {"labels": {"0": "background", "1": "target"},
       "image_type": "bmode",            # or "rf": envelope detection runs first
       "training":  [{"id": "a", "image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
       "unlabeled": [{"id": "b", "image": "imagesUnlabeled/b.nii.gz"}, "more/c.nrrd"],
       "validation": [{"image": "imagesVal/v.nii.gz", "label": "labelsVal/v.nii.gz"}],  # optional
       "test": [{"image": "imagesTs/t.nii.gz", "label": "labelsTs/t.nii.gz"}]}        # optional

  Paths are relative to the JSON file; ``id`` defaults to the image's case id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from .errors import InputError
from .preprocess import PreprocessConfig
from .volume import FORMATS, check_not_constant, grid_differences, read_volume, strip_suffix

_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


@dataclass
class Case:
    id: str
    image: Path
    label: Optional[Path] = None
    reference: Optional[Path] = None  # true label of an unlabeled case, for evaluation only


@dataclass
class DatasetSpec:
    """What a dataset holds; nothing is read until :func:`validate_dataset` or loading."""

    root: Path
    labeled: List[Case]
    unlabeled: List[Case]
    labels: Optional[Dict[int, str]] = None  # None: not declared (folder layout)
    image_type: str = "bmode"
    beam_axis: int = 1
    source: str = "folder"
    problems: List["Problem"] = field(default_factory=list)  # found while listing
    validation: List[Case] = field(default_factory=list)  # labeled cases kept for validation only
    test: List[Case] = field(default_factory=list)  # labeled test split: never used by training, for benchmarks

    @property
    def num_labels(self) -> Optional[int]:
        return None if self.labels is None else max(self.labels)

    def preprocess_config(self, **overrides: Any) -> PreprocessConfig:
        """Preprocessing this dataset needs (RF data get envelope detection)."""
        kwargs = {"envelope": self.image_type == "rf", "beam_axis": self.beam_axis}
        kwargs.update(overrides)
        return PreprocessConfig(**kwargs)


@dataclass
class Problem:
    path: str
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.severity == "error" else f"{self.path}: warning: {self.message}"


def case_id(path: os.PathLike | str) -> str:
    return _CHANNEL_SUFFIX.sub("", strip_suffix(path))


def _volume_entries(folder: Path) -> List[Path]:
    """Files with a volume extension and sub-folders (DICOM series), sorted; hidden ones skipped."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or any(p.name.lower().endswith(s) for s in FORMATS):
            out.append(p)
    return out


def load_dataset(path: os.PathLike | str) -> DatasetSpec:
    """List a dataset (folder or ``dataset.json``) without reading any image.

    Raises:
        InputError: the path is missing, or the JSON cannot be parsed or lacks ``training``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist", "give a dataset folder or a dataset.json")
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.is_file():
        return _load_json(path)
    return _load_folder(path)


def _load_folder(root: Path) -> DatasetSpec:
    images = _volume_entries(root / "imagesTr")
    labels = {case_id(p): p for p in _volume_entries(root / "labelsTr")}
    unlabeled = [Case(case_id(p), p) for p in _volume_entries(root / "imagesUnlabeled")]
    if not images and not unlabeled:
        raise InputError(
            root,
            "is not a dataset: no imagesTr/ or imagesUnlabeled/ with volumes, and no dataset.json",
            "see `semisam validate --help` for the layout",
        )
    problems: List[Problem] = []
    labeled = _pair(images, labels, "imagesTr", "labelsTr", problems)
    validation = _pair(_volume_entries(root / "imagesVal"), {case_id(p): p for p in _volume_entries(root / "labelsVal")}, "imagesVal", "labelsVal", problems)
    test: List[Case] = []
    if (root / "labelsTs").is_dir():
        test = _pair(_volume_entries(root / "imagesTs"), {case_id(p): p for p in _volume_entries(root / "labelsTs")}, "imagesTs", "labelsTs", problems)
    elif _volume_entries(root / "imagesTs"):
        problems.append(Problem(str(root / "imagesTs"), "no labelsTs/ beside it: not used as a test split", "warning"))
    return DatasetSpec(root, labeled, unlabeled, None, "bmode", 1, "folder", problems, validation, test)


def _pair(images: List[Path], labels: Dict[str, Path], image_dir: str, label_dir: str, problems: List[Problem]) -> List[Case]:
    """Cases of ``images`` with their labels (by case id); every unmatched file is a problem."""
    labels = dict(labels)
    cases = []
    for p in images:
        cid = case_id(p)
        label = labels.pop(cid, None)
        if label is None:
            problems.append(Problem(str(p), f"no label for case '{cid}' in {label_dir}/"))
        cases.append(Case(cid, p, label))
    for cid, p in labels.items():
        problems.append(Problem(str(p), f"label without an image: no case '{cid}' in {image_dir}/"))
    return cases


def _load_json(path: Path) -> DatasetSpec:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("training", []), list):
        raise InputError(path, "must be a JSON object with a 'training' list")
    root = path.parent
    problems: List[Problem] = []

    def entry(item: Any, where: str, needs_label: bool) -> Optional[Case]:
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            problems.append(Problem(str(path), f"{where}: needs an 'image' path"))
            return None
        image = root / item["image"]
        label = root / item["label"] if isinstance(item.get("label"), str) else None
        ref = root / item["reference"] if isinstance(item.get("reference"), str) else None
        cid = str(item.get("id") or case_id(image))
        if needs_label and label is None:
            problems.append(Problem(str(path), f"{where} (case '{cid}'): no 'label' given"))
        return Case(cid, image, label, ref)

    labeled = [c for i, it in enumerate(doc.get("training", [])) if (c := entry(it, f"training[{i}]", True))]
    unlabeled = [c for i, it in enumerate(doc.get("unlabeled", []) or []) if (c := entry(it, f"unlabeled[{i}]", False))]
    validation = [c for i, it in enumerate(doc.get("validation", []) or []) if (c := entry(it, f"validation[{i}]", True))]
    test = [c for i, it in enumerate(doc.get("test", []) or []) if (c := entry(it, f"test[{i}]", True))]
    labels = None
    if "labels" in doc:
        try:
            labels = {int(k): str(v) for k, v in dict(doc["labels"]).items()}
        except (TypeError, ValueError):
            problems.append(Problem(str(path), "'labels' must map label values (0..K) to names"))
        else:
            if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
                problems.append(Problem(str(path), f"'labels' must name 0 (background) and 1..K without gaps, got {sorted(labels)}"))
    image_type = str(doc.get("image_type", "bmode")).lower()
    if image_type not in ("bmode", "rf"):
        problems.append(Problem(str(path), f"image_type must be 'bmode' or 'rf', got {image_type!r}"))
        image_type = "bmode"
    beam_axis = doc.get("beam_axis", 1)
    if beam_axis not in (0, 1, 2):
        problems.append(Problem(str(path), f"beam_axis must be 0, 1 or 2, got {beam_axis!r}"))
        beam_axis = 1
    return DatasetSpec(root, labeled, unlabeled, labels, image_type, int(beam_axis), "json", problems, validation, test)


def validate_dataset(spec: DatasetSpec, allow_2d: bool = False, num_labels: Optional[int] = None, read: bool = True) -> List[Problem]:
    """All problems of a dataset, one per file and issue. No errors means training can use it.

    Checks: case ids are unique; each labeled case has a label and each label an image; every
    file reads (see :func:`~semisam.volume.read_volume` for what that covers), images are 3D
    (unless ``allow_2d``), finite and not constant; each label lies on its image's grid and
    holds values 0..K (K from ``num_labels``, else the dataset's ``labels``). A label with no
    foreground is a warning.
    """
    problems = list(spec.problems)
    k = num_labels if num_labels is not None else spec.num_labels
    seen: Dict[str, Path] = {}
    for case in spec.labeled + spec.unlabeled + spec.validation + spec.test:
        if case.id in seen:
            problems.append(Problem(str(case.image), f"duplicate case id '{case.id}' (also {seen[case.id]})"))
        else:
            seen[case.id] = case.image
    if not spec.labeled:
        problems.append(Problem(str(spec.root), "no labeled cases: training needs at least one"))
    if not read:
        return problems
    for case in spec.labeled + spec.unlabeled + spec.validation + spec.test:
        image = _try(problems, read_volume, case.image, "image", require_3d=not allow_2d)
        if image is not None:
            try:
                check_not_constant(image, case.image)
            except InputError as exc:
                problems.append(Problem(str(case.image), exc.problem))
        if case.label is None:
            continue
        label = _try(problems, read_volume, case.label, "label")
        if label is None:
            continue
        if image is not None:
            diffs = grid_differences(label, image, names=("label", "image"))
            if diffs:
                problems.append(Problem(str(case.label), "label grid differs from its image: " + "; ".join(diffs)))
        values = np.unique(label.array)
        if k is not None and values.max() > k:
            bad = [int(v) for v in values if v > k]
            problems.append(Problem(str(case.label), f"label values {bad} outside 0..{k} (the dataset declares {k} structure(s))"))
        if values.max() == 0:
            problems.append(Problem(str(case.label), "label has no foreground voxels", "warning"))
    return problems


def _try(problems: List[Problem], fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None with the InputError recorded as a problem."""
    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        problems.append(Problem(exc.path or "?", exc.problem + (f" ({exc.hint})" if exc.hint else "")))
        return None


# --------------------------------------------------------------------------------------------
# Loading with MONAI
# --------------------------------------------------------------------------------------------


def _fingerprint(path: Path) -> str:
    """Changes when the file (or any file of a DICOM folder) changes."""
    items = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in items:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def case_items(spec: DatasetSpec, config: PreprocessConfig) -> List[Dict[str, Any]]:
    """One dict per case, labeled first: the input of ``transforms.LoadCased`` and, hashed,
    the disk-cache key (file size/mtime fingerprints and the preprocessing settings)."""
    cfg = json.dumps(config.to_dict(), sort_keys=True)
    items = []
    for case in spec.labeled + spec.unlabeled:
        items.append(
            {
                "id": case.id,
                "image_path": str(case.image),
                "label_path": str(case.label) if case.label else "",
                "has_label": case.label is not None,
                "fingerprint": _fingerprint(case.image) + (_fingerprint(case.label) if case.label else ""),
                "preprocess": cfg,
            }
        )
    return items


def make_dataset(spec: DatasetSpec, config: Optional[PreprocessConfig] = None, cache: str = "memory", cache_dir: Optional[os.PathLike | str] = None, transform=None):
    """A MONAI dataset of preprocessed cases (labeled first, then unlabeled).

    Args:
        cache: ``"memory"`` (:class:`monai.data.CacheDataset`), ``"disk"``
            (:class:`monai.data.PersistentDataset` in ``cache_dir``; the key includes file
            size/mtime and the preprocessing) or ``"none"``.
        transform: extra (random) transforms applied after loading, e.g. augmentation.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.transforms import Compose

    from .transforms import LoadCased

    config = config or spec.preprocess_config()
    items = case_items(spec, config)
    chain = Compose([LoadCased()] + ([transform] if transform is not None else []))
    if cache == "memory":
        return CacheDataset(items, chain, progress=False, num_workers=0)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir")
        return PersistentDataset(items, chain, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(items, chain)
    raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")


class MixedBatchSampler:
    """Batches of indices mixing labeled and unlabeled cases at a fixed ratio.

    Indices ``0 .. n_labeled-1`` are labeled, ``n_labeled .. n_labeled+n_unlabeled-1``
    unlabeled (the order of :func:`make_dataset`). Batch ``b`` holds
    ``floor((b+1)·B·f) - floor(b·B·f)`` labeled cases (``f`` = labeled fraction, default 1/2),
    so the ratio is exact over an epoch even for batch size 1. An epoch runs until the larger
    pool has been seen once; the smaller pool is reshuffled and cycled. With ``world_size``
    > 1, rank ``r`` gets batches ``r, r + world_size, ...`` of a sequence every rank computes
    identically from ``seed`` and the epoch (call :meth:`set_epoch`).
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, batch_size: int = 2, labeled_fraction: float = 0.5, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n_labeled < 1:
            raise ValueError("need at least one labeled case")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0.0 < labeled_fraction <= 1.0:
            raise ValueError("labeled_fraction must be in (0, 1]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n_labeled, self.n_unlabeled = n_labeled, n_unlabeled
        self.batch_size = batch_size
        self.fraction = 1.0 if n_unlabeled == 0 else labeled_fraction
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _counts(self, n_batches: int) -> List[int]:
        per = self.batch_size * self.fraction
        return [math.floor((b + 1) * per + 1e-9) - math.floor(b * per + 1e-9) for b in range(n_batches)]

    def _n_batches(self) -> int:
        per_l = self.batch_size * self.fraction
        per_u = self.batch_size - per_l
        n = math.ceil(self.n_labeled / per_l)
        if self.n_unlabeled and per_u > 0:
            n = max(n, math.ceil(self.n_unlabeled / per_u))
        return max(self.world_size, math.ceil(n / self.world_size) * self.world_size)

    def _all_batches(self) -> List[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_batches = self._n_batches()
        counts = self._counts(n_batches)

        def stream(n: int, offset: int, total: int) -> Iterator[int]:
            produced = 0
            while produced < total:
                for i in rng.permutation(n):
                    if produced == total:
                        return
                    produced += 1
                    yield int(i) + offset

        need_l = sum(counts)
        need_u = n_batches * self.batch_size - need_l
        lab = stream(self.n_labeled, 0, need_l)
        unl = stream(self.n_unlabeled, self.n_labeled, need_u) if self.n_unlabeled else iter(())
        batches = []
        for c in counts:
            batch = [next(lab) for _ in range(c)] + [next(unl) for _ in range(self.batch_size - c)]
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._all_batches()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self._n_batches() // self.world_size


def make_loader(dataset, sampler: MixedBatchSampler, num_workers: int = 0):
    """A torch DataLoader over ``dataset`` with the mixed batch sampler (MONAI collation)."""
    from monai.data import DataLoader

    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
