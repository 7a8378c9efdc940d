"""The client of the AZ cache servers: the chain's ``az`` remote tier.

Why it looks the way it does (DESIGN.md: a slower tier is a fallback, never a single
point of failure; issue "fleet burst": a slow server is not a missing one):

- **Who owns a chunk**: rendezvous hashing of the chunk's pack segment
  (:func:`cache.server_wire.owner_key`, 8 MiB of a pack) over the server list
  (:mod:`cache.rendezvous`), so every host of a zone asks the same server for the
  same chunk, each server's disk holds a disjoint share of the zone's working set, and
  neighbours in a pack stay on one server (one ranged store read for a run of them).
  One ``fetch`` sends one batch request per owner (split only past the wire limits),
  all owners at once.
- **Progress, not a deadline, decides whether a server is alive**: a batch is a v3
  stream (:mod:`cache.server_wire`): the server sends each chunk as it has it and,
  while it reads through from the blob store, a progress frame every heartbeat. So a
  request has no deadline as a whole, only a bound on silence (``stall_timeout``) and
  an outer cap (``request_cap``). A server that is busy reading a burst of hosts'
  chunks through keeps them all; before, a whole-batch deadline sent those hosts to
  the blob store for the same chunks while the server was still fetching them (the
  herd: 8 hosts made the store send an image 5.4 times; bench/RESULTS.md "Fleet
  burst"). Only a server that is down or broken (refuses, resets, answers garbage,
  refuses our secret, or goes silent past ``stall_timeout``) is marked unhealthy; its
  chunks are hedged once to the next healthy server in rendezvous order (which every
  host of the zone agrees on, so the zone still reads each chunk through once), and
  what is still missing after that is a miss (the chain goes to the blob store, within
  its budget of direct reads). Chunks that arrived before a stream broke are kept.
  Unhealthy servers get no traffic until a background probe (``GET /health`` every
  ``probe_interval`` s, a trio system task started on demand) succeeds.
- **Demand first**: ``background`` fetches (prefetch, profile replay) are marked as
  such for the server's two classes, go in batches of at most
  :data:`BACKGROUND_BATCH_BYTES` one after another per server, and hold at most
  :data:`MAX_BACKGROUND_CONNS` of a server's connections, so this host's own demand
  fetches never queue behind its prefetch either.
- **Compressed on the wire**: servers send each chunk's zstd frame, under a third of
  its bytes; this client decompresses it (in a worker thread when there is much).
- **Trust nothing**: every chunk that comes back is decompressed and verified (size
  and blake3) before it is returned; a wrong one is dropped, counted (``corrupt``,
  which the chain reports as ``az.corrupt``), logged, and reported to the server
  (``POST /v3/corrupt``), which re-verifies its copy before sending it again: a miss.
  The chain therefore does not hash it again (``verifies``). A frame whose status is
  neither "ok" nor "ok, read through" is a plain miss; "read through" frames are
  counted (``read_through``): the zone's cache is cold for them.
- **Cheap round trips**: persistent keep-alive connections, a small pool per server,
  a minimal HTTP/1.1 client on trio sockets that receives chunk bytes straight into
  their buffers (``recv_into``). A pooled connection the server closed while idle is
  detected on first use and the request is retried once on a fresh connection.
"""

from __future__ import annotations

import logging
import math
import select
import time
from dataclasses import dataclass
from typing import Sequence

import trio

from cache.chunk import LARGE_BUFFER, ChunkRef, CorruptChunk, open_chunk
from cache.rendezvous import Rendezvous
from cache.server_wire import (BACKGROUND, CLASS_HEADER, CORRUPT_PATH, DATA_STATUSES, FRAME_HEAD, HEALTH_PATH,
                               MAX_BATCH_REFS, MAX_CHUNK, MAX_CORRUPT_REPORT, ST_PROGRESS, ST_READ_THROUGH,
                               STREAM_PATH, encode_refs, format_address, owner_key, parse_address)
from cache.stats import Counters, TierStats

log = logging.getLogger(__name__)

MAX_IDLE = 16  # idle keep-alive connections kept per server (as many as may be busy)
MAX_CONNS = 16  # connections per server at once
MAX_BACKGROUND_CONNS = 4  # of which background fetches may hold at most this many
MAX_REQUEST_BYTES = 32 << 20  # compressed chunk bytes (clen) asked of one server in one request
# A prefetch's batches: what it may have queued on the link ahead of a demand fetch
# (1 MiB: 8 ms at 1 Gbit/s), and still ~8x the transfer time of the AZ tier's ~1 ms latency.
BACKGROUND_BATCH_BYTES = 1 << 20
MAX_HEAD = 16 * 1024
MAX_LINE = 1024
MAX_STREAM_CHUNK = MAX_CHUNK + (2 << 20)  # one HTTP chunk of a stream: whole frames, at most one large
RECV_SIZE = 256 * 1024
HEDGES = 1  # further servers tried after the owner fails
# Silence that marks a server broken: it sends a progress frame every 0.25 s while it
# waits for the blob store, so 2 s of nothing is a server that is hung, not busy.
DEFAULT_STALL_S = 2.0
# The outer bound of one request however steadily it progresses (the server gives up
# its own read-through wait after 60 s and answers "unavailable").
DEFAULT_REQUEST_CAP_S = 120.0
REPORT_TIMEOUT_S = 2.0


class ServerFailed(Exception):
    """A server did not answer a request usefully (refused, reset, silent, 5xx, bad framing)."""


class Unauthorized(ServerFailed):
    """A server refused our credentials (401)."""


class _Stale(ServerFailed):
    """A reused connection was closed before the response began (the server's idle close)."""


def parse_servers(spec: str) -> list[str]:
    """``"h1:p1,h2:p2"`` -> ``["h1:p1", "h2:p2"]`` (normalised, duplicates dropped, order
    kept). :class:`ValueError` naming the bad entry otherwise."""
    out: list[str] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        try:
            host, port = parse_address(part)
        except ValueError as e:
            raise ValueError(f"--az-cache: {e}") from None
        if port == 0:
            raise ValueError(f"--az-cache: {part.strip()!r}: port 0 is not a server")
        name = format_address(host, port)
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"--az-cache {spec!r}: no HOST:PORT given")
    return out


def make_az_tier(spec: str, secret: str | None) -> AZCacheTier:
    """The tier for ``--az-cache HOST:PORT[,...]``."""
    return AZCacheTier(parse_servers(spec), secret=secret)


@dataclass(frozen=True, slots=True)
class ServerState:
    """One server as the client sees it, at one instant."""

    address: str
    healthy: bool
    reason: str  # why it was last marked unhealthy ("" if never)
    requests: int
    chunks: int  # chunks it returned that verified
    failures: int  # requests that failed (refused, reset, silent, 401, bad framing)
    stalls: int  # requests given up because the server sent nothing for stall_timeout
    progress: int  # progress frames received (the server was busy reading through for us)
    unauthorized: int
    corrupt: int  # chunks it returned that did not verify
    hedged: int  # chunks sent to it because their owner had failed


class Stalled(ServerFailed):
    """The server sent nothing for the stall bound while a response was due."""


class _Conn:
    """One keep-alive HTTP/1.1 connection to a server.

    ``stall``: while a response is due (not 0), every receive that waits longer than
    this for a byte ends the request (:class:`Stalled`), unless bytes are in fact
    waiting in the socket: then it was this process that was slow (a host whose two
    cores are busy decompressing can leave its event loop unscheduled for seconds),
    not the server, and the wait starts again. Time spent between receives (verifying
    what arrived) never counts against the server."""

    __slots__ = ("stream", "sock", "buf", "reused", "stall", "received")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket
        self.buf = bytearray()
        self.reused = False
        self.stall = 0.0
        self.received = 0  # bytes received in the current response

    async def _recv(self, into: memoryview | None) -> bytes | int:
        """One receive (``recv_into(into)``, or ``recv``), within the stall rule."""
        while True:
            with trio.move_on_after(self.stall or math.inf) as waited:
                try:
                    if into is None:
                        data = await self.sock.recv(RECV_SIZE)
                        self.received += len(data)
                        return data
                    n = await self.sock.recv_into(into)
                    self.received += n
                    return n
                except OSError as e:
                    raise ServerFailed(f"receive: {e}") from e
            if waited.cancelled_caught and not _readable(self.sock):
                raise Stalled(f"no byte for {self.stall:g}s (after {self.received} bytes of the answer)")

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[await self.sock.send(view):]
        except OSError as e:
            raise (_Stale if self.reused else ServerFailed)(f"send: {e}") from e

    async def _fill(self) -> None:
        data = await self._recv(None)
        assert isinstance(data, bytes)
        if not data:
            raise ServerFailed("connection closed by the server")
        self.buf += data

    async def read_head(self) -> tuple[int, dict[str, str]]:
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise ServerFailed("response head too long")
            start = max(0, len(self.buf) - 3)
            try:
                await self._fill()
            except Stalled:
                raise
            except ServerFailed as e:
                if self.reused and not self.buf:
                    raise _Stale(str(e)) from e
                raise
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ServerFailed(f"bad status line {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def read_line(self) -> bytes:
        start = 0
        while True:
            end = self.buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > MAX_LINE:
                raise ServerFailed("malformed chunked response (line too long)")
            start = max(0, len(self.buf) - 1)
            await self._fill()

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: buffered bytes first, then straight from the socket."""
        n = min(len(self.buf), len(view))
        if n:
            view[:n] = self.buf[:n]
            del self.buf[:n]
        pos = n
        while pos < len(view):
            got = await self._recv(view[pos:])
            assert isinstance(got, int)
            if not got:
                raise ServerFailed("connection closed inside a response body")
            pos += got

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_chunk(self) -> memoryview | None:
        """The next HTTP/1.1 chunk of a chunked body; None at its end (trailers skipped)."""
        line = await self.read_line()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ServerFailed(f"malformed chunked response (size {size_text[:20]!r})") from None
        if size == 0:
            while await self.read_line():
                pass
            return None
        if size > MAX_STREAM_CHUNK:
            raise ServerFailed(f"chunk of {size} bytes is over the wire limit")
        body = memoryview(bytearray(size))
        await self.read_into(body)
        if await self.read_exact(2) != b"\r\n":
            raise ServerFailed("malformed chunked response (no CRLF after a chunk)")
        return body

    def close(self) -> None:
        self.sock.close()


class _Server:
    """One cache server: address, health, pool, counters."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.healthy = True
        self.reason = ""
        self.idle: list[_Conn] = []
        self.slots = trio.Semaphore(MAX_CONNS)
        self.background_slots = trio.Semaphore(MAX_BACKGROUND_CONNS)
        self.requests = self.chunks = self.failures = self.stalls = self.progress = 0
        self.unauthorized = self.corrupt = self.hedged = 0

    def state(self) -> ServerState:
        return ServerState(self.address, self.healthy, self.reason, self.requests, self.chunks,
                           self.failures, self.stalls, self.progress, self.unauthorized, self.corrupt, self.hedged)

    def drop_idle(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


class AZCacheTier:
    """A :class:`cache.chain.RemoteTier` over a set of AZ cache servers (name ``az``)."""

    name = "az"
    verifies = True  # see the module docstring: the chain need not hash our chunks again
    bounds_waits = True  # a fetch ends by progress rules of its own: no batch deadline from the chain
    # Chunks the servers said they read from the blob store for us (the zone is cold for
    # them): the chain starts a mount's prefetch when this grows.
    read_through = 0
    # Chunks a server sent that did not verify (dropped; the chain counts them as az.corrupt).
    corrupt = 0

    def __init__(self, servers: list[str], *, secret: str | None = None, stall_timeout: float = DEFAULT_STALL_S,
                 request_cap: float = DEFAULT_REQUEST_CAP_S, probe_interval: float = 1.0) -> None:
        if stall_timeout <= 0 or request_cap <= 0 or probe_interval <= 0:
            raise ValueError("stall_timeout, request_cap and probe_interval must be positive")
        names = parse_servers(",".join(servers))
        self.stall_timeout = stall_timeout
        self.request_cap = request_cap
        self.probe_interval = probe_interval
        self._ring = Rendezvous(names)
        self._servers = {n: _Server(n) for n in names}
        self._auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
        self.counters = Counters(self.name)
        self._token: trio.lowlevel.TrioToken | None = None
        self._prober_running = False
        self._down_since: float | None = None  # monotonic time the last healthy server went down

    # ---- public --------------------------------------------------------------------

    @property
    def servers(self) -> list[str]:
        return list(self._ring.servers)

    def owner(self, ref: ChunkRef) -> str:
        """The server that owns ``ref`` while all are healthy."""
        return self._ring.owner(owner_key(ref))

    def healthy(self) -> bool:
        """Whether any server is taking requests (else every fetch is a miss at once)."""
        return any(s.healthy for s in self._servers.values())

    def unhealthy_for(self) -> float:
        """Seconds since no server has been taking requests (0.0 while one is)."""
        if self._down_since is None or self.healthy():
            return 0.0
        return time.monotonic() - self._down_since

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        """digest -> verified bytes for the refs the servers had; the rest are left out.
        Never raises (but for cancellation). Waits as long as the servers make
        progress (each request within ``request_cap``); a silent server costs
        ``stall_timeout``, a refusing one nothing, and its chunks one hedge.

        ``background`` (a prefetch, a profile replay): each server gets batches of at
        most :data:`BACKGROUND_BATCH_BYTES`, one after another, marked as background for
        the server, instead of everything at once, so a prefetch never has more than
        that queued on the link ahead of a demand fetch (four prefetches streaming 8 MiB
        batches can put ~250 ms of queue at 1 Gbit/s in front of a demand miss, 250
        times the AZ tier's latency). At that latency, small batches still keep the
        link busy."""
        self._bind_run()
        wanted = {r.digest: r for r in refs}
        result: dict[bytes, bytes] = {}
        tried: dict[bytes, set[str]] = {d: set() for d in wanted}
        pending = list(wanted.values())
        try:
            for attempt in range(1 + HEDGES):
                groups: dict[str, list[ChunkRef]] = {}
                for r in pending:
                    s = self._pick(r, tried[r.digest])
                    if s is not None:
                        tried[r.digest].add(s)
                        groups.setdefault(s, []).append(r)
                if not groups:
                    break
                failed: list[ChunkRef] = []
                async with trio.open_nursery() as nursery:
                    for s, group in groups.items():
                        if attempt:
                            self._servers[s].hedged += len(group)
                        if background:
                            nursery.start_soon(self._ask_in_turn, self._servers[s],
                                               _split(group, BACKGROUND_BATCH_BYTES), result, failed)
                        else:
                            for batch in _split(group):
                                nursery.start_soon(self._ask, self._servers[s], batch, result, failed, False)
                pending = failed
        except Exception:  # a bug here must cost a miss, not the mount
            log.exception("az cache: fetch of %d chunk(s) failed", len(wanted))
        missing = len(wanted) - len(result)
        if missing:
            self.counters.add(misses=missing)
        return result

    def stats(self) -> TierStats:
        """A frozen snapshot: requests, hits, misses, bytes, errors, corrupt, latency."""
        return self.counters.snapshot()

    def server_states(self) -> tuple[ServerState, ...]:
        return tuple(s.state() for s in self._servers.values())

    async def probe(self) -> None:
        """Probe every unhealthy server once now (the background loop does this every
        ``probe_interval``)."""
        self._bind_run()
        down = [s for s in self._servers.values() if not s.healthy]
        async with trio.open_nursery() as nursery:
            for s in down:
                nursery.start_soon(self._probe_one, s)

    async def aclose(self) -> None:
        """Close pooled connections."""
        for s in self._servers.values():
            s.drop_idle()

    # ---- routing -------------------------------------------------------------------

    def _pick(self, ref: ChunkRef, tried: set[str]) -> str | None:
        for name in self._ring.rank(owner_key(ref)):
            if name not in tried and self._servers[name].healthy:
                return name
        return None

    def _bind_run(self) -> None:
        """Connections, semaphores and the prober belong to one trio run."""
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:
            self._token = token
            self._prober_running = False
            for s in self._servers.values():
                s.drop_idle()
                s.slots = trio.Semaphore(MAX_CONNS)
                s.background_slots = trio.Semaphore(MAX_BACKGROUND_CONNS)

    # ---- one request -----------------------------------------------------------------

    async def _ask_in_turn(self, server: _Server, batches: list[list[ChunkRef]], result: dict[bytes, bytes],
                           failed: list[ChunkRef]) -> None:
        """Ask ``server`` for background ``batches`` one after another; after a failure
        (the server is then marked down) the rest go where the failed batch went."""
        for i, batch in enumerate(batches):
            if not await self._ask(server, batch, result, failed, True):
                for rest in batches[i + 1:]:
                    failed.extend(rest)
                return

    async def _ask(self, server: _Server, refs: list[ChunkRef], result: dict[bytes, bytes],
                   failed: list[ChunkRef], background: bool) -> bool:
        """One streamed batch request; whether the server answered it whole (its chunks
        that verified are in ``result``). The refs of a failed server that it had not
        answered go to ``failed``, and the server is marked down."""
        t0 = time.perf_counter()
        server.requests += 1
        by_digest = {r.digest: r for r in refs}
        answered: set[bytes] = set()
        got: dict[bytes, bytes] = {}
        nbytes = [0]
        reason = ""
        try:
            await self._stream_request(server, refs, by_digest, background, answered, got, nbytes)
        except Stalled as e:
            server.stalls += 1
            reason = str(e)
        except trio.TooSlowError:
            server.stalls += 1
            reason = f"no whole answer within {self.request_cap:g}s"
        except Unauthorized as e:
            server.unauthorized += 1
            reason = str(e)
        except ServerFailed as e:
            reason = str(e)
        except OSError as e:  # connect refused, unreachable
            reason = e.strerror or str(e)
        result.update(got)
        server.chunks += len(got)
        # Bytes as they crossed the network (frames), like the blob tier's ranges.
        self.counters.fetch(len(got), nbytes[0], time.perf_counter() - t0)
        if reason:
            server.failures += 1
            self.counters.add(errors=1)
            self._mark_down(server, reason)
            failed.extend(r for d, r in by_digest.items() if d not in answered)
            return False
        return True

    async def _stream_request(self, server: _Server, refs: list[ChunkRef], by_digest: dict[bytes, ChunkRef],
                              background: bool, answered: set[bytes], got: dict[bytes, bytes],
                              nbytes: list[int]) -> None:
        body = encode_refs(refs)
        cls = f"{CLASS_HEADER}: {BACKGROUND}\r\n" if background else ""
        head = (f"POST {STREAM_PATH} HTTP/1.1\r\nHost: {server.address}\r\n{self._auth}{cls}"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        now = trio.current_time()
        cap = now + self.request_cap
        with trio.fail_at(cap):
            if background:
                await server.background_slots.acquire()
            try:
                async with server.slots:
                    await self._exchange(server, head + body, by_digest, answered, got, nbytes)
            finally:
                if background:
                    server.background_slots.release()

    async def _exchange(self, server: _Server, request: bytes, by_digest: dict[bytes, ChunkRef],
                        answered: set[bytes], got: dict[bytes, bytes], nbytes: list[int]) -> None:
        for attempt in range(2):
            conn = await self._connect(server)
            done = False
            try:
                conn.stall, conn.received = self.stall_timeout, 0
                await conn.send_all(request)
                status, headers = await conn.read_head()
                if status != 200:
                    length = _content_length(headers)
                    if length <= MAX_HEAD:  # drain a short error body: the connection stays usable
                        await conn.read_exact(length)
                        done = headers.get("connection", "").lower() != "close"
                    if status == 401:
                        raise Unauthorized("refused our secret (401 Unauthorized): give the mount "
                                           "the server's secret (--secret-file / $IMAGEFS_CACHE_SECRET)")
                    if status == 404:
                        raise ServerFailed(f"HTTP 404 for {STREAM_PATH}: the server is older than this "
                                           "client (upgrade the zone's cache servers first)")
                    raise ServerFailed(f"HTTP {status}")
                if "chunked" not in headers.get("transfer-encoding", "").lower():
                    raise ServerFailed("the answer is not a chunked stream")
                await self._read_stream(server, conn, by_digest, answered, got, nbytes)
                done = headers.get("connection", "").lower() != "close"
                return
            except _Stale:
                if attempt == 0:
                    continue  # the server closed an idle connection: once more, afresh
                raise
            finally:
                conn.stall = 0.0
                if done and len(server.idle) < MAX_IDLE:
                    conn.reused = True
                    server.idle.append(conn)
                else:
                    conn.close()

    async def _read_stream(self, server: _Server, conn: _Conn, by_digest: dict[bytes, ChunkRef],
                           answered: set[bytes], got: dict[bytes, bytes], nbytes: list[int]) -> None:
        """Frames as they come, verified a chunk at a time, until the stream ends."""
        while True:
            chunk = await conn.read_chunk()
            if chunk is None:
                return
            offered: list[tuple[bytes, memoryview]] = []
            pos, length = 0, len(chunk)
            while pos < length:
                if length - pos < FRAME_HEAD.size:
                    raise ServerFailed("malformed stream (a frame split across chunks)")
                digest, status, n = FRAME_HEAD.unpack_from(chunk, pos)
                pos += FRAME_HEAD.size
                if n > length - pos or n > MAX_CHUNK:
                    raise ServerFailed("malformed stream (frame length)")
                data = chunk[pos:pos + n]
                pos += n
                if status == ST_PROGRESS:
                    server.progress += 1
                    continue
                if digest not in by_digest or digest in answered:
                    raise ServerFailed("malformed stream (a chunk not asked for, or twice)")
                answered.add(digest)
                if status in DATA_STATUSES:
                    offered.append((digest, data))
                    nbytes[0] += n
                    if status == ST_READ_THROUGH:
                        self.read_through += 1
            if offered:
                await self._accept(server, by_digest, offered, got)

    async def _accept(self, server: _Server, by_digest: dict[bytes, ChunkRef],
                      offered: list[tuple[bytes, memoryview]], got: dict[bytes, bytes]) -> None:
        if sum(len(data) for _, data in offered) >= LARGE_BUFFER // 4:  # compressed: decompressing is ~4x
            good, bad = await trio.to_thread.run_sync(_verify_all, by_digest, offered)
        else:
            good, bad = _verify_all(by_digest, offered)
        got.update(good)
        if bad:
            for d in bad:
                log.warning("az cache %s: %s did not verify (wrong bytes from the server); "
                            "treating it as a miss and asking the server to check its copy",
                            server.address, by_digest[d])
            server.corrupt += len(bad)
            self.corrupt += len(bad)
            self.counters.add(corrupt=len(bad))
            trio.lowlevel.spawn_system_task(self._report_corrupt, server, bad[:MAX_CORRUPT_REPORT],
                                            name="imagefs az-cache corrupt report")

    async def _report_corrupt(self, server: _Server, digests: list[bytes]) -> None:
        """Tell ``server`` its copies of ``digests`` did not verify here (best effort)."""
        body = b"".join(digests)
        with trio.move_on_after(REPORT_TIMEOUT_S):
            try:
                stream = await trio.open_tcp_stream(server.host, server.port)
            except OSError:
                return
            conn = _Conn(stream)
            try:
                await conn.send_all(f"POST {CORRUPT_PATH} HTTP/1.1\r\nHost: {server.address}\r\n{self._auth}"
                                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                                    .encode("latin-1") + body)
                await conn.read_head()
            except Exception as e:  # a report is best effort; a system task must not raise
                log.debug("az cache %s: corrupt report failed: %r", server.address, e)
            finally:
                conn.close()

    async def _connect(self, server: _Server) -> _Conn:
        if server.idle:
            return server.idle.pop()
        stream = await trio.open_tcp_stream(server.host, server.port)
        return _Conn(stream)

    # ---- health ----------------------------------------------------------------------

    def _mark_down(self, server: _Server, reason: str) -> None:
        server.drop_idle()
        if server.healthy:
            server.healthy = False
            server.reason = reason
            if not self.healthy():
                self._down_since = time.monotonic()
            level = logging.ERROR if "401" in reason else logging.WARNING
            log.log(level, "az cache %s: %s; skipping it until GET %s answers", server.address, reason,
                    HEALTH_PATH)
        if not self._prober_running:
            self._prober_running = True
            trio.lowlevel.spawn_system_task(self._probe_loop, name="imagefs az-cache probe")

    async def _probe_loop(self) -> None:
        token = self._token
        try:
            while any(not s.healthy for s in self._servers.values()):
                await trio.sleep(self.probe_interval)
                if self._token is not token:
                    return
                await self.probe()
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("az cache: probe loop failed")
        finally:
            if self._token is token:
                self._prober_running = False

    async def _answers_health(self, server: _Server, timeout: float) -> bool:
        """Whether ``server`` answers ``GET /health`` with 200 within ``timeout``."""
        ok = False
        with trio.move_on_after(timeout):
            try:
                stream = await trio.open_tcp_stream(server.host, server.port)
            except OSError:
                return False
            conn = _Conn(stream)
            try:
                await conn.send_all(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {server.address}\r\n"
                                    f"{self._auth}Connection: close\r\n\r\n".encode("latin-1"))
                status, _ = await conn.read_head()
                ok = status == 200
                if status == 401:
                    server.reason = "refused our secret (401 Unauthorized) on /health"
            except ServerFailed:
                pass
            finally:
                conn.close()
        return ok

    async def _probe_one(self, server: _Server) -> None:
        ok = await self._answers_health(server, max(self.stall_timeout, 1.0))
        if ok and not server.healthy:
            server.healthy = True
            log.warning("az cache %s: healthy again", server.address)


def _readable(sock: trio.socket.SocketType) -> bool:
    """Whether bytes (or an EOF) wait in ``sock`` right now."""
    try:
        return bool(select.select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _content_length(headers: dict[str, str]) -> int:
    raw = headers.get("content-length", "")
    if not raw.isdigit():
        raise ServerFailed("response without a Content-Length")
    return int(raw)


def _verify_all(by_digest: dict[bytes, ChunkRef],
                offered: list[tuple[bytes, memoryview]]) -> tuple[dict[bytes, bytes], list[bytes]]:
    """(maybe a worker thread) Decompress and verify each offered frame: (good chunks
    by digest, uncompressed; digests of the bad ones)."""
    good: dict[bytes, bytes] = {}
    bad: list[bytes] = []
    for d, frame in offered:
        try:
            good[d] = open_chunk(by_digest[d], frame)
        except CorruptChunk:
            bad.append(d)
    return good, bad


def _split(refs: list[ChunkRef], max_bytes: int = MAX_REQUEST_BYTES) -> list[list[ChunkRef]]:
    """Batches within the wire limits and ``max_bytes`` of compressed chunks."""
    out: list[list[ChunkRef]] = [[]]
    size = 0
    for r in refs:
        if out[-1] and (len(out[-1]) >= MAX_BATCH_REFS or size + r.clen > max_bytes):
            out.append([])
            size = 0
        out[-1].append(r)
        size += r.clen
    return out
