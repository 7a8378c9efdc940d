"""Build small, valid OCI image layouts and ``docker save`` archives for tests.

Tests across the project need images whose every byte they know: these writers take
uncompressed layer tars, compress them as asked, compute digests and diff_ids, and
lay them out exactly as the specs say, so a test can compare what a source yields
with what went in. Output is deterministic (gzip mtime 0, sorted JSON).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from typing import Any, Iterable

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes | None], mtime: int = 1_700_000_000) -> bytes:
    """A tar of regular files (``None`` content: a directory), in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r} (gzip, zstd or none)")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_config(layers: list[bytes], config: dict[str, Any] | None, platform: tuple[str, ...]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "architecture": platform[1],
        "os": platform[0],
        "config": dict(config or {}),
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]},
        "history": [{"created_by": f"test layer {i}"} for i in range(len(layers))],
    }
    if len(platform) > 2:
        doc["variant"] = platform[2]
    return doc


def _write_blob(root: str, data: bytes) -> dict[str, Any]:
    digest = sha256(data)
    path = os.path.join(root, "blobs", "sha256", digest.split(":", 1)[1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def _platform_obj(platform: tuple[str, ...]) -> dict[str, str]:
    obj = {"architecture": platform[1], "os": platform[0]}
    if len(platform) > 2:
        obj["variant"] = platform[2]
    return obj


def write_image(root: str, layers: list[bytes], config: dict[str, Any] | None = None, compression: str = "gzip",
                platform: tuple[str, ...] = ("linux", "amd64")) -> dict[str, Any]:
    """Write one platform's layers, config and manifest as blobs; its manifest descriptor."""
    config_desc = {"mediaType": OCI_CONFIG, **_write_blob(root, canonical(image_config(layers, config, platform)))}
    layer_descs = [{"mediaType": LAYER_MEDIA_TYPES[compression], **_write_blob(root, compress(t, compression))} for t in layers]
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": layer_descs}
    return {"mediaType": OCI_MANIFEST, **_write_blob(root, canonical(manifest)), "platform": _platform_obj(platform)}


def write_oci_layout(dir: str, layers: list[bytes], config: dict[str, Any] | None = None, compression: str = "gzip",
                     tag: str = "latest", platform: tuple[str, ...] = ("linux", "amd64"),
                     extra_platforms: Iterable[tuple[str, ...]] = ()) -> str:
    """Write (or add ``tag`` to) an OCI image layout at ``dir``; the manifest digest
    of ``platform``'s image.

    ``layers`` are uncompressed tars, stored compressed with ``compression`` (gzip,
    zstd or none). ``config`` becomes the image config's ``config`` object (Env, Cmd,
    ...). With ``extra_platforms`` the tag names an image index listing one manifest
    per platform (same layers, each with its own config).
    """
    os.makedirs(dir, exist_ok=True)
    with open(os.path.join(dir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    main = write_image(dir, layers, config, compression, platform)
    extras = [write_image(dir, layers, config, compression, p) for p in extra_platforms]
    if extras:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [main, *extras]}
        entry = {"mediaType": OCI_INDEX, **_write_blob(dir, canonical(index))}
    else:
        entry = {k: v for k, v in main.items() if k != "platform"}
    entry["annotations"] = {REF_NAME: tag}
    index_path = os.path.join(dir, "index.json")
    entries: list[dict[str, Any]] = []
    if os.path.exists(index_path):
        with open(index_path) as f:
            entries = [e for e in json.load(f)["manifests"] if e.get("annotations", {}).get(REF_NAME) != tag]
    entries.append(entry)
    with open(index_path, "wb") as f:
        f.write(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
    return main["digest"]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tf.addfile(info, io.BytesIO(data))


def write_docker_archive(path: str, layers: list[bytes], config: dict[str, Any] | None = None, repo_tag: str = "test:latest",
                         compression: str = "none", platform: tuple[str, ...] = ("linux", "amd64")) -> str:
    """Write a ``docker save`` archive (the classic layout: ``<id>/layer.tar``,
    ``<config hex>.json``, ``manifest.json``, ``repositories``); the config digest.

    ``compression`` other than none stores layers compressed, as docker's containerd
    image store does; the config's diff_ids always name the uncompressed tars.
    """
    config_bytes = canonical(image_config(layers, config, platform))
    config_hex = sha256(config_bytes).split(":", 1)[1]
    layer_paths = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for t in layers:
            layer_id = sha256(t).split(":", 1)[1]
            name = f"{layer_id}/layer.tar"
            if name not in layer_paths:
                _add(tf, f"{layer_id}/VERSION", b"1.0")
                _add(tf, name, compress(t, compression))
            layer_paths.append(name)
        _add(tf, f"{config_hex}.json", config_bytes)
        _add(tf, "manifest.json", json.dumps([{"Config": f"{config_hex}.json", "RepoTags": [repo_tag], "Layers": layer_paths}]).encode())
        repo, _, tag = repo_tag.rpartition(":")
        _add(tf, "repositories", json.dumps({repo: {tag: layer_paths[-1].split("/")[0] if layer_paths else ""}}).encode())
    return "sha256:" + config_hex
