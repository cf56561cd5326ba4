"""δ estimators: ``fixed`` and the paper's Hessian-adaptive one (Sec. 3.2, Eq. 8-10).

``estimate_hessian_deltas`` is usable on its own: give it a model, batches and a
loss function and it returns a δ for every round site, leaving the model's
parameters, buffers (BN running statistics) and every ``.grad`` untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .round_site import RoundSite, round_sites

Representative = Literal["std", "max", "mean"]
Schedule = Literal["epoch", "step"]
SiteKind = Literal["weight", "activation"]


def site_kind(name: str) -> SiteKind:
    """Whether the round site ``name`` (as ``round_sites`` names it) rounds a weight
    (``*.weight``) or a layer's input, an activation (``*.input``)."""
    return "weight" if name.endswith(".weight") else "activation"


class DeltaEstimator:
    """Base class. ``initial`` is δ before any estimate; ``estimate`` returns new δ
    per site name, or None if this estimator never changes δ."""

    name = "?"
    every: int = 0
    unit: Schedule = "epoch"
    before_training: bool = False
    batches: int = 0

    def initial(self) -> float:
        raise NotImplementedError

    def initial_for(self, site: str) -> float:
        """δ of the round site named ``site`` before any estimate (``initial()`` unless
        the estimator tells the kinds of site apart)."""
        return self.initial()

    def estimate(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
    ) -> dict[str, float] | None:
        return None

    def standard_errors(self) -> dict[str, float]:
        """The standard error of the last estimate's δ per site, where the estimator
        knows it (empty otherwise)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the estimator between estimates (plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def due(self, *, epoch: int | None = None, step: int | None = None) -> bool:
        """Whether an estimate is due after ``epoch`` epochs or ``step`` steps have run
        (the paper's ``ep % every == 0 and ep != 0``)."""
        if self.every <= 0:
            return False
        count = epoch if self.unit == "epoch" else step
        return count is not None and count > 0 and count % self.every == 0


@dataclass
class FixedDelta(DeltaEstimator):
    """A constant δ (paper: 1e-3 for its own quantizer on CIFAR-10, 0.01 for DoReFa
    and PROFIT). ``weight`` and ``activation``, when given, replace ``value`` at the
    weight sites and at the activation (layer input) sites respectively; δ = 0 at a
    site gives it exactly the straight-through gradient."""

    value: float = 1e-3
    weight: float | None = None
    activation: float | None = None
    name = "fixed"

    def __post_init__(self) -> None:
        for key, value in (
            ("value", self.value),
            ("weight", self.weight),
            ("activation", self.activation),
        ):
            if value is not None and not value >= 0:
                raise ValueError(f"δ must be >= 0, got {key} = {value}")

    def initial(self) -> float:
        return self.value

    def initial_for(self, site: str) -> float:
        per_kind = self.weight if site_kind(site) == "weight" else self.activation
        return self.value if per_kind is None else per_kind


Probe = Literal["site", "kind", "all", "scaled"]
Stop = Literal["change", "sem"]
Average = Literal["none", "window", "ema"]
#: The default probing: the cheapest setting measured that agrees with the paper's
#: per-site estimator at the CIFAR-10 recipe's settings (README, Benchmarks, "The δ
#: estimate: cost against agreement"); the paper's is ``probe="site", samples=50``.
DEFAULT_PROBE: Probe = "kind"
DEFAULT_SAMPLES = 3
#: The default pooling: δ from the per-batch ratios of the last 3 refreshes, a third of
#: one refresh's variance at the same cost, for a lag of one refresh (documentation,
#: "Precision of the δ estimate"); the paper's is ``average="none"``.
DEFAULT_AVERAGE: Average = "window"
DEFAULT_WINDOW = 3


@dataclass
class HessianDelta(DeltaEstimator):
    """δ = max(0, (Tr(H)/N) / G) per site, estimated every ``every`` epochs (or steps)
    on ``batches`` training batches with Hutchinson's method. G is ``3·std(g)``
    (``std``), ``max|g|`` or ``mean|g|`` (paper Table 4).

    ``probe`` says which sites share a Hessian-vector product (each site always gets
    its own independent Rademacher vector, so every choice has the same expectation,
    ``Tr(H_ss)``; they differ in cost and noise):

    - ``site``: each site alone, one product per site per probe (the paper's code, with
      ``samples: 50``);
    - ``kind``: all weight sites in one product, all activation sites in another (the
      noise at a site then comes from sites of its own kind only);
    - ``all``: every site in one product;
    - ``scaled``: every site in one product, site s's vector scaled by ``1/√N_s`` (and
      its estimate by ``N_s``), so that the cross terms from large sites (activations)
      weigh less at small ones (weights), and the reverse.

    Up to ``samples`` probes per site and batch; ``per_product`` probes are drawn at
    once and go through one batched product (``is_grads_batched``). A site stops early
    by ``stop``: ``change`` (the running mean moves by less than ``tol`` relative to
    its magnitude; the paper's rule) or ``sem`` (the standard error of the mean is at
    most ``tol`` times its magnitude); ``tol: 0`` never stops early. ``sub_batch``
    estimates on the first ``sub_batch`` samples of each batch (null: the whole batch).

    ``average`` pools the per-batch ratios ``(Tr(H)/N)/G`` of successive estimates
    (refreshes) before ``max(0, ·)``, at no extra cost per refresh:

    - ``none``: each refresh alone (the paper; with ``probe: site, samples: 50`` the
      paper's estimator exactly);
    - ``window`` (the default, with ``window: 3``): the plain mean of the per-batch
      ratios of the last ``window`` refreshes (null: all so far). On a fixed model
      the variance is 1/k of one refresh's after k refreshes; when δ drifts by ``s``
      per refresh the pooled value lags by ``(k-1)/2`` refreshes, a bias of
      ``-s·(k-1)/2``.
    - ``ema``: ``m ← decay·m + (1-decay)·r̄`` with ``r̄`` this refresh's mean ratio
      (the first refresh alone starts it); the variance tends to
      ``(1-decay)/(1+decay)`` of one refresh's and a steady drift lags by
      ``decay/(1-decay)`` refreshes.

    With one refresh every choice equals ``none``. A refresh before training
    (``before_training``) enters the pool like any other. The standard error of each pooled δ
    (``standard_errors()``) comes from the spread of the per-batch ratios it pools.
    """

    every: int = 10
    unit: Schedule = "epoch"
    batches: int = 3
    probe: Probe = DEFAULT_PROBE
    samples: int = DEFAULT_SAMPLES
    per_product: int = 1
    stop: Stop = "change"
    tol: float = 1e-3
    sub_batch: int | None = None
    representative: Representative = "std"
    before_training: bool = False
    initial_value: float = 0.0
    average: Average = DEFAULT_AVERAGE
    window: int | None = DEFAULT_WINDOW
    decay: float = 0.5
    name = "hessian"
    pool: RatioPool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, value, minimum in (
            ("every", self.every, 0),
            ("batches", self.batches, 1),
            ("samples", self.samples, 1),
            ("per_product", self.per_product, 1),
            ("sub_batch", 1 if self.sub_batch is None else self.sub_batch, 1),
            ("window", 1 if self.window is None else self.window, 1),
        ):
            if value < minimum:
                raise ValueError(f"{key} must be >= {minimum}, got {value}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if not self.initial_value >= 0:
            raise ValueError(f"initial_value (δ) must be >= 0, got {self.initial_value}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        self.pool = RatioPool(self.average, self.window, self.decay)

    def initial(self) -> float:
        return self.initial_value

    def estimate(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
    ) -> dict[str, float]:
        ratios = curvature_ratios(
            model,
            batches,
            loss_fn,
            probe=self.probe,
            samples=self.samples,
            per_product=self.per_product,
            stop=self.stop,
            tol=self.tol,
            sub_batch=self.sub_batch,
            representative=self.representative,
        )
        return self.pool.add({name: [r for r, _ in rs] for name, rs in ratios.items()})

    def standard_errors(self) -> dict[str, float]:
        return self.pool.standard_errors()

    def state_dict(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pool.load_state_dict(state)


@dataclass
class PooledRatio:
    """One site's pooled ratio ``(Tr(H)/N)/G``: its mean and that mean's standard
    error."""

    mean: float
    standard_error: float


class RatioPool:
    """The per-batch ratios ``(Tr(H)/N)/G`` of successive δ estimates, pooled per site
    as ``HessianDelta.average`` says (``none``, ``window``, ``ema``); ``add`` takes one
    refresh's ratios and returns δ = max(0, pooled mean).

    The standard error counts the noise of the pooled ratios (probes and batches), from
    their spread within each refresh (across refreshes only when a refresh has a single
    batch, where it also counts any drift of δ); it does not count the lag."""

    def __init__(
        self, average: Average = "none", window: int | None = 3, decay: float = 0.5
    ) -> None:
        self.average, self.window, self.decay = average, window, decay
        #: per refresh (oldest first; under ``ema`` only the last): site -> its ratios
        self.refreshes: list[dict[str, list[float]]] = []
        #: ``ema``: site -> [mean, variance of the mean, variance of one ratio]
        self.moving: dict[str, list[float]] = {}
        self.pooled: dict[str, PooledRatio] = {}

    def add(self, ratios: Mapping[str, list[float]]) -> dict[str, float]:
        ratios = {name: list(values) for name, values in ratios.items()}
        self.refreshes.append(ratios)
        kept = self.window if self.average == "window" else 1
        if kept is not None:
            del self.refreshes[: max(0, len(self.refreshes) - kept)]
        if self.average == "ema":
            self._update_moving(ratios)
        self.pooled = self._pool()
        return {name: max(0.0, pooled.mean) for name, pooled in self.pooled.items()}

    def standard_errors(self) -> dict[str, float]:
        """Per site, the standard error of the last pooled mean ratio (inf where the
        ratios pooled give no spread to measure)."""
        return {name: pooled.standard_error for name, pooled in self.pooled.items()}

    def _update_moving(self, ratios: Mapping[str, list[float]]) -> None:
        decay = self.decay
        for name, values in ratios.items():
            mean, variance = _mean_and_variance(values)
            if name not in self.moving:
                self.moving[name] = [mean, variance / len(values), variance]
                continue
            old_mean, old_mean_variance, old_variance = self.moving[name]
            variance = decay * old_variance + (1 - decay) * variance
            self.moving[name] = [
                decay * old_mean + (1 - decay) * mean,
                decay**2 * old_mean_variance + (1 - decay) ** 2 * variance / len(values),
                variance,
            ]

    def _pool(self) -> dict[str, PooledRatio]:
        if self.average == "ema":
            return {
                name: PooledRatio(mean, math.sqrt(mean_variance) if variance > 0 else math.inf)
                for name, (mean, mean_variance, variance) in self.moving.items()
            }
        groups: dict[str, list[list[float]]] = {}
        for refresh in self.refreshes:
            for name, values in refresh.items():
                groups.setdefault(name, []).append(values)
        pooled = {}
        for name, lists in groups.items():
            values = [v for group in lists for v in group]
            # Eq. 10 per batch averaged over the batches, summed in the order of the
            # plain estimate (so that one refresh gives exactly its value)
            mean = sum(values) / len(values)
            dof = sum(len(group) - 1 for group in lists)
            if dof > 0:  # pooled within-refresh variance of one ratio
                variance = sum((len(g) - 1) * _mean_and_variance(g)[1] for g in lists) / dof
            else:
                dof = len(values) - 1
                variance = _mean_and_variance(values)[1]
            error = math.sqrt(variance / len(values)) if dof > 0 else math.inf
            pooled[name] = PooledRatio(mean, error)
        return pooled

    def state_dict(self) -> dict[str, Any]:
        return {
            "refreshes": [{k: list(v) for k, v in r.items()} for r in self.refreshes],
            "moving": {k: list(v) for k, v in self.moving.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.refreshes = [{k: list(v) for k, v in r.items()} for r in state["refreshes"]]
        self.moving = {k: list(v) for k, v in state["moving"].items()}
        self.pooled = self._pool()


def _mean_and_variance(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _representative(grad: Tensor, kind: Representative) -> Tensor:
    # Paper Table 4: G = 3σ (default), max |g| or mean |g| over the site's tensor.
    if kind == "std":
        return 3 * grad.std() if grad.numel() > 1 else grad.abs().sum() * 0
    if kind == "max":
        return grad.abs().max()
    return grad.abs().mean()


def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


@dataclass
class TraceEstimate:
    """One point's Hutchinson estimate so far: Welford's running mean and variance of
    its probe values (``count`` of them)."""

    count: int = 0
    mean: float = 0.0
    squares: float = 0.0  # sum of squared deviations from the mean
    done: bool = False

    def add(self, value: float, stop: Stop, tol: float) -> None:
        previous = self.mean
        self.count += 1
        self.mean += (value - previous) / self.count
        self.squares += (value - previous) * (value - self.mean)
        if self.count < 2 or tol == 0:  # tol 0: no early stop
            return
        if stop == "change":
            self.done = _converged(previous, self.mean, tol)
        else:
            self.done = self.standard_error() <= tol * abs(self.mean)

    def standard_error(self) -> float:
        """The standard error of ``mean`` (inf with fewer than two probes)."""
        if self.count < 2:
            return math.inf
        return math.sqrt(self.squares / (self.count - 1) / self.count)


def _converged(previous: float, current: float, tol: float) -> bool:
    # The paper's code divides by the signed running trace and so stops early whenever
    # it is negative; we compare magnitudes.
    return abs(current - previous) <= tol * (abs(previous) + 1e-6)


@torch.no_grad()
def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _restore(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    for key, value in model.state_dict(keep_vars=True).items():
        value.copy_(state[key])


def probe_groups(probe: Probe, names: list[str]) -> list[list[int]]:
    """The indices of ``names`` that share a Hessian-vector product under ``probe``
    (``kind`` tells weight sites, named ``*.weight``, from activation sites)."""
    if probe == "site":
        return [[i] for i in range(len(names))]
    if probe in ("all", "scaled"):
        return [list(range(len(names)))]
    weights = [i for i, name in enumerate(names) if site_kind(name) == "weight"]
    others = [i for i in range(len(names)) if i not in weights]
    return [group for group in (weights, others) if group]


def hutchinson_traces(
    loss: Tensor, points: list[Tensor], **probing: Any
) -> tuple[list[float], list[Tensor]]:
    """``hutchinson_estimates`` with the traces as numbers (their means)."""
    estimates, grads = hutchinson_estimates(loss, points, **probing)
    return [e.mean for e in estimates], grads


def hutchinson_estimates(
    loss: Tensor,
    points: list[Tensor],
    *,
    groups: list[list[int]] | None = None,
    scales: list[float] | None = None,
    samples: int = 50,
    per_product: int = 1,
    stop: Stop = "change",
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[list[TraceEstimate], list[Tensor]]:
    """Estimate ``Tr(H_ii)`` of ``loss`` for each tensor in ``points`` (diagonal blocks
    of the Hessian) with Rademacher probes ``v_iᵀ(Hv)_i``; returns the estimates and the
    gradients ``dloss/dpoint`` (detached).

    ``groups`` (default: each point alone) lists the points probed together: one
    product ``Hv`` with an independent vector on each point of the group. For i ≠ j the
    cross term ``v_iᵀ H_ij v_j`` has expectation 0, so every grouping estimates the
    same traces. ``scales``: point i's vector is ``scales[i]·v_i`` and its value
    ``v_iᵀ(Hu)_i / scales[i]``, which keeps the expectation and weighs the cross term
    from point j by ``scales[j] / scales[i]``. ``per_product`` probes share one batched
    product."""
    grads = torch.autograd.grad(loss, points, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, points)]
    groups = [[i] for i in range(len(points))] if groups is None else groups
    running = [TraceEstimate(done=not g.requires_grad) for g in grads]
    while True:
        todo = [[i for i in group if not running[i].done] for group in groups]
        todo = [group for group in todo if group]
        if not todo:
            break
        for group in todo:
            count = min(per_product, samples - running[group[0]].count)
            batched = count > 1
            shape = (count,) if batched else ()
            probes = [_rademacher(shape + points[i].shape, points[i], generator) for i in group]
            if scales is not None:
                probes = [v * scales[i] for i, v in zip(group, probes)]
            products = torch.autograd.grad(
                [grads[i] for i in group],
                [points[i] for i in group],
                grad_outputs=probes,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
            for i, v, hv in zip(group, probes, products):
                scale2 = 1.0 if scales is None else scales[i] ** 2
                values = (
                    [0.0] * count if hv is None else (v * hv).reshape(count, -1).sum(1) / scale2
                )
                for value in values:
                    running[i].add(float(value), stop, tol)
                if running[i].count >= samples:
                    running[i].done = True
    return running, [g.detach() for g in grads]


def estimate_hessian_deltas(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    representative: Representative = "std",
    **probing: Any,
) -> dict[str, float]:
    """δ for every round site of ``model`` (paper Eq. 8-10), averaged over ``batches``.

    ``loss_fn(model, batch)`` runs the forward pass and returns the task loss. The
    Hessian is taken against each site's discrete values ``x_q`` as a fraction of the
    range (the unit of ``RoundContext.error``), using the graph of a normal training
    forward. The model keeps its mode (the paper estimates in train mode); its
    parameters, buffers and gradients and the global RNG state are left as they were.
    Under ``torch.distributed`` the traces and G are averaged across ranks.
    ``probing``: the keywords of ``curvature_ratios`` (``probe``, ``samples``, ...).
    """
    ratios = curvature_ratios(model, batches, loss_fn, representative=representative, **probing)
    # Eq. 10 per batch, averaged over batches, then max(0, ·).
    return {name: max(0.0, sum(r for r, _ in rs) / len(rs)) for name, rs in ratios.items()}


def curvature_ratios(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    probe: Probe = DEFAULT_PROBE,
    samples: int = DEFAULT_SAMPLES,
    per_product: int = 1,
    stop: Stop = "change",
    tol: float = 1e-3,
    sub_batch: int | None = None,
    representative: Representative = "std",
    generator: torch.Generator | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """Per site (sorted by name), per batch: the signed ``(Tr(H)/N) / G`` (Eq. 10
    before its ``max(0, ·)``) and its standard error over the probes, with the
    side-effect guarantees of ``estimate_hessian_deltas``. ``sub_batch``: use the first
    ``sub_batch`` samples of each batch (a tuple of tensors, samples along dim 0)."""
    sites = round_sites(model)
    state = _snapshot(model)
    ratios: dict[str, list[float]] = {}
    cuda_devices = sorted({t.device.index or 0 for t in state.values() if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
            for batch in batches:
                if sub_batch is not None:
                    batch = tuple(part[:sub_batch] for part in batch)
                per_site = _curvature_and_representative(
                    model,
                    sites,
                    batch,
                    loss_fn,
                    representative,
                    probe=probe,
                    samples=samples,
                    per_product=per_product,
                    stop=stop,
                    tol=tol,
                    generator=generator,
                )
                for name, (curvature, error, g) in _average_across_ranks(per_site).items():
                    ratio = curvature / g if g > 0 else 0.0
                    ratio_error = error / g if g > 0 else 0.0
                    ratios.setdefault(name, []).append(
                        (ratio if math.isfinite(ratio) else 0.0, ratio_error)
                    )
    finally:
        for site in sites.values():
            site.capture = None
        _restore(model, state)
    return dict(sorted(ratios.items()))


def _average_across_ranks(
    per_site: dict[str, tuple[float, ...]],
) -> dict[str, tuple[float, ...]]:
    if not (dist.is_available() and dist.is_initialized()) or not per_site:
        return per_site
    names = sorted(per_site)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    values = torch.tensor([per_site[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values = (values / dist.get_world_size()).cpu().tolist()
    return {name: tuple(row) for name, row in zip(names, values)}


def _curvature_and_representative(
    model: nn.Module,
    sites: dict[str, RoundSite],
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    representative: Representative,
    *,
    probe: Probe,
    **hutchinson: Any,
) -> dict[str, tuple[float, float, float]]:
    """Per site: (Tr(H)/N, its standard error, G) on one batch, in the
    fraction-of-range unit."""
    for site in sites.values():
        site.capture = []
    try:
        loss = loss_fn(model, batch)
        captured = {name: site.capture for name, site in sites.items() if site.capture}
    finally:
        for site in sites.values():
            site.capture = None
    # A site called more than once per forward (weight sharing) is probed on its last call.
    names = sorted(captured)
    points = [captured[n][-1][0] for n in names]
    if not points:
        return {}
    groups = probe_groups(probe, names)
    scales = [p.numel() ** -0.5 for p in points] if probe == "scaled" else None
    estimates, grads = hutchinson_estimates(
        loss, points, groups=groups, scales=scales, **hutchinson
    )
    result = {}
    for name, point, estimate, grad in zip(names, points, estimates, grads):
        steps = captured[name][-1][1]
        # The captured values are in level units; as a fraction of the range they are
        # x_q = level / steps, so Tr(H)/N scales by steps² and G by steps.
        per_element = steps**2 / point.numel()
        result[name] = (
            estimate.mean * per_element,
            estimate.standard_error() * per_element,
            float(_representative(grad, representative)) * steps,
        )
    return result
