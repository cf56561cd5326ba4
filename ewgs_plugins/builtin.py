"""The core's own plugin: the backward rules, δ estimators, and torch's optimizers and
learning-rate schedules by name. Registered through
the ``ewgs_plugins`` entry point ``core``, like any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler

from .backward import ElementWiseGradientScaling, StraightThrough
from .delta import FixedDelta, HessianDelta
from .hookspecs import hookimpl


@hookimpl
def ewgs_backward_rules() -> Mapping[str, Callable[..., Any]]:
    return {"ste": StraightThrough, "ewgs": ElementWiseGradientScaling}


@hookimpl
def ewgs_delta_estimators() -> Mapping[str, Callable[..., Any]]:
    return {"fixed": FixedDelta, "hessian": HessianDelta}


#: torch optimizers left out: LBFGS steps with a closure, SparseAdam needs sparse gradients
_NOT_TRAINER_OPTIMIZERS = {"LBFGS", "SparseAdam"}


@hookimpl
def ewgs_optimizers() -> Mapping[str, Callable[..., Any]]:
    """Every ``torch.optim`` optimizer by its lower-case class name (``adamw``, ``sgd``)."""
    return {
        name.lower(): value
        for name, value in vars(torch.optim).items()
        if isinstance(value, type)
        and issubclass(value, torch.optim.Optimizer)
        and value is not torch.optim.Optimizer
        and name not in _NOT_TRAINER_OPTIMIZERS
    }


@hookimpl
def ewgs_lr_schedules() -> Mapping[str, Callable[..., Any]]:
    """torch's learning-rate schedulers that are a function of the step count."""
    return {
        "step": lr_scheduler.StepLR,
        "multistep": lr_scheduler.MultiStepLR,
        "exponential": lr_scheduler.ExponentialLR,
        "onecycle": lr_scheduler.OneCycleLR,
        "cosine_annealing": lr_scheduler.CosineAnnealingLR,
        "cosine_restarts": lr_scheduler.CosineAnnealingWarmRestarts,
        "polynomial": lr_scheduler.PolynomialLR,
        "linear": lr_scheduler.LinearLR,
        "cyclic": lr_scheduler.CyclicLR,
    }
