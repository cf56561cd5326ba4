"""δ estimators: ``fixed`` and the paper's Hessian-adaptive one (Sec. 3.2, Eq. 8-10).

``estimate_hessian_deltas`` is usable on its own: give it a model, batches and a
loss function and it returns a δ for every round site, leaving the model's
parameters, buffers (BN running statistics) and every ``.grad`` untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .round_site import RoundSite, round_sites

Representative = Literal["std", "max", "mean"]
Schedule = Literal["epoch", "step"]


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

    def estimate(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
    ) -> dict[str, float] | None:
        return None

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
    and PROFIT)."""

    value: float = 1e-3
    name = "fixed"

    def __post_init__(self) -> None:
        if not self.value >= 0:
            raise ValueError(f"δ must be >= 0, got {self.value}")

    def initial(self) -> float:
        return self.value


@dataclass
class HessianDelta(DeltaEstimator):
    """δ = max(0, (Tr(H)/N) / G) per site, estimated every ``every`` epochs (or steps)
    on ``batches`` training batches with Hutchinson's method (up to ``samples``
    Rademacher probes, stopping when the running mean moves by less than ``tol``
    relative to its magnitude). G is ``3·std(g)`` (``std``), ``max|g|`` or ``mean|g|``.

    ``blockwise`` probes each site alone (the paper's code: one Hessian-vector
    product per site per probe); otherwise every site is probed at once with its own
    independent vector, which has the same expectation at a fraction of the cost.
    """

    every: int = 10
    unit: Schedule = "epoch"
    batches: int = 3
    samples: int = 50
    tol: float = 1e-3
    representative: Representative = "std"
    before_training: bool = False
    blockwise: bool = True
    initial_value: float = 0.0
    name = "hessian"

    def __post_init__(self) -> None:
        for field, value, minimum in (
            ("every", self.every, 0),
            ("batches", self.batches, 1),
            ("samples", self.samples, 1),
        ):
            if value < minimum:
                raise ValueError(f"{field} must be >= {minimum}, got {value}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if not self.initial_value >= 0:
            raise ValueError(f"initial_value (δ) must be >= 0, got {self.initial_value}")

    def initial(self) -> float:
        return self.initial_value

    def estimate(
        self, model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
    ) -> dict[str, float]:
        return estimate_hessian_deltas(
            model,
            batches,
            loss_fn,
            samples=self.samples,
            tol=self.tol,
            representative=self.representative,
            blockwise=self.blockwise,
        )


def _representative(grad: Tensor, kind: Representative) -> Tensor:
    # Paper Table 4: G = 3σ (default), max |g| or mean |g| over the site's tensor.
    if kind == "std":
        return 3 * grad.std() if grad.numel() > 1 else grad.abs().sum() * 0
    if kind == "max":
        return grad.abs().max()
    return grad.abs().mean()


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


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


def hutchinson_traces(
    loss: Tensor,
    points: list[Tensor],
    *,
    samples: int = 50,
    tol: float = 1e-3,
    blockwise: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[list[float], list[Tensor]]:
    """Estimate ``Tr(H_ii)`` of ``loss`` for each tensor in ``points`` (diagonal blocks
    of the Hessian) with Rademacher probes ``vᵀHv``; returns the traces and the
    gradients ``dloss/dpoint`` (detached)."""
    grads = torch.autograd.grad(loss, points, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, points)]
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    means = [0.0] * len(points)
    done = [i not in live for i in range(len(points))]
    for sample in range(1, samples + 1):
        active = [i for i in live if not done[i]]
        if not active:
            break
        groups = [[i] for i in active] if blockwise else [active]
        for group in groups:
            probes = [_rademacher(points[i], generator) for i in group]
            products = torch.autograd.grad(
                [grads[i] for i in group],
                [points[i] for i in group],
                grad_outputs=probes,
                retain_graph=True,
                allow_unused=True,
            )
            for i, v, hv in zip(group, probes, products):
                value = 0.0 if hv is None else float((v * hv).sum())
                previous = means[i]
                means[i] += (value - previous) / sample
                if sample > 1 and _converged(previous, means[i], tol):
                    done[i] = True
    return means, [g.detach() for g in grads]


def estimate_hessian_deltas(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    samples: int = 50,
    tol: float = 1e-3,
    representative: Representative = "std",
    blockwise: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """δ for every round site of ``model`` (paper Eq. 8-10), averaged over ``batches``.

    ``loss_fn(model, batch)`` runs the forward pass and returns the task loss. The
    Hessian is taken against each site's discrete values ``x_q`` as a fraction of the
    range (the unit of ``RoundContext.error``), using the graph of a normal training
    forward. The model keeps its mode (the paper estimates in train mode); its
    parameters, buffers and gradients and the global RNG state are left as they were.
    Under ``torch.distributed`` the traces and G are averaged across ranks.
    """
    sites = round_sites(model)
    state = _snapshot(model)
    ratios: dict[str, list[float]] = {}
    cuda_devices = sorted({t.device.index or 0 for t in state.values() if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
            for batch in batches:
                per_site = _curvature_and_representative(
                    model,
                    sites,
                    batch,
                    loss_fn,
                    representative,
                    samples=samples,
                    tol=tol,
                    blockwise=blockwise,
                    generator=generator,
                )
                for name, (curvature, g) in _average_across_ranks(per_site).items():
                    ratio = curvature / g if g > 0 else 0.0
                    ratios.setdefault(name, []).append(ratio if math.isfinite(ratio) else 0.0)
    finally:
        for site in sites.values():
            site.capture = None
        _restore(model, state)
    # Eq. 10 per batch, averaged over batches, then max(0, ·).
    return {name: max(0.0, sum(r) / len(r)) for name, r in sorted(ratios.items())}


def _average_across_ranks(
    per_site: dict[str, tuple[float, float]],
) -> dict[str, tuple[float, float]]:
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
    return {name: (row[0], row[1]) for name, row in zip(names, values)}


def _curvature_and_representative(
    model: nn.Module,
    sites: dict[str, RoundSite],
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    representative: Representative,
    **hutchinson: Any,
) -> dict[str, tuple[float, float]]:
    """Per site: (Tr(H)/N, G) on one batch, both in the fraction-of-range unit."""
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
    traces, grads = hutchinson_traces(loss, points, **hutchinson)
    result = {}
    for name, point, trace, grad in zip(names, points, traces, grads):
        steps = captured[name][-1][1]
        # The captured values are in level units; as a fraction of the range they are
        # x_q = level / steps, so Tr(H)/N scales by steps² and G by steps.
        curvature = trace / point.numel() * steps**2
        result[name] = (curvature, float(_representative(grad, representative)) * steps)
    return result
