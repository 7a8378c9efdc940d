"""Read-only filesystem semantics over an image index, with no FUSE in sight.

Everything a mount answers (lookup, attributes, directory listings, symlinks, xattrs,
file bytes, statfs, access checks) is decided here, so it can be tested by calling
methods and reused by anything that is not pyfuse3. Errors are one small exception,
:class:`VFSError`, carrying an errno; the FUSE adapter maps it to ``FUSEError`` in
exactly one place.

Inode numbers are the index's own (the root is 1), stable for the life of the image,
so there is no lookup-count bookkeeping: nothing is ever freed. File bytes come from a
:class:`~cache.tier.ChunkReader`. The chunks one read needs are grouped into runs
that lie back to back in a pack; runs are fetched concurrently, and the head of each
run names the rest of it as ``neighbours`` (the last run adds the chunks stored after
it in the pack, up to a window: the rest of the file, then the next files in tree
order), so a cold read costs one ranged blob-store read per run and brings what a
sequential reader, or a process importing a package file by file, asks for next.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence, overload

import trio

from cache.chunk import ChunkRef
from cache.tier import ChunkReader
from indexer.index import ROOT_INO, Index
from indexer.tree import NAME_MAX

if TYPE_CHECKING:
    from imagefs.recorder import Recorder

log = logging.getLogger(__name__)

# The block size reported to readers: stdio and cp size their buffers by it.
BLOCK_SIZE = 128 * 1024
# How many bytes past a read are offered as neighbours (for one ranged read).
DEFAULT_NEIGHBOUR_WINDOW = 8 * 1024 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _runs(spans: Sequence[tuple[int, ChunkRef]]) -> Iterator[tuple[int, int]]:
    """``[first, last)`` index ranges of ``spans`` whose chunks lie back to back in one pack."""
    first = 0
    for i in range(1, len(spans)):
        prev, ref = spans[i - 1][1], spans[i][1]
        if ref.pack != prev.pack or ref.offset != prev.offset + prev.clen:
            yield first, i
            first = i
    yield first, len(spans)


class _Neighbours(Sequence[ChunkRef]):
    """The neighbours of one chunk request, worked out only if the reader looks at them.

    A memory hit (the common case once warm) never does, so it costs no index walk and
    no ChunkRef objects. ``prefix`` are the rest of the read's own run; after them come
    the file's chunks following ``last`` (when given), up to the VFS's window.
    """

    __slots__ = ("_vfs", "_ino", "_last", "_prefix", "_refs")

    def __init__(self, vfs: "VFS", ino: int, last: tuple[int, ChunkRef] | None,
                 prefix: Sequence[ChunkRef] = ()) -> None:
        self._vfs = vfs
        self._ino = ino
        self._last = last
        self._prefix = prefix
        self._refs: list[ChunkRef] | None = None

    def _get(self) -> list[ChunkRef]:
        if self._refs is None:
            refs = list(self._prefix)
            if self._last is not None:
                refs += self._vfs.neighbours_after(self._ino, self._last)
            self._refs = refs
        return self._refs

    def __len__(self) -> int:
        return len(self._get())

    @overload
    def __getitem__(self, i: int) -> ChunkRef: ...

    @overload
    def __getitem__(self, i: slice) -> list[ChunkRef]: ...

    def __getitem__(self, i: int | slice) -> ChunkRef | list[ChunkRef]:
        return self._get()[i]

    def __iter__(self) -> Iterator[ChunkRef]:
        return iter(self._get())


class VFSError(Exception):
    """A filesystem answer that is an error: ``errno`` is what the caller sees."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err


@dataclass(frozen=True, slots=True)
class Attributes:
    """The stat of one inode. atime, mtime and ctime are all the image's mtime."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units, ceil(size / 512)
    blksize: int
    time_ns: int


@dataclass(frozen=True, slots=True)
class StatFS:
    """statvfs figures: an image is full by definition (no free blocks or inodes)."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


class VFS:
    """The filesystem of one image.

    ``name`` identifies the image in log lines (defaults to the index digest);
    ``neighbour_window`` is how many bytes of the chunks stored after a read it offers
    the reader as neighbours.
    """

    def __init__(
        self,
        index: Index,
        reader: ChunkReader,
        *,
        name: str = "",
        neighbour_window: int = DEFAULT_NEIGHBOUR_WINDOW,
        read_timeout: float | None = None,
    ) -> None:
        self.index = index
        self.reader = reader
        # The budget of one read (a mount's --read-timeout): see read().
        self.read_timeout = read_timeout
        self.name = name or index.digest or "image"
        self.neighbour_window = max(0, neighbour_window)
        self._statfs: StatFS | None = None
        # An imagefs.recorder.Recorder while the mount records a startup profile.
        self.recorder: Recorder | None = None

    # -- attributes ------------------------------------------------------------------

    def getattr(self, ino: int) -> Attributes:
        try:
            i = self.index.inode(ino)
        except KeyError:
            raise VFSError(errno.ENOENT, f"no inode {ino}") from None
        return Attributes(
            ino=ino, mode=i.mode, nlink=i.nlink, uid=i.uid, gid=i.gid, rdev=i.rdev,
            size=i.size, blocks=(i.size + 511) // 512, blksize=BLOCK_SIZE, time_ns=i.mtime_ns,
        )

    def _dir(self, ino: int) -> Attributes:
        attrs = self.getattr(ino)
        if not stat.S_ISDIR(attrs.mode):
            raise VFSError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return attrs

    def lookup(self, parent: int, name: bytes) -> Attributes | None:
        """The attributes of ``name`` in ``parent``; None if there is no such entry
        (a negative answer the caller may cache: the image never changes)."""
        self._dir(parent)
        if len(name) > NAME_MAX:
            raise VFSError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(self.index.inode(parent).parent)
        child = self.index.lookup(parent, name)
        return None if child is None else self.getattr(child)

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, Attributes]]:
        """``(next position, name, attributes)`` from position ``start`` on.

        Position 0 is ``.``, 1 is ``..``, ``2 + i`` the i-th entry in name order, so a
        listing resumes exactly where a previous call stopped.
        """
        attrs = self._dir(ino)
        if start <= 0:
            yield 1, b".", attrs
        if start <= 1:
            yield 2, b"..", self.getattr(self.index.inode(ino).parent)
        for pos, name, child in self.index.readdir(ino, max(0, start - 2)):
            yield pos + 3, name, self.getattr(child)

    def readlink(self, ino: int) -> bytes:
        if not stat.S_ISLNK(self.getattr(ino).mode):
            raise VFSError(errno.EINVAL, f"inode {ino} is not a symlink")
        return self.index.readlink(ino)

    # -- xattrs ----------------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.getattr(ino)
        value = self.index.getxattr(ino, name)
        if value is None:
            raise VFSError(errno.ENODATA, f"no xattr {name!r} on inode {ino}")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        self.getattr(ino)
        return [n for n, _v in self.index.xattrs(ino)]

    # -- permissions -----------------------------------------------------------------

    def opendir(self, ino: int) -> None:
        self._dir(ino)

    def open(self, ino: int, flags: int) -> Attributes:
        """Check that ``ino`` may be opened with ``flags``: never for writing."""
        attrs = self.getattr(ino)
        if flags & _WRITE_FLAGS:
            raise VFSError(errno.EROFS, "read-only image")
        if stat.S_ISDIR(attrs.mode):
            raise VFSError(errno.EISDIR, f"inode {ino} is a directory")
        return attrs

    def access(self, ino: int, mode: int, uid: int, gid: int, groups: Sequence[int] = ()) -> None:
        """Raise EACCES/EROFS unless a caller ``uid``/``gid`` may ``mode`` (R/W/X_OK) ``ino``."""
        attrs = self.getattr(ino)
        if mode & os.W_OK:
            raise VFSError(errno.EROFS, "read-only image")
        perm = attrs.mode
        if uid == 0:
            # root reads anything; executes if anyone may (or it is a directory).
            if mode & os.X_OK and not stat.S_ISDIR(perm) and not perm & 0o111:
                raise VFSError(errno.EACCES, "no execute bit")
            return
        if uid == attrs.uid:
            bits = (perm >> 6) & 7
        elif gid == attrs.gid or attrs.gid in groups:
            bits = (perm >> 3) & 7
        else:
            bits = perm & 7
        want = (4 if mode & os.R_OK else 0) | (1 if mode & os.X_OK else 0)
        if want & ~bits:
            raise VFSError(errno.EACCES, f"mode {perm & 0o7777:o} denies {want:o}")

    # -- file data -------------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``ino`` from ``offset`` (short only at EOF).

        EIO, with a log line naming the image, the file and the chunk, when a chunk
        cannot be had from any tier, or not within ``read_timeout`` seconds: a read of
        one chunk is one chain get, which keeps that deadline itself; a read of several
        keeps it here, over all of them (one budget per FUSE request).
        """
        try:
            node = self.index.inode(ino)
        except KeyError:
            raise VFSError(errno.ENOENT, f"no inode {ino}") from None
        if not stat.S_ISREG(node.mode):
            raise VFSError(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL, f"inode {ino} is not a file")
        if offset < 0:
            raise VFSError(errno.EINVAL, "negative offset")
        size = min(size, node.size - offset)
        if size <= 0:
            return b""
        if self.recorder is not None:
            self.recorder.saw(ino, offset, size)
        spans = self.index.chunks_for_range(ino, offset, size)
        if not spans:
            return b""
        end = offset + size
        if len(spans) == 1:
            foff, ref = spans[0]
            data = await self._fetch(ino, ref, _Neighbours(self, ino, spans[0]))
            lo, hi = offset - foff, end - foff
            return data if lo == 0 and hi >= len(data) else data[lo:hi]
        results: list[bytes | BaseException | None] = [None] * len(spans)

        async def fetch_run(first: int, last: int) -> None:
            # The head of a run names the rest of it as neighbours, so one ranged read
            # brings the whole run; the rest are then memory hits (or joined fetches).
            # Only the last run looks past the read, into the rest of the file.
            tail = spans[-1] if last == len(spans) else None
            for i in range(first, last):
                ref = spans[i][1]
                nbrs: Sequence[ChunkRef] = ()
                if i == first:
                    nbrs = _Neighbours(self, ino, tail, [r for _o, r in spans[first + 1: last]])
                try:
                    results[i] = await self.reader.get(ref, nbrs)
                except Exception as e:  # reported below, once per chunk, as EIO
                    results[i] = e

        with trio.move_on_after(self.read_timeout if self.read_timeout is not None else float("inf")) as scope:
            async with trio.open_nursery() as nursery:
                for first, last in _runs(spans):
                    nursery.start_soon(fetch_run, first, last)
        if scope.cancelled_caught:
            late = TimeoutError(f"not read within {self.read_timeout:g} s")
            results = [late if r is None else r for r in results]
        parts: list[bytes | memoryview] = []
        failed: VFSError | None = None
        for (foff, ref), got in zip(spans, results):
            if not isinstance(got, bytes):
                failed = self._chunk_failed(ino, ref, got)
                continue
            lo, hi = max(0, offset - foff), min(len(got), end - foff)
            parts.append(got if lo == 0 and hi == len(got) else memoryview(got)[lo:hi])
        if failed is not None:
            raise failed
        return b"".join(parts)

    async def _fetch(self, ino: int, ref: ChunkRef, neighbours: Sequence[ChunkRef]) -> bytes:
        try:
            return await self.reader.get(ref, neighbours)
        except Exception as e:
            raise self._chunk_failed(ino, ref, e) from e

    def _chunk_failed(self, ino: int, ref: ChunkRef, error: BaseException | None) -> VFSError:
        try:
            path = self.index.path_of(ino)
        except Exception:  # a log line must not fail
            path = f"inode {ino}"
        log.error("image %s: %s: %s: cannot be read: %s", self.name, path, ref, error or "no data")
        return VFSError(errno.EIO, f"{path}: {ref}: {error}")

    def neighbours_after(self, ino: int, last: tuple[int, ChunkRef]) -> list[ChunkRef]:
        """The chunks stored right after ``last`` in its pack, up to the window: the
        rest of this file and then the files after it in tree order, which is what a
        process reading a directory's files one by one (Python imports) asks for next.
        One ranged read brings them all, so small files do not cost a round trip each."""
        if self.neighbour_window == 0:
            return []
        foff, _ref = last
        return self.index.pack_successors(self.index.chunk_no(ino, foff), self.neighbour_window)

    # -- filesystem ------------------------------------------------------------------

    def statfs(self) -> StatFS:
        if self._statfs is None:
            total = 0
            for ino in range(1, self.index.n_inodes + 1):
                i = self.index.inode(ino)
                if stat.S_ISREG(i.mode):
                    total += i.size
            frsize = 4096
            self._statfs = StatFS(
                bsize=BLOCK_SIZE, frsize=frsize, blocks=(total + frsize - 1) // frsize, bfree=0, bavail=0,
                files=self.index.n_inodes, ffree=0, favail=0, namemax=NAME_MAX,
            )
        return self._statfs


__all__ = ["VFS", "VFSError", "Attributes", "StatFS", "ROOT_INO", "BLOCK_SIZE"]
