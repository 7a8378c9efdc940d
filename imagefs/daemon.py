"""The mount daemon: the process that serves one mount until it is unmounted.

Why it is shaped this way:

- Everything that can fail for a reason the user can fix (no such image, store
  unreachable, index that fails its digest, bad mountpoint) is checked *before*
  anything is mounted, and a server that fails before the mount answers (an unusable
  cache directory) has it removed: an error never leaves a mount behind.
- As root the daemon is two processes (:mod:`imagefs.supervisor`): the one started for
  the mount prepares it, mounts FUSE and holds the connection (:mod:`imagefs.fuse_session`);
  the server it forks serves it, and is replaced when it dies, so a crash never leaves a
  dead mount. Each server opens its own cache tiers (LMDB must not cross a fork).
- Readiness: the daemon stats its own mountpoint through the kernel (a round trip
  through its own FUSE loop) and only then writes ``ready`` to the pipe its caller
  waits on (:func:`imagefs.mount.start_mount`); an error goes to that pipe instead.
- SIGINT/SIGTERM stop the FUSE loop and unmount (lazily), so a signalled daemon leaves
  no "Transport endpoint is not connected" behind.
- The daemon answers ``imagefs stats`` on a unix socket under the run directory
  (``$IMAGEFS_RUN_DIR`` or /run/imagefs), named after the mountpoint, next to its log
  file and a small JSON record of what is mounted there.
- It runs as ``python -m imagefs.daemon`` (spawned by :func:`imagefs.mount.start_mount`)
  or in a child forked by the host agent (:mod:`imagefs.agent`), which has imported
  everything below already. pyfuse3, trio and the tiers are imported inside
  :func:`serve`, so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cache.private import FILE_MODE, open_private, private_dir
from imagefs.mount import (CACHE_SECRET_ENV, ERROR_PREFIX, FAULT_ENV, READY, MountError, MountOptions, RunPaths,
                           check_mountpoint, default_cache_dir, is_mountpoint, mounted_at, process_start_time)

log = logging.getLogger(__name__)


def _open_image(image: str, opts: MountOptions) -> tuple[Any, Any]:
    """The store and the verified index of ``image``, or a MountError saying why not.
    The index comes from the host's copy in the cache directory when there is one."""
    from cache.blobstore import BlobStoreError
    from cache.stores import StoreURLError
    from imagefs.index_cache import load_index
    from indexer.catalog import ImageNotFound, InvalidImageName
    from indexer.format import IndexFormatError

    try:
        store = _open_store(opts)
        return store, load_index(store, image, opts.index_cache_dir())
    except (BlobStoreError, StoreURLError, ImageNotFound, InvalidImageName, IndexFormatError) as e:
        raise MountError(f"cannot mount {image}: {e}") from e


def _open_store(opts: MountOptions) -> Any:
    """The mount's store: its calls bounded by the read deadline, and with ``az_cache``
    content-addressed blobs (the index) through the zone's servers."""
    from cache.stores import open_store

    store = open_store(opts.store, s3_endpoint=opts.s3_endpoint, call_timeout=opts.read_timeout)
    if opts.az_cache:  # the index through the zone's servers: read from the store once per zone
        from cache.azclient import parse_servers
        from cache.zoneblobs import ZoneBlobStore

        try:
            servers = parse_servers(",".join(opts.az_cache))
        except ValueError as e:
            raise MountError(f"--az-cache {','.join(opts.az_cache)}: {e}") from e
        store = ZoneBlobStore(store, servers, secret=os.environ.get(CACHE_SECRET_ENV))
    return store


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
    budget = None
    if opts.az_cache:
        from cache.azclient import AZCacheTier
        from cache.storebudget import StoreBudget, parse_budget

        try:
            remote.append(AZCacheTier(list(opts.az_cache), secret=os.environ.get(CACHE_SECRET_ENV)))
            if opts.store_budget:
                budget = StoreBudget(*parse_budget(opts.store_budget))
        except ValueError as e:
            if ssd is not None:
                ssd.close()
            raise MountError(f"--az-cache {','.join(opts.az_cache)}: {e}") from e
    return ChunkChain(BlobTier(store), ssd, MemoryTier(opts.memory_size), remote_tiers=remote,
                      store_budget=budget, deadline=opts.read_timeout), ssd


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


# IMAGEFS_SUPERVISE=0: serve in one process, as before supervised mounts (no restarts;
# for comparison in bench/revive.py, or a kernel that misbehaves with the hand-over).
SUPERVISE_ENV = "IMAGEFS_SUPERVISE"


class _Plan:
    """What the supervisor prepares once and every server of the mount serves."""

    def __init__(self, image: str, mp: str, opts: MountOptions, store: Any, index: Any, kernel: Any) -> None:
        self.image = image
        self.mp = mp
        self.opts = opts
        self.paths = RunPaths.of(mp)
        self.store = store
        self.index = index
        self.kernel = kernel  # an imagefs.erofs.session.ErofsMount, or None for a plain mount
        # The FUSE mount: the EROFS blob's private one, or the tree itself.
        self.fuse_mp = kernel.blob_dir if kernel is not None else mp
        self.fuse_options = set(kernel.fuse_options) if kernel is not None else {
            "fsname=imagefs", "subtype=imagefs", "ro", "default_permissions", "allow_other"}

    def unmount(self) -> None:
        """Take down what is mounted (EROFS first, then its blob or the plain mount),
        lazily, whatever process mounted it. Never raises."""
        from imagefs import fuse_session

        if self.kernel is not None:
            self.kernel.mounted = True  # perhaps by a server: unmount() checks mountinfo first
            self.kernel.unmount()
        if is_mountpoint(self.fuse_mp) if self.kernel is not None else mounted_at(self.mp):
            try:
                fuse_session.unmount(self.fuse_mp)
            except OSError as e:
                log.warning("%s", e)


def serve(image: str, mountpoint: str, opts: MountOptions, ready_fd: int | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` and serve it in the foreground until unmounted
    or signalled (SIGINT/SIGTERM unmount cleanly).

    As root, this process becomes the mount's supervisor (:mod:`imagefs.supervisor`): it
    holds the FUSE connection and forks the server, again whenever one dies, so a crash
    costs readers a pause, not a dead mount. Otherwise (or with ``IMAGEFS_SUPERVISE=0``)
    it serves the mount itself.

    With ``ready_fd``, writes ``ready`` there once the mount answers, or ``error: ...``
    if it cannot be made (the error is raised as well).
    """
    from imagefs import fuse_session
    from imagefs.supervisor import Generation, Supervisor

    plan = _prepare(image, mountpoint, opts, ready_fd)
    start_time = process_start_time(os.getpid())
    if not fuse_session.supported() or os.environ.get(SUPERVISE_ENV, "1") == "0":
        failed = _serve_mount(plan, Generation(0, os.getpid(), start_time), plan.fuse_mp, ready_fd=ready_fd)
        if plan.kernel is not None:
            plan.kernel.cleanup()
        if failed is not None:
            raise MountError(f"{mountpoint}: {failed}")
        return
    try:
        conn = fuse_session.HeldConnection.mount(plan.fuse_mp, plan.fuse_options)
    except (OSError, ValueError) as e:
        if plan.kernel is not None:
            plan.kernel.cleanup()
        err = MountError(f"cannot mount {image} at {mountpoint}: FUSE mount failed ({e})")
        _write_ready(ready_fd, ERROR_PREFIX + str(err).encode() + b"\n")
        raise err from e
    first_ready: list[int | None] = [ready_fd]

    def spawn(gen: Generation, status_fd: int) -> int:
        sock = conn.init_socket()
        ready = first_ready[0] if gen.number == 0 else None
        try:
            pid = os.fork()
            if pid == 0:
                _server_child(plan, gen, sock.fileno(), conn.fd, status_fd, ready)  # never returns
        finally:
            sock.close()
        if ready is not None:  # the server has it: the caller sees EOF if the server dies first
            os.close(ready)
            first_ready[0] = None
        return pid

    supervisor = Supervisor(conn, spawn, cleanup=plan.unmount, start_time=start_time, name=plan.mp)
    try:
        code = supervisor.run()
    finally:
        if first_ready[0] is not None:
            _write_ready(first_ready[0], ERROR_PREFIX + b"the mount daemon could not be started\n")
        if plan.kernel is not None:
            plan.kernel.cleanup()
        for path in (plan.paths.socket, plan.paths.record):  # a killed server leaves them
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if code:
        raise MountError(f"{mountpoint}: the mount daemon failed (log: {plan.paths.log})")


def _prepare(image: str, mountpoint: str, opts: MountOptions, ready_fd: int | None) -> _Plan:
    """What can fail for a reason the user can fix, before anything is mounted. (The
    cache tiers are opened by each server: LMDB must not cross a fork, and opening them
    twice cost every mount ~2 ms; a server that cannot open them says so on the ready
    pipe and its supervisor unmounts.)"""
    from imagefs.erofs.session import ErofsUnavailable, prepare

    try:
        mp = check_mountpoint(mountpoint)
        store, index = _open_image(image, opts)
        try:  # EROFS over a FUSE-served blob where the kernel can (imagefs.erofs), else the plain mount
            kernel = prepare(index, image, mp, opts, RunPaths.of(mp))
        except ErofsUnavailable as e:
            raise MountError(str(e)) from e
    except MountError as e:
        _write_ready(ready_fd, ERROR_PREFIX + str(e).encode() + b"\n")
        raise
    return _Plan(image, mp, opts, store, index, kernel)


def _server_child(plan: _Plan, gen: Any, session_fd: int, device_fd: int, status_fd: int,
                  ready_fd: int | None) -> None:
    """(a forked server) Serve the held connection through ``session_fd``; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's: trio sets its own
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        failed = _serve_mount(plan, gen, f"/dev/fd/{session_fd}", ready_fd=ready_fd, status_fd=status_fd,
                              device_fd=device_fd)
        code = 0 if failed is None else 1
    except BaseException:
        log.exception("mount daemon failed")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve_mount(plan: _Plan, gen: Any, fuse_source: str, *, ready_fd: int | None = None,
                 status_fd: int | None = None, device_fd: int | None = None) -> str | None:
    """Serve the mount in this process until it ends; None if it ended as it should
    (unmounted, or signalled and then unmounted), else what went wrong.

    ``fuse_source`` is the FUSE mountpoint for pyfuse3 to mount, or ``/dev/fd/N`` of a
    held connection (``device_fd``: the held ``/dev/fuse``, put over N in init()). A
    server that fails (an exception ends the loop) leaves the mount to its supervisor.
    """
    import pyfuse3
    import trio

    from imagefs import fuse_session
    from imagefs.fuse_ops import FuseOps
    from imagefs.vfs import VFS

    opts, index, kernel = plan.opts, plan.index, plan.kernel
    supervised = device_fd is not None
    store = plan.store
    if gen.number > 0:  # the supervisor's store may share connections with a dead server
        store = _open_store(opts)
        if kernel is not None:
            kernel.mounted = True  # by the first server
    try:
        reader, ssd = _open_reader(store, opts)
    except MountError as e:
        _write_ready(ready_fd, ERROR_PREFIX + str(e).encode() + b"\n")
        return str(e)
    fs = (kernel.filesystem(reader, plan.image, opts.read_timeout) if kernel is not None
          else VFS(index, reader, name=plan.image, read_timeout=opts.read_timeout))
    recorder = None
    if opts.record and gen.number == 0:  # a recording is of a start; a replacement server does not start
        from imagefs.recorder import Recorder

        # Attached before the loop starts: no read may be missed.
        recorder = fs.recorder = Recorder(index, quiet_s=opts.record_quiet_s, max_s=opts.record_max_s)
    ops = FuseOps(fs, fault=fault_hook_from_env())  # type: ignore[arg-type]  # BlobFS has VFS's shape
    if supervised:
        session_fd = int(fuse_source.rsplit("/", 1)[1])

        def adopt() -> None:
            try:
                lost = fuse_session.adopt(device_fd, session_fd, resend=gen.number > 0)
            except OSError as e:  # a server that cannot reach the kernel must not pretend to serve
                log.critical("cannot take over the FUSE connection: %s", e)
                os._exit(3)
            if lost is not None:
                log.error("the kernel would not send again what the previous daemon had taken (%s): those "
                          "requests stay unanswered (FUSE_NOTIFY_RESEND needs Linux >= 6.9)", lost)

        ops.on_init = adopt
    # From pyfuse3.init on, nothing on this thread may touch the mountpoint (not even
    # realpath): the kernel would wait for the loop this thread has not started yet.
    try:
        pyfuse3.init(ops, fuse_source, plan.fuse_options)
    except RuntimeError as e:
        if ssd is not None:
            ssd.close()
        err = MountError(f"cannot mount {plan.image} at {plan.mp}: FUSE mount failed ({e})")
        _write_ready(ready_fd, ERROR_PREFIX + str(err).encode() + b"\n")
        return str(err)
    # Prefetch into the SSD tier only, and never more than half of it.
    budget = opts.cache_size // 2 if (opts.prefetch and ssd is not None) else 0
    daemon = _Daemon(plan.image, index.digest, plan.paths, ops, reader, ready_fd, index=index, prefetch_budget=budget,
                     store=store, replay=opts.replay and gen.number == 0, recorder=recorder,
                     record_merge=opts.record_merge, read_ahead_kb=opts.read_ahead_kb, kernel=kernel,
                     cache_dir=opts.index_cache_dir(), prefetch_rate=opts.prefetch_rate,
                     generation=gen, status_fd=status_fd)
    ended = False
    try:
        trio.run(daemon.run)
        ended = True
    finally:
        if ended or not supervised:
            # Unmount unless someone already did (imagefs umount): mountinfo is read
            # without touching the mount. A supervised server that failed leaves the
            # mount to its supervisor, which starts another.
            if kernel is not None:
                kernel.unmount()  # EROFS before the blob it reads
            mounted = is_mountpoint(plan.fuse_mp) if kernel is not None else mounted_at(plan.mp)
            if supervised:
                if mounted:
                    plan.unmount()
                pyfuse3.close(unmount=False)
            else:
                pyfuse3.close(unmount=mounted)
        daemon.save_recording("unmounted")
        daemon.cleanup()
        if ssd is not None:
            ssd.close()
    return daemon.failed


class _Daemon:
    """The trio side of a mount: the FUSE loop, signals, stats and the readiness probe."""

    def __init__(self, image: str, digest: str, paths: RunPaths, ops: Any, reader: Any,
                 ready_fd: int | None, *, index: Any = None, prefetch_budget: int = 0, store: Any = None,
                 replay: bool = False, recorder: Any = None, record_merge: bool = True,
                 read_ahead_kb: int | None = None, kernel: Any = None, cache_dir: str | None = None,
                 prefetch_rate: float = 0.0, generation: Any = None, status_fd: int | None = None) -> None:
        self.prefetch_rate = prefetch_rate
        # The imagefs.supervisor.Generation this server is (restarts, the supervisor),
        # and the pipe on which it tells the supervisor that it serves.
        self.generation = generation
        self.status_fd = status_fd
        self.read_ahead_kb = read_ahead_kb
        self.cache_dir = cache_dir  # the host's cache directory (copies of indexes and profiles)
        self.index = index
        self.store = store
        self.kernel = kernel  # an imagefs.erofs.session.ErofsMount, or None for a plain mount
        self.fuse_mountpoint = kernel.blob_dir if kernel is not None else paths.mountpoint
        self.prefetch_budget = prefetch_budget
        self.prefetch_progress: Any = None  # an imagefs.prefetch.Progress while prefetch is on
        self.replay_status: Any = None  # an imagefs.replay.ReplayStatus while a replay is on
        self.replay = replay and store is not None and index is not None
        self.recorder = recorder  # an imagefs.recorder.Recorder while recording
        self.record_merge = record_merge
        self.record_saved: str | None = None  # what became of the recording
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
            if (self.prefetch_budget > 0 or self.replay) and self.index is not None:
                nursery.start_soon(self._background)
            if self.recorder is not None:
                nursery.start_soon(self._record)
        # Unmounted: finish the SSD write-behind so the next mount finds what this one fetched.
        aclose = getattr(self.reader, "aclose", None)
        if aclose is not None:
            with trio.move_on_after(30) as scope:
                await aclose()
            if scope.cancelled_caught:
                log.warning("gave up writing the SSD cache after 30 s")

    async def _background(self) -> None:
        from imagefs.prefetch import Progress, run_background
        from imagefs.replay import ReplayStatus

        progress = self.prefetch_progress = Progress() if self.prefetch_budget > 0 else None
        status = self.replay_status = ReplayStatus() if self.replay else None
        try:
            await run_background(self.index, self.reader, self.store, ready=self.ready, replay_status=status,
                                 progress=progress, budget=self.prefetch_budget, cache_dir=self.cache_dir,
                                 rate=self.prefetch_rate,
                                 # the replay warms the page cache too, unless it would be recorded
                                 warm_root=self.paths.mountpoint if self.recorder is None else None)
        except Exception:  # background fetching is an optimisation: it must never take the mount down
            for s in (progress, status):
                if s is not None and s.state not in ("done", "incomplete", "none", "refused"):
                    s.state = "failed"
            log.exception("background fetching failed")

    async def _record(self) -> None:
        import trio

        while self.recorder.due() is None:
            await trio.sleep(0.5)
        reason = self.recorder.due()
        self.recorder.stop(reason)
        await trio.to_thread.run_sync(self.save_recording, reason)

    def save_recording(self, reason: str) -> None:
        """Stop recording (if still on) and write the profile to the store, merged into
        the image's profile unless asked to replace it. Never raises: a profile that
        cannot be written costs the next start its speed, not this mount."""
        if self.recorder is None or self.record_saved is not None:
            return
        from indexer import profile as profiles

        self.recorder.stop(reason)
        recorded = self.recorder.profile()
        try:
            if not recorded.entries:
                self.record_saved = "nothing read"
                return
            new = recorded
            if self.record_merge:
                try:
                    old = profiles.load(self.store, self.index)
                except profiles.ProfileError as e:
                    log.warning("replacing the image's unusable profile: %s", e)
                    old = None
                if old is not None:
                    new = profiles.merge([old, recorded])
            profiles.save(self.store, new)
            self.record_saved = f"saved {len(recorded.entries)} chunks ({len(new.entries)} in the profile)"
            log.info("startup profile of %s: recorded %d chunks (%s), profile has %d from %d recording(s)",
                     self.digest, len(recorded.entries), reason, len(new.entries), new.recordings)
        except Exception as e:
            self.record_saved = f"not saved: {e}"
            log.error("startup profile of %s not saved: %s", self.digest, e)

    async def _become_ready(self) -> None:
        import trio

        from imagefs.readahead import DEFAULT_READ_AHEAD_KB, set_read_ahead_kb

        def probe() -> None:
            st = os.stat(self.fuse_mountpoint)  # a round trip through the kernel and our loop
            if st.st_ino != 1:
                raise OSError(errno.EIO, f"mountpoint answered with inode {st.st_ino}")
            if self.kernel is not None:
                set_read_ahead_kb(self.fuse_mountpoint)
                self.kernel.mount(self.read_ahead_kb)  # EROFS on the mountpoint, its blob read through our loop
            else:
                kb = DEFAULT_READ_AHEAD_KB if self.read_ahead_kb is None else self.read_ahead_kb
                set_read_ahead_kb(self.fuse_mountpoint, kb)

        restarted = self.generation is not None and self.generation.number > 0
        if not restarted:  # a replacement serves a mount that answers already (perhaps detached: no probe)
            try:
                await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
            except OSError as e:
                self.failed = f"mount does not answer: {e}"
                _write_ready(self.ready_fd, ERROR_PREFIX + self.failed.encode() + b"\n")
                import pyfuse3

                pyfuse3.terminate()
                return
        self._write_record()
        if restarted:
            log.warning("serving %s at %s again (restart %d, after the previous daemon %s)", self.image,
                        self.paths.mountpoint, self.generation.number, self.generation.crashes[-1].how)
        else:
            log.info("mounted %s (%s) at %s", self.image, self.digest, self.paths.mountpoint)
        _write_ready(self.ready_fd, READY)
        if self.status_fd is not None:
            _write_ready(self.status_fd, b"s")
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
        import socket

        import trio

        # Bound with the plain socket module: binding a path waits for nothing, and
        # trio's async bind cost ~2 ms of a forked mount's time to ready.
        std = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            private_dir(os.path.dirname(self.paths.socket), owned=False)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.socket)
            std.bind(self.paths.socket)
            os.chmod(self.paths.socket, FILE_MODE)  # root's only, as every run file (cache.private)
            std.listen(16)
        except OSError as e:  # no stats is no reason to refuse the mount
            std.close()
            log.warning("no stats socket at %s: %s", self.paths.socket, e)
            task_status.started()
            return
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(std))

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
        gen = self.generation
        out: dict[str, Any] = {
            "image": self.image, "digest": self.digest, "mountpoint": self.paths.mountpoint,
            "pid": gen.supervisor_pid if gen is not None else os.getpid(), "server_pid": os.getpid(),
            "restarts": gen.number if gen is not None else 0,
            "crashes": [c.as_dict() for c in gen.crashes[-5:]] if gen is not None else [],
            "uptime_s": round(time.time() - self.started, 3),
            "requests": self.ops.counters(),
            "fs": self.kernel.describe() if self.kernel is not None else {"mode": "fuse"},
        }
        stats = getattr(self.reader, "stats", None)
        if stats is not None:
            out["cache"] = stats().as_dict()
        out["prefetch"] = self.prefetch_progress.as_dict() if self.prefetch_progress is not None else {"state": "off"}
        out["replay"] = self.replay_status.as_dict() if self.replay_status is not None else {"state": "off"}
        if self.recorder is not None:
            out["record"] = {**self.recorder.as_dict(), **({"saved": self.record_saved} if self.record_saved else {})}
        return out

    def _write_record(self) -> None:
        # The pid is the mount daemon's that lives as long as the mount: the supervisor's.
        gen = self.generation
        pid, start = (gen.supervisor_pid, gen.supervisor_start) if gen is not None else (
            os.getpid(), process_start_time(os.getpid()))
        record = {"pid": pid, "start_time": start, "server_pid": os.getpid(), "image": self.image,
                  "digest": self.digest, "mountpoint": self.paths.mountpoint, "socket": self.paths.socket,
                  "log": self.paths.log}
        tmp = self.paths.record + ".tmp"
        with open(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.paths.record)

    def cleanup(self) -> None:
        for p in (self.paths.socket, self.paths.record):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)



# -- python -m imagefs.daemon ------------------------------------------------------------


def _daemon_main(argv: list[str] | None = None) -> int:
    import argparse
    import faulthandler

    p = argparse.ArgumentParser(prog="python -m imagefs.daemon", description="imagefs mount daemon (internal)")
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
