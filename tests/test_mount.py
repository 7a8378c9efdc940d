"""Real mounts served by the real daemon: what a process sees through the kernel.

Every mount here is made by ``imagefs.mount.start_mount`` (or the ``imagefs`` command)
and removed by :func:`tests.support.mounts.mounted`, which unmounts lazily if it must:
no test leaves a mount behind, whatever it asserts.

Both ways of serving a tree run the same tests where they promise the same thing
(``FS_MODES``: every request through FUSE, and the kernel's EROFS over imagefs's
metadata with file data from a FUSE-served blob); tests of FUSE request handling
name ``fuse``.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
import trio

from cache.localstore import LocalStore
from imagefs.cli import parse_size
from imagefs.mount import FAULT_ENV, MountError, MountOptions, RunPaths, find_mounts, query_stats, start_mount
from indexer.build import build_image
from tests.support.images import write_oci_layout
from indexer.catalog import open_image
from tests.support.mounts import MTIME_NS, ImageBuilder, Mount, force_unmount, is_mounted, mounted, reap_daemon
from tests.support.reference import dir_entries, reference_tree
from tests.support.tars import feature_layers

CS = 64 * 1024
# A real file capability (v2, cap_net_raw): the kernel checks the format on read.
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")
BIG = random.Random(1).randbytes(5 * CS + 123)
PAR = [random.Random(100 + i).randbytes(150_000 + i * 1000) for i in range(32)]
HUGE_CHUNKS = 73_000  # x 64 KiB: ~4.46 GiB
MARKER = random.Random(9).randbytes(CS)
MARKER_AT = 70_000  # chunk number holding MARKER (offset > 4 GiB)
HUGE_SIZE = (HUGE_CHUNKS - 1) * CS + 5
FS_MODES = ("fuse", "erofs")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private run directory for daemons' sockets and logs (inherited by daemons)."""
    base = str(tmp_path_factory.mktemp("mount"))
    old = os.environ.get("IMAGEFS_RUN_DIR")
    os.environ["IMAGEFS_RUN_DIR"] = os.path.join(base, "run")
    yield base
    if old is None:
        del os.environ["IMAGEFS_RUN_DIR"]
    else:
        os.environ["IMAGEFS_RUN_DIR"] = old


def _opts(base: str, store: str, name: str, fs: str = "fuse") -> MountOptions:
    return MountOptions(store=store, cache_dir=os.path.join(base, "cache-" + name), cache_size=1 << 30,
                        memory_size=64 << 20, fs=fs)


@pytest.fixture(scope="module")
def store(env: str) -> str:
    path = os.path.join(env, "store")
    s = LocalStore(path)
    b = ImageBuilder(chunk_size=CS)
    b.dir("etc", mode=0o750, uid=3, gid=4, xattrs={"user.dir": b"d"})
    b.file("etc/passwd", b"root:x:0:0\n", xattrs={"user.a": b"1", "security.capability": CAPABILITY})
    b.file("empty", b"")
    b.file("big", BIG, mode=0o4755, uid=5, gid=6)
    b.hardlink("big-link", "big")
    b.hardlink("etc/big-link2", "big")
    b.symlink("lib", "usr/lib")
    b.file("usr/lib/libc.so", b"\x7fELF")
    b.special("dev/null", stat.S_IFCHR, os.makedev(1, 3), 0o666)
    b.special("dev/sda", stat.S_IFBLK, os.makedev(8, 1), 0o660)
    b.special("run/fifo", stat.S_IFIFO, 0, 0o600)
    b.special("run/sock", stat.S_IFSOCK, 0, 0o755)
    for i, data in enumerate(PAR):
        b.file(f"par/f{i:02d}", data)
    zero = bytes(CS)
    pieces = [zero] * HUGE_CHUNKS
    pieces[MARKER_AT] = MARKER
    pieces[-1] = b"tail!"
    b.file_from_chunks("huge", pieces, HUGE_SIZE)
    b.write(s, "main")

    broken = ImageBuilder(chunk_size=CS, pack_size=1)  # a pack per chunk
    broken.file("ok", b"still fine\n")
    broken.file("lost", b"x" * 1000)
    index = broken.write(s, "broken")
    lost = index.resolve("lost")
    assert lost is not None
    s.delete(index.chunks_for_range(lost, 0, 1)[0][1].pack)
    return path


@pytest.fixture(scope="module", params=FS_MODES)
def main(env: str, store: str, request: pytest.FixtureRequest) -> Iterator[Mount]:
    fs = request.param
    with mounted("main", os.path.join(env, "mnt-main-" + fs), _opts(env, store, "main-" + fs, fs)) as m:
        assert m.fs == fs
        yield m


def _p(m: Mount, rel: str) -> str:
    return os.path.join(m.path, rel)


def _errno(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def _ops(m: Mount) -> dict[str, int]:
    return query_stats(m.path)["requests"]["ops"]


# -- what the mount shows ------------------------------------------------------------------


def test_every_entry_type_and_attribute(main: Mount) -> None:
    root = os.lstat(main.path)
    assert stat.S_ISDIR(root.st_mode)
    assert root.st_ino == 1 or main.fs == "erofs"  # EROFS numbers inodes by their place in its metadata
    etc = os.lstat(_p(main, "etc"))
    assert (etc.st_mode, etc.st_uid, etc.st_gid, etc.st_nlink) == (stat.S_IFDIR | 0o750, 3, 4, 2)
    big = os.lstat(_p(main, "big"))
    assert big.st_mode == stat.S_IFREG | 0o4755 and (big.st_uid, big.st_gid) == (5, 6)
    assert big.st_size == len(BIG)
    unit = 512 if main.fs == "fuse" else 4096  # FUSE: what imagefs says; EROFS counts whole 4 KiB blocks
    assert big.st_blocks == (len(BIG) + unit - 1) // unit * unit // 512
    assert big.st_mtime_ns == big.st_atime_ns == big.st_ctime_ns == MTIME_NS
    assert os.lstat(_p(main, "empty")).st_blocks == 0
    lib = os.lstat(_p(main, "lib"))
    assert stat.S_ISLNK(lib.st_mode) and lib.st_size == len("usr/lib")
    assert os.readlink(_p(main, "lib")) == "usr/lib"
    assert os.listdir(_p(main, "lib")) == ["libc.so"]  # the kernel follows it inside the mount
    null = os.lstat(_p(main, "dev/null"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    sda = os.lstat(_p(main, "dev/sda"))
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 1)
    assert stat.S_ISFIFO(os.lstat(_p(main, "run/fifo")).st_mode)
    assert stat.S_ISSOCK(os.lstat(_p(main, "run/sock")).st_mode)
    assert sorted(os.listdir(main.path)) == sorted(
        ["etc", "empty", "big", "big-link", "lib", "usr", "dev", "run", "par", "huge"])
    assert os.listdir(_p(main, "par")) == [f"f{i:02d}" for i in range(32)]
    with os.scandir(_p(main, "dev")) as it:
        assert {e.name: e.inode() for e in it} == {
            "null": null.st_ino, "sda": sda.st_ino}


def test_xattrs(main: Mount) -> None:
    passwd = _p(main, "etc/passwd")
    assert sorted(os.listxattr(passwd)) == ["security.capability", "user.a"]
    assert os.getxattr(passwd, "user.a") == b"1"
    assert os.getxattr(passwd, "security.capability") == CAPABILITY
    assert os.getxattr(_p(main, "etc"), "user.dir") == b"d"
    assert _errno(os.getxattr, passwd, "user.nope") == errno.ENODATA
    assert os.listxattr(_p(main, "empty")) == []


def test_hardlinks_share_an_inode(main: Mount) -> None:
    a, b, c = (os.lstat(_p(main, n)) for n in ("big", "big-link", "etc/big-link2"))
    assert a.st_ino == b.st_ino == c.st_ino
    assert a.st_nlink == b.st_nlink == 3
    with open(_p(main, "etc/big-link2"), "rb") as f:
        assert f.read() == BIG


def test_file_bytes_across_chunk_boundaries(main: Mount) -> None:
    with open(_p(main, "big"), "rb") as f:
        assert f.read() == BIG
    fd = os.open(_p(main, "big"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rnd = random.Random(3)
        cases = [(CS - 1, 2), (CS - 3, CS + 6), (0, len(BIG) + 100), (len(BIG) - 1, 10), (len(BIG), 10)]
        cases += [(rnd.randrange(len(BIG)), rnd.randrange(1, 3 * CS)) for _ in range(30)]
        for off, size in cases:
            assert os.pread(fd, size, off) == BIG[off: off + size], (off, size)
    finally:
        os.close(fd)
    with open(_p(main, "usr/lib/libc.so"), "rb") as f:
        assert f.read() == b"\x7fELF"


def test_file_larger_than_4_gib(main: Mount) -> None:
    path = _p(main, "huge")
    assert os.stat(path).st_size == HUGE_SIZE > 1 << 32
    fd = os.open(path, os.O_RDONLY)
    try:
        at = MARKER_AT * CS
        assert os.pread(fd, 32, at - 16) == bytes(16) + MARKER[:16]
        assert os.pread(fd, 100, at + CS - 50) == MARKER[-50:] + bytes(50)
        assert os.pread(fd, 100, HUGE_SIZE - 7) == bytes(2) + b"tail!"
        assert os.pread(fd, 10, 1 << 31) == bytes(10)
    finally:
        os.close(fd)


def test_other_users_see_the_mount_with_the_images_permissions(main: Mount) -> None:
    """allow_other lets non-root processes in; default_permissions applies the image's modes."""
    # cd in as root first: pytest's tmp directories are 0700.
    script = ("import os, sys\n"
              "os.chdir(sys.argv[1]); os.setgid(65534); os.setuid(65534)\n"
              "print(len(open('usr/lib/libc.so', 'rb').read()))\n"
              "try:\n    os.listdir('etc')\nexcept PermissionError:\n    print('EACCES')\n")
    res = subprocess.run([sys.executable, "-c", script, main.path], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4", "EACCES"]  # etc is 0750 root:4


def test_writes_fail_with_erofs(main: Mount) -> None:
    big = _p(main, "big")
    assert _errno(os.open, big, os.O_WRONLY) == errno.EROFS
    assert _errno(os.open, big, os.O_RDWR) == errno.EROFS
    assert _errno(os.open, _p(main, "new"), os.O_CREAT | os.O_WRONLY, 0o644) == errno.EROFS
    assert _errno(os.mkdir, _p(main, "newdir")) == errno.EROFS
    assert _errno(os.unlink, big) == errno.EROFS
    assert _errno(os.rmdir, _p(main, "etc")) == errno.EROFS
    assert _errno(os.rename, big, _p(main, "moved")) == errno.EROFS
    assert _errno(os.symlink, "x", _p(main, "sym")) == errno.EROFS
    assert _errno(os.link, big, _p(main, "hl")) == errno.EROFS
    assert _errno(os.chmod, big, 0o600) == errno.EROFS
    assert _errno(os.truncate, big, 0) == errno.EROFS
    assert _errno(os.setxattr, big, "user.x", b"1") == errno.EROFS
    assert _errno(os.removexattr, _p(main, "etc/passwd"), "user.a") == errno.EROFS
    with open(big, "rb") as f:
        assert f.read(10) == BIG[:10]  # still intact and readable


def test_statfs(main: Mount) -> None:
    s = os.statvfs(main.path)
    assert s.f_flag & os.ST_RDONLY
    assert s.f_bfree == s.f_bavail == 0
    assert s.f_namemax == 255
    if main.fs == "fuse":
        assert s.f_ffree == 0 and s.f_files > 40
    else:  # EROFS reports an unbounded inode count less the image's inodes
        assert s.f_files - s.f_ffree > 40
    if main.fs == "fuse":  # the files' sizes
        assert s.f_blocks * s.f_frsize >= HUGE_SIZE + len(BIG)
    else:  # the metadata and the blob: the distinct chunks, once each
        assert len(BIG) + sum(map(len, PAR)) <= s.f_blocks * s.f_frsize < HUGE_SIZE
    assert {m.mountpoint for m in find_mounts()} >= {os.path.realpath(main.path)}


def test_32_concurrent_readers(main: Mount) -> None:
    huge = _p(main, "huge")

    def reader(i: int) -> bool:
        fd = os.open(_p(main, f"par/f{i:02d}"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            chunks = []
            while data := os.read(fd, 7000 + i):
                chunks.append(data)
        finally:
            os.close(fd)
        with open(huge, "rb") as f:
            f.seek(MARKER_AT * CS + i * 100)
            ok_marker = f.read(100) == MARKER[i * 100: i * 100 + 100]
        return b"".join(chunks) == PAR[i] and ok_marker

    before = _ops(main).get("read", 0)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(reader, range(32)))
    assert results == [True] * 32
    assert _ops(main)["read"] - before >= 32
    assert query_stats(main.path)["requests"]["unexpected"] == 0


def test_kernel_caches_lookups_including_negative_ones(main: Mount) -> None:
    if main.fs == "erofs":  # the kernel answers every name itself: nothing reaches imagefs
        before = _ops(main)
        assert _errno(os.stat, _p(main, "etc/no-such-file")) == errno.ENOENT
        for name in ("usr/lib/libc.so", "etc/passwd", "dev/null", "lib"):
            os.lstat(_p(main, name))
        assert sorted(os.listdir(_p(main, "par")))[:2] == ["f00", "f01"]
        assert _ops(main) == before
        return
    missing = _p(main, "etc/no-such-file")
    assert _errno(os.stat, missing) == errno.ENOENT
    after_first = _ops(main)["lookup"]
    for _ in range(3):
        assert _errno(os.stat, missing) == errno.ENOENT
    assert _ops(main)["lookup"] == after_first  # answered from the negative dentry
    os.stat(_p(main, "usr/lib/libc.so"))
    positive = _ops(main)["lookup"]
    os.stat(_p(main, "usr/lib/libc.so"))
    assert _ops(main)["lookup"] == positive
    assert _ops(main).get("getattr", 0) <= 2  # attributes come with entries and stay cached


@pytest.mark.parametrize("fs", FS_MODES)
def test_an_indexed_oci_image_through_the_mount_matches_the_reference(env: str, store: str, fs: str) -> None:
    """Every entry of feature_layers(), indexed from an OCI layout by the real build and
    read back through the kernel (bytes and metadata), against the naive reference."""
    layers = feature_layers()
    layout = os.path.join(env, "layout-" + fs)
    write_oci_layout(layout, layers, {"Cmd": ["/bin/sh"]}, compression="zstd")
    build_image(f"oci:{layout}:latest", LocalStore(store), "features")
    with mounted("features", os.path.join(env, "mnt-features-" + fs), _opts(env, store, "features-" + fs, fs)) as m:
        assert m.fs == fs
        got = dir_entries(m.path)
        want = reference_tree(layers)
        assert sorted(got) == sorted(want)
        for path in sorted(want):
            assert got[path] == want[path], path
        hl = [os.lstat(os.path.join(m.path, p)) for p in ("usr/bin/tool-hl", "usr/bin/tool")]
        assert hl[0].st_ino != hl[1].st_ino  # tool was replaced; tool-hl keeps v1
        big = os.lstat(os.path.join(m.path, "usr/lib/libbig.so"))
        assert big.st_nlink == 2 and big.st_ino == os.lstat(os.path.join(m.path, "usr/bin/libbig-hl")).st_ino


def test_mount_from_an_s3_store(env: str, seaweed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    b = ImageBuilder(chunk_size=CS)
    b.file("data/big", BIG)
    b.symlink("link", "data/big")
    b.write(seaweed.store("mount-test"), "s3img")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)  # the daemon reads the AWS env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    opts = MountOptions(store=f"s3://{seaweed.bucket}/mount-test", s3_endpoint=seaweed.endpoint, cache_size=0)
    with mounted("s3img", os.path.join(env, "mnt-s3"), opts) as m:
        with open(_p(m, "link"), "rb") as f:
            assert f.read() == BIG
        blob = query_stats(m.path)["cache"]["tiers"]["blob"]
        assert blob["bytes"] >= len(BIG) // 2 and blob["requests"] <= 3  # ranged reads, not one per chunk


def test_mount_through_an_az_cache_server(env: str, store: str) -> None:
    from tests.support.cacheserver import start_cache_server

    server = start_cache_server(os.path.join(env, "az"), store)
    try:
        # The zone's cache is warm (another host ran the image): every miss is a quick hit.
        from cache.azclient import AZCacheTier

        refs = list(open_image(LocalStore(store), "main").all_chunks())
        warm = trio.run(AZCacheTier([server.address]).fetch, refs)
        assert len(warm) == len({r.digest for r in refs})
        opts = _opts(env, store, "az")
        opts.az_cache = [f"127.0.0.1:{server.port}"]
        with mounted("main", os.path.join(env, "mnt-az"), opts) as m:
            with open(_p(m, "big"), "rb") as f:
                assert f.read() == BIG
            stats = query_stats(m.path)
            tiers = stats["cache"]["tiers"]
            assert tiers["az"]["hits"] >= 1 and tiers["blob"]["requests"] == 0
            # The zone's cache answered every miss: the prefetch stands by, costing nothing.
            assert stats["prefetch"]["state"] == "standby" and stats["cache"]["prefetched"] == 0
    finally:
        server.kill()


# -- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("fs", FS_MODES)
def test_reading_a_directory_file_by_file_costs_a_few_blob_reads(env: str, store: str, fs: str) -> None:
    """Cold, one file after another (as Python imports): neighbours in the pack come
    along with each ranged read, so 32 files of ~150 KB do not cost 32 round trips."""
    opts = MountOptions(store=store, cache_dir=os.path.join(env, "cache-seq-" + fs), cache_size=1 << 30,
                        memory_size=64 << 20, prefetch=False, fs=fs)
    with mounted("main", os.path.join(env, "mnt-seq-" + fs), opts) as m:
        for i, data in enumerate(PAR):
            with open(_p(m, f"par/f{i:02d}"), "rb") as f:
                assert f.read() == data
        stats = query_stats(m.path)
        blob = stats["cache"]["tiers"]["blob"]
        assert stats["prefetch"] == {"state": "off"}
    index = open_image(LocalStore(store), "main")
    packs = {ref.pack for i in range(len(PAR))
             for _o, ref in index.chunks_for_range(index.resolve(f"par/f{i:02d}"), 0, len(PAR[i]))}
    assert len(packs) < len(PAR) // 4  # the test is meaningful: many files share each pack
    if fs == "fuse":
        assert blob["requests"] <= len(packs), blob  # one ranged read per pack, not one per file
    else:  # EROFS reads a file in several requests at once, and one may start its own range
        assert blob["requests"] < len(PAR) // 2, blob  # before another's claim: still far from one per file


def test_prefetch_brings_the_image_to_the_ssd_tier_in_the_background(env: str, store: str) -> None:
    opts = MountOptions(store=store, cache_dir=os.path.join(env, "cache-pre"), cache_size=1 << 30,
                        memory_size=64 << 20)
    small = ImageBuilder(chunk_size=CS)
    for i, data in enumerate(PAR):
        small.file(f"par/f{i:02d}", data)
    index = small.write(LocalStore(store), "prefetch-me")
    with mounted("prefetch-me", os.path.join(env, "mnt-pre"), opts) as m:
        deadline = time.monotonic() + 30
        while query_stats(m.path)["prefetch"]["state"] != "done":
            assert time.monotonic() < deadline, query_stats(m.path)
            time.sleep(0.05)
        stats = query_stats(m.path)
        n = index.n_chunks
        assert stats["prefetch"] == {"state": "done", "planned": n, "fetched": n, "stored": n, "failed": 0}
        assert stats["cache"]["prefetched"] == index.n_chunks
        before = stats["cache"]["tiers"]["blob"]["requests"]
        for i, data in enumerate(PAR):  # nothing was read yet; now everything is local
            with open(_p(m, f"par/f{i:02d}"), "rb") as f:
                assert f.read() == data
        assert query_stats(m.path)["cache"]["tiers"]["blob"]["requests"] == before


@pytest.mark.parametrize("fs", FS_MODES)
def test_a_tiny_cache_still_returns_the_right_bytes(env: str, store: str, fs: str) -> None:
    """SSD tier and memory far smaller than what is read: everything evicts, nothing is wrong."""
    opts = MountOptions(store=store, cache_dir=os.path.join(env, "cache-tiny-" + fs), cache_size=3 * CS,
                        memory_size=2 * CS, fs=fs)
    with mounted("main", os.path.join(env, "mnt-tiny-" + fs), opts) as m:
        for _round in range(2):
            for i, data in enumerate(PAR):
                with open(_p(m, f"par/f{i:02d}"), "rb") as f:
                    assert f.read() == data
            with open(_p(m, "big"), "rb") as f:
                assert f.read() == BIG
            # Drop the kernel's copies so the second round goes through the tiers again.
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        cache = query_stats(m.path)["cache"]
    ssd_dir = os.path.join(env, "cache-tiny-" + fs, "chunks")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ssd_dir) for f in fs)
    assert on_disk <= 3 * CS
    assert cache["tiers"]["ssd"]["evictions"] > 0 and cache["tiers"]["memory"]["evictions"] > 0


@pytest.mark.parametrize("fs", FS_MODES)
def test_a_corrupted_chunk_on_the_ssd_tier_is_detected_and_fetched_again(env: str, store: str, fs: str) -> None:
    cache_dir = os.path.join(env, "cache-rot-" + fs)
    opts = MountOptions(store=store, cache_dir=cache_dir, cache_size=1 << 30, memory_size=64 << 20, fs=fs)
    with mounted("main", os.path.join(env, "mnt-rot"), opts) as m:  # fill the SSD tier
        with open(_p(m, "big"), "rb") as f:
            assert f.read() == BIG
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(cache_dir, "chunks")) for f in fs]
    assert files, "the first mount left nothing on the SSD tier"
    for path in files:  # rot every cached chunk in place
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    with mounted("main", os.path.join(env, "mnt-rot"), opts) as m:
        with open(_p(m, "big"), "rb") as f:
            assert f.read() == BIG  # served from the store, not the rotten copies
        tiers = query_stats(m.path)["cache"]["tiers"]
    assert tiers["ssd"]["corrupt"] > 0 and tiers["ssd"]["hits"] == 0  # every rotten copy was caught
    assert tiers["blob"]["requests"] > 0  # and fetched again from the store


def test_an_unexpected_exception_in_a_handler_is_eio_and_the_mount_lives(
        env: str, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "readlink,listxattr")
    with mounted("main", os.path.join(env, "mnt-fault"), _opts(env, store, "fault")) as m:
        assert _errno(os.readlink, _p(m, "lib")) == errno.EIO
        assert _errno(os.listxattr, _p(m, "etc/passwd")) == errno.EIO
        assert _errno(os.readlink, _p(m, "lib")) == errno.EIO
        with open(_p(m, "big"), "rb") as f:  # everything else still answers
            assert f.read() == BIG
        assert os.getxattr(_p(m, "etc/passwd"), "user.a") == b"1"
        stats = query_stats(m.path)
        assert stats["requests"]["unexpected"] == 3
        assert stats["requests"]["errors"]["EIO"] == 3
        with open(RunPaths.of(m.path).log) as f:
            assert "injected fault in readlink" in f.read()


@pytest.mark.parametrize("fs", FS_MODES)
def test_a_chunk_missing_from_the_store_is_eio_and_the_mount_lives(env: str, store: str, fs: str) -> None:
    with mounted("broken", os.path.join(env, "mnt-broken"), _opts(env, store, "broken-" + fs, fs)) as m:
        with open(_p(m, "ok"), "rb") as f:
            assert f.read() == b"still fine\n"
        with open(_p(m, "lost"), "rb") as f:
            assert _errno(f.read) == errno.EIO
        assert os.stat(_p(m, "lost")).st_size == 1000
        with open(_p(m, "ok"), "rb") as f:
            assert f.read() == b"still fine\n"
        assert query_stats(m.path)["cache"]["unavailable"] >= 1
        with open(RunPaths.of(m.path).log) as f:
            log = f.read()
        line = next(ln for ln in log.splitlines() if "cannot be read" in ln)
        assert "image broken" in line and "/lost" in line and "chunk " in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_store_or_unknown_image_is_an_error_and_no_mount(env: str, store: str) -> None:
    mp = os.path.join(env, "mnt-never")
    os.makedirs(mp, exist_ok=True)
    try:
        t0 = time.monotonic()
        opts = MountOptions(store="s3://imagefs-test", s3_endpoint=f"http://127.0.0.1:{_free_port()}", cache_size=0)
        with pytest.raises(MountError) as e:
            start_mount("main", mp, opts)
        assert "s3://imagefs-test" in str(e.value) and "cannot mount main" in str(e.value)
        assert time.monotonic() - t0 < 20
        assert not is_mounted(mp)
        with pytest.raises(MountError, match="no such image"):
            start_mount("nope", mp, _opts(env, store, "never"))
        assert not is_mounted(mp)
        with pytest.raises(MountError, match="no such directory"):
            start_mount("main", os.path.join(env, "does-not-exist"), _opts(env, store, "never"))
    finally:
        force_unmount(mp)


def test_mounting_twice_on_one_mountpoint_is_refused(main: Mount, env: str, store: str) -> None:
    before = os.lstat(main.path).st_ino
    for fs in FS_MODES:
        with pytest.raises(MountError, match="already mounted"):
            start_mount("main", main.path, _opts(env, store, "main", fs))
    assert os.lstat(main.path).st_ino == before and os.listdir(_p(main, "dev")) == ["null", "sda"]


@pytest.mark.parametrize("fs", FS_MODES)
def test_sigterm_unmounts_cleanly(env: str, store: str, fs: str) -> None:
    mp = os.path.join(env, "mnt-term")
    with mounted("main", mp, _opts(env, store, "term", fs)) as m:
        with open(_p(m, "etc/passwd"), "rb") as f:
            assert f.read() == b"root:x:0:0\n"
        os.kill(m.pid, signal.SIGTERM)
        reap_daemon(m.pid)
        assert not is_mounted(mp)
        assert os.listdir(mp) == []  # the empty directory again, not ENOTCONN
        assert not os.path.exists(RunPaths.of(mp).socket)
        assert not os.path.exists(RunPaths.of(mp).beside(".blob"))  # no blob mount or its directory


def test_a_killed_daemon_leaves_a_dead_mount_that_umount_removes(env: str, store: str) -> None:
    """A server killed with its supervisor (see tests/test_revive.py for one killed alone)."""
    mp = os.path.join(env, "mnt-killed")
    with mounted("main", mp, _opts(env, store, "killed")) as m:
        server = query_stats(mp)["server_pid"]
        os.kill(m.pid, signal.SIGKILL)
        reap_daemon(m.pid)
        os.kill(server, signal.SIGKILL)
        reap_daemon(server)
        assert _errno(os.listdir, mp) == errno.ENOTCONN
        with pytest.raises(MountError, match="dead imagefs mount"):
            start_mount("main", mp, _opts(env, store, "killed"))
        from imagefs.mount import unmount

        unmount(mp)
        assert not is_mounted(mp) and os.listdir(mp) == []
        assert not os.path.exists(RunPaths.of(mp).record)
    with mounted("main", mp, _opts(env, store, "killed")) as m:  # the mountpoint is usable again
        assert os.path.getsize(_p(m, "big")) == len(BIG)


@pytest.mark.parametrize("fs", FS_MODES)
def test_umount_of_a_busy_mount_detaches_it_and_returns_at_once(env: str, store: str, fs: str) -> None:
    """Issue 12: it waited ~10 s for a daemon that serves the open files until they close."""
    from imagefs.mount import unmount

    mp = os.path.join(env, "mnt-busy")
    with mounted("main", mp, _opts(env, store, "busy", fs)) as m:
        with open(_p(m, "big"), "rb") as f:
            t0 = time.monotonic()
            unmount(mp)
            assert time.monotonic() - t0 < 5
            assert not is_mounted(mp)  # detached: no new user can reach it
            assert f.read() == BIG  # the open file is still served
            assert os.path.exists(f"/proc/{m.pid}")
        deadline = time.monotonic() + 10  # and the daemon goes with the last open file
        while os.path.exists(f"/proc/{m.pid}") and open(f"/proc/{m.pid}/stat").read().split()[2] != "Z":
            assert time.monotonic() < deadline, "the daemon outlived its last open file"
            time.sleep(0.05)


# -- the command --------------------------------------------------------------------------


def _imagefs(*args: str) -> subprocess.CompletedProcess[str]:
    script = os.path.join(os.path.dirname(sys.executable), "imagefs")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-c", "import sys; from imagefs.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)


def test_imagefs_mount_returns_once_the_mount_answers_then_stats_and_umount(env: str, store: str) -> None:
    mp = os.path.join(env, "mnt-cli")
    os.makedirs(mp, exist_ok=True)
    try:
        t0 = time.monotonic()
        res = _imagefs("mount", "main", mp, "--store", store, "--cache-dir", os.path.join(env, "cache-cli"),
                       "--cache-size", "256M")
        assert res.returncode == 0, res.stderr
        st = os.stat(os.path.join(mp, "etc/passwd"))  # no waiting: it answers now
        elapsed = time.monotonic() - t0
        assert st.st_size == len(b"root:x:0:0\n")
        print(f"imagefs mount: command to first stat {elapsed * 1000:.0f} ms")

        res = _imagefs("stats", mp, "--json")
        assert res.returncode == 0, res.stderr
        stats = json.loads(res.stdout)
        # The default serves it as EROFS here (kernel 6.18): the FUSE requests are its blob's.
        assert stats["image"] == "main" and stats["fs"]["mode"] == "erofs"
        assert stats["requests"]["ops"]["lookup"] == 1 and stats["requests"]["ops"]["open"] == 1
        assert set(stats["cache"]["tiers"]) == {"memory", "ssd", "blob"}
        pid = stats["pid"]
        res = _imagefs("stats", mp)
        assert res.returncode == 0 and "memory" in res.stdout and "lookup" in res.stdout and "erofs" in res.stdout
        assert "\nprefetch: " in res.stdout

        res = _imagefs("mount", "main", mp, "--store", store)
        assert res.returncode == 1 and res.stderr.startswith("imagefs: ") and "already mounted" in res.stderr

        res = _imagefs("umount", mp)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mp)
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"

        res = _imagefs("umount", mp)
        assert res.returncode == 1 and "not an imagefs mount" in res.stderr
        res = _imagefs("mount", "no-such-image", mp, "--store", store)
        assert res.returncode == 1 and "no such image" in res.stderr and "Traceback" not in res.stderr
        assert not is_mounted(mp)
        res = _imagefs("mount", "main", mp, "--store", store, "--cache-size", "lots")
        assert res.returncode == 2 and "invalid size 'lots'" in res.stderr
    finally:
        force_unmount(mp)


def test_imagefs_mount_foreground_serves_until_interrupted(env: str, store: str) -> None:
    mp = os.path.join(env, "mnt-fg")
    os.makedirs(mp, exist_ok=True)
    script = os.path.join(os.path.dirname(sys.executable), "imagefs")
    proc = subprocess.Popen([script, "mount", "--foreground", "main", mp, "--store", store, "--cache-size", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mp):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.02)
        with open(os.path.join(mp, "etc/passwd"), "rb") as f:
            assert f.read() == b"root:x:0:0\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert not is_mounted(mp) and os.listdir(mp) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mp)


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    assert parse_size("64k") == 64 << 10
    assert parse_size("0") == 0
    for bad in ("", "G", "10X", "-1G", "1e3"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)
