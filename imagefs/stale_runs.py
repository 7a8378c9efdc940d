"""Remove what an ``imagefs run`` killed with SIGKILL (or a crashed one) left behind.

A run undoes everything it made when it exits, whatever signal stops it, except
SIGKILL, which no process can answer. So every run records its owner (pid and the
kernel's start time of that pid, which together name one process for good) in its
bundle, and the next ``imagefs run`` (or :func:`sweep` called by anything else) looks
for bundles whose owner is gone and removes their container (``runc kill``/``delete``),
overlay and bundle; then image mounts that no live run uses any more (their
``.users`` file can be locked exclusively), and runc state whose bundle is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import time

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
YOUNG_S = 60.0  # a bundle without an owner record yet may be being made right now


def write_owner(bundle: str) -> None:
    from cache.private import open_private
    from imagefs.mount import process_start_time

    pid = os.getpid()
    with open(open_private(os.path.join(bundle, OWNER_FILE), os.O_WRONLY | os.O_TRUNC), "w") as f:
        json.dump({"pid": pid, "start_time": process_start_time(pid)}, f)


def owner_alive(bundle: str) -> bool | None:
    """Whether the run that made ``bundle`` is alive; None if it left no record."""
    from imagefs.mount import process_start_time

    try:
        with open(os.path.join(bundle, OWNER_FILE)) as f:
            owner = json.load(f)
        pid = int(owner["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return process_start_time(pid) == owner.get("start_time")


def _runc(runc_root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runc", "--root", runc_root, *args], capture_output=True, text=True, timeout=30)


def remove_container(cid: str, bundle: str, runc_root: str) -> None:
    """Kill and delete container ``cid``, unmount its overlay, remove its bundle."""
    _runc(runc_root, "kill", "--all", cid, "KILL")
    _runc(runc_root, "delete", "--force", cid)
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.ismount(rootfs):
        if subprocess.run(["umount", rootfs], capture_output=True).returncode:
            subprocess.run(["umount", "-l", rootfs], capture_output=True)
    shutil.rmtree(bundle, ignore_errors=True)


def _runc_bundle(runc_root: str, cid: str) -> str | None:
    """The bundle runc recorded for container ``cid`` (``<root>/<id>/state.json``, label
    ``bundle=``); None if it cannot be told, and then the state is left alone."""
    try:
        with open(os.path.join(runc_root, cid, "state.json")) as f:
            labels = json.load(f)["config"]["labels"]
        return next(label[len("bundle="):] for label in labels if label.startswith("bundle="))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def sweep(containers_dir: str, images_dir: str, runc_root: str) -> list[str]:
    """Remove leftovers of dead runs; returns what was removed (for messages and tests)."""
    removed: list[str] = []
    now = time.time()
    for cid in sorted(os.listdir(containers_dir)):
        bundle = os.path.join(containers_dir, cid)
        alive = owner_alive(bundle)
        if alive or (alive is None and now - os.lstat(bundle).st_mtime < YOUNG_S):
            continue
        log.warning("removing container %s left by an imagefs run that is gone", cid)
        remove_container(cid, bundle, runc_root)
        removed.append(f"container {cid}")
    for cid in sorted(os.listdir(runc_root)):
        bundle = _runc_bundle(runc_root, cid)
        if bundle is not None and not os.path.isdir(bundle):
            _runc(runc_root, "delete", "--force", cid)
            removed.append(f"runc state {cid}")
    removed += sweep_image_mounts(images_dir)
    return removed


def sweep_image_mounts(images_dir: str) -> list[str]:
    """Unmount and remove image mounts that no live run uses (under the host-wide lock)."""
    from imagefs.mount import MountError, is_imagefs_mount, unmount

    removed = []
    lock_fd = os.open(images_dir + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        for name in sorted(os.listdir(images_dir)):
            if not name.endswith(".users"):
                continue
            users = os.path.join(images_dir, name)
            mountpoint = users[: -len(".users")]
            fd = os.open(users, os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run uses it
                if is_imagefs_mount(mountpoint):
                    try:
                        unmount(mountpoint)
                    except MountError as e:
                        log.warning("cannot remove the stale image mount %s: %s", mountpoint, e)
                        continue
                    removed.append(f"image mount {os.path.basename(mountpoint)}")
                with contextlib.suppress(OSError):
                    os.rmdir(mountpoint)
                os.unlink(users)
            finally:
                os.close(fd)
    finally:
        os.close(lock_fd)
    return removed
