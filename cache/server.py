"""The AZ cache server: verified chunks for every host of a zone, from one disk cache.

A zone's hosts start the same images at the same time. Without this tier each host
pays ~200 ms blob-store round trips for the same chunks; with it, the first host's
miss fills a server's disk and every other host reads the chunk at ~1 ms, and the
blob store sends each chunk once per zone however many hosts start at once. The
server is a fallback, never a point of failure (a host skips a server that is down or
broken), so it is built to be simple and fast rather than clever:

- **Wire format**: HTTP/1.1 with keep-alive; a request names whole chunk refs (digest,
  pack, offset, clen, ulen) so the server can read through on a miss; a batch asks for
  many neighbouring chunks in one round trip. The format is defined and documented in
  :mod:`cache.server_wire`; in short::

      POST /v3/chunks  body: (digest[32] offset:u64 clen:u32 ulen:u32 plen:u16 pack)*
                       -> 200 chunked: (digest[32] status:u8 length:u32 frame)* as they resolve
      POST /v2/chunks  (same body) -> 200 + the frames in request order (older clients)
      GET  /v2/chunk/<hex>?pack=K&offset=N&clen=N&ulen=N  -> 200 + zstd frame | 404/502/503
      GET  /v3/blob/indexes/<hex>  -> 200 + an image index, verified (:mod:`cache.zoneblobs`)

- **A slow server is not a missing one**: a v3 answer streams each chunk as the
  server has it (its disk cache first, read-throughs as the blob store delivers them)
  and, while it waits for the store, a progress frame every ``heartbeat`` seconds. A
  client therefore judges a server by progress, not by one deadline for a whole batch:
  a server reading through for a burst of hosts keeps them, and only one that is down
  or sends nothing sends them to the store. (With a batch deadline, hosts gave up on
  a server that was busy reading their prefetch through and fetched the same chunks
  from the store themselves: 4 hosts at once made the store send the image 1.9-2.3
  times, 8 hosts 5.4 times; bench/RESULTS.md "Fleet burst".)
- **Two classes, demand first**: a request marked ``X-Imagefs-Class: background`` (a
  prefetch, a profile replay) is served after demand requests: blob-store reads and
  disk threads are :class:`~cache.classlimit.ClassLimiter` slots of which background
  work holds at most a share, so one host's background fetching never makes another
  host's blocked reader wait for a background read. A demand request that joins a
  read a background request started promotes it to demand.
- **Single flight, across hosts and classes**: misses are registered as in flight
  before the first await; concurrent requests for the same digest, on any
  connection, wait for that one fetch. The misses of one batch that sit back to back
  in a pack become one ranged read. Fetches run in the server's own nursery, so a
  client that disconnects does not cancel a fetch others wait on. A fetched chunk
  stays in flight (served from memory) until its cache file is written.
- **Read-ahead**: a read-through also reads the chunks that follow it in the pack (from
  its table of contents), up to ``max_range`` bytes a read for background work, so a
  prefetch asking in small batches from a cold zone pays one store round trip per
  range, not per batch (the first host of a zone started in 3.8 s instead of 7.3 s),
  and :data:`DEMAND_READ_AHEAD` for demand (a blocked reader waits for the whole read:
  2 MiB is ~17 ms at 1 Gbit/s; with it, a 16-host burst made as many store GETs as one
  host, 48 against 46, where demand reads without it made 56 against 38).
- **Read-through only for what exists**: a ref is read from the store only if the
  pack's table of contents (:mod:`cache.packtoc`, loaded once per pack) lists that
  digest at that offset with those sizes, or, for a store without tables of contents,
  if the range lies inside the pack. While a pack's table is loading, one ranged read
  of it may run alongside (so the first host of a zone pays one round trip, not two),
  and its chunks are served only once the table confirms them. Failures are remembered
  per ref (``failure_ttl``; a store outage for ``unavailable_ttl``), so made-up refs
  cost the store at most one look each. (Without this, 1,024 made-up refs of 256 KiB
  made a server read 512 MiB from the store.)
- **Chunks stay compressed**: the server keeps and sends each chunk's zstd frame, as
  the packs store it: a zone's links and the server's disk carry under a third of the
  bytes (the torch image: 0.30x).
- **Disk cache**: an :class:`~cache.ssd.SSDTier` in frame form on ``--dir`` bounded by
  ``--max-size`` (compressed bytes; LRU in LMDB), so it survives restarts and evicts.
- **Zero copy for hits**: a hit is ``open`` + ``fstat`` + ``os.sendfile``; Python never
  touches the bytes. Bytes just fetched from the blob store are sent from memory.
- **Verified before served and cached**: blob-store reads are decompressed and
  verified (:class:`~cache.blobtier.BlobTier`) before they are cached or sent. A
  cache file is verified the first time this process serves it and again every
  ``reverify_after`` seconds (an hour); in between it is sent as long as its inode,
  size, mtime *and ctime* are those that were verified (a write in place changes the
  ctime even when the mtime is put back), and at once when a client reports that it
  did not verify (``POST /v3/corrupt``). Fills skip ``fsync``: a file torn by a crash
  is caught at its first verification, dropped and fetched again, never served.
- **Holding under abuse**: credentials are checked on the request head, before any
  body is read; near ``max_connections``, idle keep-alive connections are closed
  after ``busy_idle_timeout`` instead of ``idle_timeout``; each client address may hold
  at most ``max_client_connections``; the CLI refuses to listen beyond loopback
  without ``--secret-file`` or an explicit ``--insecure``.
- **Auth**: with a secret, every endpoint but ``/health`` needs
  ``Authorization: Bearer <secret>`` (constant-time compare) and answers 401
  otherwise; ``/health`` answers 401 only to a request that sends a *wrong* secret,
  so a load balancer can probe it while a client's probe also checks its secret.
- **Shutdown**: :meth:`CacheServer.shutdown` (SIGTERM/SIGINT) stops accepting, closes
  idle keep-alive connections, lets requests in progress finish within ``grace``
  seconds, then cancels the rest and closes the cache.
"""

from __future__ import annotations

import bisect
import errno
import hmac
import logging
import math
import os
import resource
import signal
import socket
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import trio

from cache.blobstore import BlobNotFound, BlobStore, BlobStoreError
from cache.blobtier import DEFAULT_MAX_RANGE, BlobTier
from cache.chunk import ChunkRef, CorruptChunk
from cache.classlimit import ClassLimiter, Ticket
from cache.packtoc import TocEntries, decode_toc_entries, toc_key_of_pack
from cache.server_http import Connection, HTTPError, PeerClosed, Request, chunked_head, response_head
from cache.server_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cache.server_metrics import ServerMetrics
from cache.server_wire import (BACKGROUND, BATCH_CONTENT_TYPE, BATCH_PATH, CHUNK_PATH, CLASS_HEADER, CORRUPT_PATH,
                               FRAME_HEAD, HEALTH_PATH, HTTP_STATUS, MAX_BATCH_REFS, MAX_CORRUPT_REPORT,
                               MAX_PACK_KEY, METRICS_PATH, OWNER_SEGMENT, PROGRESS_DIGEST, REF_HEAD, ST_CORRUPT,
                               ST_NOT_FOUND, ST_OK, ST_PROGRESS, ST_READ_THROUGH, ST_UNAVAILABLE, STATUS_NAMES,
                               STREAM_CONTENT_TYPE, STREAM_PATH, BatchTooLarge, WireError, decode_refs,
                               parse_chunk_query)
from cache.ssd import SSDTier
from cache.zoneblobs import BLOB_PATH, BlobCache, ShortLived, blob_digest, short_lived_owner_key

log = logging.getLogger(__name__)

MAX_BODY = MAX_BATCH_REFS * (REF_HEAD.size + MAX_PACK_KEY)
SMALL_WRITE = 64 * 1024  # pieces below this are copied into the response buffer, not sent alone
SEND_BATCH = 1 << 20  # the response buffer is sent whenever it holds this much
TOC_LOADS = 4  # tables of contents loaded at once
DEMAND_READ_AHEAD = 2 << 20  # bytes a demand read-through spans with what follows it
PROGRESS_FRAME = FRAME_HEAD.pack(PROGRESS_DIGEST, ST_PROGRESS, 0)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Knobs of a :class:`CacheServer` (the CLI sets the secret and the concurrency
    toward the store; the rest have defaults that suit a server with a few cores)."""

    secret: bytes | None = None
    grace: float = 10.0  # seconds in-flight requests get at shutdown
    idle_timeout: float = 120.0  # keep-alive connections idle this long are closed
    busy_idle_timeout: float = 2.0  # ... and this long, once the server is near max_connections
    busy_fraction: float = 0.75  # "near": this share of max_connections open
    request_timeout: float = 30.0  # a request must arrive whole within this (no slow drip)
    blob_concurrency: int = 16  # ranged blob reads at once (read-through toward the store)
    blob_background: int = 12  # of which background requests may hold at most this many
    disk_concurrency: int = 8  # disk-cache reads/fills at once
    disk_background: int = 6  # of which background work may hold at most this many
    max_range: int = DEFAULT_MAX_RANGE  # bytes in one ranged blob read
    reverify_after: float = 3600.0  # seconds a verified cache file is sent without rehashing
    touch_interval: float = 2.0  # seconds between writes of the LRU positions of files sent
    verified_cap: int = 1 << 18  # cache files remembered as verified
    max_connections: int = 4096
    max_client_connections: int = 256  # per client address
    heartbeat: float = 0.25  # a v3 stream waiting for the store sends progress this often
    read_through_timeout: float = 60.0  # a request waits this long for read-throughs, then says unavailable
    failure_ttl: float = 60.0  # a ref the store lacks (or holds corrupt) is not asked again for this long
    unavailable_ttl: float = 2.0  # ... and one the store failed to deliver
    failure_cap: int = 1 << 16  # refs remembered as failed
    pack_cap: int = 1 << 14  # packs whose table of contents (or size) is remembered

    def __post_init__(self) -> None:
        if not 0 < self.blob_background <= self.blob_concurrency:
            raise ValueError(f"blob_background must be in 1..blob_concurrency ({self.blob_concurrency})")
        if not 0 < self.disk_background <= self.disk_concurrency:
            raise ValueError(f"disk_background must be in 1..disk_concurrency ({self.disk_concurrency})")


class _Flight:
    """One blob fetch of one digest that requests wait on."""

    __slots__ = ("digest", "done", "data", "status", "demand", "ticket", "waiters")

    def __init__(self, digest: bytes, demand: bool) -> None:
        self.digest = digest
        self.done = trio.Event()
        self.data: bytes | None = None
        self.status = ST_UNAVAILABLE
        self.demand = demand  # some request waiting on it is a demand request
        self.ticket: Ticket | None = None  # the blob-store slot claim of the read that brings it
        self.waiters: list[trio.MemorySendChannel[bytes]] = []

    def settle(self, data: bytes | None, status: int) -> None:
        self.data, self.status = data, status
        self.done.set()
        for w in self.waiters:
            try:
                w.send_nowait(self.digest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # that request has gone
        self.waiters.clear()


class _File:
    """A verified cache file, open, to be sent with sendfile."""

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size


# What a chunk request resolves to: an open file, bytes in memory, or an error status.
_Piece = _File | bytes | int


def _close_pieces(pieces: dict[bytes, _Piece]) -> None:
    for p in pieces.values():
        if isinstance(p, _File):
            os.close(p.fd)


def _piece_len(p: _Piece) -> int:
    return p.size if isinstance(p, _File) else len(p) if isinstance(p, bytes) else 0


class _Pending:
    """One request's chunks: those resolved at once, and the flights it waits on."""

    __slots__ = ("pieces", "waits", "missed", "send", "recv")

    def __init__(self) -> None:
        self.pieces: dict[bytes, _Piece] = {}
        self.waits: dict[bytes, _Flight] = {}
        self.missed: set[bytes] = set()  # digests read through from the store for this request
        self.send, self.recv = trio.open_memory_channel[bytes](math.inf)

    def close(self) -> None:
        _close_pieces(self.pieces)
        self.pieces.clear()
        self.send.close()
        self.recv.close()


class _Pack:
    """What the server knows of one pack: its table of contents, or its size."""

    __slots__ = ("loaded", "status", "toc", "order", "offsets", "size", "until", "speculating")

    def __init__(self) -> None:
        self.loaded = trio.Event()
        self.status = ST_UNAVAILABLE  # ST_OK once toc or size is known, ST_NOT_FOUND: no such pack
        self.toc: TocEntries | None = None
        self.order: list[tuple[int, bytes, int, int]] = []  # the toc by offset: (offset, digest, clen, ulen)
        self.offsets: list[int] = []
        self.size = 0
        self.until = math.inf  # monotonic time this knowledge expires (failures only)
        self.speculating = False  # a ranged read runs while the table loads

    def check(self, r: ChunkRef) -> int | None:
        """None if ``r`` may be read from this pack, else the status to answer."""
        if self.status != ST_OK:
            return self.status
        if self.toc is not None:
            return None if self.toc.get(r.digest) == (r.offset, r.clen, r.ulen) else ST_NOT_FOUND
        return None if r.offset + r.clen <= self.size else ST_NOT_FOUND


class _ChunkedOut:
    """The body of a v3 answer: frames gathered into HTTP chunks, each holding whole
    frames (small ones copied together, files sent with sendfile)."""

    __slots__ = ("conn", "server", "raw", "frames")

    def __init__(self, conn: Connection, server: CacheServer) -> None:
        self.conn = conn
        self.server = server
        self.raw = bytearray()  # bytes ready to go out (chunk framing included)
        self.frames = bytearray()  # frames of the chunk being gathered

    def add(self, head: bytes, data: bytes = b"") -> None:
        self.frames += head
        self.frames += data
        self.server.metrics.bytes_served += len(data)

    async def add_piece(self, digest: bytes, status: int, piece: _Piece) -> None:
        n = _piece_len(piece)
        head = FRAME_HEAD.pack(digest, status, n)
        if isinstance(piece, int):
            self.add(head)
        elif isinstance(piece, bytes) and n < SMALL_WRITE:
            self.add(head, piece)
        else:
            self._close_chunk()
            self.raw += b"%x\r\n" % (len(head) + n)
            self.raw += head
            await self.conn.send_all(self.raw, more=True)
            self.raw.clear()
            await self.server._send_piece(self.conn, piece)
            self.raw += b"\r\n"
        if len(self.frames) >= SEND_BATCH:
            await self.flush()

    def _close_chunk(self) -> None:
        if self.frames:
            self.raw += b"%x\r\n" % len(self.frames)
            self.raw += self.frames
            self.raw += b"\r\n"
            self.frames.clear()

    async def flush(self) -> None:
        self._close_chunk()
        if self.raw:
            await self.conn.send_all(self.raw)
            self.raw.clear()

    async def end(self) -> None:
        self._close_chunk()
        self.raw += b"0\r\n\r\n"
        await self.flush()


class CacheServer:
    """Serves verified chunks from ``ssd``, reading through to ``store`` on misses."""

    def __init__(self, store: BlobStore, ssd: SSDTier, options: ServerOptions = ServerOptions()) -> None:
        if not ssd.frames:
            raise ValueError(f"{ssd.directory}: a cache server keeps chunk frames: open it with frames=True")
        self.opts = options
        self.blob = BlobTier(store, options.max_range)
        self.ssd = ssd
        self.metrics = ServerMetrics()
        self._secret = options.secret
        self._flights: dict[bytes, _Flight] = {}
        # digest -> (inode, mtime_ns, ctime_ns, size, verified until [monotonic])
        self._verified: OrderedDict[bytes, tuple[int, int, int, int, float]] = OrderedDict()
        self._touched: set[bytes] = set()  # sent from a verified file since the last LRU write
        self._failures: OrderedDict[ChunkRef, tuple[int, float]] = OrderedDict()  # ref -> (status, until)
        self._packs: OrderedDict[str, _Pack] = OrderedDict()
        self._blobs = BlobCache(os.path.join(ssd.directory, "blobs"), store)
        self._blob_flights: dict[str, _Flight] = {}
        self._blob_failures: OrderedDict[str, float] = OrderedDict()  # key -> until [monotonic]
        self._short = ShortLived()  # startup profiles, for a few seconds (cache.zoneblobs)
        self._blob_slots = ClassLimiter(options.blob_concurrency, options.blob_background)
        self._blob_threads = trio.CapacityLimiter(options.blob_concurrency + TOC_LOADS)
        self._toc_limiter = trio.CapacityLimiter(TOC_LOADS)
        self._disk_slots = ClassLimiter(options.disk_concurrency, options.disk_background)
        self._disk_threads = trio.CapacityLimiter(options.disk_concurrency)
        self._conn_slots = trio.Semaphore(options.max_connections)
        self._high_water = max(1, int(options.max_connections * options.busy_fraction))
        self._per_client: dict[str, int] = {}
        self._last_shed = -math.inf
        self._stop = trio.Event()
        self._draining = False
        self._idle: dict[trio.CancelScope, float] = {}  # idle connection -> trio time it went idle
        self._active = 0
        self._quiet = trio.Event()
        self._bg: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None

    # ---- lifecycle ---------------------------------------------------------------

    async def serve(self, listeners: Sequence[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer until :meth:`shutdown`, then drain (bounded) and return."""
        async with trio.open_nursery() as bg:
            self._bg = bg
            bg.start_soon(self._touch_loop)
            async with trio.open_nursery() as conns:
                self._conns = conns
                for listener in listeners:
                    conns.start_soon(self._accept_loop, listener, conns)
                task_status.started()
                await self._stop.wait()
                for listener in listeners:
                    await listener.aclose()  # accept loops end with ClosedResourceError
                await self._drain()
                conns.cancel_scope.cancel()
            bg.cancel_scope.cancel()  # fetches nobody waits for any more (fills finish their thread)
        self._bg = None

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    async def _drain(self) -> None:
        self._draining = True
        for scope in list(self._idle):
            scope.cancel()
        if self._active:
            with trio.move_on_after(self.opts.grace):
                await self._quiet.wait()
            if self._active:
                log.warning("shutdown: %d request(s) still running after %.1fs; cancelling them",
                            self._active, self.opts.grace)

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        """Accept every connection that waits, each time the listener is readable.

        Why not ``listener.accept()`` in a loop: it yields to the scheduler after every
        connection, so under load (the event loop's turns long with a burst of hosts'
        chunks) the server took one connection per turn and left ~90 waiting in the
        backlog for seconds, while their clients counted the silence against it."""
        raw = socket.socket(fileno=os.dup(listener.socket.fileno()))  # the same listening socket
        raw.setblocking(False)
        try:
            while True:
                if self.metrics.connections >= self._high_water:
                    self._shed_idle()
                await self._conn_slots.acquire()
                try:
                    await trio.lowlevel.wait_readable(listener.socket)
                except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                    self._conn_slots.release()
                    return
                have_slot = True
                while have_slot:
                    try:
                        sock, _ = raw.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("accept: %s; pausing 100 ms", os.strerror(e.errno or 0))
                            self._conn_slots.release()
                            have_slot = False
                            await trio.sleep(0.1)
                            break
                        raise
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                    if self._admit(stream):
                        try:
                            self._conn_slots.acquire_nowait()
                        except trio.WouldBlock:
                            have_slot = False
                if have_slot:
                    self._conn_slots.release()
        finally:
            raw.close()

    def _admit(self, stream: trio.SocketStream) -> bool:
        """Start serving ``stream`` with the slot its accept holds (True), or close it
        at once if its client holds its share of connections already (False: the slot
        stays for the next)."""
        client = _peer_address(stream)
        if self._per_client.get(client, 0) >= self.opts.max_client_connections:
            self.metrics.refused_connections += 1
            if self.metrics.refused_connections & (self.metrics.refused_connections - 1) == 0:
                log.warning("%s holds %d connections already (the most one client may): refusing more "
                            "(%d refused so far)", client, self.opts.max_client_connections,
                            self.metrics.refused_connections)
            stream.socket.close()
            return False
        assert self._conns is not None
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._conns.start_soon(self._connection, stream, client)
        return True

    def _idle_timeout(self) -> float:
        if self.metrics.connections >= self._high_water:
            return self.opts.busy_idle_timeout
        return self.opts.idle_timeout

    def _shed_idle(self) -> None:
        """Near the connection limit: idle connections get ``busy_idle_timeout`` (at most
        once per half that interval, so a flood of connections costs no quadratic work)."""
        now = trio.current_time()
        if now - self._last_shed < self.opts.busy_idle_timeout / 2:
            return
        self._last_shed = now
        for scope, since in self._idle.items():
            scope.deadline = min(scope.deadline, since + self.opts.busy_idle_timeout)

    # ---- connections -------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream, client: str) -> None:
        conn = Connection(stream.socket)
        self.metrics.connections += 1
        try:
            while not self._draining:
                now = trio.current_time()
                with trio.CancelScope(deadline=now + self._idle_timeout()) as idle:
                    self._idle[idle] = now
                    try:
                        ready = await conn.wait_request()
                    finally:
                        self._idle.pop(idle, None)
                if idle.cancelled_caught:
                    if not self._draining:
                        self.metrics.idle_closed += 1
                    break
                if not ready:
                    break
                self._active += 1
                try:
                    keep = await self._one_request(conn)
                finally:
                    self._active -= 1
                    if self._draining and not self._active:
                        self._quiet.set()
                if not keep:
                    break
        except PeerClosed:
            pass
        except Exception:  # one bad connection must never take the server down
            log.exception("connection handler failed")
        finally:
            self.metrics.connections -= 1
            n = self._per_client.get(client, 1) - 1
            if n > 0:
                self._per_client[client] = n
            else:
                self._per_client.pop(client, None)
            conn.close()
            self._conn_slots.release()

    def _keep(self, req: Request) -> bool:
        return req.keep_alive and not self._draining

    async def _one_request(self, conn: Connection) -> bool:
        deadline = trio.current_time() + self.opts.request_timeout
        try:
            with trio.fail_at(deadline):
                req = await conn.read_head(MAX_BODY)
        except trio.TooSlowError:
            self.metrics.bad_requests += 1
            await conn.send_response(408, b"request not received in time\n", keep_alive=False)
            return False
        except HTTPError as e:
            self.metrics.bad_requests += 1
            await conn.send_response(e.status, f"{e}\n".encode(), keep_alive=False)
            return False
        path = req.target.partition("?")[0]
        if path == HEALTH_PATH:
            if not await self._body(conn, req, deadline):
                return False
            return await self._health(conn, req)
        routes: dict[str, tuple[tuple[str, ...], Callable[[Connection, Request], Any]]] = {
            STREAM_PATH: (("POST",), self._stream), BATCH_PATH: (("POST",), self._batch),
            CORRUPT_PATH: (("POST",), self._corrupt_report), METRICS_PATH: (("GET",), self._metrics),
        }
        route = routes.get(path) or ((("GET",), self._single) if path.startswith(CHUNK_PATH) else
                                     (("GET",), self._blob) if path.startswith(BLOB_PATH) else None)
        if route is None:
            if not await self._body(conn, req, deadline):
                return False
            await conn.send_response(404, b"no such endpoint\n", keep_alive=self._keep(req))
            return self._keep(req)
        methods, handler = route
        # Credentials before the body: a body that will not be served is skipped as it
        # comes, never held in memory.
        if not await self._check(conn, req, methods, deadline):
            return self._keep(req)
        if not await self._body(conn, req, deadline):
            return False
        await handler(conn, req)
        return self._keep(req)

    async def _body(self, conn: Connection, req: Request, deadline: float) -> bool:
        """Read ``req``'s body within the request deadline; False (answered) if it does not come."""
        try:
            with trio.fail_at(deadline):
                await conn.read_body(req)
        except trio.TooSlowError:
            self.metrics.bad_requests += 1
            await conn.send_response(408, b"request not received in time\n", keep_alive=False)
            return False
        return True

    def _authorized(self, req: Request) -> bool:
        if self._secret is None:
            return True
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._secret)

    async def _check(self, conn: Connection, req: Request, methods: tuple[str, ...], deadline: float) -> bool:
        """Method and credentials; when they are wrong, answers at once and then skips
        the request's body as it comes (:meth:`Connection.discard_body`: no memory; the
        request deadline holds), so the connection stays usable. A client that waits
        for ``100 Continue`` sends no body: its connection is closed instead."""
        if req.method in methods and self._authorized(req):
            return True
        expect = req.headers.get("expect", "").lower() == "100-continue"
        keep = self._keep(req) and not (req.length and expect)
        if req.method not in methods:
            await conn.send_response(405, b"method not allowed\n", keep_alive=keep,
                                     headers=[("Allow", ", ".join(methods))])
        else:
            self.metrics.unauthorized += 1
            await conn.send_response(401, b"missing or wrong bearer secret\n", keep_alive=keep,
                                     headers=[("WWW-Authenticate", 'Bearer realm="imagefs-cache"')])
        if req.length and keep:
            try:
                with trio.fail_at(deadline):
                    await conn.discard_body(req)
            except trio.TooSlowError:
                keep = False
        req.keep_alive = keep
        return False

    async def _health(self, conn: Connection, req: Request) -> bool:
        if req.method != "GET":
            await conn.send_response(405, b"method not allowed\n", keep_alive=self._keep(req),
                                     headers=[("Allow", "GET")])
        elif "authorization" in req.headers and not self._authorized(req):
            self.metrics.unauthorized += 1
            await conn.send_response(401, b"wrong bearer secret\n", keep_alive=self._keep(req))
        elif self._draining:
            await conn.send_response(503, b"shutting down\n", keep_alive=False)
            return False
        else:
            await conn.send_response(200, b"ok\n", keep_alive=self._keep(req))
        return self._keep(req)

    async def _metrics(self, conn: Connection, req: Request) -> None:
        body = self.render_metrics().encode()
        await conn.send_response(200, body, keep_alive=self._keep(req),
                                 headers=[("Content-Type", METRICS_CONTENT_TYPE)])

    async def _corrupt_report(self, conn: Connection, req: Request) -> None:
        """A client says frames we sent did not verify: re-verify those files before
        they are sent again (the next request reads and hashes them)."""
        body = req.body
        if len(body) % 32 or len(body) // 32 > MAX_CORRUPT_REPORT:
            self.metrics.bad_requests += 1
            await conn.send_response(400, f"expected up to {MAX_CORRUPT_REPORT} digests of 32 bytes\n".encode(),
                                     keep_alive=self._keep(req))
            return
        for i in range(0, len(body), 32):
            if self._verified.pop(body[i:i + 32], None) is not None:
                self.metrics.reverified_on_report += 1
        self.metrics.corrupt_reports += len(body) // 32
        await conn.send_response(204, b"", keep_alive=self._keep(req))

    async def _blob(self, conn: Connection, req: Request) -> None:
        """A content-addressed blob (an image index), read through once for the zone."""
        key = urllib.parse.unquote(req.target[len(BLOB_PATH):].partition("?")[0])
        if short_lived_owner_key(key) is not None:
            await self._short_lived(conn, req, key)
            return
        if blob_digest(key) is None:
            self.metrics.bad_requests += 1
            await conn.send_response(400, b"not a content-addressed key (indexes/<64 hex>)\n",
                                     keep_alive=self._keep(req))
            return
        self.metrics.blob_requests += 1
        data = self._blobs.cached(key)
        status = ST_OK
        if data is None:
            failed = self._blob_failures.get(key)
            if failed is not None and time.monotonic() < failed:
                status = ST_NOT_FOUND
            else:
                flight = self._blob_flights.get(key)
                if flight is None:
                    flight = self._blob_flights[key] = _Flight(key.encode(), True)
                    assert self._bg is not None
                    self._bg.start_soon(self._load_blob, key, flight)
                with trio.move_on_after(self.opts.read_through_timeout):
                    await flight.done.wait()
                data, status = flight.data, flight.status
        if data is None:
            await conn.send_response(HTTP_STATUS[status], f"{STATUS_NAMES[status]}\n".encode(),
                                     keep_alive=self._keep(req))
            return
        await conn.send_head(200, len(data), keep_alive=self._keep(req),
                             headers=[("Content-Type", "application/octet-stream")], more=True)
        await conn.send_all(data)
        self.metrics.bytes_served += len(data)

    async def _short_lived(self, conn: Connection, req: Request, key: str) -> None:
        """A startup profile: the store's copy of a few seconds ago (cache.zoneblobs)."""
        self.metrics.blob_requests += 1
        found, data = self._short.get(key, time.monotonic())
        status = ST_OK if data is not None else ST_NOT_FOUND
        if not found:
            flight = self._blob_flights.get(key)
            if flight is None:
                flight = self._blob_flights[key] = _Flight(key.encode(), True)
                assert self._bg is not None
                self._bg.start_soon(self._load_short_lived, key, flight)
            with trio.move_on_after(self.opts.read_through_timeout):
                await flight.done.wait()
            data, status = flight.data, flight.status
        if data is None:
            await conn.send_response(HTTP_STATUS[status], f"{STATUS_NAMES[status]}\n".encode(),
                                     keep_alive=self._keep(req))
            return
        await conn.send_head(200, len(data), keep_alive=self._keep(req),
                             headers=[("Content-Type", "application/octet-stream")], more=True)
        await conn.send_all(data)
        self.metrics.bytes_served += len(data)

    async def _load_short_lived(self, key: str, flight: _Flight) -> None:
        """(server nursery) Read a short-lived key through from the store, once per TTL."""
        data: bytes | None = None
        status = ST_UNAVAILABLE
        try:
            async with self._blob_slots.slot(Ticket(True)):
                self.metrics.blob_fetches += 1
                data = await trio.to_thread.run_sync(self._blobs.store.get, key, limiter=self._blob_threads,
                                                     abandon_on_cancel=True)
            self._short.keep(key, data, time.monotonic())
            status = ST_OK
        except BlobNotFound:
            status = ST_NOT_FOUND
            self._short.keep(key, None, time.monotonic())
        except (BlobStoreError, OSError) as e:
            log.warning("blob store read of %s failed: %s", key, e)
        except Exception:
            log.exception("blob store read of %s failed", key)
        finally:
            flight.settle(data, status)
            if self._blob_flights.get(key) is flight:
                del self._blob_flights[key]

    async def _load_blob(self, key: str, flight: _Flight) -> None:
        """(server nursery) A blob from this server's disk, else from the store."""
        data: bytes | None = None
        status = ST_UNAVAILABLE
        try:
            data = await self._disk(True, self._blobs.read, key)
            if data is None:
                async with self._blob_slots.slot(Ticket(True)):
                    self.metrics.blob_fetches += 1
                    data = await trio.to_thread.run_sync(self._blobs.fetch, key, limiter=self._blob_threads,
                                                         abandon_on_cancel=True)
            self._blobs.keep(key, data)
            status = ST_OK
        except BlobNotFound:
            status = ST_NOT_FOUND
            self._blob_failures[key] = time.monotonic() + self.opts.failure_ttl
            while len(self._blob_failures) > self.opts.failure_cap:
                self._blob_failures.popitem(last=False)
        except ValueError as e:
            log.warning("blob store: %s", e)
            status = ST_CORRUPT
        except (BlobStoreError, OSError) as e:
            log.warning("blob store read of %s failed: %s", key, e)
        except Exception:
            log.exception("blob store read of %s failed", key)
        finally:
            flight.settle(data, status)
            if self._blob_flights.get(key) is flight:
                del self._blob_flights[key]

    # ---- chunk endpoints -----------------------------------------------------------

    async def _single(self, conn: Connection, req: Request) -> None:
        t0 = time.perf_counter()
        try:
            ref = parse_chunk_query(req.target)
        except WireError as e:
            self.metrics.bad_requests += 1
            await conn.send_response(400, f"{e}\n".encode(), keep_alive=self._keep(req))
            return
        self.metrics.chunk_requests += 1
        self.metrics.chunks_requested += 1
        self.metrics.in_flight += 1
        pieces: dict[bytes, _Piece] = {}
        try:
            pieces, _ = await self._collect([ref], demand=True)
            piece = pieces[ref.digest]
            if isinstance(piece, int):
                self.metrics.failed += 1
                await conn.send_response(HTTP_STATUS[piece], f"{STATUS_NAMES[piece]}\n".encode(),
                                         keep_alive=self._keep(req))
                return
            await conn.send_head(200, _piece_len(piece), keep_alive=self._keep(req),
                                 headers=[("Content-Type", "application/octet-stream")],
                                 more=isinstance(piece, _File))
            await self._send_piece(conn, piece)
        finally:
            _close_pieces(pieces)
            self.metrics.in_flight -= 1
            self.metrics.latency.observe(time.perf_counter() - t0)

    async def _decode(self, conn: Connection, req: Request) -> list[ChunkRef] | None:
        try:
            return decode_refs(req.body)
        except WireError as e:
            self.metrics.bad_requests += 1
            status = 413 if isinstance(e, BatchTooLarge) else 400
            await conn.send_response(status, f"{e}\n".encode(), keep_alive=self._keep(req))
            return None

    async def _stream(self, conn: Connection, req: Request) -> None:
        """v3: each distinct chunk once, as it resolves, with progress frames between."""
        refs = await self._decode(conn, req)
        if refs is None:
            return
        demand = req.headers.get(CLASS_HEADER.lower(), "").lower() != BACKGROUND
        t0 = time.perf_counter()
        self.metrics.chunk_requests += 1
        self.metrics.chunks_requested += len(refs)
        if demand:
            self.metrics.demand_requests += 1
        else:
            self.metrics.background_requests += 1
        self.metrics.in_flight += 1
        p: _Pending | None = None
        try:
            # The head at once, and progress frames during every wait that follows (a
            # disk slot, the disk cache's threads, the blob store): the client judges
            # this server by its silence, whatever it waits for.
            out = _ChunkedOut(conn, self)
            await conn.send_all(chunked_head(200, keep_alive=self._keep(req),
                                             headers=[("Content-Type", STREAM_CONTENT_TYPE)]))
            p = await self._beating(out, self._begin, list({r.digest: r for r in refs}.values()), demand)
            await self._beating(out, self._read_small_files, p.pieces, demand)
            for d, piece in p.pieces.items():
                await out.add_piece(d, piece if isinstance(piece, int) else ST_OK, piece)
                self._count_failed(piece)
            _close_pieces(p.pieces)
            p.pieces.clear()
            give_up = trio.current_time() + self.opts.read_through_timeout
            while p.waits:
                await out.flush()
                ready: list[bytes] = []
                with trio.move_on_after(self.opts.heartbeat):
                    ready.append(await p.recv.receive())
                if not ready:
                    if trio.current_time() >= give_up:
                        for d in list(p.waits):
                            await out.add_piece(d, ST_UNAVAILABLE, ST_UNAVAILABLE)
                            self.metrics.failed += 1
                        p.waits.clear()
                        break
                    out.add(PROGRESS_FRAME)
                    self.metrics.heartbeats += 1
                    continue
                while True:
                    try:
                        ready.append(p.recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                for d in ready:
                    flight = p.waits.pop(d, None)
                    if flight is None:
                        continue
                    piece = flight.data if flight.data is not None else flight.status
                    await out.add_piece(d, ST_READ_THROUGH if flight.data is not None else flight.status, piece)
                    self._count_failed(piece)
            await out.end()
        finally:
            if p is not None:
                p.close()
            self.metrics.in_flight -= 1
            self.metrics.latency.observe(time.perf_counter() - t0)

    async def _beating(self, out: _ChunkedOut, fn: Callable[..., Any], *args: Any) -> Any:
        """``await fn(*args)`` while a progress frame goes out every heartbeat (``out``
        must hold nothing yet: frames only go out whole)."""
        async with trio.open_nursery() as nursery:
            async def beat() -> None:
                while True:
                    await trio.sleep(self.opts.heartbeat)
                    with trio.CancelScope(shield=True):  # never half a frame on the wire
                        out.add(PROGRESS_FRAME)
                        self.metrics.heartbeats += 1
                        await out.flush()

            nursery.start_soon(beat)
            try:
                return await fn(*args)
            finally:
                nursery.cancel_scope.cancel()

    async def _batch(self, conn: Connection, req: Request) -> None:
        """v2: every frame in request order, in one response of known length."""
        refs = await self._decode(conn, req)
        if refs is None:
            return
        t0 = time.perf_counter()
        self.metrics.chunk_requests += 1
        self.metrics.chunks_requested += len(refs)
        self.metrics.demand_requests += 1
        self.metrics.in_flight += 1
        pieces: dict[bytes, _Piece] = {}
        try:
            pieces, missed = await self._collect(refs, demand=True)
            await self._read_small_files(pieces, True)
            length = sum(FRAME_HEAD.size + _piece_len(pieces[r.digest]) for r in refs)
            self.metrics.failed += sum(1 for r in refs if isinstance(pieces[r.digest], int))
            pending = bytearray(response_head(200, length, keep_alive=self._keep(req),
                                              headers=[("Content-Type", BATCH_CONTENT_TYPE)]))
            for r in refs:
                p = pieces[r.digest]
                status = p if isinstance(p, int) else ST_READ_THROUGH if r.digest in missed else ST_OK
                pending += FRAME_HEAD.pack(r.digest, status, _piece_len(p))
                if isinstance(p, bytes) and len(p) < SMALL_WRITE:
                    pending += p
                    self.metrics.bytes_served += len(p)
                    if len(pending) >= SEND_BATCH:
                        await conn.send_all(pending, more=True)
                        pending.clear()
                elif not isinstance(p, int):
                    await conn.send_all(pending, more=True)
                    pending.clear()
                    await self._send_piece(conn, p)
            if pending:
                await conn.send_all(pending)
        finally:
            _close_pieces(pieces)
            self.metrics.in_flight -= 1
            self.metrics.latency.observe(time.perf_counter() - t0)

    def _count_failed(self, piece: _Piece) -> None:
        if isinstance(piece, int):
            self.metrics.failed += 1

    async def _read_small_files(self, pieces: dict[bytes, _Piece], demand: bool) -> None:
        small = [d for d, p in pieces.items() if isinstance(p, _File) and p.size < SMALL_WRITE]
        if len(small) > 1:
            # A cold start's chunks are mostly small: reading them (one thread hop for
            # the batch) and sending them in large writes costs less than an awaited
            # sendfile per chunk (warm batches of 500 ~10 KiB chunks on loopback, end to
            # end: 58-63 us per chunk that way, 46-51 us this way).
            await self._disk(demand, _read_small, pieces, small)

    async def _send_piece(self, conn: Connection, piece: _File | bytes) -> None:
        if isinstance(piece, _File):
            await conn.sendfile(piece.fd, 0, piece.size)
            self.metrics.bytes_sendfile += piece.size
            self.metrics.bytes_served += piece.size
        else:
            await conn.send_all(piece)
            self.metrics.bytes_served += len(piece)

    # ---- resolving chunks: disk cache, flights, blob store ---------------------------

    async def _disk(self, demand: bool, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (disk work) in a worker thread, in the class's share of disk slots."""
        async with self._disk_slots.slot(Ticket(demand)):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._disk_threads)

    async def _collect(self, refs: Sequence[ChunkRef], *, demand: bool) -> tuple[dict[bytes, _Piece], set[bytes]]:
        """Every distinct ref of ``refs`` resolved (waiting for read-throughs up to
        ``read_through_timeout``); the open files in it belong to the caller."""
        p = await self._begin(list({r.digest: r for r in refs}.values()), demand)
        try:
            with trio.move_on_after(self.opts.read_through_timeout):
                while p.waits:
                    d = await p.recv.receive()
                    flight = p.waits.pop(d, None)
                    if flight is not None:
                        p.pieces[d] = flight.data if flight.data is not None else flight.status
            for d in p.waits:
                p.pieces[d] = ST_UNAVAILABLE
            pieces, p.pieces = p.pieces, {}
            return pieces, p.missed
        finally:
            p.close()

    async def _begin(self, uniq: list[ChunkRef], demand: bool) -> _Pending:
        """Resolve what can be at once (verified files, the disk cache, chunks fetched and
        not yet filled, remembered failures); register the rest as flights to wait on
        (joining those in flight, starting a fetch for the others)."""
        p = _Pending()
        pieces = p.pieces
        try:
            slow: list[ChunkRef] = []
            now = time.monotonic()
            for r in uniq:
                f = self._open_verified(r.digest)
                if f is not None:
                    pieces[r.digest] = f
                    self.metrics.hits += 1
                    continue
                failed = self._remembered_failure(r, now)
                if failed is not None:
                    pieces[r.digest] = failed
                    self.metrics.remembered_failures += 1
                    continue
                slow.append(r)
            if not slow:
                return p
            probe = [r for r in slow if r.digest not in self._flights]
            if probe:
                found = await self._disk(demand, self._read_cache, probe)
                for d, (data, ident) in found.items():
                    pieces[d] = data
                    self.metrics.hits += 1
                    if ident is not None:
                        self._remember(d, ident)
            # No await from here until every miss is registered as in flight.
            owned: list[tuple[ChunkRef, _Flight]] = []
            for r in slow:
                if r.digest in pieces:
                    continue
                flight = self._flights.get(r.digest)
                if flight is None:
                    # Filled (and remembered) by a fetch that ended while we probed?
                    f = self._open_verified(r.digest)
                    if f is not None:
                        pieces[r.digest] = f
                        self.metrics.hits += 1
                        continue
                elif flight.data is not None:  # fetched, its cache file not written yet
                    pieces[r.digest] = flight.data
                    self.metrics.hits += 1
                    continue
                self.metrics.misses += 1
                p.missed.add(r.digest)
                if flight is None:
                    flight = self._flights[r.digest] = _Flight(r.digest, demand)
                    owned.append((r, flight))
                else:
                    self.metrics.joined += 1
                    if demand and not flight.demand:
                        self._promote(flight)
                flight.waiters.append(p.send)
                p.waits[r.digest] = flight
            if owned:
                assert self._bg is not None
                self._bg.start_soon(self._fetch, owned)
            return p
        except BaseException:
            p.close()
            raise

    def _promote(self, flight: _Flight) -> None:
        """A demand request now waits on ``flight``: its read is demand work."""
        flight.demand = True
        self.metrics.promoted += 1
        if flight.ticket is not None:
            self._blob_slots.promote(flight.ticket)

    def _remembered_failure(self, r: ChunkRef, now: float) -> int | None:
        hit = self._failures.get(r)
        if hit is None:
            return None
        status, until = hit
        if now >= until:
            del self._failures[r]
            return None
        return status

    def _remember_failure(self, r: ChunkRef, status: int) -> None:
        ttl = self.opts.unavailable_ttl if status == ST_UNAVAILABLE else self.opts.failure_ttl
        self._failures[r] = (status, time.monotonic() + ttl)
        self._failures.move_to_end(r)
        while len(self._failures) > self.opts.failure_cap:
            self._failures.popitem(last=False)

    def _open_verified(self, digest: bytes) -> _File | None:
        """The cache file of ``digest`` opened, if it is the very file verified lately."""
        v = self._verified.get(digest)
        if v is None:
            return None
        ino, mtime, ctime, size, until = v
        if time.monotonic() > until:
            return None  # due for re-verification (and an LRU touch) on the slow path
        try:
            fd = os.open(self.ssd.path_of(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._verified.pop(digest, None)
            return None
        st = os.fstat(fd)
        if (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size) != (ino, mtime, ctime, size):
            os.close(fd)
            self._verified.pop(digest, None)
            return None
        self._touched.add(digest)
        return _File(fd, size)

    async def _touch_loop(self) -> None:
        """(server nursery) Write the LRU positions of the files sent lately, in batches."""
        while True:
            await trio.sleep(self.opts.touch_interval)
            if not self._touched:
                continue
            batch, self._touched = self._touched, set()
            try:
                await self._disk(False, self.ssd.touch, batch)
            except Exception as e:  # an LRU position is an optimisation, never an outage
                log.warning("disk cache: recording %d access(es) failed: %r", len(batch), e)

    def _remember(self, digest: bytes, ident: tuple[int, int, int, int]) -> None:
        self._verified[digest] = (*ident, time.monotonic() + self.opts.reverify_after)
        self._verified.move_to_end(digest)
        while len(self._verified) > self.opts.verified_cap:
            self._verified.popitem(last=False)

    def _file_ident(self, digest: bytes) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.ssd.path_of(digest))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

    def _read_cache(self, refs: Sequence[ChunkRef]) -> dict[bytes, tuple[bytes, tuple[int, int, int, int] | None]]:
        """(worker thread) Verified reads from the disk cache (``SSDTier.get`` checks the
        frame, drops it if it is bad, and refreshes its LRU time)."""
        out: dict[bytes, tuple[bytes, tuple[int, int, int, int] | None]] = {}
        for r in refs:
            data = self.ssd.get(r)
            if data is not None:
                ident = self._file_ident(r.digest)
                out[r.digest] = (data, ident if ident is not None and ident[3] == len(data) else None)
        return out

    # ---- read-through ------------------------------------------------------------------

    async def _fetch(self, owned: list[tuple[ChunkRef, _Flight]]) -> None:
        """(server nursery) Read ``owned`` misses from the blob store (each pack's refs
        checked against what the pack holds; one ranged read per contiguous run),
        release their waiters, then fill the disk cache."""
        flights = {r.digest: f for r, f in owned}
        got: list[tuple[ChunkRef, bytes]] = []
        by_pack: dict[str, list[ChunkRef]] = {}
        for r, _ in owned:
            by_pack.setdefault(r.pack, []).append(r)
        try:
            async with trio.open_nursery() as nursery:
                for pack, refs in by_pack.items():
                    nursery.start_soon(self._fetch_pack, pack, refs, flights, got, owned)
            if got:
                idents = await self._disk(False, self._fill, got)
                for d, ident in idents.items():
                    self._remember(d, ident)
        except Exception:
            log.exception("read-through of %d chunk(s) failed", len(owned))
        finally:
            for r, f in owned:
                if not f.done.is_set():
                    f.settle(None, ST_UNAVAILABLE)
                if self._flights.get(r.digest) is f:
                    del self._flights[r.digest]

    async def _fetch_pack(self, pack: str, refs: list[ChunkRef], flights: dict[bytes, _Flight],
                          got: list[tuple[ChunkRef, bytes]], owned: list[tuple[ChunkRef, _Flight]]) -> None:
        info = self._pack_info(pack)
        runs = _runs(refs, self.opts.max_range)
        async with trio.open_nursery() as nursery:
            if not info.loaded.is_set() and not info.speculating:
                # The first read of a pack whose table is loading runs alongside the load
                # (one round trip, not two); what it brings is served once the table
                # confirms it. One such read per pack, of at most max_range bytes, bounds
                # what a made-up ref can cost.
                first = next((i for i, run in enumerate(runs)
                              if run[-1].offset + run[-1].clen - run[0].offset <= self.opts.max_range), None)
                if first is not None:
                    info.speculating = True
                    nursery.start_soon(self._speculate, info, runs.pop(first), flights, got)
            if not runs:
                return
            await info.loaded.wait()
            ok: list[ChunkRef] = []
            for r in (r for run in runs for r in run):
                bad = info.check(r)
                if bad is None:
                    ok.append(r)
                else:
                    self._refuse(r, bad, flights)
            runs = _runs(ok, self.opts.max_range)
            if info.order:
                demand = any(flights[r.digest].demand for r in ok)
                runs = self._read_ahead(pack, info, runs, flights, owned,
                                        DEMAND_READ_AHEAD if demand else self.opts.max_range)
            for run in runs:
                nursery.start_soon(self._read_and_settle, run, flights, got)

    def _read_ahead(self, pack: str, info: _Pack, runs: list[list[ChunkRef]], flights: dict[bytes, _Flight],
                    owned: list[tuple[ChunkRef, _Flight]], span: int) -> list[list[ChunkRef]]:
        """Extend runs with the chunks that follow them in the pack (from its table of
        contents), to ``span`` bytes a read and never into the next owner segment, as
        flights of their own.

        Why: a prefetch (or profile replay) asks for a pack in order, in small batches
        one after another, so that a warm zone never queues much on a host's link ahead
        of its demand reads; from a cold zone each of those batches cost a store round
        trip (1 MiB per ~200 ms and per prefetch stream). Reading the rest of the range
        in the same GET makes the next batches hits or joins: one round trip per
        ``max_range``, for every host of the zone. Demand reads get a shorter span (see
        the module docstring)."""
        out: list[list[ChunkRef]] = []
        offsets = info.offsets
        for run in runs:
            end = run[-1].offset + run[-1].clen
            segment_end = (run[0].offset // OWNER_SEGMENT + 1) * OWNER_SEGMENT  # beyond: another server's
            i = bisect.bisect_left(offsets, end)
            candidates: list[ChunkRef] = []
            while i < len(info.order):
                off, d, clen, ulen = info.order[i]
                if off != end or off + clen - run[0].offset > span or off >= segment_end:
                    break
                if d in self._flights or d in self._verified or d in flights:
                    break  # held or coming: what follows most likely too
                candidates.append(ChunkRef(d, pack, off, clen, ulen))
                end = off + clen
                i += 1
            if candidates:
                try:  # on this server's disk already (say, since before a restart): not read again
                    held = self.ssd.contains_many(r.digest for r in candidates)
                except Exception:
                    held = {r.digest for r in candidates}
                n = next((k for k, r in enumerate(candidates) if r.digest in held), len(candidates))
                candidates = candidates[:n]
            for r in candidates:
                f = self._flights[r.digest] = flights[r.digest] = _Flight(r.digest, False)
                owned.append((r, f))
            self.metrics.read_ahead += len(candidates)
            out.append(run + candidates)
        return out

    async def _speculate(self, info: _Pack, run: list[ChunkRef], flights: dict[bytes, _Flight],
                         got: list[tuple[ChunkRef, bytes]]) -> None:
        try:
            self.metrics.speculative_reads += 1
            out = await self._read_run(run, flights)
            await info.loaded.wait()
        finally:
            info.speculating = False
        for r in run:
            bad = info.check(r)
            if bad is not None:
                self._refuse(r, bad, flights)
            else:
                self._settle_one(r, out.get(r.digest, ST_UNAVAILABLE), flights, got)

    async def _read_and_settle(self, run: list[ChunkRef], flights: dict[bytes, _Flight],
                               got: list[tuple[ChunkRef, bytes]]) -> None:
        out = await self._read_run(run, flights)
        for r in run:
            self._settle_one(r, out.get(r.digest, ST_UNAVAILABLE), flights, got)

    def _refuse(self, r: ChunkRef, status: int, flights: dict[bytes, _Flight]) -> None:
        """``r`` is not what its pack holds (or the pack is gone): no store read for it."""
        if status == ST_NOT_FOUND:
            self.metrics.refused_refs += 1
        self._settle_one(r, status, flights, [])

    def _settle_one(self, r: ChunkRef, result: bytes | int, flights: dict[bytes, _Flight],
                    got: list[tuple[ChunkRef, bytes]]) -> None:
        f = flights[r.digest]
        if isinstance(result, bytes):
            f.settle(result, ST_OK)
            got.append((r, result))
            return
        f.settle(None, result)
        self._remember_failure(r, result)
        if self._flights.get(r.digest) is f:
            del self._flights[r.digest]  # a failure is answered from memory, not from a flight

    async def _read_run(self, run: list[ChunkRef], flights: dict[bytes, _Flight]) -> dict[bytes, bytes | int]:
        """One ranged read of ``run`` (in the class of the requests waiting for it):
        digest -> verified frame, or the status to answer."""
        out: dict[bytes, bytes | int] = {}
        todo = run
        ticket = Ticket(any(flights[r.digest].demand for r in run))
        for r in run:
            flights[r.digest].ticket = ticket
        async with self._blob_slots.slot(ticket):
            while todo:
                head, rest = todo[0], todo[1:]
                self.metrics.blob_fetches += 1
                self.metrics.blob_in_flight += 1
                try:
                    frames = await trio.to_thread.run_sync(self.blob.fetch_frames, head, rest,
                                                           limiter=self._blob_threads, abandon_on_cancel=True)
                except CorruptChunk as e:
                    log.warning("blob store: %s", e)
                    out[head.digest] = ST_CORRUPT
                    todo = rest  # its neighbours may still be fine
                    continue
                except BlobNotFound as e:
                    log.warning("blob store: %s", e)
                    status = ST_NOT_FOUND
                except (BlobStoreError, OSError) as e:
                    log.warning("blob store read of %s failed: %s", head, e)
                    status = ST_UNAVAILABLE
                except Exception:
                    log.exception("blob store read of %s failed", head)
                    status = ST_UNAVAILABLE
                else:
                    for r in todo:
                        out[r.digest] = frames.get(r.digest, ST_CORRUPT)
                    return out
                finally:
                    self.metrics.blob_in_flight -= 1
                for r in todo:
                    out[r.digest] = status
                return out
        return out

    # ---- what the packs hold -------------------------------------------------------------

    def _pack_info(self, pack: str) -> _Pack:
        """What is known of ``pack``, loading it (in the server nursery) if nothing is."""
        info = self._packs.get(pack)
        if info is not None and (not info.loaded.is_set() or time.monotonic() < info.until):
            self._packs.move_to_end(pack)
            return info
        info = self._packs[pack] = _Pack()
        while len(self._packs) > self.opts.pack_cap:
            self._packs.popitem(last=False)
        assert self._bg is not None
        self._bg.start_soon(self._load_pack, pack, info)
        return info

    async def _load_pack(self, pack: str, info: _Pack) -> None:
        try:
            self.metrics.toc_loads += 1
            status, toc, size = await trio.to_thread.run_sync(self._read_pack_info, pack, limiter=self._toc_limiter,
                                                              abandon_on_cancel=True)
            info.status, info.toc, info.size = status, toc, size
            if toc:
                info.order = sorted((off, d, clen, ulen) for d, (off, clen, ulen) in toc.items())
                info.offsets = [e[0] for e in info.order]
            if status != ST_OK:
                ttl = self.opts.unavailable_ttl if status == ST_UNAVAILABLE else self.opts.failure_ttl
                info.until = time.monotonic() + ttl
        except Exception:
            log.exception("loading what %s holds failed", pack)
            info.status, info.until = ST_UNAVAILABLE, time.monotonic() + self.opts.unavailable_ttl
        finally:
            info.loaded.set()

    def _read_pack_info(self, pack: str) -> tuple[int, TocEntries | None, int]:
        """(worker thread) (status, table of contents or None, size) of ``pack``: its
        table of contents where the store has one, else its size."""
        store = self.blob.store
        key = toc_key_of_pack(pack)
        try:
            if key is not None:
                try:
                    return ST_OK, decode_toc_entries(key, store.get(key)), 0
                except BlobNotFound:
                    pass  # a store written without tables of contents: check ranges against the size
                except ValueError as e:
                    log.warning("%s; checking reads of %s against its size instead", e, pack)
            return ST_OK, None, store.size(pack)
        except BlobNotFound:
            return ST_NOT_FOUND, None, 0
        except (BlobStoreError, OSError) as e:
            log.warning("blob store: cannot tell what %s holds: %s", pack, e)
            return ST_UNAVAILABLE, None, 0

    def _fill(self, items: list[tuple[ChunkRef, bytes]]) -> dict[bytes, tuple[int, int, int, int]]:
        """(worker thread) Write fetched chunks to the disk cache; the identity of each
        file now in place (written by us or by someone else, verified either way)."""
        try:
            self.ssd.put_many(items)
        except Exception as e:
            log.warning("disk cache: storing %d chunk(s) failed: %r", len(items), e)
            return {}
        out: dict[bytes, tuple[int, int, int, int]] = {}
        for r, data in items:
            ident = self._file_ident(r.digest)
            if ident is not None and ident[3] == len(data):
                out[r.digest] = ident
        return out

    # ---- metrics -----------------------------------------------------------------

    def render_metrics(self) -> str:
        ssd, blob = self.ssd.stats(), self.blob.stats()
        waiting_demand, waiting_background = self._blob_slots.waiting
        return self.metrics.render(
            evictions=ssd.evictions, blob_errors=blob.errors, corrupt=ssd.corrupt + blob.corrupt,
            cache_bytes=ssd.stored_bytes, cache_entries=ssd.entries, cache_max_bytes=self.ssd.max_bytes,
            blob_waiting={"demand": waiting_demand, "background": waiting_background})


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _read_small(pieces: dict[bytes, _Piece], digests: Sequence[bytes]) -> None:
    """(worker thread) Replace the open cache files of ``digests`` in ``pieces`` with
    their bytes, closing them (one that cannot be read becomes a miss)."""
    for d in digests:
        f = pieces[d]
        assert isinstance(f, _File)
        try:
            pieces[d] = os.pread(f.fd, f.size, 0)
        except OSError:
            pieces[d] = ST_UNAVAILABLE
        finally:
            os.close(f.fd)


def _runs(refs: list[ChunkRef], max_range: int) -> list[list[ChunkRef]]:
    """Group refs into runs that sit back to back in one pack, each within ``max_range``
    bytes: one ranged read each."""
    ordered = sorted(refs, key=lambda r: (r.pack, r.offset))
    runs: list[list[ChunkRef]] = []
    for r in ordered:
        if runs:
            last = runs[-1]
            tail = last[-1]
            if (r.pack == tail.pack and r.offset == tail.offset + tail.clen
                    and r.offset + r.clen - last[0].offset <= max_range):
                last.append(r)
                continue
        runs.append([r])
    return runs


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable only from this machine."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def raise_fd_limit() -> None:
    """Hundreds of connections plus open cache files need more than the usual 1024 fds."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass


async def run_server(server: CacheServer, host: str, port: int, *,
                     on_ready: Callable[[str, int], None] | None = None) -> None:
    """Listen on ``host:port`` (port 0: any free port), call ``on_ready(host, port)``
    with the bound address, serve until SIGTERM/SIGINT, drain and return. A second
    signal stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                seen = 0
                async for signum in signals:
                    seen += 1
                    if seen == 1:
                        log.info("%s: draining (up to %.1fs)", signal.Signals(signum).name, server.opts.grace)
                        server.shutdown()
                    else:
                        log.warning("%s again: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()

            async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await nursery.start(serve)
            if on_ready is not None:
                on_ready(str(bound[0]), int(bound[1]))
