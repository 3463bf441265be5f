"""Dataset discovery, the cached MONAI loader and the labeled/unlabeled sampler."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from semisam import data as data_mod
from semisam import volume as volume_mod
from semisam.data import MixedBatchSampler, case_id, load_dataset, make_dataset, make_loader
from semisam.phantom import write_cohort
from semisam.preprocess import PreprocessConfig, PreprocessRecord, invert
from semisam.volume import read_volume, write_volume

SMALL = PreprocessConfig(target_shape=(16, 24, 24), target_spacing=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("data") / "c", n=6, labeled=2, shape=(20, 24, 24), seed=4)


def test_case_ids():
    assert case_id("a/case_01.nii.gz") == "case_01"
    assert case_id("case_01_0000.nii.gz") == "case_01"  # nnU-Net channel suffix
    assert case_id("scan.v2.nrrd") == "scan.v2"


def test_folder_and_json_describe_the_same_cases(cohort, tmp_path):
    from_json = load_dataset(cohort)
    assert from_json.source == "json" and from_json.labels == {0: "background", 1: "target"}
    folder = tmp_path / "folder"
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (folder / sub).mkdir(parents=True)
        for f in (cohort / sub).iterdir():
            suffix = "_0000" if sub != "labelsTr" else ""
            (folder / sub / f.name.replace(".nii.gz", f"{suffix}.nii.gz")).write_bytes(f.read_bytes())
    from_folder = load_dataset(folder)
    assert from_folder.source == "folder" and from_folder.labels is None
    assert [c.id for c in from_folder.labeled] == [c.id for c in from_json.labeled] == ["case_000", "case_001"]
    assert [c.id for c in from_folder.unlabeled] == [c.id for c in from_json.unlabeled]
    assert all(c.label is not None for c in from_folder.labeled)


def test_a_test_split_is_read_and_validated_but_never_trained_on(cohort, tmp_path):
    from semisam.data import validate_dataset

    folder = tmp_path / "folder"
    for src, dst in (("imagesTr", "imagesTr"), ("labelsTr", "labelsTr"), ("imagesUnlabeled", "imagesTs"), ("referenceUnlabeled", "labelsTs")):
        (folder / dst).mkdir(parents=True)
        for f in sorted((cohort / src).iterdir())[:2]:
            (folder / dst / f.name).write_bytes(f.read_bytes())
    spec = load_dataset(folder)
    assert [c.id for c in spec.test] == ["case_002", "case_003"] and all(c.label is not None for c in spec.test)
    assert spec.unlabeled == [] and [c.id for c in spec.labeled] == ["case_000", "case_001"]
    assert [p for p in validate_dataset(spec) if p.severity == "error"] == []
    (folder / "labelsTs" / "case_003.nii.gz").write_bytes(b"not a volume")  # the test split is checked like the rest
    assert any("case_003" in str(p) and p.severity == "error" for p in validate_dataset(load_dataset(folder)))
    for f in (folder / "labelsTs").iterdir():
        f.unlink()
    (folder / "labelsTs").rmdir()
    spec = load_dataset(folder)  # images without labels (nnU-Net's imagesTs): reported, not a test split
    assert spec.test == [] and any("no labelsTs/" in str(p) and p.severity == "warning" for p in spec.problems)
    doc = json.loads((cohort / "dataset.json").read_text())
    doc["test"] = [{"image": e["image"], "label": e["reference"]} for e in doc["unlabeled"][:1]]
    (cohort.parent / "with_test.json").write_text(json.dumps({**doc, "training": [{**e, "image": f"c/{e['image']}", "label": f"c/{e['label']}"} for e in doc["training"]],
                                                            "unlabeled": [], "test": [{"image": f"c/{e['image']}", "label": f"c/{e['label']}"} for e in doc["test"]]}))
    spec = load_dataset(cohort.parent / "with_test.json")
    assert [c.id for c in spec.test] == ["case_002"] and spec.test[0].label.name == "case_002.nii.gz"
    assert [p for p in validate_dataset(spec) if p.severity == "error"] == []


def test_json_accepts_plain_strings_and_reports_bad_entries(tmp_path, cohort):
    doc = {
        "labels": {"0": "background", "1": "target"},
        "training": [{"image": str(cohort / "imagesTr/case_000.nii.gz"), "label": str(cohort / "labelsTr/case_000.nii.gz")}, {"label": "x"}],
        "unlabeled": [str(cohort / "imagesUnlabeled/case_003.nii.gz")],
        "image_type": "doppler",
    }
    (tmp_path / "d.json").write_text(json.dumps(doc))
    spec = load_dataset(tmp_path / "d.json")
    assert [c.id for c in spec.unlabeled] == ["case_003"]
    messages = [str(p) for p in spec.problems]
    assert any("training[1]: needs an 'image' path" in m for m in messages)
    assert any("image_type must be 'bmode' or 'rf', got 'doppler'" in m for m in messages)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(Exception, match="is not valid JSON"):
        load_dataset(tmp_path / "broken.json")


@pytest.mark.parametrize(
    "n_l,n_u,bs",
    [(2, 4, 2), (4, 4, 4), (3, 10, 4), (10, 3, 2), (5, 7, 1), (4, 0, 2), (1, 1, 3)],
)
def test_sampler_mixes_one_to_one(n_l, n_u, bs):
    sampler = MixedBatchSampler(n_l, n_u, batch_size=bs, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(len(b) == bs for b in batches)
    flat = [i for b in batches for i in b]
    labeled = sum(i < n_l for i in flat)
    if n_u == 0:
        assert labeled == len(flat)
    else:
        # exact 1:1 over the epoch (up to one case for odd totals), never all of one kind per
        # pair of batches
        assert abs(labeled - (len(flat) - labeled)) <= 1
        for b in batches:
            assert abs(sum(i < n_l for i in b) - bs / 2) <= 0.5 + 1e-9
    # every case is seen at least once per epoch
    assert set(flat) == set(range(n_l + n_u))


def test_sampler_epochs_ranks_and_determinism():
    a = MixedBatchSampler(4, 12, batch_size=2, seed=7)
    b = MixedBatchSampler(4, 12, batch_size=2, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    ranks = [MixedBatchSampler(4, 12, batch_size=2, seed=7, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1])  # DDP needs equal step counts
    assert per_rank[0] != per_rank[1]
    interleaved = [b for pair in zip(*per_rank) for b in pair]
    assert interleaved == first  # together the ranks see exactly one epoch
    counts = Counter(i for b in first for i in b)
    assert all(counts[i] >= 1 for i in range(16))


def test_sampler_refuses_nonsense():
    with pytest.raises(ValueError, match="at least one labeled"):
        MixedBatchSampler(0, 5)
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        MixedBatchSampler(2, 2, rank=2, world_size=2)


def test_memory_cached_dataset_and_loader(cohort, monkeypatch):
    spec = load_dataset(cohort)
    ds = make_dataset(spec, SMALL, cache="memory")
    assert len(ds) == 6
    item = ds[0]
    assert item["image"].shape == (1, 16, 24, 24) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["has_label"] and int(item["label"].max()) == 1
    assert not ds[3]["has_label"] and int(ds[3]["label"].max()) == 0
    original = read_volume(cohort / "labelsTr/case_000.nii.gz", "label")
    # cached: reading files again is not needed
    monkeypatch.setattr(volume_mod, "read_volume", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    sampler = MixedBatchSampler(len(spec.labeled), len(spec.unlabeled), batch_size=2, seed=0)
    batches = list(make_loader(ds, sampler))
    assert len(batches) == len(sampler)
    for batch in batches:
        assert batch["image"].shape == (2, 1, 16, 24, 24)
        assert batch["has_label"].tolist().count(True) == 1
    # the record maps a prediction back onto the original grid
    record = PreprocessRecord.from_dict(json.loads(item["record"]))
    back = invert(record, item["label"][0].numpy())
    assert back.same_grid(original)
    inter = np.logical_and(back.array > 0, original.array > 0).sum()
    assert 2 * inter / ((back.array > 0).sum() + (original.array > 0).sum()) > 0.8  # 1 mm grid here


def test_disk_cache_is_reused_and_invalidated(cohort, tmp_path, monkeypatch):
    spec = load_dataset(cohort)
    cache = tmp_path / "cache"
    first = make_dataset(spec, SMALL, cache="disk", cache_dir=cache)
    a = first[1]["image"]
    n_files = len(list(cache.iterdir()))
    assert n_files == 1
    calls = []
    real = volume_mod.read_volume
    monkeypatch.setattr(volume_mod, "read_volume", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = make_dataset(spec, SMALL, cache="disk", cache_dir=cache)
    torch.testing.assert_close(again[1]["image"], a)
    assert calls == []  # served from the disk cache
    # another preprocessing configuration is another cache entry
    other = make_dataset(spec, PreprocessConfig(target_shape=(8, 8, 8), target_spacing=(2.0, 2.0, 2.0)), cache="disk", cache_dir=cache)
    assert other[1]["image"].shape == (1, 8, 8, 8)
    assert len(calls) == 2  # image and label read once


def test_changed_file_changes_the_cache_key(cohort, tmp_path):
    spec = load_dataset(cohort)
    before = data_mod.case_items(spec, SMALL)[0]["fingerprint"]
    image_path = spec.labeled[0].image
    vol = read_volume(image_path)
    write_volume(vol.with_array(vol.array * 0.5), tmp_path / "x.nii.gz")
    image_path.write_bytes((tmp_path / "x.nii.gz").read_bytes())
    assert data_mod.case_items(spec, SMALL)[0]["fingerprint"] != before


def test_rf_dataset_is_envelope_detected(tmp_path):
    out = write_cohort(tmp_path / "rf", n=2, labeled=1, shape=(12, 32, 16), rf=True, seed=2)
    spec = load_dataset(out)
    item = make_dataset(spec, spec.preprocess_config(target_shape=(12, 24, 24)), cache="none")[0]
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
