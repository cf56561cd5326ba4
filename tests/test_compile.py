"""torch.compile of converted models: one graph (no break at any round site), and the
same outputs and gradients as eager, for every built-in method under STE and EWGS.

Why the comparison is in float64 and the BatchNorm affine parameters are random:
a compiled graph sums in another order than eager, so values differ by rounding
(reassociation). Two things turn that into visible gradient differences, neither a
compiler bug:

- a quantized layer's output is a multiple of s_w·s_a, and its batch mean often is too
  (an integer sum divisible by N·H·W). With BN's β = 0 and γ = 1 (their init), every
  element at that value sits on ReLU's kink, where rounding noise of ±1 ulp picks
  whether the gradient passes; BN's backward then spreads the difference over the
  channel and every input (in float32 and float64 alike). A random β moves the kink
  off the grid of attainable values.
- gradients of scalar quantizer parameters (LSQ's s, the interval bounds) are sums
  over a whole tensor with heavy cancellation, so their relative rounding error is
  up to ~1e3 times the elementwise one: ~1e-3 in float32, ~1e-13 in float64.

In float64 reassociation moves every result by < 1e-12 of its largest magnitude
(measured), so a tolerance of 1e-9 leaves three orders of margin and still catches
any real difference (a lost EWGS factor changes gradients by up to δ/(2·steps), here
~1e-1; a wrong clip mask or a missed round by O(1)).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from ewgs_plugins import ElementWiseGradientScaling, quantize_model, round_sites
from ewgs_plugins.quant import initialize_quantizers, quantized_layers

METHODS = ("interval", "dorefa", "lsq", "profit")
DELTA = 2.0  # EWGS's δ: large, so that a lost scaling factor is plain to see
TOLERANCE = 1e-9


def converted_model(rule: str, delta: float) -> nn.Module:
    """A small CNN whose four middle convs are quantized (W3A3) by the four methods,
    one each, with random BN affine parameters (see the module docstring), in float64."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 6, 3, padding=1, bias=False)]
    for _ in range(len(METHODS) + 1):
        layers += [nn.BatchNorm2d(6), nn.ReLU()]
        if len(layers) < 3 * len(METHODS) + 1:
            layers.append(nn.Conv2d(6, 6, 3, padding=1, bias=False))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    convs = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)][1:]
    for index, method in enumerate(METHODS):
        quantize_model(
            model,
            method,
            weight_bits=3,
            activation_bits=3,
            backward=rule,
            delta=delta,
            quantize_first_last=False,
            exclude=convs[index + 1 :],
            inplace=True,
        )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    model.double()
    initialize_quantizers(model, torch.randn(8, 1, 8, 8, dtype=torch.float64))
    assert [m.method_name for m in quantized_layers(model).values()] == list(METHODS)
    return model.train()


def outputs_and_gradients(model: nn.Module, forward, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = forward(x)
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    result = {"output": out.detach(), "input.grad": x.grad}
    result.update({n: p.grad for n, p in model.named_parameters()})
    return result


def assert_close(eager: dict[str, torch.Tensor], compiled: dict[str, torch.Tensor]) -> None:
    assert eager.keys() == compiled.keys()
    for name, expected in eager.items():
        assert expected is not None and compiled[name] is not None, name
        scale = float(expected.abs().max())
        error = float((expected - compiled[name]).abs().max())
        assert error <= TOLERANCE * max(scale, 1e-30), f"{name}: {error:.3g} of {scale:.3g}"


def test_compiled_model_matches_eager_outputs_and_gradients():
    # One compile covers every method under both rules: in each quantized layer one
    # round site has STE and the other EWGS (δ > 0), weights and inputs alternating.
    model = converted_model("ste", DELTA)
    for index, layer in enumerate(quantized_layers(model).values()):
        sites = (layer.weight_quantizer.round_site, layer.input_quantizer.round_site)
        sites[index % 2].set_rule(ElementWiseGradientScaling())
    rules = [site.rule.name for site in round_sites(model).values()]
    assert rules.count("ewgs") == rules.count("ste") == len(METHODS)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eager = outputs_and_gradients(model, model, x)
    assert_close(eager, outputs_and_gradients(model, compiled, x))
    # fullgraph=True refuses any graph break; the model is one graph
    assert len([graph for graph in counter.graphs if len(graph.graph.nodes) > 2]) == 1
    compiles = counter.frame_count

    # δ is a buffer, an input of the graph: changing it (the δ schedule does, during
    # training) takes effect without recompiling, and it matters
    for site in round_sites(model).values():
        site.set_delta(0.5)
    changed = outputs_and_gradients(model, model, x)
    assert not torch.allclose(changed["input.grad"], eager["input.grad"], rtol=1e-6)
    assert_close(changed, outputs_and_gradients(model, compiled, x))
    assert counter.frame_count == compiles


def test_compiled_model_under_autocast_is_one_graph_with_float32_round_sites():
    # The quantizers turn autocast off around their bodies (float32 round sites); the
    # compiled graph must keep those regions and stay one graph. With the aot_eager
    # backend (the same graph run by eager kernels) the results are bit for bit eager's.
    # Inductor's own bf16 kernels round intermediates differently from eager, which
    # moves a few elements across rounding boundaries: not a comparison to make exactly.
    model = converted_model("ewgs", DELTA).float()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def under_autocast(forward):
        def autocast_forward(inputs: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(inputs)

        return outputs_and_gradients(model, autocast_forward, x)

    eager = under_autocast(model)
    assert eager["output"].dtype == torch.bfloat16
    got = under_autocast(compiled)
    assert eager.keys() == got.keys()
    for name, expected in eager.items():
        assert torch.equal(expected, got[name]), name
    (graph,) = [graph for graph in counter.graphs if len(graph.graph.nodes) > 2]
    code = graph.code
    assert code.count("_enter_autocast(") == len(round_sites(model)), code  # one per quantizer
