"""A fault-injecting TCP proxy for tests and benches: real sockets, real faults.

Why: retry policies, fallbacks between tiers and timeouts are only believable when
they are exercised against a server that really misbehaves. A mock of the client
library proves nothing about sockets, keep-alive pools or timeouts. This proxy sits on
127.0.0.1 in front of a real server (SeaweedFS, an imagefs cache server, a registry)
and, on demand:

- ``fail_next(n, status)``: answers the next ``n`` HTTP requests itself with an HTTP
  error and an S3-style XML error body (500 InternalError, 503 SlowDown, ...), without
  bothering the server. The connection stays usable (keep-alive), as with real S3.
- ``stall_next(n, seconds)``: forwards the next ``n`` requests but holds their
  responses for ``seconds`` (a client with a shorter read timeout gives up).
- ``cut_next(n)``: closes the connection of the next ``n`` requests without answering.
- ``delay(ms)``: adds ``ms`` milliseconds of latency to each direction: every request
  reaches the server, and every response the client, that much later.

The proxy is HTTP/1.1-aware (it frames requests and responses by Content-Length or
chunked encoding so that faults hit exactly one request on a kept-alive connection).
A connection whose first bytes are not an HTTP request line is relayed as a raw byte
stream instead, so other protocols can sit behind it too; there, ``delay`` delays
every byte by ``ms`` in each direction without capping throughput, ``cut_next``
closes new connections at once, ``stall_next`` holds a new connection's first reply
bytes, and ``fail_next`` does not apply (it waits for the next HTTP request).

Counters (``stats()``, or the ``requests``/``connections``/... properties) let a test
assert that faults were really injected and retried, and count what a server sent
(``gets``, ``bytes_down``).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

MAX_HEAD = 64 * 1024
RECV = 256 * 1024
PEEK_TIMEOUT = 0.5
_CODES = {500: "InternalError", 503: "SlowDown", 429: "SlowDown", 502: "BadGateway",
          504: "GatewayTimeout", 403: "AccessDenied", 404: "NoSuchKey"}
_REASONS = {500: "Internal Server Error", 503: "Service Unavailable", 429: "Too Many Requests",
            502: "Bad Gateway", 504: "Gateway Timeout", 403: "Forbidden", 404: "Not Found"}


class _Closed(Exception):
    """The peer closed (or broke) the connection."""


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """What the proxy has seen and done since it started (or since ``reset_counters``)."""

    connections: int = 0
    requests: int = 0
    failed: int = 0
    stalled: int = 0
    cut: int = 0
    forwarded: int = 0
    gets: int = 0  # GET requests forwarded (object and ranged reads, for an S3 server)
    bytes_down: int = 0  # response bytes (heads and bodies) relayed to clients


class _Reader:
    """Buffered reads from one socket, for HTTP framing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> bool:
        try:
            data = self.sock.recv(RECV)
        except TimeoutError:
            raise
        except OSError:
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes, limit: int = MAX_HEAD) -> bytes | None:
        """Bytes up to and including ``sep``; None on a clean EOF before any byte."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise _Closed(f"header longer than {limit} bytes")
            start = max(0, len(self.buf) - len(sep) + 1)
            if not self.fill():
                if not self.buf:
                    return None
                raise _Closed("connection closed inside a header")

    def copy(self, n: int, send: Callable[[bytes], None]) -> None:
        """Pass exactly ``n`` bytes to ``send``."""
        while n > 0:
            if not self.buf and not self.fill():
                raise _Closed("connection closed inside a body")
            piece = bytes(self.buf[:n])
            del self.buf[:len(piece)]
            n -= len(piece)
            send(piece)

    def copy_chunked(self, send: Callable[[bytes], None]) -> None:
        """Pass one chunked-encoded body (chunks, last chunk, trailers) to ``send`` verbatim."""
        while True:
            line = self.read_until(b"\r\n")
            if line is None:
                raise _Closed("connection closed inside a chunked body")
            send(line)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then an empty line
                    trailer = self.read_until(b"\r\n")
                    if trailer is None:
                        raise _Closed("connection closed inside trailers")
                    send(trailer)
                    if trailer == b"\r\n":
                        return
            self.copy(size + 2, send)

    def copy_to_eof(self, send: Callable[[bytes], None]) -> None:
        while True:
            if self.buf:
                send(bytes(self.buf))
                self.buf.clear()
            if not self.fill():
                return


def _looks_like_http(start: bytes) -> bool | None:
    """Whether ``start`` begins an HTTP/1.x request ("GET /", "OPTIONS *", "GET http:");
    None while too few bytes have arrived to tell."""
    i = 0
    while i < len(start) and 65 <= start[i] <= 90:  # A-Z
        i += 1
    if i == len(start):
        return None if i <= 10 else False
    if start[i] != 0x20 or i < 3:
        return False
    if i + 1 == len(start):
        return None
    return start[i + 1] in b"/*h"


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _build_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def _copy_body(reader: _Reader, headers: list[tuple[str, str]], send: Callable[[bytes], None]) -> None:
    """Copy a request body framed by its headers (no framing: no body)."""
    if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
        reader.copy_chunked(send)
    else:
        reader.copy(int(_header(headers, "content-length") or 0), send)


class FaultProxy:
    """A threaded proxy from ``127.0.0.1:port`` to ``target_host:target_port``.

    Use as ``with FaultProxy(host, port) as p:`` or call ``start()``/``stop()``.
    ``port=0`` picks a free port; read it from ``.port`` after ``start()``.
    Fault settings are thread-safe and take effect on the next request.
    """

    def __init__(self, target_host: str, target_port: int, *, port: int = 0,
                 listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listen = (listen_host, port)
        self.port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._server: socket.socket | None = None
        self._fail: list[tuple[int, str | None]] = []
        self._stall: list[float] = []
        self._cut = 0
        self._delay = 0.0
        self._stats = dict.fromkeys(ProxyStats.__dataclass_fields__, 0)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        server = socket.create_server(self._listen, reuse_port=False)
        server.settimeout(0.2)
        self._server = server
        self.port = server.getsockname()[1]
        self._spawn(self._accept_loop, "faultproxy-accept")
        return self

    def stop(self) -> None:
        """Close every socket and wait for the threads (bounded)."""
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        with self._lock:
            socks = list(self._sockets)
            threads = list(self._threads)
        for s in socks:
            self._close(s)
        deadline = time.monotonic() + 5
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the address clients should use instead of the target's."""
        return f"http://{self._listen[0]}:{self.port}"

    # -- faults -------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500, code: str | None = None) -> None:
        """Answer the next ``n`` HTTP requests with ``status`` and an S3 XML error
        (code ``code``, by default InternalError for 500, SlowDown for 503)."""
        with self._lock:
            self._fail.extend([(status, code)] * n)

    def stall_next(self, n: int, seconds: float) -> None:
        """Hold the responses to the next ``n`` requests for ``seconds``."""
        with self._lock:
            self._stall.extend([seconds] * n)

    def cut_next(self, n: int) -> None:
        """Close the connection of the next ``n`` requests without a response."""
        with self._lock:
            self._cut += n

    def delay(self, ms: float) -> None:
        """Add ``ms`` milliseconds of latency in each direction (0 turns it off)."""
        with self._lock:
            self._delay = ms / 1000.0

    def reset(self) -> None:
        """Drop every pending fault and the delay."""
        with self._lock:
            self._fail.clear()
            self._stall.clear()
            self._cut = 0
            self._delay = 0.0

    # -- counters -----------------------------------------------------------------

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._stats)

    def reset_counters(self) -> None:
        with self._lock:
            for k in self._stats:
                self._stats[k] = 0

    @property
    def requests(self) -> int:
        return self.stats().requests

    @property
    def connections(self) -> int:
        return self.stats().connections

    @property
    def failed(self) -> int:
        return self.stats().failed

    @property
    def stalled(self) -> int:
        return self.stats().stalled

    @property
    def cut(self) -> int:
        return self.stats().cut

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # -- plumbing -----------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()
        return t

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)
        if self._stopping.is_set():
            self._close(s)

    def _close(self, s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
        with self._lock:
            self._sockets.discard(s)

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(client)
            self._count("connections")
            self._spawn(self._serve, "faultproxy-conn", client)

    def _connect_upstream(self) -> socket.socket:
        up = socket.create_connection(self.target, timeout=10)
        up.settimeout(None)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(up)
        return up

    def _take_fault(self) -> tuple[str, object]:
        with self._lock:
            if self._cut:
                self._cut -= 1
                return "cut", None
            if self._fail:
                return "fail", self._fail.pop(0)
            if self._stall:
                return "stall", self._stall.pop(0)
            return "", None

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the proxy stops first; False if it stopped."""
        return seconds <= 0 or not self._stopping.wait(seconds)

    # -- one client connection ----------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        reader = _Reader(client)
        conn: dict[str, socket.socket | None] = {"up": None}
        try:
            # Peek at the first bytes to choose HTTP or raw relaying; a client that
            # says nothing at first (the server speaks first) gets raw relaying.
            client.settimeout(PEEK_TIMEOUT)
            verdict: bool | None = None
            try:
                while verdict is None:
                    if not reader.fill():
                        return
                    verdict = _looks_like_http(bytes(reader.buf[:12]))
            except TimeoutError:
                verdict = False
            client.settimeout(None)
            if not verdict:
                self._raw(client, reader)
                return
            while not self._stopping.is_set():
                self._one_request(client, reader, conn)
        except (_Closed, OSError, ValueError, IndexError):
            return
        finally:
            self._close(client)
            if conn["up"] is not None:
                self._close(conn["up"])

    def _one_request(self, client: socket.socket, reader: _Reader,
                     conn: dict[str, socket.socket | None]) -> None:
        """Relay (or fault) one request and its response; raises _Closed to end the connection.

        ``conn["up"]`` is the kept-alive upstream connection, opened on first use.
        """
        head = reader.read_until(b"\r\n\r\n")
        if head is None:
            raise _Closed("client done")
        first, headers = _parse_head(head)
        method = first.split(" ", 1)[0]
        self._count("requests")
        if (_header(headers, "expect") or "").lower() == "100-continue":
            # Answer the interim response ourselves so the body arrives now; 'expect'
            # is never part of an AWS signature, so dropping it is safe.
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        kind, arg = self._take_fault()
        if kind == "cut":
            self._count("cut")
            raise _Closed("cut")
        if kind == "fail":
            _copy_body(reader, headers, lambda b: None)
            status, code = arg  # type: ignore[misc]
            self._count("failed")
            self._send_error(client, method, first, status, code)
            if (_header(headers, "connection") or "").lower() == "close":
                raise _Closed("client asked to close")
            return

        with self._lock:
            delay = self._delay
        if not self._sleep(delay):
            raise _Closed("stopping")
        upstream = conn["up"]
        if upstream is None:
            upstream = conn["up"] = self._connect_upstream()
        upstream.sendall(_build_head(first, headers))
        _copy_body(reader, headers, upstream.sendall)
        self._count("forwarded")
        if method == "GET":
            self._count("gets")

        def down(data: bytes) -> None:
            client.sendall(data)
            self._count("bytes_down", len(data))

        up_reader = _Reader(upstream)
        while True:
            rhead = up_reader.read_until(b"\r\n\r\n")
            if rhead is None:
                raise _Closed("server closed")
            rfirst, rheaders = _parse_head(rhead)
            status = int(rfirst.split(" ", 2)[1])
            if 100 <= status < 200 and status != 101:
                continue  # interim response: we already said 100 Continue ourselves
            break
        if kind == "stall":
            self._count("stalled")
            if not self._sleep(float(arg)):  # type: ignore[arg-type]
                raise _Closed("stopping")
        if not self._sleep(delay):
            raise _Closed("stopping")
        down(rhead)
        te = (_header(rheaders, "transfer-encoding") or "").lower()
        length = _header(rheaders, "content-length")
        keep = (_header(rheaders, "connection") or "").lower() != "close"
        if method == "HEAD" or status in (204, 304):
            pass
        elif "chunked" in te:
            up_reader.copy_chunked(down)
        elif length is not None:
            up_reader.copy(int(length), down)
        else:
            up_reader.copy_to_eof(down)
            keep = False
        if up_reader.buf:  # a server must not send ahead of a request: start afresh
            keep = False
        if not keep or (_header(headers, "connection") or "").lower() == "close":
            raise _Closed("connection: close")

    def _send_error(self, client: socket.socket, method: str, first: str, status: int,
                    code: str | None) -> None:
        code = code or _CODES.get(status, f"Error{status}")
        resource = first.split(" ")[1] if " " in first else "/"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by faultproxy</Message>"
            f"<Resource>{resource.split('?', 1)[0]}</Resource>"
            f"<RequestId>faultproxy-{self.requests}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                   ("x-amz-request-id", f"faultproxy-{self.requests}"), ("Connection", "keep-alive")]
        if status in (429, 503):
            headers.append(("Retry-After", "0"))
        client.sendall(_build_head(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", headers)
                       + (b"" if method == "HEAD" else body))

    # -- raw byte relay -------------------------------------------------------------

    def _raw(self, client: socket.socket, reader: _Reader) -> None:
        with self._lock:
            cut = self._cut > 0
            if cut:
                self._cut -= 1
            stall = self._stall.pop(0) if not cut and self._stall else 0.0
        if cut:
            self._count("cut")
            return
        upstream = self._connect_upstream()
        try:
            pending = bytes(reader.buf)
            reader.buf.clear()
            if stall:
                self._count("stalled")
            up = self._spawn(self._pump, "faultproxy-up", client, upstream, pending, 0.0)
            self._pump(upstream, client, b"", stall)
            up.join()  # ends when the client closes, or stop() closes the sockets
        finally:
            self._close(upstream)

    def _pump(self, src: socket.socket, dst: socket.socket, first: bytes, stall: float) -> None:
        """Relay src -> dst, each piece released ``delay`` after it arrived (latency
        without a throughput cap); ``stall`` holds the first piece longer. EOF on src
        becomes a half-close of dst."""
        q: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def writer() -> None:
            held = stall
            try:
                while True:
                    at, data = q.get()
                    if not data:
                        break
                    with self._lock:
                        wait = at + self._delay + held - time.monotonic()
                    held = 0.0
                    if not self._sleep(wait):
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=writer, name="faultproxy-write", daemon=True)
        t.start()
        if first:
            q.put((time.monotonic(), first))
        try:
            while not self._stopping.is_set():
                data = src.recv(RECV)
                if not data:
                    break
                q.put((time.monotonic(), data))
        except OSError:
            pass
        q.put((0.0, b""))
        t.join()
