"""Rendezvous (highest-random-weight) hashing of chunk digests onto cache servers.

Why rendezvous rather than a hash ring: every client of a zone must agree on which
server owns a chunk with no coordination, and when a server leaves, only the chunks
it owned may move (to their second choice), so the other servers' caches stay warm.
Rendezvous hashing gives both with no virtual nodes to tune: each (server, digest)
pair gets a pseudo-random score and the servers are ranked by it. The rank is also
the fallback order: the client hedges a failed request to the next server in it.

The score is a keyed blake2b of the digest (key: the server's name), so every client
computes the same ranking from the same ``host:port`` names, in any order given.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


class Rendezvous:
    """Ranks a fixed set of server names for each digest."""

    __slots__ = ("servers", "_keys")

    def __init__(self, servers: Sequence[str]) -> None:
        if not servers:
            raise ValueError("rendezvous hashing needs at least one server")
        if len(set(servers)) != len(servers):
            raise ValueError(f"duplicate servers in {list(servers)}")
        self.servers: tuple[str, ...] = tuple(servers)
        # blake2b keys are at most 64 bytes: hash longer names down first.
        self._keys = tuple(_key(s) for s in self.servers)

    def scores(self, digest: bytes) -> list[int]:
        """One score per server (same order as ``servers``)."""
        return [int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=k).digest(), "big")
                for k in self._keys]

    def rank(self, digest: bytes) -> list[str]:
        """Every server, the owner of ``digest`` first, then the fallbacks in order."""
        if len(self.servers) == 1:
            return [self.servers[0]]
        scored = sorted(zip(self.scores(digest), self.servers), reverse=True)
        return [s for _, s in scored]

    def owner(self, digest: bytes) -> str:
        """The server that owns ``digest`` while every server is up."""
        return self.rank(digest)[0]


def _key(name: str) -> bytes:
    raw = name.encode("utf-8")
    return raw if len(raw) <= 64 else hashlib.blake2b(raw, digest_size=64).digest()
