"""Names and digests of the images in a store.

An index lives at ``indexes/<hex>`` under its own blake3 digest; a name is a small
reference object ``refs/<name>`` holding ``blake3:<hex>`` on its first line and, on a
second, JSON saying where that name's image was indexed from (``source``,
``manifest_digest``, ``indexed``). The reference is written last, after every pack and
the index, so a name only ever points at a complete image.

What an image *is* (its identity, the index digest) is the tree it serves and its run
config, not how it travelled: the index holds no source reference, manifest digest or
compressed layer digests, so the same image indexed from ``oci:`` zstd, ``oci:`` gzip,
``docker-archive:`` or ``docker://`` into one store is one index, one digest, one
startup profile (profiles are keyed by index digest), and its names are aliases of it.
The provenance belongs to the *name* (as docker keeps a repo digest per repository
name), so it lives in the reference.

Names follow docker's grammar and shortening: ``docker.io/library/debian:12`` is
``debian:12``; other registries keep their host (``127.0.0.1:5055/np:gzip``); a
by-digest reference is ``REPO@sha256:<hex>``. Wherever an IMAGE is taken it may also be
a digest, whole or a unique prefix (``blake3:aa3a88d4``, or bare hex of at least
:data:`MIN_SHORT_HEX` digits), as docker takes image ids.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from cache.blobstore import BlobNotFound, BlobStore
from indexer.format import DIGEST_PREFIX
from indexer.index import Index

INDEX_PREFIX = "indexes/"
REF_PREFIX = "refs/"
MIN_SHORT_HEX = 4  # bare hex shorter than this is taken as a name only
_COMPONENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"^{_COMPONENT}(?:[/:]{_COMPONENT})*(?:@sha256:[0-9a-f]{{64}})?$")
_DIGEST = re.compile(r"^blake3:[0-9a-f]{64}$")
_SHORT = re.compile(r"^(?:blake3:([0-9a-f]{1,64})|([0-9a-f]{%d,64}))$" % MIN_SHORT_HEX)
DOCKER_HUB_PREFIXES = ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/")


class ImageNotFound(LookupError):
    """No image by that name or digest in the store."""


class InvalidImageName(ValueError):
    """A name that cannot be a reference."""


class AmbiguousImage(LookupError):
    """A short digest that more than one image in the store starts with."""


def normalize_name(name: str) -> str:
    """Docker's familiar form: ``docker.io/library/x`` and ``docker.io/x`` lose the prefix."""
    for prefix in DOCKER_HUB_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    return name


def validate_name(name: str) -> str:
    """``name`` in its familiar form, or :class:`InvalidImageName`."""
    name = normalize_name(name)
    if len(name) > 255 or not _NAME.match(name) or ".." in name:
        raise InvalidImageName(
            f"invalid image name {name!r}: use letters, digits, '.', '_', '-', separated by '/' or ':' "
            "(and optionally @sha256:<hex>)"
        )
    return name


def is_full_digest(image: str) -> bool:
    """Whether ``image`` is a whole ``blake3:<64 hex>`` digest."""
    return bool(_DIGEST.match(image))


def index_key(digest: str) -> str:
    if not _DIGEST.match(digest):
        raise InvalidImageName(f"invalid image digest {digest!r} (expected blake3:<64 hex>)")
    return INDEX_PREFIX + digest[len(DIGEST_PREFIX):]


def ref_key(name: str) -> str:
    return REF_PREFIX + validate_name(name)


@dataclass(frozen=True)
class RefRecord:
    """What ``refs/<name>`` holds: the digest and where that name's image came from."""

    digest: str
    origin: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        lines = [self.digest]
        if self.origin:
            lines.append(json.dumps(self.origin, sort_keys=True, separators=(",", ":")))
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> "RefRecord":
        text = raw.decode(errors="replace")
        first, _, rest = text.partition("\n")
        digest = first.strip()
        if not _DIGEST.match(digest):
            raise ImageNotFound(f"{where}: reference is corrupt ({text[:80]!r})")
        origin: dict[str, Any] = {}
        if rest.strip():
            try:
                loaded = json.loads(rest)
                origin = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                origin = {}  # the digest is what matters; a damaged note is dropped
        return cls(digest, origin)


def read_ref(store: BlobStore, name: str) -> RefRecord | None:
    """The reference ``name`` (None if there is none)."""
    try:
        raw = store.get(ref_key(name))
    except BlobNotFound:
        return None
    return RefRecord.decode(raw, f"{name} in {store.url}")


def find_by_prefix(store: BlobStore, hexprefix: str) -> list[str]:
    """The digests of every index whose hex starts with ``hexprefix`` (one LIST)."""
    return sorted(DIGEST_PREFIX + key[len(INDEX_PREFIX):] for key in store.list(INDEX_PREFIX + hexprefix))


def resolve(store: BlobStore, image: str) -> str:
    """The digest of ``image`` in ``store``: a name, a whole ``blake3:`` digest, or a
    unique digest prefix (``blake3:<hex>``, or bare hex of at least MIN_SHORT_HEX
    digits when no name matches), as docker resolves image ids."""
    if _DIGEST.match(image):
        if not store.exists(index_key(image)):
            raise ImageNotFound(f"{image}: no such image in {store.url}")
        return image
    short = _SHORT.match(image)
    if image.startswith(DIGEST_PREFIX) and not short:
        index_key(image)  # raises InvalidImageName naming the bad digest
    if not image.startswith(DIGEST_PREFIX):
        try:
            ref = read_ref(store, image)
        except InvalidImageName:
            if not short:
                raise ImageNotFound(f"{image}: no such image in {store.url} (not a valid name or digest)") from None
            ref = None
        if ref is not None:
            return ref.digest
        if not short:
            raise ImageNotFound(f"{image}: no such image in {store.url} (see 'imagefs images')")
    assert short is not None
    hexprefix = short.group(1) or short.group(2)
    found = find_by_prefix(store, hexprefix)
    if not found:
        raise ImageNotFound(f"{image}: no such image in {store.url} (no name, and no digest starts with {hexprefix})")
    if len(found) > 1:
        shown = ", ".join(d[: len(DIGEST_PREFIX) + 16] for d in found[:5]) + (", ..." if len(found) > 5 else "")
        raise AmbiguousImage(f"{image}: ambiguous short digest: {len(found)} images start with it ({shown}); "
                             "give more digits")
    return found[0]


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


def set_ref(store: BlobStore, name: str, digest: str, origin: dict[str, Any] | None = None) -> str | None:
    """Point ``name`` at ``digest``: the last write of a build, making the image visible.
    Returns the digest ``name`` pointed at before, if it was another one (the caller
    says so: that image has one name fewer, and may now have none)."""
    index_key(digest)
    try:
        old = read_ref(store, name)
    except ImageNotFound:  # a corrupt reference is simply replaced
        old = None
    record = RefRecord(digest, {**(origin or {}), "indexed": int(time.time())} if origin is not None else {})
    store.put(ref_key(name), record.encode())
    return old.digest if old is not None and old.digest != digest else None


def remove_ref(store: BlobStore, name: str) -> str:
    """Delete the name ``name``; returns the digest it pointed at."""
    ref = read_ref(store, name)
    if ref is None:
        raise ImageNotFound(f"{name}: no such image name in {store.url} (see 'imagefs images')")
    store.delete(ref_key(name))
    return ref.digest


@dataclass(frozen=True)
class ImageRef:
    name: str
    digest: str
    origin: dict[str, Any] = field(default_factory=dict, compare=False)


def list_images(store: BlobStore) -> list[ImageRef]:
    """Every named image, sorted by name; indexes no name points at (docker's dangling
    images, ``<none>``) are listed by digest with the name ""."""
    out: list[ImageRef] = []
    named: set[str] = set()
    for key in store.list(REF_PREFIX):
        name = key[len(REF_PREFIX):]
        try:
            rec = RefRecord.decode(store.get(key), f"{name} in {store.url}")
        except (BlobNotFound, ImageNotFound):
            continue
        out.append(ImageRef(name, rec.digest, rec.origin))
        named.add(rec.digest)
    for key in store.list(INDEX_PREFIX):
        digest = DIGEST_PREFIX + key[len(INDEX_PREFIX):]
        if digest not in named:
            out.append(ImageRef("", digest))
    return sorted(out, key=lambda r: (r.name == "", r.name, r.digest))


def names_of(store: BlobStore, digest: str) -> list[str]:
    """Every name that points at ``digest``."""
    return [r.name for r in list_images(store) if r.name and r.digest == digest]
