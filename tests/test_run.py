"""``imagefs run`` end to end: a real image, a real lazy mount, overlayfs and runc.

The image is built in code around Debian's static busybox, indexed into a local
store, and run through the ``imagefs`` command as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from indexer.build import build_image
from tests.support.containers import RunHost, busybox_entries, can_run_containers
from tests.support.images import write_oci_layout
from tests.support.tars import make_tar

CONFIG = {
    "Env": ["PATH=/bin", "GREETING=from-image"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo default-cmd; id -u; pwd"],
    "WorkingDir": "/home/app",
    "User": "app",
}

pytestmark = pytest.mark.skipif(not can_run_containers(), reason="needs root and Debian's busybox-static")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunHost]:
    root = tmp_path_factory.mktemp("run")
    write_oci_layout(str(root / "layout"), [make_tar(busybox_entries())], CONFIG)
    store = str(root / "store")
    build_image(f"oci:{root / 'layout'}:latest", LocalStore(store), "busybox:test")
    yield RunHost(store, str(root))


def test_image_defaults_user_workdir_env(host: RunHost) -> None:
    res = host.run("busybox:test")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().split() == ["default-cmd", "1000", "/home/app"]
    assert host.leftovers() == []


def test_run_takes_a_short_digest(host: RunHost) -> None:
    from indexer.catalog import resolve

    digest = resolve(LocalStore(host.store), "busybox:test")
    res = host.run("blake3:" + digest[7:15], "--", "echo by-digest")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().split() == ["by-digest"]
    assert host.leftovers() == []


def test_output_env_cwd_and_exit_status_pass_through(host: RunHost) -> None:
    res = host.run(
        "-e", "FOO=bar", "-w", "/tmp", "-u", "root", "busybox:test", "--",
        'echo "$FOO $GREETING"; pwd; id -u; echo to-stderr >&2; exit 7',
    )
    assert res.returncode == 7
    assert res.stdout.decode().splitlines() == ["bar from-image", "/tmp", "0"]
    assert res.stderr.decode().strip() == "to-stderr"
    assert host.leftovers() == []


def test_stdin_is_passed_through(host: RunHost) -> None:
    res = host.run("-i", "--entrypoint", "/bin/cat", "busybox:test", input=b"line one\nline two\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"line one\nline two\n"


def test_writes_land_in_the_overlay_not_the_image(host: RunHost) -> None:
    first = host.run("-u", "root", "busybox:test", "--",
                     "echo hi > /etc/new-file && cat /etc/new-file && touch /bin/busybox")
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"hi\n"
    second = host.run("busybox:test", "--", "test -e /etc/new-file")
    assert second.returncode == 1  # a fresh container does not see the first one's writes


def test_concurrent_containers_share_one_mount_and_the_last_unmounts(host: RunHost) -> None:
    slow = host.popen("--timings", "busybox:test", "--", "sleep 2; echo slow", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    quick = host.run("--timings", "busybox:test", "--", "echo quick")
    assert quick.returncode == 0 and quick.stdout == b"quick\n"
    assert b"reused mount" in quick.stderr  # the running container's mount was shared
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0 and out == b"slow\n", err
    assert host.leftovers() == []


def test_sigint_stops_the_container_and_cleans_up(host: RunHost) -> None:
    proc = host.popen(
        "busybox:test", "--", "trap '' INT; echo started; sleep 30",
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
    # sleep as PID 1 has no handler, so the forwarded SIGINT does nothing: it is killed
    # after the grace period. (Not sh: busybox sh -c catches SIGINT, and whether it or
    # its child dies first under the KILL decides between 130 and 137.)
    assert proc.returncode == 128 + signal.SIGKILL
    assert time.monotonic() - started < 10
    assert host.leftovers() == []


def test_sigterm_to_imagefs_run_stops_the_container(host: RunHost) -> None:
    proc = host.popen(
        "busybox:test", "--", "trap 'echo got-term; exit 42' TERM; echo started; while true; do sleep 0.1; done",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGTERM)  # to imagefs run only, as a supervisor would
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 42 and out == b"got-term\n"  # forwarded to a container that handles it
    assert host.leftovers() == []


def test_unknown_image_is_a_clear_error(host: RunHost) -> None:
    res = host.run("nope:latest", "--", "true")
    assert res.returncode == 125  # docker's status for a run that fails before the container
    assert res.stderr.decode().startswith("imagefs: nope:latest: no such image")
    assert host.leftovers() == []
