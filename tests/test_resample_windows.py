"""Physical-space resampling, working grids, windows, merging and paste-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spasem.core.backends import Features
from spasem.core.pipeline import features_to_window, paste_to_grid
from spasem.core.resample import resample, resample_to_spacing
from spasem.core.volume import RAS_DIRECTION, Grid, Volume
from spasem.core.windows import Window, WindowMerger, plan_windows, roi_bounds, tile_windows, zscore


def _ball(grid: Grid, centre_mm, radius_mm) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    pts = grid.index_to_physical(idx)
    return (np.linalg.norm(pts - np.asarray(centre_mm), axis=-1) <= radius_mm).astype(np.uint8)


def test_label_resampling_is_nearest_and_physical():
    src_grid = Grid((40, 40, 16), (1.0, 1.0, 3.0), (0, 0, 0), np.diag([1.0, -1.0, 1.0]))  # y flipped
    labels = _ball(src_grid, (20, -20, 24), 8) * 3
    vol = Volume(labels, src_grid, is_label=True)
    target = src_grid.canonical(1.5)
    out = resample(vol, target)
    assert out.is_label and out.array.dtype == labels.dtype
    assert set(np.unique(out.array)) <= {0, 3}
    # the ball stays where it is in physical space
    centre_idx = np.argwhere(out.array > 0).mean(0)
    assert np.allclose(target.index_to_physical(centre_idx), (20, -20, 24), atol=1.0)
    with pytest.raises(ValueError, match="nearest"):
        resample(vol, target, interpolation="linear")


def test_resample_to_spacing_gives_canonical_isotropic_grid():
    vol = Volume(np.random.default_rng(0).normal(size=(30, 20, 10)).astype(np.float32),
                 Grid((30, 20, 10), (0.8, 0.8, 2.5), (5, 5, 5), np.eye(3)))
    out = resample_to_spacing(vol, 1.5)
    assert np.allclose(out.spacing, 1.5) and np.allclose(out.direction, RAS_DIRECTION)
    assert out.array.dtype == np.float32


def test_exact_reorientation_skips_interpolation():
    grid = Grid((5, 6, 7), (1, 1, 1), (0, 0, 0), np.eye(3))
    arr = np.random.default_rng(3).normal(size=grid.shape).astype(np.float32)
    flipped = Grid((5, 6, 7), (1, 1, 1), (0, 5, 0), np.diag([1.0, -1.0, 1.0]))
    out = resample(Volume(arr, grid), flipped)
    np.testing.assert_array_equal(out.array, arr[:, ::-1, :])


def test_window_crop_pads_outside_and_roundtrips_inside():
    work = Grid((20, 20, 20), (1.5,) * 3, (0, 0, 0), RAS_DIRECTION)
    arr = np.arange(8000, dtype=np.float32).reshape(20, 20, 20)
    win = Window.on(work, (-3, 5, 15), (8, 8, 8))
    crop = win.crop(arr, fill=-1)
    assert crop.shape == (8, 8, 8)
    assert np.all(crop[:3] == -1) and np.all(crop[:, :, 5:] == -1)
    np.testing.assert_array_equal(crop[3:, :, :5], arr[0:5, 5:13, 15:20])
    # the window's grid places its voxel 0 at work index (-3, 5, 15)
    assert np.allclose(win.grid.origin, work.index_to_physical([-3, 5, 15]))
    assert np.allclose(torch.as_tensor(crop).numpy(), win.crop(torch.as_tensor(arr), fill=-1).numpy())


@pytest.mark.parametrize("length", [10, 64, 65, 130, 300])
def test_planned_windows_cover_the_roi_with_overlap(length):
    work = Grid((400, 70, 70), (1.5,) * 3, (0, 0, 0), RAS_DIRECTION)
    lo, hi = np.array([20, 10, 10]), np.array([20 + length - 1, 40, 40])
    wins = plan_windows(work, lo, hi, (64, 64, 64), min_overlap=0.25)
    starts = sorted({w.start[0] for w in wins})
    covered = np.zeros(400 + 200, bool)
    for s in starts:
        covered[s + 100 : s + 164] = True
    assert covered[lo[0] + 100 : hi[0] + 101].all()
    for a, b in zip(starts, starts[1:]):
        assert (a + 64) - b >= 0.25 * 64 - 1  # neighbours overlap by >= 25 %
    if length <= 64:  # one window, centred on the ROI
        assert len(starts) == 1 and abs((starts[0] + 31.5) - (lo[0] + hi[0]) / 2) <= 0.5


def test_tiled_windows_partition_the_box():
    work = Grid((100, 100, 100), (1.5,) * 3, (0, 0, 0), RAS_DIRECTION)
    wins = tile_windows(work, (10, 10, 10), (80, 20, 20), (32, 32, 32))
    count = np.zeros((200, 200, 200), np.int32)
    for w in wins:
        s = np.asarray(w.start) + 50
        count[s[0] : s[0] + 32, s[1] : s[1] + 32, s[2] : s[2] + 32] += 1
    assert count.max() == 1
    assert count[60:131, 60:71, 60:71].min() == 1


def test_merger_averages_and_reports_uncovered_voxels():
    work = Grid((30, 10, 10), (1.5,) * 3, (0, 0, 0), RAS_DIRECTION)
    merger = WindowMerger(work.shape)
    merger.add(Window.on(work, (0, 0, 0), (16, 10, 10)), torch.full((16, 10, 10), 2.0))
    merger.add(Window.on(work, (10, 0, 0), (16, 10, 10)), torch.full((16, 10, 10), 4.0))
    out = merger.result(default=-7)
    assert torch.all(out[:10] == 2) and torch.all(out[16:26] == 4)
    assert torch.all((out[10:16] > 2) & (out[10:16] < 4))
    assert torch.all(out[26:] == -7)


def test_paste_back_restores_the_query_grid():
    """A query-space mask taken to the working grid and pasted back is the same mask (up to the
    1.5 mm resolution), on exactly the query's grid."""
    query = Grid((80, 70, 24), (0.8, 0.8, 2.5), (100.0, -20.0, 30.0), np.diag([-1.0, 1.0, 1.0]))
    ball = _ball(query, query.index_to_physical([40, 35, 12]), 15)
    work = query.canonical(1.5)
    on_work = resample(Volume(ball.astype(np.float32), query), work)
    back = paste_to_grid(on_work, query, outside=0.0)
    assert back.grid is query
    mask = back.array >= 0.5
    dice = 2 * (mask & (ball > 0)).sum() / (mask.sum() + ball.sum())
    assert dice > 0.95


def test_features_to_window_interpolates_in_physical_space():
    window = Grid((16, 16, 16), (1.5,) * 3, (0, 0, 0), RAS_DIRECTION)
    fgrid = window.scaled(4)
    # a linear ramp along i is reproduced exactly between coarse centres
    ramp = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 4, 4).contiguous()
    out = features_to_window(ramp, Features(ramp[None], fgrid, window))
    assert out.shape == (16, 16, 16)
    expected = torch.clamp((torch.arange(16, dtype=torch.float32) - 1.5) / 4, 0, 3)
    assert torch.allclose(out[:, 5, 5], expected, atol=1e-5)


def test_roi_bounds_margin_and_empty():
    work = Grid((50, 50, 50), (1.5,) * 3, (0, 0, 0), RAS_DIRECTION)
    mask = np.zeros(work.shape, bool)
    assert roi_bounds(mask, work) is None
    mask[20:25, 30, 1] = True
    lo, hi = roi_bounds(mask, work, margin_mm=3.0)
    assert lo.tolist() == [18, 28, 0] and hi.tolist() == [26, 32, 3]


def test_zscore_uses_the_mask():
    values = np.array([1.0, 2.0, 3.0, 100.0], np.float32).reshape(1, 1, 4)
    out = zscore(values, values < 50)
    np.testing.assert_allclose(out[0, 0, :3], [-1, 0, 1], atol=1e-6)
    assert np.all(zscore(np.full((2, 2, 2), 5.0, np.float32)) == 0)
