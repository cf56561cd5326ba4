"""The core's own plugin: the backward rules and δ estimators. Registered through
the ``ewgs_plugins`` entry point ``core``, like any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .backward import ElementWiseGradientScaling, StraightThrough
from .delta import FixedDelta, HessianDelta
from .hookspecs import hookimpl


@hookimpl
def ewgs_backward_rules() -> Mapping[str, Callable[..., Any]]:
    return {"ste": StraightThrough, "ewgs": ElementWiseGradientScaling}


@hookimpl
def ewgs_delta_estimators() -> Mapping[str, Callable[..., Any]]:
    return {"fixed": FixedDelta, "hessian": HessianDelta}
