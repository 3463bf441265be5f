"""`semisam plan`: fingerprint -> plan (spacing, tiles, encoder side, costs) -> config."""

from __future__ import annotations

import gzip
import shutil
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import oblique, shared_dataset
from semisam.cli import main
from semisam.config import TrainConfig, load_config
from semisam.phantom import write_cohort
from semisam.plan import (
    CPU_SECONDS_PER_TILE, CaseRecord, PlanError, apply_plan, embedding_bytes, fingerprint, make_plan, nonzero_box,
    pick_tile, tiles_along, update_config_file,
)
from semisam.volume import Volume, read_header, read_volume, write_volume

PLANNED = ("preprocess.target_spacing", "encoder.input_size", "preprocess.target_shape", "student.block_depth",
           "preprocess.tile_overlap", "preprocess.crop")


def dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def record(cid: str, shape, spacing, role="labeled", direction=None) -> CaseRecord:
    """A fingerprint record without a file (headers only: the whole grid is the field of view)."""
    d = np.eye(3) if direction is None else np.asarray(direction)
    from semisam.plan import orientation_code

    return CaseRecord(cid, role, f"{cid}.nii.gz", tuple(shape), tuple(spacing), tuple(d.ravel()), orientation_code(d))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """6 phantoms (2 labeled, 4 unlabeled) + 1 validation, 40 x 48 x 48 voxels."""
    return write_cohort(tmp_path_factory.mktemp("plan") / "cohort", 6, 2, (40, 48, 48), seed=0, validation=1)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def test_read_header_matches_read_volume(tmp_path):
    vol = Volume(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7), (0.5, 0.7, 2.5), (1.0, -2.0, 3.0), oblique())
    for name in ("a.nii.gz", "a.nrrd", "a.mha"):
        write_volume(vol, tmp_path / name)
        header, full = read_header(tmp_path / name), read_volume(tmp_path / name)
        assert header.shape == full.shape == (5, 6, 7)
        np.testing.assert_allclose(header.spacing, full.spacing, atol=1e-6)
        np.testing.assert_allclose(header.direction, full.direction, atol=1e-6)
        assert not header.was_2d
    write_volume(Volume(np.ones((1, 6, 9), np.float32), (0.3, 0.4, 1.0)), tmp_path / "b.png")
    header = read_header(tmp_path / "b.png")
    assert header.was_2d and header.shape == (1, 6, 9) and header.spacing[:2] == pytest.approx((0.3, 0.4))


def test_nonzero_box_in_slabs_equals_the_whole_mask():
    rng = np.random.default_rng(0)
    arr = np.zeros((30, 20, 25), np.float32)
    arr[4:17, 3:19, 9:21] = rng.random((13, 16, 12)) + 0.1
    arr[10, 2, 22] = -1.0  # a lone negative voxel counts too
    expected = ((4, 16), (2, 18), (9, 22))
    assert nonzero_box(arr, slab_voxels=20 * 25) == expected  # one slice per slab
    assert nonzero_box(arr) == expected
    assert nonzero_box(np.zeros((3, 4, 5))) is None
    rgb = np.zeros((1, 6, 7, 3), np.uint8)
    rgb[0, 2, 3, 1] = 9
    assert nonzero_box(rgb) == ((0, 0), (2, 2), (3, 3))


def test_tiles_and_tile_sides():
    assert tiles_along(128, 128, 0.25) == 1
    assert tiles_along(129, 128, 0.25) == 2  # stride 96
    assert tiles_along(224, 128, 0.25) == 2
    assert tiles_along(225, 128, 0.25) == 3
    assert tiles_along(300, 128, 0.0) == 3
    assert pick_tile(128, 48) == 64  # at least half the input side
    assert pick_tile(128, 90) == 96  # 3 x the 32-token grid: one tile
    assert pick_tile(128, 128) == 128
    assert pick_tile(128, 400) == 128  # larger fields of view are tiled at one voxel per pixel
    assert pick_tile(256, 150) == 192
    assert embedding_bytes(128) == 256 * 32 * 32 * 2 and embedding_bytes(256) == 4 * embedding_bytes(128)


# ------------------------------------------------------------------------------------------
# Phantom cohort
# ------------------------------------------------------------------------------------------


def test_phantom_cohort_plan(cohort):
    records = fingerprint(cohort)
    assert [r.role for r in records] == ["labeled"] * 2 + ["unlabeled"] * 4 + ["validation"]
    # the non-zero box is the one of the voxels (the phantom's sector is zero outside)
    vol = read_volume(records[0].path)
    nz = np.nonzero(vol.array)
    assert records[0].fov_box == tuple((int(a.min()), int(a.max())) for a in nz)
    assert records[0].shape == vol.shape and records[0].spacing == pytest.approx(vol.spacing)

    plan = make_plan(records, "cpu", cores=2)
    spacings = np.array([r.spacing for r in records])
    # phantoms: x 0.75-1.0, y 0.55-0.7, z 1.05-1.4 mm: not anisotropic, medians everywhere
    np.testing.assert_allclose(plan.target_spacing, np.median(spacings, axis=0), atol=1e-4)
    assert "median of 7 volumes (not anisotropic" in plan.reasons["preprocess.target_spacing"]
    assert plan.input_size == 128
    assert plan.tile == 64 and plan.tiles_per_slice == (1, 1)  # 48-voxel fields of view: one 64 tile
    assert plan.block_depth == 16 and plan.target_shape == (16, 64, 64)
    assert plan.tile_overlap == 0.25 and plan.crop == "whole"
    depth = [int(np.ceil((hi - lo + 1) * r.spacing[2] / plan.target_spacing[2] - 0.05)) for r in records for lo, hi in [r.fov_box[0]]]
    assert plan.median_shape[0] == int(np.median(depth))
    student = sum(depth)
    views = sum(depth[2:6])  # one in-plane teacher view of each unlabeled case (pseudo.views 2)
    assert plan.slice_tiles_total == student + views
    assert plan.embedding_seconds == pytest.approx(plan.slice_tiles_total * CPU_SECONDS_PER_TILE[128])
    assert plan.embedding_gb == pytest.approx(student * embedding_bytes(128) / 2**30)
    assert plan.training_seconds > 0 and plan.training_steps > 0
    assert set(plan.settings()) == set(PLANNED)

    four = make_plan(records, "cpu", cores=4)  # twice the cores, half the time
    assert four.embedding_seconds == pytest.approx(plan.embedding_seconds / 2)
    gpu = make_plan(records, "cuda", cores=2)
    assert gpu.input_size == 256 and gpu.tile == 128 and gpu.target_spacing == plan.target_spacing
    assert gpu.training_seconds is None


def test_cli_plan_prints_reasons_and_json_and_creates_a_config(cohort, tmp_path, capsys):
    path = tmp_path / "cfgs" / "train.yaml"
    assert main(["plan", str(cohort), "--device", "cpu", "--json", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    doc = last_json(out)
    expected = make_plan(fingerprint(cohort), "cpu").settings()
    assert doc["settings"] == expected and doc["config"] == str(path)
    for key in PLANNED:  # one line per key, with its reason
        assert any(line.strip().startswith(f"{key}:") and " -- " in line for line in out.splitlines()), key
    assert "medians of 7 volumes" in out and "embedding:" in out and "training:" in out
    cfg = load_config(path)  # the defaults plus the plan; the dataset relative to the file
    assert Path(cfg.dataset) == cohort.resolve()
    assert list(cfg.preprocess.target_spacing) == expected["preprocess.target_spacing"]
    assert list(cfg.preprocess.target_shape) == expected["preprocess.target_shape"]
    assert cfg.preprocess.crop == "whole" and cfg.preprocess.tile_overlap == 0.25
    assert cfg.encoder.input_size == 128 and cfg.student.block_depth == 16
    assert cfg.phases.semi.epochs == TrainConfig().phases.semi.epochs


def test_config_update_changes_only_the_planned_keys(cohort, tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    text = (
        "# my experiment, keep this line\n"
        f"dataset: {cohort}   # my data\n"
        "output: runs/x\n"
        "seed: 3\n"
        "preprocess:\n"
        "  target_spacing: [1, 1, 1]  # old value\n"
        "  crop: fov\n"
        "phases:\n"
        "  semi:\n"
        "    epochs: 7\n"
        "    lr: 1e-4\n"
    )
    path.write_text(text)
    assert main(["plan", str(cohort), "--device", "cpu", "--config", str(path)]) == 0
    assert "other settings kept" in capsys.readouterr().out
    new = path.read_text()
    data = yaml.safe_load(new)
    settings = make_plan(fingerprint(cohort), "cpu").settings()
    for key, value in settings.items():
        assert dotted(data, key) == value, key
    assert data["output"] == "runs/x" and data["seed"] == 3 and data["dataset"] == str(cohort)
    assert data["phases"]["semi"] == {"epochs": 7, "lr": "1e-4"}
    assert "# my experiment, keep this line" in new and "# my data" in new  # edited in place
    assert set(data) == {"dataset", "output", "seed", "preprocess", "phases", "encoder", "student"}  # nothing else added
    assert load_config(path).phases.semi.epochs == 7

    flow = tmp_path / "flow.yaml"  # flow style cannot be edited in place: rewritten, values kept
    flow.write_text("preprocess: {target_spacing: [1, 1, 1]}\nphases: {semi: {epochs: 7}}\n")
    update_config_file(flow, make_plan(fingerprint(cohort), "cpu"), cohort)
    cfg = load_config(flow)
    assert cfg.phases.semi.epochs == 7 and list(cfg.preprocess.target_spacing) == settings["preprocess.target_spacing"]
    assert Path(cfg.dataset) == cohort.resolve()  # filled in: it was missing


def test_init_config_with_a_dataset_fills_the_planned_keys(cohort, tmp_path, capsys):
    out = tmp_path / "init.yaml"
    assert main(["init-config", str(out), "--dataset", str(cohort), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "preprocess.target_spacing:" in printed and f"wrote {out}" in printed
    data = yaml.safe_load(out.read_text())
    for key, value in make_plan(fingerprint(cohort), "cpu").settings().items():
        assert dotted(data, key) == value, key
    assert main(["init-config", str(tmp_path / "x.yaml"), "--dataset", str(tmp_path / "missing")]) == 2
    assert "--no-plan" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
    plain = tmp_path / "plain.yaml"
    assert main(["init-config", str(plain), "--dataset", str(cohort), "--no-plan"]) == 0
    data = yaml.safe_load(plain.read_text())
    assert data["preprocess"]["target_shape"] == list(TrainConfig().preprocess.target_shape)
    assert data["preprocess"]["crop"] == TrainConfig().preprocess.crop
    # apply_plan is the same thing in Python
    cfg = apply_plan(TrainConfig(), make_plan(fingerprint(cohort), "cuda"))
    assert cfg.encoder.input_size == 256 and cfg.preprocess.target_shape[1:] == (128, 128)


# ------------------------------------------------------------------------------------------
# Real data: PROMISE12 prostate MR as a SemiSAM dataset folder
# ------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_promise12_plan(tmp_path, capsys):
    src = shared_dataset("promise12")
    root = tmp_path / "promise12"
    spacing = (0.6, 0.6, 2.0)  # no geometry survives in this source: a plausible one
    for i in range(20):
        image = np.load(gzip.open(src / f"image_train{i:02d}.npy.gz")).astype(np.float32)
        folder = "imagesTr" if i < 8 else "imagesUnlabeled"
        write_volume(Volume(image, spacing), root / folder / f"case_{i:02d}.nii.gz")
        if i < 8:
            label = np.load(gzip.open(src / f"label_train{i:02d}.npy.gz")).astype(np.uint8)
            write_volume(Volume(label, spacing), root / "labelsTr" / f"case_{i:02d}.nii.gz")
    assert main(["plan", str(root), "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    doc = last_json(out)
    s = doc["settings"]
    # 32 x 128 x 128 at 0.6 x 0.6 x 2.0 mm: z is anisotropic (2.0 > 3 x 0.6, 32 < 128 / 3) -> 10th percentile
    assert s["preprocess.target_spacing"] == [0.6, 0.6, 2.0]
    assert "10th percentile" in doc["reasons"]["preprocess.target_spacing"]
    assert s["encoder.input_size"] == 128 and s["preprocess.target_shape"] == [16, 128, 128]
    assert s["student.block_depth"] == 16 and doc["median_shape"] == [32, 128, 128]
    assert doc["tiles_per_slice"] == [1, 1] and doc["slice_tiles_per_volume"] == 32
    assert doc["slice_tiles_total"] == 20 * 32 + 12 * 32  # + one in-plane teacher view per unlabeled case
    assert doc["cases"] == {"labeled": 8, "unlabeled": 12, "validation": 0}
    assert doc["segment_seconds_per_volume"] == pytest.approx(32 * doc["seconds_per_tile"], abs=0.01)
    assert not doc["outliers"]
    # the same cohort in nnU-Net v2's raw layout plans the same
    nn = tmp_path / "Dataset512_Prostate"
    for path in sorted(root.rglob("*.nii.gz")):
        folder, name = path.parent.name, path.name[: -len(".nii.gz")]
        (nn / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, nn / folder / (f"{name}_0000.nii.gz" if folder != "labelsTr" else path.name))
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1},
                                                 "numTraining": 8, "file_ending": ".nii.gz"}))
    assert main(["plan", str(nn), "--device", "cpu", "--json"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["settings"] == s and again["cases"] == doc["cases"]


# ------------------------------------------------------------------------------------------
# Spacing rules, bad input
# ------------------------------------------------------------------------------------------


def test_anisotropic_axis_takes_its_tenth_percentile():
    zs = [1.0, 1.2, 3.0, 4.0, 4.0, 4.0, 5.0, 5.0, 5.0, 6.0]
    records = [record(f"c{i}", (20, 100, 100), (0.5, 0.5, z)) for i, z in enumerate(zs)]
    plan = make_plan(records, "cpu", cores=2)
    p10 = float(np.percentile(zs, 10))  # 1.18
    assert plan.target_spacing == (0.5, 0.5, pytest.approx(p10, abs=1e-4))
    assert "10th percentile" in plan.reasons["preprocess.target_spacing"] and "not the median 4 mm" in plan.reasons["preprocess.target_spacing"]
    # as many slices as in-plane voxels: anisotropic spacing alone keeps the median (nnU-Net needs both)
    thick = [record(f"c{i}", (100, 100, 100), (0.5, 0.5, z)) for i, z in enumerate(zs)]
    plan = make_plan(thick, "cpu", cores=2)
    assert plan.target_spacing[2] == 4.0 and "nnU-Net keeps the median" in plan.reasons["preprocess.target_spacing"]
    # a 10th percentile finer than the other axes is raised to the coarsest of them
    zs = [0.3, 0.3, 0.3, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    clamp = [record(f"c{i}", (20, 100, 100), (0.5, 0.6, z)) for i, z in enumerate(zs)]
    plan = make_plan(clamp, "cpu", cores=2)
    assert plan.target_spacing == (0.5, 0.6, 0.6) and "raised from 0.3" in plan.reasons["preprocess.target_spacing"]
    # not anisotropic: the median
    plan = make_plan([record(f"c{i}", (40, 64, 64), (0.5, 0.5, z)) for i, z in enumerate([1.0, 1.2, 1.4])], "cpu", cores=2)
    assert plan.target_spacing == (0.5, 0.5, 1.2)


def _write(path: Path, shape, spacing, direction=None, seed=0):
    rng = np.random.default_rng(seed)
    write_volume(Volume(rng.random(shape).astype(np.float32) + 0.1, spacing, (0.0, 0.0, 0.0),
                        np.eye(3) if direction is None else direction), path)


def test_mixed_spacings_and_orientations_still_plan_and_name_the_outliers(tmp_path, capsys):
    root = tmp_path / "mixed"
    for i in range(5):
        _write(root / "imagesUnlabeled" / f"ok_{i}.nii.gz", (12, 40, 40), (0.5, 0.5, 1.0), seed=i)
    _write(root / "imagesUnlabeled" / "coarse.nii.gz", (12, 40, 40), (2.0, 2.0, 1.0))
    turned = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # slice axis along L-R
    _write(root / "imagesUnlabeled" / "turned.nii.gz", (12, 40, 40), (0.5, 0.5, 1.0), turned)
    assert main(["plan", str(root), "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    doc = last_json(out)
    assert doc["settings"]["preprocess.target_spacing"] == [0.5, 0.5, 1.0]  # medians: the outlier does not move them
    assert doc["outliers"]["spacing"] == ["coarse"]
    assert doc["outliers"]["orientation"] == ["turned"]
    assert doc["outliers"]["field_of_view"] == ["coarse"]  # 80 mm against 20 mm
    notes = "\n".join(doc["notes"])
    assert "coarse (2 x 2 x 1 mm)" in notes and "turned (" in notes and "other axes" in notes
    assert "6 of 7 volumes are LPS" in out


def test_budget_coarsens_in_plane_first_then_slices(capsys):
    records = [record(f"c{i}", (16, 160, 160), (0.3, 0.3, 1.0)) for i in range(4)]
    free = make_plan(records, "cpu", cores=2)
    # 160 voxels at 0.3 mm: tile 128, 2 x 2 tiles per slice; 4 x 16 x 4 = 256 slice-tiles x 0.18 s = 46 s
    assert free.tile == 128 and free.tiles_per_slice == (2, 2) and free.slice_tiles_total == 256
    assert free.embedding_seconds == pytest.approx(256 * 0.18) and not free.given_up
    plan = make_plan(records, "cpu", budget_minutes=0.5, cores=2)  # 30 s
    assert plan.target_spacing == (0.375, 0.375, 1.0)  # x1.25 in-plane: 128 voxels, one tile
    assert plan.tiles_per_slice == (1, 1) and plan.embedding_seconds == pytest.approx(64 * 0.18) and plan.fits_budget
    assert plan.given_up == ["in-plane spacing 0.3 x 0.3 -> 0.375 x 0.375 mm (x1.25) to fit 0.5 minutes of embedding "
                             "(estimated 46 s at the data set's own grid)"]
    assert "coarsened to 0.375 x 0.375 x 1 mm" in plan.reasons["preprocess.target_spacing"]
    # 3 s: no in-plane spacing is enough (one tile is the floor), so slices too: x4 (16 -> 4 slices),
    # and in-plane only as far as it still saves tiles (x1.25: one tile; x4 would save nothing more)
    plan = make_plan(records, "cpu", budget_minutes=0.05, cores=2)
    assert plan.target_spacing == (0.375, 0.375, 4.0) and plan.block_depth == 4 and plan.fits_budget
    assert plan.embedding_seconds == pytest.approx(16 * 0.18)
    assert [g.split(" to fit")[0] for g in plan.given_up] == ["in-plane spacing 0.3 x 0.3 -> 0.375 x 0.375 mm (x1.25)",
                                                              "slice spacing 1 -> 4 mm (x4)"]
    assert "the median depth in slices" in plan.reasons["student.block_depth"]
    # nothing fits: the cheapest plan, and it says so
    plan = make_plan(records, "cpu", budget_minutes=0.01, cores=2)
    assert not plan.fits_budget and plan.target_spacing == (0.375, 0.375, 4.0)
    assert plan.given_up[-1].startswith("still 3 s > 0.01 min") and "raise --budget-minutes" in plan.given_up[-1]
    # one tile per slice already (PROMISE12-like): the budget takes slices, not in-plane spacing
    single = [record(f"c{i}", (32, 128, 128), (0.6, 0.6, 2.0)) for i in range(10)]
    plan = make_plan(single, "cpu", budget_minutes=320 * 0.18 * 11 / 32 / 60 * 1.001, cores=2)
    assert plan.target_spacing == (0.6, 0.6, 6.0) and plan.slice_tiles_total == 10 * 11
    assert [g.split(" to fit")[0] for g in plan.given_up] == ["slice spacing 2 -> 6 mm (x3)"]
    # CUDA: 256 px first; the budget takes the input side down before the spacing
    gpu = make_plan(records, "cuda", cores=2)
    assert gpu.input_size == 256 and gpu.tile == 192 and gpu.tiles_per_slice == (1, 1)
    small = [record(f"c{i}", (16, 100, 100), (0.3, 0.3, 1.0)) for i in range(4)]
    gpu = make_plan(small, "cuda", cores=2)
    assert gpu.input_size == 256 and gpu.tile == 128
    cut = make_plan(small, "cuda", budget_minutes=gpu.embedding_seconds / 60 / 2, cores=2)
    assert cut.input_size == 128 and cut.tile == 128 and cut.target_spacing == (0.3, 0.3, 1.0)
    assert cut.embedding_seconds == pytest.approx(64 * CPU_SECONDS_PER_TILE[128] / 100)  # the assumed GPU speed-up
    assert gpu.embedding_seconds == pytest.approx(64 * CPU_SECONDS_PER_TILE[256] / 100)
    assert len(cut.given_up) == 1 and cut.given_up[0].startswith("encoder.input_size 256 -> 128 px")


def test_a_volume_too_big_for_memory_is_an_error_and_nothing_is_written(cohort, tmp_path, capsys):
    path = tmp_path / "kept.yaml"
    path.write_text("seed: 5\n")
    assert main(["plan", str(cohort), "--device", "cpu", "--memory-gb", "0.001", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "case_0" in err and "--memory-gb" in err and "more than the 0.001 GB allowed" in err and "nothing was written" in err
    assert path.read_text() == "seed: 5\n"
    new = tmp_path / "new.yaml"
    assert main(["plan", str(cohort), "--device", "cpu", "--memory-gb", "0.001", "--config", str(new)]) == 2
    assert not new.exists()
    # the estimate names the largest volume and a spacing that fits
    records = [record("small", (16, 64, 64), (1.0, 1.0, 1.0)), record("huge", (400, 1000, 1000), (0.2, 0.2, 0.2))]
    with pytest.raises(PlanError, match=r"case huge .*raise --memory-gb \(at least 2.65\), or coarsen the grid: preprocess.target_spacing \[0.9, 0.9, 0.6\] mm fits"):
        make_plan(records, "cpu", memory_gb=2.0, cores=2)
    assert make_plan(records, "cpu", memory_gb=3.0, cores=2).largest_case == "huge"  # 2.65 GB: fits


def test_2d_images_in_a_3d_plan(tmp_path, capsys):
    root = tmp_path / "mixed2d"
    for i in range(3):
        _write(root / "imagesUnlabeled" / f"vol_{i}.nii.gz", (10, 32, 32), (0.5, 0.5, 1.0), seed=i)
    write_volume(Volume(np.full((1, 30, 40), 7.0, np.float32), (0.2, 0.2, 1.0)), root / "imagesUnlabeled" / "flat.png")
    assert main(["plan", str(root), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "1 of 4 images are 2D" in err and "flat (30x40, a 2D image)" in err
    only = tmp_path / "only2d"
    for i in range(2):
        write_volume(Volume(np.full((1, 30, 40), 7.0, np.float32), (0.2, 0.2, 1.0)), only / "imagesUnlabeled" / f"f{i}.png")
    with pytest.raises(PlanError, match="the plan is for 3D volumes: all 2 images of this data set are 2D"):
        make_plan(fingerprint(only), "cpu")


def test_headers_only_takes_the_whole_grid(cohort):
    records = fingerprint(cohort, voxels=False)
    assert all(r.fov_box is None and not r.voxels_read for r in records)
    plan = make_plan(records, "cpu", cores=2)
    assert plan.median_shape[0] >= make_plan(fingerprint(cohort), "cpu", cores=2).median_shape[0]
    assert "headers only" in plan.reasons["preprocess.crop"]


def test_a_configured_tile_overlap_is_kept_and_counted():
    records = [record(f"c{i}", (16, 230, 230), (0.3, 0.3, 1.0)) for i in range(2)]
    plan = make_plan(records, "cpu", cores=2)
    assert plan.tile == 128 and plan.tiles_per_slice == (3, 3) and plan.slice_tiles_per_volume == 16 * 9
    assert plan.reasons["preprocess.tile_overlap"].startswith("0.25 (the default): the median volume takes 3 x 3 tiles per slice, 144")
    cfg = TrainConfig()
    cfg.preprocess.tile_overlap = 0.0
    plan = make_plan(records, "cpu", config=cfg, cores=2)
    assert plan.tile_overlap == 0.0 and plan.tiles_per_slice == (2, 2) and plan.slice_tiles_total == 2 * 16 * 4
    assert "kept from the config" in plan.reasons["preprocess.tile_overlap"]


def test_the_demo_trains_on_its_plan(cohort, tmp_path):
    """`semisam demo` takes its grid from `semisam plan` on its cohort, within its embedding budget."""
    from semisam.demo import DEMO_EMBEDDING_MINUTES, demo_config, plan_demo

    base = demo_config(cohort, tmp_path / "run", tmp_path / "cache", seed=0)
    cfg, plan = plan_demo(cohort, base)
    assert plan.cores == 2 and plan.budget_minutes == DEMO_EMBEDDING_MINUTES
    assert plan.fits_budget and plan.embedding_seconds <= 60 * DEMO_EMBEDDING_MINUTES
    assert tuple(cfg.preprocess.target_spacing) == pytest.approx(plan.target_spacing)
    assert tuple(cfg.preprocess.target_shape) == plan.target_shape and cfg.preprocess.crop == "whole"
    assert cfg.student.block_depth == plan.block_depth and cfg.encoder.input_size == plan.input_size
    # everything the plan does not decide is the demo's schedule
    assert cfg.phases.warmup.epochs == base.phases.warmup.epochs and cfg.student.channels == base.student.channels
    unlimited = make_plan(fingerprint(cohort), "cpu", config=base, cores=2)
    if unlimited.embedding_seconds > 60 * DEMO_EMBEDDING_MINUTES:  # coarser than the data set's own grid, and it says so
        assert plan.given_up and plan.target_spacing[2] > unlimited.target_spacing[2]
    else:
        assert plan.target_spacing == unlimited.target_spacing and not plan.given_up
