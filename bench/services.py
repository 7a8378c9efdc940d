"""Start and stop the bench's servers, each inside a network namespace of our own.

Why separate from tests/support: the project's tests start their servers on loopback
with pytest fixtures; the bench needs the same real components (SeaweedFS, the Docker
registry, ``imagefs cache-server``, a static HTTP server for the casync store, the
delay proxy) but placed behind emulated links, cached between runs and torn down even
on Ctrl-C, and bench must not import tests/.

Every server runs as ``ip netns exec NS CMD`` in a session of its own and binds the
namespace's loopback; only the delay proxy listens on the link address, so every byte
a client gets has crossed the proxy (latency) and the veth pair (bandwidth). A fresh
namespace has a port space of its own, so fixed ports are safe. :meth:`Service.stop`
ends the whole session (TERM, then KILL), bounded in time.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import delayproxy

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 10.0

S3_ACCESS_KEY = "imagefs-bench-access"
S3_SECRET_KEY = "imagefs-bench-secret-key"
S3_BUCKET = "imagefs-bench"
S3_REGION = "us-east-1"


class ServiceError(RuntimeError):
    """A server did not start or answer; the message names its log."""


def s3_env() -> dict[str, str]:
    """Environment for any process that talks to the bench's S3 (boto3 reads these)."""
    return {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION, "AWS_EC2_METADATA_DISABLED": "true"}


def in_ns(ns: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def tool(name: str) -> str:
    """A program next to our interpreter (the venv's ``imagefs``, ``weed``) or on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"{name} not found next to {sys.executable} or on PATH")
    return found


@dataclass
class Service:
    """A running server process (a session leader) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""  # what clients use, e.g. 198.18.0.2:8333
    _stopped: bool = field(default=False, repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
                if sig == signal.SIGTERM:
                    # the leader is gone; make sure no helper of its session stays
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            except subprocess.TimeoutExpired:
                continue


def start_process(name: str, argv: Sequence[str], log: Path, *, ns: str | None = None,
                  env: dict[str, str] | None = None, cwd: Path | None = None,
                  stdout_pipe: bool = False) -> Service:
    log.parent.mkdir(parents=True, exist_ok=True)
    full = in_ns(ns, argv)
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(full)}\n".encode())
        f.flush()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stdout_pipe else f, stderr=f,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    return Service(name, proc, log)


def wait_until(check: Callable[[], bool], svc: Service, what: str, timeout: float = 30.0,
               interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            svc.stop()
            raise ServiceError(f"{svc.name} exited ({svc.proc.returncode}) before {what}; "
                               f"log {svc.log}:\n{svc.log_tail()}")
        if check():
            return
        time.sleep(interval)
    svc.stop()
    raise ServiceError(f"{svc.name}: no {what} within {timeout:.0f}s; log {svc.log}:\n{svc.log_tail()}")


def http_answers(ns: str | None, url: str) -> bool:
    """Whether something answers HTTP at ``url`` (any status), asked from inside ``ns``."""
    res = subprocess.run(in_ns(ns, ["curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}", url]),
                         capture_output=True, text=True, timeout=10)
    return res.stdout.strip() not in ("", "000")


# --------------------------------------------------------------------------- SeaweedFS

_S3_PROBE = """
import sys, boto3, botocore.config
c = boto3.client("s3", endpoint_url=sys.argv[1], config=botocore.config.Config(
    s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3))
c.put_object(Bucket=sys.argv[2], Key=".bench-ready", Body=b"ok")
c.delete_object(Bucket=sys.argv[2], Key=".bench-ready")
"""


def start_seaweed(ns: str, workdir: Path, s3_port: int = 8333) -> Service:
    """``weed mini`` on the namespace's loopback; returns once S3 accepts writes to the
    bench bucket. The data directory persists, so indexed images survive restarts."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "s3.json").write_text(json.dumps({"identities": [{
        "name": "bench", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {"master": 9333, "volume": 8080, "filer": 8888, "s3": s3_port, "admin": 23646}
    argv = [tool("weed"), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={workdir / 's3.json'}", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false", f"-bucket={S3_BUCKET}", "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
            *[f"-{k}.port={v}" for k, v in ports.items()]]
    svc = start_process("seaweedfs", argv, workdir / "weed.log", ns=ns, cwd=workdir)
    svc.address = f"127.0.0.1:{s3_port}"
    endpoint = f"http://127.0.0.1:{s3_port}"

    def writable() -> bool:
        res = subprocess.run(in_ns(ns, [sys.executable, "-c", _S3_PROBE, endpoint, S3_BUCKET]),
                             capture_output=True, env={**os.environ, **s3_env()}, timeout=30)
        return res.returncode == 0

    wait_until(lambda: http_answers(ns, endpoint), svc, "S3 answer", timeout=60)
    wait_until(writable, svc, "writable bucket", timeout=60, interval=0.5)
    return svc


# --------------------------------------------------------------------------- registry


def start_registry(ns: str, workdir: Path, port: int = 5000) -> Service:
    """The Docker distribution registry on the namespace's loopback, storage in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    svc = start_process("registry", ["docker-registry", "serve", str(config)], workdir / "registry.log", ns=ns)
    svc.address = f"127.0.0.1:{port}"
    wait_until(lambda: http_answers(ns, f"http://127.0.0.1:{port}/v2/"), svc, "/v2/ answer")
    return svc


# --------------------------------------------------------------------------- static HTTP


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    """Files of a directory over HTTP/1.1 keep-alive (as a CDN or S3 website would).

    TCP_NODELAY: the handler writes the headers and then the body in separate sends;
    with Nagle on, the body waits for the client's (delayed, ~40 ms) ACK of the
    headers. A client that fetches one small file after another on one keep-alive
    connection (casync-http: one GET per ~64 KiB chunk) then pays ~43 ms a request
    on top of the emulated link: measured on loopback, without the delay proxy, 2,621
    casync chunk GETs at 43-45 ms each, vs ~0.3 ms with TCP_NODELAY.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def serve_static(directory: str, host: str, port: int) -> None:
    """Serve ``directory`` until killed (run by :func:`start_static_http` in a namespace)."""
    handler = lambda *a, **kw: _StaticHandler(*a, directory=directory, **kw)  # noqa: E731
    with http.server.ThreadingHTTPServer((host, port), handler) as srv:
        srv.daemon_threads = True
        srv.serve_forever()


def start_static_http(ns: str, directory: Path, port: int, log: Path) -> Service:
    argv = [sys.executable, "-m", "bench.services", "static-http", str(directory), "127.0.0.1", str(port)]
    svc = start_process("static-http", argv, log, ns=ns, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    svc.address = f"127.0.0.1:{port}"
    wait_until(lambda: http_answers(ns, f"http://127.0.0.1:{port}/"), svc, "HTTP answer")
    return svc


# --------------------------------------------------------------------------- delay proxy


@dataclass
class ProxyService:
    """A delay proxy process and its control socket (counters of the link it fronts)."""

    service: Service
    control: Path
    listen: str

    def stats(self) -> dict[str, Any]:
        return delayproxy.query(str(self.control), "stats")

    def reset(self) -> dict[str, Any]:
        return delayproxy.query(str(self.control), "reset")

    def stop(self) -> None:
        self.service.stop()


def start_delay_proxy(name: str, ns: str | None, listen: str, target: str, *, ttfb_ms: float,
                      one_way_ms: float, rundir: Path) -> ProxyService:
    control = rundir / f"{name}.ctl"
    argv = [sys.executable, "-m", "bench.delayproxy", "--listen", listen, "--target", target,
            "--ttfb-ms", str(ttfb_ms), "--one-way-ms", str(one_way_ms), "--control", str(control)]
    svc = start_process(f"delayproxy-{name}", argv, rundir / f"{name}.log", ns=ns, cwd=REPO,
                        env={"PYTHONPATH": str(REPO)})
    svc.address = listen
    wait_until(control.exists, svc, "control socket", timeout=20, interval=0.05)
    return ProxyService(svc, control, listen)


# --------------------------------------------------------------------------- cache server


def start_cache_server(ns: str, workdir: Path, *, port: int, store: str, s3_endpoint: str,
                       max_size: str, host: str = "127.0.0.1", extra: Sequence[str] = ()) -> Service:
    """``imagefs cache-server`` (the AZ tier) on ``host`` (default: the namespace's
    loopback) with ``extra`` options; its disk cache in ``workdir/cache``."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [tool("imagefs"), "cache-server", "--listen", f"{host}:{port}", "--store", store,
            "--s3-endpoint", s3_endpoint, "--dir", str(workdir / "cache"), "--max-size", max_size, *extra]
    svc = start_process("cache-server", argv, workdir / "cache-server.log", ns=ns, env=s3_env())
    svc.address = f"{host}:{port}"

    def listening() -> bool:
        res = subprocess.run(in_ns(ns, ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]),
                             capture_output=True, timeout=10)
        return res.returncode == 0

    wait_until(listening, svc, "listening socket", timeout=30)
    return svc


def net_only(ns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` in network namespace ``ns`` but the host's mount namespace (``nsenter
    --net``): what a FUSE mount made there needs to be seen by the host. (``ip netns
    exec`` also gives the command a mount namespace of its own, whose mounts the host
    never sees.)"""
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv] if ns else list(argv)


def start_agent(run_dir: Path, log: Path, *, netns: str | None = None,
                env: dict[str, str] | None = None) -> Service:
    """``imagefs agent`` with its socket in ``run_dir`` (the ``$IMAGEFS_RUN_DIR`` that
    ``imagefs mount`` looks in): mounts fork from it instead of starting Python, as on a
    host that runs the agent. With ``netns``, the agent (and every mount daemon it
    forks) reaches the network of that namespace: one simulated host of a fleet."""
    sock = run_dir / "agent.sock"
    run_dir.mkdir(parents=True, exist_ok=True)
    svc = start_process("imagefs-agent", net_only(netns, [tool("imagefs"), "agent", "--socket", str(sock)]), log,
                        env={**s3_env(), **(env or {})})

    def answers() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(sock))
            except OSError:
                return False
        return True

    wait_until(answers, svc, "agent socket", timeout=30)
    return svc


def _cli(argv: Sequence[str]) -> int:
    if len(argv) == 4 and argv[0] == "static-http":
        serve_static(argv[1], argv[2], int(argv[3]))
        return 0
    print("usage: python -m bench.services static-http DIR HOST PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
