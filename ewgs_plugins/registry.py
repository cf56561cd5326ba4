"""The plugin manager: loads every plugin of the ``ewgs_plugins`` entry-point group
(the built-ins come in the same way as a third-party package) and serves its
contributions by kind and name."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from .errors import ConfigError, PluginError
from .hookspecs import PROJECT, RegistrySpec
from .options import call_with_options

ENTRY_POINT_GROUP = "ewgs_plugins"

#: kind -> (hook name, how the kind is named in messages)
KINDS: dict[str, tuple[str, str]] = {
    "method": ("ewgs_methods", "quantizer method"),
    "backward": ("ewgs_backward_rules", "backward rule"),
    "delta": ("ewgs_delta_estimators", "δ estimator"),
    "model": ("ewgs_models", "model"),
    "dataset": ("ewgs_datasets", "dataset"),
    "callback": ("ewgs_callbacks", "training callback"),
    "weights": ("ewgs_weights", "weights name"),
    "optimizer": ("ewgs_optimizers", "optimizer"),
    "schedule": ("ewgs_lr_schedules", "learning-rate schedule"),
}


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, factory and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str


def _distribution_name(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else "?"


class _Problems:
    """Where loading the plugins reports a problem: raised as a ``PluginError`` (strict,
    for everything that trains), or written down and skipped (``ewgs plugins``, which
    must still list what did load)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.messages: list[str] = []

    def report(self, message: str, cause: BaseException | None = None) -> None:
        if self.strict:
            raise PluginError(message) from cause
        self.messages.append(message)


class Registry:
    """Named plugin contributions of every kind, checked for clashes when built.
    ``failed`` lists the problems that were skipped (only when built with
    ``strict=False``)."""

    def __init__(
        self,
        manager: pluggy.PluginManager,
        distributions: Mapping[str, str],
        problems: _Problems | None = None,
    ) -> None:
        self.manager = manager
        self._distributions = dict(distributions)
        self._problems = problems or _Problems(strict=True)
        self._entries: dict[str, dict[str, Entry]] = {kind: self._collect(kind) for kind in KINDS}

    def _collect(self, kind: str) -> dict[str, Entry]:
        hook_name, label = KINDS[kind]
        found: dict[str, Entry] = {}
        # pluggy calls the most recently registered implementation first; collect in
        # registration order so messages read naturally.
        for impl in reversed(getattr(self.manager.hook, hook_name).get_hookimpls()):
            plugin = impl.plugin_name
            try:
                contributed = impl.function()
            except Exception as exc:
                self._problems.report(
                    f"plugin {plugin!r} failed while registering {label}s: "
                    f"{type(exc).__name__}: {exc}",
                    exc,
                )
                continue
            if contributed is None:
                continue
            if not isinstance(contributed, Mapping):
                self._problems.report(
                    f"plugin {plugin!r}: hook {hook_name} must return a mapping "
                    f"name -> factory, got {type(contributed).__name__}"
                )
                continue
            for name, factory in contributed.items():
                if name in found:
                    self._problems.report(
                        f"{label} {name!r} is registered twice: by plugin "
                        f"{found[name].plugin!r} ({found[name].distribution}) and by plugin "
                        f"{plugin!r} ({self._distributions.get(plugin, '?')})"
                    )
                    continue
                if not callable(factory):
                    self._problems.report(f"plugin {plugin!r}: {label} {name!r} is not callable")
                    continue
                found[name] = Entry(
                    kind, name, factory, plugin, self._distributions.get(plugin, "?")
                )
        return found

    @property
    def failed(self) -> list[str]:
        return list(self._problems.messages)

    def entries(self, kind: str) -> dict[str, Entry]:
        """Every entry of ``kind``, by name."""
        return dict(self._entries[kind])

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def get(self, kind: str, name: str, key_path: str = "") -> Entry:
        """The entry ``name`` of ``kind``; an unknown name lists the known ones."""
        label = KINDS[kind][1]
        entry = self._entries[kind].get(name)
        if entry is None:
            known = ", ".join(self.names(kind)) or "none"
            message = f"unknown {label} {name!r}; known: {known}"
            if key_path:
                raise ConfigError(key_path, message)
            raise PluginError(message)
        return entry

    def create(
        self, kind: str, name: str, options: Mapping[str, Any] | None = None, key_path: str = ""
    ) -> Any:
        """Build ``name`` of ``kind`` from recipe options (checked against its factory)."""
        entry = self.get(kind, name, key_path)
        options_path = f"{key_path}.options" if key_path else ""
        return call_with_options(
            entry.factory, options, options_path, what=f"{KINDS[kind][1]} {name!r}"
        )


def load_manager(
    extra_plugins: Iterable[tuple[str, object]] = (), problems: _Problems | None = None
) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A plugin manager with every ``ewgs_plugins`` entry point loaded, plus
    ``extra_plugins`` (name, plugin object) registered after them. A plugin that
    cannot be loaded is a ``PluginError``, or, given non-strict ``problems``, written
    there and left out."""
    problems = problems or _Problems(strict=True)
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(RegistrySpec)
    distributions: dict[str, str] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        dist = _distribution_name(entry_point)
        where = f"plugin {entry_point.name!r} (distribution {dist}, {entry_point.value})"
        if entry_point.name in distributions:
            problems.report(
                f"two plugins are named {entry_point.name!r}: one from distribution "
                f"{distributions[entry_point.name]} and one from {dist}"
            )
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:
            problems.report(f"{where} failed to import: {type(exc).__name__}: {exc}", exc)
            continue
        other = manager.get_name(plugin)
        if other is not None:
            problems.report(
                f"{where} is the module that plugin {other!r} (distribution "
                f"{distributions[other]}) registers already; a module is one plugin: "
                "remove one of the two entry points"
            )
            continue
        manager.register(plugin, name=entry_point.name)
        distributions[entry_point.name] = dist
    for name, plugin in extra_plugins:
        if name in distributions:
            problems.report(f"two plugins are named {name!r}")
            continue
        manager.register(plugin, name=name)
        distributions[name] = "(registered in code)"
    return manager, distributions


def load_registry(*, strict: bool = True) -> Registry:
    """A registry of every plugin, loaded now. ``strict=False``: a plugin that fails
    is left out and named in ``Registry.failed`` instead of raising."""
    problems = _Problems(strict)
    manager, distributions = load_manager(_extra_plugins, problems)
    return Registry(manager, distributions, problems)


_extra_plugins: list[tuple[str, object]] = []


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object from code (no distribution needed), for all later
    look-ups in this process."""
    _extra_plugins.append((name, plugin))
    reset_registry()


def unregister_plugin(name: str) -> None:
    _extra_plugins[:] = [(n, p) for n, p in _extra_plugins if n != name]
    reset_registry()


@functools.cache
def registry() -> Registry:
    """The process-wide registry (built on first use; any plugin problem raises)."""
    return load_registry()


def reset_registry() -> None:
    """Forget the loaded plugins so that the next ``registry()`` loads them anew."""
    registry.cache_clear()
