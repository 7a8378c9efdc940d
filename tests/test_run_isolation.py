"""A container never exposes the host (issue 12, reproductions 1 to 3), against the real thing.

Real lazy mounts, a real overlay and runc container, and a real unprivileged host user
(uid 65534, ``setpriv --clear-groups``) trying what the audit did:

1. use a device node that the image ships, through the container's rootfs on the host
   and through ``/proc/<pid>/root`` of the container's process;
2. make ``--user`` resolution read a host file through an image symlink
   (``/etc/passwd -> /host/file``, ``-> /etc/shadow``, ``-> ../../..``), or turn a bad
   line into a traceback;
3. read image content from the host's chunk cache, or ``-e`` secrets from the bundle.

Everything runs in a directory that any user may enter (pytest's own are 0700, which
would hide the paths whatever imagefs does), so each refusal is imagefs's doing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from indexer.build import build_image
from tests.support.containers import (NOBODY, RunHost, as_nobody, busybox_entries, can_run_containers,
                                      static_euid_program, world_traversable_dir)
from tests.support.images import write_oci_layout
from tests.support.tars import char_device, directory, file, make_tar, symlink

pytestmark = pytest.mark.skipif(not can_run_containers() or not shutil.which("setpriv"),
                                reason="needs root, Debian's busybox-static and setpriv")

CONFIG = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"]}


@dataclass
class Images:
    host: RunHost
    secret: bytes  # content of the image's root-only /secret
    host_passwd: str  # a host file that image symlinks point at


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    base = world_traversable_dir("imagefs-isolation-")
    try:
        secret = b"TOPSECRET-" + secrets.token_hex(8).encode()
        host_passwd = os.path.join(base, "host-passwd")
        with open(host_passwd, "wb") as f:  # what a host file read as the image's would give
            f.write(b"root:x:HOST-SECRET:0::/:/bin/sh\napp:x:4242:4343::/:/bin/sh\n")
        lower = make_tar([
            *busybox_entries(),
            # A harmless device (/dev/null's numbers; the audit used 1:11, the kernel log),
            # world-writable, outside the /dev that runc makes.
            char_device("devnull", 1, 3, mode=0o666),
            file("bin/euid", static_euid_program(base), mode=0o4755),  # setuid root
            file("secret", secret + b"\n", mode=0o600),
        ])
        tops = {
            "base": None,
            "hostlink": symlink("etc/passwd", host_passwd),
            "shadowlink": symlink("etc/passwd", "/etc/shadow"),
            "dotdot": symlink("etc/passwd", "../../../../../../../.." + host_passwd),
            "badline": file("etc/passwd", b"root:x:0:0::/:/bin/sh\napp:x:HOST-SECRET:1000::/:/bin/sh\n"),
            "loop": symlink("etc/passwd", "passwd"),
            "fifo-dir": directory("etc/passwd"),
        }
        store = os.path.join(base, "store")
        for name, top in tops.items():
            layers = [lower] if top is None else [lower, make_tar([top])]
            layout = os.path.join(base, f"layout-{name}")
            write_oci_layout(layout, layers, CONFIG)
            build_image(f"oci:{layout}:latest", LocalStore(store), f"iso:{name}")
        run_base = os.path.join(base, "host")
        os.mkdir(run_base, 0o755)
        # A cache directory left wide, as one an older version (or the user) made: what
        # imagefs makes inside it must be private all the same.
        os.mkdir(os.path.join(run_base, "cache"), 0o755)
        yield Images(RunHost(store, run_base), secret, host_passwd)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def running(host: RunHost, name: str, *args: str) -> Iterator[int]:
    """A container that runs until the block ends; yields the host pid of its process."""
    proc = host.popen("--name", name, "--stop-timeout", "1", *args, "--", "echo started; exec sleep 60",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"started\n", proc.stderr.read() if proc.stderr else b""
        with open(os.path.join(host.containers_dir, name, "pid")) as f:
            yield int(f.read())
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert host.leftovers() == []


def nobody_sh(script: str) -> subprocess.CompletedProcess[bytes]:
    return as_nobody(["sh", "-c", script])


def test_image_devices_open_nowhere_outside_the_container(images: Images) -> None:
    host = images.host
    with running(host, "iso-dev", "-u", f"{NOBODY}:{NOBODY}", "iso:base") as pid:
        rootfs = os.path.join(host.containers_dir, "iso-dev", "rootfs")
        assert os.stat(os.path.join(rootfs, "devnull")).st_rdev == os.makedev(1, 3)  # the node is there
        # The audit's reproduction, through the bundle: its directory is root's alone.
        res = nobody_sh(f"echo x > {rootfs}/devnull")
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        assert stat.S_IMODE(os.stat(os.path.join(host.containers_dir, "iso-dev")).st_mode) == 0o700
        # Even root on the host cannot open it: the overlay is nodev.
        with pytest.raises(PermissionError):
            os.open(os.path.join(rootfs, "devnull"), os.O_WRONLY)
        # Through /proc/<pid>/root, which the kernel opens to a host user who may
        # ptrace the container's process (same uid, and as a non-root user under
        # Docker's defaults it holds no capabilities): the path is open...
        res = as_nobody(["cat", f"/proc/{pid}/root/etc/group"])
        assert res.returncode == 0 and b"app:x:1000:" in res.stdout, res.stderr
        # ... but it is the same nodev mount, so the device is still refused.
        res = nobody_sh(f"echo x > /proc/{pid}/root/devnull")
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        # And the shared image mount is out of reach too.
        images_dir = os.path.join(host.run_dir, "images")
        res = as_nobody(["ls", images_dir])
        assert res.returncode != 0 and b"Permission denied" in res.stderr


def test_image_setuid_files_give_the_host_nothing(images: Images) -> None:
    host = images.host
    with running(host, "iso-suid", "-u", f"{NOBODY}:{NOBODY}", "iso:base") as pid:
        rootfs = os.path.join(host.containers_dir, "iso-suid", "rootfs")
        res = as_nobody([os.path.join(rootfs, "bin/euid")])
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        # Through /proc/<pid>/root the kernel treats the container's mounts as nosuid
        # (a mount of another mount namespace): it runs, as nobody.
        res = as_nobody([f"/proc/{pid}/root/bin/euid"])
        assert res.returncode == 0 and res.stdout == f"{NOBODY}\n".encode(), res


@pytest.mark.parametrize("image", ["hostlink", "shadowlink", "dotdot"])
def test_user_lookup_never_follows_an_image_symlink_to_the_host(images: Images, image: str) -> None:
    host = images.host
    res = host.run("-u", "root", f"iso:{image}", "--", "id -u")
    assert res.returncode != 0
    err = res.stderr.decode()
    assert "user 'root' not found in the image's /etc/passwd" in err
    assert "HOST-SECRET" not in err and "Traceback" not in err
    res = host.run("-u", "app", f"iso:{image}", "--", "id -u")
    assert res.returncode != 0 and b"4242" not in res.stdout + res.stderr
    # A numeric user needs no lookup and runs: the gid is not taken from the host file.
    res = host.run("-u", "4242", f"iso:{image}", "--", "id -u; id -g")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [b"4242", b"0"]
    assert host.leftovers() == []


def test_a_bad_passwd_line_is_a_clear_error(images: Images) -> None:
    host = images.host
    res = host.run("-u", "app", "iso:badline", "--", "id -u")
    assert res.returncode != 0
    err = res.stderr.decode()
    assert err.startswith("imagefs: ") and "Traceback" not in err
    assert "the image's /etc/passwd line 2: uid 'HOST-SECRET' is not a number" in err
    res = host.run("-u", "root", "iso:badline", "--", "id -u")  # the good line still works
    assert res.returncode == 0 and res.stdout == b"0\n", res.stderr
    assert host.leftovers() == []


@pytest.mark.parametrize(("image", "problem"), [("loop", "Too many levels of symbolic links"),
                                                ("fifo-dir", "not a regular file")])
def test_an_unusable_passwd_is_a_clear_error(images: Images, image: str, problem: str) -> None:
    res = images.host.run("-u", "app", f"iso:{image}", "--", "true")
    assert res.returncode != 0
    err = res.stderr.decode()
    assert "/etc/passwd" in err and problem in err and "Traceback" not in err


def _modes(top: str) -> list[tuple[str, int]]:
    """(path, permission bits) of everything below ``top``, not descending into mounts."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out.append((path, stat.S_IMODE(os.lstat(path).st_mode)))
    return out


def test_cache_run_files_and_bundles_are_roots_alone(images: Images) -> None:
    host = images.host
    token = "TOKEN=s3cr3t-" + secrets.token_hex(4)
    with running(host, "iso-cache", "-u", "root", "-e", token, "iso:base") as _pid:
        bundle = os.path.join(host.containers_dir, "iso-cache")
        config = os.path.join(bundle, "config.json")
        with open(config) as f:
            assert token in f.read()
        assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
        res = as_nobody(["cat", config])
        assert res.returncode != 0 and token.encode() not in res.stdout
        # The mount's daemon keeps a log, a record and a stats socket in the run dir.
        run_files = _modes(host.run_dir)
        kinds = {os.path.splitext(p)[1] for p, _ in run_files}
        assert {".log", ".json", ".sock"} <= kinds, run_files
        assert stat.S_IMODE(os.stat(host.run_dir).st_mode) == 0o700
        runc_state = os.path.join(host.run_dir, "runc")  # runc's own files below it: 0711 dirs, 0600 state
        for path, mode in run_files:
            if not path.startswith(runc_state + "/"):
                assert mode & 0o077 == 0, (path, oct(mode))
        # The container reads the root-only file, so its chunk lands in the SSD cache.
        res = host.run("-u", "root", "iso:base", "--", "cat /secret")
        assert res.stdout == images.secret + b"\n", res.stderr
    cache = host.cache_dir
    found = subprocess.run(["grep", "-rl", images.secret, cache], capture_output=True)
    assert found.stdout, "the secret should be in a cached chunk (else this test shows nothing)"
    for path, mode in _modes(cache):
        want = 0o700 if os.path.isdir(path) else 0o600
        assert mode & 0o077 == 0 and mode & want == want, (path, oct(mode))
    # The top directory was left 0755 (see the fixture), and still nothing below it is readable.
    res = as_nobody(["grep", "-r", images.secret.decode(), cache])
    assert images.secret not in res.stdout and res.returncode != 0
