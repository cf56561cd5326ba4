"""The round site's fused kernels compute what its general path computes.

The general path (plain torch ops: the rule's own ``latent_gradient``, the clip's
``hardtanh_backward``, autograd's sums) is the reference; the laws of that path are in
``test_core_round_site.py``. Here every kernel (forward clipped/free, STE and EWGS
backward clipped/free) runs on random shapes, δ, scales and shifts (of the latent and of
the output, ``levels · out_scale + out_shift``) and is compared:

- bit for bit: the output (the same ops), STE's gradient of ``x`` (the same ops), and
  EWGS at δ = 0 against STE (the site sends it to STE's kernel);
- EWGS's gradient of ``x`` within one rounding of its term: the general path's
  ``addcmul`` fuses its multiply-add (one rounding), the compiled kernel may round the
  product first, so ``|Δ| <= 2 eps (|g| + |factor·g·e|) |scale|`` (``g`` the levels'
  gradient, the output's times ``out_scale``);
- the gradients of ``scale``, ``shift``, ``out_scale`` and ``out_shift`` (sums over the
  tensor, summed in another
  order) within ``8 sqrt(n) eps`` of the sum of the terms' magnitudes: far below what a
  lost EWGS factor (δ/(2 steps) of the terms, >= 1e-4 here) or a wrong mask would move.

On the CPU always; on CUDA too where there is one.
"""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from ewgs_plugins import (
    ElementWiseGradientScaling,
    RoundSite,
    StraightThrough,
    fused,
    quantize_model,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


class fused_everywhere:
    """The fused kernels on (or off) for tensors of any size, restored afterwards."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = fused.MIN_NUMEL, fused.enabled()
        fused.MIN_NUMEL = 2  # sizes 0 and 1 would be compiled specially: never drawn here
        fused.set_enabled(self.on)

    def __exit__(self, *exc: object) -> None:
        fused.MIN_NUMEL = self.saved[0]
        fused.set_enabled(self.saved[1])


@st.composite
def site_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    steps = draw(st.integers(1, 255))
    clipped = draw(st.booleans())
    scale = draw(st.sampled_from(["none", "number", "tensor"]))
    shift = draw(st.sampled_from(["none", "number", "tensor"]))
    out_scale = draw(st.sampled_from(["none", "number", "tensor"]))
    out_shift = draw(st.sampled_from(["none", "number", "tensor"]))
    rule = draw(st.sampled_from(["ste", "ewgs"]))
    delta = draw(st.sampled_from([0.0, 1e-3, 0.5, 7.0])) if rule == "ewgs" else 0.0
    size = draw(st.integers(2, 700))
    seed = draw(st.integers(0, 2**31 - 1))
    affine = (scale, shift, out_scale, out_shift)
    return dtype, steps, clipped, affine, rule, delta, size, seed


def run(case, device: str, on: bool):
    """Output and gradients of x, scale, shift, out_scale and out_shift through one site."""
    dtype, steps, clipped, affine_kinds, rule, delta, size, seed = case
    scale_kind, shift_kind, out_scale_kind, out_shift_kind = affine_kinds
    generator = torch.Generator().manual_seed(seed)
    scale_value = 0.3 + 3 * float(torch.rand((), generator=generator, dtype=torch.float64))
    shift_value = float(torch.randn((), generator=generator, dtype=torch.float64))
    out_scale_value = 0.1 + 2 * float(torch.rand((), generator=generator, dtype=torch.float64))
    out_shift_value = float(torch.randn((), generator=generator, dtype=torch.float64))
    scale_used = 1.0 if scale_kind == "none" else scale_value
    shift_used = 0.0 if shift_kind == "none" else shift_value
    # x such that the latent spans the range and a fifth beyond each side
    latent = (torch.rand(size, generator=generator, dtype=dtype) * 1.4 - 0.2) * steps
    x = ((latent - shift_used) / scale_used).to(device).requires_grad_()
    grad = torch.randn(size, generator=generator, dtype=dtype).to(device)
    grad[torch.rand(size, generator=generator) < 0.1] = 0.0

    def make(kind: str, value: float):
        if kind == "none":
            return None
        if kind == "number":
            return value
        return torch.tensor(value, dtype=dtype, device=device, requires_grad=True)

    scale, shift = make(scale_kind, scale_value), make(shift_kind, shift_value)
    out_scale = make(out_scale_kind, out_scale_value)
    out_shift = make(out_shift_kind, out_shift_value)
    out_scale_used = 1.0 if out_scale_kind == "none" else out_scale_value
    backward = StraightThrough() if rule == "ste" else ElementWiseGradientScaling()
    site = RoundSite(backward, delta).to(device)
    bounds = (0.0, float(steps)) if clipped else ()
    with fused_everywhere(on):
        values = site(
            x, steps, *bounds, scale=scale, shift=shift, out_scale=out_scale, out_shift=out_shift
        )
        values.backward(grad)
    inputs = (x, scale, shift, out_scale, out_shift)
    grads = [t.grad if isinstance(t, torch.Tensor) else None for t in inputs]
    levels = site(x.detach(), steps, *bounds, scale=scale, shift=shift).detach()
    used = (scale_used, out_scale_used)
    return values.detach(), grads, grad, x.detach(), levels, used, -delta / steps


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(case=site_cases())
def test_fused_kernels_compute_the_general_paths_values(device, case):
    dtype, steps, clipped, affine_kinds, rule, delta, size, seed = case
    values, grads, grad, x, levels, (scale, out_scale), factor = run(case, device, True)
    expected_values, wants, *_ = run(case, device, False)
    assert torch.equal(values, expected_values)
    eps = torch.finfo(dtype).eps
    if rule == "ste" or delta == 0.0:
        assert torch.equal(grads[0], wants[0])
    else:
        bound = 2 * eps * grad.abs() * abs(out_scale) * (1 + abs(factor)) * scale
        assert ((grads[0] - wants[0]).abs() <= bound).all()
    grad_latent = wants[0].abs() / scale  # |the latent's gradient|, elementwise
    tolerance = 8 * math.sqrt(size) * eps
    terms = (grad_latent * x.abs(), grad_latent, (grad * levels).abs(), grad.abs())
    for got, want, term in zip(grads[1:], wants[1:], terms):
        if want is None:
            assert got is None
            continue
        assert abs(float(got - want)) <= tolerance * float(term.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_ewgs_at_zero_delta_is_ste_bit_for_bit(device, dtype):
    generator = torch.Generator().manual_seed(3)
    x0 = (torch.rand(1000, generator=generator, dtype=dtype) * 9 - 1).to(device)
    grad = torch.randn(1000, generator=generator, dtype=dtype).to(device)
    results = []
    for rule in (StraightThrough(), ElementWiseGradientScaling()):
        x = x0.clone().requires_grad_()
        scale = torch.tensor(1.3, dtype=dtype, device=device, requires_grad=True)
        with fused_everywhere():
            RoundSite(rule, 0.0).to(device)(x, 7, 0.0, 7.0, scale=scale).backward(grad)
        results.append((x.grad, scale.grad))
    (ste_x, ste_scale), (ewgs_x, ewgs_scale) = results
    assert torch.equal(ste_x.view(-1).view(torch.uint8), ewgs_x.view(-1).view(torch.uint8))
    assert torch.equal(ste_scale, ewgs_scale)


@pytest.mark.parametrize(
    "wanted",
    [
        (True, False, False, False, False),  # DoReFa's activations: constant affines
        (False, True, False, True, False),  # a first layer's input (x needs no gradient)
        (True, True, True, False, False),  # the interval quantizer: scale and shift learned
    ],
)
def test_a_kernel_computes_only_the_gradients_asked_for(wanted):
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(900, generator=generator) * 9 - 1
    grad = torch.randn(900, generator=generator)
    affine = {"scale": 1.3, "shift": -0.2, "out_scale": 0.4, "out_shift": 0.1}

    def gradients(on: bool) -> list[torch.Tensor | None]:
        x = x0.clone().requires_grad_(wanted[0])
        tensors = {
            k: torch.tensor(v, requires_grad=need)
            for (k, v), need in zip(affine.items(), wanted[1:])
        }
        with fused_everywhere(on):
            RoundSite(ElementWiseGradientScaling(), 0.3)(x, 7, 0.0, 7.0, **tensors).backward(grad)
        return [t.grad for t in (x, *tensors.values())]

    fused._kernels.pop(("ewgs_clipped", wanted), None)
    got, want = gradients(True), gradients(False)
    assert ("ewgs_clipped", wanted) in fused._kernels  # the kernel of exactly these outputs
    for g, w, need in zip(got, want, wanted):
        assert (g is None) == (w is None) == (not need)
        if need:
            torch.testing.assert_close(g, w)


def test_every_kernel_compiles_once_whatever_the_shapes_flags_and_values():
    # Each kernel is compiled for dynamic shapes: no size, no requires_grad flag, no view
    # base and no two equal constants (a bound and a scale both 15, say) may make it
    # compile again, or a run would pay the compile again and, past dynamo's 8 graphs per
    # kernel, fall back to the plain ops.
    torch._dynamo.reset()
    fused._kernels.clear()
    recompile_is_an_error = torch._dynamo.config.patch(error_on_recompile=True)
    with fused_everywhere(), recompile_is_an_error, warnings.catch_warnings():
        warnings.simplefilter("error")  # not the fallback to plain ops either
        for method in ("interval", "dorefa", "lsq", "profit"):
            model = nn.Sequential(
                nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)
            )
            quantize_model(
                model,
                method,
                weight_bits=3,
                activation_bits=3,
                backward="ewgs",
                delta=1e-2,
                quantize_first_last=True,
                inplace=True,
            )
            for shape in [(8, 3, 8, 8), (3, 3, 8, 8), (5, 3, 11, 9)]:
                model(torch.randn(shape)).square().sum().backward()
    assert len(fused._kernels) >= 4  # the forward and backward kernels ran


def test_second_derivatives_take_the_differentiable_path():
    # create_graph: the site's backward runs in plain ops (the kernel is not
    # differentiable), so the Hessian δ estimate gets the same numbers either way.
    def second(on: bool) -> torch.Tensor:
        site = RoundSite(ElementWiseGradientScaling(), 0.5)
        w = torch.linspace(-2.0, 2.0, 300, dtype=torch.float64, requires_grad=True)
        x = torch.linspace(-1.0, 3.0, 300, dtype=torch.float64, requires_grad=True)
        scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        with fused_everywhere(on):
            q = site(x, 7, -7.0, 7.0, scale=scale)
            (grad_x,) = torch.autograd.grad(((q * w) ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.sum(), [w, scale])

    fused_w, fused_scale = second(True)
    plain_w, plain_scale = second(False)
    assert fused_w.abs().sum() > 0
    assert torch.equal(fused_w, plain_w) and torch.equal(fused_scale, plain_scale)


def test_a_kernel_that_cannot_compile_runs_its_plain_ops_after_one_warning(monkeypatch):
    def broken(*args: object) -> object:
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(fused, "_compile", lambda formula: broken)
    monkeypatch.setattr(fused, "_kernels", {})
    monkeypatch.setattr(fused, "_failed", set())
    x0 = torch.linspace(-1.0, 8.0, 500)
    grad = torch.linspace(1.0, -1.0, 500)

    def gradient(on: bool) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        with fused_everywhere(on):
            RoundSite(ElementWiseGradientScaling(), 0.2)(x, 7, 0.0, 7.0, scale=1.5).backward(grad)
        return x.grad

    with pytest.warns(RuntimeWarning, match="could not be compiled on cpu .*no C\\+\\+ compiler"):
        got = gradient(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel and device
        assert torch.equal(gradient(True), got)
    # the formula eager (no fused multiply-add) against addcmul's: one rounding apart
    assert torch.allclose(got, gradient(False), rtol=1e-6, atol=1e-7)
