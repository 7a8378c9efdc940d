"""Slots shared by two classes of work: demand first, background within a share.

Why: a zone's cache server and a host's chain both serve two kinds of request. A
demand read is a process blocked in read(2); a background read (a prefetch, the
replay of a startup profile) is a guess about the future. When both want the same
scarce thing (blob-store reads in flight, disk-cache threads), demand must not queue
behind background: one host streaming a whole image in the background must not delay
another host's blocked reader. So a :class:`ClassLimiter` has ``total`` slots, of which
background work may hold at most ``background_max``: the rest are kept for demand,
which therefore never waits for a background read to finish. Waiting demand is
served before waiting background, first come first served within a class.

A waiting background ticket can be promoted (:meth:`ClassLimiter.promote`): when a
demand request joins a read that a background request started and that is still
queued, the read is now demand work, and it moves to the demand queue.

Trio only (one thread), no locks.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio


class Ticket:
    """One claim on a slot: its class, and whether it holds a slot yet."""

    __slots__ = ("demand", "granted", "_event")

    def __init__(self, demand: bool) -> None:
        self.demand = demand
        self.granted = False
        self._event = trio.Event()


class ClassLimiter:
    """``total`` slots; background work holds at most ``background_max`` of them."""

    def __init__(self, total: int, background_max: int) -> None:
        if total < 1 or not 0 < background_max <= total:
            raise ValueError(f"need total >= 1 and 0 < background_max <= total (got {total}, {background_max})")
        self.total = total
        self.background_max = background_max
        self.in_use = 0
        self.background_in_use = 0
        self._demand: deque[Ticket] = deque()
        self._background: deque[Ticket] = deque()

    @property
    def waiting(self) -> tuple[int, int]:
        """(demand, background) tickets waiting for a slot."""
        return len(self._demand), len(self._background)

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a slot for ``ticket``. Cancelled while waiting: no slot is held."""
        if not (self._demand if ticket.demand else self._background) and self._fits(ticket.demand):
            self._grant(ticket)
            await trio.lowlevel.checkpoint()
            return
        (self._demand if ticket.demand else self._background).append(ticket)
        try:
            await ticket._event.wait()
        except BaseException:
            if ticket.granted:
                self.release(ticket)
            else:
                self._discard(ticket)
            raise

    def release(self, ticket: Ticket) -> None:
        if not ticket.granted:
            raise RuntimeError("release of a ticket that holds no slot")
        ticket.granted = False
        self.in_use -= 1
        if not ticket.demand:
            self.background_in_use -= 1
        self._dispatch()

    def promote(self, ticket: Ticket) -> None:
        """Make ``ticket`` demand work (a demand request now waits on it)."""
        if ticket.demand:
            return
        if ticket.granted:  # it holds a background slot: count it as demand from now on
            ticket.demand = True
            self.background_in_use -= 1
            self._dispatch()
            return
        try:
            self._background.remove(ticket)
        except ValueError:
            ticket.demand = True
            return
        ticket.demand = True
        self._demand.append(ticket)
        self._dispatch()

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        await self.acquire(ticket)
        try:
            yield
        finally:
            self.release(ticket)

    # ---- internals -------------------------------------------------------------------

    def _fits(self, demand: bool) -> bool:
        if self.in_use >= self.total:
            return False
        return demand or self.background_in_use < self.background_max

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        self.in_use += 1
        if not ticket.demand:
            self.background_in_use += 1
        ticket._event.set()

    def _dispatch(self) -> None:
        while self._demand and self._fits(True):
            self._grant(self._demand.popleft())
        while self._background and not self._demand and self._fits(False):
            self._grant(self._background.popleft())

    def _discard(self, ticket: Ticket) -> None:
        for q in (self._demand, self._background):
            try:
                q.remove(ticket)
                return
            except ValueError:
                pass
