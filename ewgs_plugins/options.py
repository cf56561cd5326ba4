"""Typed keyword options: checking a value against an annotation, and calling a
plugin factory with the options of a recipe. Every failure is a ``ConfigError``
that names the key path."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from .errors import ConfigError, quote


def describe_type(annotation: Any) -> str:
    """A short human name for an annotation: ``int``, ``float or None``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        inner = describe_type(args[0]) if args else "any value"
        return f"a list of {inner}"
    if origin is dict or annotation is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def check_type(value: Any, annotation: Any, key_path: str) -> Any:
    """Return ``value`` (an int widened to float where a float is expected) if it
    matches ``annotation``; otherwise raise ``ConfigError`` naming ``key_path``."""
    converted = _convert(value, annotation)
    if converted is _MISMATCH:
        raise ConfigError(
            key_path,
            f"expected {describe_type(annotation)}, got {quote(value)} ({type(value).__name__})",
        )
    return converted


_MISMATCH = object()


def _convert(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    if origin is Literal:
        return value if value in typing.get_args(annotation) else _MISMATCH
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            converted = _convert(value, option)
            if converted is not _MISMATCH:
                return converted
        return _MISMATCH
    if annotation is type(None):
        return None if value is None else _MISMATCH
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        items = [_convert(v, inner) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else items
    if origin is dict or annotation is dict:
        return dict(value) if isinstance(value, Mapping) else _MISMATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _MISMATCH
        return float(value)
    if annotation is str:
        return value if isinstance(value, str) else _MISMATCH
    if isinstance(annotation, type):
        return value if isinstance(value, annotation) else _MISMATCH
    return value


def factory_options(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword options a factory accepts, with resolved annotations."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check nothing rather than guess
        hints = {}
    return {
        name: param.replace(annotation=hints.get(name, param.annotation))
        for name, param in signature.parameters.items()
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }


def call_with_options(
    factory: Callable[..., Any],
    options: Mapping[str, Any] | None,
    key_path: str,
    *,
    what: str,
) -> Any:
    """Call ``factory(**options)`` after checking names and types of ``options``.

    ``what`` names the thing being built for messages (``method 'lsq'``). A
    ``ValueError`` the factory raises becomes a ``ConfigError`` at ``key_path``;
    a ``ConfigError`` it raises has ``key_path`` put in front of its own.
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(key_path, f"options of {what} must be a mapping, got {quote(options)}")
    accepted = factory_options(factory)
    takes_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(factory).parameters.values()
    )
    checked: dict[str, Any] = {}
    for key, value in options.items():
        path = f"{key_path}.{key}" if key_path else str(key)
        if key not in accepted:
            if takes_any:
                checked[key] = value
                continue
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(path, f"unknown option of {what}; known options: {known}")
        checked[key] = check_type(value, accepted[key].annotation, path)
    missing = [
        name
        for name, p in accepted.items()
        if p.default is inspect.Parameter.empty and name not in checked
    ]
    if missing:
        raise ConfigError(key_path, f"{what} needs option(s): {', '.join(missing)}")
    try:
        return factory(**checked)
    except ConfigError as error:
        inner = (
            f"{key_path}.{error.key_path}"
            if key_path and error.key_path
            else (key_path or error.key_path)
        )
        raise ConfigError(inner, str(error).split(": ", 1)[-1]) from None
    except ValueError as error:
        raise ConfigError(key_path, f"{what}: {error}") from None
