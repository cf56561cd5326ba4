"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020).

    v̄ = round(clip(v / s, -Q_N, Q_P)),   v̂ = v̄ · s

The latent handed to the round site is ``v / s`` in level units (the integers), with
the clip bounds ``-Q_N..Q_P`` and ``steps = Q_N + Q_P``.

- Weights are signed: ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``.
- Activations are unsigned (``Q_N = 0``, ``Q_P = 2^b - 1``), except that an activation
  quantizer whose first batch has a negative value (MobileNet-V2's linear bottlenecks,
  say) becomes signed, with the weights' ``Q_N, Q_P``. The choice is a buffer
  (``signed``) and is checkpointed.
- ``s`` is initialised to ``2 E|v| / sqrt(Q_P)`` on the first batch.
- The gradient of ``s`` is scaled by ``g = 1 / sqrt(N · Q_P)`` (forward value unchanged).
  ``N`` is the number of weights of the layer for weights, and the number of features
  of one sample (``v.numel() / batch size``, the paper's N_F) for activations; some
  public ports use the whole batch's ``v.numel()``, which makes ``g`` depend on the
  batch size. ``grad_scale: false`` turns the scaling off (the paper's ablation).

1 bit, signed (weights, or signed activations): ``Q_P = 2^0 - 1 = 0`` leaves the grid
{-1, 0}·s, which is degenerate (the init divides by ``sqrt(Q_P) = 0``). Signed 1-bit
quantizers use the symmetric binary grid ``{-s/2, +s/2}`` instead: latent
``v / s + 1/2`` clipped to ``[0, 1]`` and rounded to {0, 1} (one step), output
``(v̄ - 1/2) · s``. ``s`` stays the distance between adjacent levels; the init and the
gradient scale use ``Q_P = 1``, so the levels start at ``±E|v|`` (the binary-weight
scale of BWN/XNOR-Net). Unsigned 1-bit activations are LSQ's own {0, s}.

``granularity: per_channel`` gives the weights one step per output channel ``c`` (the
weight's axis 0; 1 for a transposed convolution), as lsq-net's per-channel mode does:
``s_c`` starts at ``2 E|v_c| / sqrt(Q_P)`` (the mean over that channel's weights) and
its gradient is scaled by the same ``g = 1 / sqrt(N · Q_P)``, ``N`` all the layer's
weights. Activations keep one step per quantizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewgs_plugins.gradient_scale import scale_gradient
from ewgs_plugins.hookspecs import hookimpl
from ewgs_plugins.quant import (
    Granularity,
    IntegerMap,
    Quantizer,
    QuantizerMethod,
    check_granularity,
)

from ._common import SignFromFirstBatch

#: Smallest step the initialisation gives (a first batch of zeros has E|v| = 0).
MIN_STEP = 1e-8


class LsqQuantizer(SignFromFirstBatch):
    """A learned step ``s`` (``self.step``): a scalar, or per channel (``per_channel``,
    signed weights only) one per output channel, sized when the layer binds its weight
    (``bind_weight``) or else on the first ``initialize``."""

    def __init__(
        self, bits: int, signed: bool | None, grad_scale: bool = True, per_channel: bool = False
    ) -> None:
        super().__init__(bits, signed)
        if per_channel and signed is not True:
            raise ValueError("a per-channel LSQ step is for signed weights only")
        self.grad_scale = grad_scale
        self.per_channel = per_channel
        self.channel_axis = 0
        self.step = nn.Parameter(torch.tensor(1.0))

    def bind_weight(self, shape: torch.Size, channel_axis: int) -> None:
        if self.per_channel:
            self.channel_axis = channel_axis
            self.step = nn.Parameter(torch.ones(shape[channel_axis], device=self.step.device))

    def _channel_dims(self, x: Tensor) -> list[int]:
        """The axes a per-channel statistic reduces over: all but the channel axis."""
        return [d for d in range(x.dim()) if d != self.channel_axis]

    @torch.no_grad()
    def _fill_step(self, value: Tensor) -> None:
        """Set the per-channel step to ``value`` (one per channel), first sizing it if no
        layer bound a weight."""
        if self.step.shape != value.shape:
            self.step = nn.Parameter(torch.empty_like(value))
        self.step.copy_(value.clamp_min(MIN_STEP))

    @property
    def binary(self) -> bool:
        """Signed at 1 bit: the symmetric grid {-s/2, +s/2}."""
        return self.is_signed and self.bits == 1

    def levels(self) -> tuple[int, int]:
        """``(Q_N, Q_P)``; the binary grid counts as ``(0, 1)``: one step, Q_P = 1."""
        if self.binary:
            return 0, 1
        if self.is_signed:
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if not self.enabled:
            return
        self.decide_sign(x)
        _, q_p = self.levels()
        if self.per_channel:
            mean = x.detach().abs().float().mean(dim=self._channel_dims(x))
            self._fill_step(mean * 2 / q_p**0.5)
            return
        value = 2.0 * float(x.detach().abs().float().mean()) / math.sqrt(q_p)
        self.step.fill_(max(value, MIN_STEP))

    def gradient_count(self, x: Tensor) -> int:
        """``N`` of the gradient scale: every weight, or one sample's features."""
        if self.sign_from_data and x.dim() > 1:
            return x[0].numel()
        return x.numel()

    def quantize(self, x: Tensor) -> Tensor:
        q_n, q_p = self.levels()
        step = self.step
        if self.grad_scale:
            step = scale_gradient(step, 1.0 / math.sqrt(self.gradient_count(x) * q_p))
        if self.per_channel:
            step = step.view([-1 if d == self.channel_axis else 1 for d in range(x.dim())])
        # v / s as v · (1/s), the site's affine part, and v̄ · s its output affine (both
        # fused with its clip and round; the levels are not kept for the gradient of s).
        inverse = step.reciprocal()
        if not self.binary:
            bounds = float(-q_n), float(q_p)
            return self.round_site(x, q_n + q_p, *bounds, scale=inverse, out_scale=step)
        # The binary grid sits half a step off zero: (v̄ − 1/2) · s = v̄ · s − s/2, exactly
        # for v̄ ∈ {0, 1}.
        return self.round_site(
            x, 1, 0.0, 1.0, scale=inverse, shift=0.5, out_scale=step, out_shift=-0.5 * step
        )

    def integer_map(self) -> IntegerMap:
        """Codes ``v̄ ∈ [−Q_N, Q_P]``, values ``v̄ · s``; the binary grid: codes {0, 1},
        values ``(v̄ − 1/2) · s`` (zero point 1/2)."""
        q_n, q_p = self.levels()
        step = self.step.detach().clone()
        axis = self.channel_axis if self.per_channel else None
        zero_point = torch.full_like(step, 0.5 if self.binary else 0.0)
        if self.binary:
            return IntegerMap(step, zero_point, 0, 1, axis)
        return IntegerMap(step, zero_point, -q_n, q_p, axis)

    def extra_repr(self) -> str:
        channels = f", per channel (axis {self.channel_axis})" if self.per_channel else ""
        return super().extra_repr() + channels


class LsqMethod(QuantizerMethod):
    """LSQ with a learned step per quantizer. ``grad_scale``: scale the step's gradient
    by ``1 / sqrt(N · Q_P)`` (the paper; off for its ablation). ``granularity``:
    ``per_tensor`` (one step per weight tensor, the paper) or ``per_channel`` (one per
    output channel of the weights)."""

    name = "lsq"

    def __init__(self, grad_scale: bool = True, granularity: Granularity = "per_tensor") -> None:
        self.grad_scale = grad_scale
        self.per_channel = check_granularity(granularity, self.name) == "per_channel"

    def weight_quantizer(self, bits: int) -> Quantizer:
        return LsqQuantizer(
            bits, signed=True, grad_scale=self.grad_scale, per_channel=self.per_channel
        )

    def activation_quantizer(self, bits: int) -> Quantizer:
        return LsqQuantizer(bits, signed=None, grad_scale=self.grad_scale)


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"lsq": LsqMethod}
