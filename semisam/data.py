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

  Paths are relative to the JSON file; ``id`` defaults to the image's case id. Or
* an nnU-Net v2 raw data set, read as it is (``DatasetSpec.source == "nnunet-v2"``)::

      dataset.json  {"channel_names": {"0": "US"}, "labels": {"background": 0, "target": 1},
                     "numTraining": 3, "file_ending": ".nii.gz"}
      imagesTr/<case>_0000.nii.gz   labelsTr/<case>.nii.gz   imagesTs/<case>_0000.nii.gz

  It is recognised by ``channel_names`` or ``file_ending`` (or a ``dataset`` of cases, or
  ``labels`` mapping names to values without a ``training`` list). Cases come from
  ``imagesTr/*_0000<file_ending>`` (or nnU-Net's optional ``"dataset": {case: {"images": [..],
  "label": ..}}``); ``numTraining`` must match them. One channel only (``_0000``; SemiSAM
  segments single-channel images); ``channel_names`` are recorded, nothing else. Labels are
  plain integers 0..K without gaps (no regions, no ``ignore``). ``imagesTs/`` is the test split
  with ``labelsTs/`` (nnU-Net has no such folder; without it, a warning), ``imagesVal/`` +
  ``labelsVal/`` validation cases. Unlabeled images: SemiSAM's ``"unlabeled"`` key (a folder,
  or a list of folders and image files, relative to dataset.json), else ``imagesUnlabeled/``;
  there any format SemiSAM reads, and with ``_XXXX`` names only ``_0000``. ``image_type`` and
  ``beam_axis`` work as in SemiSAM's dataset.json.
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
NNUNET_V2 = "nnunet-v2"  # DatasetSpec.source of an nnU-Net v2 raw data set


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
    channel_names: Optional[Dict[str, str]] = None  # nnU-Net v2's channel_names, recorded only (e.g. {"0": "US"})
    file_ending: Optional[str] = None  # nnU-Net v2's file_ending (".nii.gz")

    @property
    def format_description(self) -> str:
        """Which dataset format was recognised, in one line (``semisam validate`` prints it)."""
        if self.source == NNUNET_V2:
            keys = []
            if self.channel_names is not None:
                keys.append("channel_names " + json.dumps(self.channel_names))
            keys.append(f"file_ending {self.file_ending}" if self.file_ending else "no usable file_ending")
            return f"nnU-Net v2 raw (dataset.json with {', '.join(keys)})"
        if self.source == "json":
            return "SemiSAM dataset.json (case lists: training, unlabeled, validation, test)"
        return "folder layout (imagesTr/ + labelsTr/, imagesUnlabeled/; no dataset.json)"

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
    if isinstance(doc, dict) and _is_nnunet_v2(doc):
        return _load_nnunet_v2(path, doc)
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
            hint = ""
            if isinstance(doc["labels"], dict) and any(_is_label_value(v) for v in doc["labels"].values()):
                hint = (" (it maps names to values, as nnU-Net v2 does: an nnU-Net v2 dataset.json also has 'channel_names' and "
                        "'file_ending' and no 'training' list; add those, or write {\"0\": \"background\", \"1\": \"target\"} here)")
            problems.append(Problem(str(path), "'labels' must map label values (0..K) to names" + hint))
        else:
            if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
                problems.append(Problem(str(path), f"'labels' must name 0 (background) and 1..K without gaps, got {sorted(labels)}"))
    image_type, beam_axis = _ultrasound_keys(doc, path, problems)
    return DatasetSpec(root, labeled, unlabeled, labels, image_type, beam_axis, "json", problems, validation, test)


def _ultrasound_keys(doc: Dict[str, Any], path: Path, problems: List[Problem]) -> tuple:
    """SemiSAM's ``image_type`` ("bmode" | "rf") and ``beam_axis`` (0, 1, 2) of a dataset.json."""
    image_type = str(doc.get("image_type", "bmode")).lower()
    if image_type not in ("bmode", "rf"):
        problems.append(Problem(str(path), f"image_type must be 'bmode' or 'rf', got {image_type!r}"))
        image_type = "bmode"
    beam_axis = doc.get("beam_axis", 1)
    if beam_axis not in (0, 1, 2):
        problems.append(Problem(str(path), f"beam_axis must be 0, 1 or 2, got {beam_axis!r}"))
        beam_axis = 1
    return image_type, int(beam_axis)


# --------------------------------------------------------------------------------------------
# nnU-Net v2 raw data sets
# --------------------------------------------------------------------------------------------

_NNUNET_KEYS = ("channel_names", "file_ending", "dataset")
_LABELS_EXAMPLE = '{"background": 0, "target": 1}'


def _is_label_value(value: Any) -> bool:
    """An nnU-Net v2 label value: an integer, or a list of integers (a region)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, (list, tuple))


def _is_nnunet_v2(doc: Dict[str, Any]) -> bool:
    """nnU-Net v2's dataset.json: it has ``channel_names``, ``file_ending`` or a ``dataset`` of
    cases; or, without SemiSAM's ``training`` list, ``labels`` mapping names to values."""
    if "channel_names" in doc or "file_ending" in doc or isinstance(doc.get("dataset"), dict):
        return True
    labels = doc.get("labels")
    return "training" not in doc and isinstance(labels, dict) and bool(labels) and all(_is_label_value(v) for v in labels.values())


def _names(paths: List[Path], n: int = 3) -> str:
    return ", ".join(p.name for p in paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _entries(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _nnunet_path(root: Path, rel: str) -> Path:
    """A path of nnU-Net's ``dataset`` entries: environment variables expanded, relative to the data set."""
    rel = os.path.expandvars(rel)
    return Path(rel) if os.path.isabs(rel) else root / rel


def _guess_file_ending(folder: Path) -> Optional[str]:
    """The one volume ending of the ``<case>_XXXX`` files in ``folder`` (None: none or several)."""
    endings = set()
    for p in _entries(folder):
        stem = strip_suffix(p)
        if p.is_file() and stem != p.name and _CHANNEL_SUFFIX.search(stem):
            endings.add(p.name[len(stem):])
    return endings.pop() if len(endings) == 1 else None


def _nnunet_labels(raw: Any, where: str, problems: List[Problem]) -> Optional[Dict[int, str]]:
    """nnU-Net v2's ``labels`` (name -> value) as SemiSAM's value -> name; problems recorded."""
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem(where, f"'labels' must map structure names to label values, e.g. {_LABELS_EXAMPLE}"))
        return None
    regions = [str(name) for name, v in raw.items() if isinstance(v, (list, tuple))]
    if regions:
        problems.append(Problem(where, f"'labels' {', '.join(map(repr, regions))}: regions (lists of values, nnU-Net's region-based "
                                       f"training); SemiSAM needs plain integer labels: give each structure one value, e.g. "
                                       f"{_LABELS_EXAMPLE}, and write those values into the label maps"))
        return None
    if all(isinstance(v, str) and not v.strip().isdigit() for v in raw.values()) and all(str(k).strip().isdigit() for k in raw):
        swapped = "{" + ", ".join(f"{json.dumps(v)}: {int(k)}" for k, v in raw.items()) + "}"
        problems.append(Problem(where, f"'labels' maps values to names (the MSD / nnU-Net v1 direction); nnU-Net v2 maps names to "
                                       f"values: write \"labels\": {swapped}"))
        return None
    by_value: Dict[int, str] = {}
    for name, v in raw.items():
        value = v if isinstance(v, int) and not isinstance(v, bool) else int(v) if isinstance(v, str) and v.strip().isdigit() else None
        if value is None or value < 0:
            problems.append(Problem(where, f"'labels': {name!r} has value {v!r}; label values are whole numbers 0..K, e.g. {_LABELS_EXAMPLE}"))
            return None
        if value in by_value:
            problems.append(Problem(where, f"'labels': {by_value[value]!r} and {name!r} have the same value {value}: give each structure its own value"))
            return None
        by_value[value] = str(name)
    ignore = [v for v, name in by_value.items() if name == "ignore"]
    if ignore:
        problems.append(Problem(where, f"'labels' has nnU-Net's 'ignore' label (value {ignore[0]}: voxels left unannotated); SemiSAM "
                                       "trains on fully labeled cases: give those voxels a structure or 0 (background) and drop "
                                       "'ignore', or move partly labeled cases to imagesUnlabeled/"))
        return None
    values = sorted(by_value)
    if len(values) < 2 or values != list(range(len(values))):
        problems.append(Problem(where, f"'labels' values must be 0 (background) and 1..K without gaps, got {values}: "
                                       + (f"renumber the label maps to 0..{len(values) - 1} and 'labels' to match" if len(values) >= 2
                                          else f"name the background 0 and at least one structure, e.g. {_LABELS_EXAMPLE}")))
    return by_value


def _other_files(folder: Path, others: List[Path], ending: str, problems: List[Problem]) -> None:
    """Files in an nnU-Net folder without the data set's file_ending: volumes of another
    format are an error (nnU-Net reads one format per data set), anything else a warning."""
    volumes = [p for p in others if p.is_dir() or any(p.name.lower().endswith(s) for s in FORMATS)]
    rest = [p for p in others if p not in volumes]
    if volumes:
        problems.append(Problem(str(folder), f"{len(volumes)} file(s) do not end with file_ending '{ending}' and are not read "
                                             f"({_names(volumes)}): a data set has one format (nnU-Net's rule); convert them to "
                                             f"{ending} or remove them"))
    if rest:
        problems.append(Problem(str(folder), f"{len(rest)} file(s) that are not {ending} volumes are ignored ({_names(rest)})", "warning"))


def _nnunet_folder_cases(root: Path, image_dir: str, label_dir: str, ending: str, problems: List[Problem],
                         channels_reported: bool) -> List[Case]:
    """``image_dir/<case>_0000<ending>`` paired with ``label_dir/<case><ending>``."""
    folder = root / image_dir
    images: Dict[str, Path] = {}
    others: List[Path] = []
    unsuffixed: List[Path] = []
    extra: Dict[str, List[Path]] = {}
    for p in _entries(folder):
        if not (p.is_file() and p.name.endswith(ending)):
            others.append(p)
            continue
        m = re.fullmatch(r"(.+)_(\d{4})", p.name[: -len(ending)])
        if not m:
            unsuffixed.append(p)
        elif m.group(2) == "0000":
            images[m.group(1)] = p
        else:
            extra.setdefault("_" + m.group(2), []).append(p)
    _other_files(folder, others, ending, problems)
    if unsuffixed:
        problems.append(Problem(str(folder), f"{len(unsuffixed)} image(s) without nnU-Net's channel suffix ({_names(unsuffixed)}): "
                                             f"name them <case>_0000{ending}"))
    if extra and not channels_reported:
        files = [p for ps in extra.values() for p in ps]
        problems.append(Problem(str(folder), f"holds other channels than _0000 ({', '.join(sorted(extra))}: {_names(files)}); SemiSAM "
                                             f"segments single-channel images: keep the one channel to segment as <case>_0000{ending} "
                                             f"and move the other channels' files out"))
    label_folder = root / label_dir
    if images and not label_folder.is_dir():
        problems.append(Problem(str(label_folder), f"does not exist: every image in {image_dir}/ needs its label map "
                                                   f"{label_dir}/<case>{ending}"))
    labels: Dict[str, Path] = {}
    label_others: List[Path] = []
    for p in _entries(label_folder):
        if p.is_file() and p.name.endswith(ending):
            labels[p.name[: -len(ending)]] = p
        else:
            label_others.append(p)
    _other_files(label_folder, label_others, ending, problems)
    cases = []
    for cid in sorted(images):
        label = labels.pop(cid, None)
        if label is None and label_folder.is_dir():
            problems.append(Problem(str(images[cid]), f"no label for case '{cid}': expected {label_dir}/{cid}{ending}"))
        cases.append(Case(cid, images[cid], label))
    for cid, p in labels.items():
        hint = " (a label map has no channel suffix: rename it)" if _CHANNEL_SUFFIX.search(cid) else ""
        problems.append(Problem(str(p), f"label without an image: no {image_dir}/{cid}_0000{ending}{hint}"))
    return cases


def _nnunet_listed_cases(entries: Any, root: Path, where: str, problems: List[Problem], channels_reported: bool) -> List[Case]:
    """nnU-Net v2's optional ``"dataset": {case: {"images": [path], "label": path}}``."""
    if not isinstance(entries, dict):
        problems.append(Problem(where, "'dataset' must map case identifiers to {\"images\": [path], \"label\": path}"))
        return []
    cases, several = [], []
    for cid, item in entries.items():
        images = item.get("images") if isinstance(item, dict) else None
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            problems.append(Problem(where, f"'dataset' case {cid!r}: needs \"images\": [path] and \"label\": path"))
            continue
        if len(images) > 1:
            several.append(str(cid))
        label = item.get("label")
        if not isinstance(label, str):
            problems.append(Problem(where, f"'dataset' case {cid!r}: no \"label\" given (every nnU-Net training case has one)"))
        cases.append(Case(str(cid), _nnunet_path(root, images[0]), _nnunet_path(root, label) if isinstance(label, str) else None))
    if several and not channels_reported:
        problems.append(Problem(where, f"'dataset' lists several images (channels) for {len(several)} case(s) ({', '.join(several[:3])}); "
                                       "SemiSAM segments single-channel images: list one image per case"))
    return cases


def _unlabeled_folder(folder: Path, problems: List[Problem], channels_reported: bool) -> List[Case]:
    """Every volume in ``folder`` (any format SemiSAM reads); when names carry channel suffixes,
    only the ``_0000`` channel."""
    entries = _volume_entries(folder)
    suffixed = any(strip_suffix(p).endswith("_0000") for p in entries)
    cases, extra = [], []
    for p in entries:
        m = _CHANNEL_SUFFIX.search(strip_suffix(p))
        if suffixed and m and m.group() != "_0000":
            extra.append(p)
        else:
            cases.append(Case(case_id(p), p))
    if extra and not channels_reported:
        problems.append(Problem(str(folder), f"holds other channels than _0000 ({_names(extra)}); SemiSAM segments single-channel "
                                             "images: keep one channel per case and move the other files out"))
    return cases


def _nnunet_unlabeled(doc: Dict[str, Any], root: Path, where: str, problems: List[Problem], channels_reported: bool) -> List[Case]:
    """Unlabeled images: dataset.json's ``"unlabeled"`` (a folder or a list of folders / image
    files, relative to it; SemiSAM's key, nnU-Net ignores it), else ``imagesUnlabeled/``."""
    plain = root / "imagesUnlabeled"
    given = doc.get("unlabeled")
    if given is None:
        return _unlabeled_folder(plain, problems, channels_reported)
    items = [given] if isinstance(given, (str, dict)) else given
    if not isinstance(items, list):
        problems.append(Problem(where, "'unlabeled' must name a folder of unlabeled images (e.g. \"imagesUnlabeled\") or list folders "
                                       f"and image files, got {given!r}"))
        return []
    cases: List[Case] = []
    folders = []
    for i, item in enumerate(items):
        rel = item.get("image") if isinstance(item, dict) else item
        if not isinstance(rel, str):
            problems.append(Problem(where, f"'unlabeled'[{i}]: must be a folder or an image path (relative to dataset.json), got {item!r}"))
            continue
        target = _nnunet_path(root, rel)
        if target.is_dir() and not _is_dicom_series(target):
            folders.append(target.resolve())
            found = _unlabeled_folder(target, problems, channels_reported)
            if not found:
                problems.append(Problem(str(target), "named in dataset.json's 'unlabeled' but holds no images", "warning"))
            cases += found
        elif target.exists():
            ref = item.get("reference") if isinstance(item, dict) else None
            cases.append(Case(str(item.get("id") or case_id(target)) if isinstance(item, dict) else case_id(target), target,
                              reference=root / ref if isinstance(ref, str) else None))
        else:
            problems.append(Problem(where, f"'unlabeled' names {rel}, which does not exist: give a folder of unlabeled images "
                                           "(e.g. \"imagesUnlabeled\") or image files, relative to dataset.json"))
    if plain.is_dir() and plain.resolve() not in folders and _volume_entries(plain):
        problems.append(Problem(str(plain), "not read: dataset.json's 'unlabeled' names other images; add \"imagesUnlabeled\" to it "
                                            "to use these too", "warning"))
    return cases


def _is_dicom_series(folder: Path) -> bool:
    """A folder of files none of which is a volume or a folder: one DICOM series (an image)."""
    entries = _entries(folder)
    return bool(entries) and not any(p.is_dir() or any(p.name.lower().endswith(s) for s in FORMATS) for p in entries)


def _load_nnunet_v2(path: Path, doc: Dict[str, Any]) -> DatasetSpec:
    """An nnU-Net v2 raw data set as it is (see the module docstring)."""
    root = path.parent
    where = str(path)
    problems: List[Problem] = []
    keys = ", ".join(k for k in _NNUNET_KEYS if k in doc) or "'labels' mapping names to values"

    channel_names = None
    channels = doc.get("channel_names")
    if channels is None:
        problems.append(Problem(where, "nnU-Net v2 dataset.json without 'channel_names' (nnU-Net needs it, SemiSAM only records it): "
                                       "add e.g. \"channel_names\": {\"0\": \"US\"}", "warning"))
    elif not isinstance(channels, dict) or not channels:
        problems.append(Problem(where, f"'channel_names' must map channel numbers to names, e.g. {{\"0\": \"US\"}}, got {channels!r}"))
    else:
        channel_names = {str(k): str(v) for k, v in channels.items()}
    multi = channel_names is not None and len(channel_names) > 1
    if multi:
        problems.append(Problem(where, f"'channel_names' declares {len(channel_names)} channels {json.dumps(channel_names)}; SemiSAM "
                                       "segments single-channel images: keep the one channel to segment (files <case>_0000, "
                                       "\"channel_names\": {\"0\": ...}) and move the other channels' files out"))

    guessed = _guess_file_ending(root / "imagesTr")
    ending = doc.get("file_ending")
    if ending is None:
        if "dataset" not in doc:  # with a 'dataset' of cases nnU-Net does not need it either
            problems.append(Problem(where, "nnU-Net v2 dataset.json without 'file_ending': add "
                                           + (f"\"file_ending\": \"{guessed}\" (what the images in imagesTr/ end with)" if guessed
                                              else "the ending all images and labels have, e.g. \"file_ending\": \".nii.gz\"")))
        ending = guessed
    elif not isinstance(ending, str) or not ending.startswith("."):
        problems.append(Problem(where, f"'file_ending' must be the files' ending with its dot, e.g. \".nii.gz\", got {ending!r}"))
        ending = guessed
    elif ending.lower() not in FORMATS:
        problems.append(Problem(where, f"file_ending {ending!r}: SemiSAM does not read this format; convert images and labels to "
                                       f"one of {', '.join(FORMATS)} (e.g. .nii.gz) and set file_ending to it"))
        ending = None

    labels = _nnunet_labels(doc.get("labels"), where, problems)

    if "dataset" in doc:
        labeled, found_in = _nnunet_listed_cases(doc["dataset"], root, where, problems, multi), "'dataset'"
    else:
        labeled, found_in = (_nnunet_folder_cases(root, "imagesTr", "labelsTr", ending, problems, multi) if ending else []), "imagesTr/"

    n = doc.get("numTraining")
    if n is None:
        problems.append(Problem(where, f"nnU-Net v2 dataset.json without 'numTraining' (nnU-Net checks it, SemiSAM counts the cases): "
                                       f"add \"numTraining\": {len(labeled)}", "warning"))
    elif not isinstance(n, int) or isinstance(n, bool):
        problems.append(Problem(where, f"'numTraining' must be the number of training cases, got {n!r}"))
    elif (ending or "dataset" in doc) and n != len(labeled):
        problems.append(Problem(where, f"'numTraining' is {n} but {found_in} holds {len(labeled)} training case(s): set numTraining "
                                       f"to {len(labeled)}, or add the missing cases (image and label)"))

    if isinstance(doc.get("training"), list):  # an MSD / nnU-Net v1 list left in, or SemiSAM's
        listed = {case_id(e.get("image", "") if isinstance(e, dict) else str(e)) for e in doc["training"]}
        if listed == {c.id for c in labeled}:
            problems.append(Problem(where, "its 'training' list (MSD / nnU-Net v1) names the same cases as imagesTr/ and is not "
                                           "read", "warning"))
        else:
            problems.append(Problem(where, f"mixes two formats: nnU-Net v2 ({keys}) and a 'training' list naming other cases "
                                           f"({len(listed)} listed, {len(labeled)} in {found_in}); nnU-Net v2 reads imagesTr/ + "
                                           f"labelsTr/: remove the 'training' list, or remove {keys} to train on the list"))
    for key, folders in (("validation", "imagesVal/ + labelsVal/"), ("test", "imagesTs/ + labelsTs/")):
        if key in doc:
            problems.append(Problem(where, f"mixes two formats: nnU-Net v2 ({keys}) and SemiSAM's '{key}' list, which is not read "
                                           f"here: put those cases in {folders}, or remove {keys} to use the lists"))

    validation: List[Case] = []
    test: List[Case] = []
    if ending:
        if (root / "imagesVal").is_dir():
            validation = _nnunet_folder_cases(root, "imagesVal", "labelsVal", ending, problems, multi)
        if (root / "labelsTs").is_dir():
            test = _nnunet_folder_cases(root, "imagesTs", "labelsTs", ending, problems, multi)
        elif any(p.name.endswith(ending) for p in _entries(root / "imagesTs")):
            problems.append(Problem(str(root / "imagesTs"), f"no labelsTs/ beside it (nnU-Net keeps no test labels): not used as a test "
                                                            f"split; put their labels in labelsTs/<case>{ending} to score on them", "warning"))
    unlabeled = _nnunet_unlabeled(doc, root, where, problems, multi)
    image_type, beam_axis = _ultrasound_keys(doc, path, problems)
    return DatasetSpec(root, labeled, unlabeled, labels, image_type, beam_axis, NNUNET_V2, problems, validation, test,
                       channel_names, ending)


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
