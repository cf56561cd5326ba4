"""PROFIT's AIWQ (activation instability from weight quantization, its ``train_test.py``):
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
from torch import Tensor, nn

from ewgs_plugins.quant import QuantConv2d, quantized_layers

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
