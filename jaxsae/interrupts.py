"""Signals: SIGTERM outside training (the command stops, removing what it was staging), and
SIGINT / SIGTERM during training (a checkpoint after the step, on every process at the same
step, then a clean exit).

Imports no JAX at module level: the command line installs its handler before any heavy import.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import numpy as np


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the outputs it was staging are removed as
    on Ctrl-C (training handles SIGTERM itself: a checkpoint, then exit 143)."""


_pending = 0
"""The signal (SIGTERM or SIGINT) that reached the command line's handler. Its exception can
be lost (raised inside a callback whose exceptions Python only prints, e.g. a garbage-collection
hook of JAX's: fault testing saw a Ctrl-C lost so, the command finishing with exit 0 and
replacing its output), so the long loops and every publication re-raise it
(`check_terminated`), and training, which starts after, reads it and stops at its first
step."""


def raise_terminated(signum, frame) -> None:
    """The command line's SIGTERM handler outside training."""
    global _pending
    _pending = signal.SIGTERM
    raise Terminated


def raise_interrupted(signum, frame) -> None:
    """The command line's SIGINT handler outside training: Python's, remembering the signal."""
    global _pending
    _pending = _pending or signal.SIGINT
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """The command line's SIGTERM and SIGINT handling outside training (`raise_terminated`,
    `raise_interrupted`); their exceptions raised where Python can only print them (a callback,
    a finalizer) are not printed (stray `Exception ignored … KeyboardInterrupt` lines beside
    the one-line message, seen in fault testing): the signal stays pending, and the command
    stops at its next check (`check_terminated`) or training's first step."""
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, raise_interrupted)
    previous = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # (Terminated is one)
            previous(unraisable)

    sys.unraisablehook = hook


def check_terminated() -> None:
    """Raises the signal's exception again if a SIGTERM or SIGINT came (see `_pending`): the
    long loops (every progress update) and every publication of an output call it, so that
    one whose exception was lost still stops the command."""
    if not _pending or threading.current_thread() is not threading.main_thread():
        return
    if _pending == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


def pending() -> int:
    """The signal number of a SIGTERM / SIGINT the command has not acted on yet (0: none)."""
    return _pending


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that SIGINT / SIGTERM do not interrupt: one that arrives meanwhile is handled
    as it would have been (its handler called) when the block ends. (Outside the main thread,
    where Python runs no handler, a plain block.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def clear_terminated() -> None:
    """A new command (several run in one process from Python or the tests), or a signal
    acted on."""
    global _pending
    _pending = 0


class SignalFlag:
    """SIGINT / SIGTERM ask the loop to save a checkpoint after a step and stop; a second
    Ctrl-C aborts. The loop calls `stop_after(step)` after every step.

    With several processes, all must stop after the same step (a checkpoint is a collective
    write), whenever the signal reached each, or only one of them. SIGTERM is then left to
    JAX's preemption notifier (jax.distributed installs it): the coordination service agrees on
    the step (`multihost_utils.reached_preemption_sync_point`); a Ctrl-C is passed on to it as a
    SIGTERM of this process. Without that service (turned off by the user) the processes agree
    through a collective after every step."""

    def __init__(self):
        import jax
        from jax.experimental import multihost_utils

        self._multihost = multihost_utils
        self.signum = 0
        self._previous = {}
        processes = jax.process_count()
        # jax.distributed.initialize starts the notifier when this option is on (the default)
        self._preemption = processes > 1 and bool(jax.config.jax_enable_preemption_service)
        self._gather = processes > 1 and not self._preemption
        signals = (signal.SIGINT,) if self._preemption else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        if _pending:  # a signal before the loop whose exception was lost: handled here
            signum = _pending
            clear_terminated()
            self._handle(signum, None)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        below_a_bar = "\n" if sys.stderr.isatty() else ""  # (a terminal's progress bar)
        print(f"{below_a_bar}{signal.Signals(signum).name}: saving a checkpoint after this "
              f"step{again}", file=sys.stderr)
        if self._preemption:  # to JAX's notifier: every process stops
            signal.raise_signal(signal.SIGTERM)

    def stop_after(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer)."""
        if self._preemption:
            if not self._multihost.reached_preemption_sync_point(step):
                return False
            self.signum = self.signum or signal.SIGTERM
            return True
        if self._gather:
            self.signum = int(self._multihost.process_allgather(
                np.asarray(self.signum, np.int32)).max())
        return self.raised

    def came_during_last_save(self, step: int) -> bool:
        """After the last step's checkpoint is written: whether a signal came after the loop's
        last `stop_after` (fault testing: one during the final save was acknowledged, and then
        the run evaluated, exported and exited 0). With JAX's preemption service, whose sync
        point at that step has passed, False: the signal reaches its notifier, not here."""
        return not self._preemption and self.stop_after(step)

    @property
    def raised(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
