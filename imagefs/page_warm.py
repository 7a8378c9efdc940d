"""Warm the kernel's page cache with what a profile replay brought.

A replay (:mod:`imagefs.replay`) puts the workload's chunks in the daemon's memory tier
before the workload asks. Its reads then still cross FUSE once per page-cache miss:
for ``import torch`` ~3,000 blob reads of ~400 MB through the daemon's Python, on the
cores the import needs. The page cache is the tier above ours, and the kernel fills it
on request: ``posix_fadvise(WILLNEED)`` on a range of a mounted file makes the kernel
read it ahead, through our own mount (EROFS or plain FUSE) into that file's pages. So as
each range of the replay arrives, the daemon asks the kernel to read the files' ranges
its chunks hold, and the workload later finds them in the page cache: a cold start with
a profile runs its reads at page-cache speed, with no FUSE request on its path.

Only what has arrived is warmed (a range not yet there would make the kernel's read a
demand fetch ahead of the stream). Paths are the index's own, opened under the mount
with ``O_NOFOLLOW`` (the walk that makes them descends only directories, so no image
symlink is followed, and nothing outside the mount is read). Calls run in worker
threads: an advice can wait for our own event loop, which must stay free to answer.
Best effort throughout: a file that cannot be opened is skipped.

Never while recording: the warming's reads would be recorded as the workload's.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Iterable

from indexer.index import ROOT_INO, Index
from indexer.profile import Profile

log = logging.getLogger(__name__)

# Open files kept between batches (a profile touches a few hundred files).
MAX_OPEN = 256


def chunk_places(index: Index, profile: Profile) -> dict[int, tuple[int, int, int]]:
    """chunk number -> (inode, offset, length) of one file range that holds it, for the
    profile's chunks: its recorded file where that file holds it, else the first file
    (in inode order) that does."""
    want = {e.chunk for e in profile.entries}
    places: dict[int, tuple[int, int, int]] = {}

    def add_file(ino: int) -> None:
        node = index.inode(ino)
        cs = index.file_chunk_size(ino)
        for i, c in enumerate(index.file_chunk_numbers(ino)):
            if c in want and c not in places:
                off = i * cs
                places[c] = (ino, off, min(cs, node.size - off))

    for ino in {e.ino for e in profile.entries if e.ino}:
        try:
            if stat.S_ISREG(index.inode(ino).mode):
                add_file(ino)
        except KeyError:
            continue
    if len(places) < len(want):
        for node in index.inodes():
            if stat.S_ISREG(node.mode) and node.size:
                add_file(node.ino)
                if len(places) == len(want):
                    break
    return places


def paths_of(index: Index, inos: Iterable[int]) -> dict[int, bytes]:
    """inode -> its path in the image (relative, bytes), one walk over directories only."""
    wanted = set(inos)
    out: dict[int, bytes] = {}
    stack: list[tuple[bytes, int]] = [(b"", ROOT_INO)]
    while stack and len(out) < len(wanted):
        path, ino = stack.pop()
        for _pos, name, child in index.readdir(ino):
            sub = path + b"/" + name if path else name
            if child in wanted and child not in out:
                out[child] = sub
            if stat.S_ISDIR(index.inode(child).mode):
                stack.append((sub, child))
    return out


class PageWarmer:
    """Advises the kernel to read file ranges under ``root`` (a mount of the image)."""

    def __init__(self, root: str, paths: dict[int, bytes]) -> None:
        self.root = os.fsencode(root)
        self.paths = paths
        self._fds: dict[int, int] = {}
        self.ranges = 0
        self.bytes = 0
        self.skipped = 0

    def warm(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        """(worker thread) Ask the kernel to read each ``(inode, offset, length)``."""
        for ino, off, length in ranges:
            fd = self._fd(ino)
            if fd is None:
                self.skipped += 1
                continue
            try:
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_WILLNEED)
                self.ranges += 1
                self.bytes += length
            except OSError:
                self.skipped += 1

    def _fd(self, ino: int) -> int | None:
        fd = self._fds.get(ino)
        if fd is not None:
            return fd
        path = self.paths.get(ino)
        if path is None:
            return None
        try:
            fd = os.open(os.path.join(self.root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
        except OSError:
            return None
        if len(self._fds) >= MAX_OPEN:
            old_ino, old_fd = next(iter(self._fds.items()))
            del self._fds[old_ino]
            os.close(old_fd)
        self._fds[ino] = fd
        return fd

    def close(self) -> None:
        """(worker thread: closing a file of a FUSE mount waits for its daemon)"""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def as_dict(self) -> dict[str, int]:
        return {"ranges": self.ranges, "bytes": self.bytes, "skipped": self.skipped}
