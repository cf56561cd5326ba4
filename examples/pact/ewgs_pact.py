"""PACT: Parameterized Clipping Activation (Choi et al. 2018), an ewgs-plugins method.

Activations (the paper's Eq. 1-3), with a learned clip ``α`` per quantizer::

    y   = clip(x, 0, α)                     # PACT(x) = ½(|x| − |x − α| + α)
    y_q = round(y · n / α) · α / n,   n = 2^b − 1

Gradients, with the quantizer's round treated as the identity (the paper's STE)::

    ∂y_q/∂x = 1 if 0 ≤ x ≤ α else 0
    ∂y_q/∂α = 1 if x ≥ α      else 0

So α learns only from the clipped elements; the scale ``α / n`` of the levels carries no
gradient (as in the paper's derivation and in MQBench's and Distiller's PACT). Here the
latent ``x · n / α`` is rounded in the round site with the clip bounds ``[0, n]``, so the
backward rule (STE or EWGS) shapes ``∂y_q/∂x`` and never ``∂y_q/∂α``. (At ``x = α`` exactly
both gradients pass: the round site keeps its bounds inside, as ``torch.clamp`` did when
the paper's code ran; the paper's text puts ``x = α`` in the clipped branch only.)

α starts at ``alpha_init`` (10, the paper's value), not from the data. The paper
regularises α with an L2 term ``λ_α · α² / 2``: under PACT the α's are the only
quantizer parameters, so the recipe's ``optimizers.quantizer.weight_decay`` is exactly
``λ_α`` (a coupled weight decay adds ``λ · α`` to α's gradient, the gradient of that
term). Without it, an α above every activation gets no gradient at all.

Weights are DoReFa's (the paper quantizes weights with DoReFa): the quantizer is
imported from the core package's ``ewgs_plugins.methods.dorefa``, as any third party would reuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewgs_plugins import Quantizer, QuantizerMethod, hookimpl
from ewgs_plugins.methods.dorefa import PER_CHANNEL_REFUSAL, DorefaWeightQuantizer
from ewgs_plugins.quant import check_granularity

#: The paper's initial clip value.
PAPER_ALPHA_INIT = 10.0


class PactActivationQuantizer(Quantizer):
    """``round(clip(x, 0, α) · n / α) · α / n`` with a learned scalar ``α`` (``self.alpha``)."""

    def __init__(self, bits: int, alpha_init: float = PAPER_ALPHA_INIT) -> None:
        super().__init__(bits)
        if not alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0, got {alpha_init}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def quantize(self, x: Tensor) -> Tensor:
        steps = 2**self.bits - 1
        alpha = self.alpha
        # The levels' scale α/n is a constant to the backward (paper Eq. 3): detached.
        clip = alpha.detach()
        levels = self.round_site(x * (steps / clip), steps, 0.0, float(steps))
        # Clipped elements output α itself, through which α gets its gradient 1 (Eq. 3).
        return torch.where(x >= clip, alpha, levels * (clip / steps))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}"


class PactMethod(QuantizerMethod):
    """PACT activations (learned clip α, initialised to ``alpha_init``) and DoReFa weights.
    The first and last layers stay full precision unless the recipe says otherwise.
    ``granularity``: ``per_tensor`` only (the weights are DoReFa's, which have none)."""

    name = "pact"

    def __init__(
        self, alpha_init: float = PAPER_ALPHA_INIT, granularity: str = "per_tensor"
    ) -> None:
        if not alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0, got {alpha_init}")
        check_granularity(granularity, self.name, "weights are DoReFa's: " + PER_CHANNEL_REFUSAL)
        self.alpha_init = alpha_init

    def weight_quantizer(self, bits: int) -> Quantizer:
        return DorefaWeightQuantizer(bits)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return PactActivationQuantizer(bits, self.alpha_init)


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"pact": PactMethod}
