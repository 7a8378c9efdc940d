"""The AZ cache server's wire format, shared by the server and its client.

Why a format of our own on top of plain HTTP/1.1: one round trip must carry many
neighbouring chunks (a cold start reads thousands of small files, one after another),
and the server must be able to read any of them through to the blob store, so each
request names full :class:`~cache.chunk.ChunkRef` s, not just digests. HTTP keeps the
server reachable by ordinary tools (curl, load balancers, Prometheus); the bodies are
fixed-layout binary so that neither side parses text per chunk.

Endpoints (version in the path, so a future format can live beside this one)::

    GET  /v2/chunk/<64 hex>?pack=<key>&offset=N&clen=N&ulen=N
         200 + the chunk's zstd frame | 404 not in the blob store | 502 corrupt in the
         blob store | 503 blob store unavailable | 400 bad request
    POST /v3/chunks        body: REF*   [X-Imagefs-Class: background]
                           -> 200, Transfer-Encoding: chunked, FRAME* as they resolve
    POST /v2/chunks        body: REF*   -> 200 + FRAME* (one per REF, same order)
    POST /v3/corrupt       body: digest[32]*  -> 204 (these frames did not verify here)
    GET  /health           200 "ok"
    GET  /metrics          Prometheus text format

    REF   = digest[32] offset:u64 clen:u32 ulen:u32 packlen:u16 pack[packlen] (UTF-8)
    FRAME = digest[32] status:u8 length:u32 bytes[length]   (big-endian integers)

**v3 streams.** A v3 batch answers each distinct digest of the request exactly once,
in the order the server has them (its disk cache first, read-throughs as the blob
store delivers them), each HTTP chunk holding whole frames. While it still waits for
the blob store it sends a ``ST_PROGRESS`` frame (zero digest, no bytes) at least every
heartbeat interval, so a client tells a slow server (reading through for a burst of
hosts: bytes or heartbeats keep coming) from a broken one (nothing comes): progress,
not one deadline for a whole batch, decides whether a server is alive. The request
header ``X-Imagefs-Class: background`` marks a prefetch or profile replay: the server
serves demand requests first, and background ones within a share of its blob-store
reads and disk threads. ``POST /v3/corrupt`` tells the server that frames it sent did
not verify at the client: it re-verifies those cache files before it sends them again.

A frame's status is one of the ``ST_*`` values; only ``ST_OK`` and ``ST_READ_THROUGH``
frames carry bytes: the chunk's zstd frame as the packs store it (with its content size
in the header), verified by the server. ``ST_READ_THROUGH`` says the server did not have
the chunk and read it from the blob store for this request: the zone's cache is cold
for it, which a client may act on (a mount starts its prefetch). The client decompresses and verifies it again, checking the
size against the ``ulen`` it asked for. Anything else is a miss for the client.

Version 1 sent uncompressed chunks; v2 sends frames, so a chunk crosses the zone's
network in under a third of the bytes (the torch image: 0.30x). A v1 client gets 404
from a v2 server (and falls back to the blob store), never bytes it would misread.
"""

from __future__ import annotations

import struct
from typing import Iterator

from cache.blobstore import validate_key
from cache.chunk import DIGEST_SIZE, ChunkRef

API_PREFIX = "/v2"
CHUNK_PATH = API_PREFIX + "/chunk/"
BATCH_PATH = API_PREFIX + "/chunks"
STREAM_PATH = "/v3/chunks"
CORRUPT_PATH = "/v3/corrupt"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
BATCH_CONTENT_TYPE = "application/x-imagefs-chunks"
STREAM_CONTENT_TYPE = "application/x-imagefs-chunk-stream"
CLASS_HEADER = "X-Imagefs-Class"
BACKGROUND = "background"

REF_HEAD = struct.Struct(">32sQIIH")
FRAME_HEAD = struct.Struct(">32sBI")

ST_OK = 0
ST_NOT_FOUND = 1  # the blob store has no such pack (or range)
ST_UNAVAILABLE = 2  # the blob store failed or timed out
ST_CORRUPT = 3  # the blob store's copy does not match its digest
ST_INVALID = 4  # the ref itself is malformed
ST_READ_THROUGH = 5  # like ST_OK (the frame follows), but the server read it from the blob store just now
ST_PROGRESS = 6  # (v3) no chunk: the server is alive and still reading through for this request
DATA_STATUSES = (ST_OK, ST_READ_THROUGH)
STATUS_NAMES = {ST_OK: "ok", ST_NOT_FOUND: "not found", ST_UNAVAILABLE: "unavailable",
                ST_CORRUPT: "corrupt", ST_INVALID: "invalid", ST_READ_THROUGH: "ok, read through",
                ST_PROGRESS: "progress"}
PROGRESS_DIGEST = bytes(32)
# How the single-chunk endpoint reports each status.
HTTP_STATUS = {ST_OK: 200, ST_READ_THROUGH: 200, ST_NOT_FOUND: 404, ST_UNAVAILABLE: 503, ST_CORRUPT: 502,
               ST_INVALID: 400}

# Bounds a server enforces (and a client respects when it splits its batches).
MAX_CHUNK = 64 << 20
MAX_BATCH_REFS = 1024
MAX_BATCH_BYTES = 256 << 20
MAX_PACK_KEY = 1024
MAX_CORRUPT_REPORT = 1024  # digests in one POST /v3/corrupt
# Which server of a zone owns a chunk is decided per segment of its pack, not per chunk:
# chunks stored together stay on one server, so a batch of neighbours is one contiguous
# run there (one ranged read from the store) instead of every n-th chunk on each of n
# servers (measured with 3 servers: 4,520 store GETs and 2.4 copies of the image for a
# burst that 1 server served with 52 GETs and 1 copy). A server's read-ahead stops at
# the end of a segment, which is another server's.
OWNER_SEGMENT = 8 << 20


def owner_key(ref: ChunkRef) -> bytes:
    """What rendezvous hashing ranks servers by for ``ref``: its pack segment."""
    return f"{ref.pack}#{ref.offset // OWNER_SEGMENT}".encode()


class WireError(ValueError):
    """A request or response that does not follow this format."""


class BatchTooLarge(WireError):
    """A batch over :data:`MAX_BATCH_REFS` refs or :data:`MAX_BATCH_BYTES` bytes."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); a :class:`ValueError` that names
    the input otherwise."""
    s = text.strip()
    host, sep, port_s = s.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def encode_refs(refs: list[ChunkRef]) -> bytes:
    """The body of a batch request."""
    parts: list[bytes] = []
    for r in refs:
        pack = r.pack.encode("utf-8")
        parts.append(REF_HEAD.pack(r.digest, r.offset, r.clen, r.ulen, len(pack)))
        parts.append(pack)
    return b"".join(parts)


def check_ref(ref: ChunkRef) -> ChunkRef:
    """Refuse refs a server should not act on (bad key, absurd sizes)."""
    if len(ref.digest) != DIGEST_SIZE:
        raise WireError(f"digest must be {DIGEST_SIZE} bytes")
    if not 0 < ref.clen <= MAX_CHUNK or not 0 <= ref.ulen <= MAX_CHUNK or ref.offset < 0:
        raise WireError(f"{ref}: sizes out of range (clen {ref.clen}, ulen {ref.ulen})")
    if len(ref.pack) > MAX_PACK_KEY:
        raise WireError("pack key too long")
    try:
        validate_key(ref.pack)
    except ValueError as e:
        raise WireError(str(e)) from None
    return ref


def decode_refs(body: bytes | bytearray | memoryview) -> list[ChunkRef]:
    """Parse a batch request body; :class:`WireError` if it is malformed or too large."""
    view = memoryview(body)
    refs: list[ChunkRef] = []
    pos = 0
    total = 0
    while pos < len(view):
        if pos + REF_HEAD.size > len(view):
            raise WireError("truncated ref")
        digest, offset, clen, ulen, plen = REF_HEAD.unpack_from(view, pos)
        pos += REF_HEAD.size
        if pos + plen > len(view):
            raise WireError("truncated pack key")
        try:
            pack = bytes(view[pos:pos + plen]).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("pack key is not UTF-8") from None
        pos += plen
        refs.append(check_ref(ChunkRef(digest, pack, offset, clen, ulen)))
        total += max(ulen, clen)  # bounds the blob reads as well as the response
        if len(refs) > MAX_BATCH_REFS:
            raise BatchTooLarge(f"more than {MAX_BATCH_REFS} refs in one batch")
        if total > MAX_BATCH_BYTES:
            raise BatchTooLarge(f"batch asks for more than {MAX_BATCH_BYTES} bytes")
    return refs


def iter_frames(body: bytes | bytearray | memoryview) -> Iterator[tuple[bytes, int, memoryview]]:
    """(digest, status, bytes) for each frame of a whole batch response body."""
    view = memoryview(body)
    pos = 0
    while pos < len(view):
        if pos + FRAME_HEAD.size > len(view):
            raise WireError("truncated frame header")
        digest, status, length = FRAME_HEAD.unpack_from(view, pos)
        pos += FRAME_HEAD.size
        if pos + length > len(view):
            raise WireError("truncated frame")
        yield digest, status, view[pos:pos + length]
        pos += length


def chunk_query(ref: ChunkRef) -> str:
    """The path and query of a single-chunk GET for ``ref``."""
    from urllib.parse import quote

    return (f"{CHUNK_PATH}{ref.digest.hex()}?pack={quote(ref.pack, safe='/')}"
            f"&offset={ref.offset}&clen={ref.clen}&ulen={ref.ulen}")


def parse_chunk_query(path: str) -> ChunkRef:
    """The ref named by a single-chunk GET target; :class:`WireError` if malformed."""
    from urllib.parse import parse_qs

    target, _, query = path.partition("?")
    hexd = target[len(CHUNK_PATH):]
    try:
        digest = bytes.fromhex(hexd)
    except ValueError:
        raise WireError(f"bad digest {hexd[:80]!r}") from None
    q = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    try:
        pack = q["pack"][0]
        offset, clen, ulen = (int(q[k][0]) for k in ("offset", "clen", "ulen"))
    except (KeyError, IndexError, ValueError):
        raise WireError("need pack, offset, clen and ulen query parameters") from None
    return check_ref(ChunkRef(digest, pack, offset, clen, ulen))
