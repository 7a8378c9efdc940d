"""The host agent: mounts forked from a pre-imported process, and every way back to
spawning a daemon when the agent cannot serve."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from imagefs.agent import code_stamp
from imagefs.mount import FAULT_ENV, MountOptions
from tests.support.mounts import ImageBuilder, is_mounted, mounted


@pytest.fixture
def env(tmp_path, monkeypatch) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """A private run dir and agent socket, so no agent running on the host is used."""
    paths = {"run": str(tmp_path / "run"), "socket": str(tmp_path / "run" / "agent.sock")}
    monkeypatch.setenv("IMAGEFS_RUN_DIR", paths["run"])
    monkeypatch.setenv("IMAGEFS_AGENT_SOCKET", paths["socket"])
    yield paths


@pytest.fixture
def image(tmp_path) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    store = str(tmp_path / "store")
    data = os.urandom(300_000)
    b = ImageBuilder()
    b.file("data/blob", data)
    b.symlink("link", "data/blob")
    b.write(LocalStore(store), "agent-test")
    return store, data


def start_agent(socket_path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "imagefs", "agent", "--socket", socket_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not os.path.exists(socket_path):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "agent did not start"
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def test_mounts_fork_from_the_agent_and_outlive_it(env, image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, data = image
    agent = start_agent(env["socket"])
    try:
        with mounted("agent-test", str(tmp_path / "mp"), MountOptions(store=store, cache_dir=str(tmp_path / "c"))) as m:
            assert "agent" in cmdline(m.pid)  # a forked agent, not a spawned `-m imagefs.daemon`
            with open(os.path.join(m.path, "link"), "rb") as f:
                assert f.read() == data
            stop(agent)  # the mount is its own session: it keeps serving
            assert agent.returncode == 0 and not os.path.exists(env["socket"])
            with open(os.path.join(m.path, "data/blob"), "rb") as f:
                assert f.read(1000) == data[:1000]
        assert not is_mounted(str(tmp_path / "mp"))
    finally:
        stop(agent)


def test_the_callers_environment_travels_with_the_request(env, image, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store, _data = image
    agent = start_agent(env["socket"])  # started without the fault variable
    try:
        monkeypatch.setenv(FAULT_ENV, "readlink")
        # fs="fuse": the fault is in the FUSE readlink handler, which only a plain mount calls.
        opts = MountOptions(store=store, cache_dir=str(tmp_path / "c"), fs="fuse")
        with mounted("agent-test", str(tmp_path / "mp"), opts) as m:
            assert "agent" in cmdline(m.pid)
            with pytest.raises(OSError) as e:
                os.readlink(os.path.join(m.path, "link"))
            assert e.value.errno == errno.EIO  # the caller's IMAGEFS_FAULT_OPS reached the mount
    finally:
        stop(agent)


def test_without_an_agent_or_with_a_stale_one_a_daemon_is_spawned(env, image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, data = image
    opts = MountOptions(store=store, cache_dir=str(tmp_path / "c"))
    with mounted("agent-test", str(tmp_path / "mp"), opts) as m:  # no agent at all
        assert "imagefs.daemon" in cmdline(m.pid)
    agent = start_agent(env["socket"])
    code = os.path.join(os.path.dirname(__file__), "..", "imagefs", "__init__.py")
    st = os.stat(code)
    try:
        newer = int((code_stamp() + 10) * 1e9)
        os.utime(code, ns=(st.st_atime_ns, newer))  # the code "changed" on disk after the agent started
        with mounted("agent-test", str(tmp_path / "mp"), opts) as m:
            assert "imagefs.daemon" in cmdline(m.pid)  # declined by the agent, spawned instead
            with open(os.path.join(m.path, "data/blob"), "rb") as f:
                assert f.read() == data
    finally:
        os.utime(code, ns=(st.st_atime_ns, st.st_mtime_ns))
        stop(agent)


def test_a_second_agent_does_not_steal_the_socket(env) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(env["socket"])
    try:
        second = subprocess.run([sys.executable, "-m", "imagefs", "agent", "--socket", env["socket"]],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "already listening" in second.stderr
        assert agent.poll() is None and os.path.exists(env["socket"])
    finally:
        stop(agent)


def test_a_malformed_request_is_refused_and_the_agent_keeps_serving(env, image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import array
    import json
    import socket

    store, data = image
    agent = start_agent(env["socket"])
    try:
        r, w = os.pipe()
        for body in (b"not json\n", b"[1, 2, 3]\n", json.dumps({"image": "x"}).encode() + b"\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(env["socket"])
                s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
                answer = json.loads(s.recv(4096))
            assert "bad request" in answer["error"]
        os.close(r)
        os.close(w)
        assert agent.poll() is None
        with mounted("agent-test", str(tmp_path / "mp"), MountOptions(store=store, cache_dir=str(tmp_path / "c"))) as m:
            assert "agent" in cmdline(m.pid)
            with open(os.path.join(m.path, "data/blob"), "rb") as f:
                assert f.read() == data
    finally:
        stop(agent)
