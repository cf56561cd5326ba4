"""LSQ+ (Bhalgat et al. 2020): LSQ with a learned offset, an ewgs-plugins method.

Activations are asymmetric: a learned step ``s`` and a learned offset ``β`` (Eq. 1-2)::

    x̄ = round(clip((x − β) / s, n, p)),   x̂ = x̄ · s + β,   n = 0, p = 2^b − 1

so the ``2^b`` levels ``β, β + s, …, β + p·s`` may lie below zero (Swish, or any layer
input with negative values) without a sign bit. With the round as the identity (STE),
autograd gives the paper's gradients (Eq. 3-4)::

    ∂x̂/∂s = round(z) − z inside, n or p outside     (z = (x − β) / s)
    ∂x̂/∂β = 0 inside, 1 outside

The latent ``(x − β) / s`` is rounded in the round site with the clip bounds ``[n, p]``
(``steps = p − n``), so the backward rule (STE or EWGS) shapes the gradients of ``x``,
``s`` and ``β`` that flow through it. Both ``s`` and ``β`` have their gradient scaled by
LSQ's ``1 / sqrt(N · p)`` (``N`` the features of one sample), the forward unchanged.

Initialisation on the first batch (Sec. 3.2), ``activation_init``:

- ``minmax``: ``s = (max x − min x) / (p − n)``, ``β = min x − n · s``;
- ``mse`` (the default; the paper's proposal): the ``(s, β)`` minimising
  ``‖x̂ − x‖²`` on that batch. The paper states the objective; here it is minimised by a
  search over clip ranges ``[low, high]`` inside ``[min x, max x]`` (``high`` in steps of
  1/40 of the span, ``low`` in steps of 1/40 up to half of it), each candidate quantized
  through the round site itself, on at most 16384 of the batch's values (an even stride).

Weights are LSQ's signed quantizer (``ewgs_plugins.methods.lsq``: ``Q_N = 2^(b−1)``,
``Q_P = 2^(b−1) − 1``, no offset, gradient scale ``1 / sqrt(N_W · Q_P)``, 1-bit on the
symmetric grid ``±s/2``) with LSQ+'s initialisation (Sec. 3.2.1)::

    s = max(|μ − 3σ|, |μ + 3σ|) / 2^(b−1)

with ``μ``, ``σ`` the mean and (population) standard deviation of the layer's weights.
``granularity: per_channel`` gives the weights one step per output channel (LSQ's
per-channel form), each initialised by the same formula on that channel's weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ewgs_plugins import Quantizer, QuantizerMethod, hookimpl, scale_gradient
from ewgs_plugins.methods.lsq import MIN_STEP, LsqQuantizer
from ewgs_plugins.quant import Granularity, check_granularity

ActivationInit = Literal["mse", "minmax"]
#: The MSE search: clip-range resolution (fractions of the batch's span) and sample size.
MSE_GRID = 40
MSE_SAMPLES = 16384


class LsqPlusWeightQuantizer(LsqQuantizer):
    """LSQ's signed weight quantizer, initialised by LSQ+'s ``max(|μ ± 3σ|) / 2^(b−1)``."""

    def __init__(self, bits: int, grad_scale: bool = True, per_channel: bool = False) -> None:
        super().__init__(bits, signed=True, grad_scale=grad_scale, per_channel=per_channel)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if not self.enabled:
            return
        values = x.detach().float()
        if self.per_channel:
            dims = self._channel_dims(values)
            mean, std = values.mean(dim=dims), values.std(dim=dims, correction=0)
            bound = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs())
            self._fill_step(bound / 2 ** (self.bits - 1))
            return
        mean, std = values.mean(), values.std(correction=0)
        value = float(torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs()))
        self.step.fill_(max(value / 2 ** (self.bits - 1), MIN_STEP))


class LsqPlusActivationQuantizer(Quantizer):
    """``round(clip((x − β)/s, 0, 2^b − 1)) · s + β`` with a learned scalar step ``s``
    (``self.step``) and offset ``β`` (``self.offset``)."""

    def __init__(self, bits: int, init: ActivationInit = "mse", grad_scale: bool = True) -> None:
        super().__init__(bits)
        self.init = init
        self.grad_scale = grad_scale
        self.step = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(0.0))

    def levels(self) -> tuple[int, int]:
        """``(n, p)``: the clip bounds of the latent, in level units."""
        return 0, 2**self.bits - 1

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        if not self.enabled:
            return
        values = x.detach().float().reshape(-1)
        low, high = float(values.min()), float(values.max())
        if self.init == "mse" and high > low:
            low, high = self._mse_range(values, low, high)
        n, p = self.levels()
        step = max((high - low) / (p - n), MIN_STEP)
        self.step.fill_(step)
        self.offset.fill_(low - n * step)

    def _mse_range(self, values: Tensor, low: float, high: float) -> tuple[float, float]:
        """The clip range ``[low, high]`` whose quantization of ``values`` has the least
        squared error, among the search grid (see the module docstring)."""
        sample = values[:: max(1, values.numel() // MSE_SAMPLES)]
        span = high - low
        grid = torch.arange(MSE_GRID + 1, dtype=sample.dtype, device=sample.device) / MSE_GRID
        lows = low + span * grid[: MSE_GRID // 2 + 1]
        highs = low + span * grid[1:]
        lows, highs = (t.reshape(-1) for t in torch.meshgrid(lows, highs, indexing="ij"))
        valid = highs > lows
        lows, highs = lows[valid], highs[valid]
        n, p = self.levels()
        steps = ((highs - lows) / (p - n)).unsqueeze(1)
        offsets = (lows - n * steps.squeeze(1)).unsqueeze(1)
        rounded = self.round_site((sample - offsets) / steps, p - n, float(n), float(p))
        errors = ((rounded * steps + offsets - sample) ** 2).mean(dim=1)
        best = int(errors.argmin())
        return float(lows[best]), float(highs[best])

    def quantize(self, x: Tensor) -> Tensor:
        n, p = self.levels()
        step, offset = self.step, self.offset
        if self.grad_scale:
            features = x[0].numel() if x.dim() > 1 else x.numel()
            scale = 1.0 / math.sqrt(features * p)
            step, offset = scale_gradient(step, scale), scale_gradient(offset, scale)
        # (x − β)/s as the site's affine x·(1/s) − β/s, and x̄·s + β as its output affine:
        # one fused pass over x, and only x is kept for the backward.
        inverse = step.reciprocal()
        return self.round_site(
            x,
            p - n,
            float(n),
            float(p),
            scale=inverse,
            shift=-offset * inverse,
            out_scale=step,
            out_shift=offset,
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, init={self.init}"


class LsqPlusMethod(QuantizerMethod):
    """LSQ+: signed LSQ weights with LSQ+'s initialisation; asymmetric activations with a
    learned offset, initialised by ``activation_init`` (``mse`` or ``minmax``).
    ``grad_scale``: scale the gradients of ``s`` and ``β`` by ``1 / sqrt(N · p)``.
    ``granularity``: ``per_tensor`` or ``per_channel`` (the weights' steps)."""

    name = "lsq_plus"

    def __init__(
        self,
        activation_init: ActivationInit = "mse",
        grad_scale: bool = True,
        granularity: Granularity = "per_tensor",
    ) -> None:
        self.activation_init = activation_init
        self.grad_scale = grad_scale
        self.per_channel = check_granularity(granularity, self.name) == "per_channel"

    def weight_quantizer(self, bits: int) -> Quantizer:
        return LsqPlusWeightQuantizer(bits, self.grad_scale, self.per_channel)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return LsqPlusActivationQuantizer(bits, self.activation_init, self.grad_scale)


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"lsq_plus": LsqPlusMethod}
