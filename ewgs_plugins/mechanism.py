"""The mechanism of a backward rule made visible: the training callback ``mechanism``.

What separates STE from EWGS happens at the latent weights: EWGS's extra term
``δ·|g|·(x_n − x_q)`` (paper Eq. 4) pulls each latent toward its level, which changes how
far latents sit from their levels, how often a weight's quantized value flips, and how
many latents drift out of the clip range. Turned on with ``callbacks: {mechanism: {}}``,
this callback writes per quantized layer, per epoch, into ``mechanism.jsonl`` in the run
directory (one row per epoch: ``{"epoch", "step", "steps", "layers": {layer: {...}}}``):

- ``weights``: the number of weights of the layer;
- ``clip_fraction``: the fraction of latent weights at or beyond the clip bounds (null
  for a quantizer whose round site has no clip bounds, as DoReFa's weights);
- ``error``: the mean ``|x_n − x_q|`` of the latent weights strictly inside the bounds,
  as a fraction of the range, ``|z − round z| / steps`` (the unit of EWGS's error,
  ``RoundContext.error``; at most ``1 / (2 steps)``);
- ``flips_per_weight``: the number of times a weight's quantized value changed from one
  optimizer step to the next during the epoch, divided by the number of weights (the
  first step of a run is compared with the weights before training);
- ``delta_weight`` / ``delta_input``: δ of the layer's weight and input round sites at
  the end of the epoch (``delta_input`` null when the input is not quantized).

``clip_fraction`` and ``error`` are means over the states after each optimizer step of
the epoch (``steps`` of them). The epoch's means over all layers (weighted by the number
of weights, or of latents inside the bounds for ``error``) are also logged as metrics:
``mechanism_clip_fraction``, ``mechanism_error``, ``mechanism_flips_per_weight``.

Cost: after every optimizer step, one forward of the weight quantizers without gradient
(the round site's ``observer`` hands over the latent in level units, the rounded levels
and the clip bounds, whatever the method) and a few element-wise reductions, accumulated
on the device: no host synchronisation until the epoch ends. Only the main process
(rank 0 under torchrun) measures and writes; the rows are checkpointed, so a resumed run
writes the same file as an uninterrupted one. ``ewgs report`` plots the file
(``ewgs_plugins.mechanism_plots``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import distributed, rundir
from .hookspecs import hookimpl
from .quant import Quantizer, quantized_layers


class SiteView(NamedTuple):
    """What a round site saw in one call: the latent (level units), the rounded levels,
    the number of steps of the range and the clip bounds (None: no bounds)."""

    latent: Tensor
    rounded: Tensor
    steps: int
    low: float | None
    high: float | None


@torch.no_grad()
def observe(quantizer: Quantizer, x: Tensor) -> SiteView:
    """What ``quantizer``'s round site sees when it quantizes ``x``: one forward without
    gradient with the site's ``observer`` set (and unset afterwards). Nothing of the
    quantizer changes."""
    seen: list[SiteView] = []
    site = quantizer.round_site
    site.observer = lambda *call: seen.append(SiteView(*call))
    try:
        quantizer(x)
    finally:
        site.observer = None
    if not seen:
        raise RuntimeError(f"{type(quantizer).__name__} did not call its round site")
    return seen[-1]


class _Layout:
    """The weight quantizers' latents side by side in one flat tensor: which layer each
    element belongs to, and its clip bounds and steps, so one step's statistics of every
    layer take a fixed handful of element-wise passes and one ``index_add_``."""

    def __init__(self, views: Mapping[str, SiteView]) -> None:
        self.names = list(views)
        self.sizes = [view.latent.numel() for view in views.values()]
        self.bounded = [view.low is not None for view in views.values()]
        self.key = self.describe(views)
        device = next(iter(views.values())).latent.device
        sizes = torch.tensor(self.sizes, device=device)

        def per_element(values: list[float]) -> Tensor:
            return torch.repeat_interleave(torch.tensor(values, device=device), sizes)

        self.ids = torch.repeat_interleave(torch.arange(len(self.names), device=device), sizes)
        inf = float("inf")
        self.low = per_element([-inf if v.low is None else v.low for v in views.values()])
        self.high = per_element([inf if v.high is None else v.high for v in views.values()])
        self.inverse_steps = per_element([1.0 / view.steps for view in views.values()])

    @staticmethod
    def describe(views: Mapping[str, SiteView]) -> tuple:
        return tuple((n, v.latent.numel(), v.steps, v.low, v.high) for n, v in views.items())


class Mechanism:
    """The training callback ``mechanism`` (no options): see the module's docstring."""

    def __init__(self) -> None:
        #: one row per finished epoch, as written to mechanism.jsonl
        self.history: list[dict[str, Any]] = []
        self._layout: _Layout | None = None
        #: the levels after the last observation, all layers flat (None: none yet)
        self._codes: Tensor | None = None
        #: per layer (columns): the epoch's sums of [clipped latents, |error| of the
        #: latents inside, flips] over the observed steps
        self._sums: Tensor | None = None
        self._observed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])

    @staticmethod
    def _layers(model: nn.Module) -> dict[str, nn.Module]:
        """The quantized layers whose weights are quantized."""
        return {n: m for n, m in quantized_layers(model).items() if m.weight_quantizer.enabled}

    def _observe(self, model: nn.Module, accumulate: bool) -> None:
        """Observe every weight quantizer; add this state to the epoch's sums if
        ``accumulate``, and keep the levels for the next step's flips."""
        views = {
            name: observe(layer.weight_quantizer, layer.weight.detach())
            for name, layer in self._layers(model).items()
        }
        if not views:
            return
        layout = self._layout
        if layout is None or layout.key != _Layout.describe(views):
            same_layers = layout is not None and (layout.names, layout.sizes) == (
                list(views),
                [v.latent.numel() for v in views.values()],
            )
            layout = self._layout = _Layout(views)
            if not same_layers:  # other layers quantized: the epoch's sums start afresh
                self._codes, self._sums, self._observed = None, None, 0
        latent = torch.cat([view.latent.reshape(-1) for view in views.values()])
        rounded = torch.cat([view.rounded.reshape(-1) for view in views.values()])
        if accumulate:
            clipped = ~((latent > layout.low) & (latent < layout.high))
            # inside the bounds round(clip z) = round z: this is |z - round z| / steps
            error = torch.where(clipped, 0.0, (latent - rounded).abs() * layout.inverse_steps)
            flips = rounded != self._codes if self._codes is not None else torch.zeros_like(clipped)
            values = torch.stack([clipped.to(error.dtype), error, flips.to(error.dtype)])
            step = torch.zeros(3, len(layout.names), dtype=error.dtype, device=error.device)
            step.index_add_(1, layout.ids, values)
            if self._sums is None:
                # float64 over an epoch where the device has it (counts stay exact)
                wide = torch.float32 if latent.device.type == "mps" else torch.float64
                self._sums = torch.zeros_like(step, dtype=wide)
            self._sums += step
        self._codes = rounded

    @hookimpl
    def ewgs_train_start(self, trainer: Any) -> None:
        if not distributed.is_main():
            return
        self._observe(trainer.model, accumulate=False)  # the codes before the first step
        self._write(trainer.run_dir)  # on resume: drop anything logged after the checkpoint

    @hookimpl
    def ewgs_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._sums, self._observed = None, 0

    @hookimpl
    def ewgs_step_end(self, trainer: Any) -> None:
        if not distributed.is_main():
            return
        self._observe(trainer.model, accumulate=True)
        self._observed += 1

    @hookimpl
    def ewgs_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if not distributed.is_main() or self._sums is None or self._layout is None:
            return
        layers, layout = quantized_layers(trainer.model), self._layout
        clipped, error, flips = self._sums.cpu().tolist()  # the epoch's one synchronisation
        rows: dict[str, dict[str, Any]] = {}
        for index, (name, weights) in enumerate(zip(layout.names, layout.sizes)):
            observed = weights * self._observed
            inside = observed - clipped[index]
            layer = layers[name]
            rows[name] = {
                "weights": weights,
                "clip_fraction": clipped[index] / observed if layout.bounded[index] else None,
                "error": error[index] / inside if inside else None,
                "flips_per_weight": flips[index] / weights,
                "delta_weight": float(layer.weight_quantizer.round_site.delta),
                "delta_input": float(layer.input_quantizer.round_site.delta)
                if layer.input_quantizer.enabled
                else None,
            }
        self.history.append(
            {"epoch": epoch, "step": trainer.step, "steps": self._observed, "layers": rows}
        )
        metrics.update(summarize(rows))
        self._write(trainer.run_dir)

    def _write(self, run_dir: Path) -> None:
        rundir.write_jsonl(run_dir / rundir.MECHANISM, self.history)


def summarize(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The means over all layers of one epoch's row: clip fraction and flips weighted by
    the number of weights, error by the number of latents inside the bounds."""
    weights = sum(row["weights"] for row in layers.values())
    result: dict[str, float] = {}
    if not weights:
        return result
    result["mechanism_flips_per_weight"] = (
        sum(row["flips_per_weight"] * row["weights"] for row in layers.values()) / weights
    )
    bounded = [row for row in layers.values() if row["clip_fraction"] is not None]
    if bounded:
        result["mechanism_clip_fraction"] = sum(
            row["clip_fraction"] * row["weights"] for row in bounded
        ) / sum(row["weights"] for row in bounded)
    inside = {
        name: (1.0 - (row["clip_fraction"] or 0.0)) * row["weights"]
        for name, row in layers.items()
        if row["error"] is not None
    }
    if sum(inside.values()) > 0:
        result["mechanism_error"] = sum(
            layers[name]["error"] * count for name, count in inside.items()
        ) / sum(inside.values())
    return result
