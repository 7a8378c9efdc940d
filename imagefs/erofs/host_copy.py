"""The host's copy of an image's EROFS metadata, fetched beside its index.

The metadata is mounted from a local file (the kernel reads it directly, no FUSE), kept
in the host's cache directory as ``erofs/imagefs-<index hex>.erofs`` (0600 in a 0700
directory). It comes from the store when the image was indexed with it
(:mod:`indexer.erofs.store`), fetched in the same round trip as the index
(:func:`fetch_beside`, called by imagefs.index_cache), and is otherwise written by the
daemon from the index (:mod:`imagefs.erofs.session`). Either way it is checked against
the index before it is kept and every time it is mounted.

Kept light (no trio, no FUSE): ``imagefs run`` imports it on its way to a mount.
"""

from __future__ import annotations

import logging
import os
import threading

from cache.blobstore import BlobNotFound, BlobStore
from cache.private import write_atomic
from indexer.erofs import store as erofs_store

log = logging.getLogger(__name__)

META_PREFIX = "imagefs-"
META_SUFFIX = ".erofs"


def path(cache_dir: str, index_digest: str) -> str:
    return os.path.join(cache_dir, "erofs", META_PREFIX + index_digest.partition(":")[2] + META_SUFFIX)


def write(final: str, image: bytes | bytearray) -> None:
    """Write ``image`` to ``final`` atomically (0600, its directory 0700)."""
    write_atomic(final, image, prefix=META_PREFIX + ".tmp-")


def keep_from_store(store: BlobStore, cache_dir: str, index_digest: str) -> bool:
    """Fetch the stored metadata of ``index_digest`` and keep it as the host's copy;
    False if the store has none (or a bad one: the zone's copy is retried at the store)."""
    key = erofs_store.metadata_key(index_digest)
    try:
        blob = store.get(key)
    except BlobNotFound:
        return False
    try:
        image = erofs_store.decode(blob, index_digest)
    except ValueError as e:
        inner = getattr(store, "inner", None)  # through a zone's server: ask the store itself
        if inner is None:
            log.warning("%s is unusable: %s", key, e)
            return False
        try:
            image = erofs_store.decode(inner.get(key), index_digest)
        except (BlobNotFound, ValueError) as e2:
            log.warning("%s is unusable: %s", key, e2)
            return False
    write(path(cache_dir, index_digest), image)
    return True


def fetch_beside(store: BlobStore, cache_dir: str | None, index_digest: str) -> threading.Thread | None:
    """Start fetching the metadata while the caller fetches the index (it joins)."""
    if not cache_dir or os.path.exists(path(cache_dir, index_digest)):
        return None

    def run() -> None:
        try:
            keep_from_store(store, cache_dir, index_digest)
        except Exception as e:  # the daemon writes it itself
            log.debug("EROFS metadata of %s not fetched beside its index: %r", index_digest, e)

    t = threading.Thread(target=run, name="imagefs-erofs-fetch", daemon=True)
    t.start()
    return t
