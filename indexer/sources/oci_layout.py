"""The ``oci:DIR[:TAG]`` transport: an OCI image layout directory.

A layout is ``oci-layout`` (the version marker), ``index.json`` (the entry points,
tagged by the ``org.opencontainers.image.ref.name`` annotation) and content-addressed
blobs at ``blobs/<alg>/<hex>``. The walk from index.json to layers is written against
:class:`LayoutFiles`, a three-method view of "files by relative path", so the same
code reads a layout packed in a tar (``docker save`` archives without a
``manifest.json``; see :mod:`indexer.sources.docker_archive`).

Tag selection: ``DIR:TAG`` picks the index.json entries whose ref name is TAG; plain
``DIR`` takes the only entry. Several entries that differ only by platform (a
multi-platform tag) are treated as an image index and chosen from by platform.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Callable, Protocol

from indexer.sources import ImageSource, SourceError
from indexer.sources.manifest import (
    INDEX_TYPES, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Descriptor, check_digest,
    parse_index, parse_json, read_limited, resolve_image, select_platform, verify_blob,
)

LAYOUT_VERSION_MAJOR = "1."


class LayoutFiles(Protocol):
    """Read access to the files of a layout, by path relative to its root."""

    def exists(self, path: str) -> bool: ...

    def open(self, path: str) -> BinaryIO:
        """The file's bytes as a stream; FileNotFoundError if absent."""
        ...

    def size(self, path: str) -> int: ...


class DirFiles:
    """:class:`LayoutFiles` over a directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path)

    def exists(self, path: str) -> bool:
        return os.path.isfile(self._path(path))

    def open(self, path: str) -> BinaryIO:
        return open(self._path(path), "rb")

    def size(self, path: str) -> int:
        return os.path.getsize(self._path(path))


def blob_path(digest: str, what: str) -> str:
    """``blobs/<alg>/<hex>`` for a validated digest (so it cannot name another file)."""
    alg, _, hexpart = check_digest(digest, what).partition(":")
    return f"blobs/{alg}/{hexpart}"


def split_spec(spec: str) -> tuple[str, str | None]:
    """``DIR[:TAG]`` -> (DIR, TAG); a DIR that exists with a colon in its name wins."""
    if os.path.isdir(spec) or ":" not in spec:
        return spec, None
    path, _, tag = spec.partition(":")
    return path, tag or None


def open_oci_layout(spec: str, platform: str | None = None) -> ImageSource:
    """Open ``DIR[:TAG]`` (the part after ``oci:``)."""
    path, tag = split_spec(spec)
    if not os.path.isdir(path):
        raise SourceError(f"oci:{spec}: {path!r} is not a directory" if os.path.exists(path) else f"oci:{spec}: no such directory {path!r}")
    return open_layout(DirFiles(path), f"oci:{spec}", tag, platform)


def _read_file(files: LayoutFiles, path: str, limit: int, what: str) -> bytes:
    try:
        with files.open(path) as f:
            return read_limited(f, limit, f"{what}: {path}")
    except FileNotFoundError:
        raise SourceError(f"{what}: {path} is missing") from None
    except OSError as e:
        raise SourceError(f"{what}: cannot read {path}: {e}") from e


def open_layout(files: LayoutFiles, reference: str, tag: str | None, platform: str | None, close: Callable[[], None] = lambda: None) -> ImageSource:
    """The image ``tag`` (or the only one) of the layout ``files``; ``reference``
    names it in messages and in the result."""
    what = reference
    if not files.exists("oci-layout"):
        raise SourceError(f"{what}: not an OCI image layout (no oci-layout file)")
    marker = parse_json(_read_file(files, "oci-layout", 4096, what), f"{what}: oci-layout")
    version = marker.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith(LAYOUT_VERSION_MAJOR):
        raise SourceError(f"{what}: unsupported imageLayoutVersion {version!r} in oci-layout (expected 1.x)")
    index_doc = parse_json(_read_file(files, "index.json", MAX_MANIFEST_SIZE, what), f"{what}: index.json")
    entries = parse_index(index_doc, f"{what}: index.json")
    entry = _pick_entry(entries, tag, platform, what)

    def read_blob(desc: Descriptor, kind: str, limit: int) -> bytes:
        data = _read_file(files, blob_path(desc.digest, what), limit, f"{what}: {kind} blob {desc.digest}")
        verify_blob(data, desc, f"{what}: {kind} {desc.digest}")
        return data

    def fetch_manifest(desc: Descriptor) -> tuple[bytes, str]:
        return read_blob(desc, "manifest", MAX_MANIFEST_SIZE), desc.media_type

    def fetch_config(desc: Descriptor) -> bytes:
        return read_blob(desc, "config", MAX_CONFIG_SIZE)

    def layer_opener(desc: Descriptor) -> Callable[[], BinaryIO]:
        path = blob_path(desc.digest, what)
        if not files.exists(path):
            raise SourceError(f"{what}: layer blob {desc.digest} is missing ({path})")
        # The manifest's size, checked before any layer is read (the stream checks it again).
        if files.size(path) != desc.size:
            raise SourceError(f"{what}: layer blob {desc.digest}: size mismatch: the manifest says {desc.size} "
                              f"bytes, {path} has {files.size(path)}")

        def opener() -> BinaryIO:
            try:
                return files.open(path)
            except FileNotFoundError:
                raise SourceError(f"{what}: layer blob {desc.digest} is missing ({path})") from None

        return opener

    top, hint = fetch_manifest(entry)
    return resolve_image(
        reference, top, hint, platform=platform,
        fetch_manifest=fetch_manifest, fetch_config=fetch_config, layer_opener=layer_opener, close=close,
    )


def _pick_entry(entries: list[Descriptor], tag: str | None, platform: str | None, what: str) -> Descriptor:
    tags = sorted({e.ref_name for e in entries if e.ref_name})
    if tag is not None:
        found = [e for e in entries if e.ref_name == tag]
        if not found:
            raise SourceError(f"{what}: no image tagged {tag!r} (tags: {', '.join(tags) or 'none'})")
    else:
        found = entries
        if not found:
            raise SourceError(f"{what}: index.json lists no images")
    if len(found) == 1:
        return found[0]
    if all(e.platform is not None and e.media_type not in INDEX_TYPES for e in found):
        return select_platform(found, platform, what)
    if tag is None:
        raise SourceError(f"{what}: the layout holds {len(found)} images; name one as DIR:TAG (tags: {', '.join(tags) or 'none'})")
    raise SourceError(f"{what}: {len(found)} entries are tagged {tag!r} and they are not one per platform")

