"""No dead mounts (issue 12): a mount daemon killed with SIGKILL is replaced without
unmounting; readers see a pause, not ENOTCONN, and every byte is right.

Real mounts (both ways of serving), real reader threads checking every byte with each
file's page cache dropped before each read (so the reads cross FUSE, and some are in
flight at the kills), a real slow store for reads in flight, real processes for the
supervisor's crash-loop policy. The container test is in tests/test_run_revive.py.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from cache.localstore import LocalStore
from imagefs.fuse_session import MountArgs
from imagefs.mount import MountOptions, RunPaths, query_stats, unmount
from imagefs.supervisor import Generation, Supervisor
from tests.support.faultproxy import FaultProxy
from tests.support.mounts import ImageBuilder, is_mounted, mounted, reap_daemon

CS = 64 * 1024
FILES = {f"d/f{i:02d}": random.Random(i).randbytes(150_000 + 1000 * i) for i in range(24)}
FS_MODES = ("fuse", "erofs")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("revive")
    old = os.environ.get("IMAGEFS_RUN_DIR")
    os.environ["IMAGEFS_RUN_DIR"] = str(base / "run")
    store = LocalStore(str(base / "store"))
    b = ImageBuilder(chunk_size=CS)
    for path, data in FILES.items():
        b.file(path, data)
    b.write(store, "revive")
    yield base
    if old is None:
        del os.environ["IMAGEFS_RUN_DIR"]
    else:
        os.environ["IMAGEFS_RUN_DIR"] = old


def _opts(env: Path, fs: str, **kw: Any) -> MountOptions:
    # No SSD tier and a small memory tier: after a restart, chunks come from the store again.
    return MountOptions(store=str(env / "store"), cache_size=0, memory_size=4 << 20, fs=fs, prefetch=False, **kw)


class Readers:
    """Threads reading every file again and again, each read past the page cache,
    counting reads, errors by errno name, and wrong bytes."""

    def __init__(self, root: str, n: int = 3) -> None:
        self.root = root
        self.reads = 0
        self.errors: Counter[str] = Counter()
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def __enter__(self) -> "Readers":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, i: int) -> None:
        names = list(FILES)
        random.Random(i).shuffle(names)
        while not self._stop.is_set():
            for name in names:
                try:
                    path = os.path.join(self.root, name)
                    with open(path, "rb") as f:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read through FUSE
                        data = f.read()
                    if data != FILES[name]:
                        self.wrong.append(name)
                    if len(os.listdir(os.path.join(self.root, "d"))) != len(FILES):
                        self.wrong.append("listing")
                    self.reads += 1
                except OSError as e:
                    self.errors[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
                if self._stop.is_set():
                    return

    def wait_for(self, more: int, timeout: float = 30.0) -> None:
        """Until ``more`` reads have completed from now."""
        target = self.reads + more
        deadline = time.monotonic() + timeout
        while self.reads < target:
            assert time.monotonic() < deadline, f"readers stalled at {self.reads} reads (errors {dict(self.errors)})"
            time.sleep(0.01)


def _kill_server(mp: str, expect_restarts: int) -> int:
    """SIGKILL the mount's server; return once a new one serves (stats from it)."""
    old = query_stats(mp)["server_pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            stats = query_stats(mp, timeout=1)
            if stats["server_pid"] != old:
                assert stats["restarts"] == expect_restarts
                return int(stats["server_pid"])
        except Exception:  # between servers: no stats socket
            pass
        assert time.monotonic() < deadline, "no new server"
        time.sleep(0.02)


@pytest.mark.parametrize("fs", FS_MODES)
def test_a_killed_server_is_replaced_twice_and_readers_see_every_byte(env: Path, fs: str) -> None:
    mp = str(env / f"mnt-{fs}")
    with mounted("revive", mp, _opts(env, fs)) as m:
        assert m.fs == fs
        with Readers(mp) as readers:
            readers.wait_for(50)
            for n in (1, 2):
                _kill_server(mp, n)
                readers.wait_for(100)  # reads go on, through the new server
        assert readers.errors == Counter(), "a reader saw an error (ENOTCONN would be a dead mount)"
        assert readers.wrong == []
        stats = query_stats(mp)
        assert stats["pid"] == m.pid  # the supervisor, as before
        assert stats["restarts"] == 2 and [c["how"] for c in stats["crashes"]] == ["killed by SIGKILL"] * 2
        assert stats["requests"]["ops"]["read"] > 0  # the new server's own counters
        from imagefs.cli_mount import format_stats

        assert f"server replaced 2 time(s) (now pid {stats['server_pid']}); the last one killed by SIGKILL" \
            in format_stats(stats)
    with open(RunPaths.of(mp).log) as f:
        log = f.read()
    assert log.count("killed by SIGKILL; starting a new one") == 2 and "restart 2" in log
    assert not is_mounted(mp)


@pytest.mark.parametrize("fs", FS_MODES)
def test_reads_in_flight_at_a_kill_are_answered_by_the_next_server(env: Path, seaweed: Any, fs: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead server had read these requests: the kernel sends them again (FUSE_NOTIFY_RESEND)."""
    prefix = f"revive-{os.getpid()}-{fs}"
    builder = ImageBuilder(chunk_size=CS, pack_size=CS)  # a pack per chunk: one slow store read each
    for path, data in FILES.items():
        builder.file(path, data)
    builder.write(seaweed.store(prefix), "slow")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    target = urllib.parse.urlsplit(seaweed.endpoint)
    with FaultProxy(target.hostname, target.port) as proxy:
        opts = MountOptions(store=f"s3://{seaweed.bucket}/{prefix}", s3_endpoint=proxy.url, cache_size=0, fs=fs,
                            prefetch=False, replay=False)
        mp = str(env / f"mnt-slow-{fs}")
        with mounted("slow", mp, opts):
            proxy.delay(300)  # each store read now takes 0.6 s or more
            got: dict[str, bytes] = {}

            def read(name: str) -> None:
                with open(os.path.join(mp, name), "rb") as f:
                    got[name] = f.read()

            names = ["d/f03", "d/f07", "d/f11"]
            threads = [threading.Thread(target=read, args=(n,)) for n in names]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while query_stats(mp)["requests"]["ops"].get("read", 0) < len(names):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert all(t.is_alive() for t in threads)  # read by the server, not answered yet
            _kill_server(mp, 1)
            for t in threads:
                t.join(timeout=60)
            assert got == {n: FILES[n] for n in names}


def test_a_lazily_detached_busy_mount_is_still_replaced(env: Path) -> None:
    mp = str(env / "mnt-busy")
    with mounted("revive", mp, _opts(env, "fuse")) as m:
        with open(os.path.join(mp, "d/f05"), "rb") as f:
            unmount(mp)  # busy: detached, the open file still served
            assert not is_mounted(mp)
            os.kill(query_stats_by_record(mp), signal.SIGKILL)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == FILES["d/f05"]  # the replacement serves the detached mount
        reap_daemon(m.pid)


def query_stats_by_record(mp: str) -> int:
    """The server pid of a mount that can no longer be reached by its path."""
    import json

    with open(RunPaths.of(mp).record) as f:
        return int(json.load(f)["server_pid"])


def test_sigterm_to_the_server_unmounts_instead_of_restarting(env: Path) -> None:
    mp = str(env / "mnt-term")
    with mounted("revive", mp, _opts(env, "erofs")) as m:
        os.kill(query_stats(mp)["server_pid"], signal.SIGTERM)
        reap_daemon(m.pid)  # the supervisor goes too
        assert not os.path.exists(f"/proc/{m.pid}") or open(f"/proc/{m.pid}/stat").read().split()[2] == "Z"
        assert not is_mounted(mp) and not is_mounted(RunPaths.of(mp).beside(".blob"))


# ---- the supervisor's policy, with real processes ------------------------------------


class _Held:
    """A connection the kernel still has (the only stand-in here: a crash loop of real
    processes needs no mount to be counted)."""

    mountpoint = "/nowhere"
    fd = -1

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_crash_loop_backs_off_then_gives_up() -> None:
    spawned: list[tuple[int, float]] = []
    cleaned: list[bool] = []

    def spawn(gen: Generation, status_fd: int) -> int:
        spawned.append((gen.number, time.monotonic()))
        pid = os.fork()
        if pid == 0:
            if gen.number == 0:
                os.write(status_fd, b"s")  # the first one served, then every one dies
            os._exit(1)
        return pid

    sup = Supervisor(_Held(), spawn, cleanup=lambda: cleaned.append(True),  # type: ignore[arg-type]
                     max_crashes=4, base_delay_s=0.1, max_delay_s=0.2)
    assert sup.run() == 1
    assert [g for g, _t in spawned] == [0, 1, 2, 3, 4]  # four restarts, then it gives up
    gaps = [b - a for (_g, a), (_h, b) in zip(spawned, spawned[1:])]
    assert gaps[1] >= 0.1 and gaps[2] >= 0.2 and gaps[3] >= 0.2  # the first at once, then backing off
    assert cleaned == [True]  # unmounted: readers get ENOTCONN, not an endless wait
    assert len(sup.gen.crashes) == 5 and all(c.how == "exited with status 1" for c in sup.gen.crashes)


def test_a_server_that_dies_before_serving_is_not_restarted() -> None:
    spawned: list[int] = []

    def spawn(gen: Generation, status_fd: int) -> int:
        spawned.append(gen.number)
        pid = os.fork()
        if pid == 0:
            os._exit(1)
        return pid

    cleaned: list[bool] = []
    sup = Supervisor(_Held(), spawn, cleanup=lambda: cleaned.append(True))  # type: ignore[arg-type]
    assert sup.run() == 1 and spawned == [0] and cleaned == [True]


def test_mount_arguments_are_what_libfuse_would_pass() -> None:
    args = MountArgs({"fsname=imagefs", "subtype=imagefs", "ro", "default_permissions", "allow_other"})
    assert (args.source, args.fstype, args.flags) == ("imagefs", "fuse.imagefs", 1 | 2 | 4)  # ro, nosuid, nodev
    assert args.data(7) == "fd=7,rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"
    with pytest.raises(ValueError, match="max_read"):
        MountArgs({"max_read=4096"})


def test_a_server_that_cannot_open_its_cache_leaves_no_mount(env: Path) -> None:
    """The cache tiers are opened by the server, after the supervisor mounted: its error
    reaches the caller and the mount is removed."""
    from imagefs.mount import MountError, start_mount

    bad = env / "not-a-directory"
    bad.write_bytes(b"x")
    mp = str(env / "mnt-badcache")
    os.makedirs(mp, exist_ok=True)
    opts = MountOptions(store=str(env / "store"), cache_dir=str(bad), cache_size=1 << 30, fs="fuse")
    with pytest.raises(MountError, match="cannot open the SSD cache"):
        start_mount("revive", mp, opts)
    deadline = time.monotonic() + 10
    while is_mounted(mp):
        assert time.monotonic() < deadline, "the mount was left behind"
        time.sleep(0.05)
    assert os.listdir(mp) == []
