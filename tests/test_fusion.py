"""The four fusion strategies (spasem.plugins.fusion.builtin), through the plugin engine.

Expected values are computed by hand (``math`` in a Python shell, pasted) or with an
independent numpy formula, never with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import spasem
from spasem.errors import ConfigError

PROPERTY = settings(max_examples=60, deadline=None)
NAMES = ["entropy_gate", "mean", "spatial_only", "semantic_only"]

probabilities = st.floats(0.0, 1.0)
prob_arrays = arrays(np.float64, st.integers(1, 30), elements=probabilities)


def np_logit(p, eps=1e-6):
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_is_registered_with_paper_defaults(name):
    fusion = spasem.get_fusion(name)
    assert fusion.name == name
    assert fusion.config.logit_eps == 1e-6
    if name == "entropy_gate":
        assert fusion.config.eps == 1e-6


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="entropy_gate"):
        spasem.get_fusion("entropy_gate", tau=0.1)
    with pytest.raises(ConfigError, match="eps"):
        spasem.get_fusion("entropy_gate", eps=-1.0)


def test_hand_computed_values():
    p_reg, p_sim, h = t(0.8, 0.3), t(0.6, 0.9), t(0.25, 0.6)
    # logit(0.8) = ln 4 = 1.3862943611198908, logit(0.6) = ln 1.5 = 0.4054651081081642
    # gate: 0.8 * (0.6 + 1e-6) * ln 4 + 0.75 * ln 1.5 ; 0.3 * (0.9 + 1e-6) * ln(3/7) + 0.4 * ln 9
    gate = spasem.get_fusion("entropy_gate").fuse(p_reg, p_sim, h)
    assert gate.tolist() == pytest.approx([0.9695212334541596, 0.6501191544405849], abs=1e-12)
    mean = spasem.get_fusion("mean").fuse(p_reg, p_sim, h)
    assert mean[0].item() == pytest.approx(0.8958797346140275, abs=1e-12)
    assert spasem.get_fusion("spatial_only").fuse(p_reg, p_sim, h)[0].item() == pytest.approx(1.3862943611198908, abs=1e-12)
    assert spasem.get_fusion("semantic_only").fuse(p_reg, p_sim, h)[0].item() == pytest.approx(0.4054651081081642, abs=1e-12)


def test_options_change_the_result():
    p_reg, p_sim, h = t(0.8), t(0.0), t(1.0)
    # H = 1: only W_reg logit(P_reg) = 0.8 * (0 + eps) * ln 4 is left
    assert spasem.get_fusion("entropy_gate").fuse(p_reg, p_sim, h).item() == pytest.approx(0.8e-6 * math.log(4), rel=1e-9)
    assert spasem.get_fusion("entropy_gate", eps=0.5).fuse(p_reg, p_sim, h).item() == pytest.approx(0.4 * math.log(4))
    clamped = spasem.get_fusion("semantic_only", logit_eps=0.1).fuse(p_reg, p_sim, h)
    assert clamped.item() == pytest.approx(math.log(0.1 / 0.9))


@pytest.mark.parametrize("name", NAMES)
def test_shapes_must_agree(name):
    with pytest.raises(ValueError, match="one shape"):
        spasem.get_fusion(name).fuse(torch.zeros(3), torch.zeros(3), torch.zeros(4))


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(data=st.data())
def test_fused_logits_are_finite_for_any_priors(name, data):
    n = data.draw(st.integers(1, 30))
    p_reg, p_sim, h = (data.draw(arrays(np.float32, n, elements=st.floats(0, 1, width=32))) for _ in range(3))
    out = spasem.get_fusion(name).fuse(torch.from_numpy(p_reg), torch.from_numpy(p_sim), torch.from_numpy(h))
    assert out.shape == (n,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@PROPERTY
@given(prob_arrays, st.data())
def test_each_strategy_follows_its_formula(p_reg, data):
    n = p_reg.shape[0]
    p_sim = data.draw(arrays(np.float64, n, elements=probabilities))
    h = data.draw(arrays(np.float64, n, elements=probabilities))
    args = [torch.from_numpy(a) for a in (p_reg, p_sim, h)]
    expected = {
        "entropy_gate": p_reg * (p_sim + 1e-6) * np_logit(p_reg) + (1 - h) * np_logit(p_sim),
        "mean": (np_logit(p_reg) + np_logit(p_sim)) / 2,
        "spatial_only": np_logit(p_reg),
        "semantic_only": np_logit(p_sim),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(spasem.get_fusion(name).fuse(*args).numpy(), value, rtol=1e-9, atol=1e-9)


@PROPERTY
@given(prob_arrays, st.data())
def test_semantic_term_vanishes_where_entropy_is_one(p_reg, data):
    p_sim = data.draw(arrays(np.float64, p_reg.shape[0], elements=probabilities))
    gate = spasem.get_fusion("entropy_gate")
    out = gate.fuse(torch.from_numpy(p_reg), torch.from_numpy(p_sim), torch.ones(p_reg.shape[0], dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), p_reg * (p_sim + 1e-6) * np_logit(p_reg), rtol=1e-12, atol=1e-15)


@PROPERTY
@given(st.one_of(st.just(0.0), st.floats(0.5, 1.0)), probabilities, probabilities, probabilities)
def test_gate_is_non_decreasing_in_p_sim_where_p_reg_is_zero_or_at_least_half(p_reg, a, b, h):
    low, high = sorted((a, b))
    gate = spasem.get_fusion("entropy_gate")
    out = gate.fuse(t(p_reg, p_reg), t(low, high), t(h, h))
    assert out[1].item() >= out[0].item() - 1e-12 * (1 + abs(out[0].item()))


def test_gate_is_not_monotone_in_p_sim_below_half_p_reg():
    """Why the monotonicity test needs P_reg = 0 or >= 0.5: dL/dP_sim = P_reg logit(P_reg) +
    (1 - H) / (P_sim (1 - P_sim)); the first term is negative for 0 < P_reg < 0.5."""
    gate = spasem.get_fusion("entropy_gate")
    # H = 1: L = 0.2 (P_sim + eps) ln(1/4), strictly decreasing in P_sim
    out = gate.fuse(t(0.2, 0.2), t(0.4, 0.6), t(1.0, 1.0))
    assert out[1] < out[0]
    # H = 0.99: 4 (1 - H) = 0.04 < -0.2 ln(1/4) = 0.277, so it decreases around P_sim = 0.5
    out = gate.fuse(t(0.2, 0.2), t(0.49, 0.51), t(0.99, 0.99))
    assert out[1] < out[0]
    # in the clamped zone (P_sim < logit_eps) only the W_reg term moves: decreasing
    out = gate.fuse(t(0.2, 0.2), t(0.0, 5e-7), t(0.0, 0.0))
    assert out[1] < out[0]
    # but with confident prototypes (H = 0) it increases around 0.5
    out = gate.fuse(t(0.2, 0.2), t(0.49, 0.51), t(0.0, 0.0))
    assert out[1] > out[0]
