"""The client of the AZ cache servers: the chain's ``az`` remote tier.

Why it looks the way it does (DESIGN.md: a slower tier is a fallback, never a single
point of failure):

- **Who owns a chunk**: rendezvous hashing of the digest over the server list
  (:mod:`cache.rendezvous`), so every host of a zone asks the same server for the
  same chunk and each server's disk holds a disjoint share of the zone's working set.
  One ``fetch`` sends one batch request per owner (split only past the wire limits),
  all owners at once.
- **Bounded cost of a bad server**: every request has a ``deadline`` (long enough for
  a server to read one batch through from the blob store). A server that refuses,
  resets, answers garbage, refuses our secret, or times out *and* then fails a quick
  ``GET /health`` is marked unhealthy and its chunks are hedged once to the next
  healthy server in rendezvous order; whatever is still missing after that is a miss
  (the chain goes to the blob store). A server that times out but answers /health is
  slow, not dead (reading through from the store): its chunks are misses this time,
  with no mark-down and no hedge, which would only read them through a second time
  (measured: hedging on every slow read-through tripled the cold-start link traffic).
  So ``fetch`` takes at most two deadlines plus the health checks, and returns at once
  when a server is down (connection refused). Unhealthy servers get no traffic until a
  background probe (``GET /health`` every ``probe_interval`` s, a trio system task
  started on demand) succeeds.
- **Compressed on the wire**: servers send each chunk's zstd frame (wire format v2),
  under a third of its bytes; this client decompresses it in a worker thread, as
  the blob tier does with pack ranges.
- **Trust nothing**: every chunk that comes back is decompressed and verified (size
  and blake3) before it is returned; a wrong one is dropped, counted (``corrupt``) and
  logged: a miss. The chain therefore does not hash it again (``verifies``). A frame
  whose status is neither "ok" nor "ok, read through" is a plain miss; "read through"
  frames are counted (``read_through``): the zone's cache is cold for them.
- **Cheap round trips**: persistent keep-alive connections, a small pool per server,
  a minimal HTTP/1.1 client on trio sockets that receives chunk bytes straight into
  their buffers (``recv_into``). A pooled connection the server closed while idle is
  detected on first use and the request is retried once on a fresh connection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import trio

from cache.chunk import LARGE_BUFFER, ChunkRef, CorruptChunk, open_chunk
from cache.rendezvous import Rendezvous
from cache.server_wire import (BATCH_CONTENT_TYPE, BATCH_PATH, FRAME_HEAD, HEALTH_PATH, MAX_BATCH_BYTES,
                               MAX_BATCH_REFS, MAX_CHUNK, ST_READ_THROUGH, DATA_STATUSES, encode_refs, format_address,
                               parse_address)
from cache.stats import Counters, TierStats

log = logging.getLogger(__name__)

MAX_IDLE = 16  # idle keep-alive connections kept per server (as many as may be busy)
MAX_CONNS = 16  # connections per server at once
MAX_REQUEST_BYTES = 32 << 20  # compressed chunk bytes (clen) asked of one server in one request
# A prefetch's batches: what it may have queued on the link ahead of a demand fetch
# (1 MiB: 8 ms at 1 Gbit/s), and still ~8x the transfer time of the AZ tier's ~1 ms latency.
BACKGROUND_BATCH_BYTES = 1 << 20
MAX_HEAD = 16 * 1024
RECV_SIZE = 256 * 1024
HEDGES = 1  # further servers tried after the owner fails
# Long enough for a server to read one batch through from a cloud blob store
# (~200 ms to first byte, plus the transfer); a dead server costs it once.
DEFAULT_DEADLINE_S = 1.0
BUSY_PROBE_S = 0.25  # after a timeout: how long /health gets to show the server is alive


class ServerFailed(Exception):
    """A server did not answer a request usefully (refused, reset, timed out, 5xx, bad framing)."""


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
    failures: int  # requests that failed (including timeouts and 401s)
    timeouts: int
    slow: int  # timeouts of a server that still answered /health: misses, not failures
    unauthorized: int
    corrupt: int  # chunks it returned that did not verify
    hedged: int  # chunks sent to it because their owner had failed


class _Conn:
    """One keep-alive HTTP/1.1 connection to a server."""

    __slots__ = ("stream", "sock", "buf", "reused")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket
        self.buf = bytearray()
        self.reused = False

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[await self.sock.send(view):]
        except OSError as e:
            raise (_Stale if self.reused else ServerFailed)(f"send: {e}") from e

    async def _fill(self) -> None:
        try:
            data = await self.sock.recv(RECV_SIZE)
        except OSError as e:
            raise ServerFailed(f"receive: {e}") from e
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

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: buffered bytes first, then straight from the socket."""
        n = min(len(self.buf), len(view))
        if n:
            view[:n] = self.buf[:n]
            del self.buf[:n]
        pos = n
        while pos < len(view):
            try:
                got = await self.sock.recv_into(view[pos:])
            except OSError as e:
                raise ServerFailed(f"receive: {e}") from e
            if not got:
                raise ServerFailed("connection closed inside a response body")
            pos += got

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

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
        self.requests = self.chunks = self.failures = self.timeouts = self.slow = 0
        self.unauthorized = self.corrupt = self.hedged = 0

    def state(self) -> ServerState:
        return ServerState(self.address, self.healthy, self.reason, self.requests, self.chunks,
                           self.failures, self.timeouts, self.slow, self.unauthorized, self.corrupt, self.hedged)

    def drop_idle(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


class AZCacheTier:
    """A :class:`cache.chain.RemoteTier` over a set of AZ cache servers (name ``az``)."""

    name = "az"
    verifies = True  # see the module docstring: the chain need not hash our chunks again
    # Chunks the servers said they read from the blob store for us (the zone is cold for
    # them): the chain starts a mount's prefetch when this grows.
    read_through = 0

    def __init__(self, servers: list[str], *, secret: str | None = None, deadline: float = DEFAULT_DEADLINE_S,
                 probe_interval: float = 1.0) -> None:
        if deadline <= 0 or probe_interval <= 0:
            raise ValueError("deadline and probe_interval must be positive")
        names = parse_servers(",".join(servers))
        self.deadline = deadline
        self.probe_interval = probe_interval
        self._ring = Rendezvous(names)
        self._servers = {n: _Server(n) for n in names}
        self._auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
        self.counters = Counters(self.name)
        self._token: trio.lowlevel.TrioToken | None = None
        self._prober_running = False

    # ---- public --------------------------------------------------------------------

    @property
    def servers(self) -> list[str]:
        return list(self._ring.servers)

    def owner(self, digest: bytes) -> str:
        """The server that owns ``digest`` while all are healthy."""
        return self._ring.owner(digest)

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        """digest -> verified bytes for the refs the servers had; the rest are left out.
        Never raises (but for cancellation); takes at most ``(1 + HEDGES)`` times the
        deadline plus a health check, per batch.

        ``background`` (a prefetch): each server gets batches of at most
        :data:`BACKGROUND_BATCH_BYTES`, one after another, instead of everything at
        once, so a prefetch never has more than that queued on the link ahead of a
        demand fetch (four prefetches streaming 8 MiB batches can put ~250 ms of queue
        at 1 Gbit/s in front of a demand miss, 250 times the AZ tier's latency). At that
        latency, small batches still keep the link busy."""
        self._bind_run()
        wanted = {r.digest: r for r in refs}
        result: dict[bytes, bytes] = {}
        tried: dict[bytes, set[str]] = {d: set() for d in wanted}
        pending = list(wanted.values())
        try:
            for attempt in range(1 + HEDGES):
                groups: dict[str, list[ChunkRef]] = {}
                for r in pending:
                    s = self._pick(r.digest, tried[r.digest])
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
                                nursery.start_soon(self._ask, self._servers[s], batch, result, failed)
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

    def _pick(self, digest: bytes, tried: set[str]) -> str | None:
        for name in self._ring.rank(digest):
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

    # ---- one request -----------------------------------------------------------------

    async def _ask_in_turn(self, server: _Server, batches: list[list[ChunkRef]], result: dict[bytes, bytes],
                           failed: list[ChunkRef]) -> None:
        """Ask ``server`` for ``batches`` one after another. After a failure the rest go
        where the failed batch went: to the hedge if the server is now marked down,
        else (slow) they are misses this time, like it."""
        for i, batch in enumerate(batches):
            if not await self._ask(server, batch, result, failed):
                if not server.healthy:
                    for rest in batches[i + 1:]:
                        failed.extend(rest)
                return

    async def _ask(self, server: _Server, refs: list[ChunkRef], result: dict[bytes, bytes],
                   failed: list[ChunkRef]) -> bool:
        """One batch request; whether the server answered it (its chunks are in
        ``result``, those that verified). A failed server's refs go to ``failed``."""
        t0 = time.perf_counter()
        server.requests += 1
        frames: list[tuple[bytes, int, memoryview]] | None = None
        reason = ""
        try:
            with trio.move_on_after(self.deadline) as scope:
                frames = await self._batch_request(server, refs)
            if scope.cancelled_caught:
                server.timeouts += 1
                reason = f"no answer within {self.deadline:g}s"
                # Slow is not dead: a server reading a batch through from the blob store
                # takes the store's latency. If it still answers /health at once, these
                # chunks are plain misses (the chain goes to the store) and the server
                # keeps its traffic: no mark-down, and no hedge to another server that
                # would only read the same chunks through again.
                if await self._answers_health(server, BUSY_PROBE_S):
                    server.slow += 1
                    log.debug("az cache %s: %s but alive; %d chunk(s) are misses", server.address, reason,
                              len(refs))
                    return False
        except Unauthorized as e:
            server.unauthorized += 1
            reason = str(e)
        except ServerFailed as e:
            reason = str(e)
        except OSError as e:  # connect refused, unreachable
            reason = e.strerror or str(e)
        if frames is None:
            server.failures += 1
            self.counters.add(errors=1)
            self._mark_down(server, reason)
            failed.extend(refs)
            return False
        by_digest = {r.digest: r for r in refs}
        offered = [(d, data) for d, st, data in frames if st in DATA_STATUSES and d in by_digest]
        self.read_through += sum(1 for d, st, _ in frames if st == ST_READ_THROUGH and d in by_digest)
        nbytes = sum(len(data) for _, data in offered)
        if nbytes >= LARGE_BUFFER // 4:  # compressed: decompressing is ~4x the work
            good, bad = await trio.to_thread.run_sync(_verify_all, by_digest, offered)
        else:
            good, bad = _verify_all(by_digest, offered)
        for d in bad:
            log.warning("az cache %s: %s did not verify (wrong bytes from the server); "
                        "treating it as a miss", server.address, by_digest[d])
        server.corrupt += len(bad)
        server.chunks += len(good)
        if bad:
            self.counters.add(corrupt=len(bad))
        result.update(good)
        # Bytes as they crossed the network (frames), like the blob tier's ranges.
        self.counters.fetch(len(good), sum(len(data) for d, data in offered if d in good), time.perf_counter() - t0)
        return True

    async def _batch_request(self, server: _Server, refs: list[ChunkRef]) -> list[tuple[bytes, int, memoryview]]:
        body = encode_refs(refs)
        head = (f"POST {BATCH_PATH} HTTP/1.1\r\nHost: {server.address}\r\n{self._auth}"
                f"Content-Type: {BATCH_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
        async with server.slots:
            for attempt in range(2):
                conn = await self._connect(server)
                done = False
                try:
                    await conn.send_all(head + body)
                    status, headers = await conn.read_head()
                    length = _content_length(headers)
                    if status != 200:
                        if length <= MAX_HEAD:  # drain a short error body: the connection stays usable
                            await conn.read_exact(length)
                            done = headers.get("connection", "").lower() != "close"
                        if status == 401:
                            raise Unauthorized("refused our secret (401 Unauthorized): give the mount "
                                               "the server's secret (--secret-file / $IMAGEFS_CACHE_SECRET)")
                        raise ServerFailed(f"HTTP {status}")
                    frames = await _read_frames(conn, length, len(refs))
                    done = headers.get("connection", "").lower() != "close"
                    return frames
                except _Stale:
                    if attempt == 0:
                        continue  # the server closed an idle connection: once more, afresh
                    raise
                finally:
                    if done and len(server.idle) < MAX_IDLE:
                        conn.reused = True
                        server.idle.append(conn)
                    else:
                        conn.close()
        raise ServerFailed("unreachable")  # pragma: no cover (the loop returns or raises)

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
        ok = await self._answers_health(server, max(self.deadline, 1.0))
        if ok and not server.healthy:
            server.healthy = True
            log.warning("az cache %s: healthy again", server.address)


def _content_length(headers: dict[str, str]) -> int:
    raw = headers.get("content-length", "")
    if not raw.isdigit():
        raise ServerFailed("response without a Content-Length")
    return int(raw)


async def _read_frames(conn: _Conn, length: int, expected: int) -> list[tuple[bytes, int, memoryview]]:
    """The frames of a batch response body of ``length`` bytes, received whole into one
    buffer and then split: a cold start's chunks are mostly small (~10 KiB frames), and
    two awaits per frame cost more than the bytes."""
    if length > MAX_BATCH_BYTES + expected * FRAME_HEAD.size:
        raise ServerFailed(f"batch response of {length} bytes is over the wire limit")
    body = memoryview(bytearray(length))
    await conn.read_into(body)
    frames: list[tuple[bytes, int, memoryview]] = []
    pos = 0
    while pos < length:
        if length - pos < FRAME_HEAD.size or len(frames) >= expected:
            raise ServerFailed("malformed batch response (framing)")
        digest, status, n = FRAME_HEAD.unpack_from(body, pos)
        pos += FRAME_HEAD.size
        if n > length - pos or n > MAX_CHUNK:
            raise ServerFailed("malformed batch response (frame length)")
        frames.append((digest, status, body[pos:pos + n]))
        pos += n
    return frames


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
