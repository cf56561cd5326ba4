"""The round site: the one place where a quantizer rounds.

A method computes its latent in *level units* (the levels are the integers and its
range spans ``steps`` of them) and calls ``self.round_site(z, steps)``, optionally
with the clip bounds of its range (``low``/``high``, in level units), or hands over
the latent's affine form ``z = x · scale + shift`` (``round_site(x, steps, low,
high, scale=s, shift=b)``), and optionally the levels' values ``levels · out_scale +
out_shift`` (``out_scale=``, ``out_shift=``). The forward is exactly
``torch.round(torch.clamp(z, low, high))`` and then that output affine; the backward
takes the output affine's gradient, hands the levels' gradient to the attached backward
rule, then applies the clip's gradient (zero outside ``[low, high]``, bounds included as
inside) and the affine's (to ``x``, ``scale`` and ``shift``).

The clip and both affines are fused into the site so that EWGS and STE save the same
tensor, ``x`` (which the op before the quantizer keeps anyway: a ReLU its output,
tanh its output, a weight itself); both recompute the latent from it, EWGS its
discretization error too, so EWGS costs no activation memory over STE. For the
built-in rules, forward and backward each run as one fused kernel (``fused``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import fused
from .backward import BackwardRule, ElementWiseGradientScaling, RoundContext, StraightThrough

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


def affine_latent(x: Tensor, scale: float | Tensor | None, shift: float | Tensor | None) -> Tensor:
    """``x · scale + shift`` (either may be absent), the plain form of the site's affine."""
    latent = x if scale is None else x * scale
    return latent if shift is None else latent + shift


def level_values(
    levels: Tensor, out_scale: float | Tensor | None, out_shift: float | Tensor | None
) -> Tensor:
    """``levels · out_scale + out_shift`` (either may be absent): the values of the
    levels, the plain form of the site's output affine."""
    values = levels if out_scale is None else levels * out_scale
    return values if out_shift is None else values + out_shift


def _fused_backward_kind(rule: BackwardRule, delta_value: float | None) -> str | None:
    """The fused backward for ``rule`` (exactly a built-in rule, δ known as a number):
    "ste" (EWGS at δ = 0 too, so it stays STE bit for bit), "ewgs", or None."""
    if type(rule) is StraightThrough:
        return "ste"
    if type(rule) is ElementWiseGradientScaling and delta_value is not None:
        return "ste" if delta_value == 0.0 else "ewgs"
    return None


#: The kernels' affine arguments in order, each with the value standing in for its absence
_AFFINE_SLOTS = (("scale", 1.0), ("shift", -0.0), ("out_scale", 1.0), ("out_shift", -0.0))


def _fused_scalars(x: Tensor, *affine: float | Tensor | None) -> tuple[Tensor, ...]:
    """The kernels' ``scale``, ``shift``, ``out_scale``, ``out_shift`` (as many as given,
    in that order): 0-d tensors; an absent scale is 1 and an absent shift -0.0, which leave
    every value as it is (v · 1 = v and v + (-0.0) = v, -0.0 included)."""
    return tuple(
        fused.constant(absent if value is None else value, x, slot)
        for (slot, absent), value in zip(_AFFINE_SLOTS, affine)
    )


class _RoundFunction(torch.autograd.Function):
    # Not once_differentiable: the general backward is made of differentiable ops so
    # that second derivatives (the Hessian δ estimate) flow through it.
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        scale: float | Tensor | None,
        shift: float | Tensor | None,
        out_scale: float | Tensor | None,
        out_shift: float | Tensor | None,
        delta: Tensor,
        steps: int,
        low: float | None,
        high: float | None,
        rule: BackwardRule,
        delta_value: float | None,
    ) -> Tensor:
        affine = (scale, shift, out_scale, out_shift)
        tensors = [value if isinstance(value, Tensor) else None for value in affine]
        # Neither the latent nor the levels are saved: the backward recomputes them from
        # x, which the op before the quantizer (a ReLU, tanh, the weight itself) keeps.
        keep_x = (
            rule.needs_latent
            or low is not None
            or tensors[0] is not None  # the gradient of scale
            or tensors[2] is not None  # the gradient of out_scale
        )
        ctx.save_for_backward(x if keep_x else None, delta, *tensors)
        ctx.numbers = [None if isinstance(value, Tensor) else value for value in affine]
        ctx.steps, ctx.low, ctx.high, ctx.rule = steps, low, high, rule
        ctx.delta_value = delta_value
        if fused.applies(x, *affine):
            args = (fused.flat(x), *_fused_scalars(x, *affine))
            if low is None:
                return fused.run("forward_free", *args).view_as(x)
            bounds = fused.constant(low, x, "low"), fused.constant(high, x, "high")
            return fused.run("forward_clipped", *args, *bounds).view_as(x)
        latent = affine_latent(x, scale, shift)
        if low is None:
            return level_values(torch.round(latent), out_scale, out_shift)
        # round(clamp(z)); rounding the fresh clamped tensor in place saves a buffer.
        return level_values(torch.clamp(latent, low, high).round_(), out_scale, out_shift)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, delta, *tensors = ctx.saved_tensors
        affine = [t if t is not None else n for t, n in zip(tensors, ctx.numbers)]
        scale, shift, out_scale, out_shift = affine
        needs = ctx.needs_input_grad[:5]  # x, scale, shift, out_scale, out_shift
        kind = _fused_backward_kind(ctx.rule, ctx.delta_value)
        if (
            kind is not None
            and any(needs)
            and x is not None
            and not torch.is_grad_enabled()  # create_graph: the differentiable path
            and grad.dtype == x.dtype
            and fused.applies(x, *affine)
        ):
            flat_grad = fused.flat(grad.contiguous())  # (an expanded gradient, of a sum, say)
            scalars = _fused_scalars(x, scale, shift, out_scale)  # out_shift: not needed
            args: tuple = (flat_grad, fused.flat(x), *scalars)
            if kind == "ewgs":
                args += (fused.constant(-ctx.delta_value / ctx.steps, x, "factor"),)  # -δ/steps
            if ctx.low is not None:
                below, above = _open_bounds(ctx.low, ctx.high, x.dtype)
                bounds = {"below": below, "above": above, "low": ctx.low, "high": ctx.high}
                args += tuple(fused.constant(b, x, slot) for slot, b in bounds.items())
            suffix = "_free" if ctx.low is None else "_clipped"
            computed = iter(fused.run(kind + suffix, *args, wanted=tuple(needs)))
            grads = [next(computed) if need else None for need in needs]
            if grads[0] is not None:
                grads[0] = grads[0].view_as(x)
            return (*grads,) + (None,) * 6
        return _general_backward(ctx, grad, x, delta, tensors, affine)


def _general_backward(
    ctx: torch.autograd.function.FunctionCtx,
    grad: Tensor,
    x: Tensor | None,
    delta: Tensor,
    tensors: list[Tensor | None],
    affine: list[float | Tensor | None],
) -> tuple[Tensor | None, ...]:
    """The site's backward in differentiable plain ops: the output affine's gradient,
    the rule's ``latent_gradient``, the clip's gradient, the input affine's gradients."""
    scale, shift, out_scale, out_shift = affine
    needs_x, needs_scale, needs_shift, needs_out_scale, needs_out_shift = ctx.needs_input_grad[:5]
    clipped = ctx.low is not None
    grad_levels = grad if out_scale is None else grad * out_scale
    latent = (
        affine_latent(x, scale, shift)
        if ctx.rule.needs_latent or clipped or needs_out_scale
        else None
    )
    context = RoundContext(latent, ctx.steps, delta, ctx.delta_value)
    grad_latent = ctx.rule.latent_gradient(grad_levels, context)
    if clipped:
        grad_latent = _inside_bounds_gradient(grad_latent, latent, ctx.low, ctx.high)
    grads: list[Tensor | None] = [None] * 5
    if needs_x:
        grad_x = grad_latent if scale is None else grad_latent * scale
        grads[0] = grad_x.sum_to_size(x.shape) if x is not None else grad_x
    if needs_scale:
        grads[1] = (grad_latent * x).sum_to_size(tensors[0].shape)
    if needs_shift:
        grads[2] = grad_latent.sum_to_size(tensors[1].shape)
    if needs_out_scale:
        levels = torch.round(torch.clamp(latent, ctx.low, ctx.high) if clipped else latent)
        grads[3] = (grad * levels).sum_to_size(tensors[2].shape)
    if needs_out_shift:
        grads[4] = grad.sum_to_size(tensors[3].shape)
    return (*grads,) + (None,) * 6


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
        self,
        x: Tensor,
        steps: int,
        low: float | None = None,
        high: float | None = None,
        *,
        scale: float | Tensor | None = None,
        shift: float | Tensor | None = None,
        out_scale: float | Tensor | None = None,
        out_shift: float | Tensor | None = None,
    ) -> Tensor:
        """``round(clamp(x · scale + shift, low, high)) · out_scale + out_shift``: the
        latent is ``x`` itself without ``scale``/``shift``, and the levels are returned
        as they are without ``out_scale``/``out_shift``. A method that hands over the
        affine parts rather than the latent and the levels lets the site fuse them and
        keep only ``x``, which the op before the quantizer keeps anyway (the latent and
        the levels are recomputed in the backward)."""
        if (low is None) != (high is None):
            raise ValueError("give both clip bounds (low and high) or neither")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # the round site computes in float32 under AMP
        self.last_steps = steps
        # Compiled, δ reaches the backward as the tensor only (see RoundContext).
        delta_value = None if torch.compiler.is_compiling() else self._delta_value
        # Capture and observer read the levels themselves: the output affine then
        # follows as plain ops (the same arithmetic as the fused form's).
        split = self.capture is not None or self.observer is not None
        outputs = (None, None) if split else (out_scale, out_shift)
        rounded = _RoundFunction.apply(
            x, scale, shift, *outputs, self.delta, steps, low, high, self.rule, delta_value
        )
        if not split:
            return rounded
        if self.capture is not None:
            if not rounded.requires_grad:
                # Nothing upstream needs a gradient (a constant input): make the
                # discrete values a leaf so the Hessian can still be taken against them.
                rounded = rounded.detach().requires_grad_()
            self.capture.append((rounded, steps))
        if self.observer is not None:  # the latent it reads, computed for it alone
            self.observer(affine_latent(x, scale, shift).detach(), rounded, steps, low, high)
        return level_values(rounded, out_scale, out_shift)

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
