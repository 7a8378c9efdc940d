"""A TCP proxy that makes a local server answer like a remote one.

Why it exists: this kernel has no ``netem``, so ``tc`` can cap bandwidth but cannot add
latency. Latency is what a lazy filesystem lives or dies by (a cloud blob store takes
~200 ms to the first byte of every GET, however small), so the bench puts this proxy
in front of every emulated remote service.

Two kinds of delay, both per connection and protocol-agnostic:

- **time to first byte** (``ttfb_s``): the proxy watches the conversation take turns.
  The first byte the client sends after the server last spoke opens a *request*; the
  first byte of the server's answer is held until ``ttfb_s`` after that request
  opened. Later bytes of the answer flow at link speed. That is the shape of an S3 or
  registry GET on a keep-alive connection: a fixed wait, then the stream. (An HTTP
  ``Expect: 100-continue`` upload is two turns, so it pays twice, as it does there.)
- **one-way delay** (``one_way_s``): every chunk, in each direction, is delivered
  ``one_way_s`` after it arrived, in order, without slowing the stream: a delay line,
  i.e. a network round trip of ``2 * one_way_s`` per exchange. The AZ tier uses this.

Neither models the TCP handshake's own round trip. Bandwidth is not this module's
business: ``tc`` on the veth pair caps it (bench/netem.py).

Counters (connections, requests = client turns, bytes each way) are what the bench
reports as a link's traffic. Run in-process with :class:`ProxyThread`, or as a process
(``python -m bench.delayproxy --listen H:P --target H:P ...``), usually inside a
network namespace, that answers ``stats``/``reset`` on a unix control socket; a unix
socket path lives in the file system, so the host reaches it whatever namespace the
proxy runs in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

CHUNK = 256 * 1024
DELAY_QUEUE = 64  # chunks in flight on a delay line before the reader waits (backpressure)
CONNECT_TIMEOUT = 10.0


@dataclass
class LinkCounters:
    """What crossed the proxy since start or the last reset."""

    connections: int = 0
    requests: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    connect_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class _Conn:
    """Turn-taking state of one proxied connection."""

    __slots__ = ("request_opened", "awaiting_answer")

    def __init__(self) -> None:
        self.request_opened = 0.0
        self.awaiting_answer = False


class DelayProxy:
    """Forward ``listen`` to ``target`` with the delays described in the module doc."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *,
                 ttfb_s: float = 0.0, one_way_s: float = 0.0) -> None:
        if ttfb_s < 0 or one_way_s < 0:
            raise ValueError("delays must be >= 0")
        self.listen = listen
        self.target = target
        self.ttfb_s = ttfb_s
        self.one_way_s = one_way_s
        self.counters = LinkCounters()
        self.port = listen[1]
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def stats(self) -> dict[str, Any]:
        return {**self.counters.snapshot(), "ttfb_ms": self.ttfb_s * 1000, "one_way_ms": self.one_way_s * 1000,
                "target": f"{self.target[0]}:{self.target[1]}"}

    def reset(self) -> None:
        self.counters = LinkCounters()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1],
                                                  reuse_address=True, limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                s_reader, s_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target, limit=CHUNK), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                self.counters.connect_errors += 1
                c_writer.close()
                return
            self.counters.connections += 1
            conn = _Conn()
            up = asyncio.create_task(self._pump(c_reader, s_writer, conn, upstream=True))
            down = asyncio.create_task(self._pump(s_reader, c_writer, conn, upstream=False))
            try:
                await asyncio.gather(up, down)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                for t in (up, down):
                    t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
                for w in (s_writer, c_writer):
                    w.close()
        except asyncio.CancelledError:
            pass  # the proxy is closing; this task is the top of its connection
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                    upstream: bool) -> None:
        """Copy one direction until EOF, applying the turn and one-way delays."""
        line: asyncio.Queue[tuple[float, bytes]] | None = None
        sender: asyncio.Task[None] | None = None
        if self.one_way_s > 0:
            line = asyncio.Queue(DELAY_QUEUE)
            sender = asyncio.create_task(self._delay_line(line, writer))
        try:
            while True:
                data = await reader.read(CHUNK)
                now = time.monotonic()
                if data:
                    if upstream:
                        self.counters.bytes_up += len(data)
                        if not conn.awaiting_answer:
                            conn.awaiting_answer = True
                            conn.request_opened = now
                            self.counters.requests += 1
                    else:
                        self.counters.bytes_down += len(data)
                        if conn.awaiting_answer:
                            conn.awaiting_answer = False
                            wait = conn.request_opened + self.ttfb_s - now
                            if wait > 0:
                                await asyncio.sleep(wait)  # not reading meanwhile: TCP backpressure
                                now = time.monotonic()
                if line is not None:
                    await line.put((now + self.one_way_s, data))
                elif data:
                    writer.write(data)
                    await writer.drain()
                else:
                    _write_eof(writer)
                if not data:
                    break
            if sender is not None:
                await sender
        finally:
            if sender is not None and not sender.done():
                sender.cancel()

    @staticmethod
    async def _delay_line(line: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        while True:
            due, data = await line.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                _write_eof(writer)
                return
            writer.write(data)
            await writer.drain()


def _write_eof(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


class ProxyThread:
    """A :class:`DelayProxy` on its own event loop in a daemon thread (tests, host use)."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="delayproxy", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def body() -> None:
            self._stop = asyncio.Event()
            try:
                await self.proxy.start()
            except BaseException as e:  # reported to start()
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.proxy.close()

        self._loop.run_until_complete(body())
        self._loop.close()

    def start(self, timeout: float = 10.0) -> "ProxyThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("delay proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"delay proxy could not listen on {self.proxy.listen}: {self._error}")
        return self

    @property
    def port(self) -> int:
        return self.proxy.port

    def stop(self, timeout: float = 10.0) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> "ProxyThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- control


def query(control_path: str, command: str = "stats", timeout: float = 5.0) -> dict[str, Any]:
    """Ask a proxy process for its counters (``stats``) or to zero them (``reset``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control_path)
        s.sendall(command.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    return json.loads(buf)


async def _serve_process(proxy: DelayProxy, control: str | None) -> None:
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def on_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cmd = (await reader.readline()).decode().strip()
        if cmd == "reset":
            answer: dict[str, Any] = proxy.stats()
            proxy.reset()
        elif cmd == "stats":
            answer = proxy.stats()
        else:
            answer = {"error": f"unknown command {cmd!r} (stats, reset)"}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
        writer.close()

    ctl = None
    if control:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        ctl = await asyncio.start_unix_server(on_control, control)
    print(f"ready {proxy.port}", flush=True)
    await stop.wait()
    if ctl is not None:
        ctl.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control or "")
    await proxy.close()


def _cli(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.delayproxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to accept on (port 0: any)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="server to forward to")
    p.add_argument("--ttfb-ms", type=float, default=0.0, help="time to first byte of every answer")
    p.add_argument("--one-way-ms", type=float, default=0.0, help="delay of every chunk, each direction")
    p.add_argument("--control", metavar="PATH", help="unix socket answering 'stats' and 'reset'")
    args = p.parse_args(argv)
    proxy = DelayProxy(parse_hostport(args.listen), parse_hostport(args.target),
                       ttfb_s=args.ttfb_ms / 1000, one_way_s=args.one_way_ms / 1000)
    try:
        asyncio.run(_serve_process(proxy, args.control))
    except OSError as e:
        print(f"delayproxy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
