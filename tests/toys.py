"""Test-only plugins: a tiny quantizer method with learned parameters, a tiny CNN, and
training callbacks, registered from code (``ewgs_plugins.register_plugin``) so the
trainer's tests do not depend on the real methods and models."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml
from torch import nn

from ewgs_plugins import (
    Quantizer,
    QuantizerMethod,
    hookimpl,
    register_plugin,
    rundir,
    unregister_plugin,
)

#: what a finished run's directory holds (written by the trainer and the δ schedule)
RUN_FILES = {
    rundir.RECIPE,
    rundir.ENVIRONMENT,
    rundir.METRICS_JSONL,
    rundir.METRICS_CSV,
    rundir.DELTAS,
    rundir.CHECKPOINT_LAST,
    rundir.CHECKPOINT_BEST,
    rundir.LAYER_SUMMARY,
}


class ToyQuantizer(Quantizer):
    """A learned step ``s`` (LSQ-like), signed for weights, unsigned for activations."""

    def __init__(self, bits: int, signed: bool) -> None:
        super().__init__(bits)
        self.signed = signed
        self.step = nn.Parameter(torch.tensor(1.0))

    def _levels(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if self.enabled:
            high = max(self._levels()[1], 1)
            self.step.fill_(float(2 * x.abs().mean() / math.sqrt(high)) + 1e-8)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self._levels()
        z = self.round_site(x / self.step, high - low, low, high)
        return z * self.step


class ToyMethod(QuantizerMethod):
    name = "toy"
    has_output_scale = True

    def __init__(self, callbacks: list[str] | None = None) -> None:
        if callbacks is not None:
            self.callbacks = tuple(callbacks)

    def weight_quantizer(self, bits: int) -> Quantizer:
        return ToyQuantizer(bits, signed=True)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return ToyQuantizer(bits, signed=False)


class ToyNoParams(QuantizerMethod):
    """A method without quantizer parameters (as DoReFa)."""

    name = "toy_plain"

    def weight_quantizer(self, bits: int) -> Quantizer:
        return PlainQuantizer(bits)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return PlainQuantizer(bits)


class PlainQuantizer(Quantizer):
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        steps = 2**self.bits - 1
        return self.round_site(torch.sigmoid(x) * steps, steps, 0.0, float(steps)) / steps


def toy_cnn(
    num_classes: int, in_channels: int = 1, width: int = 8, batchnorm: bool = True
) -> nn.Module:
    """Three convs and a linear head; ``batchnorm: false`` puts identities in place of
    the BatchNorm layers (same layer names)."""

    def norm() -> nn.Module:
        return nn.BatchNorm2d(width) if batchnorm else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        norm(),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        norm(),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        norm(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


class StopAfter:
    """Requests a stop at the end of epoch ``epoch`` (an interrupted run)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    @hookimpl
    def ewgs_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        if epoch == self.epoch:
            trainer.request_stop()


class NanLoss:
    """Adds a NaN to the loss from epoch ``epoch`` on (under torchrun: on rank ``rank``
    only, if given)."""

    def __init__(self, epoch: int = 1, rank: int | None = None) -> None:
        self.epoch, self.rank = epoch, rank

    @hookimpl
    def ewgs_extra_loss(self, trainer: Any, inputs: Any, outputs: Any, targets: Any) -> Any:
        from ewgs_plugins import distributed

        if self.rank is not None and distributed.rank() != self.rank:
            return None
        return torch.tensor(float("nan")) if trainer.epoch >= self.epoch else None


class CountSteps:
    """A callback with state: counts steps and logs the count every epoch."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]

    @hookimpl
    def ewgs_step_end(self, trainer: Any, step: int, loss: float) -> None:
        self.count += 1

    @hookimpl
    def ewgs_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        metrics["counted_steps"] = self.count


class FreezeFirstConv:
    """At the start of epoch ``epoch``: freeze the first quantized conv's weight and
    drop the activations to ``bits`` (what PROFIT-like strategies do)."""

    def __init__(self, epoch: int = 1, bits: int = 2) -> None:
        self.epoch, self.bits = epoch, bits

    @hookimpl
    def ewgs_epoch_start(self, trainer: Any, epoch: int) -> None:
        if epoch == self.epoch:
            from ewgs_plugins import quantized_layers

            first = next(iter(quantized_layers(trainer.model).values()))
            trainer.set_lr_scale([first.weight], 0.0, weight_decay=0.0)
            trainer.set_bits(activations=self.bits)
            trainer.log("frozen_layers", 1)


class DumpState:
    """At the end of training, saves what this process holds (model state, δ history,
    metrics, the quantizers' signed/unsigned decision) to ``directory/rank<R>.pt``:
    how the multi-process test compares the processes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @hookimpl
    def ewgs_train_end(self, trainer: Any) -> None:
        from ewgs_plugins import distributed

        state = {
            "model": trainer.model.state_dict(),
            "deltas": trainer.callbacks["delta"].history,
            "history": trainer.history,
            "signed": {n: q.is_signed for n, q in trainer.quantizers().items()},
            "forward_model": type(trainer.forward_model).__name__,
        }
        torch.save(state, Path(self.directory) / f"rank{distributed.rank()}.pt")


class ToyPlugin:
    @staticmethod
    @hookimpl
    def ewgs_methods() -> dict:
        return {"toy": ToyMethod, "toy_plain": ToyNoParams}

    @staticmethod
    @hookimpl
    def ewgs_models() -> dict:
        return {"toy_cnn": toy_cnn}

    @staticmethod
    @hookimpl
    def ewgs_callbacks() -> dict:
        return {
            "stop_after": StopAfter,
            "nan_loss": NanLoss,
            "count_steps": CountSteps,
            "freeze_first_conv": FreezeFirstConv,
            "dump_state": DumpState,
        }


@contextlib.contextmanager
def toy_plugins() -> Iterator[None]:
    register_plugin(ToyPlugin, "test-toys")
    try:
        yield
    finally:
        unregister_plugin("test-toys")


def digits_recipe(output: Path, **changes: Any) -> dict:
    """A small, fast recipe on the digits data with the toy plugins."""
    recipe: dict[str, Any] = {
        "model": {"name": "toy_cnn", "options": {"width": 6}},
        "data": {"name": "digits", "batch_size": 128, "options": {"test_fraction": 0.5}},
        "method": "toy",
        "backward": "ewgs",
        "bits": "W2A2",
        "epochs": 2,
        "delta": {"name": "hessian", "options": {"every": 1, "batches": 1, "samples": 3}},
        "optimizers": {"weights": {"lr": 0.01}},
        "seed": 3,
        "device": "cpu",
        "output": str(output),
    }
    recipe.update(changes)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def make_distribution(root: Path, dist: str, module: str, source: str, entry: str | None = None):
    """Write an installed distribution (module + dist-info with an ``ewgs_plugins``
    entry point) under ``root``, as pip would."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ewgs_plugins]\n{entry or module} = {module}\n")


def run_cli_stopping_at_write(point: int, argv: list[str]) -> None:
    """In a child process: ``ewgs ARGV``, stopping itself (SIGSTOP) at its ``point``-th
    write point (``rundir.STOP_AT_WRITE``); one torch thread, as the tests' own process."""
    import os
    import sys

    from ewgs_plugins import cli, rundir

    os.environ[rundir.STOP_AT_WRITE] = str(point)
    torch.set_num_threads(1)
    sys.exit(cli.main(argv))


def run_cli_as_program(point: int, argv: list[str], log: str) -> None:
    """In a child process: ``ewgs ARGV`` as the program runs it (``cli.main()`` reading
    ``sys.argv``), stdout and stderr to the files ``LOG.out`` and ``LOG.err``, stopping
    itself (SIGSTOP) at its ``point``-th write point (0: never); one torch thread."""
    import os
    import sys

    from ewgs_plugins import cli, rundir

    for descriptor, suffix in ((1, ".out"), (2, ".err")):
        handle = os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, descriptor)
        os.close(handle)
    os.environ[rundir.STOP_AT_WRITE] = str(point)
    torch.set_num_threads(1)
    sys.argv = ["ewgs", *argv]
    sys.exit(cli.main())


#: the digits demo at its smallest: the real model and method (a subprocess has no toy
#: plugins), EWGS with a Hessian δ every epoch (so deltas.jsonl changes too), 2 epochs
SMALL = [
    "matrix=null",
    "method=lsq",
    "backward=ewgs",
    "epochs=2",
    "device=cpu",
    "data.batch_size=128",
    "data.options={test_fraction: 0.5}",
    "model.options={width: 4}",
    "delta.options={every: 1, unit: epoch, batches: 1, samples: 2}",
]


def bench_module(name: str) -> ModuleType:
    """The script ``bench/<name>.py`` imported as a module (``bench_<name>``)."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def one_error_line(err: str) -> str:
    """The one ``ewgs: error:`` line a bad input gets (asserting there is no other)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ewgs: error: "), err
    return lines[0]
