"""A real containerd (Debian's 1.6) and a real ``imagefs snapshotter`` for tests, each
in temporary directories of its own: containerd gets its own ``--config`` (root, state,
socket, the proxy plugin), so the host's containerd, if any, is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"


def have_containerd() -> bool:
    return os.path.exists(CONTAINERD) and os.path.exists(CTR) and os.geteuid() == 0


def _wait_socket(path: str, proc: subprocess.Popen[bytes], log: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {open(log, errors='replace').read()[-3000:]}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on {path} after {timeout:g}s: {open(log, errors='replace').read()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Snapshotter:
    """``imagefs snapshotter`` as a child process; ``env`` points its run and cache
    directories (and so its image mounts' daemons) at the test's."""

    root: str
    socket: str
    store: str
    env: dict[str, str]
    log: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imagefs", "-v", "snapshotter", "--root", self.root, "--address", self.socket,
                 "--store", self.store], stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        _wait_socket(self.socket, self.proc, self.log)

    def stop(self) -> None:
        _stop(self.proc)

    def images_mounted(self) -> list[str]:
        """Image mounts under its root, from /proc (never the paths)."""
        prefix = os.path.join(self.root, "images") + "/"
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@dataclass
class Containerd:
    """A containerd with its own root, state, socket and config, and the imagefs
    snapshotter as the proxy plugin ``imagefs``."""

    base: str
    snapshotter_socket: str
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def address(self) -> str:
        return os.path.join(self.base, "containerd.sock")

    @property
    def log(self) -> str:
        return os.path.join(self.base, "containerd.log")

    def start(self) -> None:
        config = os.path.join(self.base, "config.toml")
        with open(config, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{self.base}/root"\nstate = "{self.base}/state"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{self.address}"\n'
                f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
                f'[proxy_plugins]\n  [proxy_plugins.imagefs]\n    type = "snapshot"\n'
                f'    address = "{self.snapshotter_socket}"\n'
            )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([CONTAINERD, "--config", config], stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        _wait_socket(self.address, self.proc, self.log)

    def stop(self) -> None:
        _stop(self.proc)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([CTR, "--address", self.address, *args], capture_output=True, text=True,
                             timeout=timeout, env=self.env)
        if check and res.returncode:
            raise AssertionError(f"ctr {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def snapshots(self) -> list[str]:
        """Keys of the imagefs snapshotter's snapshots, as containerd lists them."""
        out = self.ctr("snapshots", "--snapshotter", "imagefs", "ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in out if line.strip()]

    def kill_tasks(self, timeout: float = 30.0) -> None:
        """Stop and delete every container (and so its snapshot): what a test started."""
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
            deadline = time.monotonic() + timeout
            while self.ctr("tasks", "delete", cid, check=False).returncode != 0:
                if cid not in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"task {cid} still there {timeout:g}s after SIGKILL")
                time.sleep(0.1)
            self.ctr("containers", "delete", cid)
