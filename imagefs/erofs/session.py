"""One EROFS mount for the daemon: decide, prepare, mount after FUSE answers, unmount.

The daemon asks :func:`prepare` before it mounts anything. With ``--fs fuse`` it
gets None (the plain mount); otherwise this module makes sure the kernel will take
the image as EROFS before the daemon commits to it:

1. the slot map and the metadata image (:mod:`.writer`), kept in the host's cache
   directory next to the index copies (``erofs/imagefs-<index hex>.erofs``),
   checked against its header on every use and written again when it does not
   check; without a cache directory it is written to the run directory and
   unlinked as soon as the kernel holds it;
2. a probe: the real metadata is mounted once on a private directory with a sparse
   placeholder of the blob's size as its device, then unmounted. A kernel without
   file-backed EROFS (or one that refuses the options) fails here.

Where either step fails, ``--fs auto`` (the default) logs one line saying why and
mounts the plain way; ``--fs erofs`` makes it the mount's error. The daemon then
FUSE-mounts the blob (:mod:`.blobfs`) on a private directory in the run directory
(``<mount key>.blob``, 0700, no ``allow_other``), and once that answers,
:meth:`ErofsMount.mount` puts EROFS on the user's mountpoint. Unmounting goes the
other way: EROFS first (lazily if busy), then the blob, whose FUSE session ends when
the kernel lets go of the file (a lazily detached EROFS keeps it until its last user
is gone), which is when the daemon exits.

Where the metadata comes from: since the profiles work, ``imagefs index`` writes it into
the store beside the index (indexer.erofs.store) and a cold host fetches it in the same
round trip as the index (imagefs.erofs.host_copy), because writing it here cost the
first mount of an image on a host ~300 ms (the torch bench image: 33,839 inodes,
4.2 MiB; `imagefs mount` 505 ms against 224 ms with a kept copy, bench/RESULTS.md
"EROFS mounts") in series with everything a cold start waits for, the startup profile's
replay included. An image indexed before (or by another writer version) has none in the
store: then it is written here, once per host, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from imagefs.erofs import kernel
from indexer.erofs import writer
from imagefs.erofs.blobfs import BLOB_NAME, BlobFS
from imagefs.erofs.host_copy import META_PREFIX, META_SUFFIX
from imagefs.erofs.host_copy import path as metadata_path
from imagefs.erofs.host_copy import write as write_metadata
from indexer.erofs.slots import SlotMap, SlotSpaceError

if TYPE_CHECKING:
    from cache.tier import ChunkReader
    from imagefs.mount import MountOptions, RunPaths
    from indexer.index import Index

log = logging.getLogger(__name__)

FS_MODES = ("auto", "erofs", "fuse")
# EROFS mount options, comma-separated, in place of the defaults below (tuning, and how
# tests make the kernel refuse).
OPTIONS_ENV = "IMAGEFS_EROFS_OPTIONS"
# Tried in order until the probe mount takes one. ``directio``: EROFS reads the blob with
# O_DIRECT, so each page-cache miss of an EROFS file is one FUSE read of what EROFS asks
# for (its readahead), and the blob's bytes are not cached a second time in the FUSE
# mount's page cache. Kernels before it (6.12) take no options: their blob reads go through
# the FUSE page cache, with the FUSE readahead window sizing them.
DEFAULT_OPTIONS = ("directio", "")
# Readahead window of the EROFS mount, KiB: the size of its reads of the blob (at most
# 1 MiB reach the daemon at once) and the read-around of a page fault. Measured with
# `python -m bench erofs` (bench/RESULTS.md "EROFS mounts"): SSD-warm `import torch`
# 2.11-2.29 s at 512 vs 2.11-2.43 at 128 and 2.39-3.05 at 1024; 1 GiB sequential read
# 608-733 MB/s at 512 vs 537-584 at 128 and 913-959 at 1024.
EROFS_READ_AHEAD_KB = 512


class ErofsUnavailable(Exception):
    """This image cannot be mounted as EROFS here; the message says why."""


def is_metadata_path(source: str) -> bool:
    """Whether a mount source names metadata written by :func:`prepare` (mountinfo check)."""
    base = os.path.basename(source)
    return base.startswith(META_PREFIX) and base.endswith(META_SUFFIX)


class ErofsMount:
    """The EROFS side of one mount: where its pieces are, and mounting them in order."""

    def __init__(self, index: "Index", slots: SlotMap, meta: str, mountpoint: str, blob_dir: str, *,
                 meta_is_temporary: bool, options: str, timings: dict[str, float]) -> None:
        self.index = index
        self.slots = slots
        self.meta = meta
        self.mountpoint = mountpoint
        self.blob_dir = blob_dir
        self.blob = os.path.join(blob_dir, BLOB_NAME.decode())
        self.meta_is_temporary = meta_is_temporary
        self.options = options
        self.timings = timings
        self.mounted = False

    # FUSE options of the blob mount: root only (no allow_other), read-only.
    fuse_options = frozenset({"fsname=imagefs-blob", "subtype=imagefs-blob", "ro"})

    def filesystem(self, reader: "ChunkReader", name: str, read_timeout: float | None = None) -> BlobFS:
        return BlobFS(self.index, self.slots, reader, name=name, read_timeout=read_timeout)

    def mount(self, read_ahead_kb: int | None = None) -> None:
        """(blocking; the FUSE loop must be running) Put EROFS on the mountpoint, with
        ``read_ahead_kb`` as its readahead window (default :data:`EROFS_READ_AHEAD_KB`)."""
        from imagefs.readahead import set_read_ahead_kb

        t0 = time.perf_counter()
        if "directio" in self.options.split(","):
            set_read_ahead_kb(self.blob_dir, 0)  # nothing reads the blob through its page cache
        kernel.mount_erofs(self.meta, self.mountpoint, self.blob, self.options)
        self.mounted = True
        kernel.set_read_ahead_kb(self.mountpoint, EROFS_READ_AHEAD_KB if read_ahead_kb is None else read_ahead_kb)
        self.timings["kernel_mount_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        if self.meta_is_temporary:
            with contextlib.suppress(OSError):
                os.unlink(self.meta)

    def unmount(self) -> None:
        """Take our EROFS off the mountpoint (lazily if busy) if it is still there, and
        nothing else that may be mounted there since. Never raises."""
        from imagefs.mount import mount_at

        if not self.mounted:
            return
        self.mounted = False
        info = mount_at(self.mountpoint)
        if info is None or info.source != self.meta:
            return  # already unmounted (imagefs umount did it)
        try:
            kernel.unmount(self.mountpoint)
        except OSError:
            try:
                kernel.unmount(self.mountpoint, lazy=True)
            except OSError as e:
                log.warning("%s: cannot unmount EROFS: %s", self.mountpoint, e)

    def cleanup(self) -> None:
        """Remove the blob's mountpoint directory and any temporary metadata (after unmount)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.blob_dir)
        if self.meta_is_temporary:
            with contextlib.suppress(OSError):
                os.unlink(self.meta)

    def describe(self) -> dict[str, Any]:
        """What ``imagefs stats`` and the mount record say about this mount."""
        return {"mode": "erofs", "metadata": self.meta, "metadata_bytes": _size(self.meta), "blob": self.blob,
                "blob_bytes": self.slots.size, "chunks": len(self.slots), **self.timings}


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def prepare(index: "Index", image: str, mountpoint: str, opts: "MountOptions",
            paths: "RunPaths") -> ErofsMount | None:
    """The EROFS plan for this mount, or None for a plain one (see the module docstring).
    Raises :class:`ErofsUnavailable` only when ``opts.fs`` is ``erofs``."""
    mode = getattr(opts, "fs", "auto")
    if mode == "fuse":
        return None
    try:
        return _prepare(index, mountpoint, opts, paths)
    except (ErofsUnavailable, OSError, ValueError) as e:  # Unrepresentable and SlotSpaceError are ValueErrors
        if mode == "erofs":
            raise ErofsUnavailable(f"cannot mount {image} as EROFS: {e}") from e
        log.info("%s: mounting %s through FUSE alone: EROFS is not possible here: %s", mountpoint, image, e)
        return None


def _prepare(index: "Index", mountpoint: str, opts: "MountOptions", paths: "RunPaths") -> ErofsMount:
    timings: dict[str, float] = {}
    env = os.environ.get(OPTIONS_ENV)
    candidates = (env,) if env is not None else DEFAULT_OPTIONS
    t0 = time.perf_counter()
    slots = SlotMap.of_index(index)
    cache_dir = opts.index_cache_dir()
    if cache_dir:
        meta, built = _cached_metadata(index, slots, metadata_path(cache_dir, index.digest))
        temporary = False
    else:
        meta, built = _write_metadata(index, slots, os.path.dirname(paths.record), temporary=True), True
        temporary = True
    timings["metadata_ms" if not built else "metadata_built_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    t1 = time.perf_counter()
    try:
        for i, options in enumerate(candidates):
            try:
                _probe(meta, slots, paths.beside(".probe"), options)
                break
            except OSError as e:
                if i + 1 == len(candidates):
                    raise
                log.info("%s: the kernel refuses EROFS options %r (%s); trying %r", mountpoint, options,
                         e.strerror, candidates[i + 1])
    except BaseException:
        if temporary:
            with contextlib.suppress(OSError):
                os.unlink(meta)
        raise
    timings["probe_ms"] = round((time.perf_counter() - t1) * 1000, 2)
    blob_dir = paths.beside(".blob")
    os.makedirs(blob_dir, mode=0o700, exist_ok=True)
    os.chmod(blob_dir, 0o700)
    return ErofsMount(index, slots, meta, mountpoint, blob_dir, meta_is_temporary=temporary, options=options,
                      timings=timings)


def _cached_metadata(index: "Index", slots: SlotMap, path: str) -> tuple[str, bool]:
    """(path, whether it was built now) of the checked metadata image at ``path``
    (fetched from the store beside the index, or written here earlier)."""
    try:
        with open(path, "rb") as f:
            writer.check(f.read(), index.digest)
        return path, False
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("EROFS metadata %s is unusable (%s); writing it again", path, e)
    return _write_metadata(index, slots, os.path.dirname(path), final=path), True


def _write_metadata(index: "Index", slots: SlotMap, directory: str, *, final: str | None = None,
                    temporary: bool = False) -> str:
    """Build the metadata and write it (0600) to ``final`` atomically, or to a new
    temporary file in ``directory``; returns its path."""
    image = writer.build(index, slots)
    if final is not None:
        write_metadata(final, image)
        return final
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=META_PREFIX + ".tmp-", suffix=META_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image)
        return tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _probe(meta: str, slots: SlotMap, probe_dir: str, options: str) -> None:
    """Mount the metadata once with a sparse placeholder of the blob; raise if the kernel refuses."""
    placeholder = probe_dir + "-blob"
    os.makedirs(probe_dir, mode=0o700, exist_ok=True)
    try:
        with open(placeholder, "wb") as f:
            f.truncate(slots.size)
        kernel.mount_erofs(meta, probe_dir, placeholder, options)
        try:
            if not os.path.isdir(probe_dir):
                raise ErofsUnavailable("the probe mount shows no root directory")
        finally:
            kernel.unmount(probe_dir, lazy=True)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(placeholder)
        with contextlib.suppress(OSError):
            os.rmdir(probe_dir)


__all__ = ["prepare", "ErofsMount", "ErofsUnavailable", "FS_MODES", "OPTIONS_ENV", "is_metadata_path",
           "SlotSpaceError"]
