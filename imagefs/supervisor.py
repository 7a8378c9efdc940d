"""Keep a mount alive across crashes of the process that serves it: no dead mounts.

A mount daemon that died (SIGKILL, the OOM killer, a segfault in a C extension, a bug
that ends the trio run) used to leave a dead mount: every container on it got ENOTCONN
until someone unmounted it. Now the daemon is two processes:

- the **supervisor**, the process ``imagefs mount`` started (or the host agent forked):
  it prepares the mount, holds the FUSE connection (:mod:`imagefs.fuse_session`) and
  forks the server; it does no I/O for readers, so it has little reason to die;
- the **server**, forked from it, which serves the mount with pyfuse3 and trio as a
  daemon always did. When it dies while the kernel still has the connection, the
  supervisor forks a new one; readers see a pause, not an error, and every request the
  dead server had read is sent again to the new one.

Why a supervisor per mount rather than the host agent: the agent is optional (mounts
work without it) and serves every mount, so a restart or upgrade of the agent would
have to hand every connection on; a supervisor lives exactly as long as its mount, is
a few hundred lines, and forks servers that have everything imported already (it is
the process that imported them), so a replacement answers in milliseconds.

Restarts back off when a server crashes in a loop: the first crash is answered at once,
the next ones within :data:`WINDOW_S` after 0.5, 1, 2, ... seconds (at most
:data:`MAX_DELAY_S`); after :data:`MAX_CRASHES` crashes in the window the supervisor
gives up: it unmounts and lets go of the connection, and waiting readers get ENOTCONN
(bounded, where waiting for a server that cannot start would not be). The mount's log
says each crash and restart; ``imagefs stats`` shows ``restarts``.

SIGTERM or SIGINT to the supervisor are passed to the server, which unmounts cleanly as
before; the supervisor exits when the server does, or unmounts itself if no server is
running. Inode numbers and file handles mean the same to the next server (they are the
index's: see :mod:`imagefs.fuse_ops`), and every server negotiates the same INIT
choices (same pyfuse3, same options).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from imagefs.fuse_session import HeldConnection

log = logging.getLogger(__name__)

WINDOW_S = 300.0
MAX_CRASHES = 10
BASE_DELAY_S = 0.5
MAX_DELAY_S = 10.0
STOP_GRACE_S = 10.0  # after SIGTERM, how long the server has to unmount before it is killed


@dataclass
class Crash:
    """One server that ended while the mount was still there."""

    when: float  # time.time()
    pid: int
    how: str  # "killed by SIGKILL", "exited with status 1"

    def as_dict(self) -> dict[str, object]:
        return {"time": round(self.when, 3), "pid": self.pid, "how": self.how}


@dataclass
class Generation:
    """What a forked server knows about its place in the mount's life (it is forked, so
    this is the supervisor's state at fork time)."""

    number: int  # 0 for the server that made the mount answer, 1 for its first replacement...
    supervisor_pid: int
    supervisor_start: int | None  # the kernel's start time of the supervisor (imagefs.mount.process_start_time)
    crashes: list[Crash] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"restarts": self.number, "supervisor_pid": self.supervisor_pid,
                "crashes": [c.as_dict() for c in self.crashes[-5:]]}


# spawn(generation, status_fd) forks a server and returns its pid; the server writes a
# byte to status_fd once it serves (the first one: once the mount answers).
Spawn = Callable[[Generation, int], int]


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            name = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            name = f"signal {os.WTERMSIG(status)}"
        return f"killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Runs servers for one held connection until the mount goes away (see the module docstring)."""

    def __init__(self, conn: HeldConnection, spawn: Spawn, *, cleanup: Callable[[], None],
                 start_time: int | None = None, name: str | None = None, window_s: float = WINDOW_S,
                 max_crashes: int = MAX_CRASHES, base_delay_s: float = BASE_DELAY_S,
                 max_delay_s: float = MAX_DELAY_S) -> None:
        self.window_s = window_s
        self.max_crashes = max_crashes
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.conn = conn
        self.name = name or conn.mountpoint  # for messages: the mount as its users know it
        self.spawn = spawn
        self.cleanup = cleanup  # unmount what is still mounted (EROFS, then FUSE): when giving up or stopping
        self.gen = Generation(0, os.getpid(), start_time)
        self._stop: int | None = None  # the signal that asked us to stop
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop = signum

    def run(self) -> int:
        """Serve until the mount is gone; returns the exit status for the process."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            return self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old.items():
                signal.signal(s, h)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self.conn.close()

    def _loop(self) -> int:
        ready = False
        while True:
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            try:
                pid = self.spawn(self.gen, status_w)
            finally:
                os.close(status_w)
            try:
                status, served = self._wait(pid, status_r)
            finally:
                os.close(status_r)
            ready = ready or served
            if self._stop is not None:
                log.info("%s: stopped by %s", self.name, signal.Signals(self._stop).name)
                clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                if not clean and self.conn.connected():
                    self._give_up()  # the server could not unmount: do it here
                return 0 if clean else 1
            how = describe_status(status)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return 0  # the session ended: unmounted
            if not ready:
                log.error("%s: the mount daemon %d %s before the mount answered", self.name, pid, how)
                self._give_up()
                return 1
            if not self.conn.connected():
                log.info("%s: the mount daemon %d %s; the mount is gone already", self.name, pid, how)
                return 1
            now = time.time()
            self.gen.crashes.append(Crash(now, pid, how))
            recent = [c for c in self.gen.crashes if now - c.when < self.window_s]
            if len(recent) > self.max_crashes:
                log.error("%s: the mount daemon %d %s, its %d%s crash in %.0f s: giving up; the mount is removed "
                          "and its readers get ENOTCONN", self.name, pid, how, len(recent),
                          _nth(len(recent)), self.window_s)
                self._give_up()
                return 1
            delay = 0.0 if len(recent) == 1 else min(self.max_delay_s, self.base_delay_s * 2 ** (len(recent) - 2))
            log.warning("%s: the mount daemon %d %s; starting a new one%s (restart %d); readers wait meanwhile",
                        self.name, pid, how, f" in {delay:g} s" if delay else "", self.gen.number + 1)
            if delay and self._sleep(delay):
                log.info("%s: stopped by %s while no daemon ran", self.name,
                         signal.Signals(self._stop or signal.SIGTERM).name)
                self._give_up()
                return 0
            self.gen.number += 1

    def _wait(self, pid: int, status_r: int) -> tuple[int, bool]:
        """Wait for the server ``pid`` to end, passing on a stop signal; (its wait status,
        whether it said it served)."""
        pidfd = os.pidfd_open(pid)
        served = False
        killed_at: float | None = None
        forwarded = False
        try:
            p = select.poll()
            for fd in (pidfd, status_r, self._wake_r):
                p.register(fd, select.POLLIN)
            while True:
                if self._stop is not None and not forwarded:
                    forwarded = True
                    killed_at = time.monotonic() + STOP_GRACE_S
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                timeout = -1 if killed_at is None else max(0, int((killed_at - time.monotonic()) * 1000))
                events = dict(p.poll(timeout))
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                if status_r in events:
                    served = served or bool(os.read(status_r, 1))
                    p.unregister(status_r)
                if pidfd in events:
                    _, status = os.waitpid(pid, 0)
                    return status, served
                if killed_at is not None and time.monotonic() >= killed_at:
                    log.warning("%s: the mount daemon %d did not stop within %g s; killing it",
                                self.name, pid, STOP_GRACE_S)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed_at = None
        finally:
            os.close(pidfd)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; whether a stop signal came."""
        end = time.monotonic() + seconds
        while self._stop is None:
            left = end - time.monotonic()
            if left <= 0:
                return False
            select.select([self._wake_r], [], [], left)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 64)
        return True

    def _give_up(self) -> None:
        try:
            self.cleanup()
        except Exception:  # the connection is let go of anyway, which ends the mount
            log.exception("%s: unmounting failed", self.name)


def _nth(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


__all__ = ["Supervisor", "Generation", "Crash", "describe_status", "MAX_CRASHES", "WINDOW_S"]
