"""Placeholder: the lsq quantizer method is being written (issue 3)."""

from collections.abc import Callable, Mapping
from typing import Any

from ewgs_plugins.hookspecs import hookimpl


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {}
