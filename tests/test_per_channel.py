"""Per-channel weight quantization (``granularity: per_channel``): LSQ against a
reimplementation of lsq-net's per-channel ``LsqQuan`` (zhutmost/lsq-net,
quan/quantizer/lsq.py), the laws of the per-channel step, the methods that refuse it,
and the integer map's axis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ewgs_plugins.backward import ElementWiseGradientScaling, StraightThrough
from ewgs_plugins.errors import ConfigError
from ewgs_plugins.methods.lsq import LsqMethod, LsqQuantizer
from ewgs_plugins.quant import initialize_quantizers, quantize_model, quantized_layers
from ewgs_plugins.recipe import expand_runs

# ------------------------------------------------- lsq-net's per-channel LsqQuan, as it is


def _lsqnet_grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    y_grad = x * scale
    return (x - y_grad).detach() + y_grad


def _lsqnet_round_pass(x: torch.Tensor) -> torch.Tensor:
    y_grad = x
    return (x.round() - y_grad).detach() + y_grad


class LsqNetPerChannel(nn.Module):
    """lsq-net's ``LsqQuan(bit, all_positive=False, symmetric=False, per_channel=True)``:
    ``init_from`` sets ``s`` per output channel (axis 0) to ``2 mean|x_c| / sqrt(thd_pos)``;
    ``forward`` scales the gradient of ``s`` by ``1 / sqrt(thd_pos · x.numel())``, divides,
    clamps to ``[−2^(b−1), 2^(b−1) − 1]``, rounds (straight through) and multiplies."""

    def __init__(self, bit: int) -> None:
        super().__init__()
        self.thd_neg = -(2 ** (bit - 1))
        self.thd_pos = 2 ** (bit - 1) - 1
        self.s = nn.Parameter(torch.ones(1))

    def init_from(self, x: torch.Tensor) -> None:
        self.s = nn.Parameter(
            x.detach().abs().mean(dim=list(range(1, x.dim())), keepdim=True)
            * 2
            / (self.thd_pos**0.5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_grad_scale = 1.0 / ((self.thd_pos * x.numel()) ** 0.5)
        s_scale = _lsqnet_grad_scale(self.s, s_grad_scale)
        x = x / s_scale
        x = torch.clamp(x, self.thd_neg, self.thd_pos)
        x = _lsqnet_round_pass(x)
        return x * s_scale


def per_channel_lsq(bits: int, shape: torch.Size, axis: int = 0) -> LsqQuantizer:
    quantizer = LsqMethod(granularity="per_channel").weight_quantizer(bits)
    assert isinstance(quantizer, LsqQuantizer)
    quantizer.bind_weight(shape, axis)
    return quantizer


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7), (4, 2, 5)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_per_channel_is_lsq_nets_in_output_and_every_gradient(bits, shape) -> None:
    """Initialised on float32 weights (as a layer's are), then compared in float64 (the
    two compute v/s as v·(1/s) and v/s), so to float precision. torch.clamp's gradient
    is 0 at its bounds and the round site's is 1 there: no latent sits on a bound."""
    generator = torch.Generator().manual_seed(bits * 100 + len(shape))
    spread = torch.linspace(0.2, 3.0, shape[0]).view(-1, *[1] * (len(shape) - 1))
    w32 = torch.randn(shape, generator=generator) * spread
    g = torch.randn(shape, generator=generator, dtype=torch.float64)

    ours = per_channel_lsq(bits, w32.shape)
    ours.initialize(w32)
    reference = LsqNetPerChannel(bits)
    reference.init_from(w32)
    assert torch.equal(ours.step.detach(), reference.s.detach().reshape(-1))
    ours, reference, w = ours.double(), reference.double(), w32.double()
    latent = w / reference.s.detach()
    assert not bool(((latent == reference.thd_neg) | (latent == reference.thd_pos)).any())

    leaf_ours, leaf_ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    out_ours, out_ref = ours(leaf_ours), reference(leaf_ref)
    assert torch.allclose(out_ours, out_ref, rtol=1e-12, atol=1e-14)
    (out_ours * g).sum().backward()
    (out_ref * g).sum().backward()
    assert torch.allclose(leaf_ours.grad, leaf_ref.grad, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ours.step.grad, reference.s.grad.reshape(-1), rtol=1e-10, atol=1e-14)
    assert ours.step.grad.abs().sum() > 0


def test_lsq_per_channel_init_is_two_mean_abs_over_sqrt_qp_per_channel() -> None:
    w = torch.randn(4, 3, 2, 2) * torch.tensor([0.1, 1.0, 5.0, 0.0]).view(-1, 1, 1, 1)
    q = per_channel_lsq(4, w.shape)
    q.initialize(w)
    expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert torch.allclose(q.step[:3], expected[:3], rtol=1e-6)
    assert float(q.step.detach()[3]) == pytest.approx(1e-8)  # an all-zero channel: the floor


def test_a_transposed_convolution_has_its_steps_along_axis_one() -> None:
    layer = nn.ConvTranspose2d(3, 5, 3)
    model = quantize_model(
        nn.Sequential(nn.Conv2d(2, 3, 1), layer, nn.Conv2d(5, 2, 1)),
        LsqMethod(granularity="per_channel"),
        weight_bits=4,
        activation_bits=4,
    )
    quantized = model[1]
    assert quantized.weight_quantizer.step.shape == (5,)
    initialize_quantizers(model, torch.rand(2, 2, 6, 6))
    expected = 2 * layer.weight.detach().abs().mean(dim=(0, 2, 3)) / math.sqrt(7)
    assert torch.allclose(quantized.weight_quantizer.step.detach(), expected, rtol=1e-6)
    assert quantized.weight_quantizer.integer_map().axis == 1


tensors = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(0, 10_000))


@settings(max_examples=30, deadline=None)
@given(tensors, st.sampled_from([2, 3, 4, 8]))
def test_one_channel_per_channel_is_per_tensor(spec, bits) -> None:
    _, inner, width, seed = spec
    w = torch.randn(1, inner, width, generator=torch.Generator().manual_seed(seed))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    per_tensor = LsqMethod().weight_quantizer(bits)
    per_channel = per_channel_lsq(bits, w.shape)
    per_tensor.initialize(w)
    per_channel.initialize(w)
    assert float(per_channel.step) == pytest.approx(float(per_tensor.step), rel=1e-6)
    with torch.no_grad():
        per_channel.step.copy_(per_tensor.step.reshape(1))
    results = []
    for q in (per_tensor, per_channel):
        leaf = w.clone().requires_grad_()
        out = q(leaf)
        (out * g).sum().backward()
        results.append((out.detach(), leaf.grad, q.step.grad.reshape(())))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(tensors, st.sampled_from([1, 2, 3, 4]))
def test_ewgs_at_delta_zero_is_ste_per_channel(spec, bits) -> None:
    channels, inner, width, seed = spec
    w = torch.randn(channels, inner, width, generator=torch.Generator().manual_seed(seed))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = []
    for rule in (StraightThrough(), ElementWiseGradientScaling()):
        q = per_channel_lsq(bits, w.shape)
        q.initialize(w)
        q.round_site.set_rule(rule)
        q.round_site.set_delta(0.0)
        leaf = w.clone().requires_grad_()
        (q(leaf) * g).sum().backward()
        grads.append((leaf.grad, q.step.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@settings(max_examples=30, deadline=None)
@given(tensors, st.sampled_from([1, 2, 3, 4, 8]), st.floats(0.01, 100.0))
def test_per_channel_codes_are_within_range_and_decode_to_the_forward(spec, bits, spread) -> None:
    channels, inner, width, seed = spec
    w = torch.randn(channels, inner, width, generator=torch.Generator().manual_seed(seed))
    q = per_channel_lsq(bits, w.shape)
    q.initialize(w)
    w = w * spread  # well outside the initial range: the clip must hold
    imap = q.integer_map()
    codes = q.integer_codes(w)
    assert imap.axis == 0 and imap.scale.shape == (channels,)
    assert int(codes.min()) >= imap.low and int(codes.max()) <= imap.high
    assert torch.equal(q.dequantize(codes), q(w))


def test_a_higher_step_in_one_channel_changes_only_that_channel() -> None:
    w = torch.randn(3, 8)
    q = per_channel_lsq(3, w.shape)
    q.initialize(w)
    before = q(w).detach()
    with torch.no_grad():
        q.step[1] *= 2
    after = q(w).detach()
    assert torch.equal(before[[0, 2]], after[[0, 2]]) and not torch.equal(before[1], after[1])


def test_activations_stay_per_tensor_and_a_bad_granularity_is_named() -> None:
    method = LsqMethod(granularity="per_channel")
    assert method.activation_quantizer(4).step.dim() == 0
    with pytest.raises(ValueError, match="granularity"):
        LsqMethod(granularity="per_row")


def _recipe(method: dict) -> dict:
    return {
        "model": {"name": "digits_cnn", "options": {"width": 8}},
        "data": {"name": "digits", "batch_size": 32},
        "method": method,
        "backward": "ste",
        "bits": "W4A4",
        "epochs": 1,
        "device": "cpu",
    }


def test_a_recipe_asks_for_per_channel_as_a_method_option() -> None:
    from ewgs_plugins.recipe.validate import validate

    recipe = expand_runs(
        _recipe({"name": "lsq", "options": {"granularity": "per_channel"}}), source="t"
    )[0].recipe
    validate(recipe)
    assert recipe.make_method().per_channel


@pytest.mark.parametrize("method", ["interval", "dorefa", "profit"])
def test_methods_without_per_channel_refuse_it_by_name(method) -> None:
    with pytest.raises(ConfigError, match=f"method.options: .*{method}.* no per-channel"):
        expand_runs(
            _recipe({"name": method, "options": {"granularity": "per_channel"}}), source="t"
        )


def test_per_channel_trains_a_model_and_its_steps_move_apart() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(96, 3)
    )
    quantized = quantize_model(
        model, LsqMethod(granularity="per_channel"), weight_bits=3, activation_bits=4
    )
    x = torch.rand(16, 1, 8, 8)
    initialize_quantizers(quantized, x)
    layer = quantized_layers(quantized)["2"]
    assert layer.weight_quantizer.step.shape == (6,)
    quantized(x).square().mean().backward()
    assert layer.weight_quantizer.step.grad.shape == (6,)
    assert bool((layer.weight_quantizer.step.grad != 0).all())
