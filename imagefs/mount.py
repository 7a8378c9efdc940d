"""The mount lifecycle: resolve and verify the index, mount, serve, unmount cleanly.

Why it is shaped this way:

- Everything that can fail for a reason the user can fix (no such image, store
  unreachable, index that fails its digest, bad mountpoint) is checked *before*
  ``pyfuse3.init``, so an error never leaves a mount behind.
- ``start_mount`` runs the daemon as ``python -m imagefs.mount`` in its own session
  and waits on a pipe until the daemon has stat'ed its own mountpoint through the
  kernel: when it returns, the mount answers. A daemon that fails writes its error to
  that pipe, and the caller raises it as :class:`MountError`.
- SIGINT/SIGTERM stop the FUSE loop and unmount (``pyfuse3.close(unmount=True)``,
  a lazy unmount as root), so a signalled daemon leaves no "Transport endpoint is not
  connected" behind.
- The daemon answers ``imagefs stats`` on a unix socket under the run directory
  (``$IMAGEFS_RUN_DIR`` or /run/imagefs), named after the mountpoint, next to its log
  file and a small JSON record of what is mounted there.
- This module is on the mount's critical path, so it imports only what serving needs;
  boto3 is imported by the store layer only for s3:// stores.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import hashlib
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
FSTYPE = "fuse.imagefs"
READY = b"ready\n"
ERROR_PREFIX = b"error: "
# Environment variable naming handlers to fail with an unexpected exception
# (comma-separated operation names): the test hook for the EIO-not-crash path.
FAULT_ENV = "IMAGEFS_FAULT_OPS"
CACHE_SECRET_ENV = "IMAGEFS_CACHE_SECRET"


class MountError(Exception):
    """The mount could not be made, answered, or undone; the message says why."""


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


@dataclass
class MountOptions:
    """How to serve a mount: where chunks come from and how much may be cached.

    ``cache_size`` 0 disables the SSD tier; ``az_cache`` lists the zone's cache servers
    (``host:port``), asked before the blob store.
    """

    store: str | None = None
    s3_endpoint: str | None = None
    cache_dir: str | None = None
    cache_size: int = 10 * GiB
    memory_size: int = 512 * MiB
    az_cache: list[str] = field(default_factory=list)
    prefetch: bool = True  # bring the image's chunks to the SSD tier in the background

    def index_cache_dir(self) -> str | None:
        """Where this host keeps verified copies of indexes (with the SSD tier), if anywhere."""
        return (self.cache_dir or default_cache_dir()) if self.cache_size > 0 else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MountOptions":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RunPaths:
    """The files a daemon keeps for the mount at ``mountpoint``."""

    mountpoint: str
    socket: str
    log: str
    record: str

    @classmethod
    def of(cls, mountpoint: str) -> "RunPaths":
        mp = os.path.realpath(mountpoint)
        key = hashlib.sha256(mp.encode()).hexdigest()[:16]
        base = os.path.join(run_dir(), key)
        return cls(mp, base + ".sock", base + ".log", base + ".json")


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    device: str  # major:minor
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field_:
        return field_
    return field_.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def find_mounts() -> list[MountInfo]:
    """Every imagefs mount visible in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(parts) < 5 or len(rparts) < 2 or rparts[0] != FSTYPE:
                continue
            out.append(MountInfo(_unescape(parts[4]), parts[2], rparts[0], _unescape(rparts[1])))
    return out


def _mounted_at(real_path: str) -> bool:
    """Whether an imagefs mount sits at ``real_path`` (already resolved: this reads only
    /proc, never the path, so it is safe even when the mount does not answer)."""
    return any(m.mountpoint == real_path for m in find_mounts())


def is_imagefs_mount(mountpoint: str) -> bool:
    return _mounted_at(os.path.realpath(mountpoint))


def _check_mountpoint(mountpoint: str) -> str:
    mp = os.path.realpath(mountpoint)
    if _mounted_at(mp):
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


# -- the daemon side -------------------------------------------------------------------


def _open_image(image: str, opts: MountOptions) -> tuple[Any, Any]:
    """The store and the verified index of ``image``, or a MountError saying why not.
    The index comes from the host's copy in the cache directory when there is one."""
    from cache.blobstore import BlobStoreError
    from cache.stores import StoreURLError, open_store
    from imagefs.index_cache import load_index
    from indexer.catalog import ImageNotFound, InvalidImageName
    from indexer.format import IndexFormatError

    try:
        store = open_store(opts.store, s3_endpoint=opts.s3_endpoint)
        return store, load_index(store, image, opts.index_cache_dir())
    except (BlobStoreError, StoreURLError, ImageNotFound, InvalidImageName, IndexFormatError) as e:
        raise MountError(f"cannot mount {image}: {e}") from e


def _open_reader(store: Any, opts: MountOptions) -> tuple[Any, Any]:
    """The read-through chunk chain (memory, then SSD unless disabled, then the AZ cache
    servers if any, then the store) and the SSD tier it uses (or None), which the caller
    closes. The AZ servers' shared secret comes from ``$IMAGEFS_CACHE_SECRET``."""
    from cache.blobtier import BlobTier
    from cache.chain import ChunkChain
    from cache.memory import MemoryTier
    from cache.ssd import SSDTier

    ssd = None
    if opts.cache_size > 0:
        directory = opts.cache_dir or default_cache_dir()
        try:
            ssd = SSDTier(directory, opts.cache_size)
        except Exception as e:  # OSError, lmdb.Error: either way the cache is unusable
            raise MountError(f"cache directory {directory}: cannot open the SSD cache: {e}") from e
    remote: list[Any] = []
    if opts.az_cache:
        from cache.azclient import AZCacheTier

        try:
            remote.append(AZCacheTier(list(opts.az_cache), secret=os.environ.get(CACHE_SECRET_ENV)))
        except ValueError as e:
            if ssd is not None:
                ssd.close()
            raise MountError(f"--az-cache {','.join(opts.az_cache)}: {e}") from e
    return ChunkChain(BlobTier(store), ssd, MemoryTier(opts.memory_size), remote_tiers=remote), ssd


def fault_hook_from_env() -> Callable[[str], None] | None:
    """A hook failing the handlers named in ``$IMAGEFS_FAULT_OPS`` (tests only)."""
    names = {n.strip() for n in os.environ.get(FAULT_ENV, "").split(",") if n.strip()}
    if not names:
        return None
    log.warning("fault injection enabled for: %s", ", ".join(sorted(names)))

    def hook(op: str) -> None:
        if op in names:
            raise RuntimeError(f"injected fault in {op}")

    return hook


def _write_ready(fd: int | None, message: bytes) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message)
        os.close(fd)


def serve(image: str, mountpoint: str, opts: MountOptions, ready_fd: int | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` and serve it in the foreground until unmounted
    or signalled (SIGINT/SIGTERM unmount cleanly).

    With ``ready_fd``, writes ``ready`` there once the mount answers, or ``error: ...``
    if it cannot be made (the error is raised as well).
    """
    try:
        mp = _check_mountpoint(mountpoint)
        store, index = _open_image(image, opts)
        reader, ssd = _open_reader(store, opts)
    except MountError as e:
        _write_ready(ready_fd, ERROR_PREFIX + str(e).encode() + b"\n")
        raise

    import pyfuse3
    import trio

    from imagefs.fuse_ops import FuseOps
    from imagefs.vfs import VFS

    ops = FuseOps(VFS(index, reader, name=image), fault=fault_hook_from_env())
    # From pyfuse3.init on, nothing on this thread may touch the mountpoint (not even
    # realpath): the kernel would wait for the loop this thread has not started yet.
    paths = RunPaths.of(mp)
    options = {"fsname=imagefs", "subtype=imagefs", "ro", "default_permissions", "allow_other"}
    try:
        pyfuse3.init(ops, mp, options)
    except RuntimeError as e:
        if ssd is not None:
            ssd.close()
        err = MountError(f"cannot mount {image} at {mountpoint}: FUSE mount failed ({e})")
        _write_ready(ready_fd, ERROR_PREFIX + str(err).encode() + b"\n")
        raise err from e
    # Prefetch into the SSD tier only, and never more than half of it.
    budget = opts.cache_size // 2 if (opts.prefetch and ssd is not None) else 0
    daemon = _Daemon(image, index.digest, paths, ops, reader, ready_fd, index=index, prefetch_budget=budget)
    try:
        trio.run(daemon.run)
    finally:
        # Unmount unless someone already did (fusermount3 -u): asking twice only
        # makes libfuse print an error. mountinfo is read without touching the mount.
        pyfuse3.close(unmount=_mounted_at(mp))
        daemon.cleanup()
        if ssd is not None:
            ssd.close()
    if daemon.failed is not None:
        raise MountError(f"{mountpoint}: {daemon.failed}")


class _Daemon:
    """The trio side of a mount: the FUSE loop, signals, stats and the readiness probe."""

    def __init__(self, image: str, digest: str, paths: RunPaths, ops: Any, reader: Any,
                 ready_fd: int | None, *, index: Any = None, prefetch_budget: int = 0) -> None:
        self.index = index
        self.prefetch_budget = prefetch_budget
        self.ready: Any = None  # a trio.Event, made inside the loop
        self.image = image
        self.digest = digest
        self.paths = paths
        self.ops = ops
        self.reader = reader
        self.ready_fd = ready_fd
        self.started = time.time()
        self.failed: str | None = None

    async def run(self) -> None:
        import pyfuse3
        import trio

        self.ready = trio.Event()
        async with trio.open_nursery() as nursery:
            async def fuse_main() -> None:
                try:
                    await pyfuse3.main()
                    log.info("%s: FUSE session ended", self.paths.mountpoint)
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(fuse_main)
            if threading.current_thread() is threading.main_thread():
                await nursery.start(self._signals)
            await nursery.start(self._stats_server)
            nursery.start_soon(self._become_ready)
            if self.prefetch_budget > 0 and self.index is not None:
                nursery.start_soon(self._prefetch)
        # Unmounted: finish the SSD write-behind so the next mount finds what this one fetched.
        aclose = getattr(self.reader, "aclose", None)
        if aclose is not None:
            with trio.move_on_after(30) as scope:
                await aclose()
            if scope.cancelled_caught:
                log.warning("gave up writing the SSD cache after 30 s")

    async def _prefetch(self) -> None:
        from imagefs.prefetch import prefetch_image

        await self.ready.wait()  # the mount answers first; prefetch never delays that
        try:
            await prefetch_image(self.index, self.reader, self.prefetch_budget)
        except Exception:  # prefetch is an optimisation: it must never take the mount down
            log.exception("prefetch failed")

    async def _become_ready(self) -> None:
        import trio

        from imagefs.readahead import set_read_ahead_kb

        def probe() -> None:
            st = os.stat(self.paths.mountpoint)  # a round trip through the kernel and our loop
            if st.st_ino != 1:
                raise OSError(errno.EIO, f"mountpoint answered with inode {st.st_ino}")
            set_read_ahead_kb(self.paths.mountpoint)

        try:
            await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
        except OSError as e:
            self.failed = f"mount does not answer: {e}"
            _write_ready(self.ready_fd, ERROR_PREFIX + self.failed.encode() + b"\n")
            import pyfuse3

            pyfuse3.terminate()
            return
        self._write_record()
        log.info("mounted %s (%s) at %s", self.image, self.digest, self.paths.mountpoint)
        _write_ready(self.ready_fd, READY)
        self.ready.set()

    async def _signals(self, task_status: Any) -> None:
        import pyfuse3
        import trio

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                log.info("%s: unmounting on %s", self.paths.mountpoint, signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def _stats_server(self, task_status: Any) -> None:
        import trio

        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            os.makedirs(os.path.dirname(self.paths.socket), mode=0o755, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.socket)
            await sock.bind(self.paths.socket)
            sock.listen(16)
        except OSError as e:  # no stats is no reason to refuse the mount
            sock.close()
            log.warning("no stats socket at %s: %s", self.paths.socket, e)
            task_status.started()
            return
        listener = trio.SocketListener(sock)

        async def answer(stream: trio.SocketStream) -> None:
            try:
                await stream.send_all(json.dumps(self.stats()).encode())
            except trio.BrokenResourceError:
                pass
            except Exception:  # stats must never take the mount down
                log.exception("stats request failed")
            finally:
                await stream.aclose()

        await trio.serve_listeners(answer, [listener], task_status=task_status)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": self.image, "digest": self.digest, "mountpoint": self.paths.mountpoint,
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
            "requests": self.ops.counters(),
        }
        stats = getattr(self.reader, "stats", None)
        if stats is not None:
            out["cache"] = stats().as_dict()
        return out

    def _write_record(self) -> None:
        record = {"pid": os.getpid(), "start_time": _start_time(os.getpid()), "image": self.image, "digest": self.digest,
                  "mountpoint": self.paths.mountpoint, "socket": self.paths.socket, "log": self.paths.log}
        tmp = self.paths.record + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.paths.record)

    def cleanup(self) -> None:
        for p in (self.paths.socket, self.paths.record):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


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
                log_level: int = logging.INFO, use_agent: bool = True) -> int:
    """Start a daemon serving ``image`` at ``mountpoint``; return its pid once the mount
    answers. Raises :class:`MountError` with the daemon's own message if it cannot.

    The daemon is forked by the host agent (``imagefs agent``) when one answers, which
    skips starting Python and importing the read path; otherwise it is spawned.
    """
    mp = _check_mountpoint(mountpoint)
    paths = RunPaths.of(mp)
    os.makedirs(os.path.dirname(paths.log), mode=0o755, exist_ok=True)
    with open(paths.log, "ab") as logf:
        logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mount {image} at {mp}\n".encode())
    r, w = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    try:
        if use_agent:
            from imagefs.agent import AgentUnavailable, request_mount

            try:
                pid = request_mount(image, mp, opts, w, paths.log, log_level)
            except AgentUnavailable as e:
                log.debug("%s; spawning a mount daemon", e)
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


def _spawn_daemon(image: str, mp: str, opts: MountOptions, ready_fd: int, log_path: str,
                  log_level: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "imagefs.mount", "--ready-fd", str(ready_fd), "--options", opts.to_json(),
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
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 5.0)
    if is_imagefs_mount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def _start_time(pid: int) -> int | None:
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
    return pid if _start_time(pid) == record.get("start_time") else None


def _remove_stale(paths: RunPaths) -> None:
    for p in (paths.socket, paths.record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def unmount(mountpoint: str, *, timeout: float = 10.0) -> None:
    """Unmount an imagefs mount (lazily if it is busy) and wait for its daemon to exit.

    A daemon still running ``timeout`` s after a clean unmount is terminated: the mount
    lives on only as a copy in another mount namespace (a container or ``unshare -m``
    started while it was mounted), which keeps the FUSE session open.
    """
    mp = os.path.realpath(mountpoint)
    if not is_imagefs_mount(mp):
        raise MountError(f"{mountpoint}: not an imagefs mount")
    paths = RunPaths.of(mp)
    pid = _daemon_pid(paths)
    res = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    lazy = res.returncode != 0
    if lazy:
        lazy_res = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
        if lazy_res.returncode != 0:
            raise MountError(f"{mountpoint}: cannot unmount: {(lazy_res.stderr or res.stderr).strip()}")
        log.warning("%s: busy (%s); detached it, the daemon exits when the last open file closes",
                    mountpoint, res.stderr.strip())
    if pid is None or _wait_exit(pid, timeout):
        _remove_stale(paths)  # the daemon removes them itself, unless it was killed
        return
    if lazy:
        return
    log.warning("%s: daemon %d still running %gs after unmount; terminating it (stacks in its log)",
                mountpoint, pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, 5.0):
        raise MountError(f"{mountpoint}: unmounted, but daemon {pid} did not exit")


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


# -- python -m imagefs.mount: the daemon entry point ------------------------------------


def _daemon_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imagefs.mount", description="imagefs mount daemon (internal)")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--options", default="{}")
    p.add_argument("--log-level", type=int, default=logging.INFO)
    p.add_argument("image")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s imagefs[%(process)d] %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: stacks into the log
    try:
        serve(args.image, args.mountpoint, MountOptions.from_json(args.options), ready_fd=args.ready_fd)
    except MountError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_daemon_main())
