"""Placeholder: models by name are being written (issue 3)."""

from collections.abc import Callable, Mapping
from typing import Any

from .hookspecs import hookimpl


@hookimpl
def ewgs_models() -> Mapping[str, Callable[..., Any]]:
    return {}
