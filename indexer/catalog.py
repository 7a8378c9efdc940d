"""Names and digests of the images in a store.

An index lives at ``indexes/<hex>`` under its own blake3 digest; a name is a small
reference object ``refs/<name>`` holding ``blake3:<hex>``. The reference is written
last, after every pack and the index, so a name only ever points at a complete image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cache.blobstore import BlobNotFound, BlobStore
from indexer.format import DIGEST_PREFIX
from indexer.index import Index

INDEX_PREFIX = "indexes/"
REF_PREFIX = "refs/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:[/:][A-Za-z0-9][A-Za-z0-9._-]*)*$")
_DIGEST = re.compile(r"^blake3:[0-9a-f]{64}$")


class ImageNotFound(LookupError):
    """No image by that name or digest in the store."""


class InvalidImageName(ValueError):
    """A name that cannot be a reference."""


def validate_name(name: str) -> str:
    if len(name) > 255 or not _NAME.match(name) or ".." in name:
        raise InvalidImageName(
            f"invalid image name {name!r}: use letters, digits, '.', '_', '-', separated by '/' or ':'"
        )
    return name


def index_key(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise InvalidImageName(f"invalid image digest {digest!r} (expected blake3:<64 hex>)")
    return INDEX_PREFIX + digest[len(DIGEST_PREFIX):]


def ref_key(name: str) -> str:
    return REF_PREFIX + validate_name(name)


def resolve(store: BlobStore, image: str) -> str:
    """The digest of ``image`` (a name or a ``blake3:`` digest) in ``store``."""
    if image.startswith(DIGEST_PREFIX):
        if not store.exists(index_key(image)):
            raise ImageNotFound(f"{image}: no such image in {store.url}")
        return image
    try:
        digest = store.get(ref_key(image)).decode().strip()
    except BlobNotFound:
        raise ImageNotFound(f"{image}: no such image in {store.url} (see 'imagefs images')") from None
    if not _DIGEST.match(digest):
        raise ImageNotFound(f"{image}: reference in {store.url} is corrupt ({digest[:80]!r})")
    return digest


def open_image(store: BlobStore, image: str) -> Index:
    """Fetch, verify and open the index of ``image``."""
    digest = resolve(store, image)
    try:
        blob = store.get(index_key(digest))
    except BlobNotFound:
        raise ImageNotFound(f"{image}: index {digest} is missing from {store.url}") from None
    return Index.from_blob(blob, digest)


def put_index(store: BlobStore, digest: str, blob: bytes) -> None:
    store.put(index_key(digest), blob)


def set_ref(store: BlobStore, name: str, digest: str) -> None:
    """Point ``name`` at ``digest``: the last write of a build, making the image visible."""
    store.put(ref_key(name), (digest + "\n").encode())


@dataclass(frozen=True)
class ImageRef:
    name: str
    digest: str


def list_images(store: BlobStore) -> list[ImageRef]:
    """Every named image, sorted by name (unnamed indexes are listed by digest)."""
    out: list[ImageRef] = []
    named: set[str] = set()
    for key in store.list(REF_PREFIX):
        name = key[len(REF_PREFIX):]
        try:
            digest = store.get(key).decode().strip()
        except BlobNotFound:
            continue
        out.append(ImageRef(name, digest))
        named.add(digest)
    for key in store.list(INDEX_PREFIX):
        digest = DIGEST_PREFIX + key[len(INDEX_PREFIX):]
        if digest not in named:
            out.append(ImageRef("", digest))
    return sorted(out, key=lambda r: (r.name == "", r.name, r.digest))
