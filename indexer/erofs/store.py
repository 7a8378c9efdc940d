"""An image's EROFS metadata in the store, beside its index.

The read side can write the metadata itself from the index (:mod:`imagefs.erofs`), but
on a host's first mount of an image that costs ~300 ms on the cold path (the torch
bench image: 33,839 inodes, 4.2 MiB of metadata), before the mount can answer and
before its startup profile can start streaming. Written once at index time instead, it
is fetched beside the index, in the same round trip (imagefs.index_cache), and a cold
mount only checks it.

Key ``erofs/<index hex>.v<writer version>``: the metadata is a pure function of the
index and the writer, so a new writer version reads under a new key and falls back to
writing its own until the image is indexed again. The blob is the metadata image
zstd-compressed; it verifies itself (its header names the index and holds the blake3 of
the rest: :func:`indexer.erofs.writer.check`), so it may come through an untrusted
zone server.
"""

from __future__ import annotations

import zstandard

from indexer.erofs import writer
from indexer.erofs.slots import SlotMap
from indexer.format import DIGEST_PREFIX
from indexer.index import Index

PREFIX = "erofs/"
MAX_METADATA = 1 << 30  # a metadata image claiming more than this is not one we wrote


def metadata_key(index_digest: str) -> str:
    return f"{PREFIX}{index_digest[len(DIGEST_PREFIX):]}.v{writer.WRITER_VERSION}"


def encode(index: Index) -> bytes:
    """The stored blob of ``index``'s metadata. Raises
    :class:`~indexer.erofs.writer.Unrepresentable` (a ValueError) for an index EROFS
    cannot express (the read side then mounts it the plain way)."""
    image = writer.build(index, SlotMap.of_index(index))
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(image))


def decode(blob: bytes, index_digest: str) -> bytes:
    """The metadata image in ``blob``, checked against ``index_digest``; ValueError if
    it is not whole, not this writer's, or another index's."""
    try:
        size = zstandard.frame_content_size(blob)
        if not 0 <= size <= MAX_METADATA:
            raise ValueError(f"claims {size} bytes")
        image = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_METADATA)
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame: {e}") from e
    writer.check(image, index_digest)
    return image


__all__ = ["PREFIX", "metadata_key", "encode", "decode"]
