"""Backward rules: how the gradient passes the round site.

A rule maps the gradient ``g_q`` arriving at the rounded value to the gradient
``g_n`` of the latent. It must use differentiable torch ops only (second
derivatives flow through it) and must not save anything itself: what it needs is
in the ``RoundContext`` the site hands it (the latent, recomputed error, steps, δ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class RoundContext:
    """What a backward rule may use: the saved latent (level units), the site's
    number of steps and its δ (a 0-d tensor)."""

    latent: Tensor | None
    steps: int
    delta: Tensor
    #: δ as a Python number (the same value as ``delta``), for rules that branch on it
    #: or pass it to a fused op without a device synchronisation; None under
    #: ``torch.compile``, where a Python number would be specialised (one recompile per
    #: δ) and rules use the tensor ``delta``.
    delta_value: float | None

    def error(self) -> Tensor:
        """Discretization error ``x_n - x_q`` as a fraction of the range
        (``(z - round(z)) / steps``, so ``|error| <= 1 / (2 steps)``).

        Outside the clip bounds this is the error of the unclipped latent; the site
        zeroes those gradients afterwards, so it never reaches the result."""
        if self.latent is None:
            raise RuntimeError("this backward rule did not ask for the latent (needs_latent)")
        return (self.latent - torch.round(self.latent)) / self.steps


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
