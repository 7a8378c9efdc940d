"""A host's copies of image indexes, so a mount does not fetch or decompress one it already has.

Indexes are immutable and named by their blake3 digest, so a local copy is as good as
the store's and never goes stale. Names are mutable, so resolving a name still asks
the store (one small GET); a digest with a local copy asks the store nothing. On a
cold host behind a 200 ms blob store this is the difference between one round trip
and two or three before the mount answers.

The copy is the index *decompressed*, mapped read-only (``mmap``) by every mount that
opens it. A stored index is a zstd blob (its digest names those bytes); decompressing
the torch index (4.6 MB) costs a fresh mount ~4 ms of CPU and ~5 ms more of page
faults on the new buffer, which was a third of what an agent-forked mount spent
before it answered. A mapped copy costs page-cache faults (16 pages at a time) on the
pages a lookup touches, and every mount of the image shares the same pages.

A copy is checked on every load: it carries the blake3 of its body, and a copy whose
body does not hash to it (damaged, truncated) is refetched from the store, verified
against the index digest, and rewritten. The body is written only after that
verification, so it is exactly the index the digest names. Copies are written to a
temporary file and renamed into place without an fsync: after a power loss a copy may be
short or torn, which the check on load turns into a refetch, never a wrong index.

Copy layout, ``DIR/indexes/<hex digest>.body``: one 4 KiB page of header (magic,
body length, blake3 of the body, zero padding), then the body, so that the body can be
mapped page-aligned at offset 4096 and read by :class:`~indexer.index.Index` as is.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct

import blake3

from cache.blobstore import BlobNotFound, BlobStore
from cache.private import private_dir, write_atomic
from imagefs import profile_cache
from imagefs.erofs import host_copy as erofs_host_copy
from indexer.catalog import ImageNotFound, index_key, is_full_digest, resolve
from indexer.format import DIGEST_PREFIX, IndexFormatError, unseal
from indexer.index import Index

log = logging.getLogger(__name__)

# How long fetching an index waits for the profile fetched beside it (then it goes on;
# the mount fetches the profile itself).
PROFILE_WAIT_S = 5.0

COPY_MAGIC = b"IFSIDXB1"
_COPY_HEADER = struct.Struct("<8sQ32s")  # magic, body length, blake3 of the body
PAGE = 4096


class CopyError(Exception):
    """A local copy that is not whole: refetch it."""


def _path(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, "indexes", digest[len(DIGEST_PREFIX):] + ".body")


def _hash(body: bytes | mmap.mmap) -> bytes:
    # One big buffer, read on the mount's critical path: worth blake3's threads.
    return blake3.blake3(body, max_threads=blake3.blake3.AUTO).digest()


def load_index(store: BlobStore, image: str, cache_dir: str | None) -> Index:
    """The verified index of ``image`` (a name or digest), from ``cache_dir`` when it
    holds a good copy, else from the store (keeping a copy for next time)."""
    if cache_dir and is_full_digest(image):
        digest = image  # a whole digest names its copy: the store need not be asked
    else:
        digest = resolve(store, image)  # a name, or a short digest (one LIST of its prefix)
    path = _path(cache_dir, digest) if cache_dir else None
    if path:  # an index names every file of an image: its copies are root's (cache.private)
        with contextlib.suppress(OSError):  # one made by an older version is tightened here
            private_dir(os.path.dirname(path))
    if path and os.path.exists(path):
        try:
            return Index(map_copy(path), digest)
        except (OSError, ValueError, CopyError, IndexFormatError) as e:
            log.warning("local copy of index %s is unusable (%s); fetching it again", digest, e)
    # What a cold mount needs next comes in the same round trip: the image's startup
    # profile (for the replay) and its EROFS metadata (written at index time).
    beside = [t for t in (profile_cache.fetch_beside(store, cache_dir, digest),
                          erofs_host_copy.fetch_beside(store, cache_dir, digest)) if t is not None]
    try:
        blob = store.get(index_key(digest))
    except BlobNotFound:
        raise ImageNotFound(f"{image}: no such image in {store.url}") from None
    finally:
        for t in beside:
            t.join(PROFILE_WAIT_S)
    body = unseal(blob, digest)  # verified against the digest before anything is kept
    index = Index(body, digest)
    if path:
        keep_copy(path, body)
    return index


def map_copy(path: str) -> mmap.mmap:
    """The body of the copy at ``path``, mapped read-only, after checking it whole."""
    with open(path, "rb") as f:
        head = f.read(_COPY_HEADER.size)
        if len(head) < _COPY_HEADER.size:
            raise CopyError("shorter than its header")
        magic, length, want = _COPY_HEADER.unpack(head)
        if magic != COPY_MAGIC:
            raise CopyError("not an index copy (bad magic)")
        if os.fstat(f.fileno()).st_size != PAGE + length:
            raise CopyError(f"{os.fstat(f.fileno()).st_size - PAGE} body bytes, its header says {length}")
        if length == 0:
            raise CopyError("empty body")
        body = mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=PAGE)
    if _hash(body) != want:
        body.close()
        raise CopyError("body does not hash to the blake3 in its header")
    return body


def keep_copy(path: str, body: bytes) -> None:
    """Write a copy atomically; a cache that cannot be written is only slower."""
    head = _COPY_HEADER.pack(COPY_MAGIC, len(body), _hash(body)).ljust(PAGE, b"\0")
    try:
        write_atomic(path, head, body)
    except OSError as e:
        log.warning("cannot keep a copy of the index at %s: %s", path, e)

