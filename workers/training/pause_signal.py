"""The pause request of a training process: SIGUSR1 sets a flag, from the process's first moment.

SIGUSR1's default action is to end the process, and the worker may send it whenever a tenant
asks for a pause. So the entry point (run.py) installs this flag-only handler before anything
slow is imported, and whatever acts on a pause reads the flag (progress.PauseRequest) or asks to
be told (the multi-process launcher) instead of installing a handler of its own later, which
would leave a window where a pause kills the run. Imports nothing but the standard library.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

_requested = False
_listeners: list[Callable[[], None]] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    for listener in list(_listeners):
        listener()


def install() -> None:
    """Make SIGUSR1 set the pause flag (idempotent; a flag already set stays set)."""
    signal.signal(signal.SIGUSR1, _on_signal)


def requested() -> bool:
    """Whether this process was asked to pause."""
    return _requested


def when_requested(listener: Callable[[], None]) -> Callable[[], None]:
    """Call ``listener`` on every pause request, and at once if one already arrived; returns
    the function that stops the calls."""
    _listeners.append(listener)
    if _requested:
        listener()
    return lambda: _listeners.remove(listener)
