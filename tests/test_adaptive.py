"""Query-adaptive prototypes and the contrastive semantic prior (spasem.core.adaptive) on small,
hand-checkable inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spasem.core.adaptive import (
    best_shift,
    clean_core,
    contrastive_prior,
    evenly_spaced,
    log_mean_exp,
    mask_distances,
    pool_to_features,
    region_masks,
    translated_appearance,
)
from spasem.core.volume import Grid
from spasem.core.windows import Window

CPU = torch.device("cpu")


def _grid(shape, spacing=1.5) -> Grid:
    return Grid(tuple(shape), np.full(3, spacing), np.zeros(3), np.diag([-1.0, -1.0, 1.0]))


def _box_mask(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def _box_distances(shape, lo, hi, spacing):
    """Exact EDT of a box mask ``[lo, hi)``: depth inside (to the nearest voxel outside) and
    distance outside (to the nearest voxel inside), in mm."""
    idx = np.indices(shape)
    lo, hi = np.asarray(lo)[:, None, None, None], np.asarray(hi)[:, None, None, None]
    inside = np.all((idx >= lo) & (idx < hi), axis=0)
    depth = spacing * np.min(np.minimum(idx - (lo - 1), hi - idx), axis=0)
    outside = spacing * np.sqrt(np.sum(np.maximum(0, np.maximum(lo - idx, idx - (hi - 1))) ** 2, axis=0))
    return np.where(inside, depth, 0.0), np.where(inside, 0.0, outside)


def _block_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    s = mask.shape
    return mask.reshape(s[0] // factor, factor, s[1] // factor, factor, s[2] // factor, factor).mean(axis=(1, 3, 5))


# ------------------------------------------------------------------------------------------
# evenly_spaced, log_mean_exp
# ------------------------------------------------------------------------------------------
@given(n=st.integers(1, 300), limit=st.none() | st.integers(1, 400))
def test_evenly_spaced_keeps_first_last_and_order(n, limit):
    rows = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    out = evenly_spaced(rows, limit)
    if limit is None or n <= limit:
        assert out is rows
        return
    kept = out[:, 0].long()
    assert kept.shape[0] == limit
    assert bool((kept[1:] > kept[:-1]).all())  # distinct, in order
    if limit > 1:
        assert int(kept[0]) == 0 and int(kept[-1]) == n - 1
        gaps = (kept[1:] - kept[:-1]).float()
        step = (n - 1) / (limit - 1)
        assert float(gaps.min()) >= math.floor(step) - 1 and float(gaps.max()) <= math.ceil(step) + 1
    assert torch.equal(evenly_spaced(rows, limit), out)  # deterministic


@given(values=st.lists(st.floats(-1, 1), min_size=1, max_size=20), tau=st.floats(0.02, 2.0))
def test_log_mean_exp_matches_its_definition(values, tau):
    sim = torch.tensor(values, dtype=torch.float64)[:, None]
    expected = math.log(np.mean(np.exp(np.asarray(values) / tau)))
    assert float(log_mean_exp(sim, tau)[0]) == pytest.approx(expected, rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------------------------------
# distances and regions
# ------------------------------------------------------------------------------------------
def test_mask_distances_of_a_box_are_exact():
    shape, lo, hi = (20, 18, 16), (5, 4, 3), (13, 12, 11)
    depth, distance = mask_distances(_box_mask(shape, lo, hi), np.array([1.5, 1.5, 1.5]))
    expected_depth, expected_distance = _box_distances(shape, lo, hi, 1.5)
    assert depth.dtype == distance.dtype == np.float32
    np.testing.assert_allclose(depth, expected_depth, atol=1e-4)
    np.testing.assert_allclose(distance, expected_distance, atol=1e-4)


def test_mask_distances_use_anisotropic_spacing_and_handle_empty_masks():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    _, distance = mask_distances(mask, np.array([1.0, 2.0, 3.0]))
    assert distance[6, 4, 4] == pytest.approx(2.0) and distance[4, 6, 4] == pytest.approx(4.0)
    assert distance[4, 4, 6] == pytest.approx(6.0)
    depth, distance = mask_distances(np.zeros((4, 4, 4), bool), np.ones(3))
    assert not depth.any() and np.isinf(distance).all()


def test_pool_to_features_takes_feature_voxels_mostly_inside():
    grid = _grid((8, 8, 8))
    window = Window.on(grid, (0, 0, 0), (8, 8, 8))
    fgrid = window.grid.scaled(2)
    mask = np.zeros((8, 8, 8), bool)
    mask[0:2, 0:2, 0:2] = True  # a whole feature voxel
    mask[4, 4, 4:6] = True  # a quarter of one
    half = pool_to_features(mask, window, fgrid, CPU)
    assert half.shape == (4, 4, 4) and half.dtype == torch.bool
    assert half.nonzero().tolist() == [[0, 0, 0]]
    anything = pool_to_features(mask, window, fgrid, CPU, min_fraction=0.0)
    assert anything.nonzero().tolist() == [[0, 0, 0], [2, 2, 2]]
    # a window sticking out of the working grid sees nothing beyond it
    shifted = Window.on(grid, (-2, 0, 0), (8, 8, 8))
    assert pool_to_features(mask, shifted, fgrid, CPU).nonzero().tolist() == [[1, 0, 0]]


@pytest.mark.parametrize(("core_margin", "background_margin", "reach"), [(6.0, 6.0, 3.0), (3.0, 12.0, 9.0), (0.0, 0.0, None)])
def test_region_masks_of_a_box(core_margin, background_margin, reach):
    shape, lo, hi = (32, 32, 32), (8, 10, 6), (24, 22, 26)
    grid = _grid(shape)
    window = Window.on(grid, (0, 0, 0), shape)
    fgrid = window.grid.scaled(2)
    regions = region_masks(_box_mask(shape, lo, hi), grid, [window], [fgrid], CPU, core_margin, background_margin, reach)
    assert len(regions) == 1
    region = regions[0]
    depth, distance = _box_distances(shape, lo, hi, 1.5)
    core = depth >= max(core_margin, 1e-3)
    np.testing.assert_array_equal(region["core"].numpy(), _block_mean(core, 2) >= 0.5)
    np.testing.assert_array_equal(region["outside"].numpy(), _block_mean(distance > background_margin, 2) >= 0.5)
    if reach is None:
        assert "band" not in region
    else:
        np.testing.assert_array_equal(region["band"].numpy(), _block_mean(distance <= reach, 2) > 0)
    # the core is inside the structure, the outside outside it
    assert not (region["core"] & region["outside"]).any()


def test_region_masks_of_thin_and_tiny_structures_still_have_a_core():
    shape = (24, 24, 24)
    grid = _grid(shape)
    window = Window.on(grid, (0, 0, 0), shape)
    fgrid = window.grid.scaled(2)
    slab = _box_mask(shape, (4, 4, 10), (20, 20, 12))  # 3 mm thick: nothing is 6 mm deep
    core = region_masks(slab, grid, [window], [fgrid], CPU, 6.0, 10.0, None)[0]["core"].numpy()
    np.testing.assert_array_equal(core, _block_mean(slab, 2) >= 0.5)  # the deepest half = all of it
    dot = _box_mask(shape, (9, 9, 9), (10, 10, 10))  # one voxel: an eighth of a feature voxel
    core = region_masks(dot, grid, [window], [fgrid], CPU, 6.0, 10.0, None)[0]["core"].numpy()
    assert np.argwhere(core).tolist() == [[4, 4, 4]]


def test_region_masks_restrict_the_core_to_core_keep_unless_too_little_remains():
    shape, lo, hi = (32, 32, 32), (4, 4, 4), (28, 28, 28)
    grid = _grid(shape)
    window = Window.on(grid, (0, 0, 0), shape)
    fgrid = window.grid.scaled(2)
    box = _box_mask(shape, lo, hi)
    whole = region_masks(box, grid, [window], [fgrid], CPU, 3.0, 10.0, None)[0]
    half = np.zeros(shape, bool)
    half[:16] = True  # half of the core
    kept = region_masks(box, grid, [window], [fgrid], CPU, 3.0, 10.0, None, core_keep=half)[0]
    depth, _ = _box_distances(shape, lo, hi, 1.5)
    np.testing.assert_array_equal(kept["core"].numpy(), _block_mean((depth >= 3.0) & half, 2) >= 0.5)
    assert kept["core"].sum() < whole["core"].sum()
    np.testing.assert_array_equal(kept["outside"].numpy(), whole["outside"].numpy())  # the outside is not touched
    sliver = np.zeros(shape, bool)
    sliver[:7] = True  # 3 of the core's 18 slices: under a quarter, so the core stays whole
    left = region_masks(box, grid, [window], [fgrid], CPU, 3.0, 10.0, None, core_keep=sliver)[0]
    np.testing.assert_array_equal(left["core"].numpy(), whole["core"].numpy())


def test_region_masks_per_window():
    shape, lo, hi = (40, 24, 24), (14, 6, 6), (26, 18, 18)
    grid = _grid(shape)
    windows = [Window.on(grid, (0, 0, 0), (24, 24, 24)), Window.on(grid, (16, 0, 0), (24, 24, 24))]
    fgrids = [w.grid.scaled(4) for w in windows]
    regions = region_masks(_box_mask(shape, lo, hi), grid, windows, fgrids, CPU, 3.0, 6.0, 1.5)
    depth, distance = _box_distances(shape, lo, hi, 1.5)
    for region, window in zip(regions, windows):
        crop = window.crop
        np.testing.assert_array_equal(region["core"].numpy(), _block_mean(crop(depth >= 3.0), 4) >= 0.5)
        np.testing.assert_array_equal(region["outside"].numpy(), _block_mean(crop(distance > 6.0), 4) >= 0.5)
        np.testing.assert_array_equal(region["band"].numpy(), _block_mean(crop(distance <= 1.5), 4) > 0)


# ------------------------------------------------------------------------------------------
# contrastive prior, core cleaning
# ------------------------------------------------------------------------------------------
def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), channels=st.integers(2, 16), n_f=st.integers(1, 12), n_b=st.integers(1, 12),
       tau=st.floats(0.02, 1.0))
def test_contrastive_prior_is_the_two_set_soft_assignment(seed, channels, n_f, n_b, tau):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(channels, 3, 4, 5, generator=gen) * 7.0  # not normalised: the prior normalises
    fg, bg = torch.randn(n_f, channels, generator=gen), torch.randn(n_b, channels, generator=gen)
    p_sim, entropy = contrastive_prior(query, fg, bg, tau)
    assert p_sim.shape == entropy.shape == (3, 4, 5)
    assert bool(torch.isfinite(p_sim).all() and torch.isfinite(entropy).all())
    assert float(p_sim.min()) >= 0 and float(p_sim.max()) <= 1 and float(entropy.min()) >= 0 and float(entropy.max()) <= 1
    # the definition, in float64
    q = F.normalize(query.reshape(channels, -1).double(), dim=0)
    sim_f, sim_b = F.normalize(fg.double(), dim=1) @ q, F.normalize(bg.double(), dim=1) @ q
    a_f = torch.logsumexp(sim_f / tau, 0) - math.log(n_f)
    a_b = torch.logsumexp(sim_b / tau, 0) - math.log(n_b)
    expected = torch.sigmoid(a_f - a_b).reshape(3, 4, 5)
    torch.testing.assert_close(p_sim.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, _binary_entropy(p_sim).clamp(0, 1), atol=1e-5, rtol=0)
    # swapping the sets is the complementary assignment with the same entropy
    p_swapped, h_swapped = contrastive_prior(query, bg, fg, tau)
    torch.testing.assert_close(p_swapped, 1 - p_sim, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_swapped, entropy, atol=1e-4, rtol=0)


def test_contrastive_prior_on_hand_made_prototypes():
    fg = torch.tensor([[1.0, 0.0, 0.0]])
    bg = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])[:, :, None, None]  # [3, 4, 1, 1]
    p_sim, entropy = contrastive_prior(query, fg, bg, tau_s=0.1)
    p = p_sim.flatten()
    assert float(p[0]) > 0.999 and float(p[1]) < 0.001 and float(p[3]) < 0.001  # a prototype itself
    # as close to the foreground prototype as to one background prototype: the background set's
    # mean also counts its far prototype, so the voxel leans to the foreground (p ~ 2/3)
    s = 1 / math.sqrt(2)
    a_f = s / 0.1
    a_b = math.log((math.exp(0.0) + math.exp(s / 0.1)) / 2)
    assert float(p[2]) == pytest.approx(1 / (1 + math.exp(a_b - a_f)), abs=1e-5)
    assert 0.6 < float(p[2]) < 0.7
    assert float(entropy.flatten()[0]) < 0.02 and float(entropy.flatten()[2]) > 0.9
    same, h_same = contrastive_prior(query, fg, fg, 0.1)
    torch.testing.assert_close(same, torch.full_like(same, 0.5))
    torch.testing.assert_close(h_same, torch.ones_like(h_same))


def test_contrastive_prior_in_chunks_matches_one_block():
    """Many prototypes make the prior work in chunks of voxels; the result does not change."""
    gen = torch.Generator().manual_seed(0)
    fg = torch.randn(70_000, 4, generator=gen)  # chunk = 2^24 // 70000 = 239 voxels
    bg = torch.randn(50, 4, generator=gen)
    query = torch.randn(4, 10, 10, 6, generator=gen)  # 600 voxels: 3 chunks
    p_sim, _ = contrastive_prior(query, fg, bg, 0.1)
    q = F.normalize(query.reshape(4, -1), dim=0)
    expected = torch.sigmoid(log_mean_exp(F.normalize(fg, dim=1) @ q, 0.1) - log_mean_exp(F.normalize(bg, dim=1) @ q, 0.1))
    torch.testing.assert_close(p_sim.flatten(), expected, atol=1e-5, rtol=0)


def test_clean_core_drops_background_like_rows():
    gen = torch.Generator().manual_seed(1)
    organ = F.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(30, 4, generator=gen), dim=1)
    background = F.normalize(torch.tensor([0.0, 1.0, 0.0, 0.0]) + 0.05 * torch.randn(40, 4, generator=gen), dim=1)
    caught = background[:6]  # other tissue caught in the core by registration error
    core = torch.cat([organ, caught])
    cleaned = clean_core(core, background, tau_s=0.1)
    assert cleaned.shape[0] == organ.shape[0]
    torch.testing.assert_close(cleaned, organ)
    # nothing to drop: unchanged
    assert torch.equal(clean_core(organ, background, 0.1), organ)


def test_clean_core_keeps_a_quarter_and_leaves_small_or_unopposed_cores():
    gen = torch.Generator().manual_seed(2)
    background = F.normalize(torch.randn(20, 4, generator=gen), dim=1)
    core = background[:16] + 1e-3  # all background-like
    kept = clean_core(core, background, 0.1)
    assert kept.shape[0] >= 16 // 4 and kept.shape[0] < 16
    small = torch.randn(7, 4, generator=gen)
    assert clean_core(small, background, 0.1) is small  # fewer than 8 rows
    assert clean_core(core, torch.zeros(0, 4), 0.1) is core  # no background


# ------------------------------------------------------------------------------------------
# translated_appearance
# ------------------------------------------------------------------------------------------
def _two_modality_scene(shape=(40, 40, 40), seed=0):
    """A support and a query of one scene in two 'modalities' with another contrast order:
    organ (support 100 / query 20), its surroundings (support 40 / query 80) and a far tissue
    (support 70 / query 50), with noise. Returns (support, query, organ mask, far mask)."""
    rng = np.random.default_rng(seed)
    organ = _box_mask(shape, (12, 12, 12), (28, 28, 28))
    far = _box_mask(shape, (0, 0, 0), (6, 40, 40))
    support = np.where(organ, 100.0, np.where(far, 70.0, 40.0)) + rng.normal(0, 3, shape)
    query = np.where(organ, 20.0, np.where(far, 50.0, 80.0)) + rng.normal(0, 3, shape)
    return support.astype(np.float32), query.astype(np.float32), organ, far


def test_translated_appearance_carries_the_organ_contrast_across_modalities():
    support, query, organ, far = _two_modality_scene()
    covered = np.ones(organ.shape, bool)
    spacing = np.full(3, 1.5)
    aligned = translated_appearance(support, covered, organ, query, spacing)
    assert aligned.dtype == np.float32 and aligned.shape == organ.shape
    assert (aligned[organ] > 0).mean() > 0.99 and (aligned[~organ] < 0).mean() > 0.99
    # a warped mask 6 voxels (9 mm) off still gives the organ's intensities, since the whole
    # covered scene estimates how the support's intensities map to the query's
    off = np.roll(organ, 6, axis=0)
    support_off = np.roll(support, 6, axis=0)  # the support, registered 6 voxels wrong
    shifted = translated_appearance(support_off, covered, off, query, spacing)
    assert (shifted[organ] > 0).mean() > 0.95
    assert (shifted[~organ & ~far] < 0).mean() > 0.95
    # what the core of the misplaced mask keeps: only organ voxels
    keep = (shifted > 0) & off
    assert organ[keep].mean() > 0.97 and organ[off].mean() < 0.7


def test_translated_appearance_is_a_function_of_the_query_intensity():
    rng = np.random.default_rng(3)
    support, query, organ, _ = _two_modality_scene(seed=3)
    query = np.round(query / 4.0) * 4.0  # few distinct values
    covered = rng.random(organ.shape) > 0.3
    out = translated_appearance(support, covered, organ, query, np.full(3, 1.5))
    for value in np.unique(query):
        assert np.ptp(out[query == value]) == 0.0  # same intensity, same log-ratio (covered or not)


def test_translated_appearance_without_data_is_zero():
    support, query, organ, _ = _two_modality_scene()
    nothing = np.zeros(organ.shape, bool)
    spacing = np.full(3, 1.5)
    assert not translated_appearance(support, nothing, organ, query, spacing).any()  # nothing covered
    assert not translated_appearance(support, np.ones(organ.shape, bool), nothing, query, spacing).any()  # no mask


# ------------------------------------------------------------------------------------------
# best_shift
# ------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(shift=st.tuples(*[st.integers(-4, 4).map(lambda v: 2 * v)] * 3), size=st.tuples(*[st.integers(6, 12)] * 3))
def test_best_shift_recovers_a_known_shift(shift, size):
    """``inside`` moved by ``t`` (a multiple of the search step) is where the semantic map says
    the structure is: the search finds ``t``."""
    shape = (40, 40, 40)
    lo = np.array([14, 14, 14])
    inside = _box_mask(shape, lo, lo + size)
    p_sim = _box_mask(shape, lo + shift, lo + np.asarray(size) + shift).astype(np.float32)
    windows = [Window.on(_grid(shape), (0, 0, 0), shape)]
    found = best_shift(inside, p_sim, np.full(3, 1.5), max_shift_mm=22.0, windows=windows)  # |t| <= 20.8 mm
    np.testing.assert_array_equal(found, shift)


def test_best_shift_keeps_zero_and_respects_the_limit():
    shape = (40, 40, 40)
    spacing = np.full(3, 1.5)
    windows = [Window.on(_grid(shape), (0, 0, 0), shape)]
    inside = _box_mask(shape, (14, 14, 14), (24, 24, 24))
    # the semantic map agrees with the mask as it is: no shift
    assert not best_shift(inside, inside.astype(np.float32), spacing, 15.0, windows).any()
    # no evidence anywhere (P_sim = 0.5): no shift
    assert not best_shift(inside, np.full(shape, 0.5, np.float32), spacing, 15.0, windows).any()
    # evidence 12 voxels (18 mm) away, beyond a 9 mm limit: the best allowed shift towards it
    far = _box_mask(shape, (26, 14, 14), (36, 24, 24)).astype(np.float32)
    limited = best_shift(inside, far, spacing, 9.0, windows)
    assert np.linalg.norm(limited * spacing) <= 9.0 + 1e-6
    np.testing.assert_array_equal(limited, (6, 0, 0))
    np.testing.assert_array_equal(best_shift(inside, far, spacing, 20.0, windows), (12, 0, 0))
