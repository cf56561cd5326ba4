"""LSQ+ as a plugin: registered through its entry point, the paper's forward, gradients
and initialisations (Bhalgat et al. 2020, Eq. 1-4, Sec. 3.2) on constructed cases, EWGS
at δ = 0 is STE bit for bit, and a demo-sized training run through the recipe shipped
beside it."""

from __future__ import annotations

import math
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from ewgs_lsq_plus import LsqPlusActivationQuantizer, LsqPlusMethod, LsqPlusWeightQuantizer
from hypothesis import given, settings

from ewgs_plugins import ConfigError, registry
from ewgs_plugins.methods.lsq import LsqQuantizer
from ewgs_plugins.testing import assert_ewgs_at_zero_delta_is_ste, assert_short_run_trains

RECIPE = Path(__file__).resolve().parents[1] / "digits.yaml"


@st.composite
def batches(draw, rows: int = 4):
    """A batch of ``rows`` samples, skewed like Swish outputs (some negative values), with
    an incoming gradient."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale, shift = draw(st.floats(0.05, 5.0)), draw(st.floats(-1.0, 2.0))
    x = torch.randn(rows, draw(st.integers(2, 32)), generator=generator) * scale + shift
    return x, torch.randn(x.shape, generator=generator)


def activation_quantizer(bits: int, init: str = "minmax", **options) -> LsqPlusActivationQuantizer:
    return LsqPlusActivationQuantizer(bits, init, **options)


def test_the_entry_point_registers_lsq_plus_from_its_own_distribution():
    entry = registry().get("method", "lsq_plus")
    assert entry.factory is LsqPlusMethod
    assert entry.distribution == "ewgs-lsq-plus"
    method = registry().create("method", "lsq_plus", {"activation_init": "minmax"})
    assert isinstance(method.weight_quantizer(4), LsqQuantizer)  # LSQ's, reused
    assert method.activation_quantizer(4).init == "minmax"
    with pytest.raises(ConfigError, match=r"method\.options\.activation_init: expected one of"):
        registry().create("method", "lsq_plus", {"activation_init": "max"}, key_path="method")


@st.composite
def quantized_batches(draw):
    """An activation quantizer at some bit-width with a given step and offset, a batch
    and its incoming gradient."""
    x, grad = draw(batches())
    bits, step, offset = draw(st.integers(1, 8)), draw(st.floats(0.05, 2.0)), draw(st.floats(-3, 1))
    quantizer = activation_quantizer(bits)
    with torch.no_grad():
        quantizer.step.fill_(step)
        quantizer.offset.fill_(offset)
    return quantizer, x, grad, bits, step, offset


@settings(max_examples=60, deadline=None)
@given(case=quantized_batches())
def test_forward_is_the_asymmetric_grid_with_offset(case):
    quantizer, x, _, bits, step, offset = case
    out = quantizer(x).detach()
    p = 2**bits - 1
    # Eq. 1-2: x̄ = round(clip((x − β)/s, 0, p)), x̂ = x̄·s + β
    expected = torch.round(torch.clamp((x - offset) / step, 0, p)) * step + offset
    assert torch.allclose(out, expected, atol=1e-5 * (1 + abs(offset) + p * step))
    levels = offset + step * torch.arange(p + 1)
    distance = (out.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
    assert distance.max() <= 1e-5 * (1 + abs(offset) + p * step)


@settings(max_examples=60, deadline=None)
@given(case=quantized_batches())
def test_step_and_offset_gradients_are_the_papers_times_the_lsq_scale(case):
    quantizer, x, grad, bits, step, offset = case
    x = x.clone().requires_grad_()
    quantizer(x).backward(grad)
    p = 2**bits - 1
    z = (x.detach() - offset) / step
    inside = (z >= 0) & (z <= p)
    # Eq. 3-4 (round as identity): ∂x̂/∂s = round(z) − z inside, n = 0 below, p above;
    # ∂x̂/∂β = 0 inside, 1 outside. Both scaled by 1/sqrt(N·p), N = one sample's features.
    d_step = torch.where(inside, torch.round(z) - z, torch.where(z < 0, 0.0, float(p)))
    d_offset = (~inside).float()
    scale = 1.0 / math.sqrt(x[0].numel() * p)
    atol = 1e-4 * float(grad.abs().sum()) * scale * (1 + p)
    assert torch.allclose(quantizer.step.grad, (grad * d_step).sum() * scale, atol=atol)
    assert torch.allclose(quantizer.offset.grad, (grad * d_offset).sum() * scale, atol=atol)
    assert torch.allclose(x.grad, torch.where(inside, grad, 0.0), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), mean=st.floats(-1.0, 1.0), std=st.floats(0.01, 2.0))
def test_weight_step_init_is_max_abs_mean_plus_minus_three_std_over_two_to_b_minus_one(
    bits, mean, std
):
    w = torch.randn(8, 4, 3, 3) * std + mean
    quantizer = LsqPlusWeightQuantizer(bits)
    quantizer.initialize(w)
    mu, sigma = float(w.mean()), float(w.std(correction=0))
    expected = max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 2 ** (bits - 1)  # Sec. 3.2.1
    assert math.isclose(float(quantizer.step.detach()), expected, rel_tol=1e-5)


@settings(max_examples=40, deadline=None)
@given(case=batches(), bits=st.integers(1, 8))
def test_minmax_init_spans_the_batch_and_mse_init_has_no_larger_error(case, bits):
    x, _ = case
    minmax, mse = activation_quantizer(bits, "minmax"), activation_quantizer(bits, "mse")
    minmax.initialize(x)
    mse.initialize(x)
    # Sec. 3.2.2: s = (max − min)/(p − n), β = min − n·s (n = 0)
    assert math.isclose(float(minmax.offset.detach()), float(x.min()), abs_tol=1e-6)
    expected_step = (float(x.max()) - float(x.min())) / (2**bits - 1)
    assert math.isclose(float(minmax.step.detach()), expected_step, rel_tol=1e-5)
    assert torch.allclose(minmax(x).detach().min(), x.min(), atol=1e-5)
    assert torch.allclose(minmax(x).detach().max(), x.max(), atol=1e-4 * float(x.abs().max()))
    # the MSE search includes the min/max range, so it can only do better (up to the
    # float rounding of that candidate's step, computed in float32)
    error_minmax = float(((minmax(x).detach() - x) ** 2).mean())
    error_mse = float(((mse(x).detach() - x) ** 2).mean())
    assert error_mse <= error_minmax * (1 + 1e-3) + 1e-12


def test_mse_init_clips_a_long_tail_that_minmax_keeps():
    # Exponentially distributed values (a post-ReLU-like tail): at 2 bits, min/max spends
    # its levels on the few large values, MSE clips them and resolves the bulk.
    x = -torch.log(torch.rand(40, 100, generator=torch.Generator().manual_seed(0)))
    minmax, mse = activation_quantizer(2, "minmax"), activation_quantizer(2, "mse")
    minmax.initialize(x)
    mse.initialize(x)
    assert float(mse.step.detach()) < 0.5 * float(minmax.step.detach())
    error_minmax = float(((minmax(x).detach() - x) ** 2).mean())
    assert float(((mse(x).detach() - x) ** 2).mean()) < 0.5 * error_minmax


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ewgs_at_delta_zero_is_ste_bit_for_bit(bits):
    assert_ewgs_at_zero_delta_is_ste("lsq_plus", bits, seed=bits)


def test_a_demo_sized_run_trains_lsq_plus_under_ewgs(tmp_path):
    trainer = assert_short_run_trains(RECIPE, tmp_path / "run", ["model.options={width: 8}"])
    activations = [
        q for q in trainer.quantizers().values() if isinstance(q, LsqPlusActivationQuantizer)
    ]
    # initialised from the data (the constructor's s = 1, β = 0 are not kept)
    assert all(float(q.step.detach()) != 1.0 for q in activations if q.enabled)
    assert any(float(q.offset.detach()) != 0.0 for q in activations if q.enabled)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 8), st.integers(0, 10_000), st.sampled_from([2, 3, 4]))
def test_per_channel_weights_start_at_the_lsq_plus_formula_of_each_channel(
    channels, inner, seed, bits
):
    w = torch.randn(channels, inner, generator=torch.Generator().manual_seed(seed))
    w = w * torch.arange(1, channels + 1).view(-1, 1)
    q = LsqPlusMethod(granularity="per_channel").weight_quantizer(bits)
    q.bind_weight(w.shape, 0)
    q.initialize(w)
    for c in range(channels):
        single = LsqPlusWeightQuantizer(bits)
        single.initialize(w[c : c + 1])
        assert float(q.step.detach()[c]) == pytest.approx(float(single.step.detach()), rel=1e-5)
    codes, imap = q.integer_codes(w), q.integer_map()
    assert imap.axis == 0 and imap.low <= int(codes.min()) <= int(codes.max()) <= imap.high


def test_a_bad_granularity_is_refused_by_name():
    with pytest.raises(ValueError, match="lsq_plus.*granularity"):
        LsqPlusMethod(granularity="per_row")
