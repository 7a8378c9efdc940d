"""The index format: pure encode, with the layout constants the reader shares.

An index is one blob: a zstd frame around a little-endian body made of fixed-size
record tables that a reader indexes with ``struct.unpack_from`` in place, so opening
an index is one decompression and no per-entry Python objects (the ~34,000-entry torch
image opens in a few milliseconds).

Body layout (version 2; version 1 is the same without the INODE record's last field)::

    header      MAGIC, version, counts, and the byte offset of every section
    inodes      INODE records; inode number N is record N-1 (the root is inode 1)
    dirents     DIRENT records; a directory's entries are contiguous, sorted by name
    extents     u32 chunk numbers; a regular file's chunks are contiguous, in order
    chunks      CHUNK records: digest, pack number, offset and sizes in the pack
    packs       32-byte pack digests (blob key ``packs/<hex>``)
    xattrs      XATTR records; an inode's xattrs are contiguous, sorted by name
    strings     names, symlink targets, xattr names and values
    meta        JSON: image config, source, manifest digest, build figures

Per inode kind, the two ``a``/``b`` fields of an INODE record mean:
directory: first dirent, dirent count; regular file: first extent, extent count;
symlink: target offset, target length in strings; others: unused.

A regular file's chunks are all ``chunk_size`` bytes but the last, unless its INODE
record's ``chunk_shift`` (version 2) is non-zero: then they are ``1 << chunk_shift``.
The chunker cuts large files that are read at random (mapped ELF objects) into smaller
chunks than the rest (see :mod:`indexer.chunker`), so a page fault brings ~64 KiB
instead of ~1 MiB, and a reader still finds the chunk of any offset by division.
The index is addressed by the blake3 digest of the whole blob (``blake3:<hex>``).
"""

from __future__ import annotations

import json
import stat
import struct
from dataclasses import dataclass
from typing import Any

import zstandard

from cache.chunk import digest_of
from indexer.tree import Node, Tree

MAGIC = b"IMGFSIDX"
VERSION = 2
READABLE_VERSIONS = (1, 2)
DIGEST_PREFIX = "blake3:"

# magic, version, chunk_size, then counts and offsets.
HEADER = struct.Struct("<8sII" + "I" * 7 + "Q" * 9)
# mode uid gid nlink parent xattr_start xattr_count a b size mtime_ns rdev chunk_shift
INODE = struct.Struct("<IIIIIIIIIQqQI")
INODE_V1 = struct.Struct("<IIIIIIIIIQqQ")  # version 1: no chunk_shift (every file at chunk_size)
# name_off name_len inode
DIRENT = struct.Struct("<III")
EXTENT = struct.Struct("<I")
# digest pack offset clen ulen
CHUNK = struct.Struct("<32sIQII")
PACK = struct.Struct("<32s")
# name_off name_len value_off value_len
XATTR = struct.Struct("<IIII")


class IndexFormatError(ValueError):
    """Bytes that are not a valid imagefs index."""


@dataclass(frozen=True)
class ChunkLocation:
    """Where the build put one chunk: pack digest, offset and sizes."""

    pack: bytes
    offset: int
    clen: int
    ulen: int


@dataclass(frozen=True)
class Header:
    version: int
    chunk_size: int
    n_inodes: int
    n_dirents: int
    n_extents: int
    n_chunks: int
    n_packs: int
    n_xattrs: int
    strings_len: int
    inodes_off: int
    dirents_off: int
    extents_off: int
    chunks_off: int
    packs_off: int
    xattrs_off: int
    strings_off: int
    meta_off: int
    meta_len: int


def parse_header(body: bytes | memoryview) -> Header:
    if len(body) < HEADER.size:
        raise IndexFormatError("index too short for its header")
    fields = HEADER.unpack_from(body, 0)
    if fields[0] != MAGIC:
        raise IndexFormatError("not an imagefs index (bad magic)")
    if fields[1] not in READABLE_VERSIONS:
        raise IndexFormatError(f"index format version {fields[1]} is not supported (this imagefs reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))})")
    h = Header(*fields[1:])
    if h.meta_off + h.meta_len > len(body) or h.strings_off + h.strings_len > len(body):
        raise IndexFormatError("index sections run past its end")
    return h


class _Strings:
    """Deduplicating string table builder."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.seen: dict[bytes, int] = {}

    def add(self, s: bytes) -> tuple[int, int]:
        off = self.seen.get(s)
        if off is None:
            off = self.seen[s] = len(self.buf)
            self.buf += s
        return off, len(s)


def encode(
    tree: Tree,
    locations: dict[bytes, ChunkLocation],
    chunk_size: int,
    meta: dict[str, Any],
) -> bytes:
    """Encode ``tree`` into the uncompressed index body.

    ``locations`` must hold every chunk digest that a file in the tree lists.
    Inode numbers follow tree order, so an index is a pure function of its inputs.
    """
    order = tree.walk()
    ino_of: dict[int, int] = {}
    nodes: list[Node] = []
    parent_of: list[int] = []
    nlink: list[int] = []
    for path, node in order:
        key = id(node)
        if key in ino_of:
            nlink[ino_of[key] - 1] += 1
            continue
        nodes.append(node)
        ino_of[key] = len(nodes)
        nlink.append(1)
        parent_of.append(0)
    # Parents and directory link counts (2 + subdirectories, as the kernel expects).
    for node in nodes:
        if node.children is not None:
            me = ino_of[id(node)]
            for child in node.children.values():
                cino = ino_of[id(child)]
                if parent_of[cino - 1] == 0:
                    parent_of[cino - 1] = me
            nlink[me - 1] = 2 + sum(1 for c in node.children.values() if c.is_dir)
    parent_of[0] = 1

    strings = _Strings()
    chunk_no: dict[bytes, int] = {}
    pack_no: dict[bytes, int] = {}
    chunk_recs = bytearray()
    pack_recs = bytearray()
    extents = bytearray()
    dirents = bytearray()
    xattrs = bytearray()
    inodes = bytearray()
    n_dirents = n_extents = n_xattrs = 0

    for ino, node in enumerate(nodes, start=1):
        a = b = 0
        if node.children is not None:
            a = n_dirents
            for name in sorted(node.children):
                off, ln = strings.add(name)
                dirents += DIRENT.pack(off, ln, ino_of[id(node.children[name])])
                n_dirents += 1
            b = n_dirents - a
        elif stat.S_ISREG(node.mode):
            a = n_extents
            shift = _chunk_shift(node, locations, chunk_size)
            for d in node.chunks:
                n = chunk_no.get(d)
                if n is None:
                    loc = locations[d]
                    p = pack_no.get(loc.pack)
                    if p is None:
                        p = pack_no[loc.pack] = len(pack_no)
                        pack_recs += PACK.pack(loc.pack)
                    n = chunk_no[d] = len(chunk_no)
                    chunk_recs += CHUNK.pack(d, p, loc.offset, loc.clen, loc.ulen)
                extents += EXTENT.pack(n)
                n_extents += 1
            b = n_extents - a
        elif stat.S_ISLNK(node.mode):
            a, b = strings.add(node.link_target)
        xstart = n_xattrs
        for name in sorted(node.xattrs):
            noff, nlen = strings.add(name.encode())
            voff, vlen = strings.add(node.xattrs[name])
            xattrs += XATTR.pack(noff, nlen, voff, vlen)
            n_xattrs += 1
        inodes += INODE.pack(
            node.mode, node.uid, node.gid, nlink[ino - 1], parent_of[ino - 1],
            xstart, n_xattrs - xstart, a, b, node.size, node.mtime_ns, node.rdev,
            shift if stat.S_ISREG(node.mode) else 0,
        )

    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    sections = [inodes, dirents, extents, chunk_recs, pack_recs, xattrs, strings.buf, meta_bytes]
    offsets = []
    pos = HEADER.size
    for s in sections:
        pos = (pos + 7) & ~7  # 8-byte alignment keeps memoryview casts legal
        offsets.append(pos)
        pos += len(s)
    header = HEADER.pack(
        MAGIC, VERSION, chunk_size,
        len(nodes), n_dirents, n_extents, len(chunk_no), len(pack_no), n_xattrs, len(strings.buf),
        *offsets, len(meta_bytes),
    )
    body = bytearray(header)
    for off, s in zip(offsets, sections):
        body += b"\0" * (off - len(body))
        body += s
    return bytes(body)


def _chunk_shift(node: Node, locations: dict[bytes, ChunkLocation], chunk_size: int) -> int:
    """0 if ``node``'s chunks are ``chunk_size`` bytes (or it has one chunk), else log2 of
    the size its chunker chose, which must be a power of two of at least 4 KiB."""
    if len(node.chunks) < 2:
        return 0
    size = locations[node.chunks[0]].ulen
    if size == chunk_size:
        return 0
    if size < 4096 or size & (size - 1):
        raise ValueError(f"a file's chunks are {size} bytes: not a power of two of at least 4096")
    return size.bit_length() - 1


def seal(body: bytes) -> tuple[str, bytes]:
    """Compress an index body into its blob and name it: returns (digest, blob)."""
    blob = zstandard.ZstdCompressor(level=9, write_content_size=True).compress(body)
    return DIGEST_PREFIX + digest_of(blob).hex(), blob


def unseal(blob: bytes, expected_digest: str | None = None) -> bytes:
    """Verify (if a digest is given) and decompress an index blob into its body."""
    if expected_digest is not None:
        got = DIGEST_PREFIX + digest_of(blob).hex()
        if got != expected_digest:
            raise IndexFormatError(f"index blob hashes to {got}, expected {expected_digest}")
    try:
        return zstandard.ZstdDecompressor().decompress(blob)
    except zstandard.ZstdError as e:
        raise IndexFormatError(f"index blob is not valid zstd: {e}") from e

