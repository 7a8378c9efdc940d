"""Content-addressed blobs (image indexes) through a zone's cache servers.

Why: every host that mounts an image first reads its index (``indexes/<blake3>``,
~0.6 MiB for a Debian + numpy image, 1.8 MiB with torch). Read from the blob store by
every host, that is one GET and one index per host: at 16 hosts it was 9% of what the
store sent for a burst, and the only store traffic that still grew with the number of
hosts (bench/RESULTS.md "Fleet burst"). An index is named by the blake3 of its own
bytes, so a zone's server can hold and serve it as it does chunks: read through once,
verified, kept on its disk; and a host trusts nothing it did not verify itself.

- :class:`BlobCache` is the server's side: a bounded in-memory LRU of verified blobs
  over files in ``<cache dir>/blobs`` (written atomically, 0600, verified again when
  read back after a restart), single flight per key, failures remembered briefly.
- :class:`ZoneBlobStore` is the host's side: a :class:`~cache.blobstore.BlobStore`
  that asks the zone's servers (the key's rendezvous owner, then the next) for
  content-addressed keys and falls back to the store it wraps for anything else, or
  when no server answers with the right bytes. Synchronous: a mount reads its index
  before its event loop starts.

Startup profiles (``profiles/<index hex>``) come through the zone too, for the same
reason (one GET per host per burst otherwise), but they are not named by their bytes and
they change (a new recording): a server keeps one for ``SHORT_LIVED_TTL`` seconds only,
in memory (an absent one too, so a burst asking for a profile an image lacks costs the
store one GET), and does not verify it. The host does: a profile carries its own
checksum and names its index (indexer.profile), and a host whose zone copy fails that
asks the store (imagefs.profile_cache). A wrong server can cost a host its replay,
never a wrong byte.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Callable, Iterator

from cache.blobstore import BlobNotFound, BlobStore
from cache.chunk import digest_of
from cache.rendezvous import Rendezvous
from cache.server_wire import parse_address

log = logging.getLogger(__name__)

BLOB_PATH = "/v3/blob/"
CONTENT_ADDRESSED = re.compile(r"^indexes/([0-9a-f]{64})$")  # keys named by the blake3 of their bytes
# Self-verifying keys not named by their bytes: startup profiles (mutable) and EROFS
# metadata (a function of the index and the writer version).
SHORT_LIVED = re.compile(r"^(?:profiles/([0-9a-f]{64})|erofs/([0-9a-f]{64})\.v[0-9]+)$")
SHORT_LIVED_TTL = 10.0  # seconds a server answers a short-lived key from memory
MAX_SHORT_LIVED = 64 << 20
MAX_BLOB = 256 << 20
DISK_CAP = 4096  # blob files a server keeps (oldest dropped first)
MEMORY_CAP = 256 << 20  # bytes of verified blobs a server keeps in memory
FAILURE_TTL = 10.0  # seconds a blob the store lacked is answered "not found" from memory
CLIENT_TIMEOUT_S = 10.0  # per socket wait of a zone fetch (a read-through is one store round trip)


def blob_digest(key: str) -> bytes | None:
    """The digest a content-addressed ``key`` names, or None for any other key."""
    m = CONTENT_ADDRESSED.match(key)
    return bytes.fromhex(m.group(1)) if m else None


def short_lived_owner_key(key: str) -> bytes | None:
    """For a short-lived key (a startup profile), the 32 bytes that pick its server."""
    m = SHORT_LIVED.match(key)
    return bytes.fromhex(m.group(1) or m.group(2)) if m else None


class ShortLived:
    """(trio thread) A server's short-lived blobs: key -> (until, bytes or None for absent)."""

    def __init__(self, ttl: float = SHORT_LIVED_TTL, cap: int = 1024, max_bytes: int = 256 << 20) -> None:
        self.ttl = ttl
        self.cap = cap
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, tuple[float, bytes | None]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[bool, bytes | None]:
        """(found, data): found with None data means the store lacks it."""
        item = self._items.get(key)
        if item is None or item[0] < now:
            return False, None
        return True, item[1]

    def keep(self, key: str, data: bytes | None, now: float) -> None:
        old = self._items.pop(key, None)
        if old is not None and old[1] is not None:
            self._bytes -= len(old[1])
        self._items[key] = (now + self.ttl, data)
        self._bytes += len(data or b"")
        while len(self._items) > self.cap or self._bytes > self.max_bytes:
            _k, (_t, gone) = self._items.popitem(last=False)
            self._bytes -= len(gone or b"")


class BlobCache:
    """The server's content-addressed blobs (see the module docstring). Thread-safe
    where it must be: :meth:`read` and :meth:`fetch` run in worker threads."""

    def __init__(self, directory: str, store: BlobStore) -> None:
        self.directory = directory
        self.store = store
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0
        self.hits = self.misses = self.corrupt = 0

    def cached(self, key: str) -> bytes | None:
        """(trio thread) A verified blob held in memory."""
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            self.hits += 1
        return data

    def keep(self, key: str, data: bytes) -> None:
        """(trio thread) Hold a verified blob in memory (bounded, LRU)."""
        if key in self._memory or len(data) > MEMORY_CAP:
            return
        self._memory[key] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > MEMORY_CAP:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key.replace("/", "-"))

    def read(self, key: str) -> bytes | None:
        """(worker thread) The blob from this server's disk, verified; a bad copy is dropped."""
        want = blob_digest(key)
        assert want is not None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BLOB + 1)
        except OSError:
            return None
        if digest_of(data) != want:
            self.corrupt += 1
            log.warning("blob cache: %s does not match its digest; dropping it", path)
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        self.hits += 1
        return data

    def fetch(self, key: str) -> bytes:
        """(worker thread) Read ``key`` through from the store, verify and keep it on
        disk. The store's errors (``BlobNotFound``, ``BlobStoreError``) pass through;
        bytes that do not match the key raise :class:`ValueError`."""
        want = blob_digest(key)
        assert want is not None
        self.misses += 1
        data = self.store.get(key)
        if len(data) > MAX_BLOB or digest_of(data) != want:
            self.corrupt += 1
            raise ValueError(f"{key}: the store's copy does not match its digest")
        self._write(key, data)
        return data

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a server that cannot keep a blob still serves it
            log.warning("blob cache: cannot keep %s: %s", key, e)
            return
        names = os.listdir(self.directory)
        if len(names) > DISK_CAP:
            paths = sorted((os.path.join(self.directory, n) for n in names), key=_mtime)
            for old in paths[:len(names) - DISK_CAP]:
                try:
                    os.unlink(old)
                except OSError:
                    pass


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


class ZoneBlobStore:
    """A :class:`~cache.blobstore.BlobStore` whose content-addressed reads go through
    the zone's cache servers first (see the module docstring)."""

    def __init__(self, store: BlobStore, servers: list[str], *, secret: str | None = None,
                 timeout: float = CLIENT_TIMEOUT_S,
                 connect: Callable[[str, int, float], http.client.HTTPConnection] | None = None) -> None:
        self.inner = store
        self.url = store.url
        self._ring = Rendezvous(servers)
        self._secret = secret
        self._timeout = timeout
        self._connect = connect or (lambda host, port, t: http.client.HTTPConnection(host, port, timeout=t))
        self.zone_hits = self.zone_misses = 0

    def get(self, key: str) -> bytes:
        owner = short_lived_owner_key(key)
        if owner is not None:  # a startup profile: the owner's copy, unverified (the caller verifies)
            for server in self._ring.rank(owner)[:1]:
                found, data = self._ask_short(server, key)
                if found:
                    self.zone_hits += 1
                    if data is None:
                        raise BlobNotFound(f"{key}: not in the store (said the zone's server {server})")
                    return data
            self.zone_misses += 1
            return self.inner.get(key)
        want = blob_digest(key)
        if want is not None:
            for server in self._ring.rank(want)[:2]:  # the owner, then one hedge
                data = self._ask(server, key)
                if data is not None and digest_of(data) == want:
                    self.zone_hits += 1
                    return data
                if data is not None:
                    log.warning("az cache %s: %s did not verify; asking the store", server, key)
            self.zone_misses += 1
        return self.inner.get(key)

    def _ask_short(self, server: str, key: str) -> tuple[bool, bytes | None]:
        """(answered, data): the server's answer for a short-lived key; data None when it
        says the store lacks it. Not answered when it fails."""
        host, port = parse_address(server)
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        conn = self._connect(host, port, self._timeout)
        try:
            conn.request("GET", BLOB_PATH + key, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_SHORT_LIVED + 1)
            if resp.status == 404:
                return True, None
            if resp.status != 200 or len(body) > MAX_SHORT_LIVED:
                return False, None
            return True, body
        except (OSError, http.client.HTTPException) as e:
            log.info("az cache %s: %s: %s", server, key, e)
            return False, None
        finally:
            conn.close()

    def _ask(self, server: str, key: str) -> bytes | None:
        host, port = parse_address(server)
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        t0 = time.monotonic()
        conn = self._connect(host, port, self._timeout)
        try:
            conn.request("GET", BLOB_PATH + key, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_BLOB + 1)
            if resp.status != 200:
                log.info("az cache %s: %s: HTTP %d", server, key, resp.status)
                return None
            log.debug("az cache %s: %s (%d bytes) in %.3fs", server, key, len(body), time.monotonic() - t0)
            return body
        except (OSError, http.client.HTTPException) as e:
            log.info("az cache %s: %s: %s", server, key, e)
            return None
        finally:
            conn.close()

    # Everything else is the wrapped store's.
    @property
    def retries_itself(self) -> bool:
        """Whether the wrapped store retries its calls (then the chunk chain does not: cache.chain)."""
        return bool(getattr(self.inner, "retries_itself", False))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def check(self) -> None:
        self.inner.check()

