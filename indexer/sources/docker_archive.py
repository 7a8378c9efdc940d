"""The ``docker-archive:FILE[:REF]`` transport: a ``docker save`` tarball.

The archive is read in place: its tar headers are indexed once (tarfile seeks over
the data), and each file inside is then read as a byte range of the archive through
its own file handle, so nothing is extracted to disk and layers can be read in
parallel. Layer members that are symlinks or hardlinks (``docker save`` links a layer
that appears twice) are followed.

Two shapes exist. Every ``docker save`` writes ``manifest.json`` (``Config``,
``RepoTags``, ``Layers``); docker >= 25 also makes the archive an OCI layout
(``oci-layout``, ``index.json``, ``blobs/``) with ``manifest.json`` paths pointing into
``blobs/``. ``manifest.json`` is used whenever present; an archive with only the OCI
layout is read like an ``oci:`` directory (tag = REF).

Digests: ``manifest.json`` has no layer descriptors, only paths. The one digest the
image itself vouches for is the config's ``rootfs.diff_ids`` entry, the sha256 of the
*uncompressed* layer, so that is each layer's descriptor digest, with the member's
size as its size and the Docker uncompressed media type. Layers stored compressed
(the containerd image store saves its blobs as they are) are sniffed and the digest
checked on the uncompressed stream (see :mod:`indexer.sources.blobs`). The config is
checked against the digest its file name carries. As the archive has no manifest of
its own, ``manifest_digest`` is the digest of the Docker schema 2 manifest those
descriptors make (canonical JSON), which is stable for the same archive content.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from typing import Any, BinaryIO, Callable

from indexer.sources import ImageSource, SourceError
from indexer.sources.blobs import DOCKER_LAYER, GZIP_MAGIC, ZSTD_MAGIC, Layer
from indexer.sources.manifest import (
    DOCKER_CONFIG, DOCKER_MANIFEST, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Descriptor,
    check_config_platform, check_layer_count, diff_ids, parse_config, read_limited, sha256_digest,
)
from indexer.sources.oci_layout import open_layout

MAX_LINK_HOPS = 16
_CONFIG_NAME = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?")


class _Section(io.RawIOBase):
    """A byte range of a file, read through its own unbuffered handle."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)
        self._f.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(memoryview(b).cast("B")[:n]) or 0
        self._left -= got
        return got

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class TarFiles:
    """Files of an uncompressed tar archive by path, read in place (LayoutFiles)."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        try:
            with tarfile.open(path, "r:") as tf:
                members = tf.getmembers()
        except (tarfile.TarError, EOFError) as e:
            raise SourceError(f"{what}: not a tar archive: {e}") from None
        except OSError as e:
            raise SourceError(f"{what}: cannot read: {e}") from e
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            self._members[self._norm(m.name)] = m

    @staticmethod
    def _norm(name: str) -> str:
        return posixpath.normpath("/" + name).lstrip("/")

    def _resolve(self, path: str) -> tarfile.TarInfo | None:
        name = self._norm(path)
        for _hop in range(MAX_LINK_HOPS):
            m = self._members.get(name)
            if m is None:
                return None
            if m.issym():
                name = self._norm(posixpath.join(posixpath.dirname(name), m.linkname))
            elif m.islnk():
                name = self._norm(m.linkname)
            else:
                return m if m.isreg() else None
        return None

    def exists(self, path: str) -> bool:
        return self._resolve(path) is not None

    def size(self, path: str) -> int:
        m = self._resolve(path)
        if m is None:
            raise FileNotFoundError(path)
        return m.size

    def open(self, path: str) -> BinaryIO:
        m = self._resolve(path)
        if m is None:
            raise FileNotFoundError(path)
        return _Section(self.path, m.offset_data, m.size)  # type: ignore[return-value]


def split_spec(spec: str) -> tuple[str, str | None]:
    """``FILE[:REF]`` -> (FILE, REF); a FILE that exists with a colon in its name wins."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, ref = spec.partition(":")
    return path, ref or None


def open_docker_archive(path: str, platform: str | None = None) -> ImageSource:
    """Open ``FILE[:REF]`` (the part after ``docker-archive:``); REF is a RepoTag such
    as ``name:tag`` or ``@N`` (the N-th image), needed only if the archive holds several."""
    reference = f"docker-archive:{path}"
    file_path, ref = split_spec(path)
    if not os.path.isfile(file_path):
        raise SourceError(f"{reference}: no such file {file_path!r}" if not os.path.exists(file_path) else f"{reference}: {file_path!r} is not a file")
    with open(file_path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
        raise SourceError(f"{reference}: the archive is compressed; decompress it first (docker load accepts it, but it cannot be read in place)")
    files = TarFiles(file_path, reference)
    if files.exists("manifest.json"):
        return _open_saved(files, reference, ref, platform)
    if files.exists("oci-layout") and files.exists("index.json"):
        return open_layout(files, reference, ref, platform)
    raise SourceError(f"{reference}: not a docker save archive (no manifest.json, nor oci-layout and index.json)")


def _read(files: TarFiles, path: str, limit: int, what: str) -> bytes:
    try:
        with files.open(path) as f:
            return read_limited(f, limit, f"{what}: {path}")
    except FileNotFoundError:
        raise SourceError(f"{what}: {path} is missing from the archive") from None


def _pick(entries: list[dict[str, Any]], ref: str | None, what: str) -> dict[str, Any]:
    def tags(e: dict[str, Any]) -> list[str]:
        t = e.get("RepoTags") or []
        return [x for x in t if isinstance(x, str)] if isinstance(t, list) else []

    listing = ", ".join(t for e in entries for t in tags(e)) or "none"
    if ref is None:
        if len(entries) != 1:
            raise SourceError(f"{what}: the archive holds {len(entries)} images; name one as FILE:NAME:TAG or FILE:@N (tags: {listing})")
        return entries[0]
    if ref.startswith("@"):
        try:
            return entries[int(ref[1:])]
        except (ValueError, IndexError):
            raise SourceError(f"{what}: no image {ref} (the archive holds {len(entries)}, numbered from @0)") from None
    want = {ref, ref + ":latest"} if ":" not in ref.rsplit("/", 1)[-1] else {ref}
    for e in entries:
        for t in tags(e):
            if t in want or t.removeprefix("docker.io/").removeprefix("library/") in want:
                return e
    raise SourceError(f"{what}: no image tagged {ref!r} (tags: {listing})")


def _open_saved(files: TarFiles, reference: str, ref: str | None, platform: str | None) -> ImageSource:
    what = reference
    raw = _read(files, "manifest.json", MAX_MANIFEST_SIZE, what)
    try:
        entries = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what}: manifest.json is not JSON: {e}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise SourceError(f"{what}: manifest.json is not a non-empty list of images")
    entry = _pick(entries, ref, what)
    config_path, layer_paths = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list) or not all(isinstance(p, str) for p in layer_paths):
        raise SourceError(f"{what}: manifest.json entry needs a Config path and a Layers list of paths")

    config_bytes = _read(files, config_path, MAX_CONFIG_SIZE, what)
    named = _CONFIG_NAME.fullmatch(TarFiles._norm(config_path))
    config_digest = "sha256:" + named.group(1) if named else sha256_digest(config_bytes)
    config_desc = Descriptor(DOCKER_CONFIG, config_digest, len(config_bytes))
    config = parse_config(config_bytes, config_desc, what)
    check_config_platform(config, platform, what)
    check_layer_count(len(layer_paths), config, f"{what}: manifest.json")

    layers: list[Layer] = []
    for i, (path, diff_id) in enumerate(zip(layer_paths, diff_ids(config))):
        if not files.exists(path):
            raise SourceError(f"{what}: layer {i} ({diff_id}) is missing: no file {path!r} in the archive")
        layers.append(Layer(digest=diff_id, size=files.size(path), media_type=DOCKER_LAYER,
                            opener=_opener(files, path), source=reference, diff_id=diff_id))

    synthetic = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": config_desc.size, "digest": config_desc.digest},
        "layers": [{"mediaType": DOCKER_LAYER, "size": lb.size, "digest": lb.digest} for lb in layers],
    }
    manifest_digest = sha256_digest(json.dumps(synthetic, sort_keys=True, separators=(",", ":")).encode())
    return ImageSource(reference=reference, manifest_digest=manifest_digest, config=config, layers=list(layers))


def _opener(files: TarFiles, path: str) -> Callable[[], BinaryIO]:
    return lambda: files.open(path)
