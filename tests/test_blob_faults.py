"""A misbehaving blob store, end to end through a real mount: SeaweedFS behind a proxy
that answers 500, stalls, or keeps failing. Retries hide what is transient; what is not
becomes a clear EIO naming the file and chunk, and the mount stays alive."""

from __future__ import annotations

import errno
import os
import urllib.parse
from typing import Any, Iterator

import pytest

from imagefs.mount import MountOptions, query_stats
from tests.support.faultproxy import FaultProxy
from tests.support.mounts import ImageBuilder, mounted

CS = 64 * 1024
DATA = [os.urandom(3 * CS + i) for i in range(3)]


@pytest.fixture
def s3_image(seaweed: Any, tmp_path, monkeypatch) -> Iterator[tuple[FaultProxy, MountOptions]]:  # type: ignore[no-untyped-def]
    prefix = f"faults-{os.getpid()}-{tmp_path.name}"
    b = ImageBuilder(chunk_size=CS, pack_size=CS)  # a pack per chunk: one blob read per chunk
    for i, data in enumerate(DATA):
        b.file(f"f{i}", data)
    b.write(seaweed.store(prefix), "faulty")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)  # the daemon reads the AWS env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(tmp_path / "run"))
    target = urllib.parse.urlsplit(seaweed.endpoint)
    with FaultProxy(target.hostname, target.port) as proxy:
        opts = MountOptions(store=f"s3://{seaweed.bucket}/{prefix}", s3_endpoint=proxy.url,
                            cache_dir=str(tmp_path / "cache"), prefetch=False)
        yield proxy, opts


def test_transient_500s_and_a_stall_are_retried_invisibly(s3_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proxy, opts = s3_image
    with mounted("faulty", str(tmp_path / "mp"), opts) as m:
        proxy.fail_next(2, status=500)
        with open(os.path.join(m.path, "f0"), "rb") as f:
            assert f.read() == DATA[0]
        proxy.stall_next(1, 1.0)
        with open(os.path.join(m.path, "f1"), "rb") as f:
            assert f.read() == DATA[1]
        assert proxy.stats().failed >= 2 and proxy.stats().stalled == 1


def test_a_store_that_keeps_failing_is_a_clear_eio_and_the_mount_lives(s3_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proxy, opts = s3_image
    with mounted("faulty", str(tmp_path / "mp"), opts) as m:
        proxy.fail_next(10_000, status=500)
        with pytest.raises(OSError) as e:
            with open(os.path.join(m.path, "f2"), "rb") as f:
                f.read()
        assert e.value.errno == errno.EIO
        proxy.reset()  # the store recovers: the same file reads, the mount never died
        with open(os.path.join(m.path, "f2"), "rb") as f:
            assert f.read() == DATA[2]
        assert query_stats(m.path)["cache"]["unavailable"] >= 1
    with open(_daemon_log(str(tmp_path / "run"))) as f:
        log = f.read()
    assert "faulty" in log and "/f2" in log and "chunk" in log  # names the image, file and chunk


def _daemon_log(run_dir: str) -> str:
    logs = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".log")]
    assert logs, f"no daemon log in {run_dir}"
    return max(logs, key=os.path.getmtime)
