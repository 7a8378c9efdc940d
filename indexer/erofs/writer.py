"""Write an image's EROFS metadata from its imagefs index: every inode, no file data.

The result is a complete EROFS filesystem image for the kernel to mount, except that
every regular file is *chunk-based* and its chunk indexes point into an extra device,
the virtual blob (:mod:`indexer.erofs.slots`), which the imagefs daemon serves. So the
kernel answers every lookup, stat, readdir, readlink and getxattr itself, and only the
first read of a file's bytes crosses into imagefs, as a read of the blob.

What goes where (all in the primary device, 4 KiB blocks, ``meta_blkaddr`` 0):

- bytes 0-1023: an imagefs header (magic, writer version, the index digest and the
  blake3 of everything after it), in the space EROFS leaves free; then the
  superblock and one device-table slot (the blob: its size in blocks).
- the inode area, in index inode order (tree order, the root first so that its nid
  fits the superblock's 16-bit field): per inode the 64-byte extended inode (mode,
  uid, gid, nlink, size, mtime in ns, rdev for devices), its xattrs inline, then
  - regular files: one 8-byte chunk index per chunk (device 1, the chunk's slot);
    an empty file is a plain inode with no blocks;
  - directories and symlinks: their data inline when it fits the inode's block (the
    last block of a large directory), else in the data area;
  records that must not cross a block boundary (an inode with inline data or with
  its xattrs) start a new block when they would.
- the data area: full directory blocks (dirents sorted by name, ``.`` and ``..``
  included, then the names) and symlink targets too long to inline.

Chunk sizes are per file in EROFS (``chunkbits`` in each inode) as in the index (large
ELF objects have smaller chunks: :func:`chunk_bits_of`), and slots do not depend on it.

Anything the format cannot say (an xattr whose prefix EROFS has no index for, a name
or value too long, a device number over 32 bits, a chunk size that is not a power of
two of at least a block) raises :class:`Unrepresentable`; the caller mounts the image
the plain way instead.
"""

from __future__ import annotations

import stat
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from indexer.erofs import ondisk as d
from indexer.erofs.slots import SlotMap

from indexer.index import Inode

if TYPE_CHECKING:
    from indexer.index import Index

WRITER_VERSION = 1
assert sys.byteorder == "little"  # chunk index tables are written as native u64 arrays
HEADER_MAGIC = b"IMGFSERO"
# magic, writer version, index digest (raw blake3), blake3 of bytes [1024, end)
HEADER = struct.Struct("<8sI32s32s")
BODY_START = d.SUPER_OFFSET
DEVT_SLOTOFF = (d.SUPER_OFFSET + d.SUPERBLOCK.size) // d.DEVICE_SLOT.size  # the slot right after the superblock
INODES_START = DEVT_SLOTOFF * d.DEVICE_SLOT.size + d.DEVICE_SLOT.size  # one extra device
BLOB_TAG = b"imagefs virtual blob"

_U64 = (1 << 64) - 1
CHUNK_ON_BLOB = 1 << 16  # device_id 1 (the blob) in an 8-byte chunk index read as a u64
assert d.CHUNK_INDEX.pack(0, 1, 7) == ((7 << 32) | CHUNK_ON_BLOB).to_bytes(8, "little")


class Unrepresentable(ValueError):
    """The index holds something EROFS metadata cannot express."""


def chunk_bits_of(index: "Index", ino: int) -> int:
    """log2 of the chunk size of file ``ino`` (the index records one per file)."""
    size = index.file_chunk_size(ino)
    if size < d.BLOCK_SIZE or size & (size - 1):
        raise Unrepresentable(f"chunk size {size} is not a power of two of at least {d.BLOCK_SIZE}")
    return size.bit_length() - 1


@dataclass(slots=True)
class _Rec:
    """What one inode takes in the inode area and the data area."""

    layout: int
    xbody: bytes  # inline xattr body (header + entries), or b""
    head: int  # inode + xattr body, in bytes
    size: int  # the whole record: head, then chunk indexes or inline tail
    inline: bytes = b""  # inline tail data (FLAT_INLINE)
    blocks: bytes = b""  # data-area bytes, whole blocks (FLAT_PLAIN or FLAT_INLINE's leading blocks)
    dirblocks: list[list[tuple[bytes, int]]] | None = None  # a directory's entries, block by block
    startblk: int = d.NULL_ADDR
    chunkbits: int = 0
    nid: int = 0


def _xattr_body(index: "Index", ino: int) -> bytes:
    pairs = index.xattrs(ino) if index.xattr_count(ino) else []
    if not pairs:
        return b""
    out = bytearray(d.XATTR_IBODY_HEADER.pack(0, 0, b""))
    for name, value in pairs:
        found = d.xattr_index(name)
        if found is None:
            raise Unrepresentable(f"{index.path_of(ino)}: xattr {name!r} has a prefix EROFS does not index")
        nindex, suffix = found
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise Unrepresentable(f"{index.path_of(ino)}: xattr {name!r} is too long for EROFS")
        out += d.XATTR_ENTRY.pack(len(suffix), nindex, len(value)) + suffix + value
        out += b"\0" * (-len(out) % 4)
    if (len(out) - d.XATTR_IBODY_HEADER.size) // 4 + 1 > 0xFFFF:
        raise Unrepresentable(f"{index.path_of(ino)}: xattrs too large for EROFS")
    return bytes(out)


def _dir_blocks(entries: list[tuple[bytes, int]]) -> list[list[tuple[bytes, int]]]:
    """Split name-sorted entries into directory blocks: each block's dirents and names fit 4 KiB."""
    blocks: list[list[tuple[bytes, int]]] = []
    cur: list[tuple[bytes, int]] = []
    used = 0
    for name, child in entries:
        need = d.DIRENT.size + len(name)
        if cur and used + need > d.BLOCK_SIZE:
            blocks.append(cur)
            cur, used = [], 0
        cur.append((name, child))
        used += need
    blocks.append(cur)
    return blocks


def _block_bytes(block: list[tuple[bytes, int]], nid_of: list[int], mode_of: list[int], pad: bool) -> bytes:
    head = bytearray()
    names = bytearray()
    nameoff = d.DIRENT.size * len(block)
    for name, child in block:
        head += d.DIRENT.pack(nid_of[child], nameoff + len(names), d.file_type(mode_of[child]), 0)
        names += name
    out = bytes(head + names)
    return out + b"\0" * (d.BLOCK_SIZE - len(out)) if pad else out


def _dir_size(blocks: list[list[tuple[bytes, int]]]) -> tuple[int, int]:
    """(i_size, size of the last block's used part)."""
    last = sum(d.DIRENT.size + len(n) for n, _c in blocks[-1])
    return (len(blocks) - 1) * d.BLOCK_SIZE + last, last


def build(index: "Index", slots: SlotMap) -> bytearray:
    """The EROFS metadata image of ``index`` (see the module docstring), chunks at ``slots``."""
    n = index.n_inodes
    blocks_of = [start >> d.BLOCK_BITS for start in slots.starts]  # chunk number -> blob block
    chunks_of: dict[int, memoryview] = {}  # regular file -> its chunk numbers
    inodes: list[Inode | None] = [None, *index.inodes()]
    modes = [0] + [i.mode for i in inodes[1:] if i is not None]
    recs: list[_Rec | None] = [None] * (n + 1)
    # Pass 1: each record's shape and size (nids are not known yet).
    for ino in range(1, n + 1):
        node = inodes[ino]
        assert node is not None
        xbody = _xattr_body(index, ino)
        head = d.INODE.size + len(xbody)
        fmt = stat.S_IFMT(node.mode)
        if fmt == stat.S_IFREG:
            chunks_of[ino] = index.file_chunk_numbers(ino)
            count = len(chunks_of[ino])
            if node.size == 0:
                rec = _Rec(d.FLAT_PLAIN, xbody, head, head)
            else:
                bits = chunk_bits_of(index, ino)
                if count != (node.size + (1 << bits) - 1) >> bits:
                    raise Unrepresentable(f"{index.path_of(ino)}: {count} chunks for {node.size} bytes")
                rec = _Rec(d.CHUNK_BASED, xbody, head, d.align(head, d.CHUNK_INDEX.size) + d.CHUNK_INDEX.size * count,
                           chunkbits=bits)
        elif fmt == stat.S_IFDIR:
            entries = [(b".", ino), (b"..", node.parent)]
            for _pos, name, child in index.readdir(ino):
                if len(name) > d.NAME_LEN:
                    raise Unrepresentable(f"{index.path_of(ino)}: a name of {len(name)} bytes")
                entries.append((name, child))
            entries.sort()
            blocks = _dir_blocks(entries)
            _size, last = _dir_size(blocks)
            if last < d.BLOCK_SIZE and head + last <= d.BLOCK_SIZE:
                rec = _Rec(d.FLAT_INLINE, xbody, head, head + last, dirblocks=blocks)
            else:
                rec = _Rec(d.FLAT_PLAIN, xbody, head, head, dirblocks=blocks)
        elif fmt == stat.S_IFLNK:
            target = index.readlink(ino)
            if len(target) < d.BLOCK_SIZE and head + len(target) <= d.BLOCK_SIZE:
                rec = _Rec(d.FLAT_INLINE, xbody, head, head + len(target), inline=target)
            else:
                rec = _Rec(d.FLAT_PLAIN, xbody, head, head,
                           blocks=target + b"\0" * (-len(target) % d.BLOCK_SIZE))
        else:
            if fmt in (stat.S_IFCHR, stat.S_IFBLK) and d.encode_dev(node.rdev) is None:
                raise Unrepresentable(f"{index.path_of(ino)}: device number {node.rdev:#x} does not fit EROFS")
            rec = _Rec(d.FLAT_PLAIN, xbody, head, head)
        recs[ino] = rec

    # Pass 2: place records (nids), then data blocks.
    pos = INODES_START
    nid_of = [0] * (n + 1)
    for ino in range(1, n + 1):
        rec = recs[ino]
        assert rec is not None
        pos = d.align(pos, 1 << d.ISLOT_BITS)
        keep_whole = rec.size if rec.size <= d.BLOCK_SIZE else rec.head
        if pos % d.BLOCK_SIZE + keep_whole > d.BLOCK_SIZE:
            pos = d.align(pos, d.BLOCK_SIZE)
        rec.nid = nid_of[ino] = pos >> d.ISLOT_BITS
        pos += rec.size
    if nid_of[1] > 0xFFFF:
        raise Unrepresentable("root inode placed past the superblock's 16-bit nid")  # cannot happen: it is first
    data_blk = d.align(pos, d.BLOCK_SIZE) >> d.BLOCK_BITS
    for ino in range(1, n + 1):
        rec = recs[ino]
        assert rec is not None
        if rec.dirblocks is not None:
            whole = rec.dirblocks if rec.layout == d.FLAT_PLAIN else rec.dirblocks[:-1]
            rec.blocks = b"".join(_block_bytes(b, nid_of, modes, True) for b in whole)
            if rec.layout == d.FLAT_INLINE:
                rec.inline = _block_bytes(rec.dirblocks[-1], nid_of, modes, False)
        if rec.blocks:
            rec.startblk = data_blk
            data_blk += len(rec.blocks) >> d.BLOCK_BITS
    total_blocks = max(data_blk, 1)

    # Pass 3: write.
    out = bytearray(total_blocks << d.BLOCK_BITS)
    pack_inode = d.INODE.pack_into
    for ino in range(1, n + 1):
        rec = recs[ino]
        node = inodes[ino]
        assert rec is not None and node is not None
        at = rec.nid << d.ISLOT_BITS
        fmt = stat.S_IFMT(node.mode)
        if rec.layout == d.CHUNK_BASED:
            i_u = (rec.chunkbits - d.BLOCK_BITS) | d.CHUNK_FORMAT_INDEXES
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = d.encode_dev(node.rdev) or 0
        elif fmt in (stat.S_IFIFO, stat.S_IFSOCK):
            i_u = 0
        else:
            i_u = rec.startblk
        size = _dir_size(rec.dirblocks)[0] if rec.dirblocks is not None else node.size
        xcount = (len(rec.xbody) - d.XATTR_IBODY_HEADER.size) // 4 + 1 if rec.xbody else 0
        secs, nsec = divmod(node.mtime_ns, 1_000_000_000)
        pack_inode(out, at, (rec.layout << 1) | d.INODE_EXTENDED, xcount, node.mode, 0, size, i_u,
                   ino & 0xFFFFFFFF, node.uid, node.gid, secs & _U64, nsec, node.nlink, b"")
        p = at + d.INODE.size
        if rec.xbody:
            out[p: p + len(rec.xbody)] = rec.xbody
            p += len(rec.xbody)
        if rec.layout == d.CHUNK_BASED:
            p = at + d.align(rec.head, d.CHUNK_INDEX.size)
            # Each 8-byte chunk index as one little-endian u64: startblk_hi 0, device 1, block.
            table = array("Q", [(blocks_of[c] << 32) | CHUNK_ON_BLOB for c in chunks_of[ino]]).tobytes()
            out[p: p + len(table)] = table
        elif rec.inline:
            out[p: p + len(rec.inline)] = rec.inline
        if rec.blocks:
            b = rec.startblk << d.BLOCK_BITS
            out[b: b + len(rec.blocks)] = rec.blocks

    root = inodes[1]
    assert root is not None
    digest = bytes.fromhex(index.digest.partition(":")[2]) if index.digest else b""
    sb = d.SUPERBLOCK.pack(
        d.MAGIC, 0, 0, d.BLOCK_BITS, 0, nid_of[1], n,
        max(root.mtime_ns // 1_000_000_000, 0), 0, total_blocks, 0, 0,
        digest[:16].ljust(16, b"\0"), b"imagefs".ljust(16, b"\0"),
        d.FEATURE_INCOMPAT_CHUNKED_FILE | d.FEATURE_INCOMPAT_DEVICE_TABLE,
        0, 1, DEVT_SLOTOFF, 0, 0, 0, 0, 0, b"",
    )
    out[d.SUPER_OFFSET: d.SUPER_OFFSET + len(sb)] = sb
    d.DEVICE_SLOT.pack_into(out, DEVT_SLOTOFF * d.DEVICE_SLOT.size, BLOB_TAG, slots.size >> d.BLOCK_BITS, 0, b"")
    body_hash = blake3.blake3(memoryview(out)[BODY_START:]).digest()
    HEADER.pack_into(out, 0, HEADER_MAGIC, WRITER_VERSION, digest.ljust(32, b"\0")[:32], body_hash)
    return out


def check(image: bytes | bytearray | memoryview, index_digest: str) -> None:
    """Raise ValueError unless ``image`` is whole and was written by this writer version
    for the index ``index_digest`` (how a kept copy is checked before it is mounted)."""
    if len(image) < d.BLOCK_SIZE or len(image) % d.BLOCK_SIZE:
        raise ValueError(f"{len(image)} bytes is not a whole number of blocks")
    magic, version, digest, body_hash = HEADER.unpack_from(image, 0)
    if magic != HEADER_MAGIC or version != WRITER_VERSION:
        raise ValueError(f"not EROFS metadata of writer version {WRITER_VERSION}")
    want = bytes.fromhex(index_digest.partition(":")[2]).ljust(32, b"\0")[:32]
    if digest != want:
        raise ValueError(f"written for another index ({digest.hex()[:16]}...)")
    if blake3.blake3(memoryview(image)[BODY_START:]).digest() != body_hash:
        raise ValueError("body does not hash to the blake3 in its header")


__all__ = ["build", "check", "Unrepresentable", "WRITER_VERSION", "chunk_bits_of"]
