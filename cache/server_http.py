"""The cache server's side of HTTP/1.1: one keep-alive connection on a trio socket.

Why not a framework: the server's hot path is "parse a small request, write a frame
header, hand a file to the kernel" and the point is to keep Python out of the bytes.
That needs the raw non-blocking socket (for ``os.sendfile`` and ``MSG_MORE``), which
HTTP libraries hide. So this module does exactly what the server needs of HTTP/1.1
and no more: request heads with ``Content-Length`` bodies (no chunked uploads), read
apart from their bodies so that credentials are checked before a body is read,
keep-alive, ``Expect: 100-continue``, and responses whose length is known up front or
that stream in chunks (:func:`chunked_head`).

Frame headers go out with ``MSG_MORE`` so that the kernel merges them with the file
bytes that follow. (``TCP_CORK`` around a whole response was tried and measured
worse: responses stalled for up to 200 ms, the kernel's cork ceiling.)

``sendfile`` loops on ``EAGAIN`` with :func:`trio.lowlevel.wait_writable`, so a slow
reader costs a parked task, never a thread.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Iterable

import trio

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
RECV_SIZE = 64 * 1024
SEND_SLICE = 4 << 20

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HTTPError(Exception):
    """A request the server answers with ``status`` and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PeerClosed(Exception):
    """The client went away (EOF or a reset) in the middle of a request or response."""


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool
    length: int = 0  # the body's declared size (Content-Length)


class Connection:
    """Buffered reads and zero-copy writes on one accepted socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fd = sock.fileno()

    # ---- reading -----------------------------------------------------------------

    async def _fill(self) -> bool:
        try:
            data = await self.sock.recv(RECV_SIZE)
        except (ConnectionError, OSError):
            return False
        if not data:
            return False
        self._buf += data
        return True

    async def wait_request(self) -> bool:
        """Wait for the first byte of the next request; False on a clean close."""
        if self._buf:
            return True
        return await self._fill()

    async def read_request(self, max_body: int) -> Request:
        """The next request, head and body. :class:`HTTPError` for a malformed one,
        :class:`PeerClosed` if the client leaves half way."""
        req = await self.read_head(max_body)
        await self.read_body(req)
        return req

    async def read_head(self, max_body: int) -> Request:
        """The next request's head (``body`` empty, ``length`` the body's declared size,
        already checked against ``max_body``): the caller decides, e.g. after checking
        credentials, whether the body is worth reading (:meth:`read_body`)."""
        start = 0
        while True:
            end = self._buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(self._buf) > MAX_HEAD:
                raise HTTPError(431, f"request head longer than {MAX_HEAD} bytes")
            start = max(0, len(self._buf) - 3)
            if not await self._fill():
                raise PeerClosed("connection closed inside a request head")
        head = bytes(self._buf[:end])
        del self._buf[:end + 4]
        method, target, version, headers = _parse_head(head)
        if "transfer-encoding" in headers:
            raise HTTPError(501, "chunked request bodies are not supported; send Content-Length")
        length = _content_length(headers)
        if length > max_body:
            raise HTTPError(413, f"request body of {length} bytes exceeds {max_body}")
        conn = headers.get("connection", "").lower()
        keep = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
        return Request(method, target, version, headers, b"", keep, length)

    async def read_body(self, req: Request) -> None:
        """Read ``req``'s body into ``req.body`` (answering ``Expect: 100-continue``)."""
        length = req.length
        if not length:
            return
        if req.headers.get("expect", "").lower() == "100-continue" and len(self._buf) < length:
            await self.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self._buf) < length:
            if not await self._fill():
                raise PeerClosed("connection closed inside a request body")
        req.body = bytes(self._buf[:length])
        del self._buf[:length]

    async def discard_body(self, req: Request) -> None:
        """Read ``req``'s body and throw it away as it comes, holding at most one receive
        buffer: how a body that will not be served (no credentials) is skipped without
        costing memory, leaving the connection usable for the next request."""
        n = req.length
        drop = min(len(self._buf), n)
        del self._buf[:drop]
        n -= drop
        while n > 0:
            try:
                data = await self.sock.recv(min(RECV_SIZE, n))
            except (ConnectionError, OSError):
                data = b""
            if not data:
                raise PeerClosed("connection closed inside a request body")
            n -= len(data)

    # ---- writing -----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview, *, more: bool = False) -> None:
        """Send every byte. ``more``: the caller sends more right after (a frame header
        before its sendfile), so let the kernel put both in one segment (``MSG_MORE``)."""
        view = memoryview(data)
        flags = socket.MSG_MORE if more else 0
        try:
            while view:
                n = await self.sock.send(view[:SEND_SLICE], flags)
                view = view[n:]
        except (ConnectionError, OSError) as e:
            raise PeerClosed(f"send failed: {e}") from e

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Copy ``count`` bytes of file ``fd`` from ``offset`` to the socket, in the kernel."""
        while count > 0:
            try:
                n = os.sendfile(self._fd, fd, offset, count)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except (ConnectionError, OSError) as e:
                raise PeerClosed(f"sendfile failed: {e}") from e
            if n == 0:
                raise PeerClosed("file ended before the bytes it was sized for")
            offset += n
            count -= n

    async def send_head(self, status: int, length: int, *, keep_alive: bool,
                        headers: Iterable[tuple[str, str]] = (), more: bool = False) -> None:
        await self.send_all(response_head(status, length, keep_alive=keep_alive, headers=headers), more=more)

    async def send_response(self, status: int, body: bytes, *, keep_alive: bool,
                            headers: Iterable[tuple[str, str]] = ()) -> None:
        head = response_head(status, len(body), keep_alive=keep_alive, headers=headers)
        await self.send_all(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            await self.send_all(body)

    def close(self) -> None:
        self.sock.close()


def chunked_head(status: int, *, keep_alive: bool, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The head of a response whose body follows in HTTP/1.1 chunks (a stream whose
    length is not known when it starts)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_head(status: int, length: int, *, keep_alive: bool,
                  headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # latin-1 decodes anything; kept for clarity
        raise HTTPError(400, "undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HTTPError(400, f"bad request line {lines[0][:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(505, f"unsupported version {version[:20]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise HTTPError(400, "folded header lines are not allowed")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(400, f"bad header line {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        if key == "content-length" and key in headers and headers[key] != value:
            raise HTTPError(400, "conflicting Content-Length headers")
        headers[key] = value
    return method, target, version, headers


def _content_length(headers: dict[str, str]) -> int:
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit():
        raise HTTPError(400, f"bad Content-Length {raw[:40]!r}")
    return int(raw)
