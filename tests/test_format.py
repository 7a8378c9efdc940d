"""The index format: what is encoded is what the reader returns, and bad blobs are refused."""

from __future__ import annotations

import os
import stat

import pytest

from cache.chunk import digest_of
from indexer.format import VERSION, ChunkLocation, IndexFormatError, encode, seal, unseal
from indexer.index import ROOT_INO, Index
from indexer.tree import Node, Tree, new_dir

CS = 1 << 20


def sample_tree() -> tuple[Tree, dict[bytes, ChunkLocation]]:
    t = Tree()
    etc = new_dir(0o755, uid=0, gid=0, mtime_ns=1_700_000_000_123_456_789)
    t.root.children[b"etc"] = etc
    chunks = [digest_of(bytes([i]) * 10) for i in range(3)]
    f = Node(stat.S_IFREG | 0o4755, uid=1000, gid=100, mtime_ns=5, size=2 * CS + 10, chunks=chunks,
             xattrs={"security.capability": b"\x01\x00\x00\x02\xff", "user.z": b"", "user.a": b"1"})
    etc.children[b"prog"] = f
    etc.children[b"hard"] = f  # hardlink: same node
    t.root.children[b"empty"] = Node(stat.S_IFREG | 0o644)
    t.root.children[b"link"] = Node(stat.S_IFLNK | 0o777, link_target=b"../etc/prog")
    t.root.children[b"null"] = Node(stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    t.root.children[b"fifo"] = Node(stat.S_IFIFO | 0o600)
    sub = new_dir(0o1777)
    t.root.children[b"tmp"] = sub
    for i in range(300):
        sub.children[f"n{i:04d}".encode()] = Node(stat.S_IFREG | 0o600)
    locs = {d: ChunkLocation(b"P" * 32, i * 100, 100, CS if i < 2 else 10) for i, d in enumerate(chunks)}
    return t, locs


def open_sample() -> Index:
    t, locs = sample_tree()
    digest, blob = seal(encode(t, locs, CS, {"config": {"Cmd": ["sh"]}}))
    return Index.from_blob(blob, digest)


def test_attributes_round_trip() -> None:
    ix = open_sample()
    prog = ix.resolve("/etc/prog")
    assert prog is not None
    node = ix.inode(prog)
    assert stat.S_IMODE(node.mode) == 0o4755 and stat.S_ISREG(node.mode)
    assert (node.uid, node.gid, node.size, node.mtime_ns) == (1000, 100, 2 * CS + 10, 5)
    assert ix.inode(ix.resolve("etc")).mtime_ns == 1_700_000_000_123_456_789
    assert ix.inode(ix.resolve("null")).rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(ix.inode(ix.resolve("fifo")).mode)
    assert stat.S_IMODE(ix.inode(ix.resolve("tmp")).mode) == 0o1777
    assert ix.readlink(ix.resolve("link")) == b"../etc/prog"
    assert ix.config == {"Cmd": ["sh"]}


def test_hardlinks_share_an_inode_with_nlink() -> None:
    ix = open_sample()
    assert ix.resolve("etc/prog") == ix.resolve("etc/hard")
    assert ix.inode(ix.resolve("etc/prog")).nlink == 2
    # A directory's link count is 2 plus its subdirectories.
    assert ix.inode(ROOT_INO).nlink == 2 + 2


def test_xattrs_are_exact_bytes_sorted_by_name() -> None:
    ix = open_sample()
    assert ix.xattrs(ix.resolve("etc/prog")) == [
        (b"security.capability", b"\x01\x00\x00\x02\xff"), (b"user.a", b"1"), (b"user.z", b""),
    ]
    assert ix.getxattr(ix.resolve("etc/prog"), b"user.missing") is None


def test_lookup_and_readdir_on_a_large_directory() -> None:
    ix = open_sample()
    tmp = ix.resolve("tmp")
    names = [name for _i, name, _ino in ix.readdir(tmp)]
    assert names == sorted(f"n{i:04d}".encode() for i in range(300))
    assert ix.lookup(tmp, b"n0150") is not None
    assert ix.lookup(tmp, b"n9999") is None
    # Resuming readdir from a position continues where it stopped.
    assert [n for _i, n, _ in ix.readdir(tmp, 298)] == [b"n0298", b"n0299"]


def test_chunks_found_by_offset() -> None:
    ix = open_sample()
    prog = ix.resolve("etc/prog")
    assert [off for off, _ in ix.chunks_for_range(prog, 0, 1)] == [0]
    assert [off for off, _ in ix.chunks_for_range(prog, CS - 1, 2)] == [0, CS]
    assert [off for off, _ in ix.chunks_for_range(prog, 2 * CS + 5, 100)] == [2 * CS]
    assert ix.chunks_for_range(prog, 2 * CS + 5, 100)[0][1].ulen == 10
    assert ix.chunks_for_range(ix.resolve("empty"), 0, 100) == []


def test_path_of_names_an_inode() -> None:
    ix = open_sample()
    assert ix.path_of(ix.resolve("tmp/n0007")) == "/tmp/n0007"


def test_index_that_fails_its_digest_is_refused() -> None:
    t, locs = sample_tree()
    digest, blob = seal(encode(t, locs, CS, {}))
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(IndexFormatError, match="hashes to"):
        Index.from_blob(tampered, digest)


def test_other_format_version_is_refused() -> None:
    t, locs = sample_tree()
    body = bytearray(encode(t, locs, CS, {}))
    body[8:12] = (VERSION + 1).to_bytes(4, "little")
    _, blob = seal(bytes(body))
    with pytest.raises(IndexFormatError, match="version"):
        Index.from_blob(blob)


def test_garbage_is_refused() -> None:
    with pytest.raises(IndexFormatError):
        unseal(b"not zstd at all")
    _, blob = seal(b"NOTANINDEX" + b"\0" * 200)
    with pytest.raises(IndexFormatError, match="magic"):
        Index.from_blob(blob)


def test_encoding_is_deterministic() -> None:
    t, locs = sample_tree()
    assert seal(encode(t, locs, CS, {"a": 1}))[0] == seal(encode(t, locs, CS, {"a": 1}))[0]
