"""The errors a user can cause. Each names what was wrong and where."""

from __future__ import annotations


class EwgsError(Exception):
    """Base class of every error the library raises on bad input."""


class ConfigError(EwgsError, ValueError):
    """A recipe or plugin option is wrong; ``key_path`` says which one (``method.options.bits``)."""

    def __init__(self, key_path: str, message: str, source: str | None = None) -> None:
        self.key_path = key_path
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key_path}: {message}" if key_path else f"{where}{message}")


class PluginError(EwgsError):
    """A plugin failed to load, registered a name twice, or was asked for by an unknown name."""


class TrainingError(EwgsError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


class RunDirError(EwgsError):
    """A run directory cannot be written (a full disk, a read-only file system), is in
    use by another process, or holds a damaged file; the message names the file."""
