"""Every read has a deadline (issue 12): a real mount over a real SeaweedFS that is
stopped with SIGSTOP (a stalled store, not a dead one: connections are accepted and
never answered), real reader processes.

- A reader gets EIO within the mount's ``--read-timeout``, and the daemon's log names
  the file and the chunk; the store is not retried past the deadline.
- A reader blocked on the stalled store dies at once on SIGKILL (its wait is a
  killable one: FUSE readahead), and one whose readahead has just failed is not held
  again for the whole deadline by the kernel's synchronous re-read.
- An O_DIRECT reader waits in the kernel without any way to be interrupted (the kernel
  sends no FUSE_INTERRUPT for asynchronous direct I/O): the deadline is what frees it.
- Once the store answers again, the same files read back byte for byte.

The SeaweedFS here is this module's own: stopping the session's shared one would stall
other tests.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from imagefs.mount import MountOptions, RunPaths, query_stats
from tests.support.mounts import ImageBuilder, mounted
from tests.support.seaweed import Seaweed, start_seaweed

CS = 64 * 1024
FILES = {f"f{i}": random.Random(i).randbytes(2 << 20) for i in range(6)}
DEADLINE = 2.0
SLACK = 3.0  # seconds on top of the deadline for a loaded machine: EIO comes at ~DEADLINE

# Reads one MiB of a file: exit 0 if it read, 5 on EIO, 1 on anything else.
READER = """
import errno, os, sys
flags = os.O_RDONLY | (os.O_DIRECT if sys.argv[2] == "direct" else 0)
fd = os.open(sys.argv[1], flags)
buf = bytearray(1 << 20) if sys.argv[2] != "direct" else None
try:
    if buf is None:
        import mmap
        m = mmap.mmap(-1, 1 << 20)
        os.readv(fd, [m])
    else:
        os.readv(fd, [buf])
except OSError as e:
    sys.exit(5 if e.errno == errno.EIO else 1)
"""


@pytest.fixture(scope="module")
def stoppable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    sw = start_seaweed(tmp_path_factory.mktemp("seaweed-stoppable"))
    try:
        b = ImageBuilder(chunk_size=CS)
        for name, data in FILES.items():
            b.file(name, data)
        b.write(sw.store("deadline"), "stall")
        yield sw
    finally:
        os.killpg(sw.process.pid, signal.SIGCONT)
        sw.stop()


@pytest.fixture
def env(stoppable: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", stoppable.access_key)  # the daemon reads the AWS env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", stoppable.secret_key)
    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


def _opts(sw: Seaweed, fs: str) -> MountOptions:
    # No SSD tier, prefetch or replay: every read goes to the store, and nothing else does.
    return MountOptions(store=f"s3://{sw.bucket}/deadline", s3_endpoint=sw.endpoint, cache_size=0, fs=fs,
                        prefetch=False, replay=False, read_timeout=DEADLINE)


def _reader(path: str, mode: str = "buffered") -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", READER, path, mode])


def _wait_until_blocked(p: subprocess.Popen[bytes], mountpoint: str, reads_before: int) -> None:
    """Until the daemon has the reader's request (and the reader waits for it)."""
    for _ in range(200):
        if query_stats(mountpoint)["requests"]["ops"].get("read", 0) > reads_before:
            return
        assert p.poll() is None, "the reader ended before its read reached the daemon"
        time.sleep(0.02)
    raise AssertionError("the reader's read never reached the daemon")


class _Stopped:
    """SeaweedFS stopped with SIGSTOP for the ``with`` block (always continued after)."""

    def __init__(self, sw: Seaweed) -> None:
        self.pid = sw.process.pid

    def __enter__(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.pid, signal.SIGCONT)


@pytest.mark.parametrize("fs", ["fuse", "erofs"])
def test_a_stalled_store_is_eio_within_the_deadline_and_sigkill_frees_a_reader(
        stoppable: Seaweed, env: Path, fs: str) -> None:
    mp = str(env / "mnt")
    with mounted("stall", mp, _opts(stoppable, fs)) as m:
        with _Stopped(stoppable):
            t0 = time.monotonic()
            assert _reader(os.path.join(mp, "f0")).wait(timeout=DEADLINE + SLACK + 10) == 5  # EIO
            waited = time.monotonic() - t0
            assert DEADLINE * 0.9 <= waited < DEADLINE + SLACK, f"EIO after {waited:.1f} s"

            reads = query_stats(mp)["requests"]["ops"].get("read", 0)
            blocked = _reader(os.path.join(mp, "f1"))
            _wait_until_blocked(blocked, mp, reads)
            blocked.kill()
            blocked.wait(timeout=1.0)  # freed at once, not at the deadline: raises if not

            stats = query_stats(mp)
        # Each stalled fetch made one store call (no retries stacked under the deadline).
        assert stats["cache"]["retries"] == 0
        assert stats["cache"]["tiers"]["blob"]["errors"] <= stats["cache"]["fetches"]
        for name in ("f0", "f1"):  # the store answers again: the same files, every byte
            deadline = time.monotonic() + 10
            while True:
                try:
                    with open(os.path.join(m.path, name), "rb") as f:
                        assert f.read() == FILES[name]
                    break
                except OSError:  # a failure held for a second, or a stalled connection being dropped
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
    with open(RunPaths.of(mp).log) as f:
        log = f.read()
    assert "/f0" in log and "chunk" in log and f"within {DEADLINE:g} s" in log


def test_an_o_direct_reader_is_freed_by_the_deadline(stoppable: Seaweed, env: Path) -> None:
    """O_DIRECT reads of a FUSE file are asynchronous requests that the reader waits for
    uninterruptibly and that the kernel never interrupts: only an answer frees it."""
    mp = str(env / "mnt")
    with mounted("stall", mp, _opts(stoppable, "fuse")):
        with _Stopped(stoppable):
            t0 = time.monotonic()
            assert _reader(os.path.join(mp, "f2"), "direct").wait(timeout=DEADLINE + SLACK + 10) == 5
            assert time.monotonic() - t0 < DEADLINE + SLACK
            reads = query_stats(mp)["requests"]["ops"].get("read", 0)
            blocked = _reader(os.path.join(mp, "f3"), "direct")
            _wait_until_blocked(blocked, mp, reads)
            t1 = time.monotonic()
            blocked.kill()
            blocked.wait(timeout=DEADLINE + SLACK)
            assert time.monotonic() - t1 < DEADLINE + SLACK
        with open(os.path.join(mp, "f4"), "rb") as f:
            assert f.read() == FILES["f4"]
