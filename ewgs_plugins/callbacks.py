"""Placeholder: built-in training callbacks are being written (issue 4)."""

from collections.abc import Callable, Mapping
from typing import Any

from .hookspecs import hookimpl


@hookimpl
def ewgs_callbacks() -> Mapping[str, Callable[..., Any]]:
    return {}
