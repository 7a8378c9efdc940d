"""Mounts: the host's lazy image mounts, and the mount lists handed to containerd.

An image that backs remote snapshots is mounted once per host at
``<root>/images/<hex digest>`` (the root is 0700, so nothing of an image is reachable
from the host but through a container), by :func:`imagefs.mount.start_mount`: forked
by the host agent when one runs, else a daemon of its own. Each mount is a separate
process in a session of its own, so it outlives a restart of the snapshotter, and a
container keeps running through one. The snapshotter mounts an image when a container
(an active snapshot or a view) on it is prepared or its mounts are asked for, and
unmounts it when the last such snapshot is removed or committed.

containerd performs the container's own mounts: the snapshotter only describes them
(``type``, ``source``, ``options``), as overlayfs's snapshotter does: an active snapshot
is an overlay of its parents (the image mount at the bottom) under its own directory,
or a bind mount of that directory when it has no parent; a view is read-only. The
overlay is ``nodev``, as ``imagefs run``'s is: a device node from an image opens nowhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable

from cache.private import private_dir

if TYPE_CHECKING:
    from imagefs.mount import MountOptions

log = logging.getLogger(__name__)

Mount = dict[str, Any]  # {"type", "source", "options"}, as containerd's types.Mount


def bind(source: str, *, readonly: bool) -> list[Mount]:
    return [{"type": "bind", "source": source, "options": ["rbind", "ro" if readonly else "rw", "nodev"]}]


def overlay(lowers: list[str], upper: str | None = None, work: str | None = None) -> list[Mount]:
    """An overlay of ``lowers`` (topmost first); read-only without ``upper``."""
    options = ["index=off", "nodev"]
    if upper is None:
        options.append("ro")
    options.append("lowerdir=" + ":".join(lowers))
    if upper is not None:
        options += [f"upperdir={upper}", f"workdir={work}"]
    return [{"type": "overlay", "source": "overlay", "options": options}]


class ImageMounts:
    """The lazy mounts of store images under ``directory``, one per image digest."""

    def __init__(self, directory: str, opts: "MountOptions", *, timeout: float = 60.0) -> None:
        self.directory = private_dir(directory)
        self.opts = opts
        self.timeout = timeout
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest.split(":", 1)[-1])

    def _image_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(digest, threading.Lock())

    def ensure(self, digest: str) -> str:
        """The mount of ``digest``, started if it is not there (or is dead)."""
        from imagefs.mount import is_imagefs_mount, start_mount

        path = self.path(digest)
        with self._image_lock(os.path.basename(path)):
            if is_imagefs_mount(path):
                if _answers(path):
                    return path
                log.warning("image mount %s does not answer (its daemon died); mounting it again", path)
                self._unmount(path)
            os.makedirs(path, mode=0o700, exist_ok=True)
            start_mount(digest, path, self.opts, timeout=self.timeout)
            log.info("mounted image %s at %s", digest, path)
            return path

    def mounted(self) -> set[str]:
        """Digests (hex) that have a mount point here."""
        try:
            return {name for name in os.listdir(self.directory) if not name.startswith(".")}
        except FileNotFoundError:
            return set()

    def retain(self, needed: Callable[[], set[str]]) -> list[str]:
        """Unmount (and remove the mount point of) every image that ``needed()`` (index
        digests) leaves out; returns the hex digests released. ``needed`` is asked again
        under each image's lock, so a container prepared meanwhile keeps its image:
        whoever adds a user of an image records it first and calls :meth:`ensure` after."""
        released = []
        for name in sorted(self.mounted()):
            with self._image_lock(name):
                if name in {d.split(":", 1)[-1] for d in needed()}:
                    continue
                path = os.path.join(self.directory, name)
                self._unmount(path)
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                released.append(name)
        return released

    def _unmount(self, path: str) -> None:
        from imagefs.mount import MountError, is_imagefs_mount, unmount

        if not is_imagefs_mount(path):
            return
        try:
            unmount(path)
            log.info("unmounted image at %s", path)
        except MountError as e:
            log.warning("could not unmount %s: %s", path, e)


def _answers(path: str) -> bool:
    try:
        os.stat(path)
        return True
    except OSError as e:
        return e.errno not in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
