"""The fast forms of the round site and the method bodies compute the plain formulas.

The round site masks the clip's gradient with one fused op (``hardtanh_backward`` with
the bounds' float neighbours), EWGS is ``g + δ|g|e`` in one ``addcmul`` and skips its
work at δ = 0 (δ mirrored as a Python number), and the methods hand the site their
latent's affine form ``x · scale + shift`` (folded scalars) instead of the latent.
These laws compare each against the plain formula (the fused kernels against the
general path: ``test_fused_kernels.py``).
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from ewgs_plugins import ElementWiseGradientScaling, QuantConv2d, RoundSite, StraightThrough
from ewgs_plugins.methods.dorefa import DorefaActivationQuantizer, DorefaWeightQuantizer
from ewgs_plugins.methods.interval import IntervalQuantizer
from ewgs_plugins.methods.lsq import LsqQuantizer
from ewgs_plugins.methods.profit import ProfitQuantizer, inverse_softplus
from ewgs_plugins.registry import registry

DTYPES = [torch.float32, torch.float64]


@settings(max_examples=40)
@given(
    dtype=st.sampled_from(DTYPES),
    low=st.integers(-8, 0),
    width=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_clip_gradient_counts_the_bounds_and_nothing_beyond_them(dtype, low, width, seed):
    high = low + width
    inf = torch.tensor(float("inf"), dtype=dtype)
    lo, hi = torch.tensor(float(low), dtype=dtype), torch.tensor(float(high), dtype=dtype)
    # The bounds, their float neighbours on both sides, and random values around them.
    edges = torch.stack(
        [lo, hi, torch.nextafter(lo, -inf), torch.nextafter(lo, inf)]
        + [torch.nextafter(hi, -inf), torch.nextafter(hi, inf)]
    )
    generator = torch.Generator().manual_seed(seed)
    spread = (torch.rand(32, generator=generator, dtype=dtype) * 1.4 - 0.2) * width + low
    latent = torch.cat([edges, spread])
    grad = torch.randn(latent.shape, generator=generator, dtype=dtype)
    for rule in (StraightThrough(), ElementWiseGradientScaling()):
        z = latent.clone().requires_grad_()
        RoundSite(rule, 0.0)(z, width, float(low), float(high)).backward(grad)
        expected = torch.where((latent >= low) & (latent <= high), grad, torch.zeros_like(grad))
        assert torch.equal(z.grad, expected)


@given(delta=st.floats(1e-4, 10.0), seed=st.integers(0, 2**31 - 1))
def test_the_delta_a_checkpoint_loads_is_the_delta_the_backward_uses(delta, seed):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.rand(50, generator=generator) * 7
    grad = torch.randn(50, generator=generator)

    def gradient(site: RoundSite) -> torch.Tensor:
        z = latent.clone().requires_grad_()
        site(z, 7, 0.0, 7.0).backward(grad)
        return z.grad

    saved = RoundSite(ElementWiseGradientScaling(), delta)
    loaded = RoundSite(ElementWiseGradientScaling(), 0.0)
    assert torch.equal(gradient(loaded), grad)  # δ = 0: the gradient itself
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(gradient(loaded), gradient(saved))
    assert not torch.equal(gradient(loaded), grad)


def ste_round(z: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """round(clamp(z)) forward, clamp's gradient backward: the plain STE formula."""
    clipped = torch.clamp(z, low, high)
    return clipped + (torch.round(clipped) - clipped).detach()


def latents_away_from_ties(seed: int, low: int, high: int, shape=(64,)) -> torch.Tensor:
    """Latents at least 0.01 from a rounding tie and 0.01 from a bound (some outside the
    clip), so float-level differences between two forms never flip a level."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(low - 1, high + 1, shape, generator=generator).double()
    offset = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.48 + 0.01
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return base + sign * offset


def plain_form(quantizer, x: torch.Tensor) -> torch.Tensor:
    """Each method's formula as written in its module docstring."""
    b = quantizer.bits
    if isinstance(quantizer, IntervalQuantizer):
        steps = 2**b - 1
        z = (x - quantizer.lower) / (quantizer.upper - quantizer.lower) * steps
        x_q = ste_round(z, 0.0, float(steps)) / steps
        return 2 * x_q - 1 if quantizer.signed_output else x_q
    if isinstance(quantizer, DorefaActivationQuantizer):
        steps = 2**b - 1
        return ste_round(x * steps, 0.0, float(steps)) / steps
    if isinstance(quantizer, LsqQuantizer):
        q_n, q_p = quantizer.levels()
        s = quantizer.step
        if quantizer.binary:
            return (ste_round(x / s + 0.5, 0.0, 1.0) - 0.5) * s
        return ste_round(x / s, float(-q_n), float(q_p)) * s
    assert isinstance(quantizer, ProfitQuantizer)
    scaled = x / F.softplus(quantizer.a)
    c = F.softplus(quantizer.c)
    if not quantizer.is_signed:
        steps = 2**b - 1
        return ste_round(scaled * steps, 0.0, float(steps)) / steps * c
    if b == 1:
        return (2.0 * ste_round((scaled + 1.0) * 0.5, 0.0, 1.0) - 1.0) * c
    n = 2 ** (b - 1) - 1
    return ste_round(scaled * n, float(-n), float(n)) / n * c


def make(method: str, signed: bool, bits: int):
    """A quantizer with parameters set by hand and the input that gives ``latents``."""
    if method == "interval":
        q = IntervalQuantizer(bits, signed_output=signed)
        q.lower.data.fill_(-0.7 if signed else 0.1)
        q.upper.data.fill_(1.3)
        steps = 2**bits - 1
        return q, (0, steps), lambda z: q.lower + z * (q.upper - q.lower) / steps
    if method == "dorefa":
        q = DorefaActivationQuantizer(bits)
        steps = 2**bits - 1
        return q, (0, steps), lambda z: z / steps
    if method == "lsq":
        q = LsqQuantizer(bits, signed=signed, grad_scale=False)
        q.step.data.fill_(0.37)
        q_n, q_p = q.levels()
        if q.binary:
            return q, (0, 1), lambda z: (z - 0.5) * q.step
        return q, (-q_n, q_p), lambda z: z * q.step
    q = ProfitQuantizer(bits, signed=signed)
    q.a.data.fill_(inverse_softplus(1.7))
    q.c.data.fill_(inverse_softplus(0.6))
    if not signed:
        steps = 2**bits - 1
        return q, (0, steps), lambda z: z * 1.7 / steps
    if bits == 1:
        return q, (0, 1), lambda z: (2 * z - 1) * 1.7
    n = 2 ** (bits - 1) - 1
    return q, (-n, n), lambda z: z * 1.7 / n


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["interval", "dorefa", "lsq", "profit"]),
    signed=st.booleans(),
    bits=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_method_bodies_compute_their_plain_formulas(method, signed, bits, seed):
    # In float64, so that the two forms' sums agree to far below any formula difference.
    quantizer, (low, high), to_input = make(method, signed, bits)
    quantizer.double()
    with torch.no_grad():
        x0 = to_input(latents_away_from_ties(seed, low, high))
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    results = []
    for form in (quantizer, lambda x: plain_form(quantizer, x)):
        x = x0.clone().requires_grad_()
        out = form(x)
        params = [p for p in quantizer.parameters()]
        grads = torch.autograd.grad(out, [x, *params], g)
        results.append((out.detach(), grads))
    (out, grads), (expected, expected_grads) = results
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_output_scale_folded_into_the_weight_is_the_scaled_output():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=True)
    layer = QuantConv2d(conv, registry().create("method", "interval"), 4, 4)
    x = torch.rand(2, 3, 6, 6)
    layer.initialize_quantizers(x)
    layer.output_scale.data.fill_(-1.7)  # |α| is used
    out = layer(x)
    expected = layer._conv_forward(
        layer.input_quantizer(x), layer.weight_quantizer(layer.weight), None
    ) * 1.7 + layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_under_torch_compile_a_new_delta_needs_no_recompile_and_is_used():
    """δ reaches a compiled backward as the buffer, not as a Python number that dynamo
    would specialise (one recompile per δ, then eager after the recompile limit)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    site = RoundSite(ElementWiseGradientScaling(), 0.0)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (site(x * 7, 7, 0.0, 7.0) * torch.linspace(-1, 1, x.numel())).sum()

    compiled = torch.compile(loss, backend="eager")
    x = torch.rand(40, generator=torch.Generator().manual_seed(0))
    for delta in (0.0, 0.3, 1.0, 2.5, 0.0, 7.0):
        site.set_delta(delta)
        got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
        compiled(got).backward()
        loss(want).backward()
        assert torch.allclose(got.grad, want.grad, rtol=1e-6, atol=1e-7), delta
    assert counters["stats"]["unique_graphs"] == 1


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_dorefa_weight_body_computes_its_plain_formula(bits, seed):
    # The body hands the site t · steps / (2 max|t|) + steps / 2; the plain formula is
    # 2 q(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1 with q's round straight through.
    quantizer = DorefaWeightQuantizer(bits).double()
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(64, generator=generator, dtype=torch.float64)
    g = torch.randn(64, generator=generator, dtype=torch.float64)
    steps = 2**bits - 1

    def plain(w: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(w)
        z = (t / (2.0 * t.abs().max()) + 0.5) * steps
        return 2.0 * ((z + (torch.round(z) - z).detach()) / steps) - 1.0

    results = []
    for form in (quantizer, plain):
        w = w0.clone().requires_grad_()
        out = form(w)
        (grad,) = torch.autograd.grad(out, w, g)
        results.append((out.detach(), grad))
    (out, grad), (expected, expected_grad) = results
    # random float64 weights sit ~1e-16 from a rounding tie with probability ~1e-14
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_dorefa_weights_under_ewgs_save_what_ste_saves():
    """The site keeps tanh(w), which tanh keeps for its own gradient: EWGS's latent
    costs no memory (before, it kept the weight-sized latent STE did not need)."""

    def saved_storages(rule) -> set[int]:
        quantizer = DorefaWeightQuantizer(4)
        quantizer.round_site.set_rule(rule)
        quantizer.round_site.set_delta(0.01)
        w = torch.randn(16, 8, 3, 3, requires_grad=True)
        storages: set[int] = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.numel() > 1 and tensor.untyped_storage().data_ptr() != w.data_ptr():
                storages.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = quantizer(w)
        out.sum().backward()
        return {len(storages)}

    assert saved_storages(ElementWiseGradientScaling()) == saved_storages(StraightThrough())
    # tanh(w) (kept by tanh and by the site) and |tanh(w)| (kept by max)
    assert saved_storages(StraightThrough()) == {2}
