"""The round site: the one place where a quantizer rounds.

A method computes its latent in *level units* (the levels are the integers and its
range spans ``steps`` of them) and calls ``self.round_site(z, steps)``, optionally
with the clip bounds of its range (``low``/``high``, in level units). The forward
is exactly ``torch.round(torch.clamp(z, low, high))``; the backward hands the
incoming gradient to the attached backward rule, then applies the clip's gradient
(zero outside ``[low, high]``, bounds included as inside).

The clip is fused into the site so that EWGS and STE save the same single tensor
(the unclipped latent, which a separate ``torch.clamp`` would save anyway): EWGS
recomputes its discretization error from it and costs no activation memory over STE.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .backward import BackwardRule, RoundContext, StraightThrough

#: ``observer(latent, rounded, steps, low, high)``: see ``RoundSite.observer``
RoundObserver = Callable[[Tensor, Tensor, int, float | None, float | None], None]

_OPEN_BOUNDS: dict[tuple[float, float, torch.dtype], tuple[float, float]] = {}


@torch.compiler.assume_constant_result  # a pure function of constants: no graph break
def _open_bounds(low: float, high: float, dtype: torch.dtype) -> tuple[float, float]:
    """The neighbours of ``low`` (below) and ``high`` (above) in ``dtype`` (memoised)."""
    key = (low, high, dtype)
    if key not in _OPEN_BOUNDS:
        inf = torch.tensor(math.inf, dtype=dtype)
        below = torch.nextafter(torch.tensor(low, dtype=dtype), -inf)
        above = torch.nextafter(torch.tensor(high, dtype=dtype), inf)
        _OPEN_BOUNDS[key] = (below.item(), above.item())
    return _OPEN_BOUNDS[key]


def _inside_bounds_gradient(grad: Tensor, latent: Tensor, low: float, high: float) -> Tensor:
    """``grad`` where ``low <= latent <= high``, else 0: the clip's gradient, bounds
    inside, in one fused differentiable op. ``hardtanh_backward`` keeps the gradient
    strictly between its bounds, so it gets the neighbours of ``low``/``high`` in the
    latent's dtype: ``latent > nextafter(low, -inf)`` is ``latent >= low`` exactly.
    (A bool mask and ``torch.where`` take several passes and are ~20x slower on CPU.)
    A NaN latent keeps its gradient (its forward value is NaN anyway)."""
    below, above = _open_bounds(low, high, latent.dtype)
    return torch.ops.aten.hardtanh_backward(grad, latent, below, above)


class _RoundFunction(torch.autograd.Function):
    # Not once_differentiable: the backward is made of differentiable ops so that
    # second derivatives (the Hessian δ estimate) flow through it.
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        latent: Tensor,
        delta: Tensor,
        steps: int,
        low: float | None,
        high: float | None,
        rule: BackwardRule,
        delta_value: float | None,
    ) -> Tensor:
        if rule.needs_latent or low is not None:
            ctx.save_for_backward(latent, delta)
        else:
            ctx.save_for_backward(delta)
        ctx.steps, ctx.low, ctx.high, ctx.rule = steps, low, high, rule
        ctx.delta_value = delta_value
        if low is None:
            return torch.round(latent)
        # round(clamp(z)); rounding the fresh clamped tensor in place saves a buffer.
        return torch.clamp(latent, low, high).round_()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        latent, delta = (saved[0], saved[1]) if len(saved) == 2 else (None, saved[0])
        context = RoundContext(latent, ctx.steps, delta, ctx.delta_value)
        grad_latent = ctx.rule.latent_gradient(grad, context)
        if ctx.low is not None:
            grad_latent = _inside_bounds_gradient(grad_latent, latent, ctx.low, ctx.high)
        return grad_latent, None, None, None, None, None, None


class RoundSite(nn.Module):
    """Where a quantizer rounds. Holds the backward rule and its δ (a buffer, so it
    is checkpointed and moves with the model).

    While ``capture`` is a list, each call appends ``(rounded, steps)``: the
    discrete values as non-leaf tensors of the training graph, which the Hessian δ
    estimator differentiates against.

    While ``observer`` is set, each call also hands it ``(latent, rounded, steps, low,
    high)`` to read (never to change): how a callback sees the latent in level units
    and the clip bounds of any method (``ewgs_plugins.mechanism``). Unset (None), it
    costs nothing.
    """

    def __init__(self, rule: BackwardRule | None = None, delta: float = 0.0) -> None:
        super().__init__()
        self.rule: BackwardRule = rule if rule is not None else StraightThrough()
        self.register_buffer("delta", torch.tensor(0.0))
        #: Python mirror of the ``delta`` buffer (the backward reads it without a device
        #: synchronisation); ``set_delta`` and ``load_state_dict`` keep the two equal.
        self._delta_value = 0.0
        self.set_delta(delta)
        self.capture: list[tuple[Tensor, int]] | None = None
        self.observer: RoundObserver | None = None
        self.last_steps: int | None = None

    def set_delta(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0:  # also refuses NaN
            raise ValueError(f"δ must be >= 0, got {value}")
        self.delta.fill_(value)
        # The value as the buffer holds it (float32), computed on the CPU: the buffer may
        # be on any device, ``meta`` included.
        self._delta_value = float(torch.tensor(value, dtype=self.delta.dtype, device="cpu"))

    def set_rule(self, rule: BackwardRule) -> None:
        self.rule = rule

    def forward(
        self, latent: Tensor, steps: int, low: float | None = None, high: float | None = None
    ) -> Tensor:
        if (low is None) != (high is None):
            raise ValueError("give both clip bounds (low and high) or neither")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if latent.dtype in (torch.float16, torch.bfloat16):
            latent = latent.float()  # the round site computes in float32 under AMP
        self.last_steps = steps
        # Compiled, δ reaches the backward as the tensor only (see RoundContext).
        delta_value = None if torch.compiler.is_compiling() else self._delta_value
        rounded = _RoundFunction.apply(latent, self.delta, steps, low, high, self.rule, delta_value)
        if self.capture is not None:
            if not rounded.requires_grad:
                # Nothing upstream needs a gradient (a constant input): make the
                # discrete values a leaf so the Hessian can still be taken against them.
                rounded = rounded.detach().requires_grad_()
            self.capture.append((rounded, steps))
        if self.observer is not None:
            self.observer(latent, rounded, steps, low, high)
        return rounded

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.delta.is_meta:
            self._delta_value = float(self.delta)

    def extra_repr(self) -> str:
        return f"rule={self.rule.name}, delta={self._delta_value:.3g}"


def site_name(module_name: str) -> str:
    """Short name of a site: ``conv1.weight_quantizer.round_site`` -> ``conv1.weight``."""
    name = module_name.removesuffix("round_site").removesuffix(".")
    return name.removesuffix("_quantizer")


def round_sites(model: nn.Module) -> dict[str, RoundSite]:
    """Every round site of ``model`` by short name (``layer1.0.conv1.weight``,
    ``layer1.0.conv1.input``), in forward-definition order."""
    return {site_name(n): m for n, m in model.named_modules() if isinstance(m, RoundSite)}
