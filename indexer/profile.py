"""Startup profiles: what a workload reads first, kept beside the image it belongs to.

A container reads a few percent of its image to start, and nearly the same few percent
every time. A profile records which chunks were read, in order of first access, so the
next cold start can stream exactly those chunks at mount (:mod:`imagefs.replay`) in a few
large ranged reads instead of paying a blob-store round trip per miss.

What a profile holds, and why:

- **Chunk numbers of one index**, not digests: 4 bytes instead of 32, and a profile is
  only ever meaningful for the index it was recorded on (the same digest can sit at
  another place of another image's tree). The profile names that index's digest, and a
  profile whose index digest is not the mounted one is refused.
- Per entry, the first access time (ms after the recording started; merged recordings
  keep the earliest), the file that first read it (for ``imagefs inspect``), and how many
  recordings read it.
- Optionally (``imagefs optimize``), where a copy of each chunk's zstd frame sits in one
  of a few *startup packs*, in access order, so the whole working set comes in a handful
  of sequential ranged reads. The frame is copied verbatim, so its size is the index's;
  the bytes are verified by their digest on arrival like any chunk, so a wrong location
  can cost a refetch, never a wrong byte. The index, and so the image digest, do not
  change: dedup with other images holds, and the profile can be re-recorded freely.

Where it lives: ``profiles/<index hex>``, one object per image. It is not addressed by
its own digest because a mount must find it from the index digest alone in one round
trip (a pointer object would cost a second). It verifies itself instead: the body ends
with the blake3 of everything before it, and names its index. Writing a new profile
replaces the object atomically; a running mount keeps the one it loaded.

- Optionally (``imagefs optimize``), a *head*: the zstd frames of the first few MiB of
  the working set, inline. The profile is fetched beside the index in the same round trip
  (imagefs.profile_cache), so these chunks are on the host before the first ranged read
  of the replay could answer: what the container's start reads first (its user
  database, the shell, the dynamic loader) does not wait a round trip.

Body layout (little-endian), stored zstd-compressed::

    header   MAGIC, version, flags, index digest (32), entries, packs, recordings, created,
             head chunks, head bytes
    packs    32-byte startup pack digests (blob key ``packs/<hex>``)
    entries  ENTRY records in replay order
    head     the frames of the first ``head chunks`` entries, back to back
    trailer  blake3 of everything above (32)
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import zstandard

from cache.blobstore import BlobNotFound, BlobStore
from cache.chunk import ChunkRef, digest_of
from indexer.format import DIGEST_PREFIX
from indexer.index import Index, pack_key

MAGIC = b"IMGFSPRF"
VERSION = 1
PROFILE_PREFIX = "profiles/"
# magic, version, flags, index digest, n_entries, n_packs, recordings, created (unix s)
# ... then the head: how many of the first entries have their frames inline, and their bytes
HEADER = struct.Struct("<8sII32sIIIQIQ")
# chunk number, inode, first access ms, recordings that read it, startup pack (NO_PACK: none), offset
ENTRY = struct.Struct("<IIIHHQ")
TRAILER = 32
FLAG_OPTIMIZED = 1
NO_PACK = 0xFFFF
MAX_PACKS = NO_PACK
MAX_ENTRIES = 1 << 24  # a profile larger than this is not one we wrote
MAX_HEAD = 64 << 20
MAX_BLOB = HEADER.size + MAX_ENTRIES * ENTRY.size + MAX_PACKS * 32 + MAX_HEAD + TRAILER


class ProfileError(ValueError):
    """A profile that cannot be used for this image; the message says why."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One chunk of a profile, in replay order."""

    chunk: int  # chunk-table number in the index
    ino: int  # the file that first read it
    t_ms: int  # first access, ms after its recording started (merged: the earliest)
    seen: int = 1  # how many recordings read it
    pack: int = NO_PACK  # startup pack number, or NO_PACK
    offset: int = 0  # offset of the chunk's frame in that startup pack


@dataclass(frozen=True)
class Profile:
    """The startup profile of one index. ``entries`` are in replay order."""

    index_digest: str
    entries: tuple[Entry, ...]
    recordings: int = 1
    packs: tuple[bytes, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    # The zstd frames of the first ``head_chunks`` entries, back to back: they come with
    # the profile itself (fetched beside the index), before any ranged read.
    head_chunks: int = 0
    head: bytes = b""
    # Laid out by ``imagefs optimize`` for this order: every entry either has a copy in a
    # startup pack or sits in a run of its own pack that one ranged read brings.
    optimized: bool = False

    @property
    def laid_out(self) -> int:
        """How many entries have a copy in a startup pack."""
        return sum(1 for e in self.entries if e.pack != NO_PACK)

    def without_layout(self) -> "Profile":
        """The same profile with no startup packs and no head (what a new recording merges into)."""
        return replace(self, packs=(), entries=tuple(replace(e, pack=NO_PACK, offset=0) for e in self.entries),
                       head_chunks=0, head=b"", optimized=False)


def profile_key(index_digest: str) -> str:
    if not index_digest.startswith(DIGEST_PREFIX) or len(index_digest) != len(DIGEST_PREFIX) + 64:
        raise ProfileError(f"invalid index digest {index_digest!r}")
    return PROFILE_PREFIX + index_digest[len(DIGEST_PREFIX):]


# -- encode / decode -----------------------------------------------------------------


def encode(profile: Profile) -> bytes:
    """The stored blob of ``profile`` (zstd around a self-verifying body)."""
    if len(profile.packs) > MAX_PACKS:
        raise ProfileError(f"{len(profile.packs)} startup packs (at most {MAX_PACKS})")
    if profile.head_chunks > len(profile.entries) or len(profile.head) > MAX_HEAD:
        raise ProfileError(f"a head of {profile.head_chunks} chunks, {len(profile.head)} bytes, is not possible here")
    body = bytearray(HEADER.pack(
        MAGIC, VERSION, FLAG_OPTIMIZED if profile.optimized else 0, bytes.fromhex(profile_key(profile.index_digest)[len(PROFILE_PREFIX):]),
        len(profile.entries), len(profile.packs), min(profile.recordings, 0xFFFFFFFF), profile.created,
        profile.head_chunks, len(profile.head),
    ))
    for p in profile.packs:
        body += p
    for e in profile.entries:
        body += ENTRY.pack(e.chunk, e.ino, min(e.t_ms, 0xFFFFFFFF), min(e.seen, 0xFFFF), e.pack, e.offset)
    body += profile.head
    body += digest_of(body)
    # The head's frames are compressed already: a fast level for the whole.
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(body))


def decode(blob: bytes, where: str = "profile") -> Profile:
    """Parse and verify a stored profile (its own checksum; not yet against an index)."""
    try:
        if zstandard.frame_content_size(blob) > MAX_BLOB:
            raise ProfileError(f"{where}: claims an impossible size")
        body = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_BLOB)
    except zstandard.ZstdError as e:
        raise ProfileError(f"{where}: not a valid profile (zstd: {e})") from e
    if len(body) < HEADER.size + TRAILER:
        raise ProfileError(f"{where}: too short to be a profile")
    if digest_of(memoryview(body)[:-TRAILER]) != body[-TRAILER:]:
        raise ProfileError(f"{where}: damaged (its checksum does not match)")
    (magic, version, flags, index_raw, n_entries, n_packs, recordings, created, head_chunks,
     head_len) = HEADER.unpack_from(body, 0)
    if magic != MAGIC:
        raise ProfileError(f"{where}: not a profile (bad magic)")
    if version != VERSION:
        raise ProfileError(f"{where}: profile format version {version} is not supported (this imagefs reads {VERSION})")
    if len(body) != HEADER.size + n_packs * 32 + n_entries * ENTRY.size + head_len + TRAILER:
        raise ProfileError(f"{where}: its size does not match its header")
    if head_chunks > n_entries or (head_len == 0) != (head_chunks == 0):
        raise ProfileError(f"{where}: a head of {head_chunks} chunks in {head_len} bytes")
    pos = HEADER.size
    packs = tuple(bytes(body[pos + 32 * i: pos + 32 * (i + 1)]) for i in range(n_packs))
    pos += 32 * n_packs
    entries = tuple(Entry(*fields) for fields in ENTRY.iter_unpack(memoryview(body)[pos: pos + n_entries * ENTRY.size]))
    pos += n_entries * ENTRY.size
    head = bytes(body[pos: pos + head_len])
    for e in entries:
        if e.pack != NO_PACK and e.pack >= n_packs:
            raise ProfileError(f"{where}: an entry names startup pack {e.pack} of {n_packs}")
    return Profile(DIGEST_PREFIX + index_raw.hex(), entries, recordings, packs, created, head_chunks, head,
                   bool(flags & FLAG_OPTIMIZED))


def check_against(profile: Profile, index: Index, where: str = "profile") -> None:
    """Refuse a profile that does not belong to ``index`` or names chunks it lacks."""
    if profile.index_digest != index.digest:
        raise ProfileError(f"{where}: recorded for index {profile.index_digest}, not {index.digest}")
    seen: set[int] = set()
    n = index.n_chunks
    for e in profile.entries:
        if not 0 <= e.chunk < n:
            raise ProfileError(f"{where}: names chunk {e.chunk}, but the index has {n}")
        if e.chunk in seen:
            raise ProfileError(f"{where}: names chunk {e.chunk} twice")
        seen.add(e.chunk)
    if profile.head_chunks:
        want = sum(index.chunk(e.chunk).clen for e in profile.entries[:profile.head_chunks])
        if want != len(profile.head):
            raise ProfileError(f"{where}: its head holds {len(profile.head)} bytes, its chunks take {want}")


def head_frames(profile: Profile, index: Index) -> list[tuple[ChunkRef, bytes]]:
    """The chunks whose frames came inline with the profile, each with its frame (to be
    verified by whoever uses it, like any chunk that arrives)."""
    out: list[tuple[ChunkRef, bytes]] = []
    pos = 0
    for e in profile.entries[:profile.head_chunks]:
        ref = index.chunk(e.chunk)
        out.append((ref, profile.head[pos: pos + ref.clen]))
        pos += ref.clen
    return out


# -- in the store --------------------------------------------------------------------


def load(store: BlobStore, index: Index) -> Profile | None:
    """The profile of ``index`` in ``store``, verified against it; None if it has none.

    Raises :class:`ProfileError` for one that exists but cannot be used (damaged,
    another image's, naming chunks the index lacks): the caller decides whether that
    is fatal (it never is for a mount).
    """
    key = profile_key(index.digest)
    try:
        blob = store.get(key)
    except BlobNotFound:
        return None
    profile = decode(blob, f"{store.url}/{key}")
    check_against(profile, index, f"{store.url}/{key}")
    return profile


def save(store: BlobStore, profile: Profile) -> None:
    """Write ``profile`` as its image's profile (replacing any other, atomically)."""
    store.put(profile_key(profile.index_digest), encode(profile))


def delete(store: BlobStore, index_digest: str) -> None:
    store.delete(profile_key(index_digest))


def referenced_packs(profile: Profile) -> list[str]:
    """The blob keys of the startup packs a profile reads (what garbage collection keeps)."""
    return [pack_key(p) for p in profile.packs]


# -- merging and replay order ----------------------------------------------------------


def merge(profiles: Iterable[Profile]) -> Profile:
    """One profile from several recordings of the same index: the union of their
    chunks, each at its earliest first access (ties keep the earlier profile's order),
    with ``seen`` summed. A chunk that has a copy in a startup pack keeps it (the first
    one found), so merging a new recording into an optimized profile keeps what is laid
    out; ``imagefs optimize`` lays the new order out again."""
    items = list(profiles)
    if not items:
        raise ValueError("nothing to merge")
    digest = items[0].index_digest
    best: dict[int, tuple[int, int, Entry]] = {}  # chunk -> (t_ms, rank, entry)
    copy: dict[int, tuple[bytes, int]] = {}  # chunk -> (startup pack digest, offset)
    rank = 0
    recordings = 0
    for p in items:
        if p.index_digest != digest:
            raise ProfileError(f"cannot merge profiles of different indexes ({digest}, {p.index_digest})")
        recordings += p.recordings
        for e in p.entries:
            rank += 1
            if e.pack != NO_PACK and e.chunk not in copy:
                copy[e.chunk] = (p.packs[e.pack], e.offset)
            old = best.get(e.chunk)
            if old is None:
                best[e.chunk] = (e.t_ms, rank, e)
            else:
                t, r, keep = old
                seen = keep.seen + e.seen
                if e.t_ms < t:
                    best[e.chunk] = (e.t_ms, r, replace(e, seen=seen))
                else:
                    best[e.chunk] = (t, r, replace(keep, seen=seen))
    packs: dict[bytes, int] = {}
    entries: list[Entry] = []
    for _t, _r, e in sorted(best.values(), key=lambda x: (x[0], x[1])):
        where = copy.get(e.chunk)
        if where is None:
            entries.append(replace(e, pack=NO_PACK, offset=0))
        else:
            entries.append(replace(e, pack=packs.setdefault(where[0], len(packs)), offset=where[1]))
    return Profile(digest, tuple(entries), recordings, tuple(packs))  # no head: the order changed


def replay_refs(profile: Profile, index: Index) -> list[ChunkRef]:
    """The chunks to stream, in replay order: where a startup pack holds a copy, that
    copy (same digest and sizes, another place), else the index's own location."""
    keys = [pack_key(p) for p in profile.packs]
    out: list[ChunkRef] = []
    for e in profile.entries:
        ref = index.chunk(e.chunk)
        if e.pack != NO_PACK:
            ref = ChunkRef(ref.digest, keys[e.pack], e.offset, ref.clen, ref.ulen)
        out.append(ref)
    return out


def summary(profile: Profile, index: Index) -> dict[str, object]:
    """Figures for ``imagefs inspect``: chunks, bytes, layout."""
    ulen = clen = 0
    for e in profile.entries:
        ref = index.chunk(e.chunk)
        ulen += ref.ulen
        clen += ref.clen
    return {
        "chunks": len(profile.entries), "bytes": ulen, "compressed_bytes": clen,
        "recordings": profile.recordings, "startup_packs": len(profile.packs), "copied": profile.laid_out,
        "optimized": profile.optimized, "head_bytes": len(profile.head),
        "created": profile.created, "span_ms": max((e.t_ms for e in profile.entries), default=0),
    }


def entries_from(records: Sequence[tuple[int, int, int]]) -> tuple[Entry, ...]:
    """Entries from ``(chunk, inode, t_ms)`` first-access records, in their order."""
    return tuple(Entry(c, ino, t) for c, ino, t in records)


__all__ = ["Entry", "Profile", "ProfileError", "NO_PACK", "profile_key", "encode", "decode", "check_against",
           "load", "save", "delete", "merge", "replay_refs", "referenced_packs", "summary", "entries_from", "head_frames"]
