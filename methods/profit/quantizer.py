"""PROFIT's DuQ quantizer (Park & Yoo, ECCV 2020), as PROFIT's code ``quant_op/duq.py``
does it: two learned scalars per quantizer, ``a`` (the clip, or input scale) and ``c``
(the output scale), both used through softplus.

- Weights, symmetric: ``hardtanh(w / softplus(a)) ∈ [-1, 1]`` on ``n = 2^(b-1) - 1``
  levels each side (``2^b - 1`` levels, ``steps = 2^b - 2``), output
  ``round(·) / n · softplus(c)``. The round-site latent is ``w / softplus(a) · n`` with
  the clip bounds ``-n..n`` (the hardtanh, fused into the site).
- Activations: ``hardtanh(x / softplus(a), 0, 1)`` on ``2^b`` levels
  (``steps = 2^b - 1``), output ``· softplus(c)``. An activation quantizer whose first
  batch has a negative value gets the symmetric form of the weights (PROFIT's ``Q_Sym``,
  which it puts at block inputs); the choice is a buffer (``signed``), checkpointed.
- 1 bit, symmetric: ``n = 2^0 - 1 = 0`` levels each side is degenerate (PROFIT's code
  divides by zero). Symmetric 1-bit quantizers are binary instead: the latent
  ``(hardtanh(w / softplus(a)) + 1) / 2`` on ``[0, 1]`` is rounded to {0, 1} and mapped
  to ``±softplus(c)`` (two levels).
- Init on one batch: weights ``a = c = softplus⁻¹(0.9 max|w|)``; activations
  ``a = c = softplus⁻¹(95th percentile of the positive inputs)``; symmetric activations
  use the 95th percentile of ``|x|`` (what PROFIT's code means for ``Q_Sym``; its
  ``isinstance`` test on the tensor instead of the module never takes that branch). A
  first batch without a positive value falls back to 1.

PROFIT quantizes every layer, the first conv and the classifier included (the raw image
input stays full precision); its training strategy (progressive freezing by AIWQ) is
the training callback ``profit``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewgs_plugins.quant import (
    Granularity,
    IntegerMap,
    Quantizer,
    QuantizerMethod,
    check_granularity,
)

from .._common import SignFromFirstBatch, percentile

#: Smallest softplus value the initialisation gives (softplus⁻¹(0) is -∞).
MIN_SCALE = 1e-6
#: Fraction of the largest |w| the weight clip starts at, and the activation percentile.
WEIGHT_INIT_FRACTION = 0.9
ACTIVATION_INIT_PERCENTILE = 95.0


def inverse_softplus(value: float) -> float:
    """``softplus⁻¹(v) = log(exp(v) - 1)``, computed stably for small and large ``v``."""
    value = max(float(value), MIN_SCALE)
    return value + math.log(-math.expm1(-value))


class ProfitQuantizer(SignFromFirstBatch):
    """DuQ: ``round(hardtanh(x / softplus(a))) · softplus(c)`` on the method's grid."""

    def __init__(self, bits: int, signed: bool | None) -> None:
        super().__init__(bits, signed)
        self.a = nn.Parameter(torch.tensor(0.0))
        self.c = nn.Parameter(torch.tensor(0.0))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if not self.enabled:
            return
        x = x.detach().float()
        if not self.sign_from_data:  # weights: 0.9 max|w|
            value = WEIGHT_INIT_FRACTION * float(x.abs().max())
        else:
            self.decide_sign(x)
            values = x.abs()[x != 0] if self.is_signed else x[x > 0]
            value = percentile(values, ACTIVATION_INIT_PERCENTILE) if values.numel() else 1.0
        self.a.fill_(inverse_softplus(value))
        self.c.fill_(inverse_softplus(value))

    def quantize(self, x: Tensor) -> Tensor:
        # The scalars (1/a, 1/n, c) are folded before they meet x: the site's affine
        # part on one side, its output affine on the other, e.g. round(x · (n / a)) ·
        # (c / n), both fused with the clip and round.
        a, c = F.softplus(self.a), F.softplus(self.c)
        if not self.is_signed:  # hardtanh(x/a, 0, 1) on 2^b levels
            steps = 2**self.bits - 1
            return self.round_site(
                x, steps, 0.0, float(steps), scale=steps / a, out_scale=c / steps
            )
        if self.bits == 1:  # binary: (hardtanh(x/a) + 1)/2 rounded to {0, 1}, then ±c
            return self.round_site(
                x, 1, 0.0, 1.0, scale=0.5 / a, shift=0.5, out_scale=2.0 * c, out_shift=-c
            )
        n = 2 ** (self.bits - 1) - 1  # hardtanh(x/a) on ±n levels, n = 2^(b-1) - 1
        return self.round_site(x, 2 * n, float(-n), float(n), scale=n / a, out_scale=c / n)

    @torch.no_grad()
    def integer_map(self) -> IntegerMap:
        """Unsigned: codes ``0 .. 2^b − 1``, scale ``c / (2^b − 1)``. Symmetric: codes
        ``−n .. n``, scale ``c / n``. Binary: codes {0, 1}, values ``±c``: scale ``2c``,
        zero point 1/2 (``2c · (k − 1/2)`` is ``k · 2c − c`` exactly)."""
        c = F.softplus(self.c)
        if not self.is_signed:
            steps = 2**self.bits - 1
            return IntegerMap(c / steps, torch.tensor(0.0), 0, steps)
        if self.bits == 1:
            return IntegerMap(2.0 * c, torch.tensor(0.5), 0, 1)
        n = 2 ** (self.bits - 1) - 1
        return IntegerMap(c / n, torch.tensor(0.0), -n, n)


class ProfitMethod(QuantizerMethod):
    """PROFIT's DuQ quantizer; every layer quantized; training strategy ``profit``.
    ``granularity``: ``per_tensor`` only (PROFIT's code has one ``a`` and ``c`` per
    quantizer; per-channel ones are not offered)."""

    name = "profit"
    quantize_first_last = True
    callbacks = ("profit",)

    def __init__(self, granularity: Granularity = "per_tensor") -> None:
        check_granularity(
            granularity,
            self.name,
            "PROFIT's code learns one a and one c per quantizer and this method keeps to it",
        )

    def weight_quantizer(self, bits: int) -> Quantizer:
        return ProfitQuantizer(bits, signed=True)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return ProfitQuantizer(bits, signed=None)
