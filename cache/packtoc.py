"""A pack's table of contents: which chunks a pack object holds, and where.

Every pack ``packs/<hex>`` the indexer writes gets a table of contents
``packtoc/<hex>`` (written after the pack, so a toc means its pack is complete): one
fixed-size record per chunk, ``digest[32] offset:u64 clen:u32 ulen:u32``
(little-endian). Two readers need it: a build, to learn which chunks the store
already holds (:mod:`indexer.packer`), and the AZ cache server, to read through only
chunks that really are in a pack at the offset and sizes a request names (a made-up
ref must cost the store nothing). The format lives here, in the bottom layer,
because both of them may import it.
"""

from __future__ import annotations

import struct
from typing import Iterable

PACK_PREFIX = "packs/"
TOC_PREFIX = "packtoc/"
TOC_RECORD = struct.Struct("<32sQII")  # digest, offset, clen, ulen

# digest -> (offset, clen, ulen)
TocEntries = dict[bytes, tuple[int, int, int]]


def toc_key(pack_digest: bytes) -> str:
    return TOC_PREFIX + pack_digest.hex()


def toc_key_of_pack(pack: str) -> str | None:
    """The toc key of the pack stored under ``pack`` (``packs/<hex>``), or None when
    ``pack`` is not a pack key of that form."""
    if not pack.startswith(PACK_PREFIX):
        return None
    hexd = pack[len(PACK_PREFIX):]
    if len(hexd) != 64:
        return None
    try:
        bytes.fromhex(hexd)
    except ValueError:
        return None
    return TOC_PREFIX + hexd


def encode_toc(entries: Iterable[tuple[bytes, int, int, int]]) -> bytes:
    return b"".join(TOC_RECORD.pack(*e) for e in entries)


def decode_toc_entries(key: str, blob: bytes) -> TocEntries:
    """The records of the toc stored under ``key``; :class:`ValueError` naming it if
    the blob is not a whole number of records."""
    if len(blob) % TOC_RECORD.size:
        raise ValueError(f"{key}: truncated table of contents")
    return {digest: (offset, clen, ulen) for digest, offset, clen, ulen in TOC_RECORD.iter_unpack(blob)}
