"""The EWGS paper's own quantizer (Lee, Kim & Ham, CVPR 2021, Sec. 3.1, Eq. 1-3).

Each quantizer learns a lower and an upper bound, ``l`` and ``u``:

    x_n = clip((x - l) / (u - l), 0, 1)              (Eq. 1)
    x_q = round((2^b - 1) x_n) / (2^b - 1)           (Eq. 2)
    weights: 2 (x_q - 1/2) in [-1, 1]; activations: x_q in [0, 1]   (Eq. 3)

The latent handed to the round site is ``(x - l) / (u - l) · steps`` with the clip
bounds ``0..steps`` (``steps = 2^b - 1``): the site clips and rounds, so ``l`` and ``u``
get gradient only from the elements inside the interval. The quantized tensors have
no unit: the layer multiplies its output by a learned ``|α|`` (``has_output_scale``),
initialised to ``E|o| / E|o_q|`` by the layer. 1-bit uses the same formula (levels
{0, 1}, weights ±1), as the paper's code does.

Initialisation on the first batch (the paper's code): weights ``l, u = ∓3σ(w)``;
activations ``u = 3σ(x) / sqrt(1 - 2/π)`` and ``l = 0``. The paper's code sets
``l = x.min()``, which is 0 for the post-ReLU inputs it quantizes; an input whose first
batch has negative values (MobileNet-V2's linear bottlenecks, say) gets
``l = min(0, x.min())`` so the interval covers it. σ is the unbiased standard
deviation (``torch.std``), as in the paper's code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewgs_plugins.hookspecs import hookimpl
from ewgs_plugins.quant import (
    Granularity,
    IntegerMap,
    Quantizer,
    QuantizerMethod,
    check_granularity,
)
from ewgs_plugins.round_site import level_values

#: Smallest interval width the initialisation gives (a constant first batch has σ = 0).
MIN_WIDTH = 1e-8
#: Why the weights have no per-channel form
PER_CHANNEL_REFUSAL = (
    "its quantized weights are unitless levels 2k/steps - 1 in [-1, 1] and the layer's one "
    "|α| carries their magnitude, so per-channel bounds l, u would stretch every channel "
    "to the same range"
)


class IntervalQuantizer(Quantizer):
    """Learned interval ``[lower, upper]`` quantized to ``2^bits`` levels (Eq. 1-3).

    ``signed_output`` (weights): the levels ``{0, .., steps} / steps`` map to
    ``[-1, 1]``; otherwise (activations) they stay on ``[0, 1]``."""

    def __init__(self, bits: int, signed_output: bool) -> None:
        super().__init__(bits)
        self.signed_output = signed_output
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(0.0))

    @property
    def steps(self) -> int:
        return 2**self.bits - 1

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if not self.enabled:
            return
        x = x.detach().float()
        sigma = float(x.std()) if x.numel() > 1 else 0.0
        if self.signed_output:  # weights: ∓3σ
            lower, upper = -3.0 * sigma, 3.0 * sigma
        else:  # activations: 3σ / sqrt(1 - 2/π) (the σ of a half-normal's parent)
            lower = min(0.0, float(x.min()))
            upper = 3.0 * sigma / math.sqrt(1.0 - 2.0 / math.pi)
        self.lower.fill_(lower)
        self.upper.fill_(max(upper, lower + MIN_WIDTH))

    def quantize(self, x: Tensor) -> Tensor:
        steps = self.steps
        # Eq. 1 in level units, (x - l) / (u - l) · steps, as x·s - l·s with the scalar
        # s = steps / (u - l), handed to the site as its affine part; Eq. 3's values,
        # levels / steps (weights: 2 · levels / steps - 1), as its output affine: one
        # fused pass over x, and only x (which the layer before keeps anyway) is saved.
        scale = steps / (self.upper - self.lower)
        out_scale, out_shift = self._values()
        return self.round_site(
            x,
            steps,
            0.0,
            float(steps),
            scale=scale,
            shift=-self.lower * scale,
            out_scale=out_scale,
            out_shift=out_shift,
        )

    def _values(self) -> tuple[float, float | None]:
        """The levels' values ``levels · out_scale + out_shift`` (Eq. 3: ``levels / steps``,
        weights ``2 · levels / steps − 1``); a multiply by the rounded ``1 / steps``, within
        one rounding of the division the paper's code does (exact at one bit)."""
        if self.signed_output:
            return 2.0 / self.steps, -1.0
        return 1.0 / self.steps, None

    def integer_map(self) -> IntegerMap:
        """Codes ``k = 0 .. steps``; activations ``k / steps``, weights
        ``2 (k / steps) − 1 = (2 / steps)(k − steps / 2)`` (a half-integer zero point: the
        ``2^b`` weight levels are symmetric about 0). The layer's ``|α|`` comes after."""
        steps = self.steps
        if self.signed_output:
            return IntegerMap(torch.tensor(2.0 / steps), torch.tensor(steps / 2.0), 0, steps)
        return IntegerMap(torch.tensor(1.0 / steps), torch.tensor(0.0), 0, steps)

    def dequantize(self, codes: Tensor) -> Tensor:
        return level_values(codes.to(torch.float32), *self._values())  # the forward's

    def extra_repr(self) -> str:
        kind = "weights" if self.signed_output else "activations"
        return f"bits={self.bits}, {kind}"


class IntervalMethod(QuantizerMethod):
    """The EWGS paper's quantizer: learned bounds ``l, u`` per quantizer and a learned
    output scale ``|α|`` per layer. ``granularity``: ``per_tensor`` only (see
    ``PER_CHANNEL_REFUSAL``)."""

    name = "interval"
    has_output_scale = True

    def __init__(self, granularity: Granularity = "per_tensor") -> None:
        check_granularity(granularity, self.name, PER_CHANNEL_REFUSAL)

    def weight_quantizer(self, bits: int) -> Quantizer:
        return IntervalQuantizer(bits, signed_output=True)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return IntervalQuantizer(bits, signed_output=False)


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"interval": IntervalMethod}
