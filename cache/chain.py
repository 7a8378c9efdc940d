"""The read-through chunk chain: memory -> SSD -> remote tiers -> blob store, on trio.

What the filesystem awaits for every chunk it does not find in the kernel page cache.
The shape follows from the physics in DESIGN.md:

- A memory hit is served on the trio thread with no thread hop and no await: it is
  the common case once a workload is warm, and Python per-request work is the budget.
- Everything that blocks (SSD reads, blob-store reads, decompression, hashing) runs in
  worker threads, bounded by the chain's own limiters rather than trio's global one.
- Single flight: the first get of a cold digest starts one fetch; later gets of the
  same digest wait for it. A neighbour being brought in by another ranged read counts
  as in flight too. Fetches run as trio *system* tasks, so a caller that is cancelled
  (an interrupted FUSE request) does not cancel the fetch other callers share.
- Demand before prefetch: prefetch has its own, smaller limiter and takes no demand
  slot, so a demand get never waits for a slot behind prefetches. A prefetch registers
  its chunks as in flight only once it holds its slot and starts reading, so a demand
  get never waits on a queued prefetch either.
- A remote tier (the AZ cache server) is a fallback, never a point of failure: one
  that raises, times out or returns bad bytes counts as a miss. The chain verifies
  what remote tiers return, unless the tier says it has (``verifies``: the AZ client
  decompresses and hashes every chunk itself, and a second blake3 pass over the
  same bytes bought nothing), so a wrong server costs latency only.
- A slow remote tier is not a missing one: a tier that ends its fetches by rules of
  its own (``bounds_waits``: the AZ client waits as long as its server makes
  progress) gets no batch deadline from the chain, only a safety cap. What the remote
  tiers lack goes to the blob store within a per-host budget of direct reads
  (:class:`~cache.storebudget.StoreBudget`): a zone whose server is down does not
  turn into every host of the zone reading the store at once. Background reads wait
  for a zone that went down less than :data:`BACKGROUND_GRACE_S` ago instead.
- A demand fetch asks a remote tier for the chunk and at most
  :data:`REMOTE_DEMAND_BYTES` of its neighbours, not the blob store's whole range:
  at ~1 ms a round trip costs less than carrying neighbours ahead of time.
- Every demand get has a deadline (``deadline``, seconds; a mount's ``--read-timeout``):
  past it the get raises :class:`ChunkUnavailable` naming the chunk, whatever the tiers
  below are doing, and the fetch it started is given up at its own deadline too (its
  worker thread is abandoned, never waited for). Retries happen once, where the fault is
  understood: a store that retries its own calls (``retries_itself``: the S3 store, with
  its budget per call set from the same deadline) gets one call per fetch; others get
  :attr:`retries` more, with exponential backoff, all inside the deadline. A stalled
  store therefore costs a reader the deadline, not attempts x timeouts x retries.
- A chunk whose fetch ran out of time (the deadline: a stalled tier, not an error it
  answered) fails again at once for the next ``failure_hold`` seconds. Why:
  when a FUSE readahead fails, the kernel reads the first page again at once, with a
  synchronous request that a SIGKILLed reader cannot leave (pyfuse3 cannot answer
  FUSE_INTERRUPT); a second wait of the whole deadline there would double the reader's
  wait (bench/RESULTS.md "Reads under a stalled store") and make it unkillable
  for the second half.
- Fills go upward: what came from below is put in memory at once and queued for the
  SSD, which one background task writes in batches (write-behind, so a reader never
  waits for a disk write; if the queue is over its byte bound, the SSD copy is skipped).
  Until written, queued chunks are served from the queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from typing import Callable, Protocol, Sequence, runtime_checkable

import trio

from cache.blobstore import BlobStoreError
from cache.blobtier import BlobTier, contiguous_run
from cache.chunk import ChunkError, ChunkRef, CorruptChunk, open_chunk, verify
from cache.memory import MemoryTier
from cache.ssd import SSDTier
from cache.stats import ChainStats, Counters, TierStats
from cache.storebudget import StoreBudget
from cache.stream import StreamTracker

log = logging.getLogger(__name__)

FILL_BATCH_CHUNKS = 64
FILL_BATCH_BYTES = 64 << 20
# Compressed bytes a demand fetch asks of a remote tier: the chunk and its neighbours up
# to this much. A demand miss waits for its whole batch, and from a ~1 ms tier 8 MiB of
# neighbours (what one blob-store range carries, to spare 200 ms round trips) made each
# miss cost their transfer and decompression instead of a round trip. Cold-start bench,
# import torch from a warm AZ cache: 10.9 s with the blob store's range, 8.3-8.6 s with
# 1 MiB (8.2-8.5 s with 256 KiB, in more requests).
REMOTE_DEMAND_BYTES = 1 << 20
# The outer bound on one fetch of a remote tier that bounds its own waits by progress
# (``bounds_waits``); other tiers get ``remote_timeout`` per fetch.
REMOTE_CAP_S = 300.0
# A fetch waiting for the store budget asks the remote tiers again at least this often
# (a zone server that comes back takes the read over).
BUDGET_RECHECK_S = 0.5
# Background reads (prefetch, profile replay) do not go around a zone whose servers are
# all down until it has been down this long: a server restarted by its supervisor is
# back within seconds, and a zone's hosts prefetching the image from the store meanwhile
# is the herd again (a server killed 1 s into a burst of 8 hosts and restarted 4 s
# later: the store sent 6.6 copies of the image when prefetches used the budget too).
BACKGROUND_GRACE_S = 30.0
# The most a demand get waits, seconds (a mount's --read-timeout): see the module docstring.
DEFAULT_DEADLINE = 30.0
# A fetch that ran out of time fails again at once for this many seconds.
FAILURE_HOLD = 1.0
# Failures remembered at most (a failing store can fail every chunk of an image).
MAX_FAILURES_HELD = 4096


class ChunkUnavailable(ChunkError):
    """Every tier failed for a chunk (after retries). ``reason`` says how."""

    def __init__(self, ref: ChunkRef, reason: str) -> None:
        super().__init__(f"{ref} unavailable: {reason}")
        self.ref = ref
        self.reason = reason


@runtime_checkable
class RemoteTier(Protocol):
    """A tier reached over the network (the AZ cache server's client).

    ``fetch`` returns digest -> uncompressed bytes for the refs it has and leaves out
    the rest. It may raise or hang: the chain treats that as a miss, with a timeout
    (``remote_timeout``), unless the tier's ``bounds_waits`` attribute is true: it then
    promises to end each fetch by rules of its own (the AZ client: as long as its
    server makes progress), and the chain only caps it at :data:`REMOTE_CAP_S`.
    ``background`` marks a prefetch or profile replay: the tier should keep little in
    flight on the link at once, so that demand fetches do not queue behind it.
    A tier whose ``verifies`` attribute is true promises that every chunk it returns
    has been checked against its digest and size; the chain checks the others, and
    such a tier counts in ``corrupt`` the chunks it rejected (shown as its tier's
    ``corrupt``). A tier may count in ``read_through`` the chunks it had to fetch from
    the blob store itself (a cold zone cache): the chain then starts prefetching. A
    ``healthy()`` method that returns False means the tier has no server to ask: the
    chain does not ask it; ``unhealthy_for()`` (seconds it has had none) holds
    background reads back for :data:`BACKGROUND_GRACE_S` instead of sending them to
    the store.
    """

    name: str

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]: ...


class _Flight:
    """One fetch in progress that gets of its digest wait on.

    ``primary`` flights were started for this digest by a demand get: their error is
    the answer. Others (a neighbour in someone's range, a prefetch, a stream) may end
    without data; a waiter then starts a fetch of its own. ``background`` flights
    belong to a stream (:mod:`cache.stream`), whose tracker counts who joins them.
    """

    __slots__ = ("done", "data", "error", "primary", "background")

    def __init__(self, primary: bool, background: bool = False) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: ChunkUnavailable | None = None
        self.primary = primary
        self.background = background


class ChunkChain:
    """Implements :class:`cache.tier.ChunkReader` over the tiers, fastest first."""

    def __init__(self, blob: BlobTier, ssd: SSDTier | None, memory: MemoryTier, *,
                 remote_tiers: Sequence[RemoteTier] = (), remote_demand_bytes: int = REMOTE_DEMAND_BYTES,
                 max_fetches: int = 16,
                 max_prefetches: int = 4, retries: int = 3, backoff: float = 0.05,
                 remote_timeout: float = 2.0, ssd_readers: int = 8,
                 max_fill_pending: int = 128 << 20, max_stream_threads: int = 8,
                 store_budget: StoreBudget | None = None, deadline: float = DEFAULT_DEADLINE,
                 failure_hold: float = FAILURE_HOLD) -> None:
        if deadline <= 0:
            raise ValueError(f"deadline must be a positive number of seconds, not {deadline!r}")
        self.blob = blob
        self.ssd = ssd
        self.memory = memory
        self.remote_tiers = tuple(remote_tiers)
        self.remote_demand_bytes = remote_demand_bytes
        self.retries = retries
        self.backoff = backoff
        self.remote_timeout = remote_timeout
        self.remote_cap = REMOTE_CAP_S
        # Direct store reads while the remote tiers lack a chunk (only with remote tiers).
        self.store_budget = (store_budget or StoreBudget()) if self.remote_tiers else None
        self.background_grace = BACKGROUND_GRACE_S
        self._background_held = 0
        self.deadline = deadline
        self.failure_hold = failure_hold
        # digest -> (trio time until which it fails at once, why): see the module docstring.
        self._failed: dict[bytes, tuple[float, str]] = {}
        self.max_fill_pending = max_fill_pending
        self._demand = trio.CapacityLimiter(max_fetches)
        self._prefetch = trio.CapacityLimiter(max_prefetches)
        self._ssd_read = trio.CapacityLimiter(ssd_readers)
        # Our own thread budget: the limiters above bound it, so it never makes anyone wait.
        self._threads = trio.CapacityLimiter(max_fetches + max_prefetches + ssd_readers + max_stream_threads + 1)
        self._inflight: dict[bytes, _Flight] = {}
        self._fill_queue: deque[tuple[ChunkRef, bytes, bool]] = deque()  # (ref, bytes, for background work)
        self._fill_pending: dict[bytes, bytes] = {}
        self._fill_room: trio.Event | None = None  # set when the write-behind queue has room again
        self._fill_bytes = 0
        self._filler_running = False
        self._fill_idle: trio.Event | None = None
        self._remote_counters = {t.name: Counters(t.name) for t in self.remote_tiers}
        self._prefetch_pays = trio.Event()  # see wait_until_prefetch_pays
        self._deferred: dict[bytes, ChunkRef] = {}  # stream fills not written to the SSD yet
        # The tracker of the stream running now (a profile replay), told of every
        # demand get so that ``imagefs stats`` can say what the stream served.
        self.tracker: StreamTracker | None = None
        self._gets = self._joined = self._fetches = self._retries = self._unavailable = 0
        # Demand gets that had to go below memory, and how many are at it now: a
        # paced prefetch waits while any is (demand reads always go first).
        self.demand_cold = 0
        self._demand_active = 0
        self._demand_idle: trio.Event | None = None
        self._prefetched = self._prefetch_failed = self._fill_dropped = 0
        # Write-behind outcomes: chunks the SSD tier holds after their write, or not
        # (a full or broken disk); the background_ ones are fills of prefetches and streams.
        self._stored = self._store_failed = 0
        self.background_stored = self.background_store_failed = 0

    # ---- demand ------------------------------------------------------------------

    async def get(self, ref: ChunkRef, neighbours: Sequence[ChunkRef] = ()) -> bytes:
        """The verified bytes of ``ref``; ``neighbours`` (stored right after it, in pack
        order) may come along in the same ranged read. Raises :class:`ChunkUnavailable`."""
        self._gets += 1
        data = self.memory.get(ref)
        if data is not None:
            if self.tracker is not None:
                self.tracker.hit(ref.digest)
            return data
        return await self._get_cold(ref, neighbours)

    async def _get_cold(self, ref: ChunkRef, neighbours: Sequence[ChunkRef]) -> bytes:
        with trio.move_on_after(self.deadline):
            return await self._get_cold_until(ref, neighbours)
        reason = f"no tier answered within {self.deadline:g} s"
        self._hold_failure(ref.digest, reason)
        raise ChunkUnavailable(ref, reason)

    async def _get_cold_until(self, ref: ChunkRef, neighbours: Sequence[ChunkRef]) -> bytes:
        d = ref.digest
        while True:
            data = self._fill_pending.get(d)
            if data is not None:
                self.memory.put(ref, data)
                if self.tracker is not None:
                    self.tracker.hit(d)
                return data
            flight = self._inflight.get(d)
            if flight is None:
                failed = self._failed.get(d)
                if failed is not None:
                    if failed[0] > trio.current_time():
                        raise ChunkUnavailable(ref, failed[1])
                    del self._failed[d]
                if self.tracker is not None:
                    self.tracker.cold(d)
                flight = self._inflight[d] = _Flight(primary=True)
                # ``neighbours`` is passed on unevaluated: it may be lazy and costly
                # (a pack walk), and an SSD hit never needs it.
                trio.lowlevel.spawn_system_task(self._run_demand, ref, neighbours, flight,
                                                name=f"imagefs fetch {ref.hex[:16]}")
            else:
                self._joined += 1
                if flight.background and self.tracker is not None:
                    self.tracker.joined(d)
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            if flight.primary and flight.error is not None:
                raise ChunkUnavailable(ref, flight.error.reason)
            data = self.memory.peek(d)  # the other fetch did not bring it: our turn
            if data is not None:
                return data

    async def _run_demand(self, ref: ChunkRef, neighbours: Sequence[ChunkRef], flight: _Flight) -> None:
        self.demand_cold += 1
        self._demand_active += 1
        try:
            with trio.move_on_after(self.deadline):
                flight.data = await self._load(ref, neighbours)
            if flight.data is None:
                self._hold_failure(ref.digest, f"no tier answered within {self.deadline:g} s")
                raise ChunkUnavailable(ref, f"no tier answered within {self.deadline:g} s")
        except ChunkUnavailable as e:
            self._unavailable += 1
            flight.error = e
        except Exception as e:  # never let a bug kill the trio run (and the mount)
            log.exception("fetching %s", ref)
            self._unavailable += 1
            flight.error = ChunkUnavailable(ref, f"internal error: {e!r}")
        finally:
            if self._inflight.get(ref.digest) is flight:
                del self._inflight[ref.digest]
            flight.done.set()
            self._demand_active -= 1
            if not self._demand_active and self._demand_idle is not None:
                self._demand_idle.set()
                self._demand_idle = None

    def _hold_failure(self, digest: bytes, reason: str) -> None:
        if self.failure_hold <= 0:
            return
        if len(self._failed) >= MAX_FAILURES_HELD:
            now = trio.current_time()
            self._failed = {k: v for k, v in self._failed.items() if v[0] > now}
            if len(self._failed) >= MAX_FAILURES_HELD:
                self._failed.pop(next(iter(self._failed)))
        self._failed[digest] = (trio.current_time() + self.failure_hold, f"{reason} (failed again at once: "
                                f"a new attempt is made {self.failure_hold:g} s after a failure)")

    async def wait_for_no_demand(self) -> None:
        """Return when no demand get is fetching below memory."""
        while self._demand_active:
            if self._demand_idle is None:
                self._demand_idle = trio.Event()
            await self._demand_idle.wait()

    async def _load(self, ref: ChunkRef, neighbours: Sequence[ChunkRef]) -> bytes:
        # The SSD first, for ref alone: neighbours (lazy, and costly to work out on a
        # big index) only matter when a fetch from below follows.
        if self.ssd is not None:
            async with self._ssd_read:
                data = await trio.to_thread.run_sync(self._ssd_get, ref, limiter=self._threads)
            if data is not None:
                self.memory.put(ref, data)
                return data
        run = contiguous_run(ref, neighbours, self.blob.max_range) if neighbours else []
        held: set[bytes] = set()
        if run and self.ssd is not None:
            held = await trio.to_thread.run_sync(self._ssd_holds, run, limiter=self._threads)
        async with self._demand:
            claimed = self._claim(ref, run, held)
            got: dict[bytes, bytes] = {}
            try:
                got = await self._fetch_below(ref, [c for c, _ in claimed])
            finally:
                self._settle(claimed, got)
        data = got.get(ref.digest)
        if data is None:
            raise ChunkUnavailable(ref, "no tier returned it")
        self._fill(ref, data)
        return data

    def _ssd_holds(self, run: Sequence[ChunkRef]) -> set[bytes]:
        """(worker thread) Which of ``run`` the SSD tier holds (they need no fetch)."""
        assert self.ssd is not None
        try:
            return self.ssd.contains_many(n.digest for n in run)
        except Exception:
            return set()

    def _ssd_get(self, ref: ChunkRef) -> bytes | None:
        """(worker thread) ref's verified bytes from the SSD tier, or None."""
        assert self.ssd is not None
        try:  # a broken SSD is a miss, never a failed read
            return self.ssd.get(ref)
        except Exception as e:
            log.warning("ssd tier: %s: %r", ref, e)
            self.ssd.counters.add(errors=1)
            return None

    def _held_locally(self, digest: bytes) -> bool:
        return digest in self._inflight or digest in self._fill_pending or digest in self.memory

    def _claim(self, ref: ChunkRef, run: Sequence[ChunkRef],
               held: set[bytes]) -> list[tuple[ChunkRef, _Flight]]:
        """Mark as in flight the leading neighbours nobody has or is fetching; stop at the
        first that is (what follows it is most likely being fetched or held too)."""
        claimed: list[tuple[ChunkRef, _Flight]] = []
        for n in run:
            if n.digest == ref.digest or n.digest in held or self._held_locally(n.digest):
                break
            f = self._inflight[n.digest] = _Flight(primary=False)
            claimed.append((n, f))
        return claimed

    def _settle(self, claimed: Sequence[tuple[ChunkRef, _Flight]], got: dict[bytes, bytes], *,
                may_drop: bool = True, defer: bool = False) -> None:
        """Fill what arrived for the claimed chunks and release their waiters."""
        for r, f in claimed:
            data = got.get(r.digest)
            if data is not None:
                self._fill(r, data, may_drop=may_drop, defer=defer)
            f.data = data
            if self._inflight.get(r.digest) is f:
                del self._inflight[r.digest]
            f.done.set()

    # ---- below the local tiers ---------------------------------------------------

    async def _fetch_below(self, ref: ChunkRef, run: Sequence[ChunkRef], *,
                           background: bool = False) -> dict[bytes, bytes]:
        """Fetch ``ref`` (and, where cheap, ``run``) from the remote tiers, then the blob
        store. ``background``: for a prefetch (see :class:`RemoteTier`)."""
        self._fetches += 1
        got: dict[bytes, bytes] = {}
        if self.remote_tiers:
            wanted = [ref, *run]
            if not background:  # ``run`` sits back to back after ``ref``
                wanted = [ref, *contiguous_run(ref, run, self.remote_demand_bytes)]
            got = await self._through_remote(ref, wanted, background)
            if ref.digest in got:
                return got
        last: Exception | None = None
        # One place retries: a store that retries its own calls gets one call (see the module docstring).
        attempts = 1 if getattr(self.blob.store, "retries_itself", False) else self.retries + 1
        for attempt in range(attempts):
            if attempt:
                self._retries += 1
                await trio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                # Abandoned, not waited for, when the deadline passes: the store's own
                # timeouts end the thread later; its result is dropped.
                more = await trio.to_thread.run_sync(self.blob.fetch, ref, run, limiter=self._threads,
                                                     abandon_on_cancel=True)
            except CorruptChunk as e:
                raise ChunkUnavailable(ref, str(e)) from e
            except (BlobStoreError, OSError) as e:
                last = e
                continue
            except Exception as e:
                raise ChunkUnavailable(ref, f"blob tier failed: {e!r}") from e
            for k, v in more.items():
                got.setdefault(k, v)
            return got
        raise ChunkUnavailable(ref, f"blob store failed {attempts} time{'s' if attempts > 1 else ''}: {last}") from last

    async def _through_remote(self, ref: ChunkRef, wanted: Sequence[ChunkRef], background: bool) -> dict[bytes, bytes]:
        """What the remote tiers have of ``wanted``. If they lack ``ref``, return only once
        a direct store read may be made (:meth:`_wait_for_store`)."""
        got = await self._ask_tiers(wanted, {}, background, lambda g: ref.digest in g)
        if ref.digest in got:
            return got
        return await self._wait_for_store(wanted, got, background, lambda g: ref.digest in g)

    async def _ask_tiers(self, wanted: Sequence[ChunkRef], got: dict[bytes, bytes], background: bool,
                         done: Callable[[dict[bytes, bytes]], bool]) -> dict[bytes, bytes]:
        """Ask each remote tier that has a server up for what ``got`` lacks, until ``done``."""
        for tier in self.remote_tiers:
            healthy = getattr(tier, "healthy", None)
            if healthy is not None and not healthy():
                continue  # no server to ask: a miss without a request
            want = [r for r in wanted if r.digest not in got]
            if not want:
                break
            got.update(await self._ask_remote(tier, want, background))
            if done(got):
                break
        return got

    async def _wait_for_store(self, wanted: Sequence[ChunkRef], got: dict[bytes, bytes], background: bool,
                              done: Callable[[dict[bytes, bytes]], bool]) -> dict[bytes, bytes]:
        """Hold a read the remote tiers could not serve until the store budget grants it
        (and, a background read, until a zone with no server up has been down for
        ``background_grace``), asking the tiers again after each wait: a server back up
        takes the read over. Returns what the tiers brought meanwhile; the caller reads
        the rest from the store (``done(got)``: nothing left to read)."""
        assert self.store_budget is not None
        while True:
            self._prefetch_pays.set()  # the zone's cache lacks some of the image
            if background and any(0 < getattr(t, "unhealthy_for", lambda: 0.0)() < self.background_grace
                                  for t in self.remote_tiers):
                self._background_held += 1  # the zone is down, likely not for long: wait for it
                await trio.sleep(BUDGET_RECHECK_S)
            else:
                wait = self.store_budget.take(background=background)
                if not wait:
                    return got
                await trio.sleep(min(wait, BUDGET_RECHECK_S))
            got = await self._ask_tiers(wanted, got, background, done)
            if done(got):
                return got

    async def _ask_remote(self, tier: RemoteTier, refs: Sequence[ChunkRef], background: bool) -> dict[bytes, bytes]:
        c = self._remote_counters[tier.name]
        t0 = time.perf_counter()
        read_through = getattr(tier, "read_through", 0)
        cap = self.remote_cap if getattr(tier, "bounds_waits", False) else self.remote_timeout
        try:
            with trio.fail_after(cap):
                raw = await tier.fetch(refs, background=background)
            if getattr(tier, "read_through", 0) != read_through:
                self._prefetch_pays.set()  # the zone's cache had to read some through: it is cold
            by_digest = {r.digest: r for r in refs}
            offered = {d: v for d, v in raw.items() if d in by_digest}
        except trio.TooSlowError:
            c.add(errors=1, misses=len(refs))
            return {}
        except Exception as e:
            log.debug("remote tier %s: %r", tier.name, e)
            c.add(errors=1, misses=len(refs))
            return {}
        good: dict[bytes, bytes] = {}
        if offered and getattr(tier, "verifies", False):
            good = {d: v for d, v in offered.items() if len(v) == by_digest[d].ulen}
        elif offered:
            good = await trio.to_thread.run_sync(_verified, by_digest, offered, limiter=self._threads)
        # Bytes as stored (compressed), like the blob tier's: what crossed the network.
        c.fetch(len(good), sum(by_digest[d].clen for d in good), time.perf_counter() - t0, wanted=len(refs))
        if len(good) < len(offered):
            c.add(corrupt=len(offered) - len(good))
        return good

    # ---- fills (write-behind to the SSD) -------------------------------------------

    def _fill(self, ref: ChunkRef, data: bytes, *, may_drop: bool = True, defer: bool = False) -> None:
        """Keep ``data`` in memory and queue it for the SSD. A demand fill is dropped
        when the queue is full (a reader never waits on the disk); a prefetch fill is
        not, because prefetch waits for room before each run, which bounds the queue
        at ``max_fill_pending`` plus what the prefetches in flight bring. ``defer``
        (a stream's fills): memory only for now, the SSD copy written by
        :meth:`save_deferred` once the workload is quiet."""
        self.memory.put(ref, data)
        if self.ssd is None or ref.digest in self._fill_pending:
            return
        if defer:
            self._deferred[ref.digest] = ref
            return
        if may_drop and self._fill_bytes + len(data) > self.max_fill_pending:
            self._fill_dropped += 1
            return
        self._fill_queue.append((ref, data, not may_drop))
        self._fill_pending[ref.digest] = data
        self._fill_bytes += len(data)
        if not self._filler_running:
            self._filler_running = True
            trio.lowlevel.spawn_system_task(self._filler, name="imagefs ssd write-behind")

    async def _filler(self) -> None:
        assert self.ssd is not None
        try:
            while self._fill_queue:
                batch: list[tuple[ChunkRef, bytes, bool]] = []
                nbytes = 0
                while self._fill_queue and len(batch) < FILL_BATCH_CHUNKS and nbytes < FILL_BATCH_BYTES:
                    item = self._fill_queue.popleft()
                    batch.append(item)
                    nbytes += len(item[1])
                held: set[bytes] = set()
                try:
                    held = await trio.to_thread.run_sync(self._write_batch, batch, limiter=self._threads)
                finally:
                    for r, data, background in batch:
                        if self._fill_pending.pop(r.digest, None) is not None:
                            self._fill_bytes -= len(data)
                        ok = r.digest in held
                        self._stored += ok
                        self._store_failed += not ok
                        if background:
                            self.background_stored += ok
                            self.background_store_failed += not ok
                    if self._fill_room is not None and self._fill_bytes <= self.max_fill_pending // 2:
                        self._fill_room.set()
                        self._fill_room = None
        finally:
            self._filler_running = False
            if self._fill_room is not None:  # nothing left to write: room for everyone
                self._fill_room.set()
                self._fill_room = None
            if self._fill_idle is not None:
                self._fill_idle.set()
                self._fill_idle = None

    def _write_batch(self, batch: Sequence[tuple[ChunkRef, bytes, bool]]) -> set[bytes]:
        """(worker thread) Write ``batch`` to the SSD tier; the digests it holds after."""
        assert self.ssd is not None
        try:
            stored = self.ssd.put_many([(r, data) for r, data, _bg in batch])
        except Exception as e:
            log.warning("ssd tier: write-behind of %d chunks failed: %r", len(batch), e)
            self.ssd.counters.add(errors=1)
            stored = -1
        if stored == len(batch):
            return {r.digest for r, _data, _bg in batch}
        try:  # some were already there, or did not fit: ask
            return self.ssd.contains_many(r.digest for r, _data, _bg in batch)
        except Exception:
            return set()

    async def _wait_for_fill_room(self) -> None:
        while self.ssd is not None and self._fill_bytes > self.max_fill_pending // 2:
            if self._fill_room is None:
                self._fill_room = trio.Event()
            await self._fill_room.wait()

    async def drain(self) -> None:
        """Wait until every queued SSD fill has been written."""
        while self._filler_running:
            if self._fill_idle is None:
                self._fill_idle = trio.Event()
            await self._fill_idle.wait()

    async def aclose(self) -> None:
        """Finish queued fills and write the SSD's queued access times (the SSD tier
        itself belongs to the caller and stays open). The stream's chunks still
        waiting for their SSD copies are written first."""
        await self.save_deferred(paced=False)
        await self.drain()
        if self.ssd is not None:
            await trio.to_thread.run_sync(self.ssd.flush, limiter=self._threads)

    # ---- prefetch ----------------------------------------------------------------

    async def wait_until_prefetch_pays(self) -> None:
        """Return when prefetching an image is worth its cost: at once without remote
        tiers; with them (an AZ cache), once a fetch has had to go past them to the blob
        store, or a remote tier says it had to read chunks through from the blob store
        (its ``read_through`` count grew): the zone's cache lacks some of the image.

        Why: a prefetch hides the blob store's ~200 ms round trips, but it costs the
        host CPU for every byte of the image (decompress, hash, SSD write). While a
        warm AZ cache answers misses in ~1 ms there is no latency to hide, and on a
        2-core host that CPU was what the workload waited for: a cold ``import torch``
        from a warm AZ cache took 11.0 s with a full prefetch, 9.0 s without (and
        from the blob store alone, 11.5 s with, 27.2 s without). A cold zone cache, on
        the other hand, costs the blob store's latency per miss, which is what the
        prefetch is for: without the read-through rule the first host of a zone started
        ``import numpy`` in 8-10 s instead of ~3 s."""
        if self.remote_tiers:
            await self._prefetch_pays.wait()

    async def prefetch(self, refs: Sequence[ChunkRef], *, paced: bool = False, rate: float = 0.0) -> int:
        """Bring ``refs`` (in pack order where possible) into the local tiers ahead of
        demand, a few ranged reads at a time; returns how many chunks were fetched.
        Best effort: failures are counted, not raised. Cancelling stops it cleanly.

        ``paced``: one ranged read at a time, none while a demand get is fetching below
        memory, and (``rate`` > 0) at most ``rate`` compressed bytes a second on average
        (the rest of an image after its startup profile: worth having, never worth the
        workload's CPU or link)."""
        runs: list[list[ChunkRef]] = []
        i = 0
        while i < len(refs):
            run = [refs[i], *contiguous_run(refs[i], refs[i + 1:], self.blob.max_range)]
            runs.append(run)
            i += len(run)
        before = self._prefetched
        one_at_a_time = trio.Lock() if paced else None
        pace = _Pace(rate) if paced and rate > 0 else None
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._prefetch_run, run, one_at_a_time, pace)
        return self._prefetched - before

    async def _prefetch_run(self, run: list[ChunkRef], one_at_a_time: trio.Lock | None,
                            pace: "_Pace | None" = None) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if one_at_a_time is not None:
                await stack.enter_async_context(one_at_a_time)
            await stack.enter_async_context(self._prefetch)
            paced = one_at_a_time is not None
            todo = [r for r in run if not self._held_locally(r.digest)]
            if todo and self.ssd is not None:
                try:
                    held = await trio.to_thread.run_sync(
                        self.ssd.contains_many, [r.digest for r in todo], limiter=self._threads)
                except Exception:
                    held = set()
                todo = [r for r in todo if r.digest not in held]
            while todo:
                # Background work waits for write-behind room instead of having its
                # fills dropped (demand fills never wait, and are dropped when full).
                await self._wait_for_fill_room()
                if paced:
                    await self.wait_for_no_demand()
                # Re-check and claim right before reading (no await in between).
                todo = [r for r in todo if not self._held_locally(r.digest)]
                if not todo:
                    break
                sub = [todo[0], *contiguous_run(todo[0], todo[1:], self.blob.max_range)]
                todo = todo[len(sub):]
                claimed = []
                for r in sub:
                    if r.digest in self._inflight:
                        break  # a duplicate digest within the run
                    claimed.append((r, _Flight(primary=False)))
                    self._inflight[r.digest] = claimed[-1][1]
                got: dict[bytes, bytes] = {}
                try:
                    got = await self._fetch_below(claimed[0][0], [r for r, _ in claimed[1:]], background=True)
                except ChunkUnavailable as e:
                    log.debug("prefetch: %s", e)
                except Exception:
                    log.exception("prefetch of %s", claimed[0][0])
                finally:
                    self._settle(claimed, got, may_drop=False)
                n = sum(1 for r, _ in claimed if r.digest in got)
                if pace is not None:
                    await pace.spend(sum(r.clen for r, _ in claimed))
                self._prefetched += n
                self._prefetch_failed += len(claimed) - n
                todo = sub[len(claimed):] + todo  # after a duplicate: next round

    # ---- streams (cache.stream): background reads in a given order ------------------

    def held_locally(self, digest: bytes) -> bool:
        """Whether ``digest`` is in memory, queued for the SSD, or on its way."""
        return self._held_locally(digest)

    async def ssd_holds(self, refs: Sequence[ChunkRef]) -> set[bytes]:
        """Which of ``refs`` the SSD tier holds (none without one)."""
        if self.ssd is None or not refs:
            return set()
        return await trio.to_thread.run_sync(self._ssd_holds, refs, limiter=self._threads)

    async def load_from_ssd(self, refs: Sequence[ChunkRef]) -> list[bytes]:
        """Read ``refs`` from the SSD tier into memory (one worker thread, in order);
        the digests that were there and good."""
        if self.ssd is None:
            return []
        todo = [r for r in refs if not self._held_locally(r.digest)]
        got = await trio.to_thread.run_sync(lambda: [(r, self._ssd_get(r)) for r in todo], limiter=self._threads)
        out = []
        for r, data in got:
            if data is not None:
                self.memory.put(r, data)
                out.append(r.digest)
        return out

    async def accept_frames(self, frames: Sequence[tuple[ChunkRef, bytes]]) -> list[bytes]:
        """Verify zstd ``frames`` that arrived some other way (a profile's head) and keep
        the good ones like any fetched chunk (memory, SSD write-behind); their digests.
        A bad frame is dropped: the chunk is fetched when it is wanted, as if absent."""
        todo = [(r, f) for r, f in frames if not self._held_locally(r.digest)]

        def open_all() -> list[tuple[ChunkRef, bytes]]:
            good = []
            for r, f in todo:
                try:
                    good.append((r, open_chunk(r, f)))
                except CorruptChunk:
                    pass
            return good

        good = await trio.to_thread.run_sync(open_all, limiter=self._threads)
        for r, data in good:
            if not self._held_locally(r.digest):
                self._fill(r, data, may_drop=False, defer=True)
        return [r.digest for r, _d in good]

    def claim_background(self, refs: Sequence[ChunkRef]) -> list[tuple[ChunkRef, _Flight]]:
        """Mark as in flight, for a stream, those of ``refs`` nobody holds or fetches.
        Call right before reading them (no await in between) and always
        :meth:`settle_background` the result."""
        claimed: list[tuple[ChunkRef, _Flight]] = []
        for r in refs:
            if self._held_locally(r.digest):
                continue
            f = self._inflight[r.digest] = _Flight(primary=False, background=True)
            claimed.append((r, f))
        return claimed

    def settle_background(self, claimed: Sequence[tuple[ChunkRef, _Flight]], got: dict[bytes, bytes]) -> None:
        """Fill what a stream's read brought and release whoever waits on its chunks.
        Their SSD copies wait (:meth:`save_deferred`): writing ~160 MB of files while a
        cold workload starts took CPU it needed, and held the stream back whenever the
        write-behind queue was full."""
        self._settle(claimed, got, may_drop=False, defer=True)
        self._prefetched += sum(1 for r, _f in claimed if r.digest in got)

    async def save_deferred(self, *, paced: bool = True) -> int:
        """Write the SSD copies of the stream's chunks that are still in memory (those
        the memory tier evicted meanwhile are fetched again by the next mount that
        needs them); waits for write-behind room and, ``paced``, while demand reads
        fetch. Returns how many were queued."""
        queued = 0
        while self._deferred:
            await self._wait_for_fill_room()
            if paced:
                await self.wait_for_no_demand()
            batch = [self._deferred.pop(d) for d in list(itertools.islice(self._deferred, FILL_BATCH_CHUNKS))]
            for r in batch:
                data = self.memory.peek(r.digest)
                if data is not None:
                    self._fill(r, data, may_drop=False)
                    queued += 1
        return queued

    async def wait_for_fill_room(self) -> None:
        """Wait until the SSD write-behind queue has room (background work only)."""
        await self._wait_for_fill_room()

    async def fetch_span_below(self, refs: Sequence[ChunkRef]) -> tuple[dict[bytes, bytes], int, int]:
        """Fetch ``refs`` (one pack, offset order) for a stream: from the remote tiers
        first, as background requests, then what they lack with one ranged blob read
        (retried once). Returns (chunks, compressed bytes moved, requests made)."""
        got: dict[bytes, bytes] = {}
        moved = requests = 0
        for tier in self.remote_tiers:
            want = [r for r in refs if r.digest not in got]
            if not want:
                break
            more = await self._ask_remote(tier, want, True)
            requests += 1
            moved += sum(r.clen for r in want if r.digest in more)
            got.update(more)
        rest = [r for r in refs if r.digest not in got]
        if rest and self.remote_tiers:  # the store only within the budget (and not around a zone just down)
            got = await self._wait_for_store(refs, got, True, lambda g: all(r.digest in g for r in refs))
            rest = [r for r in refs if r.digest not in got]
        if rest:
            self._fetches += 1
            for attempt in range(2):
                try:
                    more, nbytes = await trio.to_thread.run_sync(self.blob.fetch_span, rest, limiter=self._threads,
                                                                 abandon_on_cancel=True)
                except (BlobStoreError, OSError) as e:
                    if attempt:
                        raise ChunkUnavailable(rest[0], f"blob store: {e}") from e
                    self._retries += 1
                    await trio.sleep(self.backoff)
                    continue
                requests += 1
                moved += nbytes
                got.update(more)
                break
        return got, moved, requests

    # ---- statistics --------------------------------------------------------------

    def stats(self) -> ChainStats:
        """A frozen snapshot of every tier's counters and the chain's own."""
        tiers: list[TierStats] = [self.memory.stats()]
        if self.ssd is not None:
            tiers.append(self.ssd.stats())
        for t in self.remote_tiers:
            snap = self._remote_counters[t.name].snapshot()
            rejected = getattr(t, "corrupt", 0)  # chunks a verifying tier dropped itself
            tiers.append(dataclasses.replace(snap, corrupt=snap.corrupt + rejected) if rejected else snap)
        tiers.append(self.blob.stats())
        budget = self.store_budget
        return ChainStats(
            tiers=tuple(tiers), gets=self._gets, joined=self._joined, fetches=self._fetches,
            retries=self._retries, unavailable=self._unavailable, prefetched=self._prefetched,
            prefetch_failed=self._prefetch_failed, fill_pending=self._fill_bytes,
            fill_dropped=self._fill_dropped,
            direct_reads=budget.taken if budget else 0,
            direct_waits=(budget.waited if budget else 0) + self._background_held,
            stored=self._stored, store_failed=self._store_failed,
        )


class _Pace:
    """A budget of ``rate`` bytes a second: :meth:`spend` sleeps off what ran ahead of it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._free_at = 0.0

    async def spend(self, nbytes: int) -> None:
        now = trio.current_time()
        self._free_at = max(now, self._free_at) + nbytes / self.rate
        if self._free_at > now:
            await trio.sleep(self._free_at - now)


def _verified(by_digest: dict[bytes, ChunkRef], offered: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """(worker thread) The offered chunks whose bytes match their digest and size."""
    good: dict[bytes, bytes] = {}
    for d, v in offered.items():
        if len(v) != by_digest[d].ulen:
            continue
        try:
            verify(d, v)
        except CorruptChunk:
            continue
        good[d] = bytes(v)
    return good
