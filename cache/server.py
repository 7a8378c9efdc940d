"""The AZ cache server: verified chunks for every host of a zone, from one disk cache.

A zone's hosts start the same images at the same time. Without this tier each host
pays ~200 ms blob-store round trips for the same chunks; with it, the first host's
miss fills a server's disk and every other host reads the chunk at ~1 ms. The server
is a fallback, never a point of failure (the client skips it when it is down, slow or
wrong), so it is built to be simple and fast rather than clever:

- **Wire format**: HTTP/1.1 with keep-alive; a request names whole chunk refs (digest,
  pack, offset, clen, ulen) so the server can read through on a miss; a batch asks for
  many neighbouring chunks in one round trip. The format is defined and documented in
  :mod:`cache.server_wire`; in short::

      GET  /v2/chunk/<hex>?pack=K&offset=N&clen=N&ulen=N  -> 200 + zstd frame | 404/502/503
      POST /v2/chunks  body: (digest[32] offset:u64 clen:u32 ulen:u32 plen:u16 pack)*
                       -> 200 + (digest[32] status:u8 length:u32 frame)* in request order

- **Chunks stay compressed**: the server keeps and sends each chunk's zstd frame, as
  the packs store it, never the uncompressed bytes. A zone's links and the server's
  disk carry under a third of the bytes (the torch image: 0.30x), which is what
  decides how fast a host fills from this tier; the host decompresses, as it does
  for the blob store. (The first version sent uncompressed chunks: a cold ``import
  torch`` moved ~1 GB over the AZ link against ~345 MB from the blob store, and was
  no faster than the blob store at the same bandwidth.)
- **Disk cache**: an :class:`~cache.ssd.SSDTier` in frame form on ``--dir`` bounded by
  ``--max-size`` (compressed bytes; LRU in LMDB), so it survives restarts and evicts.
- **Zero copy for hits**: a hit is ``open`` + ``fstat`` + ``os.sendfile`` from the
  cache file to the non-blocking socket; Python never touches the bytes. Bytes just
  fetched from the blob store are sent from memory.
- **Verified before served and cached**: blob-store reads are decompressed and
  verified (:class:`~cache.blobtier.BlobTier`) before they are cached or sent. A
  cache file is verified (read, decompress, blake3, through ``SSDTier.get``) the first time this
  process serves it and again every ``reverify_after`` seconds (an hour); in between,
  the file is sent as long as its inode, mtime and size are those that were verified,
  and its LRU position is refreshed in batches every ``touch_interval`` seconds. (With
  a one-minute re-verification, a batch of hundreds of small chunks asked a minute
  after they were cached was re-read and re-hashed on the serving path, past the
  client's 1 s deadline on a loaded host.) Because a file is re-verified after every
  restart, fills skip ``fsync``: a file torn by a crash is caught, dropped and fetched
  again, never served. The client verifies everything too (end to end).
- **Single flight**: misses are registered as in flight before the first await;
  concurrent requests for the same digest, on any connection, wait for that one
  fetch. The misses of one batch that sit back to back in a pack become one ranged
  read. Fetches run in the server's own nursery, so a client that disconnects does
  not cancel a fetch others wait on. A fetched chunk stays in flight (served from
  memory) until its cache file is written, so no request in between reads it again.
- **Concurrency**: one trio task per connection (hundreds are fine), blob reads and
  disk reads/writes in worker threads behind their own limiters.
- **Auth**: with a secret, every endpoint but ``/health`` needs
  ``Authorization: Bearer <secret>`` (constant-time compare) and answers 401
  otherwise; ``/health`` answers 401 only to a request that sends a *wrong* secret,
  so a load balancer can probe it while a client's probe also checks its secret.
- **Shutdown**: :meth:`CacheServer.shutdown` (SIGTERM/SIGINT) stops accepting, closes
  idle keep-alive connections, lets requests in progress finish within ``grace``
  seconds, then cancels the rest and closes the cache.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import resource
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import trio

from cache.blobstore import BlobNotFound, BlobStore, BlobStoreError
from cache.blobtier import DEFAULT_MAX_RANGE, BlobTier
from cache.chunk import ChunkRef, CorruptChunk
from cache.server_http import Connection, HTTPError, PeerClosed, Request, response_head
from cache.server_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cache.server_metrics import ServerMetrics
from cache.server_wire import (BATCH_CONTENT_TYPE, BATCH_PATH, CHUNK_PATH, FRAME_HEAD, HEALTH_PATH,
                               HTTP_STATUS, MAX_BATCH_REFS, MAX_PACK_KEY, METRICS_PATH, REF_HEAD,
                               ST_CORRUPT, ST_NOT_FOUND, ST_OK, ST_READ_THROUGH, ST_UNAVAILABLE, STATUS_NAMES,
                               BatchTooLarge, WireError, decode_refs, parse_chunk_query)
from cache.ssd import SSDTier

log = logging.getLogger(__name__)

MAX_BODY = MAX_BATCH_REFS * (REF_HEAD.size + MAX_PACK_KEY)
SMALL_WRITE = 64 * 1024  # pieces below this are copied into the response buffer, not sent alone
SEND_BATCH = 1 << 20  # the response buffer is sent whenever it holds this much


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Knobs of a :class:`CacheServer` (the CLI sets ``secret``; the rest have defaults
    that suit a server with a few cores)."""

    secret: bytes | None = None
    grace: float = 10.0  # seconds in-flight requests get at shutdown
    idle_timeout: float = 120.0  # keep-alive connections idle this long are closed
    request_timeout: float = 30.0  # a request must arrive whole within this (no slow drip)
    blob_concurrency: int = 16  # ranged blob reads at once
    disk_concurrency: int = 8  # disk-cache reads/fills at once
    max_range: int = DEFAULT_MAX_RANGE  # bytes in one ranged blob read
    reverify_after: float = 3600.0  # seconds a verified cache file is sent without rehashing
    touch_interval: float = 2.0  # seconds between writes of the LRU positions of files sent
    verified_cap: int = 1 << 18  # cache files remembered as verified
    max_connections: int = 4096


class _Flight:
    """One blob fetch of one digest that requests wait on."""

    __slots__ = ("done", "data", "status")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.status = ST_UNAVAILABLE


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
        # digest -> (inode, mtime_ns, size, verified until [monotonic])
        self._verified: OrderedDict[bytes, tuple[int, int, int, float]] = OrderedDict()
        self._touched: set[bytes] = set()  # sent from a verified file since the last LRU write
        self._blob_limiter = trio.CapacityLimiter(options.blob_concurrency)
        self._disk_limiter = trio.CapacityLimiter(options.disk_concurrency)
        self._conn_slots = trio.Semaphore(options.max_connections)
        self._stop = trio.Event()
        self._draining = False
        self._idle: set[trio.CancelScope] = set()
        self._active = 0
        self._quiet = trio.Event()
        self._bg: trio.Nursery | None = None

    # ---- lifecycle ---------------------------------------------------------------

    async def serve(self, listeners: Sequence[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer until :meth:`shutdown`, then drain (bounded) and return."""
        async with trio.open_nursery() as bg:
            self._bg = bg
            bg.start_soon(self._touch_loop)
            async with trio.open_nursery() as conns:
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
        while True:
            await self._conn_slots.acquire()
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._conn_slots.release()
                return
            except OSError as e:
                self._conn_slots.release()
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept: %s; pausing 100 ms", os.strerror(e.errno or 0))
                    await trio.sleep(0.1)
                    continue
                raise
            conns.start_soon(self._connection, stream)

    # ---- connections -------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = Connection(stream.socket)
        self.metrics.connections += 1
        try:
            while not self._draining:
                ready = False
                with trio.CancelScope() as idle:
                    self._idle.add(idle)
                    try:
                        with trio.move_on_after(self.opts.idle_timeout):
                            ready = await conn.wait_request()
                    finally:
                        self._idle.discard(idle)
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
            conn.close()
            self._conn_slots.release()

    def _keep(self, req: Request) -> bool:
        return req.keep_alive and not self._draining

    async def _one_request(self, conn: Connection) -> bool:
        try:
            with trio.fail_after(self.opts.request_timeout):
                req = await conn.read_request(MAX_BODY)
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
            return await self._health(conn, req)
        if path == METRICS_PATH:
            if not await self._check(conn, req, ("GET",)):
                return self._keep(req)
            body = self.render_metrics().encode()
            await conn.send_response(200, body, keep_alive=self._keep(req),
                                     headers=[("Content-Type", METRICS_CONTENT_TYPE)])
            return self._keep(req)
        if path.startswith(CHUNK_PATH):
            if await self._check(conn, req, ("GET",)):
                await self._single(conn, req)
            return self._keep(req)
        if path == BATCH_PATH:
            if await self._check(conn, req, ("POST",)):
                await self._batch(conn, req)
            return self._keep(req)
        await conn.send_response(404, b"no such endpoint\n", keep_alive=self._keep(req))
        return self._keep(req)

    def _authorized(self, req: Request) -> bool:
        if self._secret is None:
            return True
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._secret)

    async def _check(self, conn: Connection, req: Request, methods: tuple[str, ...]) -> bool:
        """Method and credentials; answers the request itself when they are wrong."""
        if req.method not in methods:
            await conn.send_response(405, b"method not allowed\n", keep_alive=self._keep(req),
                                     headers=[("Allow", ", ".join(methods))])
            return False
        if not self._authorized(req):
            self.metrics.unauthorized += 1
            await conn.send_response(401, b"missing or wrong bearer secret\n",
                                     keep_alive=self._keep(req),
                                     headers=[("WWW-Authenticate", 'Bearer realm="imagefs-cache"')])
            return False
        return True

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
            pieces = await self._resolve([ref])
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

    async def _batch(self, conn: Connection, req: Request) -> None:
        t0 = time.perf_counter()
        try:
            refs = decode_refs(req.body)
        except WireError as e:
            self.metrics.bad_requests += 1
            status = 413 if isinstance(e, BatchTooLarge) else 400
            await conn.send_response(status, f"{e}\n".encode(), keep_alive=self._keep(req))
            return
        self.metrics.chunk_requests += 1
        self.metrics.chunks_requested += len(refs)
        self.metrics.in_flight += 1
        pieces: dict[bytes, _Piece] = {}
        missed: set[bytes] = set()
        try:
            pieces = await self._resolve(refs, missed)
            small = [d for d, p in pieces.items() if isinstance(p, _File) and p.size < SMALL_WRITE]
            if len(small) > 1:
                # A cold start's chunks are mostly small: reading them (one thread hop for
                # the batch) and sending them in large writes costs less than an awaited
                # sendfile per chunk (warm batches of 500 ~10 KiB chunks on loopback, end to
                # end: 58-63 us per chunk that way, 46-51 us this way).
                await trio.to_thread.run_sync(_read_small, pieces, small, limiter=self._disk_limiter)
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

    async def _send_piece(self, conn: Connection, piece: _File | bytes) -> None:
        if isinstance(piece, _File):
            await conn.sendfile(piece.fd, 0, piece.size)
            self.metrics.bytes_sendfile += piece.size
            self.metrics.bytes_served += piece.size
        else:
            await conn.send_all(piece)
            self.metrics.bytes_served += len(piece)

    # ---- resolving chunks: disk cache, flights, blob store ---------------------------

    async def _resolve(self, refs: Sequence[ChunkRef], missed: set[bytes] | None = None) -> dict[bytes, _Piece]:
        """digest -> what to send for each distinct ref; the digests that had to be read
        from the blob store are added to ``missed``. Open files in the result belong to
        the caller (closed here only if this is cancelled)."""
        pieces: dict[bytes, _Piece] = {}
        try:
            uniq = list({r.digest: r for r in refs}.values())
            slow: list[ChunkRef] = []
            for r in uniq:
                f = self._open_verified(r.digest)
                if f is not None:
                    pieces[r.digest] = f
                    self.metrics.hits += 1
                else:
                    slow.append(r)
            if not slow:
                return pieces
            probe = [r for r in slow if r.digest not in self._flights]
            if probe:
                found = await trio.to_thread.run_sync(self._read_cache, probe, limiter=self._disk_limiter)
                for d, (data, ident) in found.items():
                    pieces[d] = data
                    self.metrics.hits += 1
                    if ident is not None:
                        self._remember(d, ident)
            # No await from here until every miss is registered as in flight.
            waits: list[tuple[bytes, _Flight]] = []
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
                if missed is not None:
                    missed.add(r.digest)
                if flight is None:
                    flight = self._flights[r.digest] = _Flight()
                    owned.append((r, flight))
                else:
                    self.metrics.joined += 1
                waits.append((r.digest, flight))
            if owned:
                assert self._bg is not None
                self._bg.start_soon(self._fetch, owned)
            for d, flight in waits:
                await flight.done.wait()
                pieces[d] = flight.data if flight.data is not None else flight.status
            return pieces
        except BaseException:
            _close_pieces(pieces)
            raise

    def _open_verified(self, digest: bytes) -> _File | None:
        """The cache file of ``digest`` opened, if it is the very file verified lately."""
        v = self._verified.get(digest)
        if v is None:
            return None
        ino, mtime, size, until = v
        if time.monotonic() > until:
            return None  # due for re-verification (and an LRU touch) on the slow path
        try:
            fd = os.open(self.ssd.path_of(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._verified.pop(digest, None)
            return None
        st = os.fstat(fd)
        if (st.st_ino, st.st_mtime_ns, st.st_size) != (ino, mtime, size):
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
                await trio.to_thread.run_sync(self.ssd.touch, batch, limiter=self._disk_limiter)
            except Exception as e:  # an LRU position is an optimisation, never an outage
                log.warning("disk cache: recording %d access(es) failed: %r", len(batch), e)

    def _remember(self, digest: bytes, ident: tuple[int, int, int]) -> None:
        self._verified[digest] = (*ident, time.monotonic() + self.opts.reverify_after)
        self._verified.move_to_end(digest)
        while len(self._verified) > self.opts.verified_cap:
            self._verified.popitem(last=False)

    def _file_ident(self, digest: bytes) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.ssd.path_of(digest))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read_cache(self, refs: Sequence[ChunkRef]) -> dict[bytes, tuple[bytes, tuple[int, int, int] | None]]:
        """(worker thread) Verified reads from the disk cache (``SSDTier.get`` decompresses
        and hashes the frame, drops it if it is bad, and refreshes its LRU time)."""
        out: dict[bytes, tuple[bytes, tuple[int, int, int] | None]] = {}
        for r in refs:
            data = self.ssd.get(r)
            if data is not None:
                ident = self._file_ident(r.digest)
                out[r.digest] = (data, ident if ident is not None and ident[2] == len(data) else None)
        return out

    async def _fetch(self, owned: list[tuple[ChunkRef, _Flight]]) -> None:
        """(server nursery) Read ``owned`` misses from the blob store, one ranged read
        per contiguous run, release their waiters, then fill the disk cache."""
        flights = {r.digest: f for r, f in owned}
        got: list[tuple[ChunkRef, bytes]] = []
        try:
            async with trio.open_nursery() as nursery:
                for run in _runs([r for r, _ in owned], self.opts.max_range):
                    nursery.start_soon(self._fetch_run, run, flights, got)
            if got:
                idents = await trio.to_thread.run_sync(self._fill, got, limiter=self._disk_limiter)
                for d, ident in idents.items():
                    self._remember(d, ident)
        except Exception:
            log.exception("read-through of %d chunk(s) failed", len(owned))
        finally:
            for r, f in owned:
                if not f.done.is_set():
                    f.status = ST_UNAVAILABLE
                    f.done.set()
                if self._flights.get(r.digest) is f:
                    del self._flights[r.digest]

    async def _fetch_run(self, run: list[ChunkRef], flights: dict[bytes, _Flight],
                         got: list[tuple[ChunkRef, bytes]]) -> None:
        todo = run
        while todo:
            head, rest = todo[0], todo[1:]
            self.metrics.blob_fetches += 1
            self.metrics.blob_in_flight += 1
            try:
                out = await trio.to_thread.run_sync(self.blob.fetch_frames, head, rest,
                                                    limiter=self._blob_limiter, abandon_on_cancel=True)
            except CorruptChunk as e:
                log.warning("blob store: %s", e)
                self._settle(flights, head, None, ST_CORRUPT)
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
                    data = out.get(r.digest)
                    self._settle(flights, r, data, ST_OK if data is not None else ST_CORRUPT)
                    if data is not None:
                        got.append((r, data))
                return
            finally:
                self.metrics.blob_in_flight -= 1
            for r in todo:
                self._settle(flights, r, None, status)
            return

    def _settle(self, flights: dict[bytes, _Flight], ref: ChunkRef, data: bytes | None, status: int) -> None:
        f = flights[ref.digest]
        f.data, f.status = data, status
        f.done.set()
        if data is None and self._flights.get(ref.digest) is f:
            del self._flights[ref.digest]  # a failure is not cached: the next request retries

    def _fill(self, items: list[tuple[ChunkRef, bytes]]) -> dict[bytes, tuple[int, int, int]]:
        """(worker thread) Write fetched chunks to the disk cache; the identity of each
        file now in place (written by us or by someone else, verified either way)."""
        try:
            self.ssd.put_many(items)
        except Exception as e:
            log.warning("disk cache: storing %d chunk(s) failed: %r", len(items), e)
            return {}
        out: dict[bytes, tuple[int, int, int]] = {}
        for r, data in items:
            ident = self._file_ident(r.digest)
            if ident is not None and ident[2] == len(data):
                out[r.digest] = ident
        return out

    # ---- metrics -----------------------------------------------------------------

    def render_metrics(self) -> str:
        ssd, blob = self.ssd.stats(), self.blob.stats()
        return self.metrics.render(
            evictions=ssd.evictions, blob_errors=blob.errors, corrupt=ssd.corrupt + blob.corrupt,
            cache_bytes=ssd.stored_bytes, cache_entries=ssd.entries, cache_max_bytes=self.ssd.max_bytes)


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
