"""``imagefs run`` and a mount daemon killed under a running container (issue 12).

A real container (busybox, runc, overlayfs over the image mount) checks the sha256 of
every data file again and again while the test kills the mount's server twice with
SIGKILL; between the container's passes the test drops the image files' page cache, so
its reads cross FUSE (some of them at the kills). Target: 0 errors, 0 wrong bytes, and
``imagefs run`` says the daemon was replaced. When the whole daemon (supervisor and
server) is killed, ``imagefs run`` says the mount died under the container.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from imagefs.mount import find_mounts, query_stats
from indexer.build import build_image
from tests.support.containers import RunHost, busybox_entries, can_run_containers
from tests.support.images import write_oci_layout
from tests.support.tars import directory, file, make_tar, symlink

pytestmark = pytest.mark.skipif(not can_run_containers(), reason="needs root and Debian's busybox-static")

DATA = {f"data/f{i:02d}": random.Random(50 + i).randbytes(200_000 + 977 * i) for i in range(24)}
SUMS = "".join(f"{hashlib.sha256(v).hexdigest()}  /{k}\n" for k, v in DATA.items()).encode()
# Pass after pass over every file until /ctl/stop exists; then one line of totals.
LOOP = ("passes=0; failed=0; echo started; "
        "while [ ! -e /ctl/stop ]; do sha256sum -c -s /data/SUMS || failed=$((failed+1)); "
        "passes=$((passes+1)); done; echo passes=$passes failed=$failed")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunHost]:
    root = tmp_path_factory.mktemp("run-revive")
    entries = [*busybox_entries(), symlink("bin/sha256sum", "busybox"), directory("data"),
               *[file(k, v) for k, v in DATA.items()], file("data/SUMS", SUMS)]
    write_oci_layout(str(root / "layout"), [make_tar(entries)], {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})
    store = str(root / "store")
    build_image(f"oci:{root / 'layout'}:latest", LocalStore(store), "revive:test")
    yield RunHost(store, str(root))


@pytest.fixture(autouse=True)
def _run_dir(host: RunHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEFS_RUN_DIR", host.run_dir)  # so that this process finds the mount's stats


def _image_mount(host: RunHost) -> str:
    images = os.path.join(host.run_dir, "images") + "/"
    found = [m.mountpoint for m in find_mounts() if m.mountpoint.startswith(images)]
    assert len(found) == 1, found
    return found[0]


class _Dropper:
    """Drops the page cache of the image's data files, over and over (host side)."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Dropper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name in DATA:
                try:
                    fd = os.open(os.path.join(self.mountpoint, name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _start(host: RunHost, ctl: Path) -> subprocess.Popen[bytes]:
    proc = host.popen("-v", f"{ctl}:/ctl", "revive:test", "--", "/bin/sh", "-c", LOOP,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    return proc


def _finish(proc: subprocess.Popen[bytes], ctl: Path) -> tuple[bytes, bytes]:
    """Let the container end (its loop stops at /ctl/stop); if it does not, stop
    ``imagefs run`` the way a user would, so that it cleans up."""
    (ctl / "stop").touch()
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        return proc.communicate(timeout=60)


def _server(mp: str) -> int:
    return int(query_stats(mp)["server_pid"])


def test_a_container_reads_every_byte_across_two_kills_of_its_mount_daemon(host: RunHost, tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    proc = _start(host, ctl)
    try:
        mp = _image_mount(host)
        with _Dropper(mp):
            time.sleep(1.0)
            for n in (1, 2):
                old = _server(mp)
                os.kill(old, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if _server(mp) != old:
                            break
                    except Exception:
                        pass
                    assert time.monotonic() < deadline, "no new server"
                    time.sleep(0.02)
                time.sleep(1.0)  # the container goes on reading through the new one
            assert query_stats(mp)["restarts"] == 2
    finally:
        out, err = _finish(proc, ctl)
    assert proc.returncode == 0, err
    passes, failed = (int(kv.split("=")[1]) for kv in out.decode().split()[-2:])
    assert failed == 0 and passes >= 3, out  # every byte of every pass checked out, no I/O error
    assert b"crashed 2 times during the run and was replaced" in err, err
    assert host.leftovers() == []


def test_imagefs_run_says_when_the_mount_died_under_the_container(host: RunHost, tmp_path: Path) -> None:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    proc = _start(host, ctl)
    try:
        mp = _image_mount(host)
        stats = query_stats(mp)
        os.kill(stats["pid"], signal.SIGKILL)  # the whole daemon: supervisor, then server
        time.sleep(0.2)
        os.kill(stats["server_pid"], signal.SIGKILL)
        with _Dropper(mp):
            time.sleep(1.0)
    finally:
        out, err = _finish(proc, ctl)
    assert b"died under the container" in err, err
    assert host.leftovers() == []  # the dead mount was removed by the run's clean-up
