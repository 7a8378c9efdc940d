"""The VFS semantics without FUSE: every answer a mount gives, called directly."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
from typing import Any, Awaitable, Callable

import pytest
import trio

from cache.localstore import LocalStore
from imagefs.vfs import BLOCK_SIZE, VFS, VFSError
from indexer.index import ROOT_INO
from tests.support.mounts import MTIME_NS, ImageBuilder, StoreReader

CS = 64 * 1024


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


BIG = _data(5 * CS + 123, 1)  # six chunks, the last one short


@pytest.fixture
def store(tmp_path: Any) -> LocalStore:
    return LocalStore(str(tmp_path / "store"))


@pytest.fixture
def vfs(store: LocalStore) -> VFS:
    b = ImageBuilder(chunk_size=CS)
    b.dir("etc", mode=0o750, uid=3, gid=4, xattrs={"user.dir": b"d"})
    b.file("etc/passwd", b"root:x:0:0\n", mode=0o644, uid=0, gid=0,
           xattrs={"user.a": b"1", "security.capability": b"\x01\x02"})
    b.file("etc/shadow", b"secret", mode=0o600)
    b.file("empty", b"")
    b.file("big", BIG, mode=0o755)
    b.hardlink("big-link", "big")
    b.symlink("lib", "usr/lib")
    b.special("dev/null", stat.S_IFCHR, os.makedev(1, 3), 0o666)
    b.special("dev/sda", stat.S_IFBLK, os.makedev(8, 0), 0o660)
    b.special("dev/fifo", stat.S_IFIFO, 0, 0o600)
    b.special("dev/sock", stat.S_IFSOCK, 0, 0o755)
    for i in range(50):
        b.file(f"many/f{i:03d}", f"{i}".encode())
    index = b.write(store, "test")
    return VFS(index, StoreReader(store), name="test", neighbour_window=3 * CS)


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.run(fn, *args)


def ino(vfs: VFS, path: str) -> int:
    found = vfs.index.resolve(path)
    assert found is not None, path
    return found


def test_attributes_of_every_entry_type(vfs: VFS) -> None:
    root = vfs.getattr(ROOT_INO)
    assert stat.S_ISDIR(root.mode) and root.time_ns == MTIME_NS
    etc = vfs.lookup(ROOT_INO, b"etc")
    assert etc is not None and etc.mode == stat.S_IFDIR | 0o750 and (etc.uid, etc.gid) == (3, 4)
    assert etc.nlink == 2
    assert root.nlink == 2 + 3  # etc, dev, many
    big = vfs.getattr(ino(vfs, "big"))
    assert big.mode == stat.S_IFREG | 0o755 and big.size == len(BIG)
    assert big.blocks == (len(BIG) + 511) // 512 and big.blksize == BLOCK_SIZE
    link = vfs.getattr(ino(vfs, "lib"))
    assert stat.S_ISLNK(link.mode) and link.size == len(b"usr/lib")
    null = vfs.getattr(ino(vfs, "dev/null"))
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    sda = vfs.getattr(ino(vfs, "dev/sda"))
    assert stat.S_ISBLK(sda.mode) and os.major(sda.rdev) == 8
    assert stat.S_ISFIFO(vfs.getattr(ino(vfs, "dev/fifo")).mode)
    assert stat.S_ISSOCK(vfs.getattr(ino(vfs, "dev/sock")).mode)
    assert vfs.getattr(ino(vfs, "empty")).blocks == 0


def test_hardlinks_share_an_inode(vfs: VFS) -> None:
    a = vfs.lookup(ROOT_INO, b"big")
    b = vfs.lookup(ROOT_INO, b"big-link")
    assert a is not None and b is not None
    assert a.ino == b.ino and a.nlink == 2


def test_lookup_errors_and_dots(vfs: VFS) -> None:
    assert vfs.lookup(ROOT_INO, b"nope") is None
    etc = ino(vfs, "etc")
    assert vfs.lookup(etc, b".") == vfs.getattr(etc)
    assert vfs.lookup(etc, b"..") == vfs.getattr(ROOT_INO)
    with pytest.raises(VFSError) as e:
        vfs.lookup(ino(vfs, "etc/passwd"), b"x")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(VFSError) as e:
        vfs.lookup(ROOT_INO, b"a" * 256)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(VFSError) as e:
        vfs.getattr(10**6)
    assert e.value.errno == errno.ENOENT


def test_readdir_resumes_at_every_position(vfs: VFS) -> None:
    many = ino(vfs, "many")
    full = list(vfs.readdir(many))
    names = [n for _p, n, _a in full]
    assert names == [b".", b".."] + [f"f{i:03d}".encode() for i in range(50)]
    assert full[1][2].ino == ROOT_INO
    for k, (pos, _n, _a) in enumerate(full):
        assert list(vfs.readdir(many, pos)) == full[k + 1:]
    assert list(vfs.readdir(many, 0)) == full
    with pytest.raises(VFSError) as e:
        list(vfs.readdir(ino(vfs, "empty")))
    assert e.value.errno == errno.ENOTDIR


def test_readlink_and_xattrs(vfs: VFS) -> None:
    assert vfs.readlink(ino(vfs, "lib")) == b"usr/lib"
    with pytest.raises(VFSError) as e:
        vfs.readlink(ino(vfs, "etc/passwd"))
    assert e.value.errno == errno.EINVAL
    passwd = ino(vfs, "etc/passwd")
    assert sorted(vfs.listxattr(passwd)) == [b"security.capability", b"user.a"]
    assert vfs.getxattr(passwd, b"user.a") == b"1"
    assert vfs.getxattr(ino(vfs, "etc"), b"user.dir") == b"d"
    with pytest.raises(VFSError) as e:
        vfs.getxattr(passwd, b"user.missing")
    assert e.value.errno == errno.ENODATA
    assert vfs.listxattr(ino(vfs, "empty")) == []


def test_open_refuses_writes(vfs: VFS) -> None:
    passwd = ino(vfs, "etc/passwd")
    vfs.open(passwd, os.O_RDONLY)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(VFSError) as e:
            vfs.open(passwd, flags)
        assert e.value.errno == errno.EROFS
    with pytest.raises(VFSError) as e:
        vfs.open(ROOT_INO, os.O_RDONLY)
    assert e.value.errno == errno.EISDIR


def test_access(vfs: VFS) -> None:
    shadow = ino(vfs, "etc/shadow")
    vfs.access(shadow, os.R_OK, 0, 0)
    with pytest.raises(VFSError) as e:
        vfs.access(shadow, os.R_OK, 1000, 1000)
    assert e.value.errno == errno.EACCES
    with pytest.raises(VFSError) as e:
        vfs.access(shadow, os.W_OK, 0, 0)
    assert e.value.errno == errno.EROFS
    with pytest.raises(VFSError) as e:
        vfs.access(shadow, os.X_OK, 0, 0)  # root needs some x bit to execute
    assert e.value.errno == errno.EACCES
    vfs.access(ino(vfs, "big"), os.R_OK | os.X_OK, 1000, 1000)
    etc = ino(vfs, "etc")  # 0750 uid 3 gid 4
    vfs.access(etc, os.R_OK | os.X_OK, 1000, 4)
    vfs.access(etc, os.X_OK, 1000, 1000, groups=[4])
    with pytest.raises(VFSError):
        vfs.access(etc, os.R_OK, 1000, 1000)


def test_reads_across_chunk_boundaries(vfs: VFS) -> None:
    big = ino(vfs, "big")
    rnd = random.Random(7)
    cases = [(0, len(BIG)), (0, 10**9), (CS - 1, 2), (CS, CS), (CS - 5, 3 * CS + 10),
             (len(BIG) - 1, 100), (len(BIG), 10), (len(BIG) + 10, 10), (5, 0)]
    cases += [(rnd.randrange(len(BIG)), rnd.randrange(1, 4 * CS)) for _ in range(40)]

    async def check() -> None:
        for off, size in cases:
            got = await vfs.read(big, off, size)
            assert got == BIG[off: off + size], (off, size)

    run(check)
    assert run(vfs.read, ino(vfs, "empty"), 0, 4096) == b""
    assert run(vfs.read, ino(vfs, "etc/passwd"), 5, 100) == b"x:0:0\n"


def test_read_errors(vfs: VFS) -> None:
    with pytest.raises(VFSError) as e:
        run(vfs.read, ROOT_INO, 0, 10)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(VFSError) as e:
        run(vfs.read, ino(vfs, "lib"), 0, 10)
    assert e.value.errno == errno.EINVAL


def test_one_read_fetches_its_chunks_concurrently_and_offers_neighbours(vfs: VFS) -> None:
    reader = vfs.reader
    assert isinstance(reader, StoreReader)
    big = ino(vfs, "big")
    refs = [ref for _off, ref in vfs.index.chunks_for_range(big, 0, len(BIG))]
    assert len(refs) == 6

    reader.calls.clear()
    run(vfs.read, big, 0, 100)
    assert reader.calls == [(refs[0], tuple(refs[1:4]))]  # window of three chunks

    reader.calls.clear()
    run(vfs.read, big, CS - 1, 2 * CS + 2)  # touches chunks 0..3, back to back in one pack
    # The head names the rest of the read and the window after it: one ranged read.
    after = tuple(vfs.index.pack_successors(vfs.index.chunk_no(big, 3 * CS), 3 * CS))
    assert after[:2] == tuple(refs[4:6])  # the rest of the file first, then what follows it
    assert reader.calls[0] == (refs[0], tuple(refs[1:4]) + after)
    assert reader.calls[1:] == [(refs[1], ()), (refs[2], ()), (refs[3], ())]

    reader.calls.clear()
    run(vfs.read, big, 5 * CS, CS)  # the file's last chunk: the next files in the pack follow
    (head, nbrs), = reader.calls
    assert head == refs[5]
    assert nbrs == tuple(vfs.index.pack_successors(vfs.index.chunk_no(big, 5 * CS), 3 * CS))
    assert nbrs and not set(nbrs) & set(refs)  # other files' chunks, not this file's
    for prev, n in zip((head,) + nbrs, nbrs):  # back to back in one pack: one ranged read
        assert n.pack == head.pack and n.offset == prev.offset + prev.clen


def test_neighbours_stop_where_the_pack_layout_does(store: LocalStore) -> None:
    b = ImageBuilder(chunk_size=CS, pack_size=2 * CS)  # tiny packs: a new pack every two chunks
    data = _data(6 * CS, 3)
    b.file("f", data)
    index = b.write(store)
    reader = StoreReader(store)
    vfs = VFS(index, reader, neighbour_window=10 * CS)
    f = index.resolve("f")
    assert f is not None
    run(vfs.read, f, 0, 10)
    ref, nbrs = reader.calls[0]
    assert all(n.pack == ref.pack for n in nbrs)
    assert len(nbrs) < 5
    for prev, n in zip((ref,) + nbrs, nbrs):
        assert n.offset == prev.offset + prev.clen
    reader.calls.clear()
    assert run(vfs.read, f, 0, len(data) + 5) == data
    # One run per pack, fetched concurrently: each head names only its own pack's chunks.
    heads = [(r, n) for r, n in reader.calls if n]
    assert len({r.pack for r, _n in heads}) == len(heads) >= 2
    assert all(x.pack == r.pack for r, n in heads for x in n)
    assert sorted(r.digest for r, _n in reader.calls) == sorted(r.digest for _o, r in index.chunks_for_range(f, 0, len(data)))


def test_missing_chunk_is_eio_with_a_log_line_naming_image_file_and_chunk(
    vfs: VFS, store: LocalStore, caplog: pytest.LogCaptureFixture
) -> None:
    big = ino(vfs, "big")
    _off, ref = vfs.index.chunks_for_range(big, 2 * CS, 1)[0]
    store.delete(ref.pack)
    caplog.set_level(logging.ERROR, logger="imagefs.vfs")
    for off, size in ((2 * CS, 10), (0, 4 * CS)):
        caplog.clear()
        with pytest.raises(VFSError) as e:
            run(vfs.read, big, off, size)
        assert e.value.errno == errno.EIO
        text = caplog.text
        assert "image test" in text and "/big" in text and ref.digest.hex()[:16] in text


def test_statfs(vfs: VFS) -> None:
    s = vfs.statfs()
    assert s.files == vfs.index.n_inodes
    assert s.bfree == s.bavail == s.ffree == 0
    total = len(BIG) + len(b"root:x:0:0\n") + len(b"secret") + sum(len(str(i)) for i in range(50))
    assert s.blocks == (total + s.frsize - 1) // s.frsize  # the hardlink counted once
    assert s.namemax == 255


def test_files_past_4_gib(store: LocalStore) -> None:
    b = ImageBuilder(chunk_size=1 << 20)
    zero = bytes(1 << 20)
    marker = _data(1 << 20, 9)
    n = 4500  # ~4.4 GiB
    pieces = [zero] * n
    pieces[4200] = marker
    pieces[-1] = b"tail"
    size = (n - 1) * (1 << 20) + 4
    b.file_from_chunks("huge", pieces, size)
    index = b.write(store)
    vfs = VFS(index, StoreReader(store))
    h = index.resolve("huge")
    assert h is not None
    assert vfs.getattr(h).size == size > 1 << 32
    off = 4200 * (1 << 20)
    assert run(vfs.read, h, off - 10, 20) == bytes(10) + marker[:10]
    assert run(vfs.read, h, size - 6, 100) == bytes(2) + b"tail"
