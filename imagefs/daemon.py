"""The mount daemon: the process that serves one mount until it is unmounted.

Why it is shaped this way:

- Everything that can fail for a reason the user can fix (no such image, store
  unreachable, index that fails its digest, bad mountpoint) is checked *before*
  ``pyfuse3.init``, so an error never leaves a mount behind.
- Readiness: the daemon stats its own mountpoint through the kernel (a round trip
  through its own FUSE loop) and only then writes ``ready`` to the pipe its caller
  waits on (:func:`imagefs.mount.start_mount`); an error goes to that pipe instead.
- SIGINT/SIGTERM stop the FUSE loop and unmount (``pyfuse3.close(unmount=True)``,
  a lazy unmount as root), so a signalled daemon leaves no "Transport endpoint is not
  connected" behind.
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
    from cache.stores import StoreURLError, open_store
    from imagefs.index_cache import load_index
    from indexer.catalog import ImageNotFound, InvalidImageName
    from indexer.format import IndexFormatError

    try:
        store = open_store(opts.store, s3_endpoint=opts.s3_endpoint, call_timeout=opts.read_timeout)
        if opts.az_cache:  # the index through the zone's servers: read from the store once per zone
            from cache.azclient import parse_servers
            from cache.zoneblobs import ZoneBlobStore

            try:
                servers = parse_servers(",".join(opts.az_cache))
            except ValueError as e:
                raise MountError(f"--az-cache {','.join(opts.az_cache)}: {e}") from e
            store = ZoneBlobStore(store, servers, secret=os.environ.get(CACHE_SECRET_ENV))
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


def serve(image: str, mountpoint: str, opts: MountOptions, ready_fd: int | None = None) -> None:
    """Mount ``image`` at ``mountpoint`` and serve it in the foreground until unmounted
    or signalled (SIGINT/SIGTERM unmount cleanly).

    With ``ready_fd``, writes ``ready`` there once the mount answers, or ``error: ...``
    if it cannot be made (the error is raised as well).
    """
    try:
        mp = check_mountpoint(mountpoint)
        store, index = _open_image(image, opts)
        reader, ssd = _open_reader(store, opts)
    except MountError as e:
        _write_ready(ready_fd, ERROR_PREFIX + str(e).encode() + b"\n")
        raise

    import pyfuse3
    import trio

    from imagefs.erofs.session import ErofsUnavailable, prepare
    from imagefs.fuse_ops import FuseOps
    from imagefs.vfs import VFS

    paths = RunPaths.of(mp)
    try:  # EROFS over a FUSE-served blob where the kernel can (imagefs.erofs), else the plain mount
        kernel = prepare(index, image, mp, opts, paths)
    except ErofsUnavailable as e:
        if ssd is not None:
            ssd.close()
        _write_ready(ready_fd, ERROR_PREFIX + str(e).encode() + b"\n")
        raise MountError(str(e)) from e
    fs = (kernel.filesystem(reader, image, opts.read_timeout) if kernel is not None
          else VFS(index, reader, name=image, read_timeout=opts.read_timeout))
    recorder = None
    if opts.record:
        from imagefs.recorder import Recorder

        # Attached before the loop starts: no read may be missed.
        recorder = fs.recorder = Recorder(index, quiet_s=opts.record_quiet_s, max_s=opts.record_max_s)
    ops = FuseOps(fs, fault=fault_hook_from_env())  # type: ignore[arg-type]  # BlobFS has VFS's shape
    # From pyfuse3.init on, nothing on this thread may touch the mountpoint (not even
    # realpath): the kernel would wait for the loop this thread has not started yet.
    fuse_mp = kernel.blob_dir if kernel is not None else mp
    options = set(kernel.fuse_options) if kernel is not None else {
        "fsname=imagefs", "subtype=imagefs", "ro", "default_permissions", "allow_other"}
    try:
        pyfuse3.init(ops, fuse_mp, options)
    except RuntimeError as e:
        if ssd is not None:
            ssd.close()
        if kernel is not None:
            kernel.cleanup()
        err = MountError(f"cannot mount {image} at {mountpoint}: FUSE mount failed ({e})")
        _write_ready(ready_fd, ERROR_PREFIX + str(err).encode() + b"\n")
        raise err from e
    # Prefetch into the SSD tier only, and never more than half of it.
    budget = opts.cache_size // 2 if (opts.prefetch and ssd is not None) else 0
    daemon = _Daemon(image, index.digest, paths, ops, reader, ready_fd, index=index, prefetch_budget=budget,
                     store=store, replay=opts.replay, recorder=recorder, record_merge=opts.record_merge,
                     read_ahead_kb=opts.read_ahead_kb, kernel=kernel, cache_dir=opts.index_cache_dir(),
                     prefetch_rate=opts.prefetch_rate)
    try:
        trio.run(daemon.run)
    finally:
        # Unmount unless someone already did (fusermount3 -u): asking twice only
        # makes libfuse print an error. mountinfo is read without touching the mount.
        if kernel is not None:
            kernel.unmount()  # EROFS before the blob it reads
        pyfuse3.close(unmount=is_mountpoint(fuse_mp) if kernel is not None else mounted_at(mp))
        if kernel is not None:
            kernel.cleanup()
        daemon.save_recording("unmounted")
        daemon.cleanup()
        if ssd is not None:
            ssd.close()
    if daemon.failed is not None:
        raise MountError(f"{mountpoint}: {daemon.failed}")


class _Daemon:
    """The trio side of a mount: the FUSE loop, signals, stats and the readiness probe."""

    def __init__(self, image: str, digest: str, paths: RunPaths, ops: Any, reader: Any,
                 ready_fd: int | None, *, index: Any = None, prefetch_budget: int = 0, store: Any = None,
                 replay: bool = False, recorder: Any = None, record_merge: bool = True,
                 read_ahead_kb: int | None = None, kernel: Any = None, cache_dir: str | None = None,
                 prefetch_rate: float = 0.0) -> None:
        self.prefetch_rate = prefetch_rate
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
                                 rate=self.prefetch_rate)
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
                self.kernel.mount()  # EROFS on the mountpoint, its blob read through our loop
            else:
                kb = DEFAULT_READ_AHEAD_KB if self.read_ahead_kb is None else self.read_ahead_kb
                set_read_ahead_kb(self.fuse_mountpoint, kb)

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
        out: dict[str, Any] = {
            "image": self.image, "digest": self.digest, "mountpoint": self.paths.mountpoint,
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
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
        record = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "image": self.image, "digest": self.digest,
                  "mountpoint": self.paths.mountpoint, "socket": self.paths.socket, "log": self.paths.log}
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
