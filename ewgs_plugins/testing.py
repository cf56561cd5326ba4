"""Checks for the tests of a quantizer-method plugin (the packages in ``examples/`` use
them): the laws every method must keep, whatever its formulas.

- ``assert_ewgs_at_zero_delta_is_ste``: EWGS with δ = 0 gives STE's gradients bit for
  bit, for every parameter of a small quantized model;
- ``assert_short_run_trains``: a few epochs of a recipe on the CPU, under EWGS with a
  cheap Hessian δ estimate every epoch, must learn (the loss falls, test top-1 reaches
  three times chance) and estimate some δ > 0; returns the finished trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .backward import ElementWiseGradientScaling
from .models import digits_cnn
from .quant import QuantizerMethod, quantize_model
from .recipe import load_runs
from .round_site import RoundSite
from .train import Trainer


def assert_ewgs_at_zero_delta_is_ste(
    method: QuantizerMethod | str, bits: int, *, seed: int = 0
) -> None:
    """Quantize a small CNN (every layer) with ``method`` at ``bits``, initialise it on
    one batch, and compare the gradients of every parameter under STE and under EWGS
    with δ = 0 (an ``AssertionError`` names the first that differs)."""
    torch.manual_seed(seed)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    ste = quantize_model(
        digits_cnn(10, width=4),
        method,
        weight_bits=bits,
        activation_bits=bits,
        quantize_first_last=True,
    )
    ste(inputs)  # the first forward initialises the quantizers
    ewgs = copy.deepcopy(ste)
    for site in (m for m in ewgs.modules() if isinstance(m, RoundSite)):
        site.set_rule(ElementWiseGradientScaling())
        site.set_delta(0.0)
    for model in (ste, ewgs):
        F.cross_entropy(model(inputs), targets).backward()
    for (name, a), (_, b) in zip(ste.named_parameters(), ewgs.named_parameters()):
        if a.grad is None or b.grad is None:  # the raw image's quantizer (32 bits)
            assert a.grad is None and b.grad is None, f"{name}: a gradient under one rule only"
            continue
        assert torch.equal(a.grad, b.grad), f"{name}: EWGS at δ = 0 differs from STE"


def assert_short_run_trains(
    recipe: str | Path, output: Path, overrides: Sequence[str] = (), *, epochs: int = 3
) -> Trainer:
    """Train the first run of ``recipe`` for ``epochs`` epochs on the CPU into ``output``,
    under EWGS with the Hessian δ estimated every epoch on one batch with 3 probes
    (``overrides``: more ``key=value`` settings, applied last), and check that it
    learned."""
    settings = [
        f"output={output}",
        f"epochs={epochs}",
        "delta={name: hessian, options: {every: 1, unit: epoch, batches: 1, samples: 3}}",
        "matrix=null",
        "backward=ewgs",
        "device=cpu",
        *overrides,
    ]
    run = load_runs(recipe, settings)[0]
    trainer = Trainer(run.recipe, progress=False)
    trainer.run()
    rows = trainer.history
    assert len(rows) == epochs, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows
    assert rows[-1]["test_top1"] > 300.0 / trainer.num_classes, rows  # 3 × chance
    deltas = trainer.callbacks["delta"].history[-1]["deltas"]
    assert any(value > 0 for value in deltas.values()), deltas
    return trainer
