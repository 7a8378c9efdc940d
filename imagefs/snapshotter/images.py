"""The store's images as containerd sees them: by the chain IDs of their layers.

Every name in the store records where its image was indexed from (its *origin*, kept
with the name by :mod:`indexer.catalog`): the layers' diff IDs, their compressed digests
and media types, the manifest's digest and the source reference (names written before
origins recorded diff IDs never match). From the diff IDs come the chain IDs, one per
layer (:mod:`.chain`). An image is served whole, as its flattened tree, so a snapshot can be
remote only if the image being pulled reaches the *top* of a store image: its chain
passes through a store image's last chain ID. The snapshot of a lower layer of that
image is remote too (a placeholder containerd needs as the parent of the next), and only
the top one is ever mounted.

Whether the image being pulled reaches a store image's top is decided from what
containerd's labels say about the layers above the one asked for:

- the layer asked for *is* a store image's top: always;
- ``containerd.io/snapshot/imagefs.diff-ids`` (``imagefs pull`` sets it): the diff IDs
  of this layer and those above it, so the chain IDs above are computed exactly;
- ``containerd.io/snapshot/cri.image-layers`` (the CRI plugin, nerdctl and ``imagefs
  pull`` set it): the compressed digests of this layer and those above it, matched
  against the store image's own layer digests;
- ``containerd.io/snapshot/cri.manifest-digest``: the store image was indexed from
  this very manifest.

Without any of these (a plain client pull) only a store image's top layer is remote,
and the layers below it are downloaded and unpacked as usual: correct, not lazy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from cache.blobstore import BlobStore
from imagefs.snapshotter.chain import chain_ids, is_digest

SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
DIFF_IDS_LABEL = "containerd.io/snapshot/imagefs.diff-ids"
CRI_IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
CRI_MANIFEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
REFRESH_INTERVAL_S = 2.0  # a chain ID not found is looked for again in the store at most this often


@dataclass(frozen=True)
class StoreImage:
    """One index of the store, as far as containerd's names for it go."""

    digest: str  # the index's digest (what a mount is made of)
    name: str  # a name that points at it ("" if none)
    chain: tuple[str, ...]  # chain ID after each layer
    layer_digests: tuple[str, ...]  # compressed digests, as the manifest listed them
    manifest_digest: str
    layers: tuple[tuple[str, int, str], ...] = ()  # (digest, size, media type) of each layer
    diff_ids: tuple[str, ...] = ()
    source: str = ""  # where it was indexed from (docker://... for a registry)

    @property
    def top(self) -> str:
        return self.chain[-1]


def image_from_origin(digest: str, name: str, origin: dict) -> StoreImage | None:
    """The :class:`StoreImage` of a name's origin record, or None if it cannot be
    matched (written before origins recorded diff IDs, or inconsistent)."""
    diff_ids = origin.get("diff_ids")
    layers = origin.get("layers") or []
    if not diff_ids or not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        return None
    try:
        chain = chain_ids([str(d) for d in diff_ids])
    except ValueError:
        return None
    descs = tuple((str(l.get("digest", "")), int(l.get("size") or 0), str(l.get("media_type") or "")) for l in layers)
    return StoreImage(digest, name, tuple(chain), tuple(d[0] for d in descs), str(origin.get("manifest_digest") or ""),
                      descs, tuple(str(d) for d in diff_ids), str(origin.get("source") or ""))


class StoreImages:
    """The store's named images by chain ID, read again from the store's names when a
    chain ID is not found (at most every ``REFRESH_INTERVAL_S``)."""

    def __init__(self, store: BlobStore, *, refresh_interval: float = REFRESH_INTERVAL_S) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self._lock = threading.Lock()
        self._images: list[StoreImage] = []
        self._by_chain: dict[str, list[tuple[StoreImage, int]]] = {}  # chain ID -> (image, layers below + 1)
        self._by_top: dict[str, StoreImage] = {}
        self._refreshed = float("-inf")

    def refresh(self) -> None:
        """Read the store's names and their origins."""
        from indexer.catalog import list_images

        images = []
        for ref in list_images(self.store):
            image = image_from_origin(ref.digest, ref.name, ref.origin) if ref.name and ref.origin else None
            if image is not None:
                images.append(image)
        with self._lock:
            self._images = images
            self._rebuild()
            self._refreshed = time.monotonic()

    def _rebuild(self) -> None:
        by_chain: dict[str, list[tuple[StoreImage, int]]] = {}
        by_top: dict[str, StoreImage] = {}
        for image in self._images:
            for depth, chain in enumerate(image.chain, 1):
                by_chain.setdefault(chain, []).append((image, depth))
            by_top.setdefault(image.top, image)
        self._by_chain, self._by_top = by_chain, by_top

    def _maybe_refresh(self, found: bool) -> None:
        if not found and time.monotonic() - self._refreshed >= self.refresh_interval:
            self.refresh()

    def by_top(self, chain: str) -> StoreImage | None:
        """A store image whose whole tree is the snapshot ``chain`` names."""
        self._maybe_refresh(chain in self._by_top)
        return self._by_top.get(chain)

    def containing(self, chain: str) -> list[tuple[StoreImage, int]]:
        """Store images whose layers include ``chain`` (with its depth, 1-based)."""
        self._maybe_refresh(chain in self._by_chain)
        return list(self._by_chain.get(chain, []))

    def provider(self, chain: str, labels: dict[str, str]) -> StoreImage | None:
        """The store image that makes ``chain`` a remote snapshot for the image being
        pulled (described by containerd's ``labels``), if any (module docstring)."""
        self._maybe_refresh(chain in self._by_chain)
        candidates = self._by_chain.get(chain, [])
        for image, depth in candidates:
            if depth == len(image.chain):
                return image
        above = _label_list(labels.get(DIFF_IDS_LABEL))
        pulled_chain: set[str] = set()
        if above and above[0] and all(is_digest(d) for d in above):
            try:
                # above[0] is this layer's own diff ID; the chain continues from `chain`.
                pulled_chain = set(chain_ids(above[1:], start=chain))
            except ValueError:
                pulled_chain = set()
        layers_above = _label_list(labels.get(CRI_IMAGE_LAYERS_LABEL))
        manifest = labels.get(CRI_MANIFEST_LABEL, "")
        for image, depth in candidates:
            if image.top in pulled_chain:
                return image
            rest = list(image.layer_digests[depth - 1:])
            if layers_above and layers_above[: len(rest)] == rest:
                return image
            if manifest and manifest == image.manifest_digest:
                return image
        return None


def _label_list(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []
