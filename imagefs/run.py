"""``imagefs run``: a container whose rootfs is a lazy imagefs mount.

The image is mounted once per host at ``<run dir>/images/<digest>`` (the run dir is
``$IMAGEFS_RUN_DIR``, else /run/imagefs) and shared by every container of that image
(a mount that ``imagefs run`` started is unmounted by the last container that uses
it). Each container gets a bundle in the containers directory (``$IMAGEFS_CONTAINERS_DIR``,
else /var/lib/imagefs/containers) with an overlayfs over that read-only mount, a fresh
upper and work directory, and a config.json (:mod:`imagefs.container_config`); runc
runs it in the foreground with our stdout/stderr (and stdin with ``-i``), and its exit
status becomes ours (Docker's 125/126/127 when it cannot start). Whatever the run
created is removed when the container exits, whatever signal stops it
(:mod:`imagefs.container_process`); what a SIGKILL leaves, the next run removes
(:mod:`imagefs.stale_runs`).

Nothing of an image reaches the host: the image mounts and the bundles sit in 0700
directories, the overlay is nodev (see :data:`OVERLAY_FLAGS`), config.json (with the
``-e`` environment) is 0600, and the image's /etc/passwd and /etc/group are read
inside the image (:mod:`imagefs.image_files`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from cache.private import open_private
from imagefs import stale_runs
from imagefs.container_config import BaseSpecError, build_config, runc_base_spec  # noqa: F401 (bench uses it)
from imagefs.container_process import Interrupted, SignalGuard
from imagefs.image_files import CommandError
from imagefs.run_spec import ConfigError, RunSpec

if TYPE_CHECKING:
    from imagefs.mount import MountOptions

log = logging.getLogger(__name__)

CONTAINERS_ENV = "IMAGEFS_CONTAINERS_DIR"
DEFAULT_CONTAINERS_DIR = "/var/lib/imagefs/containers"


def images_dir() -> str:
    """Where this host's shared image mounts live: ``<run dir>/images``, 0700, so that
    nothing of an image (its device nodes, setuid files, files its modes protect) is
    reachable from the host but through a container."""
    from cache.private import private_dir
    from imagefs.mount import private_run_dir

    return private_dir(os.path.join(private_run_dir(), "images"))


def runc_root() -> str:
    """runc's state directory (``--root``): ``<run dir>/runc``, 0700."""
    from cache.private import private_dir
    from imagefs.mount import private_run_dir

    return private_dir(os.path.join(private_run_dir(), "runc"))


def containers_dir() -> str:
    """Where container bundles live (``$IMAGEFS_CONTAINERS_DIR``, else
    /var/lib/imagefs/containers), 0700: a bundle holds the container's rootfs and its
    config.json, with the environment given by ``-e``."""
    from cache.private import private_dir

    named = os.environ.get(CONTAINERS_ENV)
    return private_dir(named or DEFAULT_CONTAINERS_DIR, owned=not named)


EXIT_RUN_ERROR = 125  # Docker's status when the run itself fails (not the container)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RunError(Exception):
    """The container could not be set up (the message says which step failed)."""


@dataclass
class Timings:
    mount_s: float = 0.0  # until the image mount answered (0 when reused)
    start_s: float = 0.0  # until runc had the container's process running
    total_s: float = 0.0  # until the container exited
    reused_mount: bool = False


@contextlib.contextmanager
def _flock(path: str, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


@contextlib.contextmanager
def shared_image_mount(image: str, digest: str, opts: "MountOptions", timings: Timings) -> Iterator[str]:
    """The host's mount of ``digest``, started if absent; unmounted by the last user.

    One host-wide lock (``/run/imagefs/images.lock``, held briefly) serialises
    checking, mounting and unmounting. Each container holds a shared flock on the
    image's ``<hex>.users`` file for as long as it runs, so whoever can take it
    exclusively is the last user: it unmounts and removes the mount point and the
    users file, leaving nothing behind.
    """
    from imagefs.mount import is_imagefs_mount, start_mount

    images = images_dir()
    mountpoint = os.path.join(images, digest.split(":", 1)[1])
    users_path = mountpoint + ".users"
    with _flock(images + ".lock", fcntl.LOCK_EX):
        users_fd = os.open(users_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(users_fd, fcntl.LOCK_SH)
        try:
            if is_imagefs_mount(mountpoint):
                timings.reused_mount = True
            else:
                os.makedirs(mountpoint, mode=0o700, exist_ok=True)
                t0 = time.monotonic()
                start_mount(digest, mountpoint, opts)
                timings.mount_s = time.monotonic() - t0
        except BaseException:
            _release(users_fd, users_path, mountpoint)
            raise
    try:
        yield mountpoint
    finally:
        with _flock(images + ".lock", fcntl.LOCK_EX):
            _release(users_fd, users_path, mountpoint)


def _release(users_fd: int, users_path: str, mountpoint: str) -> None:
    """(under the host-wide lock) Drop our use; the last user tears the mount down."""
    from imagefs.mount import is_imagefs_mount, unmount

    fcntl.flock(users_fd, fcntl.LOCK_UN)
    try:
        fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        last = True
    except BlockingIOError:
        last = False
    os.close(users_fd)
    if not last:
        return
    try:
        if is_imagefs_mount(mountpoint):
            unmount(mountpoint)
        os.rmdir(mountpoint)
        os.unlink(users_path)
    except OSError as e:  # cleanup must not mask the container's status
        log.warning("could not remove the mount %s: %s", mountpoint, e)
    except Exception as e:
        log.warning("could not unmount %s: %s", mountpoint, e)


# The overlay is nodev: a device node that an image ships (or that root in the container
# makes) opens nowhere, neither in the container nor from the host through
# /proc/<pid>/root of a container process (which the kernel lets any host user with
# the container process's uid follow). The container's devices are the ones runc makes
# in its own /dev. It is not nosuid: setuid programs work in the container, as with
# docker (su, sudo, ping); the kernel never honours a setuid bit of a mount that belongs
# to another mount namespace, so through /proc/<pid>/root they are plain files, and the
# host's own path to the rootfs is closed by the 0700 bundle directory.
OVERLAY_FLAGS = "nodev"


@contextlib.contextmanager
def private_image_mount(digest: str, mountpoint: str, opts: "MountOptions", timings: Timings) -> Iterator[str]:
    """A mount of ``digest`` for one container only (``imagefs profile`` and ``run
    --record``: a recording must see every first read, so it cannot share a mount whose
    page cache other containers have warmed). Unmounted when the container is done."""
    from imagefs.mount import is_imagefs_mount, start_mount, unmount

    os.makedirs(mountpoint, exist_ok=True)
    t0 = time.monotonic()
    start_mount(digest, mountpoint, opts)
    timings.mount_s = time.monotonic() - t0
    try:
        yield mountpoint
    finally:
        try:
            if is_imagefs_mount(mountpoint):
                unmount(mountpoint, timeout=60.0)  # a recording is saved as the daemon exits
        except Exception as e:  # cleanup must not mask the container's status
            log.warning("could not unmount %s: %s", mountpoint, e)


def private_mountpoint(cid: str) -> str:
    """Where a container's private image mount is (see :func:`private_image_mount`)."""
    return os.path.join(containers_dir(), cid, "image")


@contextlib.contextmanager
def overlay(lower: str, workdir: str) -> Iterator[str]:
    """A writable overlayfs over the read-only image mount, removed afterwards."""
    upper, work, merged = (os.path.join(workdir, d) for d in ("upper", "work", "rootfs"))
    for d in (upper, work, merged):
        os.makedirs(d, mode=0o700, exist_ok=True)
    # The container's / takes its mode and owner from the upper directory: the image's.
    root = os.stat(lower)
    os.chown(upper, root.st_uid, root.st_gid)
    os.chmod(upper, stat.S_IMODE(root.st_mode))
    opts = f"{OVERLAY_FLAGS},lowerdir={lower},upperdir={upper},workdir={work}"
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, merged], capture_output=True, text=True)
    if res.returncode:
        raise RunError(f"mounting the overlay on {merged} failed: {res.stderr.strip()}")
    try:
        yield merged
    finally:
        if subprocess.run(["umount", merged], capture_output=True).returncode:
            subprocess.run(["umount", "-l", merged], capture_output=True)


def _watch_start(pid_file: str, t0: float, timings: Timings, done: threading.Event) -> None:
    """runc writes --pid-file once the container's process exists: that is 'started'."""
    while not done.is_set():
        if os.path.exists(pid_file):
            timings.start_s = time.monotonic() - t0
            return
        time.sleep(0.001)


def run_container(image: str, spec: RunSpec, opts: "MountOptions", name: str | None = None, *,
                  private_mount: bool = False) -> tuple[int, Timings]:
    """Run one container to completion; returns (exit status, timings).

    ``private_mount`` (implied by ``opts.record``): the container gets a mount of its
    own instead of the host's shared mount of the image.

    Raises :class:`RunError`, :class:`ConfigError` or :class:`CommandError` (with
    Docker's status) if it cannot start; a terminating signal before the container
    runs ends the setup with status 128+signal, after everything made is removed.
    """
    timings = Timings()
    t0 = time.monotonic()
    with SignalGuard(spec.stop_timeout) as guard:
        try:
            status = _run(image, spec, opts, name, guard, t0, timings, private_mount or opts.record)
        except Interrupted as e:
            log.warning("%s before the container started; everything it made is removed", e)
            status = e.status
    timings.total_s = time.monotonic() - t0
    return status, timings


def _run(image: str, spec: RunSpec, opts: "MountOptions", name: str | None, guard: SignalGuard,
         t0: float, timings: Timings, private_mount: bool) -> int:
    from cache.stores import open_store
    from imagefs.index_cache import load_index
    from imagefs.mount import mount_health

    cid = name or f"imagefs-{secrets.token_hex(6)}"
    if not _NAME.match(cid):
        raise RunError(f"invalid container name {cid!r} (letters, digits, '_', '.', '-'; at most 128)")
    store = open_store(opts.store, s3_endpoint=opts.s3_endpoint)
    # One fetch of the index: the copy kept here is what the mount daemon loads.
    index = load_index(store, image, opts.index_cache_dir())
    digest, image_cfg = index.digest, index.config
    containers, images, rroot = containers_dir(), images_dir(), runc_root()
    try:
        stale_runs.sweep(containers, images, rroot)
    except Exception as e:  # never a reason not to run this one
        log.warning("could not remove what earlier runs left: %s", e)
    bundle = os.path.join(containers, cid)
    try:
        os.mkdir(bundle, 0o700)
    except FileExistsError:
        raise RunError(f"container {cid!r} exists already ({bundle})") from None
    try:
        stale_runs.write_owner(bundle)
        with contextlib.ExitStack() as stack:
            try:
                with guard.deferred():
                    if private_mount:
                        mounted = private_image_mount(digest, private_mountpoint(cid), opts, timings)
                    else:
                        mounted = shared_image_mount(image, digest, opts, timings)
                    lower = stack.enter_context(mounted)
                with guard.deferred():
                    rootfs = stack.enter_context(overlay(lower, bundle))
                try:
                    config = build_config(bundle, rootfs, lower, image_cfg, spec, cid)
                except BaseSpecError as e:
                    raise RunError(str(e)) from None
                # 0600: the environment may hold secrets (-e TOKEN=...)
                with open(open_private(os.path.join(bundle, "config.json"), os.O_WRONLY | os.O_TRUNC), "w") as f:
                    json.dump(config, f, indent=1)
                guard.check()
                restarts = mount_health(lower).restarts
                status = _run_runc(cid, bundle, rroot, spec, guard, t0, timings)
                _report_mount(image, lower, restarts)
                return status
            finally:
                guard.finished()  # from here on, signals wait for the clean-up
    finally:
        subprocess.run(["runc", "--root", rroot, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


def _report_mount(image: str, mountpoint: str, restarts_before: int | None) -> None:
    """Say if the image's mount died under the container, or had its daemon replaced
    (imagefs.supervisor): the container's status alone does not tell."""
    from imagefs.mount import RunPaths, mount_health

    health = mount_health(mountpoint)
    log_path = RunPaths.of(mountpoint).log
    if not health.alive:
        log.warning("the mount of %s died under the container: %s; the container's reads failed from then on "
                    "(log: %s)", image, health.problem, log_path)
    elif health.restarts is not None and restarts_before is not None and health.restarts > restarts_before:
        n = health.restarts - restarts_before
        log.warning("the mount daemon of %s crashed %d time%s during the run and was replaced: the container's "
                    "reads paused, none failed (log: %s)", image, n, "s" if n > 1 else "", log_path)


def _run_runc(cid: str, bundle: str, rroot: str, spec: RunSpec, guard: SignalGuard, t0: float,
              timings: Timings) -> int:
    """Run the container in the foreground; returns its exit status (see
    :mod:`imagefs.container_process` for signals)."""
    pid_file, runc_log = os.path.join(bundle, "pid"), os.path.join(bundle, "runc.log")
    cmd = ["runc", "--root", rroot, "--log", runc_log, "--log-format", "json",
           "run", "--bundle", bundle, "--pid-file", pid_file, cid]
    attach_stdin = spec.interactive or spec.terminal
    stdin_is_tty = attach_stdin and os.isatty(0)
    done = threading.Event()
    watcher = threading.Thread(target=_watch_start, args=(pid_file, t0, timings, done), daemon=True)
    watcher.start()

    def kill() -> None:
        subprocess.run(["runc", "--root", rroot, "kill", "--all", cid, "KILL"], capture_output=True)

    try:
        with guard.deferred():  # a signal now is forwarded once runc is there to take it
            proc = subprocess.Popen(cmd, stdin=None if attach_stdin else subprocess.DEVNULL,
                                    process_group=None if stdin_is_tty else 0)
            guard.running(proc, kill)
        status = proc.wait()
    finally:
        done.set()
    guard.finished()
    if status < 0:
        return 128 - status
    if status and not os.path.exists(pid_file):
        return _runc_failure_status(runc_log)
    return status


def _runc_failure_status(runc_log: str) -> int:
    """Docker's status for a container that runc could not start: 127 when the command
    is not there, 126 when it cannot be executed, 125 for anything else."""
    message = ""
    try:
        with open(runc_log, errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("level") in ("error", "fatal"):
                    message = str(entry.get("msg", ""))
    except OSError:
        pass
    if "executable file not found" in message or "no such file or directory" in message:
        return CommandError.NOT_FOUND
    if "permission denied" in message:
        return CommandError.NOT_EXECUTABLE
    return EXIT_RUN_ERROR


__all__ = ["run_container", "RunSpec", "RunError", "ConfigError", "CommandError", "Timings", "EXIT_RUN_ERROR"]
