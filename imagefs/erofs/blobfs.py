"""The filesystem behind an EROFS mount's extra device: one file, the virtual blob.

It has the shape of :class:`imagefs.vfs.VFS` (lookup, getattr, readdir, open, read,
...), so the same pyfuse3 adapter (:class:`imagefs.fuse_ops.FuseOps`) serves it, with
its error mapping, counters and fault hook: ``imagefs stats`` shows the FUSE requests
of the backing mount like those of a plain one.

The tree is a root directory (inode 1) holding ``blob`` (inode 2), whose size is the
slot map's. A read of the blob is cut at slot boundaries (:mod:`indexer.erofs.slots`);
each piece inside a chunk's bytes comes from the chunk chain, verified as every chunk
is, and the rest is zeros. The kernel only reads what EROFS files map, chunk-aligned,
so a request almost always falls in one chunk: that case costs one bisection, one
chain ``get`` (a memory-tier hit once warm) and a memoryview slice, no copy.

Only root reaches it: the blob holds every file of the image whatever its mode, so
the root directory is 0700 and the mount has no ``allow_other``. The kernel opens it
once, with the credentials of the process that mounted EROFS.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import TYPE_CHECKING, Iterator, Sequence, overload

import trio

from cache.chunk import ChunkRef
from cache.tier import ChunkReader
from indexer.erofs.slots import SlotMap
from imagefs.vfs import BLOCK_SIZE, DEFAULT_NEIGHBOUR_WINDOW, Attributes, StatFS, VFSError

if TYPE_CHECKING:
    from imagefs.recorder import Recorder
    from indexer.index import Index

log = logging.getLogger(__name__)

ROOT_INO = 1
BLOB_INO = 2
BLOB_NAME = b"blob"
_ZEROS = memoryview(bytes(1 << 20))


class _Neighbours(Sequence[ChunkRef]):
    """The chunks stored after chunk ``n`` in its pack, worked out only if a fetch from
    below asks (a memory or SSD hit never does)."""

    __slots__ = ("_index", "_n", "_window", "_refs")

    def __init__(self, index: "Index", n: int, window: int) -> None:
        self._index = index
        self._n = n
        self._window = window
        self._refs: list[ChunkRef] | None = None

    def _get(self) -> list[ChunkRef]:
        if self._refs is None:
            self._refs = self._index.pack_successors(self._n, self._window) if self._window else []
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


class BlobFS:
    """The virtual blob of one index, readable as ``/blob`` of a FUSE mount."""

    def __init__(self, index: "Index", slots: SlotMap, reader: ChunkReader, *, name: str = "",
                 neighbour_window: int = DEFAULT_NEIGHBOUR_WINDOW, read_timeout: float | None = None) -> None:
        self.index = index
        # The budget of one read (a mount's --read-timeout), as in imagefs.vfs.VFS.read.
        self.read_timeout = read_timeout
        self.slots = slots
        self.reader = reader
        self.name = name or index.digest or "image"
        self.neighbour_window = max(0, neighbour_window)
        # An imagefs.recorder.Recorder while the mount records a startup profile: the
        # blob's reads know their chunk numbers, not the file (recorded as inode 0).
        self.recorder: "Recorder | None" = None
        self._time_ns = 0
        self._root = Attributes(ino=ROOT_INO, mode=stat.S_IFDIR | 0o700, nlink=2, uid=0, gid=0, rdev=0, size=0,
                                blocks=0, blksize=BLOCK_SIZE, time_ns=0)
        self._blob = Attributes(ino=BLOB_INO, mode=stat.S_IFREG | 0o400, nlink=1, uid=0, gid=0, rdev=0,
                                size=slots.size, blocks=(slots.size + 511) // 512, blksize=BLOCK_SIZE, time_ns=0)

    # -- the tree: one directory, one file ------------------------------------------

    def getattr(self, ino: int) -> Attributes:
        if ino == ROOT_INO:
            return self._root
        if ino == BLOB_INO:
            return self._blob
        raise VFSError(errno.ENOENT, f"no inode {ino}")

    def lookup(self, parent: int, name: bytes) -> Attributes | None:
        if parent != ROOT_INO:
            raise VFSError(errno.ENOTDIR, f"inode {parent} is not a directory")
        if name in (b".", b".."):
            return self._root
        return self._blob if name == BLOB_NAME else None

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, Attributes]]:
        self.opendir(ino)
        entries = [(b".", self._root), (b"..", self._root), (BLOB_NAME, self._blob)]
        for pos in range(max(0, start), len(entries)):
            yield pos + 1, entries[pos][0], entries[pos][1]

    def opendir(self, ino: int) -> None:
        if ino != ROOT_INO:
            raise VFSError(errno.ENOTDIR, f"inode {ino} is not a directory")

    def open(self, ino: int, flags: int) -> Attributes:
        attrs = self.getattr(ino)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
            raise VFSError(errno.EROFS, "read-only blob")
        if ino != BLOB_INO:
            raise VFSError(errno.EISDIR, f"inode {ino} is a directory")
        return attrs

    def readlink(self, ino: int) -> bytes:
        raise VFSError(errno.EINVAL, "no symlinks here")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.getattr(ino)
        raise VFSError(errno.ENODATA, "no xattrs here")

    def listxattr(self, ino: int) -> list[bytes]:
        self.getattr(ino)
        return []

    def access(self, ino: int, mode: int, uid: int, gid: int, groups: Sequence[int] = ()) -> None:
        self.getattr(ino)
        if mode & os.W_OK:
            raise VFSError(errno.EROFS, "read-only blob")
        if uid != 0:
            raise VFSError(errno.EACCES, "root only")

    def statfs(self) -> StatFS:
        blocks = self.slots.size // 4096
        return StatFS(bsize=BLOCK_SIZE, frsize=4096, blocks=blocks, bfree=0, bavail=0, files=2, ffree=0, favail=0,
                      namemax=255)

    # -- the blob's bytes ------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes of the blob from ``offset`` (short only at its end): each chunk's
        bytes at its slot, zeros elsewhere. EIO, logged with the chunk, when a chunk
        cannot be had from any tier."""
        if ino != BLOB_INO:
            raise VFSError(errno.EISDIR, f"inode {ino} is not the blob")
        if offset < 0:
            raise VFSError(errno.EINVAL, "negative offset")
        end = min(offset + size, self.slots.size)
        if offset >= end:
            return b""
        n, inside, left = self.slots.locate(offset)
        if left >= end - offset:  # the common case: the whole read is inside one slot
            if n < 0:
                return _zeros(end - offset)
            return await self._part(n, inside, end - offset)
        pieces: list[tuple[int, int, int]] = []  # (chunk or -1, offset in it, length)
        pos = offset
        while pos < end:
            n, inside, left = self.slots.locate(pos)
            take = min(left, end - pos)
            pieces.append((n, inside, take))
            pos += take
        # A read across slots: its chunks follow each other in the pack, so the first
        # fetch (with the others as its neighbours) brings them all and the rest are
        # memory hits, as a plain mount reads a run (imagefs.vfs).
        got: dict[int, bytes] = {}
        n = -1
        with trio.move_on_after(self.read_timeout if self.read_timeout is not None else float("inf")):
            for n, _inside, _take in pieces:
                if n >= 0 and n not in got:
                    got[n] = await self._get(n)
            n = -1
        if n >= 0:  # the budget of the whole read ran out while chunk n was awaited
            raise self._failed(n, self.index.chunk(n), TimeoutError(f"not read within {self.read_timeout:g} s"))
        return b"".join(_zeros(take) if n < 0 else memoryview(got[n])[inside: inside + take]
                        for n, inside, take in pieces)

    async def _part(self, n: int, inside: int, length: int) -> memoryview:
        """Bytes of chunk ``n``. The whole chunk is asked of the chain (and kept in its memory
        tier): reading only the part from the SSD tier was measured slower for EROFS reads,
        which cover most of each chunk they touch (bench/RESULTS.md "EROFS mounts")."""
        return memoryview(await self._get(n))[inside: inside + length]

    async def _get(self, n: int) -> bytes:
        if self.recorder is not None:
            self.recorder.saw_chunks(0, (n,))
        ref = self.index.chunk(n)
        try:
            return await self.reader.get(ref, _Neighbours(self.index, n, self.neighbour_window))
        except Exception as e:
            raise self._failed(n, ref, e) from e

    def _failed(self, n: int, ref: ChunkRef, e: BaseException) -> VFSError:
        path = self.file_of(n)
        log.error("image %s: %s: %s (chunk %d of the blob): cannot be read: %s", self.name, path, ref, n, e)
        return VFSError(errno.EIO, f"{path}: {ref}: {e}")

    def file_of(self, n: int) -> str:
        """A path of the image whose file holds chunk ``n`` (for error messages: it walks
        the inode table, so it is only worth it when a read has failed)."""
        try:
            for ino in range(1, self.index.n_inodes + 1):
                if stat.S_ISREG(self.index.inode(ino).mode) and n in self.index.file_chunk_numbers(ino):
                    return self.index.path_of(ino)
        except Exception:  # a log line must not fail
            pass
        return f"chunk {n}"


def _zeros(n: int) -> bytes | memoryview:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


__all__ = ["BlobFS", "BLOB_NAME", "BLOB_INO", "ROOT_INO"]
