"""``imagefs run`` end to end: a real image, a real lazy mount, overlayfs and runc.

The image is built in code around Debian's static busybox, indexed into a local
store, and run through the ``imagefs`` command as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from indexer.build import build_image
from cache.localstore import LocalStore
from tests.support.images import write_oci_layout
from tests.support.tars import directory, file, make_tar, symlink

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "echo", "cat", "env", "pwd", "id", "ls", "sleep", "touch", "test", "true", "false"]
CONFIG = {
    "Env": ["PATH=/bin", "GREETING=from-image"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo default-cmd; id -u; pwd"],
    "WorkingDir": "/home/app",
    "User": "app",
}

pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                                reason="needs root and Debian's busybox-static")


def busybox_layer() -> bytes:
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    entries = [
        directory("bin"), file("bin/busybox", busybox, mode=0o755),
        *[symlink(f"bin/{a}", "busybox") for a in APPLETS],
        directory("etc"),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
        file("etc/group", b"root:x:0:\napp:x:1000:\n"),
        directory("home/app", mode=0o755, uid=1000, gid=1000),
        directory("tmp", mode=0o1777),
        directory("proc"), directory("sys"), directory("dev"),
    ]
    return make_tar(entries)


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("run")
    write_oci_layout(str(root / "layout"), [busybox_layer()], CONFIG)
    store = str(root / "store")
    build_image(f"oci:{root / 'layout'}:latest", LocalStore(store), "busybox:test")
    yield store


def imagefs_run(store: str, cache: str, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "imagefs", "run", "--store", store, "--cache-dir", cache, *args]
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)


def leftovers() -> list[str]:
    """Anything of ours still mounted, or a container bundle not removed."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # imagefs run mounts only below these two directories.
            if line.split()[4].startswith(("/run/imagefs/images/", "/var/lib/imagefs/containers/")):
                mounts.append(line)
    bundles = os.listdir("/var/lib/imagefs/containers") if os.path.isdir("/var/lib/imagefs/containers") else []
    images = [n for n in os.listdir("/run/imagefs/images")] if os.path.isdir("/run/imagefs/images") else []
    return mounts + bundles + images


def test_image_defaults_user_workdir_env(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = imagefs_run(image_store, str(tmp_path), "busybox:test")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().split() == ["default-cmd", "1000", "/home/app"]
    assert leftovers() == []


def test_output_env_cwd_and_exit_status_pass_through(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = imagefs_run(
        image_store, str(tmp_path), "-e", "FOO=bar", "-w", "/tmp", "-u", "root", "busybox:test", "--",
        'echo "$FOO $GREETING"; pwd; id -u; echo to-stderr >&2; exit 7',
    )
    assert res.returncode == 7
    assert res.stdout.decode().splitlines() == ["bar from-image", "/tmp", "0"]
    assert res.stderr.decode().strip() == "to-stderr"
    assert leftovers() == []


def test_stdin_is_passed_through(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = imagefs_run(image_store, str(tmp_path), "--entrypoint", "/bin/cat", "busybox:test", input=b"line one\nline two\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"line one\nline two\n"


def test_writes_land_in_the_overlay_not_the_image(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = imagefs_run(image_store, str(tmp_path), "-u", "root", "busybox:test", "--",
                        "echo hi > /etc/new-file && cat /etc/new-file && touch /bin/busybox")
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"hi\n"
    second = imagefs_run(image_store, str(tmp_path), "busybox:test", "--", "test -e /etc/new-file")
    assert second.returncode == 1  # a fresh container does not see the first one's writes


def test_concurrent_containers_share_one_mount_and_the_last_unmounts(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "imagefs", "run", "--store", image_store, "--cache-dir", str(tmp_path), "--timings",
           "busybox:test", "--"]
    slow = subprocess.Popen([*cmd, "sleep 2; echo slow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    quick = subprocess.run([*cmd, "echo quick"], capture_output=True, timeout=60)
    assert quick.returncode == 0 and quick.stdout == b"quick\n"
    assert b"reused mount" in quick.stderr  # the running container's mount was shared
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0 and out == b"slow\n", err
    assert leftovers() == []


def test_sigint_stops_the_container_and_cleans_up(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagefs", "run", "--store", image_store, "--cache-dir", str(tmp_path),
         "busybox:test", "--", "trap '' INT; echo started; sleep 30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    started = time.monotonic()
    # Ctrl-C reaches the whole process group, the container's processes too. The shell
    # ignores SIGINT (and so does the sleep it starts, which inherits that): without the
    # trap, whether the container dies of it or is killed after the grace period depends
    # on how far the shell got, which a fast mount (EROFS) changes.
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal does
    proc.wait(timeout=30)
    # sh as PID 1 ignores the forwarded SIGINT, so it is killed after the grace period.
    assert proc.returncode == 128 + signal.SIGKILL
    assert time.monotonic() - started < 10
    assert leftovers() == []


def test_sigterm_to_imagefs_run_stops_the_container(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagefs", "run", "--store", image_store, "--cache-dir", str(tmp_path),
         "busybox:test", "--", "trap 'echo got-term; exit 42' TERM; echo started; while true; do sleep 0.1; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGTERM)  # to imagefs run only, as a supervisor would
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 42 and out == b"got-term\n"  # forwarded to a container that handles it
    assert leftovers() == []


def test_unknown_image_is_a_clear_error(image_store: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = imagefs_run(image_store, str(tmp_path), "nope:latest", "--", "true")
    assert res.returncode == 1
    assert res.stderr.decode().startswith("imagefs: nope:latest: no such image")
    assert leftovers() == []
