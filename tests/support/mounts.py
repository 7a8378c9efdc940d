"""Test images written straight into a store, and real mounts that always go away.

:class:`ImageBuilder` encodes a tree with :func:`indexer.format.encode` and writes
zstd packs itself, so filesystem tests control every byte, chunk boundary and pack
layout without going through an OCI source. :class:`StoreReader` is the plainest
:class:`~cache.tier.ChunkReader` (one ranged read per chunk, recorded), for testing
the VFS apart from the cache chain. :func:`mounted` mounts an image through the real
daemon and, whatever happens in the test, unmounts it (lazily if it must) and makes
sure the daemon is gone: a test run never leaves a dead mount behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import trio

from cache.blobstore import BlobStore
from cache.chunk import ChunkRef, compress, digest_of, open_chunk
from cache.packtoc import encode_toc, toc_key
from indexer import catalog
from indexer.format import ChunkLocation, encode, seal
from indexer.index import Index
from indexer.tree import Node, Tree, new_dir

if TYPE_CHECKING:
    from imagefs.mount import MountOptions

MTIME_NS = 1_700_000_000_123_456_789


class ImageBuilder:
    """Build a :class:`Tree` with real content, then write packs + index to a store."""

    def __init__(self, chunk_size: int = 64 * 1024, pack_size: int = 1 << 20) -> None:
        self.chunk_size = chunk_size
        self.pack_size = pack_size
        self.tree = Tree()
        self.tree.root.mtime_ns = MTIME_NS
        self._chunks: dict[bytes, bytes] = {}  # digest -> uncompressed bytes

    def _parent(self, path: str) -> tuple[Node, bytes]:
        parts = path.strip("/").encode().split(b"/")
        node = self.tree.root
        for part in parts[:-1]:
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = new_dir(0o755, mtime_ns=MTIME_NS)
            node = child
        return node, parts[-1]

    def _add(self, path: str, node: Node) -> Node:
        parent, name = self._parent(path)
        assert parent.children is not None
        parent.children[name] = node
        return node

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
            xattrs: dict[str, bytes] | None = None) -> Node:
        node = new_dir(mode, uid, gid, MTIME_NS)
        node.xattrs = dict(xattrs or {})
        return self._add(path, node)

    def file(
        self, path: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
        xattrs: dict[str, bytes] | None = None,
    ) -> Node:
        cs = self.chunk_size
        pieces = [data[i: i + cs] for i in range(0, len(data), cs)]
        return self.file_from_chunks(path, pieces, len(data), mode, uid, gid, xattrs)

    def file_from_chunks(
        self, path: str, pieces: Sequence[bytes], size: int, mode: int = 0o644, uid: int = 0, gid: int = 0,
        xattrs: dict[str, bytes] | None = None,
    ) -> Node:
        """A file given as its chunks (every one but the last ``chunk_size`` long):
        how a huge file made of a few distinct chunks stays cheap to build."""
        digests = []
        memo: dict[int, bytes] = {}
        for piece in pieces:
            d = memo.get(id(piece))
            if d is None:
                d = memo[id(piece)] = digest_of(piece)
                self._chunks.setdefault(d, piece)
            digests.append(d)
        node = Node(mode=stat.S_IFREG | mode, uid=uid, gid=gid, mtime_ns=MTIME_NS, size=size,
                    chunks=digests, xattrs=dict(xattrs or {}))
        return self._add(path, node)

    def symlink(self, path: str, target: str | bytes) -> Node:
        t = target.encode() if isinstance(target, str) else target
        return self._add(path, Node(mode=stat.S_IFLNK | 0o777, mtime_ns=MTIME_NS, size=len(t), link_target=t))

    def hardlink(self, path: str, existing: str) -> Node:
        node = self.tree.get(existing.strip("/").encode())
        assert node is not None, existing
        return self._add(path, node)

    def special(self, path: str, kind: int, rdev: int = 0, mode: int = 0o644) -> Node:
        """A device (``stat.S_IFCHR``/``S_IFBLK`` with ``os.makedev``), fifo or socket."""
        return self._add(path, Node(mode=kind | mode, mtime_ns=MTIME_NS, rdev=rdev))

    def write(self, store: BlobStore, name: str | None = None) -> Index:
        """Write packs (tree order), then the index, then the name; return the opened index."""
        order: list[bytes] = []
        seen: set[bytes] = set()
        for _path, node in self.tree.walk():
            for d in node.chunks:
                if d not in seen:
                    seen.add(d)
                    order.append(d)
        locations: dict[bytes, ChunkLocation] = {}
        pack = bytearray()
        pending: list[tuple[bytes, int, int, int]] = []

        def flush() -> None:
            if not pending:
                return
            pdigest = digest_of(bytes(pack))
            store.put("packs/" + pdigest.hex(), bytes(pack))
            store.put(toc_key(pdigest), encode_toc(pending))  # after the pack, as the indexer does
            for d, off, clen, ulen in pending:
                locations[d] = ChunkLocation(pdigest, off, clen, ulen)
            pack.clear()
            pending.clear()

        for d in order:
            raw = self._chunks[d]
            c = compress(raw)
            pending.append((d, len(pack), len(c), len(raw)))
            pack.extend(c)
            if len(pack) >= self.pack_size:
                flush()
        flush()
        body = encode(self.tree, locations, self.chunk_size, {"config": {"Env": ["PATH=/bin"]}, "source": "test"})
        digest, blob = seal(body)
        catalog.put_index(store, digest, blob)
        if name:
            catalog.set_ref(store, name, digest)
        return Index.from_blob(blob, digest)


@dataclass
class StoreReader:
    """A ChunkReader that reads each chunk straight from a store, recording every call."""

    store: BlobStore
    calls: list[tuple[ChunkRef, tuple[ChunkRef, ...]]] = field(default_factory=list)

    async def get(self, ref: ChunkRef, neighbours: Sequence[ChunkRef] = ()) -> bytes:
        self.calls.append((ref, tuple(neighbours)))
        raw = await trio.to_thread.run_sync(self.store.get_range, ref.pack, ref.offset, ref.clen)
        return open_chunk(ref, raw)


# -- real mounts ------------------------------------------------------------------------


def fstype_at(path: str) -> str | None:
    """The type of the topmost file system mounted at ``path`` (from /proc), or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == target:
                found = line.partition(" - ")[2].split()[0]
    return found


def is_mounted(path: str) -> bool:
    return fstype_at(path) is not None


def force_unmount(path: str) -> None:
    """Last-resort teardown: a lazy unmount that cannot leave a dead mount behind (for an
    EROFS mount, its blob's private FUSE mount too)."""
    from imagefs.mount import RunPaths

    kind = fstype_at(path)
    if kind is not None:
        argv = ["fusermount3", "-u", "-z"] if kind.startswith("fuse") else ["umount", "-l"]
        subprocess.run([*argv, path], capture_output=True, timeout=30)
    blob = RunPaths.of(path).beside(".blob")
    if is_mounted(blob):
        subprocess.run(["fusermount3", "-u", "-z", blob], capture_output=True, timeout=30)


def reap_daemon(pid: int, timeout: float = 10.0) -> None:
    """Wait for a daemon to exit (reaping it if it is our child); SIGKILL it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass
class Mount:
    path: str
    pid: int
    fs: str = "fuse"  # how it is served: "fuse" or "erofs" (MountOptions.fs after any fallback)


@contextlib.contextmanager
def mounted(image: str, mountpoint: str, opts: "MountOptions") -> Iterator[Mount]:
    """Mount ``image`` with the real daemon; always unmount and reap it afterwards."""
    from imagefs.mount import start_mount, unmount

    os.makedirs(mountpoint, exist_ok=True)
    pid = start_mount(image, mountpoint, opts)
    try:
        yield Mount(mountpoint, pid, "erofs" if fstype_at(mountpoint) == "erofs" else "fuse")
    finally:
        try:
            if is_mounted(mountpoint):
                unmount(mountpoint)
        finally:
            force_unmount(mountpoint)
            reap_daemon(pid)
