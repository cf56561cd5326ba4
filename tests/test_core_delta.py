"""δ estimators: the Hutchinson estimate against the exact Hessian, and side effects."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewgs_plugins import (
    ConfigError,
    ElementWiseGradientScaling,
    FixedDelta,
    HessianDelta,
    RoundSite,
    estimate_hessian_deltas,
    registry,
)
from ewgs_plugins.delta import _converged, hutchinson_traces


class TwoSites(nn.Module):
    """A tiny network with an activation round site feeding a second one."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)  # both blocks have positive trace
        self.first = RoundSite(ElementWiseGradientScaling(), 0.0)
        self.second = RoundSite(ElementWiseGradientScaling(), 0.0)
        self.w1 = nn.Parameter(torch.randn(4, 5, generator=generator))
        self.w2 = nn.Parameter(torch.randn(5, 3, generator=generator))
        self.norm = nn.BatchNorm1d(5)

    def middle(self, q1: torch.Tensor) -> torch.Tensor:
        """From the first site's discrete values (fraction of range) to the second's."""
        h = torch.sigmoid(self.norm(q1 @ self.w1))
        return self.second(h * 15, 15, 0.0, 15.0) / 15

    def head(self, q2: torch.Tensor) -> torch.Tensor:
        return q2 @ self.w2 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q1 = self.first(x * 7, 7, 0.0, 7.0) / 7
        return self.head(self.middle(q1))


def exact_delta(loss_of_point, point: torch.Tensor) -> float:
    """(Tr(H)/N) / (3 std(g)), clipped at 0, from the full Hessian."""
    hessian = torch.autograd.functional.hessian(loss_of_point, point)
    n = point.numel()
    trace = hessian.reshape(n, n).diagonal().sum()
    grad = torch.autograd.functional.jacobian(loss_of_point, point)
    return max(0.0, float(trace / n / (3 * grad.std())))


def batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(6, 4, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return x, y


def loss_fn(model: nn.Module, data) -> torch.Tensor:
    x, y = data
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("blockwise", [True, False])
def test_hutchinson_delta_matches_the_exact_hessian(blockwise):
    model = TwoSites().double()
    x, y = batch()
    with torch.no_grad():
        q1 = model.first(x * 7, 7, 0.0, 7.0) / 7
        q2 = model.middle(q1)
    expected_first = exact_delta(lambda q: F.cross_entropy(model.head(model.middle(q)), y), q1)
    expected_second = exact_delta(lambda q: F.cross_entropy(model.head(q), y), q2)
    assert expected_first > 0 and expected_second > 0
    estimated = estimate_hessian_deltas(
        model,
        [(x, y)],
        loss_fn,
        samples=3000,
        tol=0.0,
        blockwise=blockwise,
        generator=torch.Generator().manual_seed(2),
    )
    assert set(estimated) == {"first", "second"}
    for name, expected in (("first", expected_first), ("second", expected_second)):
        assert estimated[name] == pytest.approx(expected, rel=0.08, abs=1e-4), name


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    point = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    loss = (weights * point**2).sum()  # H = diag(2 w), trace 5
    traces, grads = hutchinson_traces(loss, [point], samples=5, tol=0.0)
    assert traces[0] == pytest.approx(5.0)
    assert torch.allclose(grads[0], 2 * weights * point.detach())


def test_convergence_compares_magnitudes_so_negative_traces_do_not_stop_early():
    # The paper's code tests (mean - trace) / trace < tol, true for every negative trace.
    assert not _converged(-5.0, -5.5, 1e-3)
    assert _converged(-5.0, -5.000001, 1e-3)
    assert not _converged(5.0, 5.5, 1e-3)


def test_representatives_scale_delta_as_table_4_says():
    model = TwoSites().double()
    data = batch()
    by = {
        kind: estimate_hessian_deltas(
            model,
            [data],
            loss_fn,
            representative=kind,
            samples=20,
            tol=0.0,
            generator=torch.Generator().manual_seed(0),  # the same probes for all three
        )
        for kind in ("std", "max", "mean")
    }
    x, y = data
    with torch.no_grad():
        q2 = model.middle(model.first(x * 7, 7, 0.0, 7.0) / 7)
    grad = torch.autograd.functional.jacobian(lambda q: F.cross_entropy(model.head(q), y), q2)
    grad = grad * 15  # per level unit -> per fraction of range is the same factor for all three
    ratio_max = (3 * grad.std()) / grad.abs().max()
    ratio_mean = (3 * grad.std()) / grad.abs().mean()
    assert by["max"]["second"] == pytest.approx(by["std"]["second"] * float(ratio_max), rel=1e-9)
    assert by["mean"]["second"] == pytest.approx(by["std"]["second"] * float(ratio_mean), rel=1e-9)


def test_estimate_changes_no_weight_buffer_grad_optimizer_state_or_rng():
    model = TwoSites()
    x, y = batch()
    data = (x.float(), y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn(model, data).backward()
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer_state = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state.items()}
    rng = torch.get_rng_state()
    deltas = estimate_hessian_deltas(model, [data, data], loss_fn, samples=4)
    assert set(deltas) == {"first", "second"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BN running stats included
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, grads[name]), name
    for key, value in optimizer.state.items():
        for name, tensor in value.items():
            assert torch.equal(tensor, optimizer_state[key][name])
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(site.capture is None for site in (model.first, model.second))


def test_delta_is_never_negative():
    # Concave loss in the second site's values: Tr(H) < 0, so δ = max(0, ·) = 0.
    class Concave(TwoSites):
        def head(self, q2):
            return q2

    model = Concave().double()
    deltas = estimate_hessian_deltas(
        model, [batch()], lambda m, d: -(m(d[0]) ** 2).sum(), samples=10, tol=0.0
    )
    assert deltas["second"] == 0.0


def test_hessian_estimator_schedule_and_options():
    estimator = HessianDelta(every=10)
    assert estimator.initial() == 0.0  # the paper's schedule: STE until the first estimate
    assert not estimator.due(epoch=0)
    assert estimator.due(epoch=10) and estimator.due(epoch=20) and not estimator.due(epoch=15)
    per_step = HessianDelta(every=3, unit="step")
    assert per_step.due(step=6) and not per_step.due(epoch=6)
    with pytest.raises(ValueError, match="samples"):
        HessianDelta(samples=0)
    assert FixedDelta(0.01).initial() == 0.01
    assert not FixedDelta(0.01).due(epoch=10)


def test_estimators_from_recipe_options_report_key_paths():
    delta = registry().create("delta", "hessian", {"every": 2, "representative": "max"}, "delta")
    assert isinstance(delta, HessianDelta) and delta.representative == "max"
    with pytest.raises(ConfigError, match=r"delta\.options: .*δ must be >= 0"):
        registry().create("delta", "fixed", {"value": -0.1}, "delta")
    with pytest.raises(ConfigError, match=r"delta\.options\.representative: expected one of"):
        registry().create("delta", "hessian", {"representative": "median"}, "delta")
    with pytest.raises(ConfigError, match=r"delta\.options\.every: expected int"):
        registry().create("delta", "hessian", {"every": 1.5}, "delta")
    with pytest.raises(ConfigError, match=r"delta: unknown δ estimator 'magic'; known: fixed"):
        registry().create("delta", "magic", {}, "delta")
    assert math.isclose(registry().create("delta", "fixed", {"value": 1}, "delta").value, 1.0)
