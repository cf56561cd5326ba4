"""PROFIT's AIWQ measurement (activation instability from weight quantization):
the per-channel Gaussian KL, the running average, and the tracker's checkpoint."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ewgs_plugins import QuantConv2d, initialize_quantizers, quantize_model
from ewgs_plugins.methods.profit import (
    AIWQTracker,
    activation_instability,
    gaussian_kl,
    measure_aiwq,
)
from ewgs_plugins.models import digits_cnn


def reference_kl(new: np.ndarray, old: np.ndarray) -> float:
    """KL(N(μ, σ²) ‖ N(μ_old, σ_old²)) per channel (axis 1), averaged over channels."""
    axes = tuple(d for d in range(new.ndim) if d != 1)
    mu, sigma = new.mean(axes), new.std(axes, ddof=1)
    mu_old, sigma_old = old.mean(axes), old.std(axes, ddof=1)
    kl = np.log(sigma_old / sigma) + (sigma**2 + (mu - mu_old) ** 2) / (2 * sigma_old**2) - 0.5
    return float(kl.mean())


def test_gaussian_kl_is_the_formula_per_channel_averaged():
    generator = torch.Generator().manual_seed(0)
    new = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    old = 0.7 * torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64) + 0.2
    assert gaussian_kl(new, old) == pytest.approx(reference_kl(new.numpy(), old.numpy()))
    assert gaussian_kl(new, new) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_kl_direction_matches_profit():
    """σ = 1 now, σ_old = 2 before: log 2 + 1/8 - 1/2 (the reverse would be 2 - log 2 - 1/2)."""
    base = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(50).view(100, 1)
    base = base / base.std()
    assert gaussian_kl(base, 2 * base) == pytest.approx(math.log(2) + 1 / 8 - 1 / 2)


def profit_model(seed: int = 0, method: str = "profit") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = quantize_model(digits_cnn(10, width=4), method, weight_bits=3, activation_bits=3)
    initialize_quantizers(model, batch(seed))
    return model


def batch(seed: int, count: int = 16) -> torch.Tensor:
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def nudge(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Stands in for an optimizer step on the conv weights."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, QuantConv2d):
            module.weight.add_(scale * torch.randn(module.weight.shape, generator=generator))


@torch.no_grad()
def expected_kls(model, previous, inputs) -> dict[str, float]:
    """Each conv's input in eval mode, its output with the current and previous quantized
    weights, and the KL of the formula (computed independently of the module)."""
    seen = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}
    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
        for n, m in convs.items()
    ]
    model.eval()
    model(inputs)
    model.train()
    for handle in handles:
        handle.remove()
    result = {}
    for name, conv in convs.items():
        x = conv.input_quantizer(seen[name])
        args = {"stride": conv.stride, "padding": conv.padding}
        new = F.conv2d(x, conv.weight_quantizer(conv.weight), **args).double()
        old = F.conv2d(x, previous[name], **args).double()
        result[name] = reference_kl(new.numpy(), old.numpy())
    return result


def test_tracker_running_average_of_the_kl_of_every_quantized_conv():
    model = profit_model()
    tracker = AIWQTracker()
    first = tracker.update(model, batch(1))
    convs = ["0", "3", "6"]  # PROFIT quantizes every layer; the linear "11" is not a conv
    assert first == {name: 0.0 for name in convs} and tracker.measurements == 0
    previous = {name: tensor.clone() for name, tensor in tracker.previous.items()}

    nudge(model, 0.02)
    expected = expected_kls(model, previous, batch(2))
    assert all(0 < value < 1 for value in expected.values())
    averages = tracker.update(model, batch(2))
    for name in convs:
        assert averages[name] == pytest.approx(0.001 * expected[name], rel=1e-5)

    previous = {name: tensor.clone() for name, tensor in tracker.previous.items()}
    nudge(model, 0.02, seed=1)
    expected_next = expected_kls(model, previous, batch(3))
    averages = tracker.update(model, batch(3))
    for name in convs:
        running = 0.999 * 0.001 * expected[name] + 0.001 * expected_next[name]
        assert averages[name] == pytest.approx(running, rel=1e-5)
    assert tracker.measurements == 2
    assert tracker.ranking() == sorted(averages, key=averages.get, reverse=True)


def test_tracker_skips_a_kl_above_the_limit():
    model = profit_model()
    tracker = AIWQTracker(max_kl=1e-12)
    tracker.update(model, batch(1))
    nudge(model, 0.05)
    averages = tracker.update(model, batch(2))
    assert averages == {"0": 0.0, "3": 0.0, "6": 0.0}
    assert tracker.skipped == {"0": 1, "3": 1, "6": 1}


def test_unchanged_weights_have_zero_instability_and_only_quantized_convs_count():
    model = profit_model(method="lsq")  # first conv and last linear stay full precision
    tracker = AIWQTracker(momentum=0.5)
    tracker.update(model, batch(1))
    averages = tracker.update(model, batch(2))
    assert set(averages) == {"3", "6"}
    assert all(abs(value) < 1e-9 for value in averages.values())


def test_measuring_leaves_the_model_as_it_was():
    model = profit_model()
    model.train()
    model[1].eval()  # a mix of modes is restored module by module
    tracker = AIWQTracker()
    tracker.update(model, batch(1))
    nudge(model, 0.01)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tracker.update(model, batch(2))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training and not model[1].training and model[4].training
    assert all(p.grad is None for p in model.parameters())


def test_tracker_state_survives_a_checkpoint():
    model = profit_model()
    tracker = AIWQTracker(momentum=0.99)
    tracker.update(model, batch(1))
    nudge(model, 0.02)
    tracker.update(model, batch(2))

    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    restored = AIWQTracker()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.averages == tracker.averages and restored.momentum == 0.99

    nudge(model, 0.02, seed=3)
    assert restored.update(model, batch(4)) == tracker.update(model, batch(4))
    assert restored.measurements == tracker.measurements == 2


def test_measure_aiwq_over_training_steps():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images[:96], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    targets = torch.tensor(data.target[:96])
    model = profit_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(pair):
        inputs, labels = pair
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    batches = list(zip(images.split(16), targets.split(16)))
    tracker = AIWQTracker()
    averages = measure_aiwq(model, batches, train_step, tracker)
    assert tracker.measurements == len(batches)
    assert set(averages) == {"0", "3", "6"}
    assert all(value >= 0 for value in averages.values())
    assert any(value > 0 for value in averages.values())
    # without a tracker, a fresh one is used; a step that changes nothing measures 0
    assert set(measure_aiwq(model, batches[:2], lambda b: None).values()) == {0.0}


def test_activation_instability_needs_previous_weights_for_every_conv():
    model = profit_model()
    with pytest.raises(KeyError, match=r"conv layer\(s\) \['3', '6'\]"):
        activation_instability(model, {"0": model[0].weight}, batch(1))
    with pytest.raises(ValueError, match="momentum"):
        AIWQTracker(momentum=1.0)
