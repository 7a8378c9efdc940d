"""Real ``imagefs cache-server`` processes for tests and benches, and a byte-flipping proxy.

Why processes: the properties that matter (single flight across connections, a disk
cache that survives a restart, SIGTERM draining, a client that survives a server
killed mid-read) only exist between real processes on real sockets.

:func:`start_cache_server` runs ``python -m imagefs.cli cache-server`` on
``127.0.0.1:0`` (or a given port), reads the bound port from its first stdout line,
waits for ``GET /health`` and returns a handle; the ``cache_servers`` fixture is a
factory whose servers are killed at teardown whatever happened. :class:`FlipProxy`
stands in front of a server and flips the last byte of every response body (of the
last chunk of a chunked one): the one fault (a server returning wrong bytes) that cannot be produced for real on demand.
"""

from __future__ import annotations

import http.client
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
_READY = re.compile(r"listening on http://([^\s]+):(\d+)")


class CacheServerError(RuntimeError):
    """A cache server could not be started or stopped as expected."""


@dataclass
class CacheServerProcess:
    """One running cache server."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    log_path: Path
    secret: str | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, *, auth: bool = True,
                timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
        """One request on a fresh connection: (status, body, lower-case headers)."""
        h = dict(headers or {})
        if auth and self.secret and "Authorization" not in h:
            h["Authorization"] = f"Bearer {self.secret}"
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def metrics_text(self) -> str:
        status, body, _ = self.request("GET", "/metrics")
        if status != 200:
            raise CacheServerError(f"GET /metrics: HTTP {status}: {body[:200]!r}")
        return body.decode()

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels) -> value."""
        return parse_prometheus(self.metrics_text())

    def metric(self, name: str) -> float:
        return self.metrics()[f"imagefs_cache_server_{name}"]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the exit status (the process is killed if it does not exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CacheServerError(f"cache server {self.address} ignored SIGTERM for {timeout}s\n"
                                   + self.log_tail()) from None

    def kill(self) -> None:
        """SIGKILL the server (and anything it started) now."""
        self._stopped = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_cache_server(workdir: str | os.PathLike[str], store: str, *, max_size: str = "256M",
                       port: int = 0, secret: str | None = None, s3_endpoint: str | None = None,
                       env: Mapping[str, str] | None = None, extra: Sequence[str] = (),
                       cache_dir: str | os.PathLike[str] | None = None) -> CacheServerProcess:
    """Start a cache server on ``127.0.0.1:port`` (0: a free port) with its disk cache in
    ``cache_dir`` (default ``workdir/cache``); wait until ``/health`` answers."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    directory = Path(cache_dir) if cache_dir is not None else wd / "cache"
    cmd = [sys.executable, "-m", "imagefs.cli", "-v", "cache-server", "--listen", f"{HOST}:{port}",
           "--store", store, "--dir", str(directory), "--max-size", max_size, *extra]
    if s3_endpoint:
        cmd += ["--s3-endpoint", s3_endpoint]
    full_env = {k: v for k, v in os.environ.items() if k != "IMAGEFS_CACHE_SECRET"}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    if secret is not None:
        secret_file = wd / f"secret-{time.monotonic_ns()}"
        secret_file.write_text(secret + "\n")
        cmd += ["--secret-file", str(secret_file)]
    full_env.update(env or {})
    log_path = wd / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    handle = CacheServerProcess(proc, 0, directory, log_path, secret)
    try:
        handle.port = _read_port(proc, log_path)
        _wait_health(handle)
    except BaseException:
        handle.kill()
        raise
    return handle


def _read_port(proc: subprocess.Popen[bytes], log_path: Path) -> int:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.1):
                if proc.poll() is not None:
                    break
                continue
            byte = proc.stdout.read1(1)  # type: ignore[attr-defined]
            if not byte:
                break
            line += byte
            if byte == b"\n":
                m = _READY.search(line.decode(errors="replace"))
                if m:
                    return int(m.group(2))
                line = b""
    finally:
        sel.close()
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise CacheServerError(f"cache server did not start (exit status {proc.poll()}):\n{tail}")


def _wait_health(handle: CacheServerProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        try:
            status, body, _ = handle.request("GET", "/health", timeout=2)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise CacheServerError(f"cache server {handle.address}: /health not ready: {last}\n{handle.log_tail()}")


@pytest.fixture
def cache_servers(tmp_path: Path) -> Iterator[list[CacheServerProcess]]:
    """A list to append started servers to (use :func:`start_cache_server`); every one is
    killed at teardown, whatever happened."""
    started: list[CacheServerProcess] = []
    try:
        yield started
    finally:
        for s in started:
            s.kill()


# ---- Prometheus text ------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})?'
                     r' (-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\+Inf|-Inf|NaN))( -?\d+)?$')
_META = re.compile(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text: str) -> dict[str, float]:
    """Parse the Prometheus text exposition format strictly enough for a test: every line
    is a comment, a HELP/TYPE line or a sample; TYPE comes before its samples and names
    a known type; returns sample (name plus label text) -> value. :class:`ValueError` on
    the first line that does not parse."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    if text and not text.endswith("\n"):
        raise ValueError("exposition must end with a newline")
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        if line.startswith("#"):
            m = _META.match(line)
            if m and m.group(1) == "TYPE":
                if m.group(3) not in _TYPES:
                    raise ValueError(f"line {n}: unknown type {m.group(3)!r}")
                if m.group(2) in types:
                    raise ValueError(f"line {n}: second TYPE for {m.group(2)}")
                types[m.group(2)] = m.group(3)
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"line {n}: not a sample: {line!r}")
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in types and not (family in types and types[family] == "histogram"):
            raise ValueError(f"line {n}: sample {name} before (or without) its TYPE")
        key = name + (m.group(2) or "")
        if key in samples:
            raise ValueError(f"line {n}: duplicate sample {key}")
        samples[key] = float(m.group(3))
    return samples


# ---- a proxy that returns wrong bytes ---------------------------------------------------

class FlipProxy:
    """HTTP/1.1 proxy from ``127.0.0.1:port`` to a cache server that XORs the last byte
    of every response body with 0xFF (keep-alive preserved). ``flipped`` counts the
    bodies it damaged."""

    def __init__(self, target_port: int) -> None:
        self.target = (HOST, target_port)
        self.flipped = 0
        self._lock = threading.Lock()
        self._server = socket.create_server((HOST, 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self) -> FlipProxy:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._socks += [client, upstream]
            for args in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        buf = bytearray()
        try:
            while True:
                if not responses:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
                    continue
                while b"\r\n\r\n" not in buf:
                    data = src.recv(65536)
                    if not data:
                        return
                    buf += data
                end = buf.index(b"\r\n\r\n") + 4
                head = bytes(buf[:end])
                if re.search(rb"(?i)transfer-encoding:\s*chunked", head):
                    if not self._flip_chunked(src, dst, buf, end):
                        return
                    continue
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                length = int(m.group(1)) if m else 0
                while len(buf) < end + length:
                    data = src.recv(65536)
                    if not data:
                        return
                    buf += data
                if length and head.startswith(b"HTTP/1.1 200"):
                    buf[end + length - 1] ^= 0xFF
                    with self._lock:
                        self.flipped += 1
                dst.sendall(bytes(buf[:end + length]))
                del buf[:end + length]
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _flip_chunked(self, src: socket.socket, dst: socket.socket, buf: bytearray, end: int) -> bool:
        """Relay a chunked response whose head ends at ``end`` in ``buf``, with the last
        byte of its last non-empty chunk flipped (the last chunk's last frame's data: a
        v3 stream's last chunk). False if the upstream closed early."""
        pos = end
        last: tuple[int, int] | None = None  # (offset in buf, size) of the last non-empty chunk
        while True:
            while b"\r\n" not in buf[pos:]:
                data = src.recv(65536)
                if not data:
                    return False
                buf += data
            eol = buf.index(b"\r\n", pos)
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            need = eol + 2 + size + 2
            while len(buf) < need:
                data = src.recv(65536)
                if not data:
                    return False
                buf += data
            if size == 0:
                break
            last = (eol + 2, size)
            pos = need
        if last is not None:
            buf[last[0] + last[1] - 1] ^= 0xFF
            with self._lock:
                self.flipped += 1
        dst.sendall(bytes(buf[:need]))
        del buf[:need]
        return True
