"""Index an image into a store: the whole write path in three steps.

1. Read every layer once, in order, merging it into the tree (``layers``) and feeding
   file content to the chunker, which dedups against the store and holds new
   compressed chunks in memory (a local spill file past a budget). Every blob is
   verified as it is read. Nothing is written to the store in this step, so bad input
   leaves the store exactly as it was.
2. Write the new chunks into packs in tree order (``packer``), encoding the index
   meanwhile (it needs only the packs' digests).
3. Once every pack is durable, write the index, then the name -> digest reference, last.

An interrupted build leaves at most whole packs that no image points to yet; a later
build finds them through their tables of contents and does not store them again.
"""

from __future__ import annotations

import gc
import logging
import posixpath
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from cache.blobstore import BlobStore
from indexer import catalog
from indexer.background import BackgroundReader
from indexer.chunker import DEFAULT_CHUNK_SIZE, DEFAULT_MEMORY_BUDGET, DEFAULT_RANDOM_ACCESS_CHUNK_SIZE, ChunkSpill
from indexer.format import encode, seal
from indexer.index import Index
from indexer.layers import apply_layer
from indexer.leases import Lease
from indexer.packer import load_known_chunks, start_packs
from indexer.progress import NullProgress, Progress
from indexer.sources import ImageSource, SourceError, open_source
from indexer.sources.credentials import AuthOptions
from indexer.tree import Tree

log = logging.getLogger(__name__)

INDEX_FORMAT_META = 2  # 2: no source, manifest digest or layer blobs (they are the name's)
# Image config keys a container run needs (OCI image spec, config.config).
CONFIG_KEYS = ("User", "Env", "Entrypoint", "Cmd", "WorkingDir", "Labels", "ExposedPorts", "Volumes", "StopSignal")


@dataclass(frozen=True)
class BuildResult:
    """What one build did: the image's digest and the figures behind it."""

    digest: str
    name: str | None
    entries: int
    files: int
    content_bytes: int  # logical bytes of every regular file read from the layers
    chunks: int  # distinct chunks the image references
    new_chunks: int  # of those, chunks this build stored
    reused_chunks: int  # chunks the store already held
    stored_bytes: int  # compressed bytes of new packs written
    index_bytes: int
    seconds: float
    replaced: str | None = None  # the digest ``name`` pointed at before, if another


class BuildError(Exception):
    """The build cannot finish without risking an index that names missing packs."""


def default_name(reference: str) -> str | None:
    """A name for an image indexed without ``--name``, as docker and skopeo name it:
    ``docker://HOST/REPO:TAG`` keeps its registry host (Docker Hub's names are shortened
    as docker shortens them: ``docker.io/library/debian:12`` is ``debian:12``); a pull by
    digest is ``REPO@sha256:<hex>``; ``oci:DIR:TAG`` and ``docker-archive:FILE`` are named
    after the directory or file."""
    if reference.startswith("docker://"):
        from indexer.sources.registry import parse_reference

        try:
            ref = parse_reference(reference[len("docker://"):])
        except SourceError:
            return None
        repo = f"{ref.host}/{ref.repo}"
        if ref.digest and not ref.tag:
            return _sanitize(f"{repo}@{ref.digest}")
        return _sanitize(f"{repo}:{ref.tag or 'latest'}")
    if reference.startswith("oci:"):
        spec = reference[len("oci:"):]
        path, _, tag = spec.rpartition(":") if ":" in spec else (spec, "", "")
        if not path:
            path, tag = spec, ""
        base = posixpath.basename(path.rstrip("/")) or "image"
        return _sanitize(f"{base}:{tag or 'latest'}")
    if reference.startswith("docker-archive:"):
        base = posixpath.basename(reference[len("docker-archive:"):])
        base = re.sub(r"\.(tar|tar\.gz|tgz)$", "", base)
        return _sanitize(f"{base}:latest")
    return None


def _sanitize(name: str) -> str | None:
    name, at, digest = name.partition("@")
    cleaned = re.sub(r"[^A-Za-z0-9._/:-]", "-", name).strip("-./:") + (at + digest if at else "")
    try:
        return catalog.validate_name(cleaned)
    except catalog.InvalidImageName:
        return None


def image_meta(source: ImageSource, chunk_size: int) -> dict[str, Any]:
    """What the index records besides the tree: the run config and platform. Nothing
    about how the image travelled (source reference, manifest digest, compressed layer
    digests and media types): those differ between an ``oci:`` zstd copy and a
    ``docker://`` gzip copy of the same image, and the digest must not (see
    :mod:`indexer.catalog`); they are kept with the name, by :func:`origin_of`."""
    cfg = source.config
    inner = cfg.get("config") or {}
    return {
        "meta_version": INDEX_FORMAT_META,
        "architecture": cfg.get("architecture"),
        "os": cfg.get("os"),
        "variant": cfg.get("variant"),
        "created": cfg.get("created"),
        "config": {k: inner[k] for k in CONFIG_KEYS if inner.get(k) is not None},
        "chunk_size": chunk_size,
    }


def _put_erofs_metadata(store: BlobStore, body: bytes, digest: str) -> None:
    """Write the image's EROFS metadata beside its index (indexer.erofs.store), so that
    a host's first mount does not write it on its cold path. An index EROFS cannot
    express is no error: its mounts are plain FUSE mounts."""
    from indexer.erofs import store as erofs_store

    try:
        meta = erofs_store.encode(Index(body, digest))
    except ValueError as e:
        log.info("no EROFS metadata for %s: %s", digest, e)
        return
    store.put(erofs_store.metadata_key(digest), meta)


def origin_of(source: ImageSource) -> dict[str, Any]:
    """Where an image was indexed from, kept in the reference of the name it got."""
    return {
        "source": source.reference,
        "manifest_digest": source.manifest_digest,
        "diff_ids": list((source.config.get("rootfs") or {}).get("diff_ids") or []),
        "layers": [{"digest": l.digest, "size": l.size, "media_type": l.media_type} for l in source.layers],
    }


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its state on the way out.

    A build allocates a node per entry (~34,000 for torch) and keeps them all, so
    every generation-0 threshold crossing made the collector walk the growing tree
    again for nothing (~1.5% of the torch build's CPU in gc_collect_main/visit_decref,
    on the thread that parses tar). Reference counting still frees everything that
    is not in a cycle; the cycles a build makes are collected once it is over.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_image(
    source: str | ImageSource,
    store: BlobStore,
    name: str | None = None,
    *,
    platform: str | None = None,
    insecure: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    random_access_chunk_size: int = DEFAULT_RANDOM_ACCESS_CHUNK_SIZE,
    auth: AuthOptions | None = None,
    max_layer_bytes: int | None = None,
) -> BuildResult:
    """Index ``source`` into ``store`` under ``name`` (None: the default name; "" for none).

    ``memory_budget``: compressed new chunks held in memory until the packs are
    written; the rest waits in a local spill file (see :mod:`indexer.chunker`).
    ``max_layer_bytes``: the most one layer may decompress to (None: the default of
    :mod:`indexer.sources.blobs`); a layer past it fails the build, storing nothing.
    """
    with gc_paused():
        return _build(source, store, name, platform=platform, insecure=insecure, chunk_size=chunk_size,
                      progress=progress, memory_budget=memory_budget,
                      random_access_chunk_size=random_access_chunk_size, auth=auth, max_layer_bytes=max_layer_bytes)


def _build(
    source: str | ImageSource,
    store: BlobStore,
    name: str | None,
    *,
    platform: str | None,
    insecure: bool,
    chunk_size: int,
    progress: Progress | None,
    memory_budget: int,
    random_access_chunk_size: int,
    auth: AuthOptions | None = None,
    max_layer_bytes: int | None = None,
) -> BuildResult:
    start = time.monotonic()
    progress = progress or NullProgress()
    if name:
        name = catalog.validate_name(name)
    store.check()
    src = open_source(source, platform=platform, insecure=insecure, auth=auth) if isinstance(source, str) else source
    if name is None:
        name = default_name(src.reference)
    # The lease is taken before the store's tables of contents are read and held until
    # the name is written: until then, only the lease tells garbage collection that
    # this build may name packs no index names yet (see indexer.leases, indexer.gc).
    lease = Lease(store, f"index {src.reference}")
    try:
        lease.__enter__()
    except BaseException:
        src.close()
        progress.close()
        raise
    try:
        progress.phase("reading store")
        known = load_known_chunks(store)
        tree = Tree()
        with ChunkSpill(known.keys(), chunk_size, memory_budget=memory_budget,
                        random_access_chunk_size=random_access_chunk_size) as spill:
            spill.on_bytes = progress.advance
            for i, layer in enumerate(src.layers, 1):
                label = f"layer {i}/{len(src.layers)} {layer.digest[7:19]}"
                progress.phase(label)
                # The stream is read on a worker thread (decompression and hashing
                # overlap the tar parsing); finish() reads what the tar left, and the
                # stream verifies the blob's digest, size and diff_id at its end. On an
                # error the stream is released without reading on.
                with layer.open(max_layer_bytes) as stream:
                    reader = BackgroundReader(stream)
                    try:
                        apply_layer(tree, reader, f"{src.reference} {label}", spill.add_file)
                        reader.finish()
                    finally:
                        reader.abort()
            spill.finish()

            walked = tree.walk()
            order = [d for _path, node in walked if node.is_reg for d in node.chunks]
            progress.phase("writing packs", sum(c.clen for c in spill.spilled.values()))
            with start_packs(store, spill, order, on_bytes=progress.advance) as packs:
                # The index is encoded while the packs are written and fsynced: it needs
                # only their digests. It is put once every pack is durable.
                new_locations = packs.hashed()
                locations = {**known, **new_locations}
                body = encode(tree, locations, chunk_size, image_meta(src, chunk_size))
                digest, blob = seal(body)
                packs.wait()
                stored = packs.written

        progress.phase("writing index")
        if lease.lapsed():
            _check_packs_present(store, body_packs(blob, digest))
        _put_erofs_metadata(store, body, digest)
        catalog.put_index(store, digest, blob)
        replaced = catalog.set_ref(store, name, digest, origin_of(src)) if name else None
    except EOFError as e:
        raise SourceError(f"{src.reference}: {e}") from e
    finally:
        lease.__exit__(None, None, None)
        src.close()
        progress.close()

    files = {id(node): node for _path, node in walked if node.is_reg}  # a hardlinked file once
    distinct = {d for node in files.values() for d in node.chunks}
    return BuildResult(
        digest=digest,
        name=name or None,
        entries=len(walked),
        files=len(files),
        content_bytes=spill.content_bytes,
        chunks=len(distinct),
        new_chunks=len(new_locations),
        reused_chunks=len(distinct) - len(distinct & new_locations.keys()),
        stored_bytes=stored,
        index_bytes=len(blob),
        seconds=time.monotonic() - start,
        replaced=replaced,
    )


def body_packs(blob: bytes, digest: str) -> list[str]:
    """The pack keys a sealed index names."""
    from indexer.index import Index

    return Index.from_blob(blob, digest).pack_keys()


def _check_packs_present(store: BlobStore, keys: list[str]) -> None:
    """Before writing an index whose build lost its lease: every pack it names must
    still be in the store (garbage collection may have judged the build dead)."""
    missing = [k for k in keys if not store.exists(k)]
    if missing:
        raise BuildError(f"{store.url}: this build could not renew its lease and {len(missing)} pack(s) it "
                         f"reuses were deleted meanwhile ({', '.join(missing[:3])}); nothing was named: "
                         "index the image again")
