"""Laws of the built-in quantizer methods: level grids, the identity
at 32 bits, STE and EWGS forwards, the papers' initialisations, gradients, rounding only
at the round site, and training."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from ewgs_plugins import (
    ElementWiseGradientScaling,
    QuantConv2d,
    RoundSite,
    StraightThrough,
    quantize_model,
    registry,
)
from ewgs_plugins.methods.dorefa import DorefaActivationQuantizer, DorefaWeightQuantizer
from ewgs_plugins.methods.interval import IntervalQuantizer
from ewgs_plugins.methods.lsq import LsqQuantizer
from ewgs_plugins.methods.profit import ProfitQuantizer, inverse_softplus
from ewgs_plugins.models import digits_cnn

METHODS = ["interval", "dorefa", "lsq", "profit"]
KINDS = ["weight", "activation"]
BITS = [*range(1, 9), 32]


def scalar(t: torch.Tensor) -> float:
    return float(t.detach())


def make_quantizer(method: str, kind: str, bits: int, **options):
    made = registry().create("method", method, options)
    return made.weight_quantizer(bits) if kind == "weight" else made.activation_quantizer(bits)


def sample(seed: int, shape, *, scale: float = 1.0, shift: float = 0.0, relu: bool = False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale + shift
    return x.clamp_min(0.0) if relu else x


def grid(quantizer) -> torch.Tensor:
    """Every value the quantizer may output, from the method's formulas (not its code)."""
    b = quantizer.bits
    unit = torch.arange(2**b) / (2**b - 1)
    if isinstance(quantizer, IntervalQuantizer):
        return 2 * unit - 1 if quantizer.signed_output else unit
    if isinstance(quantizer, DorefaWeightQuantizer):
        return 2 * unit - 1
    if isinstance(quantizer, DorefaActivationQuantizer):
        return unit
    if isinstance(quantizer, LsqQuantizer):
        s = quantizer.step.detach()
        if bool(quantizer.signed) and b == 1:
            return torch.tensor([-0.5, 0.5]) * s
        if bool(quantizer.signed):
            return torch.arange(-(2 ** (b - 1)), 2 ** (b - 1)) * s
        return torch.arange(2**b) * s
    if isinstance(quantizer, ProfitQuantizer):
        c = F.softplus(quantizer.c.detach())
        if bool(quantizer.signed) and b == 1:
            return torch.tensor([-1.0, 1.0]) * c
        if bool(quantizer.signed):
            n = 2 ** (b - 1) - 1
            return torch.arange(-n, n + 1) / n * c
        return torch.arange(2**b) / (2**b - 1) * c
    raise AssertionError(f"no grid for {type(quantizer).__name__}")


def max_levels(method: str, kind: str, bits: int, signed: bool) -> int:
    if method == "profit" and signed and bits > 1:
        return 2**bits - 1
    return 2**bits


@st.composite
def first_and_later_batches(draw):
    """The batch a quantizer is initialised on and another batch it then quantizes
    (from a different distribution), some of them post-ReLU, some signed."""
    seeds = draw(st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=2))
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, 40)))
    first = sample(seeds[0], shape, scale=draw(st.floats(0.05, 5.0)), relu=draw(st.booleans()))
    later = sample(
        seeds[1],
        shape,
        scale=draw(st.floats(0.05, 10.0)),
        shift=draw(st.floats(-2.0, 2.0)),
        relu=draw(st.booleans()),
    )
    return first, later


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=8)
@given(batches=first_and_later_batches(), delta=st.floats(1e-3, 10.0))
def test_outputs_lie_on_the_grid_and_ste_ewgs_forwards_agree(method, kind, bits, batches, delta):
    first, later = batches
    quantizer = make_quantizer(method, kind, bits)
    quantizer.initialize(first)
    out_ste = quantizer(later).detach()
    quantizer.round_site.set_rule(ElementWiseGradientScaling())
    quantizer.round_site.set_delta(delta)
    out_ewgs = quantizer(later).detach()
    assert torch.equal(out_ste, out_ewgs)
    if bits == 32:
        assert torch.equal(out_ste, later)
        return
    levels = grid(quantizer)
    distance = (out_ste.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
    assert float(distance.max()) <= 1e-5 * max(1.0, float(levels.abs().max()))
    signed = bool(getattr(quantizer, "signed", kind == "weight"))
    assert out_ste.unique().numel() <= max_levels(method, kind, bits, signed)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_level_is_reached_on_a_wide_input(method, kind):
    """The grid is the method's whole grid: a wide ramp reaches every level."""
    for bits in (1, 2, 3, 4):
        quantizer = make_quantizer(method, kind, bits)
        ramp = torch.linspace(-1, 1, 4001) if kind == "weight" else torch.linspace(0, 1, 4001)
        quantizer.initialize(ramp)
        wide = ramp * 20 if method != "dorefa" else torch.atanh(ramp.clamp(-0.999, 0.999))
        expected = 2**bits - 1 if method == "profit" and kind == "weight" and bits > 1 else 2**bits
        assert quantizer(wide).unique().numel() == expected


# ------------------------------------------------------------------------------ init


def test_interval_init_is_the_paper_formulas():
    w = sample(0, (8, 4, 3, 3), scale=0.2, shift=0.05)
    q = make_quantizer("interval", "weight", 2)
    q.initialize(w)
    sigma = float(torch.std(w))
    assert scalar(q.lower) == pytest.approx(-3 * sigma, rel=1e-6)
    assert scalar(q.upper) == pytest.approx(3 * sigma, rel=1e-6)

    a = sample(1, (4, 8, 5, 5), relu=True)
    q = make_quantizer("interval", "activation", 2)
    q.initialize(a)
    assert scalar(q.lower) == 0.0
    assert scalar(q.upper) == pytest.approx(3 * float(a.std()) / math.sqrt(1 - 2 / math.pi))

    signed = sample(2, (4, 8, 5, 5))
    q = make_quantizer("interval", "activation", 2)
    q.initialize(signed)
    assert scalar(q.lower) == float(signed.min()) < 0
    assert scalar(q.upper) == pytest.approx(3 * float(signed.std()) / math.sqrt(1 - 2 / math.pi))


def test_output_scale_init_is_mean_abs_full_over_mean_abs_quantized():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    layer = QuantConv2d(conv, registry().create("method", "interval"), 2, 2)
    x = sample(3, (2, 4, 6, 6), relu=True)
    layer.initialize_quantizers(x)
    with torch.no_grad():
        full = F.conv2d(x, conv.weight, padding=1).abs().mean()
        quantized = F.conv2d(
            layer.input_quantizer(x), layer.weight_quantizer(conv.weight), padding=1
        ).abs()
        expected = float(full / quantized.mean())
    assert scalar(layer.output_scale) == pytest.approx(expected, rel=1e-6)
    assert scalar(layer.output_scale) != pytest.approx(1.0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_lsq_init_is_two_mean_abs_over_sqrt_qp(bits):
    w = sample(4, (6, 3, 3, 3), scale=0.1)
    q = make_quantizer("lsq", "weight", bits)
    q.initialize(w)
    q_p = 1 if bits == 1 else 2 ** (bits - 1) - 1  # 1 bit: the binary grid, Q_P = 1
    assert scalar(q.step) == pytest.approx(2 * float(w.abs().mean()) / math.sqrt(q_p), rel=1e-6)

    a = sample(5, (2, 3, 4, 4), relu=True)
    q = make_quantizer("lsq", "activation", bits)
    q.initialize(a)
    assert not bool(q.signed)
    assert scalar(q.step) == pytest.approx(2 * float(a.mean()) / math.sqrt(2**bits - 1), rel=1e-6)

    signed = sample(6, (2, 3, 4, 4))
    q = make_quantizer("lsq", "activation", bits)
    q.initialize(signed)
    assert bool(q.signed)
    expected = 2 * float(signed.abs().mean()) / math.sqrt(q_p)
    assert scalar(q.step) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_profit_init_is_point_nine_max_and_the_95th_percentile(bits):
    w = sample(7, (6, 3, 3, 3), scale=0.1)
    q = make_quantizer("profit", "weight", bits)
    q.initialize(w)
    expected = 0.9 * float(w.abs().max())
    assert scalar(F.softplus(q.a)) == pytest.approx(expected, rel=1e-5)
    assert scalar(F.softplus(q.c)) == pytest.approx(expected, rel=1e-5)

    a = sample(8, (3, 5, 7, 7), relu=True)
    q = make_quantizer("profit", "activation", bits)
    q.initialize(a)
    expected = float(np.percentile(a[a > 0].numpy(), 95))
    assert not bool(q.signed)
    assert scalar(F.softplus(q.a)) == pytest.approx(expected, rel=1e-5)
    assert scalar(F.softplus(q.c)) == pytest.approx(expected, rel=1e-5)

    signed = sample(9, (3, 5, 7, 7))
    q = make_quantizer("profit", "activation", bits)
    q.initialize(signed)
    assert bool(q.signed)
    expected = float(np.percentile(signed.abs().numpy(), 95))
    assert scalar(F.softplus(q.a)) == pytest.approx(expected, rel=1e-5)


def test_inverse_softplus_inverts_softplus():
    for value in (1e-4, 0.3, 1.0, 7.0, 40.0):
        assert float(F.softplus(torch.tensor(inverse_softplus(value)))) == pytest.approx(value)


def test_signedness_decided_on_the_first_batch_survives_a_checkpoint():
    for method in ("lsq", "profit"):
        q = make_quantizer(method, "activation", 3)
        q.initialize(sample(10, (2, 8)))
        fresh = make_quantizer(method, "activation", 3)
        fresh.load_state_dict(q.state_dict())
        x = sample(11, (2, 8))
        assert bool(fresh.signed) and torch.equal(fresh(x), q(x))
        assert (fresh(x) < 0).any()


# ------------------------------------------------------------------------- gradients


def quantized_conv(method: str, bits: int, inputs: torch.Tensor, **options) -> QuantConv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(inputs.shape[1], 6, 3, padding=1, bias=True)
    layer = QuantConv2d(conv, registry().create("method", method, options), bits, bits)
    layer.initialize_quantizers(inputs)
    return layer


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_learnable_quantizer_parameter(method, relu, bits):
    x = sample(12, (4, 3, 6, 6), relu=relu)
    layer = quantized_conv(method, bits, x)
    for site in (layer.weight_quantizer.round_site, layer.input_quantizer.round_site):
        site.set_rule(ElementWiseGradientScaling())
        site.set_delta(0.01)
    out = layer(x)
    (out * sample(13, out.shape)).sum().backward()
    learned = dict(layer.named_parameters())
    assert learned, "the layer has parameters"
    for name, parameter in learned.items():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    if method == "dorefa":
        assert set(learned) == {"weight", "bias"}


def interval_bound_grads(x: torch.Tensor, g: torch.Tensor, lower: float, upper: float, kind):
    q = make_quantizer("interval", kind, 2)
    with torch.no_grad():
        q.lower.fill_(lower)
        q.upper.fill_(upper)
    (q(x) * g).sum().backward()
    return q.lower.grad.clone(), q.upper.grad.clone()


@pytest.mark.parametrize("kind", KINDS)
def test_interval_bounds_get_no_gradient_from_clipped_elements(kind):
    lower, upper = -0.5, 1.5
    x = sample(14, (200,))
    x[::7] = 3.0  # above the interval
    x[1::7] = -2.0  # below it
    g = sample(15, (200,))
    inside = (x > lower) & (x < upper)
    assert 0 < int(inside.sum()) < 200
    full = interval_bound_grads(x, g, lower, upper, kind)
    only_inside = interval_bound_grads(x[inside], g[inside], lower, upper, kind)
    only_outside = interval_bound_grads(x[~inside], g[~inside], lower, upper, kind)
    for a, b in zip(full, only_inside):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(float(t) == 0.0 for t in only_outside)
    assert all(float(t) != 0.0 for t in full)


def test_profit_clip_gets_no_gradient_from_clipped_elements():
    x = sample(16, (100,))
    q = make_quantizer("profit", "weight", 3)
    q.initialize(x)
    big = torch.full((5,), 50.0)
    q(big).sum().backward()
    assert float(q.a.grad) == 0.0 and float(q.c.grad) != 0.0


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_weight_gradient_flows_through_the_max(bits):
    """Official DoReFa: no stop-gradient on max|tanh(w)|. Under STE the gradient is that
    of ``2 w_n - 1 = tanh(w) / max|tanh(w)|``, written out here."""
    w = sample(24, (6, 5), scale=0.7)
    g = sample(25, w.shape)
    leaf = w.clone().requires_grad_()
    (make_quantizer("dorefa", "weight", bits)(leaf) * g).sum().backward()
    reference = w.clone().requires_grad_()
    t = torch.tanh(reference)
    (t / t.abs().max() * g).sum().backward()
    assert torch.allclose(leaf.grad, reference.grad, rtol=1e-5, atol=1e-7)
    detached = w.clone().requires_grad_()
    t = torch.tanh(detached)
    (t / t.abs().max().detach() * g).sum().backward()
    assert not torch.allclose(leaf.grad, detached.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_scale", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_lsq_step_gradient_is_the_paper_formula_times_the_scale(kind, bits, grad_scale):
    x = sample(17, (3, 4, 5, 5), relu=kind == "activation") * 2
    q = make_quantizer("lsq", kind, bits, grad_scale=grad_scale)
    q.initialize(x)
    g = sample(18, x.shape)
    (q(x) * g).sum().backward()
    s = scalar(q.step)
    if kind == "weight" and bits == 1:  # binary grid {-s/2, s/2}: z = x/s + 1/2 in [0, 1]
        z = x.double() / s + 0.5
        q_p, n = 1, x.numel()
        level = torch.round(z.clamp(0, 1))
        d_out = torch.where((z >= 0) & (z <= 1), level - z, level - 0.5)
    else:
        signed = kind == "weight"
        q_n = 2 ** (bits - 1) if signed else 0
        q_p = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        n = x.numel() if kind == "weight" else x[0].numel()  # activations: one sample
        z = x.double() / s
        inside = (z >= -q_n) & (z <= q_p)
        # LSQ Eq. 3: d v̂ / d s = round(v/s) - v/s inside, -Q_N or Q_P when clipped
        d_out = torch.where(inside, torch.round(z) - z, z.clamp(-q_n, q_p))
    expected = float((g.double() * d_out).sum())
    if grad_scale:
        expected /= math.sqrt(n * q_p)
    assert float(q.step.grad) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_lsq_gradient_scale_leaves_the_forward_unchanged():
    x = sample(19, (2, 3, 4, 4), relu=True)
    scaled, plain = (make_quantizer("lsq", "activation", 3, grad_scale=v) for v in (True, False))
    scaled.initialize(x)
    plain.initialize(x)
    assert torch.equal(scaled(x), plain(x))


# ---------------------------------------------------------------- only the round site


def expected_site_call(method: str, kind: str, bits: int) -> tuple:
    """``(steps, low, high)`` each method hands its site (unsigned inputs for
    activations): the range in level units, and the clip fused into the site."""
    full = 2**bits - 1
    if method == "dorefa" and kind == "weight":
        return full, None, None  # w_n is on [0, 1] by construction: nothing to clip
    if kind == "activation" or method in ("interval", "dorefa"):
        return full, 0.0, float(full)
    if bits == 1:  # LSQ and PROFIT signed 1-bit: the binary grid on [0, 1]
        return 1, 0.0, 1.0
    if method == "lsq":
        return full, float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    n = 2 ** (bits - 1) - 1  # PROFIT weights: ±n levels, steps 2^b - 2
    return 2 * n, float(-n), float(n)


def recording_identity_site(calls: list[tuple]):
    """A replacement for ``RoundSite.forward`` that records its calls (site, steps, clip
    bounds) and does NOT round (it only clips): if a method rounded anywhere else, its
    output would still be discrete."""

    def forward(
        site,
        x,
        steps,
        low=None,
        high=None,
        *,
        scale=None,
        shift=None,
        out_scale=None,
        out_shift=None,
    ):
        calls.append((id(site), steps, low, high))
        latent = x if scale is None else x * scale
        latent = latent if shift is None else latent + shift
        clipped = latent if low is None else torch.clamp(latent, low, high)
        values = clipped if out_scale is None else clipped * out_scale
        return values if out_shift is None else values + out_shift

    return forward


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_the_round_site_is_the_only_rounding(method, kind, bits, monkeypatch):
    x = sample(20, (64, 64), scale=0.5, relu=kind == "activation")
    quantizer = make_quantizer(method, kind, bits)
    quantizer.initialize(x)
    rounded = quantizer(x)
    assert rounded.unique().numel() <= 2**bits

    calls: list[tuple] = []
    monkeypatch.setattr(RoundSite, "forward", recording_identity_site(calls))
    continuous = quantizer(x)
    assert calls == [(id(quantizer.round_site), *expected_site_call(method, kind, bits))]
    # Without the site's rounding the output is not discrete at all ...
    assert continuous.unique().numel() > 2 * 2**bits
    # ... and rounding happened only at the site.
    monkeypatch.undo()
    assert torch.equal(quantizer(x), rounded)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_ste_input_gradient_is_that_of_the_formula_without_rounding(
    method, kind, bits, monkeypatch
):
    """Under STE the input's gradient is the gradient of the method's formula with the
    round left out (the clip kept): DoReFa's flows through max|tanh(w)|, LSQ's through
    v/s, the others' through their clips."""
    x = sample(22, (4, 32))
    if kind == "activation":  # no element exactly on a clip bound (torch.clamp's gradient
        x = x.abs() + 1e-3  # there is 0, the site's is 1; neither is the point here)
    quantizer = make_quantizer(method, kind, bits)
    quantizer.initialize(x)
    g = sample(23, x.shape)

    def input_grad():
        leaf = x.clone().requires_grad_()
        (quantizer(leaf) * g).sum().backward()
        return leaf.grad

    rounded = input_grad()
    monkeypatch.setattr(RoundSite, "forward", recording_identity_site([]))
    assert torch.allclose(rounded, input_grad(), rtol=1e-5, atol=1e-7)
    assert rounded.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_no_rounding_function_is_called_outside_a_round_site(method, monkeypatch):
    """Spies on every rounding-like torch function: during the forward and the
    initialisation of a whole quantized model, each call comes from inside a site."""
    outside: list[str] = []
    depth = [0]
    site_forward = RoundSite.forward

    def in_site(self, *args, **kwargs):
        depth[0] += 1
        try:
            return site_forward(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    def spy(name, original):
        def call(*args, **kwargs):
            if depth[0] == 0:
                outside.append(name)
            return original(*args, **kwargs)

        return call

    model = digits_cnn(10, width=4)
    quantized = quantize_model(
        model, method, weight_bits=2, activation_bits=2, quantize_first_last=True
    )
    for name in ("round", "floor", "ceil", "trunc", "fix", "sign", "signbit"):
        monkeypatch.setattr(torch, name, spy(f"torch.{name}", getattr(torch, name)))
        monkeypatch.setattr(torch.Tensor, name, spy(f"Tensor.{name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(RoundSite, "forward", in_site)
    x = sample(21, (8, 1, 8, 8))
    quantized(x)  # initialises, then quantizes
    quantized(x)
    assert outside == []
    # the spy does see calls: one made outside a site is caught
    torch.round(x)
    assert outside == ["torch.round"]


# -------------------------------------------------------------------------- training


def digits_batch(count: int = 64):
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images[:count], dtype=torch.float32).unsqueeze(1) / 16.0
    return (images - 0.3) / 0.4, torch.tensor(data.target[:count])


@pytest.mark.parametrize("bits", [2, 1])
@pytest.mark.parametrize("rule", ["ste", "ewgs"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_both_rules(method, rule, bits):
    torch.manual_seed(0)
    inputs, targets = digits_batch()
    model = quantize_model(
        digits_cnn(10, width=8), method, weight_bits=bits, activation_bits=bits, backward=rule
    )
    for site in (m for m in model.modules() if isinstance(m, RoundSite)):
        site.set_delta(0.01 if rule == "ewgs" else 0.0)
        expected = ElementWiseGradientScaling if rule == "ewgs" else StraightThrough
        assert isinstance(site.rule, expected)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.7 * losses[0], losses
