"""Manifests, image indexes, descriptors, platforms and image configs.

Transports differ only in how they fetch bytes; what those bytes must say is the same
for all of them, so parsing and validation live here once. Everything that comes from
an image is treated as untrusted input: JSON that is not an object, a descriptor
whose digest is not ``sha256:<64 hex>``, a size that is not a non-negative integer, a
config whose layer count disagrees with the manifest, each becomes a
:class:`SourceError` naming the image and the problem before a single layer is read.

:func:`resolve_image` is the shared walk: top-level manifest -> (image index ->
platform) -> image manifest -> config -> :class:`~indexer.sources.blobs.Layer` list.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from indexer.sources import ImageSource, SourceError
from indexer.sources.blobs import Layer, layer_compression

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# What a registry client asks for, best first.
ACCEPT = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_PLATFORM = "linux/amd64"
# Manifests and configs are small; refuse to buffer absurd ones (containerd uses 4 MiB).
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 64 << 20
# Image indexes may nest; real ones nest once at most.
MAX_INDEX_DEPTH = 4

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(value: Any, what: str) -> str:
    """``value`` if it is a ``sha256:<64 lowercase hex>`` digest, else SourceError."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise SourceError(f"{what}: invalid digest {value!r} (expected sha256:<64 hex digits>)")
    return value


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as a JSON object, or SourceError saying ``what`` is not JSON."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{what} is not a JSON object (got {type(obj).__name__})")
    return obj


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def parse_platform(spec: str | None) -> Platform:
    """``os/arch[/variant]`` (default linux/amd64)."""
    parts = (spec or DEFAULT_PLATFORM).split("/")
    if not 2 <= len(parts) <= 3 or not all(p.strip() for p in parts):
        raise SourceError(f"invalid platform {spec!r} (expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


# Variants an architecture has when none is named (containerd's normalisation).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def _variant(p: Platform) -> str:
    return p.variant or _DEFAULT_VARIANT.get(p.architecture, "")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def ref_name(self) -> str:
        return self.annotations.get(REF_NAME, "")


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    """A validated OCI/Docker content descriptor."""
    if not isinstance(obj, dict):
        raise SourceError(f"{what}: descriptor is not a JSON object")
    media_type = obj.get("mediaType", "")
    if not isinstance(media_type, str):
        raise SourceError(f"{what}: mediaType is not a string")
    digest = check_digest(obj.get("digest"), what)
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(f"{what}: invalid size {size!r} (expected an integer >= 0)")
    platform = None
    p = obj.get("platform")
    if p is not None:
        if not isinstance(p, dict) or not isinstance(p.get("os"), str) or not isinstance(p.get("architecture"), str):
            raise SourceError(f"{what}: invalid platform {p!r}")
        variant = p.get("variant") or ""
        platform = Platform(p["os"], p["architecture"], variant if isinstance(variant, str) else "")
    ann = obj.get("annotations") or {}
    if not isinstance(ann, dict):
        raise SourceError(f"{what}: annotations is not a JSON object")
    return Descriptor(media_type, digest, size, platform, {str(k): str(v) for k, v in ann.items()})


def verify_blob(data: bytes, desc: Descriptor, what: str) -> None:
    """SourceError unless ``data`` has the descriptor's size and digest."""
    if len(data) != desc.size:
        raise SourceError(f"{what}: size mismatch: descriptor says {desc.size} bytes, got {len(data)}")
    got = sha256_digest(data)
    if got != desc.digest:
        raise SourceError(f"{what}: digest mismatch: descriptor says {desc.digest}, content is {got}")


def media_type_of(doc: dict[str, Any], hint: str, what: str) -> str:
    """The media type a manifest document declares (falling back to the transport's
    label, then to its shape: OCI allows ``mediaType`` to be absent)."""
    mt = doc.get("mediaType") or hint.split(";")[0].strip()
    if mt in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise SourceError(f"{what}: Docker schema 1 manifests are not supported (re-push the image with a current client)")
    if not mt or mt in ("application/json", "application/octet-stream", "text/plain"):
        if "manifests" in doc:
            mt = OCI_INDEX
        elif "config" in doc and "layers" in doc:
            mt = OCI_MANIFEST
    if mt not in MANIFEST_TYPES + INDEX_TYPES:
        raise SourceError(f"{what}: unknown manifest media type {mt!r} (expected one of {', '.join(ACCEPT)})")
    if doc.get("schemaVersion") != 2:
        raise SourceError(f"{what}: unsupported schemaVersion {doc.get('schemaVersion')!r} (expected 2)")
    return mt


def parse_index(doc: dict[str, Any], what: str) -> list[Descriptor]:
    """The manifest descriptors an image index (or manifest list) lists."""
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise SourceError(f"{what}: image index has no 'manifests' list")
    return [parse_descriptor(d, f"{what}: manifests[{i}]") for i, d in enumerate(items)]


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


def parse_manifest(doc: dict[str, Any], media_type: str, what: str) -> Manifest:
    """An image manifest's config and layer descriptors, validated."""
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SourceError(f"{what}: manifest has no 'layers' list")
    config = parse_descriptor(doc.get("config"), f"{what}: config")
    if config.media_type not in CONFIG_TYPES:
        raise SourceError(f"{what}: config media type {config.media_type!r} is not a container image config (expected {' or '.join(CONFIG_TYPES)})")
    descs = [parse_descriptor(d, f"{what}: layers[{i}]") for i, d in enumerate(layers)]
    for i, d in enumerate(descs):
        layer_compression(d.media_type, f"{what}: layers[{i}] ({d.digest})")
    return Manifest(media_type, config, descs)


def select_platform(descs: list[Descriptor], platform: str | None, what: str) -> Descriptor:
    """The manifest for ``platform`` (default linux/amd64) from an index's list.

    The variant must match when one is asked for (``arm64`` means ``arm64/v8``);
    without one the first manifest for os/arch wins. Attestations and other
    non-image entries (no platform, or ``unknown/unknown``) never match.
    """
    want = parse_platform(platform)
    images = [d for d in descs if d.platform is not None and d.platform.os != "unknown"]
    for d in images:
        p = d.platform
        assert p is not None
        if p.os == want.os and p.architecture == want.architecture and (not want.variant or _variant(p) == _variant(want)):
            return d
    available = ", ".join(sorted({str(d.platform) for d in images})) or "none listed"
    raise SourceError(f"{what}: no image for platform {want} (available: {available})")


def parse_config(data: bytes, desc: Descriptor, what: str) -> dict[str, Any]:
    """The image config, verified against its descriptor and checked for a rootfs."""
    verify_blob(data, desc, f"{what}: config {desc.digest}")
    config = parse_json(data, f"{what}: config {desc.digest}")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise SourceError(f"{what}: config {desc.digest} has no rootfs of type 'layers' with a diff_ids list")
    for i, d in enumerate(rootfs["diff_ids"]):
        check_digest(d, f"{what}: config rootfs.diff_ids[{i}]")
    if "config" in config and config["config"] is not None and not isinstance(config["config"], dict):
        raise SourceError(f"{what}: config {desc.digest}: 'config' is not a JSON object")
    return config


def check_config_platform(config: dict[str, Any], platform: str | None, what: str) -> None:
    """When a platform was asked for and the image is single-platform, it must match."""
    if platform is None:
        return
    want = parse_platform(platform)
    have = Platform(str(config.get("os", "")), str(config.get("architecture", "")), str(config.get("variant", "") or ""))
    if (have.os, have.architecture) != (want.os, want.architecture) or want.variant and _variant(have) != _variant(want):
        raise SourceError(f"{what}: image is for platform {have}, not {want}")


def diff_ids(config: dict[str, Any]) -> list[str]:
    return list(config["rootfs"]["diff_ids"])


def check_layer_count(n_layers: int, config: dict[str, Any], what: str) -> None:
    n = len(diff_ids(config))
    if n != n_layers:
        raise SourceError(f"{what}: manifest lists {n_layers} layers but the config's rootfs.diff_ids has {n}")


def read_limited(stream: BinaryIO, limit: int, what: str) -> bytes:
    """All of ``stream``, refusing more than ``limit`` bytes."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise SourceError(f"{what} is larger than {limit} bytes; refusing to buffer it")
    return data


# What a transport supplies to resolve_image:
#   fetch_manifest(desc) -> (bytes, media type hint), for manifests an index names
#   fetch_config(desc) -> bytes
#   layer_opener(desc) -> callable returning the raw blob stream
FetchManifest = Callable[[Descriptor], tuple[bytes, str]]
FetchBlob = Callable[[Descriptor], bytes]
LayerOpener = Callable[[Descriptor], Callable[[], BinaryIO]]


def resolve_image(
    reference: str,
    data: bytes,
    media_type_hint: str,
    *,
    platform: str | None,
    fetch_manifest: FetchManifest,
    fetch_config: FetchBlob,
    layer_opener: LayerOpener,
    close: Callable[[], None] = lambda: None,
) -> ImageSource:
    """Walk from the top-level manifest bytes to an :class:`ImageSource`.

    ``data`` must already be trusted (verified by digest, or the transport's own
    top-level entry); every manifest reached from an index is verified here.
    """
    what = reference
    digest = sha256_digest(data)
    for _depth in range(MAX_INDEX_DEPTH + 1):
        doc = parse_json(data, f"{what}: manifest {digest}")
        mt = media_type_of(doc, media_type_hint, f"{what}: manifest {digest}")
        if mt not in INDEX_TYPES:
            break
        desc = select_platform(parse_index(doc, f"{what}: index {digest}"), platform, f"{what}: index {digest}")
        data, media_type_hint = fetch_manifest(desc)
        verify_blob(data, desc, f"{what}: manifest {desc.digest}")
        digest = desc.digest
        if not media_type_hint or media_type_hint in ("application/octet-stream",):
            media_type_hint = desc.media_type
    else:
        raise SourceError(f"{what}: image indexes nest deeper than {MAX_INDEX_DEPTH} levels")
    manifest = parse_manifest(doc, mt, f"{what}: manifest {digest}")
    config = parse_config(fetch_config(manifest.config), manifest.config, what)
    check_config_platform(config, platform, what)
    check_layer_count(len(manifest.layers), config, f"{what}: manifest {digest}")
    layers = [
        Layer(digest=d.digest, size=d.size, media_type=d.media_type, opener=layer_opener(d), source=reference, diff_id=diff_id)
        for d, diff_id in zip(manifest.layers, diff_ids(config))
    ]
    return ImageSource(reference=reference, manifest_digest=digest, config=config, layers=layers, close=close)
