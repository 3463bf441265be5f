"""The semi-supervised part of training, in process, on a tiny phantom cohort: the unlabeled loss
terms are there and touch what they should, pseudo-label targets follow the block's geometry,
a non-finite loss stops with a message, one run per output folder, and the pseudo-label
statistics the benchmark reports."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from semisam.demo import demo_config
from semisam.errors import SemiSAMError
from semisam.losses import pseudo_label_loss, region_consistency_loss
from semisam.runlock import RunLock, RunLocked
from semisam.training import BlockGeometry, Item, Trainer, apply_geometry, block_sample, draw_geometry

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the loss


def test_pseudo_label_loss_sees_confident_voxels_only():
    g = torch.Generator().manual_seed(0)
    p = torch.rand((2, 1, 4, 8, 8), generator=g)
    pseudo = (torch.rand((2, 1, 4, 8, 8), generator=g) > 0.5).float() * 0.9
    conf = torch.zeros_like(p)
    conf[:, :, :2] = 1.0
    base = pseudo_label_loss(p, pseudo, conf, "dice_ce")
    moved = p.clone()
    moved[:, :, 2:] = 1.0 - moved[:, :, 2:]  # change the student only where nothing is confident
    assert float(pseudo_label_loss(moved, pseudo, conf, "dice_ce")) == pytest.approx(float(base), abs=1e-6)
    target = (pseudo > 0.5).float()
    right = pseudo_label_loss(target * 0.98 + 0.01, pseudo, conf, "dice_ce")
    wrong = pseudo_label_loss((1 - target) * 0.98 + 0.01, pseudo, conf, "dice_ce")
    assert float(right) < 0.1 < 1.5 < float(wrong)
    assert pseudo_label_loss(p, pseudo, torch.zeros_like(p), "dice_ce") is None
    assert float(pseudo_label_loss(p, pseudo, conf, "mse")) == pytest.approx(float(region_consistency_loss(p, pseudo, conf)))
    with pytest.raises(ValueError, match="dice_ce"):
        pseudo_label_loss(p, pseudo, conf, "l1")


def test_dice_ce_pseudo_loss_pulls_boundary_voxels_harder_than_the_mse():
    """The reason for the default: on a small target in a mostly confident background, the MSE's
    gradient on a wrong foreground voxel is ~100x smaller than Dice + CE's."""
    p = torch.full((1, 1, 8, 32, 32), 0.02)
    pseudo = torch.zeros_like(p)
    pseudo[..., 14:18, 14:18] = 1.0
    conf = torch.ones_like(p)
    grads = {}
    for kind in ("mse", "dice_ce"):
        q = p.clone().requires_grad_(True)
        pseudo_label_loss(q, pseudo, conf, kind).backward()
        grads[kind] = float(q.grad[0, 0, 4, 15, 15].abs())
    assert grads["dice_ce"] > 50 * grads["mse"]


# ------------------------------------------------------------------------------ block targets


@pytest.mark.parametrize("seed", range(6))
def test_pseudo_targets_follow_the_blocks_crop_and_flips(seed):
    """A pseudo-label equal to channel 0 of the embeddings (upsampled) must still equal it, token
    for token, after the block's depth window, in-plane crop, flips and transpose."""
    from semisam.config import TrainConfig

    rng = np.random.default_rng(seed)
    z, grid, px = 12, 16, 48  # 3 pixels per token
    emb = torch.from_numpy(rng.random((z, 4, grid, grid)).astype(np.float16))
    up = np.repeat(np.repeat(emb[:, 0].float().numpy(), 3, axis=1), 3, axis=2)
    item = Item("u", "unlabeled", rng.random((z, px, px)).astype(np.float32), (1.0, 1.0, 1.0), emb=emb)
    targets = {"pseudo": torch.from_numpy(up[None]), "conf": torch.from_numpy((up[None] > 0.5).astype(np.float32))}
    cfg = TrainConfig()
    cfg.augment.inplane_crop = 10
    geo = draw_geometry(rng, z, 8, cfg, True, (grid, grid), (px, px))
    s = block_sample(item, targets, geo, 8, 1, with_image=True)
    assert s.has_pseudo and not s.labeled and s.label.sum() == 0
    tokens = s.x[0].numpy()  # (D, G', G')
    expect = np.repeat(np.repeat(tokens, 3, axis=1), 3, axis=2)
    assert s.pseudo.shape[1:] == expect.shape
    np.testing.assert_array_equal(s.pseudo[0].numpy(), expect)
    np.testing.assert_array_equal(s.conf[0].numpy(), (expect > 0.5).astype(np.float32))
    np.testing.assert_array_equal(s.image[0].numpy(), apply_geometry(torch.from_numpy(item.image), geo, 8, False).numpy())


def test_a_labeled_block_never_carries_a_pseudo_label():
    z = 8
    item = Item("l", "labeled", np.zeros((z, 16, 16), np.float32), (1.0, 1.0, 1.0), label=np.ones((z, 16, 16), np.uint8),
                emb=torch.zeros((z, 2, 4, 4), dtype=torch.float16))
    targets = {"label": torch.from_numpy(item.label), "pseudo": torch.ones((1, z, 16, 16)), "conf": torch.ones((1, z, 16, 16))}
    s = block_sample(item, targets, BlockGeometry(0, False, False, False, False), 4, 1, with_image=False)
    assert s.labeled and not s.has_pseudo and float(s.conf.sum()) == 0.0 and int(s.label.sum()) == 4 * 16 * 16


# ------------------------------------------------------------------------------ a real training


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from semisam.phantom import write_cohort

    root = tmp_path_factory.mktemp("semi")
    return root, write_cohort(root / "cohort", 4, 2, seed=3, overwrite=True, validation=1)


def tiny_config(root: Path, cohort: Path, name: str):
    cfg = demo_config(cohort, root / name, root / "cache", seed=0, schedule="tiny")
    cfg.phases.warmup.epochs, cfg.phases.semi.epochs, cfg.phases.finetune.epochs = 1, 2, 1
    return cfg


class Spy:
    """Records what reached the pseudo-label loss."""

    def __init__(self, monkeypatch):
        import semisam.training as training

        self.calls = []
        real = training.pseudo_label_loss

        def spy(p, pseudo, conf, *args, **kwargs):
            self.calls.append((p.shape[0], float(conf.sum())))
            return real(p, pseudo, conf, *args, **kwargs)

        monkeypatch.setattr(training, "pseudo_label_loss", spy)


class StateCheckingStream(io.StringIO):
    """The JSON progress stream; at every epoch line, notes which epoch last.pt holds then."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder, self.seen = folder, []

    def write(self, text: str) -> int:
        from semisam.models.checkpoints import safe_torch_load

        for line in text.splitlines():
            if line.startswith("{") and json.loads(line).get("type") == "epoch":
                state = safe_torch_load(self.folder / "last.pt") if (self.folder / "last.pt").exists() else {}
                self.seen.append((json.loads(line)["global_epoch"], state.get("global_epoch")))
        return super().write(text)


@pytest.fixture(scope="module")
def semi_run(cohort):
    """A tiny three-phase run whose teachers are prompted with the hidden truth (the tiny student
    learns nothing in 1 epoch, and an empty coarse mask gives no pseudo-label)."""
    root, ds = cohort
    mp = pytest.MonkeyPatch()
    spy = Spy(mp)
    from semisam.training import Trainer as T

    mp.setattr(T, "_coarse", lambda self, it: (it.reference if it.reference is not None else it.label).copy())
    cfg = tiny_config(root, ds, "semi")
    stream = StateCheckingStream(Path(cfg.output))
    trainer = Trainer(cfg, progress="json", stream=stream)
    trainer.run()
    mp.undo()
    lines = [json.loads(x) for x in stream.getvalue().splitlines() if x.startswith("{")]
    trainer.stream_seen = stream.seen
    return trainer, spy, lines


def test_last_pt_holds_an_epoch_before_its_progress_line_goes_out(semi_run):
    """A Stop that arrives once the Slicer module has read an epoch's line loses nothing."""
    trainer, _, _ = semi_run
    assert len(trainer.stream_seen) == 4 and all(line == state for line, state in trainer.stream_seen), trainer.stream_seen


def test_phase_one_trains_on_both_unlabeled_terms(semi_run):
    trainer, spy, lines = semi_run
    epochs = [r for r in lines if r["type"] == "epoch"]
    semi = [r for r in epochs if r["phase"] == 1]
    assert semi and all(r["losses"].get("con", 0) > 0 and r["losses"].get("rs_con", 0) > 0 for r in semi), [r["losses"] for r in semi]
    assert all("rs_con" not in r["losses"] and "con" not in r["losses"] for r in epochs if r["phase"] == 0)
    pseudo = next(r["pseudo"] for r in epochs if r.get("pseudo"))
    assert pseudo["refreshed"] == 2 and pseudo["empty"] == 0
    assert pseudo["coarse_dice_vs_reference"] == pytest.approx(1.0)  # the coarse mask was the truth
    assert 0.5 < pseudo["dice_vs_reference"] <= 1.0
    assert 0.0 < pseudo["confident_fraction_in_union"] <= 1.0
    assert pseudo["confident_fraction_in_union"] < pseudo["confident_fraction"]  # the whole volume is mostly trivial background


def test_the_pseudo_label_loss_touches_unlabeled_blocks_only(semi_run):
    trainer, spy, lines = semi_run
    # tiny schedule: batches of 2 = one labeled + one unlabeled block; only the unlabeled one reaches the loss
    assert spy.calls and all(n == 1 and c > 0 for n, c in spy.calls), spy.calls[:5]


def test_a_phase_shorter_than_its_ramp_is_warned_about(semi_run):
    _, _, lines = semi_run
    msgs = [r["text"] for r in lines if r["type"] == "message"]
    assert any("loss.ramp_up" in m and "longer than phase 1" in m for m in msgs), msgs


def test_resume_trains_on_the_same_pseudo_labels_as_an_uninterrupted_run(semi_run):
    """A resumed Trainer reads back from pseudo_labels/ exactly what the first run trained on."""
    trainer, _, _ = semi_run
    again = Trainer(trainer.cfg, progress="none", resume=True)
    again.run()
    assert set(again.pseudo) == set(trainer.pseudo) and trainer.pseudo
    for cid, per_label in trainer.pseudo.items():
        for a, b in zip(per_label, again.pseudo[cid]):
            assert a is not None and b is not None
            assert np.array_equal(a.probability, b.probability) and np.array_equal(a.confidence, b.confidence)


def test_a_non_finite_loss_stops_with_a_message_and_keeps_last_pt(cohort, monkeypatch):
    import semisam.training as training
    from semisam.models.checkpoints import safe_torch_load

    root, ds = cohort
    monkeypatch.setattr(training, "consistency_loss", lambda a, b: torch.tensor(float("nan")))
    cfg = tiny_config(root, ds, "nan")
    with pytest.raises(SemiSAMError, match=r"not finite in semi epoch 1.*last\.pt keeps the last finished epoch.*phases\.semi\.lr") as err:
        Trainer(cfg, progress="none").run()
    assert "con nan" in str(err.value)
    state = safe_torch_load(Path(cfg.output) / "last.pt")
    assert (state["phase"], state["global_epoch"]) == (0, 1)  # the warm-up epoch, intact


def test_a_second_run_into_a_live_runs_folder_is_refused(cohort):
    root, ds = cohort
    cfg = tiny_config(root, ds, "locked")
    code = f"import sys, time; from semisam.runlock import RunLock; lock = RunLock({str(cfg.output)!r}).acquire(); print('held', flush=True); time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"another training run \(pid {child.pid} on "):
            Trainer(cfg, progress="none").run()
        assert not (Path(cfg.output) / "metrics.jsonl").exists()  # the refused run wrote nothing
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    lock = RunLock(cfg.output).acquire()  # a lock left by a killed run is taken over
    try:
        assert lock.previous is not None and f"pid {child.pid}" in lock.previous
        with pytest.raises(RunLocked):  # and held again, also against this process's own second try
            RunLock(cfg.output).acquire()
    finally:
        lock.release()


def test_a_teacher_can_run_its_own_encoder_at_another_side(tmp_path):
    """pseudo.teachers[].input_size: the LiteMedSAM teacher gets its own encoder (same weights) at
    that side, and its embeddings are cached apart from the student's."""
    from semisam.config import TrainConfig, TeacherSection
    from semisam.models.encoders import EmbeddingCache
    from semisam.models.prompts import Prompts
    from semisam.training import build_encoder, build_teachers

    cfg = TrainConfig(dataset="unused")
    cfg.encoder.input_size = 128
    encoder, net = build_encoder(cfg, torch.device("cpu"))
    cache = EmbeddingCache(tmp_path / "cache")
    cfg.pseudo.teachers = [TeacherSection(), TeacherSection(input_size=256)]
    shared, own = build_teachers(cfg, encoder, net, cache, torch.device("cpu"))
    assert shared.encoder is encoder and encoder.input_size == 128
    assert own.encoder.input_size == 256 and own.encoder.weights_id != encoder.weights_id and own.net is net
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    box = Prompts(boxes2d=np.array([[1, 20, 20, 40, 40]], np.float32))
    own.predict(own.prepare(image), box)
    shared.predict(shared.prepare(image), box)
    assert cache.encoded_slices == 2  # one slice per encoder: nothing shared, nothing mixed


def test_the_log_says_when_best_pt_is_still_the_warm_ups(cohort, monkeypatch):
    """The README's promise: a run whose later phases never beat the warm-up on validation says so."""
    import semisam.training as training

    root, ds = cohort
    scores = iter([0.9, 0.5, 0.6, 0.4, 0.3, 0.2])  # warm-up first, then every later validation is worse
    monkeypatch.setattr(training.Trainer, "_validate", lambda self: (next(scores), None))
    stream = io.StringIO()
    summary = Trainer(tiny_config(root, ds, "warmup_best"), progress="json", stream=stream).run()
    msgs = [json.loads(x)["text"] for x in stream.getvalue().splitlines() if x.startswith("{") and json.loads(x)["type"] == "message"]
    assert summary["best_phase"] == 0 and summary["best_global_epoch"] == 1
    assert any("best.pt is the warm-up checkpoint (epoch 1, validation Dice 0.900)" in m and "best later 0.600" in m for m in msgs), msgs


# ------------------------------------------------------------------------------ prompt growth


def test_grow_mask_dilates_and_erodes_by_millimetres_on_an_anisotropic_grid():
    from semisam.pseudo_labels import grow_mask, growth_candidates

    mask = np.zeros((9, 21, 21), bool)
    mask[4, 10, 10] = True
    spacing = (2.0, 0.5, 0.5)  # (z, y, x) mm
    grown = grow_mask(mask, 1.0, spacing)  # 2 voxels in-plane, 0.5 -> 1 slice in depth
    assert grown[4].sum() == 13 and grown[4, 10, 8] and grown[4, 10, 12] and not grown[4, 10, 7]
    assert grown[3, 10, 10] and grown[5, 10, 10] and not grown[2].any() and not grown[6].any()
    assert grow_mask(mask, 0.4, spacing).sum() == 1 + 4  # 0.8 voxel -> 1 in-plane, 0.2 slice -> none
    block = np.zeros((9, 21, 21), bool)
    block[2:7, 5:16, 5:16] = True
    shrunk = grow_mask(block, -1.0, spacing)
    assert shrunk[4, 7:14, 7:14].all() and not shrunk[4, 6, 10] and not shrunk[2].any() and shrunk[3, 10, 10]
    assert np.array_equal(grow_mask(mask, -5.0, spacing), mask)  # an erosion never empties a prompt
    candidates = growth_candidates(spacing)
    assert candidates[0] == 0.0 and len(set(candidates)) == len(candidates) and min(candidates) < 0 < max(candidates)


def test_prompt_growth_is_chosen_on_validation_and_undoes_a_shrunken_student(cohort, monkeypatch):
    """The coarse mask of a student that stops inside the boundary (the truth eroded by 3 mm) and
    a teacher that returns its prompt: the growth chosen on the validation case undoes the
    erosion, and the unlabeled cases' pseudo-labels beat their coarse masks."""
    import semisam.pseudo_labels as pseudo_labels
    from semisam.pseudo_labels import PseudoLabel, grow_mask

    class PromptTeacher:
        def __init__(self, teachers, **kwargs):
            self.calls = 0

        def __call__(self, image, mask, key, views=None):
            m = np.asarray(mask, np.float32)
            return PseudoLabel.from_statistics(m, np.zeros_like(m), 0.1, 2, int(m.sum()))

    def shrunken(self, it):
        truth = it.reference if it.reference is not None else it.label
        return grow_mask(truth > 0, -3.0, self._spacing_zyx(it)).astype(np.uint8)

    monkeypatch.setattr(pseudo_labels, "PseudoLabeler", PromptTeacher)
    monkeypatch.setattr(Trainer, "_coarse", shrunken)
    root, ds = cohort
    stream = io.StringIO()
    Trainer(tiny_config(root, ds, "growth"), progress="json", stream=stream).run()
    refreshes = [json.loads(x)["pseudo"] for x in stream.getvalue().splitlines() if x.startswith("{") and json.loads(x).get("pseudo")]
    assert refreshes
    for r in refreshes:
        assert r["prompt_growth_mm"] > 0, r
        assert r["val_pseudo_dice"] > r["val_pseudo_dice_ungrown"] == pytest.approx(r["val_coarse_dice"], abs=1e-4), r
        assert r["dice_vs_reference"] > r["coarse_dice_vs_reference"] + 0.05, r
        assert set(r["growth_scores"]) >= {"0", f"{r['prompt_growth_mm']:g}"}


def test_a_fixed_prompt_growth_is_used_as_it_is(cohort, monkeypatch):
    import semisam.pseudo_labels as pseudo_labels
    from semisam.pseudo_labels import PseudoLabel

    prompts = []

    class PromptTeacher:
        def __init__(self, teachers, **kwargs):
            pass

        def __call__(self, image, mask, key, views=None):
            prompts.append((key, int(np.asarray(mask).sum())))
            m = np.asarray(mask, np.float32)
            return PseudoLabel.from_statistics(m, np.zeros_like(m), 0.1, 2, int(m.sum()))

    monkeypatch.setattr(pseudo_labels, "PseudoLabeler", PromptTeacher)
    monkeypatch.setattr(Trainer, "_coarse", lambda self, it: (it.reference if it.reference is not None else it.label).copy())
    root, ds = cohort
    cfg = tiny_config(root, ds, "growth_fixed")
    cfg.pseudo.prompt_growth = 0.0
    stream = io.StringIO()
    Trainer(cfg, progress="json", stream=stream).run()
    refreshes = [json.loads(x)["pseudo"] for x in stream.getvalue().splitlines() if x.startswith("{") and json.loads(x).get("pseudo")]
    assert refreshes and all(r["prompt_growth_mm"] == 0.0 and "val_pseudo_dice" not in r for r in refreshes)
    assert prompts and not any(k.startswith("validation:") for k, _ in prompts)  # no calibration ran
    assert all(r["dice_vs_reference"] == pytest.approx(1.0) for r in refreshes)  # the prompt was the truth, unchanged


def test_refinement_by_the_teachers_is_chosen_on_validation_and_recorded_in_best_pt(semi_run, monkeypatch):
    """At the end of training, best.pt's own masks of the validation cases, grown by each
    candidate, prompt the teachers; best.pt records the refinement and whether it beat the student."""
    from semisam.inference import recorded_refinement
    from semisam.models.student import load_student
    from semisam.pseudo_labels import PseudoLabel, grow_mask, growth_candidates

    trainer, _, lines = semi_run
    best = Path(trainer.out) / "best.pt"
    rec = load_student(best)[1]["postprocess"]["refine"]  # what the real run (LiteMedSAM teacher) decided
    assert rec["teacher"] == "litemedsam" and rec["validation_cases"] == len(trainer.validation) == 1
    assert set(rec["growth_scores"]) == {f"{g:g}" for g in growth_candidates(trainer._spacing_zyx(trainer.validation[0]))}
    assert rec["use"] == (rec["val_dice_refined"] > rec["val_dice_student"])
    final = [x for x in lines if x.get("type") == "final"][-1]
    assert final["refine"]["use"] == rec["use"]

    class Teachers:  # return their prompt, or nothing
        def __init__(self, answer=True):
            self.answer = answer

        def __call__(self, image, mask, key, views=None):
            m = np.asarray(mask, np.float32) * float(self.answer)
            return PseudoLabel.from_statistics(m, np.zeros_like(m), 0.1, 2, int(np.asarray(mask).sum()))

    def shrunken(model, it):  # a student that stops 3 mm inside the boundary
        return torch.from_numpy(grow_mask(it.label > 0, -3.0, trainer._spacing_zyx(it)).astype(np.float32))[None]

    monkeypatch.setattr(trainer, "_infer", shrunken)
    monkeypatch.setattr(trainer, "labeler", Teachers())
    rec = trainer._calibrate_refinement()
    assert rec["use"] and rec["growth_mm"] > 0 and rec["val_dice_refined"] > rec["val_dice_student"] + 0.05
    assert recorded_refinement(load_student(best)[1]) == rec
    monkeypatch.setattr(trainer, "labeler", Teachers(answer=False))
    rec = trainer._calibrate_refinement()
    assert not rec["use"] and rec["val_dice_refined"] == 0.0
    assert recorded_refinement(load_student(best)[1]) is None and load_student(best)[1]["postprocess"]["refine"] == rec
