"""Signals of ``imagefs run``: forwarded to the container, and never a leftover.

``imagefs run`` is a foreground process that people stop with Ctrl-C, close the
terminal or SSH session under (SIGHUP), send SIGQUIT, or stop from a supervisor
(SIGTERM). :class:`SignalGuard` holds handlers for all four for the whole run:

- before the container runs, a signal ends the setup: :class:`Interrupted` unwinds
  it through the ``finally`` blocks that undo each step, except inside
  :meth:`SignalGuard.deferred` (starting a mount, mounting the overlay), where it
  waits until the step is whole, so that the undoing finds what it expects;
- while runc runs, each signal is forwarded to the container (as ``docker run``
  does), and the container gets a grace period to exit (``stop_timeout`` for
  SIGTERM and SIGHUP, as ``docker stop``; 2 s for SIGINT and SIGQUIT, which a person
  types) before it is killed; a second terminating signal kills it at once;
- once the container has exited, signals are held off until the clean-up is done.

runc runs in a process group of its own unless its stdin is a terminal (it must then
stay in the terminal's foreground group to read it), so that a signal the terminal
sends to our group reaches the container once, through us. With ``-t`` the terminal
is in raw mode (Ctrl-C is a byte for the container, not a signal); with ``-i`` alone
on a terminal, a Ctrl-C reaches runc too, and the container gets SIGINT twice. SIGUSR1/SIGUSR2 are
forwarded too; SIGWINCH is runc's own business (it resizes the container's terminal).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
from types import FrameType
from typing import Callable, Iterator

log = logging.getLogger(__name__)

TERMINATING = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)
KEYBOARD_GRACE_S = 2.0  # after SIGINT/SIGQUIT: a person is waiting
DEFAULT_STOP_TIMEOUT_S = 10.0  # after SIGTERM/SIGHUP: docker stop's default


class Interrupted(Exception):
    """A terminating signal arrived before the container ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """Signal handling for one ``imagefs run`` (see the module docstring)."""

    def __init__(self, stop_timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        self.stop_timeout = stop_timeout
        self._previous: dict[int, object] = {}
        self._phase = "setup"  # setup -> running -> cleanup
        self._deferring = 0
        self._pending: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._kill: Callable[[], None] | None = None
        self._terminations = 0
        self._timers: list[threading.Timer] = []
        self.received: list[int] = []

    def __enter__(self) -> "SignalGuard":
        for sig in (*TERMINATING, *FORWARDED):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for timer in self._timers:
            timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    # -- the phases ----------------------------------------------------------------

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A step of the setup that a signal must not cut in half."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._pending is not None and self._phase == "setup":
            raise Interrupted(self._pending)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a terminating signal arrived (at a step boundary)."""
        if self._pending is not None and self._phase == "setup":
            raise Interrupted(self._pending)

    def running(self, proc: subprocess.Popen[bytes], kill: Callable[[], None]) -> None:
        """runc is running ``proc``'s container: forward from now on. A signal that came
        during the last deferred step is forwarded now."""
        self._proc, self._kill, self._phase = proc, kill, "running"
        if self._pending is not None:
            self._forward(self._pending)

    def finished(self) -> None:
        """The container has exited: hold signals off until the clean-up is done."""
        self._phase = "cleanup"
        for timer in self._timers:
            timer.cancel()

    # -- the handler ---------------------------------------------------------------

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._phase == "running":
            self._forward(signum)
        elif self._phase == "setup" and signum in TERMINATING:
            if self._pending is None:
                self._pending = signum
            if not self._deferring:
                raise Interrupted(signum)
        # cleanup (or a USR signal before there is a container): nothing to do

    def _forward(self, signum: int) -> None:
        assert self._proc is not None and self._kill is not None
        if self._proc.poll() is not None:
            return
        if signum not in TERMINATING:
            self._proc.send_signal(signum)  # runc passes it on to the container
            return
        self._terminations += 1
        if self._terminations > 1:
            log.warning("second %s: killing the container", signal.Signals(signum).name)
            self._kill_in_thread()
            return
        self._proc.send_signal(signum)
        grace = KEYBOARD_GRACE_S if signum in (signal.SIGINT, signal.SIGQUIT) else self.stop_timeout
        timer = threading.Timer(grace, self._kill)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _kill_in_thread(self) -> None:
        assert self._kill is not None
        threading.Thread(target=self._kill, daemon=True).start()
