"""A host's budget of direct blob-store reads while it has a zone cache.

Why: with an AZ cache server, a host reads the blob store only through the zone's
server, which reads each chunk once for every host of the zone. When the server is
down or broken (refused, reset, wrong bytes, no progress), the hosts must still
finish their reads, so they go to the store themselves; but a whole zone doing that
at once is the herd the server exists to prevent (the store's egress and request
rate grow with the number of hosts, and S3 answers a herd with 503 SlowDown). So each
host gets a token bucket of ranged reads: a burst of ``burst`` reads, refilled at
``per_s`` a second. Demand reads may spend the last token; background reads
(prefetch, profile replay) only those above a reserve of half the burst, so a host's
blocked readers are never starved of the store by its own guesses.

A read that finds no token waits (:meth:`StoreBudget.take` says how long); the chain
asks the zone again after the wait, so a server that comes back takes the reads over.
The clock is injectable for tests (trio's MockClock works through ``trio.current_time``).
"""

from __future__ import annotations

from typing import Callable

DEFAULT_BURST = 64
DEFAULT_PER_S = 16.0


def parse_budget(text: str) -> tuple[int, float]:
    """``"BURST[,PER_S]"`` -> (burst, per_s); a :class:`ValueError` naming the input."""
    head, sep, tail = text.strip().partition(",")
    try:
        burst = int(head)
        per_s = float(tail) if sep else DEFAULT_PER_S
    except ValueError:
        raise ValueError(f"{text!r}: expected BURST[,PER_SECOND], e.g. 64,16") from None
    if burst < 1 or not per_s > 0:
        raise ValueError(f"{text!r}: the burst must be >= 1 and the rate > 0")
    return burst, per_s


class StoreBudget:
    """A token bucket of direct blob-store reads (see the module docstring)."""

    def __init__(self, burst: int = DEFAULT_BURST, per_s: float = DEFAULT_PER_S, *,
                 clock: Callable[[], float] | None = None) -> None:
        if burst < 1 or not per_s > 0:
            raise ValueError("a store budget needs burst >= 1 and per_s > 0")
        self.burst = burst
        self.per_s = per_s
        self.reserve = burst / 2  # background reads leave this much for demand
        self._clock = clock
        self._tokens = float(burst)
        self._at: float | None = None
        self.taken = 0  # reads granted
        self.waited = 0  # times a read found no token and had to wait

    def describe(self) -> str:
        return f"{self.burst} reads, then {self.per_s:g}/s"

    def take(self, *, background: bool = False) -> float:
        """Spend one read: 0.0 if granted, else the seconds until one may be (the caller
        waits that long, asks the zone again, and calls this again)."""
        now = self._now()
        self._refill(now)
        floor = self.reserve if background else 0.0
        if self._tokens >= floor + 1:
            self._tokens -= 1
            self.taken += 1
            return 0.0
        self.waited += 1
        return max((floor + 1 - self._tokens) / self.per_s, 1e-3)

    def tokens(self) -> float:
        self._refill(self._now())
        return self._tokens

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        import trio

        return trio.current_time()

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_s)
        self._at = now
