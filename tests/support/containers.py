"""Run ``imagefs run`` in tests: busybox images, and a host of its own per test module.

Images are built in code around Debian's static busybox, so every byte is known and
nothing is downloaded. :class:`RunHost` points one test module's runs at run,
containers and cache directories of its own (``IMAGEFS_RUN_DIR``,
``IMAGEFS_CONTAINERS_DIR``, ``--cache-dir``), so tests running in parallel, or another
engineer's runs on the same machine, never see each other's mounts and bundles, and
"nothing left behind" can be checked exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Sequence

from tests.support.tars import TarEntry, directory, file, symlink

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "echo", "cat", "env", "pwd", "id", "ls", "sleep", "touch", "test", "true", "false", "head", "stat",
           "chown", "grep", "hostname", "unshare", "su", "tty", "mkdir", "kill", "rm", "readlink", "mount"]
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\n"
NOBODY = 65534  # the unprivileged host user the isolation tests act as


def can_run_containers() -> bool:
    return os.path.exists(BUSYBOX) and os.geteuid() == 0


def busybox_entries(*, passwd: bytes | None = PASSWD, group: bytes | None = GROUP) -> list[TarEntry]:
    """A minimal root file system: busybox and its applets, /etc, /home/app, /tmp."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    entries = [
        directory("bin"), file("bin/busybox", busybox, mode=0o755),
        *[symlink(f"bin/{a}", "busybox") for a in APPLETS],
        directory("etc"),
        directory("home/app", mode=0o755, uid=1000, gid=1000),
        directory("tmp", mode=0o1777),
        directory("proc"), directory("sys"), directory("dev"),
    ]
    if passwd is not None:
        entries.append(file("etc/passwd", passwd))
    if group is not None:
        entries.append(file("etc/group", group))
    return entries


EUID_C = b'#include <stdio.h>\n#include <unistd.h>\nint main(void) { printf("%d\\n", (int)geteuid()); return 0; }\n'


def static_euid_program(workdir: str) -> bytes:
    """A static program that prints its effective uid: what a setuid file would give."""
    src, out = os.path.join(workdir, "euid.c"), os.path.join(workdir, "euid")
    with open(src, "wb") as f:
        f.write(EUID_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", out, src], check=True, capture_output=True)
    with open(out, "rb") as f:
        return f.read()


def world_traversable_dir(prefix: str) -> str:
    """A fresh directory under /tmp that any user may enter (pytest's are 0700 for root,
    which would hide from an unprivileged user what a test wants it to try to reach)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    return path


@dataclass
class RunHost:
    """The directories one test module's ``imagefs run`` uses instead of the host's."""

    store: str
    base: str  # run/, containers/ and cache/ are made below it by imagefs itself

    @property
    def run_dir(self) -> str:
        return os.path.join(self.base, "run")

    @property
    def containers_dir(self) -> str:
        return os.path.join(self.base, "containers")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.base, "cache")

    def env(self) -> dict[str, str]:
        return {**os.environ, "IMAGEFS_RUN_DIR": self.run_dir, "IMAGEFS_CONTAINERS_DIR": self.containers_dir}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imagefs", "run", "--store", self.store, "--cache-dir", self.cache_dir, *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 60,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.command(*args), input=input, capture_output=True, timeout=timeout,
                              env={**self.env(), **(env_extra or {})})

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(*args), env=self.env(), **kw)  # type: ignore[call-overload,no-any-return]

    def leftovers(self) -> list[str]:
        """Anything of this host's runs still mounted, bundles not removed, image mount points."""
        roots = (self.run_dir + "/", self.containers_dir + "/")
        with open("/proc/self/mountinfo") as f:
            mounts = [line for line in f if line.split()[4].startswith(roots)]
        bundles = os.listdir(self.containers_dir) if os.path.isdir(self.containers_dir) else []
        images_dir = os.path.join(self.run_dir, "images")
        images = os.listdir(images_dir) if os.path.isdir(images_dir) else []
        return mounts + bundles + images


def as_nobody(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` as the unprivileged host user 65534, with no supplementary groups.

    Through ``/bin/sh``: setpriv keeps root's capabilities until its own execve (they
    go only with that exec), so the program setpriv starts is looked up and executed
    with CAP_DAC_OVERRIDE, and a setuid file it names runs as root. The shell it starts
    has none left, and starts ``argv`` as nobody would.
    """
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                           "/bin/sh", "-c", 'exec "$@"', "sh", *argv], capture_output=True, timeout=timeout, cwd="/")
