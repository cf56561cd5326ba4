"""Optimizers, their param groups and the learning-rate schedule.

The paper trains with two optimizers: network weights (conv/linear weights, biases, BN
affine) and quantizer parameters (everything inside a ``Quantizer``, and the layers'
output scale α), each with its own learning rate. A param-group *layout* names the
parameters of each group of each optimizer (``{"weights": [[names...], ...], ...}``):
it is what a checkpoint keeps, so that groups made by a callback (``move_to_group``,
PROFIT's frozen layers) survive resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import TrainingError
from ..quant import Quantizer, quantized_layers
from ..recipe import (
    OptimizerConfig,
    QuantizerOptimizerConfig,
    Recipe,
    ScheduleConfig,
    Section,
    WeightsOptimizerConfig,
)
from ..recipe.schema import BUILTIN_SCHEDULES, parse_section

#: a param-group layout: optimizer kind -> groups -> parameter names
Layout = Mapping[str, list[list[str]]]


class LRSchedule:
    """Sets every param group's ``lr`` to ``initial_lr × lr_scale × factor(t)``, where
    ``t`` counts epochs or steps (``unit``) and ``factor`` is the recipe's schedule:
    a linear warm-up of ``warmup`` counts from ``warmup_start_factor`` × the schedule's
    first value, then the schedule (cosine to ``final_lr_factor``, constant, or a
    registered one run on lr = 1 for ``total - warmup`` counts). A group's ``lr_scale``
    (default 1) is how a callback slows or freezes its parameters (0). Its state is ``t``
    alone: a registered schedule is a function of its step count, replayed on load."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: ScheduleConfig,
        total: int,
        warmup: int,
        key_path: str = "schedule",
    ) -> None:
        self.optimizer, self.config = optimizer, config
        self.total, self.warmup = max(total, 1), warmup
        self.t = 0
        self._values: list[float] = []
        if config.name not in BUILTIN_SCHEDULES:
            # the registered schedule runs on its own optimizer of lr 1: its lr is the factor
            self._unit = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)
            self._schedule = config.make(self._unit, self.total - self.warmup, key_path)
            self._values.append(float(self._unit.param_groups[0]["lr"]))
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("lr_scale", 1.0)
        self.apply()

    def schedule_factor(self, k: int) -> float:
        """The schedule's factor after ``k`` counts past the warm-up."""
        config = self.config
        if config.name == "constant":
            return 1.0
        if config.name == "cosine":
            progress = min(1.0, k / max(1, self.total - self.warmup))
            final = config.final_lr_factor
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        while len(self._values) <= k:
            with warnings.catch_warnings():  # its optimizer never steps, by design
                warnings.simplefilter("ignore", UserWarning)
                self._schedule.step()
            self._values.append(float(self._unit.param_groups[0]["lr"]))
        return self._values[k]

    def factor(self, t: int) -> float:
        if t < self.warmup:
            start = self.config.warmup_start_factor
            ramp = start + (1 - start) * t / self.warmup
            # the built-in schedules start at exactly 1
            return ramp if self.config.name in BUILTIN_SCHEDULES else ramp * self.schedule_factor(0)
        return self.schedule_factor(t - self.warmup)

    def apply(self) -> None:
        factor = self.factor(self.t)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * group.setdefault("lr_scale", 1.0) * factor

    def step(self) -> None:
        self.t += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        self.apply()


def make_optimizer(
    config: OptimizerConfig, groups: list[dict[str, Any]], key_path: str = ""
) -> torch.optim.Optimizer:
    """An optimizer from a recipe's optimizer section over ``groups`` (see
    ``OptimizerConfig.make``; errors name ``key_path``)."""
    return config.make(groups, key_path)


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The paper's two parameter groups of a quantized model: ``"quantizer"`` (every
    parameter inside a ``Quantizer`` and the layers' output scale α) and ``"weights"``
    (the rest: conv/linear weights, biases, BatchNorm affine); an empty group is left
    out (DoReFa has no quantizer parameters)."""
    parameters = dict(model.named_parameters())
    return {
        kind: [parameters[n] for n in names[0]] for kind, names in initial_layout(model).items()
    }


def quantizer_parameters(model: nn.Module) -> set[int]:
    """Ids of the quantizer parameters: every parameter inside a ``Quantizer`` module,
    and the quantized layers' ``output_scale``."""
    ids = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    for layer in quantized_layers(model).values():
        if layer.output_scale is not None:
            ids.add(id(layer.output_scale))
    return ids


def initial_layout(model: nn.Module) -> dict[str, list[list[str]]]:
    """One group per optimizer: the quantizer parameters and the rest (``weights``); an
    optimizer without parameters (DoReFa has no quantizer parameters) is left out."""
    quantizer = quantizer_parameters(model)
    names: dict[str, list[str]] = {"weights": [], "quantizer": []}
    for name, parameter in model.named_parameters():
        names["quantizer" if id(parameter) in quantizer else "weights"].append(name)
    return {kind: [found] for kind, found in names.items() if found}


def build_optimizers(
    model: nn.Module, layout: Layout, recipe: Recipe, steps_per_epoch: int
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, LRSchedule]]:
    """Optimizers whose param groups hold the named parameters of ``layout``, each with
    the recipe's schedule (counted in epochs or steps)."""
    return layout_optimizers(
        model,
        layout,
        {"weights": recipe.optimizers.weights, "quantizer": recipe.optimizers.quantizer},
        recipe.schedule,
        recipe.epochs,
        steps_per_epoch,
    )


def layout_optimizers(
    model: nn.Module,
    layout: Layout,
    configs: Mapping[str, OptimizerConfig],
    schedule: ScheduleConfig,
    epochs: int,
    steps_per_epoch: int,
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, LRSchedule]]:
    """``build_optimizers`` from the sections themselves."""
    parameters = dict(model.named_parameters())
    per_step = steps_per_epoch if schedule.unit == "step" else 1
    total, warmup = epochs * per_step, schedule.warmup_epochs * per_step
    optimizers, schedulers = {}, {}
    for kind, groups in layout.items():
        param_groups = [{"params": [parameters[n] for n in group]} for group in groups]
        optimizers[kind] = make_optimizer(configs[kind], param_groups, f"optimizers.{kind}")
        schedulers[kind] = LRSchedule(optimizers[kind], schedule, total, warmup)
    return optimizers, schedulers


def make_optimizers(
    model: nn.Module,
    *,
    epochs: int,
    steps_per_epoch: int = 1,
    weights: OptimizerConfig | Mapping[str, Any] | None = None,
    quantizer: OptimizerConfig | Mapping[str, Any] | None = None,
    schedule: ScheduleConfig | Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, LRSchedule]]:
    """The paper's two optimizers over ``parameter_groups(model)``, each with its
    learning-rate schedule, from plain keyword arguments: ``weights``, ``quantizer`` and
    ``schedule`` are recipe sections or mappings of their keys (``{"name": "adamw",
    "lr": 1e-3}``; left out: the recipe's defaults). Call each schedule's ``step()``
    once per epoch (or per step with ``schedule={"unit": "step", ...}``)."""
    sections = {
        "optimizers.weights": (weights, WeightsOptimizerConfig),
        "optimizers.quantizer": (quantizer, QuantizerOptimizerConfig),
        "schedule": (schedule, ScheduleConfig),
    }
    made: dict[str, Any] = {}
    for key_path, (value, cls) in sections.items():
        if isinstance(value, Section):
            made[key_path] = value
        else:
            made[key_path] = parse_section(cls, dict(value or {}), key_path)
    configs = {"weights": made["optimizers.weights"], "quantizer": made["optimizers.quantizer"]}
    return layout_optimizers(
        model, initial_layout(model), configs, made["schedule"], epochs, steps_per_epoch
    )


def group_layout(
    model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]
) -> dict[str, list[list[str]]]:
    """The current layout of ``optimizers``' param groups, by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        kind: [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        for kind, optimizer in optimizers.items()
    }


def check_param_groups(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    """Every model parameter is in exactly one param group of one optimizer."""
    counts: dict[int, int] = {}
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    wrong = [name for name, p in model.named_parameters() if counts.pop(id(p), 0) != 1]
    if wrong or counts:
        raise TrainingError(
            "every parameter must be in exactly one optimizer param group; wrong for: "
            + (", ".join(wrong) or f"{len(counts)} parameters that are not the model's")
        )


def move_to_group(
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, LRSchedule],
    parameters: Iterable[nn.Parameter],
    scale: float,
    **hyperparameters: Any,
) -> None:
    """Move ``parameters`` into a param group of their own (in whichever optimizer holds
    them) with ``lr_scale = scale`` and ``hyperparameters``; the other options are those
    of the group they came from. Optimizer state (momentum) is kept."""
    chosen = {id(p) for p in parameters}
    for kind, optimizer in optimizers.items():
        moved: list[nn.Parameter] = []
        template: dict[str, Any] | None = None
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in chosen]
            if len(kept) != len(group["params"]):
                template = template or group
                moved += [p for p in group["params"] if id(p) in chosen]
                group["params"] = kept
        if not moved:
            continue
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        assert template is not None
        new_group = {k: v for k, v in template.items() if k != "params"}
        new_group.update(hyperparameters, params=moved, lr_scale=scale)
        optimizer.add_param_group(new_group)
        schedulers[kind].apply()
