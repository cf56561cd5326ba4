"""DoReFa-Net (Zhou et al. 2016) as its official code (tensorpack ``dorefa.py``) does it.

``q(x) = round((2^k - 1) x) / (2^k - 1)`` on ``[0, 1]``, where the round is the round site.

- Weights: ``w_n = tanh(w) / (2 max|tanh(w)|) + 1/2`` on ``[0, 1]``, output
  ``2 q(w_n) - 1`` in ``[-1, 1]``; no rescaling, and the gradient flows through the
  max (no stop-gradient), as in the official code.
- Activations: ``q(clip(x, 0, 1))``; the clip is fused into the round site (clip bounds
  ``0..steps`` on the latent ``x · steps``). Inputs outside ``[0, 1]`` are clipped, as
  DoReFa's ``clip`` replaces ReLU: negative inputs (MobileNet-V2's linear bottlenecks)
  become 0 and ReLU6 outputs above 1 become 1.

1-bit weights use the same formula: ``w_n`` is rounded on ``[0, 1]`` to {0, 1} and
mapped to ±1, so the latent is bounded and EWGS applies at 1 bit like at any other
bit-width. The original paper's 1-bit case is instead ``sign(w) · E|w|`` with a
straight-through sign, whose latent ``w / E|w|`` is unbounded; it is not offered.

DoReFa has no learned quantizer parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ewgs_plugins.hookspecs import hookimpl
from ewgs_plugins.quant import (
    Granularity,
    IntegerMap,
    Quantizer,
    QuantizerMethod,
    check_granularity,
)
from ewgs_plugins.round_site import level_values

#: Guards the normalisation of an all-zero weight tensor (max|tanh(w)| = 0).
MIN_MAX = 1e-12


#: Why the weights have no per-channel form
PER_CHANNEL_REFUSAL = (
    "its quantized weights are unitless levels in [-1, 1] (tanh(w) / max|tanh(w)|, with no "
    "scale to learn or keep), so a per-channel max would stretch every channel to the same "
    "range"
)


class DorefaWeightQuantizer(Quantizer):
    """``2 q(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``."""

    def quantize(self, x: Tensor) -> Tensor:
        steps = 2**self.bits - 1
        t = torch.tanh(x)
        # w_n · steps = t · steps / (2 max|t|) + steps / 2, in [0, steps] by construction;
        # the site gets its affine form and keeps t, which tanh keeps for its own gradient.
        scale = steps / (2.0 * t.abs().max().clamp_min(MIN_MAX))
        out_scale, out_shift = self._values()
        return self.round_site(
            t, steps, scale=scale, shift=steps / 2.0, out_scale=out_scale, out_shift=out_shift
        )

    def _values(self) -> tuple[float, float]:
        """The levels' values ``2 · levels / steps − 1`` as the site's output affine."""
        return 2.0 / (2**self.bits - 1), -1.0

    def integer_map(self) -> IntegerMap:
        """Codes ``k = 0 .. steps``, values ``2 (k / steps) − 1``: scale ``2 / steps``,
        zero point ``steps / 2`` (a half-integer: no level at 0)."""
        steps = 2**self.bits - 1
        return IntegerMap(torch.tensor(2.0 / steps), torch.tensor(steps / 2.0), 0, steps)

    def dequantize(self, codes: Tensor) -> Tensor:
        return level_values(codes.to(torch.float32), *self._values())  # the forward's


class DorefaActivationQuantizer(Quantizer):
    """``q(clip(x, 0, 1))``."""

    def quantize(self, x: Tensor) -> Tensor:
        steps = 2**self.bits - 1
        return self.round_site(x, steps, 0.0, float(steps), scale=float(steps), out_scale=1 / steps)

    def integer_map(self) -> IntegerMap:
        """Codes ``k = 0 .. steps``, values ``k / steps``."""
        steps = 2**self.bits - 1
        return IntegerMap(torch.tensor(1.0 / steps), torch.tensor(0.0), 0, steps)


class DorefaMethod(QuantizerMethod):
    """DoReFa-Net, official-code formulas. ``granularity``: ``per_tensor`` only (see
    ``PER_CHANNEL_REFUSAL``)."""

    name = "dorefa"

    def __init__(self, granularity: Granularity = "per_tensor") -> None:
        check_granularity(granularity, self.name, PER_CHANNEL_REFUSAL)

    def weight_quantizer(self, bits: int) -> Quantizer:
        return DorefaWeightQuantizer(bits)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return DorefaActivationQuantizer(bits)


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"dorefa": DorefaMethod}
