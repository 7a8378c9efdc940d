"""EROFS mounts: the slot map, the metadata writer checked by a second reader, and the
mount's life (fallback, overlay with copy-up, busy and killed unmounts).

The tree comparisons of tests/test_mount.py run over both ways of mounting; here are
the images and situations that only the EROFS path has reasons to fear: a directory
spanning several blocks, names at the 255-byte limit, symlinks too long to inline,
inodes whose xattrs do not fit a block's rest, files ending exactly at a chunk
boundary, a file of a thousand copies of one zero chunk, devices with large minors,
ids and times past 32 bits. ``fsck.erofs`` (erofs-utils, a separate implementation
of the format) reads what the writer wrote, apart from the kernel.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from indexer.erofs import ondisk, writer
from imagefs.erofs.session import OPTIONS_ENV
from indexer.erofs.slots import SlotMap, SlotSpaceError, slot_size
from imagefs.mount import FAULT_ENV, MountError, MountOptions, RunPaths, query_stats, start_mount, unmount
from indexer.index import Index
from indexer.tree import Node
from tests.support.mounts import MTIME_NS, ImageBuilder, Mount, force_unmount, fstype_at, is_mounted, mounted, \
    reap_daemon
from tests.support.reference import Entry, dir_entries, tree_entries

CS = 64 * 1024
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")
ZERO_CHUNKS = 1025  # x 64 KiB: 64 MiB and a bit, one distinct chunk (test_mount has one past 4 GiB)


def _bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def edge_image() -> ImageBuilder:
    b = ImageBuilder(chunk_size=CS)
    b.dir("sticky", mode=0o1777, uid=4_000_000_000, gid=70_001, xattrs={"user.dir": b"d", "trusted.t": b"t"})
    b.file("sticky/setuid", b"#!/bin/true\n", mode=0o4755)
    b.file("sticky/setgid", b"x", mode=0o2711, uid=123_456, gid=654_321)
    b.file("empty", b"")
    for name, n in (("one", 1), ("chunk-1", CS - 1), ("chunk", CS), ("chunk+1", CS + 1), ("two", 2 * CS),
                    ("three+7", 3 * CS + 7)):
        b.file(f"sizes/{name}", _bytes(n, n))
    b.file("n" * 255, b"longest name")
    b.file("deep/" + "/".join(f"level{i}" for i in range(60)) + "/leaf", b"at the bottom")
    for i in range(700):  # ~12 KiB of dirents and names: a directory of several blocks
        b.file(f"many/entry-{i:04d}", _bytes(10_000 + i, i % 3))
    for i in range(40):  # names of 200 bytes: few to a block, a tail that does not inline
        b.file(f"wide/{i:02d}" + "w" * 198, b"")
    b.dir("empty-dir")
    b.symlink("link", "sizes/two")
    b.symlink("long-link", "a/" * 2000 + "end")  # 4003 bytes: too long to inline after the inode
    b.file("xattrs/cap", b"\x7fELF", mode=0o755,
           xattrs={"security.capability": CAPABILITY, **{f"user.k{i:02d}": bytes([i]) * i for i in range(40)}})
    b.file("xattrs/big-value", b"v", xattrs={"user.big": _bytes(7, 3000)})  # does not fit a block's rest
    b.special("dev/null", stat.S_IFCHR, os.makedev(1, 3), 0o666)
    b.special("dev/nvme", stat.S_IFBLK, os.makedev(259, 300_000), 0o660)
    b.special("dev/fifo", stat.S_IFIFO, 0, 0o600)
    b.special("dev/sock", stat.S_IFSOCK, 0, 0o755)
    shared = b.file("hard/a", _bytes(3, 2 * CS + 3), xattrs={"user.h": b"1"})
    b.hardlink("hard/b", "hard/a")
    b.hardlink("many/hard-c", "hard/a")
    zero = bytes(CS)
    b.file_from_chunks("zeros", [zero] * (ZERO_CHUNKS - 1) + [b"end"], (ZERO_CHUNKS - 1) * CS + 3)
    old = b.file("old", b"before 1970")
    old.mtime_ns = -1_500_000_000_123_456_789
    assert shared.children is None
    root = b.tree.root
    assert root.children is not None
    # Names the build only sees from tars: bytes that sort before "." and "..", and non-UTF-8.
    for raw in (b"!bang", b"-dash", b"+plus", b"sp ace", b"new\nline", b"\xff\xfe"):
        root.children[raw] = Node(mode=stat.S_IFREG | 0o644, mtime_ns=MTIME_NS, size=0)
    return b


def _content_of(b: ImageBuilder):  # type: ignore[no-untyped-def]
    def content(digests: list[bytes]) -> str:
        return hashlib.sha256(b"".join(b._chunks[d] for d in digests)).hexdigest()
    return content


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = str(tmp_path_factory.mktemp("erofs"))
    old = os.environ.get("IMAGEFS_RUN_DIR")
    os.environ["IMAGEFS_RUN_DIR"] = os.path.join(base, "run")
    yield base
    if old is None:
        del os.environ["IMAGEFS_RUN_DIR"]
    else:
        os.environ["IMAGEFS_RUN_DIR"] = old


@pytest.fixture(scope="module")
def edge(env: str) -> tuple[str, ImageBuilder, Index]:
    store = os.path.join(env, "store")
    b = edge_image()
    index = b.write(LocalStore(store), "edge")
    return store, b, index


def _opts(env: str, store: str, name: str, fs: str = "erofs", **kw: object) -> MountOptions:
    return MountOptions(store=store, cache_dir=os.path.join(env, "cache-" + name), cache_size=1 << 30,
                        memory_size=64 << 20, fs=fs, **kw)  # type: ignore[arg-type]


# -- the slot map ------------------------------------------------------------------------


def test_slots_are_aligned_powers_of_two_in_chunk_order() -> None:
    ulens = [10, 4096, 4097, 1 << 20, 3, (1 << 20) - 1, 70_000]
    slots = SlotMap(ulens)
    assert [slot_size(n) for n in ulens] == [4096, 4096, 8192, 1 << 20, 4096, 1 << 20, 131072]
    starts = [slots.offset(i) for i in range(len(ulens))]
    assert starts == sorted(starts)
    for i, n in enumerate(ulens):
        assert starts[i] % slot_size(n) == 0  # aligned to its own size
        if i:
            assert starts[i] >= starts[i - 1] + slot_size(ulens[i - 1])  # no overlap
    assert slots.size % 4096 == 0 and slots.size >= starts[-1] + slot_size(ulens[-1])
    assert slots.block(3) == starts[3] // 4096


def test_slot_lookup_names_the_chunk_or_the_zeros_up_to_the_next_slot() -> None:
    slots = SlotMap([10, 1 << 20, 5000])
    assert slots.locate(0) == (0, 0, 10)
    assert slots.locate(9) == (0, 9, 1)
    assert slots.locate(10) == (-1, 0, slots.offset(1) - 10)  # the rest of chunk 0's slot, then padding
    at = slots.offset(1)
    assert slots.locate(at + 123) == (1, 123, (1 << 20) - 123)
    end = slots.offset(2) + 5000
    assert slots.locate(end - 1) == (2, 4999, 1)
    assert slots.locate(end) == (-1, 0, slots.size - end)


def test_an_index_too_large_for_32_bit_block_addresses_is_refused() -> None:
    with pytest.raises(SlotSpaceError, match="32-bit"):
        SlotMap([1 << 30] * (1 << 14))  # 16 TiB of 1 GiB slots


# -- the writer, read by erofs-utils -------------------------------------------------------


def _blob_file(path: str, store: str, index: Index, slots: SlotMap) -> None:
    from cache.chunk import open_chunk

    s = LocalStore(store)
    with open(path, "wb") as f:
        f.truncate(slots.size)
        for n in range(index.n_chunks):
            ref = index.chunk(n)
            f.seek(slots.offset(n))
            f.write(open_chunk(ref, s.get_range(ref.pack, ref.offset, ref.clen)))


def test_erofs_utils_read_the_metadata_as_the_image(env: str, edge: tuple[str, ImageBuilder, Index]) -> None:
    """fsck.erofs checks every inode and extracts the tree through our chunk indexes from a
    blob file laid out by the slot map: types, modes, sizes, symlinks and bytes all match."""
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs (erofs-utils) is not installed: tools/install.sh installs it")
    store, b, index = edge
    slots = SlotMap.of_index(index)
    image = writer.build(index, slots)
    writer.check(image, index.digest)
    work = os.path.join(env, "fsck")
    os.makedirs(work)
    meta, blob, out = (os.path.join(work, n) for n in ("meta.erofs", "blob", "out"))
    with open(meta, "wb") as f:
        f.write(image)
    _blob_file(blob, store, index, slots)
    res = subprocess.run(["fsck.erofs", f"--device={blob}", f"--extract={out}", meta], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    want = tree_entries(b.tree, _content_of(b))
    got = dir_entries(out)
    assert sorted(got) == sorted(want)

    def core(e: Entry) -> tuple[object, ...]:
        # What an extraction keeps: no xattrs or link groups, and no setuid/setgid bits
        # where it chowns a file after its chmod (as the kernel mount tests check them).
        return e.type, stat.S_IMODE(e.mode) & ~(stat.S_ISUID | stat.S_ISGID), e.size, e.link, e.sha256, e.rdev

    for path in want:
        assert core(got[path]) == core(want[path]), path


def test_the_header_check_refuses_a_damaged_or_foreign_copy(edge: tuple[str, ImageBuilder, Index]) -> None:
    _store, _b, index = edge
    image = writer.build(index, SlotMap.of_index(index))
    writer.check(image, index.digest)
    bad = bytearray(image)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(ValueError, match="hash"):
        writer.check(bad, index.digest)
    with pytest.raises(ValueError, match="another index"):
        writer.check(image, "blake3:" + "00" * 32)
    assert ondisk.SUPERBLOCK.unpack_from(image, ondisk.SUPER_OFFSET)[0] == ondisk.MAGIC


# -- mounted by the kernel -----------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_mount(env: str, edge: tuple[str, ImageBuilder, Index]) -> Iterator[Mount]:
    store, _b, _index = edge
    with mounted("edge", os.path.join(env, "mnt-edge"), _opts(env, store, "edge")) as m:
        assert m.fs == "erofs"
        yield m


def test_the_edge_image_through_erofs_matches_the_tree(edge_mount: Mount, edge: tuple[str, ImageBuilder, Index]) -> None:
    _store, b, _index = edge
    want = tree_entries(b.tree, _content_of(b))
    got = dir_entries(edge_mount.path)
    assert sorted(got) == sorted(want)
    for path in sorted(want):
        assert got[path] == want[path], path
    names = os.listdir(edge_mount.path)
    assert "." not in names and ".." not in names and "!bang" in names
    assert os.lstat(os.path.join(edge_mount.path, "old")).st_mtime_ns == -1_500_000_000_123_456_789
    with open(os.path.join(edge_mount.path, "zeros"), "rb") as f:
        f.seek((ZERO_CHUNKS - 1) * CS - 2)
        assert f.read() == b"\0\0end"


def test_no_lookup_stat_listing_or_xattr_reaches_the_daemon(edge_mount: Mount) -> None:
    before = query_stats(edge_mount.path)["requests"]["ops"]
    entries = dir_entries(os.path.join(edge_mount.path, "many"))  # lstat, listxattr, getxattr, readdir
    assert len(entries) == 702
    os.readlink(os.path.join(edge_mount.path, "long-link"))
    after = query_stats(edge_mount.path)
    assert {k: v for k, v in after["requests"]["ops"].items() if k != "read"} == \
        {k: v for k, v in before.items() if k != "read"}
    assert after["fs"]["mode"] == "erofs" and after["fs"]["blob_bytes"] % 4096 == 0


def test_a_failing_blob_read_is_eio_and_the_metadata_still_answers(
        env: str, edge: tuple[str, ImageBuilder, Index], monkeypatch: pytest.MonkeyPatch) -> None:
    store, _b, _index = edge
    monkeypatch.setenv(FAULT_ENV, "read")
    with mounted("edge", os.path.join(env, "mnt-fault"), _opts(env, store, "fault")) as m:
        with open(os.path.join(m.path, "sizes/two"), "rb") as f:
            with pytest.raises(OSError) as e:
                f.read()
        assert e.value.errno == errno.EIO
        assert os.listdir(os.path.join(m.path, "sizes")) and os.readlink(os.path.join(m.path, "link")) == "sizes/two"
        assert query_stats(m.path)["requests"]["unexpected"] >= 1


# -- choosing, falling back, unmounting ------------------------------------------------------


def _log_lines(mp: str, needle: str) -> list[str]:
    with open(RunPaths.of(mp).log) as f:
        return [line for line in f if needle in line]


def test_a_kernel_that_refuses_the_mount_gets_the_plain_mount_with_one_log_line(
        env: str, edge: tuple[str, ImageBuilder, Index], monkeypatch: pytest.MonkeyPatch) -> None:
    """A real refusal: the kernel rejects an EROFS mount option it does not know (EINVAL)."""
    store, b, _index = edge
    monkeypatch.setenv(OPTIONS_ENV, "no_such_option_imagefs")
    mp = os.path.join(env, "mnt-refused")
    with mounted("edge", mp, _opts(env, store, "refused", fs="auto")) as m:
        assert m.fs == "fuse" and fstype_at(mp) == "fuse.imagefs"
        assert query_stats(mp)["fs"] == {"mode": "fuse"}
        want = tree_entries(b.tree, _content_of(b))
        for name in ("sizes/three+7", "long-link", "xattrs/cap", "dev/nvme"):
            assert dir_entries(os.path.join(mp, name))[b""] == want[name.encode()], name
    lines = _log_lines(mp, "through FUSE alone")
    assert len(lines) == 1 and "Invalid argument" in lines[0], lines
    with pytest.raises(MountError, match="as EROFS"):
        start_mount("edge", mp, _opts(env, store, "refused", fs="erofs"))
    paths = RunPaths.of(mp)
    assert not is_mounted(mp) and not os.path.exists(paths.beside(".blob"))
    assert not os.path.exists(paths.record) and not os.path.exists(paths.beside(".probe"))


def test_an_xattr_erofs_cannot_name_gets_the_plain_mount(env: str) -> None:
    store = os.path.join(env, "store-odd")
    b = ImageBuilder(chunk_size=CS)
    b.file("f", b"data", xattrs={"foo.bar": b"not a namespace EROFS indexes"})
    b.write(LocalStore(store), "odd")
    mp = os.path.join(env, "mnt-odd")
    with mounted("odd", mp, _opts(env, store, "odd", fs="auto")) as m:
        assert m.fs == "fuse"
        with open(os.path.join(mp, "f"), "rb") as f:
            assert f.read() == b"data"
    assert len(_log_lines(mp, "foo.bar")) == 1
    with pytest.raises(MountError, match="foo.bar"):
        start_mount("odd", mp, _opts(env, store, "odd", fs="erofs"))


def test_a_chunk_size_erofs_cannot_use_gets_the_plain_mount(env: str) -> None:
    store = os.path.join(env, "store-cs")
    b = ImageBuilder(chunk_size=3 * 4096)
    b.file("f", _bytes(1, 50_000))
    b.write(LocalStore(store), "cs")
    with mounted("cs", os.path.join(env, "mnt-cs"), _opts(env, store, "cs", fs="auto")) as m:
        assert m.fs == "fuse"
        with open(os.path.join(m.path, "f"), "rb") as f:
            assert f.read() == _bytes(1, 50_000)


def test_overlay_over_erofs_with_copy_up(edge_mount: Mount, env: str) -> None:
    """What ``imagefs run`` stacks: a writable overlay whose lower layer is the EROFS mount.
    Writing a file copies it up with its bytes and xattrs; the image stays as it was."""
    work = os.path.join(env, "overlay")
    upper, wd, merged = (os.path.join(work, d) for d in ("upper", "work", "merged"))
    for d in (upper, wd, merged):
        os.makedirs(d)
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                          f"lowerdir={edge_mount.path},upperdir={upper},workdir={wd}", merged],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    try:
        target = os.path.join(merged, "xattrs/cap")
        with open(target, "ab") as f:  # copy-up
            f.write(b"+")
        with open(target, "rb") as f:
            assert f.read() == b"\x7fELF+"
        assert os.getxattr(target, "user.k07") == bytes([7]) * 7
        assert os.path.exists(os.path.join(upper, "xattrs/cap"))
        os.chmod(os.path.join(merged, "sizes/two"), 0o600)  # metadata-only copy-up
        with open(os.path.join(merged, "sizes/two"), "rb") as f:
            assert f.read() == _bytes(2 * CS, 2 * CS)
        os.unlink(os.path.join(merged, "many/entry-0001"))
        assert len(os.listdir(os.path.join(merged, "many"))) == 700
        with open(os.path.join(edge_mount.path, "xattrs/cap"), "rb") as f:
            assert f.read() == b"\x7fELF"  # the image is untouched
        assert len(os.listdir(os.path.join(edge_mount.path, "many"))) == 701
    finally:
        subprocess.run(["umount", merged], capture_output=True)
        force_unmount(merged)


def test_a_busy_mount_is_detached_and_served_until_its_last_file_closes(
        env: str, edge: tuple[str, ImageBuilder, Index]) -> None:
    store, _b, _index = edge
    mp = os.path.join(env, "mnt-busy")
    with mounted("edge", mp, _opts(env, store, "busy")) as m:
        blob = RunPaths.of(mp).beside(".blob")
        f = open(os.path.join(mp, "sizes/three+7"), "rb")
        try:
            unmount(mp, timeout=2)
            assert not is_mounted(mp) and not is_mounted(blob)  # both detached from the tree
            assert os.path.exists(f"/proc/{m.pid}")  # ... and still served
            assert f.read() == _bytes(3 * CS + 7, 3 * CS + 7)
        finally:
            f.close()
        assert _exits_by_itself(m.pid, 20.0)  # the kernel let go of the blob: its FUSE session ended
    assert not os.path.exists(RunPaths.of(mp).beside(".blob"))


def _exits_by_itself(pid: int, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return True
        time.sleep(0.05)
    return False


def test_a_killed_daemon_leaves_metadata_and_eio_and_umount_removes_both(
        env: str, edge: tuple[str, ImageBuilder, Index]) -> None:
    store, _b, _index = edge
    mp = os.path.join(env, "mnt-killed")
    with mounted("edge", mp, _opts(env, store, "killed")) as m:
        blob = RunPaths.of(mp).beside(".blob")
        server = query_stats(mp)["server_pid"]  # killed with its supervisor (tests/test_revive.py: alone)
        os.kill(m.pid, signal.SIGKILL)
        reap_daemon(m.pid)
        os.kill(server, signal.SIGKILL)
        reap_daemon(server)
        assert "entry-0001" in os.listdir(os.path.join(mp, "many"))  # the kernel still has the tree
        with open(os.path.join(mp, "hard/a"), "rb") as f:  # but nobody serves the bytes
            with pytest.raises(OSError) as e:
                f.read()
        assert e.value.errno in (errno.EIO, errno.ENOTCONN)
        with pytest.raises(MountError, match="already mounted"):
            start_mount("edge", mp, _opts(env, store, "killed"))
        unmount(mp)
        assert not is_mounted(mp) and not is_mounted(blob) and os.listdir(mp) == []
    with mounted("edge", mp, _opts(env, store, "killed")) as m:  # the mountpoint is usable again
        assert m.fs == "erofs"
        with open(os.path.join(mp, "hard/a"), "rb") as f:
            assert f.read() == _bytes(3, 2 * CS + 3)


def test_metadata_is_kept_checked_and_rewritten_when_damaged(env: str, edge: tuple[str, ImageBuilder, Index]) -> None:
    store, _b, index = edge
    opts = _opts(env, store, "keep")
    kept = os.path.join(env, "cache-keep", "erofs", "imagefs-" + index.digest.partition(":")[2] + ".erofs")
    mp = os.path.join(env, "mnt-keep")
    with mounted("edge", mp, opts):
        first = query_stats(mp)["fs"]
    assert first["metadata"] == kept and "metadata_built_ms" in first
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    with mounted("edge", mp, opts):
        assert "metadata_ms" in query_stats(mp)["fs"]  # reused: not built again
    with open(kept, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff" * 64)
    with mounted("edge", mp, opts) as m:
        assert "metadata_built_ms" in query_stats(mp)["fs"]
        with open(os.path.join(m.path, "sizes/one"), "rb") as f:
            assert f.read() == _bytes(1, 1)
    assert len(_log_lines(mp, "is unusable")) == 1


def test_without_a_cache_directory_the_metadata_leaves_no_file(env: str, edge: tuple[str, ImageBuilder, Index]) -> None:
    store, _b, _index = edge
    opts = MountOptions(store=store, cache_size=0, fs="erofs")
    mp = os.path.join(env, "mnt-nocache")
    run_dir = os.path.dirname(RunPaths.of(mp).record)
    with mounted("edge", mp, opts) as m:
        assert [n for n in os.listdir(run_dir) if n.endswith(".erofs")] == []  # unlinked once mounted
        with open(os.path.join(m.path, "sizes/chunk+1"), "rb") as f:
            assert f.read() == _bytes(CS + 1, CS + 1)
    assert [n for n in os.listdir(run_dir) if n.endswith(".erofs")] == []


def test_indexing_writes_the_metadata_and_a_cold_mount_fetches_it_beside_the_index(env: str) -> None:
    """`imagefs index` stores the EROFS metadata (indexer.erofs.store); a host's first
    mount takes it from the store instead of writing it; a damaged stored copy is
    refused and the daemon writes its own."""
    from indexer.build import build_image
    from indexer.catalog import open_image
    from indexer.erofs import store as erofs_store
    from tests.support.images import write_oci_layout
    from tests.support.tars import feature_layers

    store_dir = os.path.join(env, "store-indexed")
    store = LocalStore(store_dir)
    layout = os.path.join(env, "layout-indexed")
    write_oci_layout(layout, feature_layers())
    res = build_image(f"oci:{layout}:latest", store, "indexed")
    key = erofs_store.metadata_key(res.digest)
    assert store.exists(key)
    image = erofs_store.decode(store.get(key), res.digest)  # checks it against the index
    index = open_image(store, "indexed")
    assert bytes(image) == bytes(writer.build(index, SlotMap.of_index(index)))  # what the daemon would write
    mp = os.path.join(env, "mnt-indexed")
    with mounted("indexed", mp, _opts(env, store_dir, "indexed-cold")) as m:
        fs = query_stats(mp)["fs"]
        assert fs["mode"] == "erofs" and "metadata_ms" in fs and "metadata_built_ms" not in fs
        assert os.listdir(m.path)
    blob = bytearray(store.get(key))
    blob[-10] ^= 0xFF
    store.put(key, bytes(blob))
    with mounted("indexed", mp, _opts(env, store_dir, "indexed-damaged")):
        fs = query_stats(mp)["fs"]
        assert fs["mode"] == "erofs" and "metadata_built_ms" in fs  # refused, and written here
