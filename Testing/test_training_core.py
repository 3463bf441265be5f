"""Config, losses, EMA and the training loop's building blocks (fast, no encoder)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from semisam.config import ConfigError, TrainConfig, config_from_dict, default_yaml, load_config, write_config
from semisam.ema import EMATeacher
from semisam.errors import SemiSAMError
from semisam.losses import (
    SupervisedLoss, consistency_loss, consistency_weight, pseudo_weight, region_consistency_loss, sigmoid_rampup,
)
from semisam.models.student import SlicingSAM3D, StudentConfig
from semisam.training import (
    BlockGeometry, amp_settings, apply_geometry, crop_windows, dice_hd95, draw_geometry, perturb, probs_to_label, split_validation,
)


# ------------------------------------------------------------------------------ config


def test_default_yaml_round_trips_and_carries_comments():
    text = default_yaml()
    assert "# T_r, epochs" in text and "lambda_max: 1.0" in text and "u_th: 0.1" in text
    data = yaml.safe_load(text)
    data["dataset"] = "somewhere"
    assert config_from_dict(data) == TrainConfig(dataset="somewhere")


def test_defaults_follow_the_handbook():
    """The handbook's numbers, except L_rs-con's form and weight (Dice + CE on confident voxels at
    beta_max 1.0 instead of an MSE at 0.3; README, semi-supervised section)."""
    c = TrainConfig()
    assert (c.loss.lambda_max, c.loss.ramp_up, c.loss.ramp_down, c.loss.ema_decay) == (1.0, 10.0, 40.0, 0.99)
    assert (c.loss.pseudo_loss, c.loss.beta_max) == ("dice_ce", 1.0)
    assert (c.phases.warmup.epochs, c.phases.warmup.lr) == (50, 2e-3)
    assert c.phases.semi.epochs == 100 and c.phases.finetune.epochs == 50
    assert c.data.labeled_fraction == 0.5


def test_config_errors_name_every_key():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"dataset": "d", "seed": "a", "phases": {"semi": {"foo": 1}}, "loss": {"beta_max": [1]}})
    msg = str(err.value)
    assert "seed: must be a whole number" in msg and "phases.semi.foo: unknown setting" in msg and "loss.beta_max: must be a number" in msg
    with pytest.raises(ConfigError, match=r"phases\.semi\.lr: must be > 0"):
        config_from_dict({"dataset": "d", "phases": {"semi": {"lr": -1.0}}})
    with pytest.raises(ConfigError, match="pseudo.u_th"):
        config_from_dict({"dataset": "d", "pseudo": {"u_th": 0.5}})
    with pytest.raises(ConfigError, match=r"pseudo\.teachers\[0\]\.name"):
        config_from_dict({"dataset": "d", "pseudo": {"teachers": [{"name": "nnunet"}]}})
    with pytest.raises(ConfigError, match="dataset: is required"):
        config_from_dict({})


def test_load_config_resolves_paths_and_applies_overrides(tmp_path):
    (tmp_path / "sub" / "data").mkdir(parents=True)
    (tmp_path / "sub" / "data" / "ds.json").write_text("{}")
    cfg_path = tmp_path / "sub" / "c.yaml"
    cfg_path.write_text("dataset: data/ds.json\noutput: runs/a\nphases: {semi: {epochs: 7}}\n")
    cfg = load_config(cfg_path, {"phases.warmup.epochs": 3, "data.cache_dir": "cache"})
    assert cfg.dataset == str((tmp_path / "sub" / "data" / "ds.json").resolve())
    assert cfg.output == str((tmp_path / "sub" / "runs" / "a").resolve())
    assert cfg.data.cache_dir == str((tmp_path / "sub" / "cache").resolve())
    assert cfg.phases.warmup.epochs == 3 and cfg.phases.semi.epochs == 7
    cfg_path.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    cfg_path.write_text("dataset: nowhere\n")
    with pytest.raises(ConfigError, match="dataset: .*nowhere does not exist"):
        load_config(cfg_path)


def test_write_config_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    p = write_config(tmp_path / "c.yaml", TrainConfig(dataset="x"))
    assert load_config(p).phases.semi.epochs == 100
    with pytest.raises(SemiSAMError, match="exists"):
        write_config(p)


# ------------------------------------------------------------------------------ losses and EMA


def test_ramps():
    assert consistency_weight(0, 1.0, 10) == pytest.approx(math.exp(-5))
    assert consistency_weight(10, 1.0, 10) == 1.0 and consistency_weight(50, 2.0, 10) == 2.0
    assert consistency_weight(5, 1.0, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(3, 0) == 1.0
    assert pseudo_weight(0, 0.3, 40) == pytest.approx(0.3)
    assert pseudo_weight(40, 0.3, 40) == pytest.approx(0.3 / math.e)
    values = [consistency_weight(t, 1, 10) for t in range(12)]
    assert values == sorted(values)


def test_region_consistency_loss_by_hand():
    ps = torch.tensor([0.9, 0.2, 0.5, 0.1])
    pf = torch.tensor([1.0, 0.0, 0.0, 1.0])
    conf = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = ((0.1 ** 2) + (0.2 ** 2)) / 2
    assert float(region_consistency_loss(ps, pf, conf)) == pytest.approx(expected, rel=1e-4)
    assert region_consistency_loss(ps, pf, torch.zeros(4)) is None
    assert float(consistency_loss(ps, pf)) == pytest.approx(float(((ps - pf) ** 2).mean()))


def test_supervised_loss_prefers_the_truth():
    label = torch.zeros((1, 1, 4, 8, 8), dtype=torch.uint8)
    label[..., 2:6, 2:6] = 1
    loss = SupervisedLoss(1)
    good = loss(torch.where(label.bool(), 8.0, -8.0).float(), label)
    bad = loss(torch.where(label.bool(), -8.0, 8.0).float(), label)
    assert float(good) < 0.05 < 1.0 < float(bad)
    multi = SupervisedLoss(3)
    lab2 = label.clone()
    lab2[..., 0, 0, 0] = 2
    logits = torch.nn.functional.one_hot(lab2[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float() * 16
    assert float(multi(logits, lab2)) < 0.05


def test_ema_follows_the_formula():
    torch.manual_seed(0)
    student = SlicingSAM3D(StudentConfig(embed_dim=8, channels=(4,)))
    ema = EMATeacher(student, 0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    ema.update(student)  # update 0 copies the student (decay min(0.9, 1 - 1/1) = 0)
    assert all(torch.equal(e, s) for e, s in zip(ema.model.parameters(), student.parameters()))
    ema.updates = 50  # later updates use the configured decay
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(student)
    for b, e, s in zip(before, ema.model.parameters(), student.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * s)
    assert all(not p.requires_grad for p in ema.model.parameters())
    state = ema.state_dict()
    other = EMATeacher(SlicingSAM3D(StudentConfig(embed_dim=8, channels=(4,))), 0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.updates == 51


# ------------------------------------------------------------------------------ augmentation on embeddings


@pytest.mark.parametrize("geo", [BlockGeometry(2, dz, fy, fx, tr) for dz in (False, True) for fy in (False, True) for fx in (False, True) for tr in (False, True)])
def test_geometry_moves_embeddings_and_targets_together(geo):
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 2, (10, 6, 6)).astype(np.uint8))
    emb = torch.stack([target.float(), -target.float()], dim=1)  # (z, C=2, G, G), channel 0 == target
    block = apply_geometry(emb, geo, 5, channels_first=True)
    tblock = apply_geometry(target, geo, 5, channels_first=False)
    assert block.shape == (2, 5, 6, 6) and tblock.shape == (5, 6, 6)
    assert torch.equal(block[0], tblock.float()) and torch.equal(block[1], -tblock.float())
    if not any([geo.depth_flip, geo.flip_y, geo.flip_x, geo.transpose]):
        assert torch.equal(tblock, target[2:7])


def test_draw_geometry_respects_the_switches():
    cfg = TrainConfig(dataset="x")
    cfg.augment.depth_flip = cfg.augment.inplane_flip = False
    rng = np.random.default_rng(0)
    geos = [draw_geometry(rng, 20, 8, cfg, True) for _ in range(50)]
    assert not any(g.depth_flip or g.flip_x or g.flip_y or g.transpose for g in geos)
    assert {g.start for g in geos} <= set(range(13)) and len({g.start for g in geos}) > 5
    cfg.augment.inplane_flip = True
    geos = [draw_geometry(rng, 20, 8, cfg, False) for _ in range(50)]
    assert not any(g.transpose for g in geos) and any(g.flip_x for g in geos)


def test_crop_windows_keep_the_pixel_window_exact():
    assert crop_windows((64, 64), (96, 96), 48) == [(2, 48), (2, 48)]  # 1.5 px per token: even offsets and widths
    assert crop_windows((64, 64), (96, 96), 47) == [(2, 46), (2, 46)]
    assert crop_windows((64, 64), (128, 100), 40) == [(1, 40), (16, 32)]  # 100/64 = 25/16
    assert crop_windows((64, 64), (96, 96), 64) == [None, None]  # not smaller than the grid: whole slices
    assert crop_windows((64, 64), (96, 100), 10) == [(2, 10), None]  # 16 tokens would be needed on x


@pytest.mark.parametrize("seed", range(6))
def test_inplane_crop_moves_embeddings_and_targets_together(seed):
    """A target that is its embedding grid upsampled x2 stays so after crop + flips."""
    cfg = TrainConfig(dataset="x")
    cfg.augment.inplane_crop = 5
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, 2, (10, 8, 8)).astype(np.uint8))
    target = tokens.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (z, 16, 16)
    emb = torch.stack([tokens.float(), 1 - tokens.float()], dim=1)
    seen = set()
    for _ in range(20):
        geo = draw_geometry(rng, 10, 4, cfg, True, (8, 8), (16, 16))
        assert geo.tokens is not None and geo.pixels == tuple(2 * v for v in geo.tokens)
        assert geo.tokens[1] - geo.tokens[0] == 5 and geo.tokens[3] - geo.tokens[2] == 5
        block = apply_geometry(emb, geo, 4, channels_first=True)
        tblock = apply_geometry(target, geo, 4, channels_first=False)
        assert block.shape == (2, 4, 5, 5) and tblock.shape == (4, 10, 10)
        assert torch.equal(block[0].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2), tblock.float())
        seen.add(geo.tokens)
    assert len(seen) > 3  # the window moves
    cfg.augment.inplane_crop = 0
    assert draw_geometry(rng, 10, 4, cfg, True, (8, 8), (16, 16)).tokens is None


def test_perturb_gains_and_channel_dropout():
    x = torch.ones((2, 64, 4, 3, 3))
    y = perturb(x, 0.1, 0.25, torch.Generator().manual_seed(0))
    dropped = (y == 0).all(dim=(2, 3, 4))
    assert 0.1 < float(dropped.float().mean()) < 0.45
    kept = y[~dropped[..., None, None, None].expand_as(y)]
    assert abs(float(kept.mean()) - 1 / 0.75) < 0.05 and float(kept.std()) > 0.05
    assert torch.equal(perturb(x, 0.0, 0.0, torch.Generator()), x)


# ------------------------------------------------------------------------------ data split and metrics


def test_split_validation(tmp_path):
    from semisam.data import Case, DatasetSpec

    cases = [Case(f"c{i}", Path(f"c{i}.nii.gz"), Path(f"l{i}.nii.gz")) for i in range(10)]
    spec = DatasetSpec(tmp_path, cases, [])
    train, val = split_validation(spec, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not {c.id for c in train} & {c.id for c in val}
    assert split_validation(spec, 0.2, seed=3) == (train, val)
    assert split_validation(DatasetSpec(tmp_path, cases[:1], []), 0.5, 0)[1] == []
    spec.validation = [Case("v", Path("v.nii.gz"), Path("lv.nii.gz"))]
    assert split_validation(spec, 0.2, 0) == (cases, spec.validation)


def test_dice_and_hd95_known_values():
    a = np.zeros((10, 20, 20), np.uint8)
    a[3:7, 5:15, 5:15] = 1
    b = np.zeros_like(a)
    b[3:7, 5:15, 7:17] = 1  # shifted by 2 voxels in x
    d, hd = dice_hd95(a, a, (1, 1, 1), 1)
    assert d == 1.0 and hd == 0.0
    d, hd = dice_hd95(b, a, (2.0, 0.5, 0.5), 1)
    assert d == pytest.approx(2 * 4 * 10 * 8 / (2 * 400))
    assert hd == pytest.approx(1.0, abs=1e-6)  # 2 voxels of 0.5 mm
    d, hd = dice_hd95(np.zeros_like(a), a, (1, 1, 1), 1)
    assert d == 0.0 and hd is None


def test_probs_to_label_and_amp():
    p = torch.tensor([[[[0.2, 0.7]]]])
    assert probs_to_label(p).tolist() == [[[0, 1]]]
    p3 = torch.tensor([[[[0.1]]], [[[0.2]]], [[[0.7]]]])
    assert probs_to_label(p3).tolist() == [[[2]]]
    assert amp_settings("off", torch.device("cpu")) == (None, False)
    assert amp_settings("auto", torch.device("cuda")) == (torch.float16, True)
    assert amp_settings("auto", torch.device("cpu")) == (None, False)  # bf16 backward is not safe on every CPU
    assert amp_settings("bf16", torch.device("cpu")) == (torch.bfloat16, False)


def test_keep_largest_component_per_structure():
    from semisam.inference import keep_largest_component

    lab = np.zeros((6, 12, 12), np.uint8)
    lab[1:4, 1:5, 1:5] = 1  # 48 voxels
    lab[5, 10, 10] = 1  # an island
    lab[1:3, 8:11, 8:11] = 2  # 18 voxels
    lab[5, 0, 11] = 2
    out = keep_largest_component(lab)
    assert out[5, 10, 10] == 0 and out[5, 0, 11] == 0
    assert (out == 1).sum() == 48 and (out == 2).sum() == 18
    assert keep_largest_component(np.zeros((2, 2, 2), np.uint8)).sum() == 0


def test_calibrate_threshold_finds_the_best_cut_and_prefers_half_on_ties():
    from semisam.training import calibrate_threshold

    # A ball of radius 6 whose probability ramps down with the distance: the truth is the
    # region above 0.35, so 0.35 is the only threshold on the grid with Dice 1.
    zz, yy, xx = np.meshgrid(*(np.arange(20),) * 3, indexing="ij")
    r = np.sqrt((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2)
    prob = np.clip(1.0 - r / 12.0, 0.0, 1.0)
    truth = (prob > 0.35).astype(np.uint8)
    th, dice = calibrate_threshold([(prob, truth)])
    assert th == 0.35 and dice == pytest.approx(1.0)
    # an island above every threshold is dropped by the largest-component rule, not counted
    island = prob.copy()
    island[0, 0, 0] = 0.99
    assert calibrate_threshold([(island, truth)], largest_component=True) == (0.35, pytest.approx(1.0))
    assert calibrate_threshold([(island, truth)])[1] < 1.0
    # a probability map that is 0 or 1 scores the same everywhere: 0.5 is kept
    assert calibrate_threshold([(truth.astype(np.float32), truth)]) == (0.5, pytest.approx(1.0))
    # the mean over cases decides: one case prefers 0.35, the other (truth above 0.55) 0.55
    other = (prob > 0.55).astype(np.uint8)
    th2, _ = calibrate_threshold([(prob, truth), (prob, other), (prob, other)])
    assert th2 == 0.55
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold([])

