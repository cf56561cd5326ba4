"""Backward rules: how the gradient passes the round site.

A rule maps the gradient ``g_q`` arriving at the rounded value to the gradient
``g_n`` of the latent. It must use differentiable torch ops only (second
derivatives flow through it) and must not save anything itself: what it needs is
in the ``RoundContext`` (the latent, recomputed error, steps, δ).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .round_site import RoundContext


class BackwardRule:
    """Base class of backward rules. ``needs_latent`` asks the site to keep the latent."""

    name: ClassVar[str] = "?"
    needs_latent: ClassVar[bool] = False

    def latent_gradient(self, grad: Tensor, context: RoundContext) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StraightThrough(BackwardRule):
    """The straight-through estimator: ``g_n = g_q``."""

    name = "ste"

    def latent_gradient(self, grad: Tensor, context: RoundContext) -> Tensor:
        return grad


class ElementWiseGradientScaling(BackwardRule):
    """EWGS (Lee, Kim & Ham, CVPR 2021), Eq. 4:
    ``g_n = g_q * (1 + δ * sign(g_q) * (x_n - x_q))``, error as a fraction of the range.
    With δ = 0 the factor is exactly 1, so the gradient equals STE's bit for bit."""

    name = "ewgs"
    needs_latent = True

    def latent_gradient(self, grad: Tensor, context: RoundContext) -> Tensor:
        if context.delta_value == 0.0:
            return grad  # STE exactly (δ starts at 0 under the Hessian schedule)
        # Eq. 4 rearranged: g·(1 + δ·sign(g)·e) = g + δ·|g|·e with e = (z - round(z))/steps,
        # fused into one addcmul (four passes over the tensor instead of eight).
        latent = context.latent
        assert latent is not None  # needs_latent
        # round(z) - z in place on the fresh round(z) (one buffer fewer), hence -δ/steps.
        negative_error = torch.round(latent).sub_(latent)
        if context.delta_value is None:
            # Compiled: δ as the tensor (a Python number would recompile for every δ).
            # addcmul computes grad + (value·t1)·t2, so (|g|·(-δ/steps))·e here is bit for
            # bit what the eager call below computes.
            return torch.addcmul(
                grad, grad.abs() * (context.delta / -context.steps), negative_error
            )
        return torch.addcmul(
            grad, grad.abs(), negative_error, value=-context.delta_value / context.steps
        )
