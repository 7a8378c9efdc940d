"""Read an index in place: lookups by inode number, name and file offset.

Nothing is decoded up front beyond the header; every accessor unpacks the few
records it needs from the body buffer. This is the only way the read side
(``imagefs``) sees an image, which keeps the format's details in ``indexer``.
"""

from __future__ import annotations

import json
import stat
from typing import Any, Iterator, NamedTuple

from cache.chunk import ChunkRef
from indexer.format import (
    CHUNK, DIRENT, EXTENT, INODE, INODE_V1, PACK, XATTR, IndexFormatError, parse_header, unseal,
)

ROOT_INO = 1


class Inode(NamedTuple):
    """The attributes of one inode, as stored."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    parent: int
    size: int
    mtime_ns: int
    rdev: int


def pack_key(pack_digest: bytes) -> str:
    """The blob-store key of a pack object."""
    return "packs/" + pack_digest.hex()


class Index:
    """An opened index. Safe to share between threads (read-only)."""

    def __init__(self, body: bytes, digest: str = "") -> None:
        self.digest = digest
        self._body = body
        self._mv = memoryview(body)
        h = self._h = parse_header(body)
        self.chunk_size = h.chunk_size
        self._inode = INODE if h.version >= 2 else INODE_V1
        self.n_inodes = h.n_inodes
        self._strings = h.strings_off
        # Read through a memoryview cast, not EXTENT.unpack_from: one u32 per chunk, indexed directly.
        self._extents = self._mv[h.extents_off: h.extents_off + EXTENT.size * h.n_extents].cast("I")
        self._pack_keys: list[str | None] = [None] * h.n_packs
        self._meta: dict[str, Any] | None = None

    @classmethod
    def from_blob(cls, blob: bytes, digest: str | None = None) -> "Index":
        """Open a stored index blob, verifying it against ``digest`` when given."""
        return cls(unseal(blob, digest), digest or "")

    # -- metadata -----------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """Image config, source and build figures (decoded on first use)."""
        if self._meta is None:
            h = self._h
            self._meta = json.loads(bytes(self._mv[h.meta_off: h.meta_off + h.meta_len]))
        return self._meta

    @property
    def config(self) -> dict[str, Any]:
        """The OCI image config's ``config`` object (Env, Entrypoint, Cmd, ...)."""
        return self.meta.get("config") or {}

    # -- inodes -------------------------------------------------------------------

    def _check(self, ino: int) -> None:
        if not 1 <= ino <= self.n_inodes:
            raise KeyError(ino)

    def _raw(self, ino: int) -> tuple[int, ...]:
        self._check(ino)
        rec = self._inode
        return rec.unpack_from(self._body, self._h.inodes_off + (ino - 1) * rec.size)

    def inode(self, ino: int) -> Inode:
        raw = self._raw(ino)
        return Inode(ino, raw[0], raw[1], raw[2], raw[3], raw[4], raw[9], raw[10], raw[11])

    def _chunk_size_of(self, raw: tuple[int, ...]) -> int:
        return 1 << raw[12] if len(raw) > 12 and raw[12] else self.chunk_size

    def file_chunk_size(self, ino: int) -> int:
        """The size of a regular file's chunks (all but the last): the index's
        ``chunk_size`` unless the chunker chose a smaller one for this file."""
        return self._chunk_size_of(self._raw(ino))

    def inodes(self) -> list[Inode]:
        """Every inode, in inode order (inode N is item N-1), decoded in one pass: for a
        caller that visits them all (writing EROFS metadata), not for lookups."""
        h = self._h
        rec = self._inode
        table = self._mv[h.inodes_off: h.inodes_off + rec.size * h.n_inodes]
        return [Inode(ino, r[0], r[1], r[2], r[3], r[4], r[9], r[10], r[11])
                for ino, r in enumerate(rec.iter_unpack(table), start=1)]

    def xattr_count(self, ino: int) -> int:
        return self._raw(ino)[6]

    def _string(self, off: int, ln: int) -> bytes:
        start = self._strings + off
        return self._body[start: start + ln]

    # -- directories --------------------------------------------------------------

    def _dir_range(self, ino: int) -> tuple[int, int]:
        raw = self._raw(ino)
        if not stat.S_ISDIR(raw[0]):
            raise NotADirectoryError(ino)
        return raw[7], raw[8]

    def _dirent(self, i: int) -> tuple[int, int, int]:
        return DIRENT.unpack_from(self._body, self._h.dirents_off + i * DIRENT.size)

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode of ``name`` in directory ``parent``; None if absent."""
        first, count = self._dir_range(parent)
        lo, hi = first, first + count
        body, base, soff = self._body, self._h.dirents_off, self._strings
        while lo < hi:  # binary search over names sorted as bytes
            mid = (lo + hi) // 2
            noff, nlen, child = DIRENT.unpack_from(body, base + mid * DIRENT.size)
            cand = body[soff + noff: soff + noff + nlen]
            if cand == name:
                return child
            if cand < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(position, name, inode) of each entry from position ``start`` on."""
        first, count = self._dir_range(ino)
        for i in range(start, count):
            noff, nlen, child = self._dirent(first + i)
            yield i, self._string(noff, nlen), child

    def resolve(self, path: str | bytes) -> int | None:
        """The inode at an absolute or relative path, not following symlinks."""
        if isinstance(path, str):
            path = path.encode()
        ino = ROOT_INO
        for part in path.strip(b"/").split(b"/"):
            if not part or part == b".":
                continue
            if not stat.S_ISDIR(self._raw(ino)[0]):
                return None
            found = self.lookup(ino, part)
            if found is None:
                return None
            ino = found
        return ino

    def path_of(self, ino: int) -> str:
        """One path of ``ino`` (the first name it was given), for messages and logs."""
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT_INO and seen < 4096:
            parent = self._raw(ino)[4]
            for _i, name, child in self.readdir(parent):
                if child == ino:
                    parts.append(name)
                    break
            ino, seen = parent, seen + 1
        return "/" + b"/".join(reversed(parts)).decode(errors="replace")

    # -- symlinks and xattrs ------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        raw = self._raw(ino)
        if not stat.S_ISLNK(raw[0]):
            raise ValueError(f"inode {ino} is not a symlink")
        return self._string(raw[7], raw[8])

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        raw = self._raw(ino)
        start, count = raw[5], raw[6]
        out = []
        for i in range(start, start + count):
            noff, nlen, voff, vlen = XATTR.unpack_from(self._body, self._h.xattrs_off + i * XATTR.size)
            out.append((self._string(noff, nlen), self._string(voff, vlen)))
        return out

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        for n, v in self.xattrs(ino):
            if n == name:
                return v
        return None

    # -- file data ----------------------------------------------------------------

    def pack_key(self, pack_no: int) -> str:
        key = self._pack_keys[pack_no]
        if key is None:
            (digest,) = PACK.unpack_from(self._body, self._h.packs_off + pack_no * PACK.size)
            key = self._pack_keys[pack_no] = pack_key(digest)
        return key

    def pack_keys(self) -> list[str]:
        """The blob keys of every pack the index names (what garbage collection keeps)."""
        return [self.pack_key(i) for i in range(self._h.n_packs)]

    def chunk(self, chunk_no: int) -> ChunkRef:
        digest, pack, offset, clen, ulen = CHUNK.unpack_from(self._body, self._h.chunks_off + chunk_no * CHUNK.size)
        return ChunkRef(digest, self.pack_key(pack), offset, clen, ulen)

    def _file(self, ino: int) -> tuple[int, int, int]:
        """(first extent, extent count, chunk size) of a regular file."""
        raw = self._raw(ino)
        if not stat.S_ISREG(raw[0]):
            raise IsADirectoryError(ino) if stat.S_ISDIR(raw[0]) else ValueError(f"inode {ino} is not a regular file")
        return raw[7], raw[8], self._chunk_size_of(raw)

    def file_chunks(self, ino: int) -> tuple[int, int]:
        """(first extent, extent count) of a regular file."""
        first, count, _cs = self._file(ino)
        return first, count

    def file_chunk_numbers(self, ino: int) -> memoryview:
        """The chunk-table number of each chunk of a regular file, in file order."""
        first, count = self.file_chunks(ino)
        return self._extents[first: first + count]

    def chunk_ulens(self) -> list[int]:
        """The uncompressed size of every chunk, by chunk number (one pass over the table)."""
        h = self._h
        table = self._mv[h.chunks_off: h.chunks_off + CHUNK.size * h.n_chunks]
        return [rec[4] for rec in CHUNK.iter_unpack(table)]

    def chunks_for_range(self, ino: int, offset: int, length: int) -> list[tuple[int, ChunkRef]]:
        """The chunks covering ``[offset, offset+length)`` of a file, each with the
        file offset where it starts. Found by arithmetic: chunk i covers
        ``[i*cs, (i+1)*cs)`` where ``cs`` is the file's chunk size."""
        first, count, cs = self._file(ino)
        if length <= 0 or count == 0:
            return []
        lo = offset // cs
        hi = min(count, (offset + length + cs - 1) // cs)
        return [(i * cs, self.chunk(self._extents[first + i])) for i in range(lo, hi)]

    def chunk_numbers(self, ino: int, offset: int, length: int) -> list[int]:
        """The chunk-table numbers of the chunks covering ``[offset, offset+length)`` of a
        file, in file order (what a profile records)."""
        first, count, cs = self._file(ino)
        if length <= 0 or count == 0:
            return []
        lo = offset // cs
        hi = min(count, (offset + length + cs - 1) // cs)
        ext = self._extents
        return [ext[first + i] for i in range(lo, hi)]

    def chunk_no(self, ino: int, offset: int) -> int:
        """The chunk-table number of the chunk holding byte ``offset`` of a file."""
        first, count, cs = self._file(ino)
        i = offset // cs
        if not 0 <= i < count:
            raise ValueError(f"offset {offset} is past the chunks of inode {ino}")
        return self._extents[first + i]

    def pack_successors(self, chunk_no: int, max_bytes: int) -> list[ChunkRef]:
        """The chunks stored right after chunk ``chunk_no`` in its pack, back to back,
        up to ``max_bytes`` of (uncompressed) data: what one ranged read can bring along.

        The chunk table is numbered in tree order, the order packs are laid out in, so
        these are the rest of the file and then the files that follow it in the tree.
        """
        out: list[ChunkRef] = []
        prev = self.chunk(chunk_no)
        budget = max_bytes
        for n in range(chunk_no + 1, self._h.n_chunks):
            ref = self.chunk(n)
            if ref.pack != prev.pack or ref.offset != prev.offset + prev.clen or ref.ulen > budget:
                break
            out.append(ref)
            budget -= ref.ulen
            prev = ref
        return out

    def all_chunks(self) -> Iterator[ChunkRef]:
        """Every distinct chunk the image references (for prefetch, stats, tests)."""
        for n in range(self._h.n_chunks):
            yield self.chunk(n)

    @property
    def n_chunks(self) -> int:
        return self._h.n_chunks


__all__ = ["Index", "Inode", "ROOT_INO", "IndexFormatError", "pack_key"]
