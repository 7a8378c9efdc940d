"""Mounts seen from the caller: start one, find them, ask one for stats, unmount it.

The serving side is :mod:`imagefs.daemon`; this module is what ``imagefs mount``,
``umount``, ``stats`` and ``run`` use, and what a daemon shares with them (options,
run-directory paths, the readiness protocol).

- ``start_mount`` asks the host agent (:mod:`imagefs.agent`) to fork a daemon when its
  socket answers, and otherwise spawns ``python -m imagefs.daemon`` in a session of
  its own; either way it waits on a pipe until the daemon has stat'ed its own
  mountpoint through the kernel, so when it returns the mount answers. A daemon that
  fails writes its error to that pipe, and the caller raises it as :class:`MountError`.
- The daemon keeps a stats socket, its log and a small JSON record of what is mounted
  under the run directory (``$IMAGEFS_RUN_DIR`` or /run/imagefs), named after the
  mountpoint (:class:`RunPaths`).
- With an agent, the ``imagefs mount`` process itself is most of a mount's latency,
  so this module imports little at module level: no logging, dataclasses, argparse, signal,
  subprocess or socket (each is imported where it is used, off the agent path).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import stat
import sys
import time
from collections import namedtuple

import blake3

# typing costs ~3 ms to import and is needed only by type checkers here (mypy reads this as typing.TYPE_CHECKING)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any

GiB = 1 << 30
MiB = 1 << 20
INFO = 20  # logging.INFO, without importing logging
FSTYPE = "fuse.imagefs"
EROFS_FSTYPE = "erofs"
# An EROFS mount is imagefs's when its source (the metadata image) is named like this.
EROFS_META_PREFIX = "imagefs-"
EROFS_META_SUFFIX = ".erofs"
FS_MODES = ("auto", "erofs", "fuse")
AGENT_SOCKET_NAME = "agent.sock"
READY = b"ready\n"
ERROR_PREFIX = b"error: "
# Environment variable naming handlers to fail with an unexpected exception
# (comma-separated operation names): the test hook for the EIO-not-crash path.
FAULT_ENV = "IMAGEFS_FAULT_OPS"
CACHE_SECRET_ENV = "IMAGEFS_CACHE_SECRET"
# Seconds a read waits for file data before EIO (the chain's deadline: cache.chain).
DEFAULT_READ_TIMEOUT = 30.0


class MountError(Exception):
    """The mount could not be made, answered, or undone; the message says why."""


class AgentUnavailable(Exception):
    """No host agent answers (or it refused): spawn a daemon instead."""


def _log() -> Any:
    """This module's logger, imported on first use: nothing on the agent path logs."""
    import logging

    return logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$IMAGEFS_CACHE_DIR``, else /var/cache/imagefs for root, else the XDG cache."""
    env = os.environ.get("IMAGEFS_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/imagefs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "imagefs")


def run_dir() -> str:
    """Where daemons keep their stats socket, log and record."""
    return os.environ.get("IMAGEFS_RUN_DIR") or ("/run/imagefs" if os.geteuid() == 0 else
                                                  os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "imagefs"))


def private_run_dir() -> str:
    """:func:`run_dir`, made 0700 (see :mod:`cache.private`): the default one is imagefs's
    own and is tightened if an older version left it wider; one named by
    ``$IMAGEFS_RUN_DIR`` is only created so. What goes in it is 0600 either way."""
    from cache.private import private_dir

    return private_dir(run_dir(), owned=not os.environ.get("IMAGEFS_RUN_DIR"))


class MountOptions:
    """How to serve a mount: where chunks come from and how much may be cached.

    ``cache_size`` 0 disables the SSD tier; ``az_cache`` lists the zone's cache servers
    (``host:port``), asked before the blob store. ``read_timeout`` is the most one read
    waits for file data (every tier tried, retries included) before it fails with EIO
    naming the chunk. ``fs`` is how the tree is served:
    ``erofs`` (the kernel's EROFS over imagefs's metadata, file data through FUSE:
    :mod:`imagefs.erofs`), ``fuse`` (every request through FUSE) or ``auto`` (EROFS
    where this kernel can, else FUSE); ``store_budget`` (``"BURST[,PER_S]"``, None: the
    default) bounds the blob-store reads a mount with ``az_cache`` makes itself
    (:mod:`cache.storebudget`). (A plain class, not a dataclass: see the module docstring.)
    """

    __slots__ = ("store", "s3_endpoint", "cache_dir", "cache_size", "memory_size", "az_cache", "prefetch", "fs",
                 "replay", "record", "record_quiet_s", "record_max_s", "record_merge", "read_ahead_kb",
                 "store_budget", "prefetch_rate", "read_timeout")

    def __init__(self, store: str | None = None, s3_endpoint: str | None = None, cache_dir: str | None = None,
                 cache_size: int = 10 * GiB, memory_size: int = 512 * MiB, az_cache: list[str] | None = None,
                 prefetch: bool = True, fs: str = "auto", replay: bool = True, record: bool = False,
                 record_quiet_s: float = 10.0, record_max_s: float = 300.0, record_merge: bool = True,
                 read_ahead_kb: int | None = None, store_budget: str | None = None,
                 prefetch_rate: int = 64 * MiB, read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.store = store
        self.s3_endpoint = s3_endpoint
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self.memory_size = memory_size
        self.az_cache: list[str] = list(az_cache or [])
        self.prefetch = prefetch  # bring the image's chunks to the SSD tier in the background
        if fs not in FS_MODES:
            raise ValueError(f"fs must be one of {', '.join(FS_MODES)}, not {fs!r}")
        self.fs = fs
        self.replay = replay  # stream the image's startup profile at mount, if it has one
        self.record = record  # record a startup profile and save it to the store
        self.record_quiet_s = record_quiet_s  # ... until nothing new is read for this long
        self.record_max_s = record_max_s  # ... or this long after the mount at most
        self.record_merge = record_merge  # merge into the image's profile (False: replace it)
        self.read_ahead_kb = read_ahead_kb  # the kernel's readahead window (None: imagefs.readahead's default)
        self.prefetch_rate = prefetch_rate  # bytes/s of the rest of the image after a profile (0: no bound)
        self.store_budget = store_budget
        if not read_timeout > 0:
            raise ValueError(f"read_timeout must be a positive number of seconds, not {read_timeout!r}")
        self.read_timeout = float(read_timeout)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MountOptions) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return "MountOptions(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    def index_cache_dir(self) -> str | None:
        """Where this host keeps verified copies of indexes (with the SSD tier), if anywhere."""
        return (self.cache_dir or default_cache_dir()) if self.cache_size > 0 else None

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> "MountOptions":
        return cls(**json.loads(text))


class RunPaths(namedtuple("RunPaths", "mountpoint socket log record")):
    """The files a daemon keeps for the mount at ``mountpoint``."""

    __slots__ = ()
    mountpoint: str
    socket: str
    log: str
    record: str

    @classmethod
    def of(cls, mountpoint: str) -> "RunPaths":
        mp = os.path.realpath(mountpoint)
        # blake3, not hashlib: hashlib loads OpenSSL, ~3 ms of every 'imagefs mount'
        key = blake3.blake3(mp.encode()).hexdigest()[:16]
        base = os.path.join(run_dir(), key)
        return cls(mp, base + ".sock", base + ".log", base + ".json")

    def beside(self, suffix: str) -> str:
        """Another run-directory path of this mount, e.g. ``.blob`` (an EROFS mount's blob)."""
        return self.record[: -len(".json")] + suffix


class MountInfo(namedtuple("MountInfo", "mountpoint device fstype source")):
    """One line of /proc/self/mountinfo that is an imagefs mount (``fstype`` is FSTYPE
    for a FUSE mount, EROFS_FSTYPE for an EROFS one)."""

    __slots__ = ()
    mountpoint: str
    device: str  # major:minor
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field_:
        return field_
    return field_.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def is_erofs_metadata(source: str) -> bool:
    """Whether a mount source is EROFS metadata that imagefs wrote (see imagefs.erofs.session)."""
    base = os.path.basename(source)
    return base.startswith(EROFS_META_PREFIX) and base.endswith(EROFS_META_SUFFIX)


def find_mounts() -> list[MountInfo]:
    """Every imagefs mount visible in this mount namespace: FUSE mounts of an image and
    EROFS mounts of imagefs metadata (not the private FUSE mounts of their blobs)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(parts) < 5 or len(rparts) < 2:
                continue
            if rparts[0] == FSTYPE or (rparts[0] == EROFS_FSTYPE and is_erofs_metadata(_unescape(rparts[1]))):
                out.append(MountInfo(_unescape(parts[4]), parts[2], rparts[0], _unescape(rparts[1])))
    return out


def mount_at(real_path: str) -> MountInfo | None:
    """The imagefs mount at ``real_path`` (the topmost if stacked), read from /proc only."""
    found = [m for m in find_mounts() if m.mountpoint == real_path]
    return found[-1] if found else None


def mounted_at(real_path: str) -> bool:
    """Whether an imagefs mount sits at ``real_path`` (already resolved: this reads only
    /proc, never the path, so it is safe even when the mount does not answer)."""
    return any(m.mountpoint == real_path for m in find_mounts())


def is_imagefs_mount(mountpoint: str) -> bool:
    return mounted_at(os.path.realpath(mountpoint))


def check_mountpoint(mountpoint: str) -> str:
    mp = os.path.realpath(mountpoint)
    if mounted_at(mp):
        try:  # opening the root is never answered from the kernel's caches
            os.close(os.open(mp, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:  # ENOTCONN: its daemon died without unmounting
            raise MountError(f"mountpoint {mountpoint}: a dead imagefs mount is there ({e.strerror}); "
                             f"remove it with 'imagefs umount {mountpoint}'") from None
        raise MountError(f"mountpoint {mountpoint}: an imagefs image is already mounted there")
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint}: no such directory") from None
    except OSError as e:
        raise MountError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint}: not a directory")
    return mp


# -- the caller side ---------------------------------------------------------------------

_children: dict[int, subprocess.Popen[bytes]] = {}


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return " | ".join(tail)


def start_mount(image: str, mountpoint: str, opts: MountOptions, *, timeout: float = 30.0,
                log_level: int = INFO, use_agent: bool = True) -> int:
    """Start a daemon serving ``image`` at ``mountpoint``; return its pid once the mount
    answers. Raises :class:`MountError` with the daemon's own message if it cannot.

    The daemon is forked by the host agent (``imagefs agent``) when one answers, which
    skips starting Python and importing the read path; otherwise it is spawned.
    """
    mp = check_mountpoint(mountpoint)
    paths = RunPaths.of(mp)
    from cache.private import open_private

    private_run_dir()
    with open(open_private(paths.log, os.O_WRONLY | os.O_APPEND), "ab") as logf:  # 0600: it names images and paths
        logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mount {image} at {mp}\n".encode())
    r, w = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    try:
        if use_agent:
            try:
                pid = request_mount(image, mp, opts, w, paths.log, log_level)
            except AgentUnavailable as e:
                _log().debug("%s; spawning a mount daemon", e)
        if pid is None:
            proc = _spawn_daemon(image, mp, opts, w, paths.log, log_level)
            pid = proc.pid
    finally:
        os.close(w)
    if proc is not None:
        _children[pid] = proc
    try:
        message = _wait_ready(r, pid, timeout)
    finally:
        os.close(r)
    if message == READY:
        return pid
    _stop_daemon(pid, mp)
    if message.startswith(ERROR_PREFIX):
        raise MountError(message[len(ERROR_PREFIX):].decode(errors="replace").strip())
    if message == b"":
        status = f" with status {proc.returncode}" if proc is not None and proc.returncode is not None else ""
        raise MountError(f"mount daemon for {image} exited{status} before the mount "
                         f"answered: {_log_tail(paths.log) or 'no output'} (log: {paths.log})")
    raise MountError(f"{mountpoint}: the mount did not answer within {timeout:g}s (log: {paths.log})")


def agent_socket() -> str:
    """Where the host agent listens: ``$IMAGEFS_AGENT_SOCKET``, else in the run directory."""
    return os.environ.get("IMAGEFS_AGENT_SOCKET") or os.path.join(run_dir(), AGENT_SOCKET_NAME)


def request_mount(image: str, mountpoint: str, opts: MountOptions, ready_fd: int, log_path: str,
                  log_level: int, *, timeout: float = 5.0) -> int:
    """Ask the host agent to serve ``image`` at ``mountpoint``; the pid of the mount's
    process. The request carries this process's environment and, over SCM_RIGHTS,
    the readiness pipe's write end (see :mod:`imagefs.agent`).

    Raises :class:`AgentUnavailable` when no agent answers or it declines.
    """
    path = agent_socket()
    if not os.path.exists(path):
        raise AgentUnavailable(f"no agent socket at {path}")
    import array
    import socket

    request = json.dumps({
        "image": image, "mountpoint": mountpoint, "options": opts.as_dict(),
        "env": dict(os.environ), "log": log_path, "log_level": log_level, "executable": sys.executable,
    }).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ready_fd]))])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        raise AgentUnavailable(f"agent at {path} does not answer: {e}") from e
    try:
        answer = json.loads(reply)
    except ValueError as e:
        raise AgentUnavailable(f"agent at {path} sent {reply[:80]!r}") from e
    if "pid" not in answer:
        raise AgentUnavailable(f"agent at {path} declined: {answer.get('error', 'no reason given')}")
    return int(answer["pid"])


def _spawn_daemon(image: str, mp: str, opts: MountOptions, ready_fd: int, log_path: str,
                  log_level: int) -> subprocess.Popen[bytes]:
    import subprocess

    cmd = [sys.executable, "-m", "imagefs.daemon", "--ready-fd", str(ready_fd), "--options", opts.to_json(),
           "--log-level", str(log_level), image, mp]
    try:
        with open(log_path, "ab") as logf:
            return subprocess.Popen(cmd, pass_fds=(ready_fd,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, cwd="/")
    except OSError as e:
        raise MountError(f"cannot start the mount daemon: {e}") from e


def _wait_ready(fd: int, pid: int, timeout: float) -> bytes:
    """The daemon's one-line answer; b'' if it exited silently, b'timeout' on timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"timeout"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            if not _alive(pid) and not select.select([fd], [], [], 0)[0]:
                return b""
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            _wait_exit(pid, max(0.1, deadline - time.monotonic()))
            return buf if buf.endswith(b"\n") else b""
        buf += chunk
        if buf.endswith(b"\n"):
            return buf


def _alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        _children.pop(pid, None)
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _stop_daemon(pid: int, mountpoint: str) -> None:
    """Make sure a daemon that failed to start is gone and left no mount."""
    import signal

    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 5.0)
    mp = os.path.realpath(mountpoint)
    info = mount_at(mp)
    if info is not None and info.fstype == EROFS_FSTYPE:
        _unmount_erofs(mp, lazy=True)
    elif info is not None:
        _fuse_unmount(mp, lazy=True)
    blob = RunPaths.of(mp).beside(".blob")
    if is_mountpoint(blob):
        _fuse_unmount(blob, lazy=True)


def is_mountpoint(real_path: str) -> bool:
    """Whether anything is mounted at ``real_path`` (from /proc, never the path)."""
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == real_path for line in f)


def _fuse_unmount(path: str, *, lazy: bool = False) -> tuple[bool, str]:
    """fusermount3 -u (-z): (whether it worked, its complaint)."""
    import subprocess

    res = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), path], capture_output=True, text=True)
    return res.returncode == 0, res.stderr.strip()


def _unmount_erofs(path: str, *, lazy: bool = False) -> tuple[bool, str]:
    """umount2(2) of an EROFS mount: (whether it worked, the error)."""
    from imagefs.erofs.kernel import unmount as umount2

    try:
        umount2(path, lazy=lazy)
    except OSError as e:
        return False, e.strerror or str(e)
    return True, ""


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid, it names
    one process for good, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _daemon_pid(paths: RunPaths) -> int | None:
    """The pid of the daemon that recorded itself for ``paths``, if it is still that process."""
    try:
        with open(paths.record) as f:
            record = json.load(f)
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if process_start_time(pid) == record.get("start_time") else None


def _remove_stale(paths: RunPaths) -> None:
    for p in (paths.socket, paths.record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def unmount(mountpoint: str, *, timeout: float = 10.0) -> None:
    """Unmount an imagefs mount (lazily if it is busy) and wait for its daemon to exit.

    A busy mount is detached lazily and this returns at once: its daemon serves the
    files still open and exits with the last of them (waiting for it was ``timeout``
    seconds of nothing, every time). A daemon still running ``timeout`` s after a clean
    unmount is terminated: the mount lives on only as a copy in another mount namespace
    (a container or ``unshare -m`` started while it was mounted), which keeps the FUSE
    session open.

    An EROFS mount goes first, then the private FUSE mount of its blob; the blob's
    FUSE session (and so the daemon) ends when the kernel lets go of the blob file,
    at once for a clean unmount, with the last user of a lazily detached one.
    """
    import signal

    mp = os.path.realpath(mountpoint)
    info = mount_at(mp)
    if info is None:
        raise MountError(f"{mountpoint}: not an imagefs mount")
    paths = RunPaths.of(mp)
    pid = _daemon_pid(paths)
    detach = _unmount_erofs if info.fstype == EROFS_FSTYPE else _fuse_unmount
    ok, why = detach(mp)
    lazy = not ok
    if lazy:
        ok, why_lazy = detach(mp, lazy=True)
        if not ok:
            raise MountError(f"{mountpoint}: cannot unmount: {why_lazy or why}")
        _log().warning("%s: busy (%s); detached it, the daemon exits when the last open file closes",
                    mountpoint, why)
    if info.fstype == EROFS_FSTYPE:
        blob = paths.beside(".blob")
        if is_mountpoint(blob) and not _fuse_unmount(blob)[0]:
            _fuse_unmount(blob, lazy=True)  # the blob is still open (a lazily detached EROFS)
    if lazy:
        return  # the daemon exits when the last open file is closed
    if pid is None or _wait_exit(pid, timeout):
        _remove_stale(paths)  # the daemon removes them itself, unless it was killed
        return
    _log().warning("%s: daemon %d still running %gs after unmount; terminating it (stacks in its log)",
                mountpoint, pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, 5.0):
        raise MountError(f"{mountpoint}: unmounted, but daemon {pid} did not exit")


class MountHealth(namedtuple("MountHealth", "alive restarts problem")):
    """Whether a mount still serves (``problem`` says why not), and how many times its
    server was replaced (imagefs.supervisor; None if its daemon does not answer)."""

    __slots__ = ()
    alive: bool
    restarts: int | None
    problem: str


def mount_health(mountpoint: str) -> MountHealth:
    """How the imagefs mount at ``mountpoint`` is doing: gone, dead (ENOTCONN), or alive,
    with its server's restart count. For an EROFS mount, its blob's FUSE mount is what
    serves file data, so that is what is checked."""
    mp = os.path.realpath(mountpoint)
    info = mount_at(mp)
    if info is None:
        return MountHealth(False, None, "it is no longer mounted")
    paths = RunPaths.of(mp)
    serving = paths.beside(".blob") if info.fstype == EROFS_FSTYPE else mp
    if info.fstype == EROFS_FSTYPE and not is_mountpoint(serving):
        return MountHealth(False, None, "its file data is no longer mounted")
    try:  # opening a directory is never answered from the kernel's caches
        os.close(os.open(serving, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as e:
        return MountHealth(False, None, f"its daemon is gone ({e.strerror})")
    try:
        restarts = int(query_stats(mp, timeout=2.0).get("restarts", 0))
    except (MountError, ValueError, TypeError):
        restarts = None
    return MountHealth(True, restarts, "")


def query_stats(mountpoint: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """The counters of the daemon serving ``mountpoint`` (asked over its unix socket)."""
    import socket

    paths = RunPaths.of(mountpoint)
    if not is_imagefs_mount(paths.mountpoint):
        raise MountError(f"{mountpoint}: not an imagefs mount")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(paths.socket)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        raise MountError(f"{mountpoint}: cannot reach its daemon at {paths.socket}: {e.strerror or e}") from e
    try:
        return json.loads(data)
    except ValueError as e:
        raise MountError(f"{mountpoint}: daemon sent unreadable stats: {e}") from e
