"""Context priors (spasem.core.priors): hand-computed cases, property tests, streamed == dense.

References used here are written independently of the code under test: numpy/scipy float64
formulas (``reference_semantic``), ``scipy.ndimage.gaussian_filter`` and numbers computed by hand
(with ``math`` in a Python shell, pasted as literals).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from scipy.special import logsumexp

from spasem.core.backends import Features
from spasem.core.priors import (
    gaussian_smooth,
    logit,
    mask_fraction_on_features,
    prototypes,
    semantic_block_sizes,
    semantic_prior,
    semantic_prior_dense,
    spatial_prior,
)
from spasem.core.volume import Grid

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# independent reference and strategies
# ------------------------------------------------------------------------------------------
def reference_semantic(features: np.ndarray, protos: np.ndarray, tau_s: float, tau_e: float):
    """The issue's formulas in float64 numpy with scipy's logsumexp: (P_sim, H), flat [V]."""
    q = features.reshape(features.shape[0], -1).astype(np.float64).T  # [V, C]
    p = protos.astype(np.float64)

    def unit(x):
        x = x / np.maximum(np.abs(x).max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n > 0, n, 1.0)

    sim = unit(p) @ unit(q).T  # [N, V]
    log_ws = sim / tau_s - logsumexp(sim / tau_s, axis=0)
    s = (np.exp(log_ws) * sim).sum(axis=0)
    if p.shape[0] == 1:
        h = np.zeros(sim.shape[1])
    else:
        log_we = sim / tau_e - logsumexp(sim / tau_e, axis=0)
        h = -(np.exp(log_we) * log_we).sum(axis=0) / math.log(p.shape[0])
    return np.clip((s + 1) / 2, 0, 1), np.clip(h, 0, 1)


def any_finite_float32():
    return st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def semantic_inputs(draw, elements=None, max_prototypes=12):
    """(features [C, d, h, w] float32, prototypes [N, C] float32)."""
    if elements is None:
        elements = st.floats(-10, 10, width=32)
    c = draw(st.integers(1, 6))
    shape = (c, draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    n = draw(st.integers(1, max_prototypes))
    feats = draw(arrays(np.float32, shape, elements=elements))
    protos = draw(arrays(np.float32, (n, c), elements=elements))
    return torch.from_numpy(feats), torch.from_numpy(protos)


@st.composite
def block_options(draw, feats, protos):
    voxels = int(np.prod(feats.shape[1:]))
    return {
        "block_voxels": draw(st.integers(1, voxels)),
        "block_prototypes": draw(st.integers(1, protos.shape[0])),
    }


temperatures = st.floats(1e-3, 10.0)


# ------------------------------------------------------------------------------------------
# logit
# ------------------------------------------------------------------------------------------
def test_logit_hand_values():
    p = torch.tensor([0.5, 0.8, 0.6, 0.0, 1.0], dtype=torch.float64)
    expected = [0.0, 1.3862943611198908, 0.4054651081081642, -13.815509557963773, 13.815509557963773]
    assert logit(p).tolist() == pytest.approx(expected, abs=1e-9)


def test_logit_custom_eps_clamps_there():
    assert logit(torch.tensor([0.0], dtype=torch.float64), eps=0.1).item() == pytest.approx(math.log(0.1 / 0.9))
    with pytest.raises(ValueError, match="eps"):
        logit(torch.tensor([0.5]), eps=0.5)


@PROPERTY
@given(arrays(np.float32, st.integers(1, 50), elements=st.floats(0, 1, width=32)))
def test_logit_is_finite_and_inverts_the_sigmoid(p):
    out = logit(torch.from_numpy(p))
    assert torch.isfinite(out).all()
    clamped = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(torch.sigmoid(out.double()).numpy(), clamped, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# spatial prior
# ------------------------------------------------------------------------------------------
def test_spatial_prior_of_one_voxel_is_the_unnormalised_gaussian():
    mask = torch.zeros(21, 21, 21)
    mask[10, 10, 10] = 1
    prior = spatial_prior(mask, sigma=2.0)
    # exp(-|d|^2 / (2 sigma^2)), kernel cut at 4 sigma = 8 voxels per axis
    assert prior[10, 10, 10].item() == 1.0
    assert prior[11, 10, 10].item() == pytest.approx(0.8824969025845955, abs=1e-6)
    assert prior[12, 12, 10].item() == pytest.approx(0.36787944117144233, abs=1e-6)
    assert prior[12, 9, 13].item() == pytest.approx(0.17377394345044514, abs=1e-6)
    assert prior[18, 10, 10].item() == pytest.approx(0.00033546262790251185, rel=1e-4)
    assert prior[19, 10, 10].item() == 0.0  # beyond the truncation radius
    assert prior[10, 1, 10].item() == 0.0


def test_spatial_prior_pads_with_zeros():
    prior = spatial_prior(torch.ones(20, 20, 20), sigma=2.0)
    # centre: the whole kernel is inside -> 1; a face voxel keeps half of the kernel on one
    # axis: (k_0 + ... + k_8) = 0.59973...; a corner on all three axes: 0.59973...^3
    assert prior[10, 10, 10].item() == pytest.approx(1.0, abs=1e-6)
    assert prior[0, 10, 10].item() == pytest.approx(0.5997373239323726, abs=1e-6)
    assert prior[19, 10, 10].item() == pytest.approx(0.5997373239323726, abs=1e-6)
    assert prior[0, 19, 0].item() == pytest.approx(0.21571643402652776, abs=1e-6)


def test_spatial_prior_of_empty_mask_is_zero():
    prior = spatial_prior(torch.zeros(7, 5, 3), sigma=2.0)
    assert prior.shape == (7, 5, 3)
    assert torch.equal(prior, torch.zeros(7, 5, 3))


def test_spatial_prior_rejects_short_truncation_and_bad_shapes():
    with pytest.raises(ValueError, match="truncate"):
        spatial_prior(torch.ones(4, 4, 4), sigma=2.0, truncate=2.5)
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        spatial_prior(torch.ones(4, 4), sigma=2.0)
    with pytest.raises(ValueError, match="NaN"):
        spatial_prior(torch.full((3, 3, 3), float("nan")), sigma=1.0)


masks = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 9)),
               elements=st.sampled_from([0.0, 1.0]))
sigmas = st.floats(0.3, 4.0)


@PROPERTY
@given(masks, sigmas)
def test_spatial_prior_has_max_one_when_mask_is_not_empty(mask, sigma):
    prior = spatial_prior(torch.from_numpy(mask), sigma)
    if mask.any():
        assert prior.max().item() == 1.0
    else:
        assert prior.max().item() == 0.0


@PROPERTY
@given(arrays(np.float32, st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 8)),
              elements=st.floats(0, 1, width=32)), sigmas)
def test_spatial_prior_is_finite_and_in_unit_interval(mask, sigma):
    prior = spatial_prior(torch.from_numpy(mask), sigma)
    assert torch.isfinite(prior).all()
    assert prior.min().item() >= 0.0 and prior.max().item() <= 1.0


@PROPERTY
@given(masks, sigmas)
def test_gaussian_smooth_matches_scipy_with_constant_padding(mask, sigma):
    radius = max(1, math.ceil(4.0 * sigma))
    expected = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant", cval=0.0, radius=radius)
    got = gaussian_smooth(torch.from_numpy(mask), sigma).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_gaussian_smooth_keeps_float64_and_copies_for_zero_sigma():
    x = torch.rand(3, 4, 5, dtype=torch.float64)
    assert gaussian_smooth(x, 1.0).dtype == torch.float64
    same = gaussian_smooth(x, 0.0)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


# ------------------------------------------------------------------------------------------
# prototypes
# ------------------------------------------------------------------------------------------
def _cell_index_features(shape, channels=2):
    """Features whose channel 0 is the flat cell index, channel 1 its negative."""
    idx = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    return torch.stack([idx, -idx] + [idx * 0] * (channels - 2))


def test_prototypes_hand_case():
    feats = _cell_index_features((2, 2, 2))
    mask = torch.zeros(4, 4, 4)
    mask[0:2, 0:2, 0:2] = 1  # cell (0,0,0): fraction 1
    mask[2:4, 2:4, 2:3] = 1  # cell (1,1,1): fraction 1/2
    mask[0:1, 2:4, 0:1] = 1  # cell (0,1,0): fraction 1/4
    protos = prototypes(feats, mask)
    assert protos.tolist() == [[0.0, -0.0], [7.0, -7.0]]
    assert prototypes(feats, mask, min_fraction=0.25).tolist() == [[0.0, -0.0], [2.0, -2.0], [7.0, -7.0]]
    assert prototypes(feats, mask, min_fraction=1.0).tolist() == [[0.0, -0.0]]


def test_prototypes_of_empty_mask_is_an_empty_matrix():
    protos = prototypes(torch.randn(5, 2, 3, 4), torch.zeros(4, 6, 8))
    assert protos.shape == (0, 5)


def test_structure_smaller_than_a_cell_still_gives_a_prototype():
    feats = _cell_index_features((2, 2, 2))
    mask = torch.zeros(8, 8, 8)
    mask[5, 1, 6] = 1  # one voxel of cell (1, 0, 1): fraction 1/64
    assert prototypes(feats, mask).tolist() == [[5.0, -5.0]]


def test_mask_fraction_uses_the_feature_grid_footprint_when_given():
    # window of 5 voxels along i, stride 2: cells cover i = {0,1}, {2,3}, {4}
    window = Grid((5, 4, 4), (1.5, 1.5, 1.5), (10.0, -3.0, 7.0))
    fgrid = window.scaled(2)
    assert fgrid.shape == (3, 2, 2)
    feats = Features(_cell_index_features(fgrid.shape), fgrid, window)
    mask = torch.zeros(5, 4, 4)
    mask[0:2, 0:2, 0:2] = 1  # all of cell (0, 0, 0)
    mask[1, 2:4, 2:4] = 1  # half of cell (0, 1, 1)
    mask[4, 0:2, 0:2] = 1  # all of cell (2, 0, 0), which has 4 voxels
    fraction = mask_fraction_on_features(mask, fgrid.shape, feats)
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0], expected[0, 1, 1], expected[2, 0, 0] = 1.0, 0.5, 1.0
    assert torch.allclose(fraction, expected)
    assert prototypes(feats, mask, min_fraction=0.75)[:, 0].tolist() == [0.0, 8.0]
    # the plain tensor divides 5 voxels into 3 equal bins ({0,1}, {1,2,3}, {3,4}): cell (2,0,0) only half
    assert prototypes(feats.data, mask, min_fraction=0.75)[:, 0].tolist() == [0.0]


def test_prototypes_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[C, d, h, w\]"):
        prototypes(torch.zeros(2, 3, 3), torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        prototypes(torch.zeros(2, 3, 3, 3), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------
# semantic prior: hand-computed cases
# ------------------------------------------------------------------------------------------
def test_semantic_prior_hand_case_two_prototypes():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[3.0, 0.0], [0.0, -2.0]]).T.reshape(2, 2, 1, 1)  # sims (1, 0) and (0, -1)
    p_sim, entropy = semantic_prior(feats, protos, 0.1, 0.07)
    # S = e^10 / (e^10 + 1); P = (1 + S) / 2.  w = softmax((1, 0) / 0.07); H = binary entropy / ln 2
    assert p_sim.flatten().tolist() == pytest.approx([0.9999773010656487, 0.4999773010656488], abs=1e-7)
    assert entropy.flatten().tolist() == pytest.approx([1.3780124133729612e-05, 1.3780124133729612e-05], abs=1e-7)


def test_semantic_prior_hand_case_three_prototypes():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, -0.6]])
    feats = torch.tensor([0.6, 0.8]).reshape(2, 1, 1, 1)  # sims (0.6, 0.8, 0)
    p_sim, entropy = semantic_prior(feats, protos, 0.1, 0.07)
    assert p_sim.item() == pytest.approx(0.8879650740105859, abs=1e-6)
    assert entropy.item() == pytest.approx(0.19219788239934157, abs=2e-6)


def test_semantic_prior_hand_case_equal_similarities_and_single_prototype():
    feats = torch.tensor([1.0, 1.0]).reshape(2, 1, 1, 1)
    # (1,0), (1,0), (0,1) all have cosine 1/sqrt(2) with (1,1): S = 1/sqrt(2), H = 1
    p_sim, entropy = semantic_prior(feats, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert p_sim.item() == pytest.approx(0.8535533905932737, abs=1e-6)
    assert entropy.item() == pytest.approx(1.0, abs=1e-6)
    p_sim, entropy = semantic_prior(feats, torch.tensor([[2.0, 0.0]]))
    assert p_sim.item() == pytest.approx(0.8535533905932737, abs=1e-6)
    assert entropy.item() == 0.0


def test_zero_feature_voxel_is_undecided():
    p_sim, entropy = semantic_prior(torch.zeros(3, 1, 1, 2), torch.randn(4, 3))
    assert p_sim.flatten().tolist() == [0.5, 0.5]
    assert entropy.flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_semantic_prior_rejects_bad_inputs():
    feats = torch.randn(3, 2, 2, 2)
    with pytest.raises(ValueError, match="at least one prototype"):
        semantic_prior(feats, torch.zeros(0, 3))
    with pytest.raises(ValueError, match="channels"):
        semantic_prior(feats, torch.randn(4, 5))
    with pytest.raises(ValueError, match="temperatures"):
        semantic_prior(feats, torch.randn(4, 3), tau_s=0.0)
    with pytest.raises(ValueError, match=r"\[C, d, h, w\]"):
        semantic_prior(torch.randn(3, 8), torch.randn(4, 3))


# ------------------------------------------------------------------------------------------
# semantic prior: streamed == dense
# ------------------------------------------------------------------------------------------
@PROPERTY
@given(st.data(), semantic_inputs(), st.sampled_from([(0.1, 0.07), (0.5, 1.0), (0.05, 0.2)]))
def test_streamed_equals_dense_float32(data, inputs, taus):
    feats, protos = inputs
    blocks = data.draw(block_options(feats, protos))
    p_ref, h_ref = reference_semantic(feats.numpy(), protos.numpy(), *taus)
    p_sim, entropy = semantic_prior(feats, protos, *taus, **blocks)
    assert p_sim.dtype == torch.float32 and p_sim.shape == feats.shape[1:]
    np.testing.assert_allclose(p_sim.flatten().numpy(), p_ref, atol=1e-6)
    np.testing.assert_allclose(entropy.flatten().numpy(), h_ref, atol=2e-6)
    p_dense, h_dense = semantic_prior_dense(feats, protos, *taus)
    np.testing.assert_allclose(p_sim.numpy(), p_dense.numpy(), atol=1e-6)
    np.testing.assert_allclose(entropy.numpy(), h_dense.numpy(), atol=3e-6)


@PROPERTY
@given(st.data(), semantic_inputs(max_prototypes=20),
       st.floats(1e-4, 100.0), st.floats(1e-4, 100.0))
def test_streamed_equals_dense_float64_at_any_temperature(data, inputs, tau_s, tau_e):
    feats, protos = inputs[0].double(), inputs[1].double()
    blocks = data.draw(block_options(feats, protos))
    p_ref, h_ref = reference_semantic(feats.numpy(), protos.numpy(), tau_s, tau_e)
    p_sim, entropy = semantic_prior(feats, protos, tau_s, tau_e, **blocks)
    assert p_sim.dtype == torch.float64
    np.testing.assert_allclose(p_sim.flatten().numpy(), p_ref, atol=1e-10)
    np.testing.assert_allclose(entropy.flatten().numpy(), h_ref, atol=1e-9)


def test_extreme_temperatures_where_naive_exp_overflows():
    torch.manual_seed(3)
    feats = torch.randn(8, 4, 4, 4) * 1e30  # huge raw values as well
    protos = torch.cat([feats.reshape(8, -1).T[:5] * 1e-30, torch.randn(40, 8)])  # sims of exactly 1 included
    tau_s, tau_e = 1e-3, 1e-4
    unit = torch.nn.functional.normalize
    sims = unit(protos.double(), dim=1) @ unit(feats.reshape(8, -1).double(), dim=0)
    assert sims.max() > 0.99
    assert not torch.isfinite(torch.exp(sims.float() / tau_e)).all()  # the naive softmax would overflow
    assert not torch.isfinite(torch.exp(sims / tau_e)).all()  # even in float64
    # F.normalize itself overflows on such features (its norm is inf in float32): all-zero vectors
    assert unit(feats.reshape(8, -1), dim=0).abs().max() == 0
    p_ref, h_ref = reference_semantic(feats.numpy(), protos.numpy(), tau_s, tau_e)
    for blocks in ({}, {"block_voxels": 5, "block_prototypes": 7}):
        p_sim, entropy = semantic_prior(feats, protos, tau_s, tau_e, **blocks)
        assert torch.isfinite(p_sim).all() and torch.isfinite(entropy).all()
        # float32 rounding of sim (~1e-7) is amplified by 1/tau here; dense float32 has the same error
        np.testing.assert_allclose(p_sim.flatten().numpy(), p_ref, atol=1e-5)
        np.testing.assert_allclose(entropy.flatten().numpy(), h_ref, atol=1e-4)
        p64, h64 = semantic_prior(feats.double(), protos.double(), tau_s, tau_e, **blocks)
        np.testing.assert_allclose(p64.flatten().numpy(), p_ref, atol=1e-10)
        np.testing.assert_allclose(h64.flatten().numpy(), h_ref, atol=1e-9)


def test_memory_budget_bounds_the_blocks():
    cases = [(262144, 20000, 384, 64 << 20), (100, 3, 8, 1 << 20), (10**6, 10**7, 384, 1 << 20), (5, 5, 2, 1),
             (32768, 512, 384, 64 << 20)]
    for voxels, protos, channels, budget in cases:
        bv, bp = semantic_block_sizes(voxels, protos, budget, 4, channels)
        assert 1 <= bv <= voxels and 1 <= bp <= protos
        if budget >= 4 * (3 + 3 * channels):  # else a 1 x 1 block is all that is left
            assert bv * (3 * bp + 3 * channels) * 4 <= budget
    # 64 MiB / 4 B = 16777216 elements; per voxel 3 * 20000 + 3 * 384 = 61152 -> 274 voxels
    assert semantic_block_sizes(262144, 20000, 64 << 20, 4, 384) == (274, 20000)
    # 16 MiB: 256 voxels; 16384 elements each, minus 1152 for the query -> 5077 prototypes
    assert semantic_block_sizes(262144, 20000, 16 << 20, 4, 384) == (256, 5077)


@pytest.mark.parametrize("budget", [1, 4096, 1 << 20])
def test_any_memory_budget_gives_the_same_result(budget):
    torch.manual_seed(0)
    feats, protos = torch.randn(6, 5, 4, 3), torch.randn(33, 6)
    expected = semantic_prior_dense(feats, protos)
    got = semantic_prior(feats, protos, memory_budget=budget)
    assert torch.allclose(got[0], expected[0], atol=1e-6) and torch.allclose(got[1], expected[1], atol=3e-6)


@pytest.mark.slow
def test_streamed_peak_memory_stays_far_below_the_dense_matrix():
    """16 x 32 x 32 voxels x 8192 prototypes: the dense similarity matrix alone is 512 MiB; the
    streamed call (16 MiB budget) must stay under 100 MiB above its inputs. Measured in a fresh process
    as the rise of its peak resident set (VmHWM, reset after the inputs are made)."""
    code = textwrap.dedent(
        """
        import torch
        from spasem.core.priors import semantic_prior
        def peak_mib():
            for line in open('/proc/self/status'):
                if line.startswith('VmHWM'):
                    return int(line.split()[1]) / 1024
        torch.manual_seed(0)
        feats, protos = torch.randn(4, 16, 32, 32), torch.randn(8192, 4)
        semantic_prior(feats[:, :2, :2, :2], protos[:8])  # warm up lazy initialisation
        open('/proc/self/clear_refs', 'w').write('5')  # peak := current resident set
        base = peak_mib()
        semantic_prior(feats, protos, memory_budget=16 << 20)
        print(peak_mib() - base)
        """
    )
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("this system cannot reset the peak resident set (/proc/self/clear_refs)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    rise_mib = float(out.stdout.split()[-1])
    assert rise_mib < 100, f"streamed semantic_prior raised the peak RSS by {rise_mib:.0f} MiB"


# ------------------------------------------------------------------------------------------
# semantic prior: properties
# ------------------------------------------------------------------------------------------
@PROPERTY
@given(semantic_inputs(elements=any_finite_float32()), temperatures, temperatures)
def test_semantic_prior_is_finite_for_any_finite_input(inputs, tau_s, tau_e):
    p_sim, entropy = semantic_prior(*inputs, tau_s, tau_e)
    assert torch.isfinite(p_sim).all() and torch.isfinite(entropy).all()


@PROPERTY
@given(semantic_inputs(elements=any_finite_float32()), temperatures, temperatures)
def test_semantic_prior_outputs_lie_in_unit_interval(inputs, tau_s, tau_e):
    p_sim, entropy = semantic_prior(*inputs, tau_s, tau_e)
    assert p_sim.min() >= 0 and p_sim.max() <= 1
    assert entropy.min() >= 0 and entropy.max() <= 1


@PROPERTY
@given(semantic_inputs(max_prototypes=1), temperatures, temperatures)
def test_entropy_is_zero_for_one_prototype(inputs, tau_s, tau_e):
    _, entropy = semantic_prior(*inputs, tau_s, tau_e)
    assert torch.equal(entropy, torch.zeros_like(entropy))


@PROPERTY
@given(semantic_inputs(), st.lists(st.sampled_from([0.25, 1.0, 2.0, 8.0]), min_size=2, max_size=10), temperatures)
def test_entropy_is_one_when_all_similarities_are_equal(inputs, scales, tau_e):
    feats, protos = inputs
    # one direction, scaled by powers of two: every prototype normalises to the same vector
    direction = protos[0] if protos[0].abs().max() > 0 else torch.ones_like(protos[0])
    same = direction[None] * torch.tensor(scales)[:, None]
    _, entropy = semantic_prior(feats, same, 0.1, tau_e)
    np.testing.assert_allclose(entropy.numpy(), 1.0, atol=2e-6)


@PROPERTY
@given(st.data(), semantic_inputs(), temperatures, temperatures)
def test_permuting_prototypes_changes_nothing(data, inputs, tau_s, tau_e):
    feats, protos = inputs
    order = torch.tensor(data.draw(st.permutations(range(protos.shape[0]))))
    blocks = data.draw(block_options(feats, protos))
    p1, h1 = semantic_prior(feats, protos, tau_s, tau_e, **blocks)
    p2, h2 = semantic_prior(feats, protos[order], tau_s, tau_e, **blocks)
    np.testing.assert_allclose(p2.numpy(), p1.numpy(), atol=1e-6)
    np.testing.assert_allclose(h2.numpy(), h1.numpy(), atol=3e-6)


@PROPERTY
@given(semantic_inputs(), temperatures, temperatures)
def test_duplicating_every_prototype_leaves_p_sim_unchanged(inputs, tau_s, tau_e):
    feats, protos = inputs
    p1, _ = semantic_prior(feats, protos, tau_s, tau_e)
    p2, _ = semantic_prior(feats, torch.cat([protos, protos]), tau_s, tau_e)
    np.testing.assert_allclose(p2.numpy(), p1.numpy(), atol=1e-6)


@PROPERTY
@given(semantic_inputs(), temperatures, temperatures)
def test_duplicating_every_prototype_adds_log2_to_the_raw_entropy(inputs, tau_s, tau_e):
    feats, protos = inputs
    n = protos.shape[0]
    _, h1 = semantic_prior(feats.double(), protos.double(), tau_s, tau_e)
    _, h2 = semantic_prior(feats.double(), torch.cat([protos, protos]).double(), tau_s, tau_e)
    # -sum over 2N of (w/2) log(w/2) = H log N + log 2
    expected = (h1 * math.log(n) + math.log(2)) / math.log(2 * n)
    np.testing.assert_allclose(h2.numpy(), expected.numpy(), atol=1e-9)
