"""The errors a user can cause. Each names what was wrong and where."""

from __future__ import annotations

import pickle
import reprlib
from typing import Any

#: the longest message an error carries (a longer one is cut, saying so)
MAX_MESSAGE = 1000
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 3, 6, 6, 6, 6


def quote(value: Any) -> str:
    """``repr(value)`` cut short (long strings, deep or long containers: ``...``), for
    an error to show a user's value: a recipe's value may be huge."""
    return _SHORT.repr(value)


class EwgsError(Exception):
    """Base class of every error the library raises on bad input."""


class ConfigError(EwgsError, ValueError):
    """A recipe or plugin option is wrong; ``key_path`` says which one (``method.options.bits``)."""

    def __init__(self, key_path: str, message: str, source: str | None = None) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + f"... ({len(message) - MAX_MESSAGE} more characters)"
        self.key_path = key_path
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key_path}: {message}" if key_path else f"{where}{message}")


class PluginError(EwgsError):
    """A plugin failed to load, registered a name twice, or was asked for by an unknown name."""


class TrainingError(EwgsError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


class ExportError(EwgsError):
    """A model cannot be exported: a method that does not state its integer map, a run
    directory without a checkpoint, a missing optional dependency."""


class RunDirError(EwgsError):
    """A run directory cannot be written (a full disk, a read-only file system), is in
    use by another process, or holds a damaged file; the message names the file."""


class FolderInUse(RunDirError):
    """Another live process holds the folder's lock; ``holder`` says which (its PID, host
    and start time)."""

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder


def load_failure(error: Exception) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` of a user's file
    failed. Torch's own message spans lines and suggests ``weights_only=False``, which
    would run code from the file: neither belongs in an error."""
    if isinstance(error, pickle.UnpicklingError):
        return (
            "it holds objects other than tensors and plain values, which are never loaded "
            "(loading them could run code from the file)"
        )
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}"
