"""Laws of the round site and the backward rules (the concepts page "The round site")."""

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given

from ewgs_plugins import ElementWiseGradientScaling, RoundSite, StraightThrough
from ewgs_plugins.backward import BackwardRule

DTYPES = {"float32": torch.float32, "float64": torch.float64}
BITS_AS_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


@st.composite
def round_cases(draw):
    """A latent in level units (some of it outside the clip range), its gradient,
    the number of steps, optional clip bounds and a dtype."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    steps = draw(st.integers(1, 255))
    signed = draw(st.booleans())
    clipped = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    low, high = (-(steps // 2), steps - steps // 2) if signed else (0, steps)
    span = high - low
    latent = (torch.rand(shape, generator=generator, dtype=dtype) * 1.4 - 0.2) * span + low
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    grad[torch.rand(shape, generator=generator) < 0.1] = 0.0
    bounds = (float(low), float(high)) if clipped else (None, None)
    return latent, grad, steps, bounds


def run_site(rule: BackwardRule, delta: float, latent, grad, steps, bounds):
    site = RoundSite(rule, delta)
    z = latent.clone().requires_grad_()
    out = site(z, steps, *bounds)
    out.backward(grad)
    return out.detach(), z.grad


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS_AS_INT[t.dtype])


@given(round_cases())
def test_ewgs_with_zero_delta_is_ste_bit_for_bit(case):
    latent, grad, steps, bounds = case
    _, g_ste = run_site(StraightThrough(), 0.0, latent, grad, steps, bounds)
    _, g_ewgs = run_site(ElementWiseGradientScaling(), 0.0, latent, grad, steps, bounds)
    assert torch.equal(bits(g_ste), bits(g_ewgs))


@given(round_cases(), st.floats(0.0, 10.0))
def test_forward_is_torch_round_of_the_clipped_latent_for_every_rule(case, delta):
    latent, grad, steps, (low, high) = case
    expected = torch.round(latent if low is None else torch.clamp(latent, low, high))
    for rule in (StraightThrough(), ElementWiseGradientScaling()):
        out, _ = run_site(rule, delta, latent, grad, steps, (low, high))
        assert torch.equal(bits(out), bits(expected))
        assert torch.equal(out, out.round())  # integers: the levels
        if low is not None:
            assert out.min() >= low and out.max() <= high


@given(round_cases(), st.floats(0.0, 10.0))
def test_ewgs_gradient_is_eq4(case, delta):
    latent, grad, steps, (low, high) = case
    _, g_n = run_site(ElementWiseGradientScaling(), delta, latent, grad, steps, (low, high))
    # Eq. 4 computed independently, in float64 numpy, error as a fraction of the range.
    # δ is held in a float32 buffer, so compare against the float32 value of δ.
    delta = float(torch.tensor(delta, dtype=torch.float32))
    z, g = latent.double().numpy(), grad.double().numpy()
    error = (z - z.round()) / steps

    expected = g * (1 + delta * np.sign(g) * error)
    if low is not None:
        expected = np.where((z >= low) & (z <= high), expected, 0.0)
    # Relative to |g|·(1 + δ): the factor may cancel to ~0, where float32 keeps only
    # an absolute precision of its rounding unit times the terms that cancelled.
    eps = 1e-6 if latent.dtype == torch.float32 else 1e-12
    bound = eps * np.abs(g) * (1 + delta)
    assert np.all(np.abs(g_n.double().numpy() - expected) <= bound)


@given(round_cases(), st.floats(0.0, 10.0))
def test_ewgs_scaling_factor_is_bounded_by_half_a_step(case, delta):
    latent, grad, steps, (low, high) = case
    _, g_n = run_site(ElementWiseGradientScaling(), delta, latent, grad, steps, (low, high))
    moving = grad != 0
    if low is not None:
        moving &= (latent >= low) & (latent <= high)
    ratio = g_n[moving].double() / grad[moving].double()
    slack = 1e-6 if latent.dtype == torch.float32 else 1e-12
    assert torch.all((ratio - 1).abs() <= delta / (2 * steps) + slack)


@given(round_cases())
def test_ste_passes_the_gradient_inside_the_clip_and_zero_outside(case):
    latent, grad, steps, (low, high) = case
    _, g_n = run_site(StraightThrough(), 0.0, latent, grad, steps, (low, high))
    if low is None:
        assert torch.equal(g_n, grad)
    else:
        inside = (latent >= low) & (latent <= high)
        assert torch.equal(g_n[inside], grad[inside])
        assert torch.all(g_n[~inside] == 0)


def test_ewgs_moves_gradient_in_the_papers_direction():
    # Fig. 2: with g > 0 the latent above its level (error > 0) gets a larger gradient.
    site = RoundSite(ElementWiseGradientScaling(), 1.0)
    z = torch.tensor([2.3, 1.7], requires_grad=True)
    site(z, 4).backward(torch.tensor([1.0, 1.0]))
    assert z.grad[0] > 1.0 > z.grad[1]


@pytest.mark.parametrize("value", [-1e-3, float("nan")])
def test_negative_or_nan_delta_is_refused(value):
    with pytest.raises(ValueError, match="δ must be >= 0"):
        RoundSite(ElementWiseGradientScaling(), value)
    site = RoundSite()
    with pytest.raises(ValueError, match="δ must be >= 0"):
        site.set_delta(value)


def test_bad_arguments_are_refused():
    site = RoundSite()
    with pytest.raises(ValueError, match="steps"):
        site(torch.zeros(2), 0)
    with pytest.raises(ValueError, match="both clip bounds"):
        site(torch.zeros(2), 3, 0.0, None)


def test_double_backward_flows_through_the_ewgs_backward():
    site = RoundSite(ElementWiseGradientScaling(), 0.5)
    w = torch.tensor([0.7, -1.3, 2.2], requires_grad=True)
    x = torch.tensor([1.1, 2.3, 0.4], requires_grad=True)
    q = site(x * 3, 7, -7.0, 7.0)
    loss = ((q * w) ** 2).sum()
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    (second,) = torch.autograd.grad(grad_x.sum(), w)
    assert second.abs().sum() > 0


def saved_bytes(rule: BackwardRule, clipped: bool) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.numel() > 1:
            total += tensor.numel() * tensor.element_size()
        return tensor

    site = RoundSite(rule, 0.1)
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        latent = x * 7  # a scalar multiply saves nothing full-size
        site(latent, 7, 0.0, 7.0) if clipped else site(latent, 7)
    return total


def test_ewgs_saves_no_more_than_ste_when_the_method_clips():
    # The fused clip needs the latent anyway; EWGS recomputes its error from it.
    assert saved_bytes(ElementWiseGradientScaling(), True) == saved_bytes(StraightThrough(), True)
    assert saved_bytes(ElementWiseGradientScaling(), True) == 64 * 32 * 4
    assert saved_bytes(StraightThrough(), False) == 0


def test_half_precision_latents_round_in_float32():
    site = RoundSite(ElementWiseGradientScaling(), 0.1)
    z = (torch.rand(10) * 7).to(torch.bfloat16).requires_grad_()
    out = site(z, 7, 0.0, 7.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert z.grad.dtype == torch.bfloat16


def test_delta_is_a_checkpointed_buffer():
    site = RoundSite(ElementWiseGradientScaling(), 0.25)
    restored = RoundSite(ElementWiseGradientScaling())
    restored.load_state_dict(site.state_dict())
    assert float(restored.delta) == 0.25


@given(round_cases(), st.floats(0.0, 10.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_output_affine_is_the_levels_times_out_scale_plus_out_shift(case, delta, ste, seed):
    # site(x, out_scale=s, out_shift=b) is site(x) · s + b in value and in every
    # gradient (the general path: the same ops autograd would run for the composition).
    latent, grad, steps, bounds = case
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(2, generator=generator, dtype=latent.dtype) * 2 - 0.5
    rule = StraightThrough() if ste else ElementWiseGradientScaling()
    results = []
    for fused_in_site in (True, False):
        site = RoundSite(rule, delta)
        z = latent.clone().requires_grad_()
        out_scale, out_shift = (v.clone().requires_grad_() for v in values)
        if fused_in_site:
            out = site(z, steps, *bounds, out_scale=out_scale, out_shift=out_shift)
        else:
            out = site(z, steps, *bounds) * out_scale + out_shift
        out.backward(grad)
        results.append([out.detach(), z.grad, out_scale.grad, out_shift.grad])
    for got, want in zip(*results):
        assert torch.equal(bits(got), bits(want))


def test_second_derivatives_flow_through_the_output_affine():
    def second(in_site: bool) -> list[torch.Tensor]:
        site = RoundSite(ElementWiseGradientScaling(), 0.5)
        w = torch.tensor([0.7, -1.3, 2.2], dtype=torch.float64, requires_grad=True)
        x = torch.tensor([1.1, 2.3, 0.4], dtype=torch.float64, requires_grad=True)
        s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        if in_site:
            q = site(x, 7, -7.0, 7.0, scale=3.0, out_scale=s, out_shift=-s)
        else:
            q = site(x, 7, -7.0, 7.0, scale=3.0) * s - s
        (grad_x,) = torch.autograd.grad(((q * w) ** 2).sum(), x, create_graph=True)
        return list(torch.autograd.grad(grad_x.sum(), [w, s]))

    in_site, composed = second(True), second(False)
    assert in_site[0].abs().sum() > 0
    for got, want in zip(in_site, composed):
        assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_a_learned_output_scale_saves_no_levels():
    # levels · s with a learned s would keep the levels for s's gradient; in the site
    # they are recomputed from x, which is all it keeps.
    def saved(in_site: bool) -> int:
        storages: dict[int, int] = {}  # distinct storages: ReLU and site share theirs

        def pack(tensor):
            if tensor.numel() > 1:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        site = RoundSite(ElementWiseGradientScaling(), 0.1)
        x = torch.randn(64, 32, requires_grad=True)
        s = torch.tensor(0.5, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            relu = torch.relu(x)  # keeps its output, the site's x
            if in_site:
                site(relu, 7, 0.0, 7.0, scale=2.0, out_scale=s)
            else:
                site(relu, 7, 0.0, 7.0, scale=2.0) * s
        return sum(storages.values())

    assert saved(True) == 64 * 32 * 4
    assert saved(False) == 2 * 64 * 32 * 4
