"""PACT as a plugin: registered through its entry point, the paper's forward and
gradients (Choi et al. 2018, Eq. 1-3) on constructed cases, EWGS at δ = 0 is STE bit for
bit, and a demo-sized training run through the recipe shipped beside it."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from ewgs_pact import PAPER_ALPHA_INIT, PactActivationQuantizer, PactMethod
from hypothesis import given, settings

from ewgs_plugins import ConfigError, registry
from ewgs_plugins.backward import ElementWiseGradientScaling
from ewgs_plugins.methods.dorefa import DorefaWeightQuantizer
from ewgs_plugins.testing import assert_ewgs_at_zero_delta_is_ste, assert_short_run_trains

RECIPE = Path(__file__).resolve().parents[1] / "digits.yaml"


@st.composite
def cases(draw):
    """Inputs on both sides of 0 and α, a clip α, a bit-width and an incoming gradient."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    alpha = draw(st.floats(0.05, 20.0))
    x = torch.randn(draw(st.integers(1, 64)), generator=generator) * alpha
    grad = torch.randn(x.shape, generator=generator)
    return x, alpha, draw(st.integers(1, 8)), grad


def pact_quantizer(bits: int, alpha: float) -> PactActivationQuantizer:
    return PactActivationQuantizer(bits, alpha_init=alpha)


def test_the_entry_point_registers_pact_from_its_own_distribution():
    entry = registry().get("method", "pact")
    assert entry.factory is PactMethod
    assert entry.distribution == "ewgs-pact"


def test_paper_defaults_alpha_ten_and_dorefa_weights():
    method = registry().create("method", "pact")
    assert isinstance(method.weight_quantizer(2), DorefaWeightQuantizer)
    assert float(method.activation_quantizer(2).alpha.detach()) == PAPER_ALPHA_INIT == 10.0
    with pytest.raises(ConfigError, match=r"method\.options: .*alpha_init must be > 0"):
        registry().create("method", "pact", {"alpha_init": 0.0}, key_path="method")


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_forward_is_the_clipped_uniform_quantization_of_the_paper(case):
    x, alpha, bits, _ = case
    n = 2**bits - 1
    out = pact_quantizer(bits, alpha)(x).detach()
    # y = ½(|x| − |x − α| + α) = clip(x, 0, α); y_q = round(y · n/α) · α/n  (Eq. 1-2)
    y = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
    expected = torch.round(y * n / alpha) * alpha / n
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6 * alpha)
    levels = torch.arange(n + 1) * (alpha / n)
    distance = (out.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
    assert distance.max() <= 1e-6 * alpha
    assert torch.equal(out[x >= alpha], torch.full_like(out[x >= alpha], float(alpha)))


@settings(max_examples=60, deadline=None)
@given(case=cases(), delta=st.floats(0.0, 2.0))
def test_gradients_are_the_papers_under_ste_and_ewgs_scales_only_the_input(case, delta):
    x, alpha, bits, grad = case
    n = 2**bits - 1
    quantizer = pact_quantizer(bits, alpha)
    x = x.clone().requires_grad_()
    quantizer(x).backward(grad)
    inside = (x.detach() >= 0) & (x.detach() <= alpha)
    # Eq. 3: ∂y_q/∂α = 1 where x ≥ α; ∂y_q/∂x = 1 on [0, α] (round as identity)
    expected_alpha = grad[x.detach() >= alpha].sum()
    assert torch.allclose(quantizer.alpha.grad, expected_alpha, atol=1e-5)
    # (the chain rule multiplies by n/α and α/n: equal up to float rounding)
    assert torch.allclose(x.grad, torch.where(inside, grad, torch.zeros_like(grad)), atol=1e-6)

    quantizer.alpha.grad = None
    quantizer.round_site.set_rule(ElementWiseGradientScaling())
    quantizer.round_site.set_delta(delta)
    x.grad = None
    quantizer(x).backward(grad)
    z = x.detach() * (n / alpha)
    error = (z - torch.round(z)) / n  # x_n − x_q as a fraction of the range
    scaled = grad * (1 + delta * torch.sign(grad) * error)
    assert torch.allclose(x.grad, torch.where(inside, scaled, torch.zeros_like(grad)), atol=1e-5)
    assert torch.allclose(quantizer.alpha.grad, expected_alpha, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ewgs_at_delta_zero_is_ste_bit_for_bit(bits):
    # α = 1: small enough for some inputs to be clipped, so α's gradient is compared too
    assert_ewgs_at_zero_delta_is_ste(PactMethod(alpha_init=1.0), bits, seed=bits)


def test_a_demo_sized_run_trains_pact_under_ewgs(tmp_path):
    trainer = assert_short_run_trains(RECIPE, tmp_path / "run", ["model.options={width: 8}"])
    alphas = [q.alpha for q in trainer.quantizers().values() if hasattr(q, "alpha")]
    assert any(float(a.detach()) != trainer.method.alpha_init for a in alphas)  # α learned
    # The α's are the only quantizer parameters: the quantizer optimizer's weight decay
    # is PACT's L2 regularisation of α.
    optimizer = trainer.optimizers["quantizer"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == set(map(id, alphas))
    assert all(g["weight_decay"] > 0 for g in optimizer.param_groups)


def test_per_channel_weights_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="'pact' has no per-channel weights: weights are DoReFa"):
        PactMethod(granularity="per_channel")
    assert PactMethod(granularity="per_tensor").alpha_init == 10.0
