"""δ estimators: the Hutchinson estimate against the exact Hessian, and side effects."""

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
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
from ewgs_plugins.delta import (
    _converged,
    curvature_ratios,
    hutchinson_estimates,
    hutchinson_traces,
    probe_groups,
)


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


@pytest.mark.parametrize("probe", ["site", "kind", "all"])
def test_hutchinson_delta_matches_the_exact_hessian(probe):
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
        probe=probe,
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


# ---------------------------------------------------------------- an exact quadratic


class _Quantizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.round_site = RoundSite(ElementWiseGradientScaling(), 0.0)


class _Layer(nn.Module):
    """A layer with one round site, a weight site (``<layer>.weight``) or an
    activation site (``<layer>.input``), as the quantized layers name theirs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        setattr(self, f"{kind}_quantizer", _Quantizer())

    @property
    def site(self) -> RoundSite:
        return getattr(self, f"{self.kind}_quantizer").round_site


class Quadratic(nn.Module):
    """The loss is exactly ``½ xᵀAx + bᵀx`` in the sites' discrete values ``x`` (as a
    fraction of their range): site s has ``sizes[s]`` values and Hessian block
    ``A_ss``, so its Tr(H)/N is ``Tr(A_ss) / sizes[s]``. Weight sites round a
    parameter, activation sites a slice of the batch."""

    STEPS = 7

    def __init__(self, kinds: list[str], sizes: list[int], seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.sizes = sizes
        self.layers = nn.ModuleList(_Layer(kind) for kind in kinds)
        self.latents = nn.ParameterList(
            nn.Parameter(torch.rand(n, generator=generator, dtype=torch.float64) * self.STEPS)
            for n in sizes
        )
        total = sum(sizes)
        root = torch.randn(total, total, generator=generator, dtype=torch.float64)
        self.register_buffer("hessian", (root + root.T) / 2)
        self.register_buffer("linear", torch.randn(total, generator=generator, dtype=torch.float64))

    def values(self, batch: torch.Tensor) -> torch.Tensor:
        parts, offset = [], 0
        for layer, latent, n in zip(self.layers, self.latents, self.sizes):
            z = latent if layer.kind == "weight" else batch[offset : offset + n] * self.STEPS
            parts.append(layer.site(z, self.STEPS, 0.0, float(self.STEPS)) / self.STEPS)
            offset += n
        return torch.cat(parts)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.values(batch)
        return 0.5 * x @ self.hessian @ x + self.linear @ x

    def exact_ratios(self, batch: torch.Tensor) -> dict[str, float]:
        """(Tr(A_ss)/N_s) / (3·std(g_s)) per site, g = Ax + b."""
        with torch.no_grad():
            grad = self.hessian @ self.values(batch) + self.linear
        out, offset = {}, 0
        for index, (layer, n) in enumerate(zip(self.layers, self.sizes)):
            block = slice(offset, offset + n)
            trace = float(self.hessian[block, block].diagonal().sum())
            out[f"layers.{index}.{layer.kind}"] = trace / n / float(3 * grad[block].std())
            offset += n
        return out

    def probe_sds(self, batch: torch.Tensor, probe: str) -> dict[str, float]:
        """Per site s, the standard deviation of one probe's estimate of its ratio. The
        estimate of Tr(A_ss) is v_sᵀ(Au)_s / c_s² with u_t = c_t·v_t, each v_t an
        independent Rademacher vector, c_t = N_t^-½ under ``scaled`` and 1 otherwise;
        its variance is Hutchinson's 2(‖A_ss‖_F² − Σ_i (A_ss)_ii²) plus, for every
        other site t in the same product (``probe``), (c_t/c_s)²·‖A_st‖_F². The ratio
        divides it by N_s·3·std(g_s)."""
        with torch.no_grad():
            grad = self.hessian @ self.values(batch) + self.linear
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        blocks = [slice(a, a + n) for a, n in zip(starts, self.sizes)]
        out = {}
        for s, (layer, n) in enumerate(zip(self.layers, self.sizes)):
            own = self.hessian[blocks[s], blocks[s]]
            variance = 2 * float(own.square().sum() - own.diagonal().square().sum())
            for t, other in enumerate(self.layers):
                shared = probe in ("all", "scaled") or (
                    probe == "kind" and other.kind == layer.kind
                )
                if t != s and shared:
                    weight = n / self.sizes[t] if probe == "scaled" else 1.0
                    variance += weight * float(self.hessian[blocks[s], blocks[t]].square().sum())
            scale = float(3 * grad[blocks[s]].std())
            out[f"layers.{s}.{layer.kind}"] = math.sqrt(variance) / n / scale
        return out


def quadratic_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


quadratic_cases = st.tuples(
    st.lists(st.sampled_from(["weight", "input"]), min_size=1, max_size=4),
    st.integers(2, 6),
    st.integers(0, 2**16),
)


def _quadratic(case) -> tuple[Quadratic, tuple[torch.Tensor]]:
    kinds, size, seed = case
    sizes = [size + i for i in range(len(kinds))]
    model = Quadratic(kinds, sizes, seed)
    inputs = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed + 1))
    return model, (inputs.double(),)


@settings(max_examples=12)
@given(case=quadratic_cases, probe=st.sampled_from(["site", "kind", "all", "scaled"]))
@example(case=(["input", "weight"], 2, 660), probe="site")  # a small block: a large spread
def test_every_estimator_converges_to_the_trace_of_an_exact_quadratic(case, probe):
    model, batch = _quadratic(case)
    expected = model.exact_ratios(batch[0])
    samples = 1500
    ratios = curvature_ratios(
        model,
        [batch],
        quadratic_loss,
        probe=probe,
        samples=samples,
        tol=0.0,
        generator=torch.Generator().manual_seed(case[2]),
    )
    assert set(ratios) == set(expected)
    spreads = model.probe_sds(batch[0], probe)
    for name, [(ratio, error)] in ratios.items():
        # the standard error the estimator's variance gives for this many probes
        derived = spreads[name] / math.sqrt(samples)
        # unbiased: within 6 of them (a chance of ~2e-9 per site to be further off)
        assert abs(ratio - expected[name]) <= 6 * derived + 1e-9, name
        # converging as 1/√samples: the sampled standard error is the derived one (its
        # own relative error with 1500 probes is a few %)
        assert error <= 1.5 * derived + 1e-12, name


@settings(max_examples=8)
@given(case=quadratic_cases, per_product=st.integers(2, 5))
def test_batched_probes_have_the_expectation_of_single_probes(case, per_product):
    model, batch = _quadratic(case)
    kwargs = {"probe": "all", "samples": 600, "tol": 0.0}
    single = curvature_ratios(
        model, [batch], quadratic_loss, generator=torch.Generator().manual_seed(1), **kwargs
    )
    batched = curvature_ratios(
        model,
        [batch],
        quadratic_loss,
        per_product=per_product,
        generator=torch.Generator().manual_seed(2),
        **kwargs,
    )
    for name in single:
        [(one, one_error)], [(many, many_error)] = single[name], batched[name]
        assert abs(one - many) <= 5 * math.hypot(one_error, many_error) + 1e-9, name


def test_batched_site_probes_are_exact_on_a_diagonal_hessian():
    # For a diagonal block every Rademacher probe gives vᵀAv = Tr(A) exactly, so the
    # batched path must return exactly the trace, with zero spread.
    point = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    loss = (weights * point**2).sum()  # H = diag(2 w), trace 9
    for per_product in (1, 3, 4):
        estimates, _ = hutchinson_estimates(
            loss, [point], samples=7, per_product=per_product, tol=0.0
        )
        assert estimates[0].count == 7
        assert estimates[0].mean == pytest.approx(9.0)
        assert estimates[0].standard_error() == pytest.approx(0.0, abs=1e-12)


def test_standard_error_stop_ends_a_site_once_its_mean_is_that_precise():
    point = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    exact = (torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64) * point**2).sum()
    [estimate], _ = hutchinson_estimates(exact, [point], samples=50, stop="sem", tol=0.1)
    assert estimate.count == 2  # no spread: the first moment it can be measured
    noisy_point = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    noisy = noisy_point[0] * noisy_point[1] * 4 + noisy_point[2] ** 2  # trace 2, H_01 = 4
    [estimate], _ = hutchinson_estimates(
        noisy, [noisy_point], samples=400, stop="sem", tol=0.5, generator=torch.Generator()
    )
    assert 2 < estimate.count < 400  # a probe's spread is 8: about 64 probes
    assert estimate.standard_error() <= 0.5 * abs(estimate.mean)


def test_probe_groups_split_weight_sites_from_activation_sites():
    names = ["a.input", "a.weight", "b.input", "b.weight", "c.weight"]
    assert probe_groups("site", names) == [[0], [1], [2], [3], [4]]
    assert probe_groups("kind", names) == [[1, 3, 4], [0, 2]]
    assert probe_groups("all", names) == probe_groups("scaled", names) == [[0, 1, 2, 3, 4]]
    assert probe_groups("kind", ["a.input"]) == [[0]]


def test_a_sub_batch_estimate_is_the_estimate_on_the_first_samples():
    model = TwoSites().double()
    x, y = batch()
    kwargs = {"probe": "kind", "samples": 3, "tol": 0.0}
    on_sub = estimate_hessian_deltas(
        model, [(x, y)], loss_fn, sub_batch=4, generator=torch.Generator().manual_seed(3), **kwargs
    )
    on_first = estimate_hessian_deltas(
        model, [(x[:4], y[:4])], loss_fn, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert on_sub == on_first


@pytest.mark.parametrize(
    "options",
    [
        {"probe": "site", "samples": 3},
        {"probe": "kind", "samples": 4, "per_product": 2, "sub_batch": 4},
        {"probe": "scaled", "samples": 5, "stop": "sem", "tol": 0.3},
    ],
)
def test_every_estimator_setting_leaves_no_side_effects(options):
    model = TwoSites()
    x, y = batch()
    data = (x.float(), y)
    loss_fn(model, data).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    deltas = HessianDelta(**options).estimate(model, [data, data], loss_fn)
    assert set(deltas) == {"first", "second"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, grads[name]), name
    assert torch.equal(torch.get_rng_state(), rng)


def test_new_estimator_options_are_checked():
    for bad in ({"per_product": 0}, {"sub_batch": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            HessianDelta(**bad)
    with pytest.raises(ConfigError, match=r"delta\.options\.probe: expected one of"):
        registry().create("delta", "hessian", {"probe": "layer"}, "delta")
    with pytest.raises(ConfigError, match=r"delta\.options\.stop: expected one of"):
        registry().create("delta", "hessian", {"stop": "never"}, "delta")
