"""The host agent: mounts fork from a process that has already imported everything.

Why: a fresh mount daemon spends its first ~160 ms here starting Python and importing
trio and pyfuse3 before it can fetch an index; the mount itself then takes a few ms.
``imagefs agent`` pays that once: it imports the whole read path, then waits on a unix
socket. For each mount it forks a child that runs exactly what a spawned daemon runs
(:func:`imagefs.daemon.serve`) in a session of its own, so a mount outlives the agent
and still has a process to itself (pyfuse3 serves one FUSE session per process).

``imagefs mount`` (and ``imagefs run``) ask the agent (:func:`imagefs.mount.request_mount`)
when its socket answers and spawn a daemon otherwise, so the agent is an accelerator,
never a dependency. The
request carries the caller's environment (store credentials, ``IMAGEFS_*``) and the
write end of the caller's readiness pipe (SCM_RIGHTS), so the caller waits for the
mount exactly as it does for a spawned daemon.

The accept loop is deliberately single-threaded and blocking: forking a process
with other threads running is unsafe. An agent whose code changed on disk since it
started refuses requests (the caller falls back to spawning), so an upgrade never
mounts with stale code.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from cache.private import open_private, private_dir
from imagefs.daemon import serve
from imagefs.mount import MountError, MountOptions, agent_socket

log = logging.getLogger(__name__)

CODE_PACKAGES = ("imagefs", "indexer", "cache")
MAX_REQUEST = 1 << 20


def code_stamp() -> float:
    """The newest modification time of the code a mount child would run."""
    newest = 0.0
    base = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for pkg in CODE_PACKAGES:
        for dirpath, _dirs, files in os.walk(os.path.join(base, pkg)):
            for name in files:
                if name.endswith(".py"):
                    newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest


# -- the agent -------------------------------------------------------------------------


def _preload() -> None:
    """Import everything a mount child needs, so the fork inherits it."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import cache.blobtier  # noqa: F401
    import cache.chain  # noqa: F401
    import cache.memory  # noqa: F401
    import cache.ssd  # noqa: F401
    import cache.stores  # noqa: F401
    import imagefs.erofs.session  # noqa: F401  (the writer, the blob's file system, mount(2))
    import imagefs.fuse_ops  # noqa: F401
    import imagefs.fuse_session  # noqa: F401
    import imagefs.supervisor  # noqa: F401
    import imagefs.readahead  # noqa: F401
    import imagefs.vfs  # noqa: F401
    import imagefs.index_cache  # noqa: F401
    import imagefs.prefetch  # noqa: F401
    import indexer.catalog  # noqa: F401

    try:  # S3 stores: boto3 and the S3 service model load once here, not per mount
        import boto3

        import cache.s3store  # noqa: F401

        boto3.session.Session().client("s3", region_name="us-east-1")
    except Exception as e:  # only slower mounts from S3 stores
        log.debug("boto3 not preloaded: %s", e)


def _bind(path: str) -> socket.socket:
    """Listen at ``path``, refusing to steal it from an agent that still answers."""
    private_dir(os.path.dirname(path), owned=False)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its agent is gone
        else:
            raise MountError(f"an agent is already listening at {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # root only: a request makes a mount
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def serve_agent(path: str | None = None) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT."""
    path = path or agent_socket()
    _preload()
    stamp = code_stamp()
    sock = _bind(path)
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        sock.close()  # wakes accept()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # mount children reap themselves
    log.info("agent listening at %s (pid %d)", path, os.getpid())
    try:
        while not stopping:
            try:
                conn, _addr = sock.accept()
            except OSError:
                if stopping:
                    break
                raise
            with conn:
                try:
                    _handle(conn, sock, stamp)
                except Exception:  # one bad request must not end the agent
                    log.exception("agent: request failed")
                    _reply(conn, {"error": "internal error in the agent"})
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("agent stopped")


def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(answer).encode() + b"\n")


def _handle(conn: socket.socket, listener: socket.socket, stamp: float) -> None:
    conn.settimeout(5.0)
    fds: list[int] = []
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 4)
        while not data.endswith(b"\n"):
            more = conn.recv(MAX_REQUEST)
            if not more:
                break
            data += more
        req = json.loads(data)
        if not isinstance(req, dict) or not {"image", "mountpoint", "options", "env", "log"} <= req.keys():
            raise ValueError("a request is a JSON object with image, mountpoint, options, env and log")
        if len(fds) != 1:
            raise ValueError("a request carries exactly one readiness fd")
    except (OSError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        _reply(conn, {"error": f"bad request: {e}"})
        return
    ready_fd = fds[0]
    if req.get("executable") != sys.executable or code_stamp() != stamp:
        os.close(ready_fd)
        log.warning("declining a mount: this agent's code or interpreter differs from the caller's; restart it")
        _reply(conn, {"error": "stale agent: its code or interpreter differs from the caller's"})
        return
    pid = os.fork()
    if pid == 0:
        listener.close()
        _child(req, ready_fd, conn)  # never returns
    os.close(ready_fd)
    _reply(conn, {"pid": pid})


def _child(req: dict[str, Any], ready_fd: int, conn: socket.socket) -> None:
    """(forked) Become a mount daemon, as ``python -m imagefs.daemon`` would be."""
    code = 1
    try:
        conn.close()
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir("/")
        logfd = open_private(req["log"], os.O_WRONLY | os.O_APPEND)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(devnull)
        os.close(logfd)
        os.environ.clear()
        os.environ.update(req["env"])
        logging.basicConfig(level=int(req.get("log_level", logging.INFO)), force=True,
                            format="%(asctime)s imagefs[%(process)d] %(levelname)s %(name)s: %(message)s")
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        serve(req["image"], req["mountpoint"], MountOptions(**req["options"]), ready_fd=ready_fd)
        code = 0
    except MountError as e:
        log.error("%s", e)
    except BaseException:
        log.exception("mount child failed")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
