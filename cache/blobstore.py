"""The blob-store interface: the durable home of every pack, index and reference.

One small synchronous interface with two implementations (a local directory, the
embedded default, and S3). Callers on the trio thread run these calls in worker
threads. Keys are '/'-separated relative names such as ``packs/<hex>``; what the keys
mean belongs to the layer above (this layer only knows that packs hold chunks).
"""

from __future__ import annotations

import os
from typing import Iterator, Protocol, runtime_checkable


class BlobStoreError(Exception):
    """The store could not do what was asked (unreachable, refused, I/O error)."""


class BlobNotFound(BlobStoreError, KeyError):
    """No blob under that key."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "blob not found"


@runtime_checkable
class BlobStore(Protocol):
    """What imagefs needs from a store. Writes are idempotent and atomic per key."""

    url: str

    def get(self, key: str) -> bytes:
        """The whole blob; :class:`BlobNotFound` if absent."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; short only if the blob is shorter."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``: readers see the old blob or the new one, never a part."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a blob."""

    def size(self, key: str) -> int:
        """The blob's size in bytes; :class:`BlobNotFound` if absent."""

    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix``, in no particular order."""

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    def check(self) -> None:
        """Raise :class:`BlobStoreError` with a clear message if the store cannot be reached."""


def list_sizes(store: BlobStore, prefix: str) -> Iterator[tuple[str, int]]:
    """(key, size) of every key under ``prefix``: from the listing itself where the store
    can (``list_sizes``: local directories, S3), else one ``size`` call per key."""
    fn = getattr(store, "list_sizes", None)
    if fn is not None:
        yield from fn(prefix)
        return
    for key in store.list(prefix):
        try:
            yield key, store.size(key)
        except BlobNotFound:
            continue


def validate_key(key: str) -> str:
    """Refuse keys that could escape a directory store or confuse S3."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise ValueError(f"invalid blob key {key!r}")
    return key


def default_store_dir() -> str:
    """The per-machine default store: ``$IMAGEFS_STORE``, else /var/lib/imagefs/store for
    root, else ``$XDG_DATA_HOME/imagefs/store``."""
    env = os.environ.get("IMAGEFS_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/imagefs/store"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "imagefs", "store")
