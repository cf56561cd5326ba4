"""PROFIT (Park & Yoo, ECCV 2020): its DuQ quantizer and the AIWQ measurement.

**Quantizer** (as PROFIT's code ``quant_op/duq.py`` does it): two learned scalars per
quantizer, ``a`` (the clip, or input scale) and ``c`` (the output scale), both used
through softplus.

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

**AIWQ** (activation instability from weight quantization, PROFIT's ``train_test.py``):
per quantized conv, the KL divergence between Gaussians fitted per output channel (mean
and unbiased std over N·H·W) to the layer output computed with the current and with the
previous quantized weights, on the same input,

    KL = log(σ_old / σ) + (σ² + (μ - μ_old)²) / (2 σ_old²) - 1/2,

averaged over channels, and folded into a running average ``m = 0.999 m + 0.001 KL``
(values above 1 are skipped). Only ``Conv2d`` layers are measured. ``AIWQTracker`` keeps
the previous quantized weights and the averages (``update`` after each optimizer step;
``state_dict``/``load_state_dict`` for checkpoints); ``measure_aiwq`` runs it over
training batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewgs_plugins.hookspecs import hookimpl
from ewgs_plugins.quant import QuantConv2d, Quantizer, QuantizerMethod, quantized_layers

from ._common import SignFromFirstBatch, percentile

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
        # The scalars (1/a, 1/n, c) are folded before they meet x: one multiply over x
        # on each side of the round site, e.g. round(x · (n / a)) · (c / n).
        a, c = F.softplus(self.a), F.softplus(self.c)
        if not self.is_signed:  # hardtanh(x/a, 0, 1) on 2^b levels
            steps = 2**self.bits - 1
            levels = self.round_site(x * (steps / a), steps, 0.0, float(steps))
            return levels * (c / steps)
        if self.bits == 1:  # binary: (hardtanh(x/a) + 1)/2 rounded to {0, 1}, then ±1
            levels = self.round_site(x * (0.5 / a) + 0.5, 1, 0.0, 1.0)
            return levels * (2.0 * c) - c
        n = 2 ** (self.bits - 1) - 1  # hardtanh(x/a) on ±n levels, n = 2^(b-1) - 1
        levels = self.round_site(x * (n / a), 2 * n, float(-n), float(n))
        return levels * (c / n)


class ProfitMethod(QuantizerMethod):
    """PROFIT's DuQ quantizer; every layer quantized; training strategy ``profit``."""

    name = "profit"
    quantize_first_last = True
    callbacks = ("profit",)

    def weight_quantizer(self, bits: int) -> Quantizer:
        return ProfitQuantizer(bits, signed=True)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return ProfitQuantizer(bits, signed=None)


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"profit": ProfitMethod}


@hookimpl
def ewgs_callbacks() -> Mapping[str, Callable[..., Any]]:
    """PROFIT's training strategy, the callback ``profit`` (``methods.profit_training``)."""
    from .profit_training import ProfitTraining

    return {"profit": ProfitTraining}


# ------------------------------------------------------------------------------- AIWQ

#: Added to both variances so that a channel that is constant under both weights has KL 0.
KL_EPS = 1e-12


def quantized_convs(model: nn.Module) -> dict[str, QuantConv2d]:
    """The quantized ``Conv2d`` layers of ``model`` by name (AIWQ measures only these)."""
    return {n: m for n, m in quantized_layers(model).items() if isinstance(m, QuantConv2d)}


def gaussian_kl(output: Tensor, previous_output: Tensor) -> float:
    """KL between Gaussians fitted per channel (dim 1; mean and unbiased variance over
    every other dim) to ``output`` and ``previous_output``, averaged over channels:
    ``log(σ_old/σ) + (σ² + (μ - μ_old)²) / (2 σ_old²) - 1/2``."""
    dims = [d for d in range(output.dim()) if d != 1]
    var, mean = (t.double() for t in torch.var_mean(output, dim=dims))
    var_old, mean_old = (t.double() for t in torch.var_mean(previous_output, dim=dims))
    var, var_old = var + KL_EPS, var_old + KL_EPS
    kl = 0.5 * torch.log(var_old / var) + (var + (mean - mean_old) ** 2) / (2 * var_old) - 0.5
    return float(kl.mean())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (BN running statistics untouched), each restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def current_quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """The quantized weight of every quantized conv, by name (detached copies)."""
    return {
        n: m.weight_quantizer(m.weight).detach().clone() for n, m in quantized_convs(model).items()
    }


@torch.no_grad()
def activation_instability(
    model: nn.Module, previous_weights: Mapping[str, Tensor], inputs: Tensor
) -> dict[str, float]:
    """One AIWQ measurement: for every quantized conv, the channel-averaged Gaussian KL
    between its output with the current and with ``previous_weights[name]`` (quantized
    weights) on the input it receives when ``model`` runs on ``inputs``.

    The model runs once, in eval mode and without gradient (BN running statistics,
    parameters and modes are left as they were). The layer's ``|α|`` and bias are left
    out of both outputs: a common per-channel scale and shift does not change the KL."""
    convs = quantized_convs(model)
    missing = sorted(set(convs) - set(previous_weights))
    if missing:
        raise KeyError(f"no previous quantized weights for conv layer(s) {missing}")
    results: dict[str, float] = {}

    def measure(name: str) -> Callable[..., None]:
        def hook(layer: QuantConv2d, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = layer.input_quantizer(args[0])
            new = layer._linear_op(x, layer.weight_quantizer(layer.weight))
            old_weight = previous_weights[name].to(device=new.device, dtype=new.dtype)
            results[name] = gaussian_kl(new, layer._linear_op(x, old_weight))

        return hook

    handles = [layer.register_forward_hook(measure(name)) for name, layer in convs.items()]
    try:
        with _eval_mode(model):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return results


class AIWQTracker:
    """Running AIWQ per quantized conv (PROFIT): ``m = momentum · m + (1 - momentum) · KL``
    after each optimizer step, skipping a KL above ``max_kl`` (or not finite).

    Call ``update(model, inputs)`` after every optimizer step: the first call only
    records the quantized weights; each later one measures the KL between the outputs
    with the weights recorded last time and the current ones (on ``inputs``), folds it
    in, and records the current weights. ``averages`` holds the AIWQ by layer name
    (starting at 0, as PROFIT's does). Call it after the quantizers are initialised.
    """

    def __init__(self, momentum: float = 0.999, max_kl: float = 1.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not max_kl > 0.0:
            raise ValueError(f"max_kl must be > 0, got {max_kl}")
        self.momentum = momentum
        self.max_kl = max_kl
        self.previous: dict[str, Tensor] = {}
        self.averages: dict[str, float] = {}
        self.measurements = 0
        self.skipped: dict[str, int] = {}

    def update(self, model: nn.Module, inputs: Tensor) -> dict[str, float]:
        """Measure on ``inputs`` against the weights of the previous call, fold the KL
        into the averages, remember the current quantized weights; returns ``averages``."""
        if self.previous:
            for name, kl in activation_instability(model, self.previous, inputs).items():
                if not (math.isfinite(kl) and kl <= self.max_kl):
                    self.skipped[name] = self.skipped.get(name, 0) + 1
                    continue
                average = self.averages.get(name, 0.0)
                self.averages[name] = self.momentum * average + (1.0 - self.momentum) * kl
            self.measurements += 1
        self.previous = current_quantized_weights(model)
        for name in self.previous:
            self.averages.setdefault(name, 0.0)
        return dict(self.averages)

    def ranking(self) -> list[str]:
        """Layer names, most unstable (largest AIWQ) first (PROFIT freezes these first)."""
        return sorted(self.averages, key=lambda name: self.averages[name], reverse=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "max_kl": self.max_kl,
            "previous": {name: t.detach().cpu() for name, t in self.previous.items()},
            "averages": dict(self.averages),
            "measurements": self.measurements,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.momentum = float(state["momentum"])
        self.max_kl = float(state["max_kl"])
        self.previous = {name: t.clone() for name, t in state["previous"].items()}
        self.averages = {name: float(v) for name, v in state["averages"].items()}
        self.measurements = int(state["measurements"])
        self.skipped = {name: int(v) for name, v in state["skipped"].items()}


def _inputs_of(batch: Any) -> Tensor:
    return batch if isinstance(batch, Tensor) else batch[0]


def measure_aiwq(
    model: nn.Module,
    batches: Iterable[Any],
    train_step: Callable[[Any], Any],
    tracker: AIWQTracker | None = None,
) -> dict[str, float]:
    """The AIWQ of every quantized conv of ``model`` over a stretch of training (PROFIT's
    sampling phase): for each batch, ``train_step(batch)`` (the caller's forward,
    backward and optimizer step), then ``tracker.update`` on the batch's inputs (the
    batch itself if it is a tensor, else its first item). The weights before the first
    step are recorded first. Returns the averages by layer name; pass a ``tracker`` to
    go on from (or keep) its state."""
    tracker = tracker if tracker is not None else AIWQTracker()
    for batch in batches:
        if not tracker.previous:
            tracker.previous = current_quantized_weights(model)
        train_step(batch)
        tracker.update(model, _inputs_of(batch))
    return dict(tracker.averages)
