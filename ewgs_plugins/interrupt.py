"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (what schedulers, ``timeout``,
``kill`` and systemd send) both stop a command the same way.

Inside ``handling()`` either signal raises ``Interrupted`` (a ``KeyboardInterrupt``) in
the main thread, so every ``finally`` and context manager on the way out runs: the run
directory's lock is let go, a temporary file is removed, the last checkpoint (the last
finished epoch) stays as it was. The command line prints one line and exits with
``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a process
killed by that signal.

A few steps must not be cut in two (a lock file removed but not yet closed, a file moved
into place): inside ``deferred()`` a signal is noted and raised when the step is done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: the signals that stop a command
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by signal ``signum``; ``status`` is the exit status that says so."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.status = 128 + signum
        super().__init__(f"interrupted by {self.name}")


#: how many ``deferred`` blocks are open, and the signal that arrived inside one
_depth = 0
_pending: int | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """A step a signal must not cut in two: a signal that arrives inside is raised
    when the (outermost) block ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


@contextmanager
def handling(*, then_default: bool = False) -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise ``Interrupted``; afterwards the previous
    handlers are back, or with ``then_default`` the system's default (the process ends
    at once on a signal: what a program's entry point wants once its work is done, as
    the interpreter's own shutdown would otherwise leave a signal unanswered for a
    while). Outside the main thread (where Python cannot catch signals) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if then_default else handler)
