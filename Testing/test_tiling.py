"""Whole field of view: the tile lattice, blending, a grid that covers every non-zero voxel,
tiled decoding that leaves no voxel of the field of view undecoded, and the memory refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semisam.errors import SemiSAMError
from semisam.preprocess import PreprocessConfig, apply_to_label, invert, preprocess
from semisam.tiling import Tile, blend, tile_starts, tiles
from semisam.volume import Volume


@pytest.mark.parametrize("n,t,overlap", [(136, 96, 0.25), (256, 96, 0.25), (97, 96, 0.5), (500, 64, 0.0), (300, 32, 0.75)])
def test_tiles_cover_the_axis_and_overlap_as_asked(n, t, overlap):
    starts = tile_starts(n, t, overlap)
    assert starts[0] == 0 and starts[-1] == n - t
    covered = np.zeros(n, int)
    for s in starts:
        covered[s : s + t] += 1
    assert covered.min() >= 1
    shared = [t - (b - a) for a, b in zip(starts, starts[1:])]
    assert min(shared) >= int(np.floor(overlap * t)) - 1  # rounding of evenly spread starts
    assert tile_starts(n, t, overlap) == starts  # deterministic: training and segment share cache keys


def test_one_tile_when_the_grid_is_not_wider():
    assert tile_starts(96, 96, 0.25) == [0] and tile_starts(50, 96, 0.25) == [0]
    assert tiles((40, 96), (96, 96), 0.25) == [Tile(0, 0, 40, 96)]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, 1.0)


def test_blend_is_exact_where_tiles_agree_and_where_one_tile_covers():
    grid = (3, 50, 70)
    lattice = tiles(grid[1:], (32, 32), 0.25)
    assert len(lattice) == 2 * 3
    same = blend(grid, [(t, lambda t=t: torch.full((1, 3, 32, 32), 0.3)) for t in lattice])
    assert torch.allclose(same, torch.full((1, *grid), 0.3), atol=1e-6)
    # each tile predicts its own index: a pixel only the first tile covers gets exactly 0
    indexed = blend(grid, [(t, lambda i=i: torch.full((1, 3, 32, 32), float(i))) for i, t in enumerate(lattice)])
    assert float(indexed[0, 0, 0, 0]) == 0.0 and float(indexed[0, 0, -1, -1]) == pytest.approx(len(lattice) - 1)
    inner = indexed[0, 0, 20:30, 30:40]  # shared by several tiles: a weighted mean of their indices
    assert 0.0 < float(inner.min()) and float(inner.max()) < len(lattice) - 1
    whole = torch.rand(2, 3, 50, 70)
    assert blend(grid, [(Tile(0, 0, 50, 70), lambda: whole)]) is whole  # one tile: untouched


def _sector_volume(shape=(20, 60, 80), box=((2, 18), (5, 58), (3, 77))):
    rng = np.random.default_rng(0)
    array = np.zeros(shape, np.float32)
    (z0, z1), (y0, y1), (x0, x1) = box
    array[z0:z1, y0:y1, x0:x1] = rng.random((z1 - z0, y1 - y0, x1 - x0)) * 200 + 10
    return Volume(array, (1.0, 1.0, 1.0), (3.0, -2.0, 5.0)), box


def test_whole_grid_covers_every_voxel_of_the_field_of_view():
    image, box = _sector_volume()
    label = np.zeros(image.shape, np.uint8)
    (z0, z1), (y0, y1), (x0, x1) = box
    for z in (z0, z1 - 1):  # the field of view's corners and edges
        for y in (y0, y1 - 1):
            for x in (x0, x1 - 1):
                label[z, y, x] = 1
    whole = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0), target_shape=(8, 32, 32), crop="whole")
    pre, record = preprocess(image, whole)
    assert pre.shape == (z1 - z0, y1 - y0, x1 - x0)  # the field of view's box, nothing more
    back = invert(record, apply_to_label(record, image.with_array(label)).array, "label")
    assert np.array_equal(back.array, label)
    cropped = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0), target_shape=(8, 32, 32), crop="fov")
    pre_c, record_c = preprocess(image, cropped)
    assert pre_c.shape == (8, 32, 32)
    lost = invert(record_c, apply_to_label(record_c, image.with_array(label)).array, "label")
    assert lost.array.sum() == 0  # the crop loses every corner: what "whole" is for
    small, _ = preprocess(image, PreprocessConfig(target_spacing=(2.0, 2.0, 2.0), target_shape=(16, 64, 64), crop="whole"))
    assert small.shape == (16, 64, 64)  # never smaller than one tile and the least depth


@pytest.fixture(scope="module")
def small_sam():
    from semisam.models.encoders import build_sam_vit, sam_encoder

    return sam_encoder(build_sam_vit(small=True), "sam-small")


def test_tiled_segmentation_decodes_the_whole_field_of_view(small_sam):
    from semisam.inference import segment_volume
    from semisam.models.encoders import EmbeddingCache
    from semisam.models.student import SlicingSAM3D, StudentConfig

    image, box = _sector_volume((12, 60, 90), ((1, 11), (2, 58), (4, 86)))
    torch.manual_seed(0)
    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=8, encoder="sam-small"))
    config = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0), target_shape=(8, 32, 32), crop="fov")  # as trained
    cache = EmbeddingCache()
    seen = []
    result = segment_volume(image, student, small_sam, config, cache, progress=lambda d, t: seen.append((d, t)))
    (z0, z1), (y0, y1), (x0, x1) = box
    assert result.grid == (z1 - z0, y1 - y0, x1 - x0)
    assert result.tiles == len(tiles(result.grid[1:], (32, 32), 0.25)) == 2 * 4
    prob = result.probability.array
    assert prob[z0:z1, y0:y1, x0:x1].min() > 0.0  # every field-of-view voxel was decoded (a sigmoid is never 0)
    outside = np.ones(image.shape, bool)
    outside[z0:z1, y0:y1, x0:x1] = False
    assert prob[outside].max() == 0.0  # beyond the grid the output is background
    assert seen[-1] == (result.grid[0] * result.tiles,) * 2
    encoded = cache.encoded_slices
    assert encoded == result.grid[0] * result.tiles  # each slice-tile once
    again = segment_volume(image, student, small_sam, config, cache)
    assert cache.encoded_slices == encoded  # a second click reuses every tile's embeddings
    assert np.array_equal(again.label.array, result.label.array)


def test_a_volume_too_large_for_memory_is_refused_before_any_work(small_sam, tmp_path, monkeypatch):
    import semisam.inference as inference
    from semisam.inference import Segmenter
    from semisam.models.student import SlicingSAM3D, StudentConfig

    student = SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=8, encoder="litemedsam", encoder_input_size=64))
    path = tmp_path / "student.pt"
    student.save(path, extra={"preprocess": PreprocessConfig(target_spacing=(0.5, 0.5, 0.5), target_shape=(8, 32, 32)).to_dict()})
    seg = Segmenter(path, backend="torch")
    volume = Volume(np.ones((200, 300, 300), np.float32), (0.5, 0.5, 0.5))
    estimate = seg.memory_estimate(volume)
    assert estimate["grid"] == (200, 300, 300) and estimate["tiles"] == len(tiles((300, 300), (32, 32), 0.25))
    assert estimate["bytes"] > 200 * 300 * 300 * 4 * 6  # the input and its copies alone
    monkeypatch.setattr(inference, "available_memory", lambda: estimate["bytes"] // 2)
    encoded = seg.cache.encoded_slices
    with pytest.raises(SemiSAMError, match=r"needs about .* GB .* grid \[200, 300, 300\].*target_spacing; nothing was written"):
        seg.segment(volume)
    assert seg.cache.encoded_slices == encoded


@pytest.mark.slow
def test_training_on_whole_fields_of_view_cuts_tiles_and_oversamples_foreground(tmp_path):
    from semisam.demo import demo_config
    from semisam.phantom import write_cohort
    from semisam.training import Trainer

    cohort = write_cohort(tmp_path / "cohort", n=5, labeled=3, shape=(24, 64, 96), seed=5, validation=1)
    cfg = demo_config(cohort, tmp_path / "run", tmp_path / "cache", seed=0, schedule="tiny")
    cfg.preprocess.crop = "whole"
    cfg.preprocess.target_spacing, cfg.preprocess.target_shape, cfg.encoder.input_size = (1.5, 1.5, 3.0), (4, 16, 16), 64
    cfg.pseudo.refresh_every = 10  # one refresh: enough to see the unlabeled tiles' targets
    trainer = Trainer(cfg, progress="none")
    summary = trainer.run()
    items = trainer.labeled + trainer.unlabeled + trainer.validation
    assert all(len(it.tile_list()) > 1 for it in items)  # every field of view is wider than a 16 px tile
    for it in items:
        assert len(it.embs) == len(it.tile_list()) and all(e.shape[0] == it.image.shape[0] for e in it.embs)
    assert trainer.cache.encoded_slices == sum(it.image.shape[0] * len(it.tile_list()) for it in items)
    assert summary["best_val_dice"] is not None and 0.0 <= summary["best_val_dice"] <= 1.0
    # a drawn tile carries its own window of the image, the label and the embeddings
    rng = np.random.default_rng(0)
    it = trainer.labeled[0]
    lattice = it.tile_list()
    fg_tiles = {t for t, tile in enumerate(lattice) if (it.label[(slice(None), *tile.window)] > 0).any()}
    assert 0 < len(fg_tiles) < len(lattice)  # some tiles hold no target: the rule is visible
    hits, draws = 0, 3000
    for _ in range(draws):
        view, targets = trainer._tile(it, rng)
        t = next(i for i, e in enumerate(it.embs) if e is view.emb)
        window = (slice(None), *lattice[t].window)
        assert np.array_equal(view.image, it.image[window]) and np.array_equal(targets["label"].numpy(), it.label[window])
        hits += t in fg_tiles
    uniform = len(fg_tiles) / len(lattice)
    expected = 1 / 3 + 2 / 3 * uniform  # a third among foreground tiles, the rest uniform
    sd = (expected * (1 - expected) / draws) ** 0.5
    assert expected - uniform > 8 * sd  # uniform draws would be told apart
    assert abs(hits / draws - expected) < 4 * sd, (hits, expected, len(fg_tiles), len(lattice))
