"""Writer leases: how a write in progress tells garbage collection what not to take yet.

A build reads the tables of contents of the packs already in the store and may then
write an index that names any of them, minutes later: until that index exists, nothing
in the store shows that the build depends on those packs. The same holds for
``imagefs optimize`` (startup packs before the profile that names them) and
``imagefs tag`` (an index before the name that keeps it). So every such writer holds a
*lease* for its whole duration: a small object ``leases/<id>`` written *before* it reads
what it may reference and deleted *after* its last write. A background thread renews it
every :data:`RENEW_S` seconds; a writer that dies stops renewing, and its lease is
treated as ended :data:`TTL_S` seconds after its last renewal.

Garbage collection (:mod:`indexer.gc`) never deletes a pack while a lease that existed
when it condemned that pack is still live (and condemning a pack first removes its table
of contents, so a writer that starts afterwards cannot pick it up). Liveness compares the
lease's last renewal, stamped with the writer's clock, with the collector's clock: hosts
that share a store must keep their clocks within a few minutes of each other (NTP), far
inside :data:`TTL_S`.

A writer whose lease lapsed (it could not renew for :data:`TTL_S`, e.g. the store was
unreachable) checks before it writes that the packs it names are all still there
(:meth:`Lease.lapsed`, used by the build), and fails rather than write an index with a
hole in it.

Body: JSON ``{"id", "what", "host", "pid", "started", "renewed", "ttl"}`` (unix seconds).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Iterator

from cache.blobstore import BlobNotFound, BlobStore, BlobStoreError

log = logging.getLogger(__name__)

LEASE_PREFIX = "leases/"
TTL_S = 15 * 60.0
RENEW_S = 60.0


@dataclass(frozen=True)
class LeaseInfo:
    """One lease as garbage collection sees it."""

    key: str
    what: str
    host: str
    pid: int
    started: float
    renewed: float
    ttl: float
    readable: bool = True

    def live(self, now: float | None = None) -> bool:
        """Whether its writer may still be running. An unreadable lease counts as live:
        it is not ours to judge (the collector reports it)."""
        if not self.readable:
            return True
        return (time.time() if now is None else now) < self.renewed + self.ttl

    def describe(self) -> str:
        if not self.readable:
            return f"{self.key} (unreadable)"
        return f"{self.what} on {self.host} pid {self.pid} (lease {self.key[len(LEASE_PREFIX):]})"


def read_leases(store: BlobStore) -> Iterator[LeaseInfo]:
    """Every lease in ``store`` (live or not)."""
    for key in store.list(LEASE_PREFIX):
        try:
            raw = store.get(key)
        except BlobNotFound:
            continue  # ended while we listed
        try:
            d = json.loads(raw)
            yield LeaseInfo(key, str(d["what"]), str(d["host"]), int(d["pid"]), float(d["started"]),
                            float(d["renewed"]), float(d["ttl"]))
        except (ValueError, KeyError, TypeError):
            yield LeaseInfo(key, "?", "?", 0, 0.0, 0.0, 0.0, readable=False)


def live_lease_keys(store: BlobStore, now: float | None = None) -> list[str]:
    return sorted(info.key for info in read_leases(store) if info.live(now))


class Lease:
    """A lease held while writing (a context manager); see the module docstring.

    ``store.put`` of the lease happens in ``__enter__``, before the caller reads
    anything it may reference; ``__exit__`` stops renewing and deletes it, after the
    caller's last write.
    """

    def __init__(self, store: BlobStore, what: str, *, ttl: float = TTL_S, renew_every: float = RENEW_S) -> None:
        self.store = store
        self.what = what
        self.ttl = ttl
        self.renew_every = min(renew_every, ttl / 3)
        self.key = LEASE_PREFIX + f"{int(time.time())}-{secrets.token_hex(8)}"
        self.started = time.time()
        self._renewed_at = 0.0  # monotonic time of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({
            "id": self.key[len(LEASE_PREFIX):], "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
            "started": self.started, "renewed": time.time(), "ttl": self.ttl,
        }).encode()

    def _write(self) -> None:
        t = time.monotonic()
        self.store.put(self.key, self._body())
        self._renewed_at = t

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self._write()
            except BlobStoreError as e:
                log.warning("cannot renew lease %s (%s): retrying in %.0f s", self.key, e, self.renew_every)

    def lapsed(self) -> bool:
        """Whether garbage collection may have judged this lease ended (no renewal
        reached the store within the last ``ttl`` seconds, minus a margin)."""
        return time.monotonic() - self._renewed_at > self.ttl * 0.8

    def __enter__(self) -> "Lease":
        self._write()  # raises: a writer that cannot take its lease does not start
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.delete(self.key)
        except BlobStoreError as e:  # it expires on its own
            log.warning("cannot delete lease %s (%s); it expires in %.0f s", self.key, e, self.ttl)


__all__ = ["Lease", "LeaseInfo", "LEASE_PREFIX", "TTL_S", "RENEW_S", "read_leases", "live_lease_keys"]
