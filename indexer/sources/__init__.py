"""Image sources, named like skopeo's transports.

``oci:DIR[:TAG]``, ``docker-archive:FILE`` and ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``
each open to an :class:`ImageSource`: the manifest digest, the image config and the
layer blobs. Every blob is checked against its descriptor's digest and size as it is
read; :meth:`LayerBlob.open` yields the *uncompressed* tar stream and raises
:class:`SourceError` naming the layer on any mismatch, truncation or corrupt stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

if TYPE_CHECKING:
    from indexer.sources.credentials import AuthOptions


class SourceError(Exception):
    """An image that cannot be read as given: the message names the input and the problem."""


@dataclass
class LayerBlob:
    """One layer as its manifest describes it, plus how to read it.

    ``opener`` returns the raw (possibly compressed) blob stream; :meth:`open` wraps it
    with digest/size verification and decompression.
    """

    digest: str
    size: int
    media_type: str
    opener: Callable[[], BinaryIO] = field(repr=False)
    source: str = ""

    def open(self, max_bytes: int | None = None) -> BinaryIO:
        """The verified, uncompressed tar stream; it may decompress to ``max_bytes`` at
        most (None: :data:`indexer.sources.blobs.DEFAULT_MAX_LAYER_BYTES`)."""
        from indexer.sources.blobs import DEFAULT_MAX_LAYER_BYTES, open_layer

        return open_layer(self, DEFAULT_MAX_LAYER_BYTES if max_bytes is None else max_bytes)


@dataclass
class ImageSource:
    """What the build needs from an image, whatever transport it came from."""

    reference: str  # as the user gave it, for messages and the index's meta
    manifest_digest: str  # sha256:... of the manifest bytes
    config: dict[str, Any]  # the whole image config JSON (architecture, os, config, rootfs, ...)
    layers: list[LayerBlob]
    close: Callable[[], None] = field(default=lambda: None, repr=False)


def open_source(ref: str, *, platform: str | None = None, insecure: bool = False,
                auth: AuthOptions | None = None) -> ImageSource:
    """Open ``ref`` (``oci:…``, ``docker-archive:…`` or ``docker://…``); ``auth`` says
    where a registry's credentials are (:mod:`indexer.sources.credentials`)."""
    if ref.startswith("oci:"):
        from indexer.sources.oci_layout import open_oci_layout

        return open_oci_layout(ref[len("oci:"):], platform=platform)
    if ref.startswith("docker-archive:"):
        from indexer.sources.docker_archive import open_docker_archive

        return open_docker_archive(ref[len("docker-archive:"):], platform=platform)
    if ref.startswith("docker://"):
        from indexer.sources.registry import open_registry

        return open_registry(ref[len("docker://"):], platform=platform, insecure=insecure, auth=auth)
    raise SourceError(f"{ref!r}: unknown transport (use oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO[:TAG])")
